"""Serving benchmark: `gptlab serve` under 1..100 concurrent streaming clients, batched vs one at a time.

The server runs as its own process (`python -m gptlab.cli serve`); this script is the load generator, a
separate process talking to it over loopback (127.0.0.1 only) with httpx + asyncio. Every client sends
streaming chat requests back to back (the same prompts, greedy, `--max-tokens` each) and records
- time to first token (TTFT): request sent -> first chunk carrying text,
- inter-token latency (ITL): time between consecutive text chunks of one answer,
- completion tokens (from the final usage chunk) and errors (non-200 answers, error events, no [DONE]).
Throughput = completion tokens of all clients / wall time of the scenario.

Peers: the same requests against a server started with `--max-batch 1` (one request decoded at a time, the
rest queue), the speed-up being what continuous batching buys; or, with `--peer unchunked`, against a
batched server with `--prefill-chunk-tokens 0` (whole prompts prefilled in one step), which is what
chunked prefill buys; `--long-prompt-words N` makes every 4th client's prompts N words longer, the case
chunked prefill is for. Scenarios alternate between the two servers (batched, peer, batched, peer...)
so load from other work on the machine hits both alike.
The soak runs `--soak-clients` streaming clients for `--soak-seconds` and reports errors and the
server's peak RSS (VmHWM from /proc).

    python bench/bench_serve.py --concurrency 1 8 32 100 --requests-per-client 2 --soak-seconds 180
    python bench/bench_serve.py --peer unchunked --concurrency 32 100 --long-prompt-words 300 --soak-seconds 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx
import torch

from gptlab.checkpoint import save_model_dir
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer

LONG_WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
PROMPTS = ["How do I read a file line by line?", "Explain what a hash map is.", "Write a haiku about rain.",
           "What is the capital of France?", "Summarise the plot of Hamlet.", "def fibonacci(n):"]


def make_model(path: Path, args) -> Path:
    """A small random-init model (speed does not depend on the weight values) and a tokenizer trained on
    stdlib source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text(encoding="utf-8") for n in ("textwrap.py", "argparse.py", "difflib.py")]
    tok = train_tokenizer(texts, vocab_size=args.vocab)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=args.layers, n_embd=args.width, n_head=args.width // 64,
                       n_kv_head=args.width // 64, head_dim=64, intermediate_size=4 * args.width,
                       max_seq_len=getattr(args, "context", 512))
    model = GPT(config)
    with torch.no_grad():  # no end token ever wins the argmax: every answer is exactly max_tokens long
        model.lm_head.weight[list(tok.special_tokens.values())] = 0
    print(f"model: {args.layers} layers, width {args.width}, {model.num_params() / 1e6:.1f}M params, "
          f"vocab {tok.vocab_size}")
    return save_model_dir(path, model, tok)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, port: int, max_batch: int, threads: int, prefill_chunk_tokens: int,
                 extra: tuple[str, ...] = ("--max-queue", "10000")):
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "gptlab.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--max-batch", str(max_batch), "--threads", str(threads), "--prefill-chunk-tokens",
               str(prefill_chunk_tokens), "--log-level", "warning", "--model-name", "bench", *extra]
        # stderr to a file, not a pipe: nobody reads a pipe during a long run, and a full one (64 KiB of
        # warnings) would block the server's next write
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {self.stderr()}")
            time.sleep(0.2)

    def peak_rss_mib(self, field: str = "VmHWM") -> float:
        """The server's peak resident memory (VmRSS: the current one), MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stderr(self) -> str:
        """What the server wrote to stderr so far (warnings, tracebacks)."""
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, stats: dict) -> None:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = None
    done = False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                stats["errors"].append(f"HTTP {response.status_code}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    stats["errors"].append(chunk["error"]["message"])
                    return
                if chunk.get("usage"):
                    stats["tokens"] += chunk["usage"]["completion_tokens"]
                if any(c["delta"].get("content") for c in chunk["choices"]):
                    now = time.perf_counter()
                    if last is None:
                        stats["ttft"].append(now - start)
                    else:
                        stats["itl"].append(now - last)
                    last = now
    except httpx.HTTPError as e:
        stats["errors"].append(type(e).__name__)
        return
    if not done:
        stats["errors"].append("stream ended without [DONE]")


async def run_clients(url: str, clients: int, requests_per_client: int | None, max_tokens: int,
                      seconds: float | None = None, long_prompt_words: int = 0) -> dict:
    """`clients` concurrent clients, each sending requests back to back: `requests_per_client` each, or
    until `seconds` have passed."""
    stats = {"ttft": [], "itl": [], "tokens": 0, "errors": [], "requests": 0}
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        start = time.perf_counter()

        async def client_loop(k: int):
            i = 0
            while (i < requests_per_client) if seconds is None else (time.perf_counter() - start < seconds):
                prompt = PROMPTS[(k + i) % len(PROMPTS)]
                if long_prompt_words and k % 4 == 0:
                    prompt = " ".join(LONG_WORDS[j % len(LONG_WORDS)] for j in range(long_prompt_words)) + " " + prompt
                await one_request(client, url, prompt, max_tokens, stats)
                stats["requests"] += 1
                i += 1

        await asyncio.gather(*(client_loop(k) for k in range(clients)))
        stats["wall"] = time.perf_counter() - start
    return stats


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] * 1000


def summary(s: dict) -> dict:
    return {"tok_s": s["tokens"] / s["wall"], "ttft50": pct(s["ttft"], 50), "ttft99": pct(s["ttft"], 99),
            "itl50": pct(s["itl"], 50), "itl99": pct(s["itl"], 99), "errors": len(s["errors"]),
            "requests": s["requests"], "tokens": s["tokens"], "wall": s["wall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: a random-init small model)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 100])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=128, help="batched server's --max-batch")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (the load generator needs a core)")
    ap.add_argument("--skip-single", action="store_true", help="do not measure a peer")
    ap.add_argument("--peer", choices=["single", "unchunked"], default="single",
                    help="single: --max-batch 1; unchunked: batched with --prefill-chunk-tokens 0")
    ap.add_argument("--prefill-chunk-tokens", type=int, default=128, help="batched server's value")
    ap.add_argument("--long-prompt-words", type=int, default=0, help="every 4th client's prompts get N more words")
    ap.add_argument("--soak-seconds", type=float, default=180)
    ap.add_argument("--soak-clients", type=int, default=100)
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else make_model(Path(tmp.name) / "model", args)
    load_before = os.getloadavg()
    servers = {"batched": Server(model_dir, free_port(), args.max_batch, args.threads, args.prefill_chunk_tokens)}
    if not args.skip_single and args.peer == "single":
        servers["single"] = Server(model_dir, free_port(), 1, args.threads, args.prefill_chunk_tokens)
    elif not args.skip_single:
        servers["unchunked"] = Server(model_dir, free_port(), args.max_batch, args.threads, 0)
    rows = []
    try:
        for i, clients in enumerate(args.concurrency):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                # warm-up request, not measured (first-call allocations)
                asyncio.run(run_clients(servers[name].url, 1, 1, 4))
                s = summary(asyncio.run(run_clients(servers[name].url, clients, args.requests_per_client,
                                                    args.max_tokens, long_prompt_words=args.long_prompt_words)))
                rows.append((clients, name, s))
                print(f"{clients:4d} clients {name:9s} {s['tok_s']:8.1f} tok/s  TTFT p50 {s['ttft50']:8.1f} ms "
                      f"p99 {s['ttft99']:8.1f}  ITL p50 {s['itl50']:6.1f} ms p99 {s['itl99']:7.1f}  "
                      f"errors {s['errors']}  ({s['requests']} req, {s['tokens']} tok, {s['wall']:.1f} s)", flush=True)
        for peer in [name for name in servers if name != "batched"]:
            servers.pop(peer).stop()  # the soak gets the machine to itself
        soak = None
        if args.soak_seconds > 0:
            soak = summary(asyncio.run(run_clients(servers["batched"].url, args.soak_clients, None,
                                                   args.max_tokens, seconds=args.soak_seconds,
                                                   long_prompt_words=args.long_prompt_words)))
            soak["peak_rss"] = servers["batched"].peak_rss_mib()
            print(f"soak: {args.soak_clients} clients for {soak['wall']:.0f} s: {soak['requests']} requests, "
                  f"{soak['tokens']} tokens, {soak['tok_s']:.1f} tok/s, errors {soak['errors']}, "
                  f"server peak RSS {soak['peak_rss']:.0f} MiB", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    load_after = os.getloadavg()
    if args.out:
        write_report(Path(args.out), args, rows, soak, load_before, load_after)


def write_report(path: Path, args, rows, soak, load_before, load_after) -> None:
    from gptlab.common import atomic_write_text

    lines = ["# Serving benchmark (`gptlab serve`)", "",
             f"Command: `python bench/bench_serve.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {os.cpu_count()}-core CPU shared with other work; load average "
             f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (`os.getloadavg`, 1 min). Server: "
             f"`--threads {args.threads}`, a separate process from the load generator, loopback HTTP. Model: "
             f"{args.layers} layers, width {args.width}, random init; greedy, {args.max_tokens} tokens per "
             f"answer, streaming; each client sends {args.requests_per_client} requests back to back"
             + (f"; every 4th client's prompts are {args.long_prompt_words} words longer" if args.long_prompt_words
                else "") + ".", "",
             "| clients | server | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for clients, name, s in rows:
        label = {"batched": f"batched (max-batch {args.max_batch}, prefill chunk {args.prefill_chunk_tokens})",
                 "single": "one at a time (max-batch 1)",
                 "unchunked": f"batched (max-batch {args.max_batch}, prefill chunk 0 = whole prompts)"}[name]
        lines.append(f"| {clients} | {label} | {s['tok_s']:.1f} | {s['ttft50']:.0f} | {s['ttft99']:.0f} | "
                     f"{s['itl50']:.1f} | {s['itl99']:.1f} | {s['errors']} |")
    by = {(c, n): s for c, n, s in rows}
    gains = [f"{c} clients: {by[(c, 'batched')]['tok_s'] / by[(c, 'single')]['tok_s']:.2f}x"
             for c in args.concurrency if (c, "single") in by]
    if gains:
        lines += ["", "Throughput gain of continuous batching over one-at-a-time serving (same requests, same "
                  "run): " + ", ".join(gains) + "."]
    if soak:
        lines += ["", f"Soak: {args.soak_clients} concurrent streaming clients for {soak['wall']:.0f} s: "
                  f"{soak['requests']} requests, {soak['tokens']} tokens ({soak['tok_s']:.1f} tokens/s), "
                  f"**{soak['errors']} errors**, TTFT p50 {soak['ttft50']:.0f} ms / p99 {soak['ttft99']:.0f} ms, "
                  f"ITL p50 {soak['itl50']:.1f} ms / p99 {soak['itl99']:.1f} ms, server peak RSS "
                  f"{soak['peak_rss']:.0f} MiB."]
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
