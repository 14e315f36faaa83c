"""Prefix caching and a load test for `gptlab serve` (issue 20), against servers this script starts on
loopback (`python -m gptlab.cli serve`, one process each; this process is the load generator, httpx +
asyncio, streaming chat requests).

`prefix`: two servers, automatic prefix caching on (the default) and off (`--no-prefix-cache`), measured
in alternation (on, off, off, on, ...) so other load on the machine hits both alike.
- C concurrent clients (e.g. 1, 8, 32) each send R requests back to back: a system prompt of about
  `--prefix-tokens` tokens shared by every request of the scenario, then a short question of its own;
  each scenario uses another system prompt, so none is warm from an earlier scenario. Greedy,
  `--max-tokens` tokens. Reported: time to first token (TTFT: request sent -> first text chunk) p50/p99,
  generated tokens/s, requests/s.
- Self-consistency: one request with n = k (temperature 1, seeded) of a fresh prompt of the same length,
  streamed: TTFT (first text of any choice) and the time to the last token, `--sc-reps` times.
`load`: one server (cache on, `--max-queue`); N clients stream requests for `--seconds` s: half share a
system prompt, half are unique (`--unique-tokens` long); a fraction (`--drop-fraction`) hang up after a
few text chunks. A 429 makes the client wait its Retry-After and go on. Every request ends as exactly one
of done (its [DONE] arrived), dropped (by the client, on purpose), refused (429) or error (any other
status, an error event, a broken stream); a request still unanswered `--drain-seconds` after the end is
lost (must be 0). Reported: those counts, generated tokens/s, TTFT and inter-token latency (ITL) p50/p99,
the server's RSS before, during (ten samples) and after the run (VmRSS; VmHWM peak), the tracebacks in its
stderr, and /metrics after the run (aborted requests, rows still running).

    python bench/bench_serve_load.py prefix --concurrency 1 8 32 --requests-per-client 3 --out bench/results/prefix_cache.md
    python bench/bench_serve_load.py load --clients 200 --seconds 300 --out bench/results/load.md
    python bench/bench_serve_load.py load --model MODEL_DIR --clients 200 --load-prefix-tokens 120  # 256-token context
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import Server, free_port, make_model, pct  # noqa: E402

from gptlab.common import atomic_write_text  # noqa: E402
from gptlab.tokenizer import Tokenizer  # noqa: E402

TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "collections" / "__init__.py").read_text(encoding="utf-8")
WORDS = TEXT.split()


def text_of_tokens(tok: Tokenizer, start: int, n_tokens: int) -> str:
    """About `n_tokens` tokens of stdlib source, from character `start` on (each scenario its own)."""
    ids = tok.encode(TEXT[start % (len(TEXT) // 2):])[:n_tokens]
    return tok.decode(ids)


async def stream_chat(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int, *, n: int = 1,
                      seed: int | None = None, drop_after: int | None = None) -> dict:
    """One streaming chat request; returns its outcome, TTFT, inter-token gaps and generated tokens."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "stream": True, "n": n,
            "stream_options": {"include_usage": True}, "temperature": 0 if seed is None else 1.0}
    if seed is not None:
        body["seed"] = seed
    result = {"outcome": "error", "ttft": None, "itl": [], "tokens": 0, "detail": "", "retry_after": None}
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code == 429:
                result.update(outcome="refused", retry_after=float(response.headers.get("retry-after", 1)))
                return result
            if response.status_code != 200:
                result["detail"] = f"HTTP {response.status_code}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    result["outcome"] = "done"
                    return result
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result["detail"] = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result["tokens"] = chunk["usage"]["completion_tokens"]
                if any(c["delta"].get("content") for c in chunk["choices"]):
                    now = time.perf_counter()
                    if last is None:
                        result["ttft"] = now - start
                    else:
                        result["itl"].append(now - last)
                    last, chunks = now, chunks + 1
                    if drop_after is not None and chunks >= drop_after:
                        result.update(outcome="dropped", tokens=chunks)
                        return result  # leaving the block closes the connection mid-stream
            result["detail"] = "stream ended without [DONE]"
    except httpx.HTTPError as e:
        result["detail"] = type(e).__name__
    return result


def new_client(clients: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    return httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits)


# ---- prefix cache on vs off ------------------------------------------------------------------------------
async def shared_prefix_scenario(url: str, system: str, clients: int, requests: int, max_tokens: int) -> dict:
    results = []
    async with new_client(clients) as client:
        start = time.perf_counter()

        async def client_loop(k: int):
            for i in range(requests):
                question = f"Question {k}.{i}: what does " + " ".join(random.Random(k * 1000 + i).sample(WORDS, 5))
                results.append(await stream_chat(client, url, [{"role": "system", "content": system},
                                                               {"role": "user", "content": question}], max_tokens))

        await asyncio.gather(*(client_loop(k) for k in range(clients)))
        wall = time.perf_counter() - start
    return summarise(results, wall)


async def self_consistency(url: str, prompt: str, k: int, max_tokens: int) -> dict:
    async with new_client(1) as client:
        start = time.perf_counter()
        r = await stream_chat(client, url, [{"role": "user", "content": prompt}], max_tokens, n=k, seed=1)
        r["total"] = time.perf_counter() - start
    return r


def summarise(results: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [g for r in results for g in r["itl"]]
    count = {o: sum(r["outcome"] == o for r in results) for o in ("done", "dropped", "refused", "error")}
    tokens = sum(r["tokens"] for r in results)
    return {"ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "itl50": pct(itl, 50), "itl99": pct(itl, 99),
            "tok_s": tokens / wall, "req_s": count["done"] / wall, "wall": wall, "tokens": tokens, **count,
            "details": sorted({r["detail"] for r in results if r["outcome"] == "error"})}


def run_prefix(args, model_dir: Path, tok: Tokenizer) -> list[str]:
    servers = {name: Server(model_dir, free_port(), args.max_batch, args.threads, args.prefill_chunk_tokens,
                            extra=("--max-queue", "10000", *extra))
               for name, extra in (("on", ()), ("off", ("--no-prefix-cache",)))}
    lines = ["| clients | prefix cache | TTFT p50 ms | TTFT p99 ms | tokens/s | requests/s | errors |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    by = {}
    try:
        for name, server in servers.items():  # warm-up (first-call allocations), another prompt
            asyncio.run(shared_prefix_scenario(server.url, text_of_tokens(tok, 99_999, 64), 1, 1, 4))
        for i, clients in enumerate(args.concurrency):
            system = text_of_tokens(tok, 7_919 * (i + 1), args.prefix_tokens)
            for name in (["on", "off"] if i % 2 == 0 else ["off", "on"]):
                s = asyncio.run(shared_prefix_scenario(servers[name].url, system, clients, args.requests_per_client,
                                                       args.max_tokens))
                by[clients, name] = s
                print(f"{clients:3d} clients cache {name:3s}: TTFT p50 {s['ttft50']:8.0f} ms p99 {s['ttft99']:8.0f} "
                      f"{s['tok_s']:7.1f} tok/s {s['req_s']:6.2f} req/s errors {s['error']} {s['details']}", flush=True)
                lines.append(f"| {clients} | {name} | {s['ttft50']:.0f} | {s['ttft99']:.0f} | {s['tok_s']:.1f} | "
                             f"{s['req_s']:.2f} | {s['error']} |")
        ratios = [f"{c} clients: TTFT p50 {by[c, 'off']['ttft50'] / by[c, 'on']['ttft50']:.1f}x lower, "
                  f"throughput {by[c, 'on']['tok_s'] / by[c, 'off']['tok_s']:.1f}x" for c in args.concurrency]
        lines += ["", "Cache on vs off: " + "; ".join(ratios) + ".", "",
                  f"Self-consistency: one request with n = {args.sc_k} (temperature 1, seed 1) of a fresh "
                  f"~{args.prefix_tokens}-token prompt, {args.max_tokens} tokens per choice, streamed:", "",
                  "| rep | prefix cache | TTFT ms | last token ms | tokens |", "|---:|---|---:|---:|---:|"]
        for rep in range(args.sc_reps):
            prompt = text_of_tokens(tok, 104_729 * (rep + 1), args.prefix_tokens)
            for name in (["on", "off"] if rep % 2 == 0 else ["off", "on"]):
                r = asyncio.run(self_consistency(servers[name].url, prompt, args.sc_k, args.max_tokens))
                print(f"self-consistency k={args.sc_k} cache {name}: TTFT {r['ttft'] * 1000:.0f} ms, total "
                      f"{r['total'] * 1000:.0f} ms, {r['outcome']} {r['detail']}", flush=True)
                lines.append(f"| {rep + 1} | {name} | {r['ttft'] * 1000:.0f} | {r['total'] * 1000:.0f} | {r['tokens']} |")
    finally:
        for server in servers.values():
            server.stop()
    return lines


# ---- load test -------------------------------------------------------------------------------------------
def unique_prompt(tok: Tokenizer, rng: random.Random, n_tokens: int) -> str:
    """About `n_tokens` tokens of randomly drawn stdlib words (every word is at least one token)."""
    return tok.decode(tok.encode(" ".join(rng.sample(WORDS, n_tokens)))[:n_tokens])


async def load_test(url: str, tok: Tokenizer, args, rss_mib) -> dict:
    system = text_of_tokens(tok, 31_337, args.load_prefix_tokens)
    results: list[dict] = []
    rss_series: list[tuple[float, float]] = []  # (seconds since start, server VmRSS MiB)
    sent = 0
    async with new_client(args.clients) as client:
        start = time.perf_counter()

        async def client_loop(k: int):
            nonlocal sent
            rng = random.Random(k)
            while time.perf_counter() - start < args.seconds:
                if rng.random() < 0.5:
                    messages = [{"role": "system", "content": system},
                                {"role": "user", "content": "Explain " + " ".join(rng.sample(WORDS, 6))}]
                else:
                    messages = [{"role": "user", "content": unique_prompt(tok, rng, rng.randint(*args.unique_tokens))}]
                drop = rng.randint(1, 5) if rng.random() < args.drop_fraction else None
                sent += 1
                r = await stream_chat(client, url, messages, args.max_tokens, drop_after=drop)
                results.append(r)
                if r["outcome"] == "refused":
                    await asyncio.sleep(r["retry_after"])

        async def sample_rss():  # is the server's memory bounded while the load goes on?
            while True:
                rss_series.append((time.perf_counter() - start, rss_mib()))
                await asyncio.sleep(args.seconds / 10)

        sampler = asyncio.create_task(sample_rss())
        tasks = [asyncio.create_task(client_loop(k)) for k in range(args.clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.seconds + args.drain_seconds)
        for task in [*pending, sampler]:
            task.cancel()
        wall = time.perf_counter() - start
    s = summarise(results, min(wall, args.seconds + args.drain_seconds))
    s.update(sent=sent, lost=sent - len(results), unfinished_clients=len(pending), rss_series=rss_series)
    return s


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def run_load(args, model_dir: Path, tok: Tokenizer) -> list[str]:
    server = Server(model_dir, free_port(), args.max_batch, args.threads, args.prefill_chunk_tokens,
                    extra=("--max-queue", str(args.max_queue)))
    try:
        asyncio.run(shared_prefix_scenario(server.url, "warm-up", 1, 1, 4))
        rss_before = server.peak_rss_mib("VmRSS")
        s = asyncio.run(load_test(server.url, tok, args, lambda: server.peak_rss_mib("VmRSS")))
        time.sleep(1.0)
        rss_after, rss_peak = server.peak_rss_mib("VmRSS"), server.peak_rss_mib("VmHWM")
        m = scrape(server.url)
        tracebacks = server.stderr().count("Traceback")
    finally:
        server.stop()
    series = ", ".join(f"{t:.0f} s {r:.0f}" for t, r in s["rss_series"])
    served = {k: v for k, v in m.items() if k.startswith("gptlab_requests_total")}
    print(f"load: {args.clients} clients for {args.seconds:.0f} s: sent {s['sent']}, done {s['done']}, dropped "
          f"{s['dropped']}, refused (429) {s['refused']}, errors {s['error']} {s['details']}, LOST {s['lost']}; "
          f"{s['tok_s']:.1f} tok/s; TTFT p50 {s['ttft50']:.0f} ms p99 {s['ttft99']:.0f}; ITL p50 {s['itl50']:.1f} ms "
          f"p99 {s['itl99']:.1f}; RSS {rss_before:.0f} -> {rss_after:.0f} MiB (peak {rss_peak:.0f}); RSS over time "
          f"{series}; server tracebacks {tracebacks}", flush=True)
    print("server:", served, "aborted", m["gptlab_requests_aborted_total"], "running", m["gptlab_running_rows"],
          "queue", m["gptlab_queue_requests"], "prefix hits", m["gptlab_prefix_cache_hits_total"], "of",
          m["gptlab_prefix_cache_queries_total"], flush=True)
    return ["| clients | seconds | sent | done | dropped by client | 429 | errors | lost | tokens/s | TTFT p50 ms | "
            "TTFT p99 ms | ITL p50 ms | ITL p99 ms | RSS before MiB | RSS after MiB | peak RSS MiB |",
            "|" + "---:|" * 16,
            f"| {args.clients} | {args.seconds:.0f} | {s['sent']} | {s['done']} | {s['dropped']} | {s['refused']} | "
            f"{s['error']} | **{s['lost']}** | {s['tok_s']:.1f} | {s['ttft50']:.0f} | {s['ttft99']:.0f} | "
            f"{s['itl50']:.1f} | {s['itl99']:.1f} | {rss_before:.0f} | {rss_after:.0f} | {rss_peak:.0f} |", "",
            f"Server's /metrics after the run: responses by status {served}; aborted requests (client gone) "
            f"{m['gptlab_requests_aborted_total']:.0f}; rows still running {m['gptlab_running_rows']:.0f}, requests "
            f"waiting {m['gptlab_queue_requests']:.0f}; prefix cache hit {m['gptlab_prefix_cache_hits_total']:.0f} of "
            f"{m['gptlab_prefix_cache_queries_total']:.0f} prompt tokens, {m['gptlab_prefix_cache_evictions_total']:.0f} "
            f"blocks evicted, {m['gptlab_prefix_cache_bytes'] / 2**20:.1f} MiB held. Server RSS during the run "
            f"(s since start: MiB): {series}. Tracebacks in the server's stderr: {tracebacks}."
            + (f" Errors: {s['details']}." if s["details"] else "")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["prefix", "load"])
    ap.add_argument("--model", default=None, help="model directory (default: a random-init small model)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--context", type=int, default=2048, help="context window of the random-init model")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--prefill-chunk-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--sc-k", type=int, default=10)
    ap.add_argument("--sc-reps", type=int, default=2)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--drain-seconds", type=float, default=120)
    ap.add_argument("--max-queue", type=int, default=128)
    ap.add_argument("--load-prefix-tokens", type=int, default=300)
    ap.add_argument("--unique-tokens", type=int, nargs=2, default=[20, 200], metavar=("MIN", "MAX"),
                    help="length range of the unique prompts (tokens; keep them inside the model's context)")
    ap.add_argument("--drop-fraction", type=float, default=0.1)
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else make_model(Path(tmp.name) / "model", args)
    tok = Tokenizer.load(model_dir / "tokenizer.json")
    load_before = os.getloadavg()
    lines = (run_prefix if args.mode == "prefix" else run_load)(args, model_dir, tok)
    load_after = os.getloadavg()
    model = (f"`{args.model}`" if args.model else f"random-init {args.layers} layers, width {args.width}, "
             f"context {args.context}")
    head = [f"# `gptlab serve`: {'prefix cache on vs off' if args.mode == 'prefix' else 'load test'}", "",
            f"Command: `python bench/bench_serve_load.py {' '.join(sys.argv[1:])}`", "",
            f"Machine: {os.cpu_count()}-core CPU shared with other work, load average {load_before[0]:.1f} before, "
            f"{load_after[0]:.1f} after (1 min). Server: `--threads {args.threads} --max-batch {args.max_batch} "
            f"--prefill-chunk-tokens {args.prefill_chunk_tokens}`, its own process, loopback HTTP, streaming "
            f"chat requests, {args.max_tokens} tokens each. Model: {model}.", ""]
    print("\n".join(head + lines))
    if args.out:
        atomic_write_text(Path(args.out), "\n".join(head + lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
