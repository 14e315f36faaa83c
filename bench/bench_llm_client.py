"""Overhead of the HTTP backend of gptlab.apps.llm against the in-process one, on the same model.

The same model directory is opened in process (`open_llm(DIR)`) and served by `gptlab serve` in a
subprocess on a loopback port (`open_llm(DIR, base_url=...)`), both with --threads torch threads. Each
prompt gets greedy chat calls of --max-tokens tokens, and --tiny-tokens calls (1 token: nearly pure request
overhead), repetitions interleaved (local, http, local, http, ...) so load from other work on the machine
hits both alike; medians are reported. Answers are compared: the two backends must write the same text.
Default model: SmolLM2-135M-Instruct if `gptlab models get smollm2-135m-instruct` was run, else a tiny
random model built here (or with --tiny, whose compute is small enough to show the per-call overhead).

    python bench/bench_llm_client.py --reps 3 --max-tokens 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import torch

from gptlab.apps.llm import open_llm
from gptlab.apps.models import cache_root, is_complete
from gptlab.checkpoint import save_model_dir
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer

PROMPTS = ["What is the capital of France?", "Give me three tips for writing clear Python code.",
           "Explain what a hash table is in one paragraph."]


def tiny_model_dir(path: Path) -> Path:
    text = Path(textwrap.__file__).read_text(encoding="utf-8")
    tok = train_tokenizer([text], vocab_size=512)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                       intermediate_size=128, max_seq_len=1024)
    model = GPT(config).eval()
    with torch.no_grad():  # special tokens never win the argmax: every answer runs to max_tokens
        model.lm_head.weight[list(tok.special_tokens.values())] = 0
    return save_model_dir(path, model, tok)


def start_server(model_dir: Path, port: int, threads: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "gptlab.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--threads", str(threads), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("gptlab serve did not start")
        time.sleep(0.2)


def timed(llm, messages, max_tokens):
    start = time.perf_counter()
    generation = llm.chat(messages, max_tokens=max_tokens)[0]
    return time.perf_counter() - start, generation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: see the module docstring)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny random model (isolates per-call overhead)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory()
    smollm = cache_root() / "smollm2-135m-instruct"
    if args.model:
        model_dir = Path(args.model)
    elif is_complete(smollm) and not args.tiny:
        model_dir = smollm
    else:
        model_dir = tiny_model_dir(Path(scratch.name) / "tiny")
    local = open_llm(str(model_dir), threads=args.threads)
    server = start_server(model_dir, args.port, args.threads)
    try:
        http = open_llm(str(model_dir), base_url=f"http://127.0.0.1:{args.port}")
        rows = []
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            for llm in (local, http):  # warm-up: first-call allocations, connection setup
                llm.chat(messages, max_tokens=2)
            times = {"local": [], "http": [], "local_1tok": [], "http_1tok": []}
            answers = {}
            for _ in range(args.reps):
                for name, llm in (("local", local), ("http", http)):
                    seconds, generation = timed(llm, messages, args.max_tokens)
                    times[name].append(seconds)
                    answers[name] = generation
                    times[name + "_1tok"].append(timed(llm, messages, 1)[0])
            assert answers["local"] == answers["http"], answers  # same text, finish reason and token counts
            tokens = answers["local"].completion_tokens
            median = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"prompt": prompt, "prompt_tokens": answers["local"].prompt_tokens,
                         "completion_tokens": tokens,
                         "local_s": round(median["local"], 4), "http_s": round(median["http"], 4),
                         "local_tok_s": round(tokens / median["local"], 1), "http_tok_s": round(tokens / median["http"], 1),
                         "overhead_ms": round(1000 * (median["http"] - median["local"]), 1),
                         "local_1tok_ms": round(1000 * median["local_1tok"], 1),
                         "http_1tok_ms": round(1000 * median["http_1tok"], 1)})
        print(json.dumps({"model": model_dir.name, "threads": args.threads, "reps": args.reps,
                          "max_tokens": args.max_tokens, "cpu_count": os.cpu_count(), "rows": rows}, indent=1))
    finally:
        server.terminate()
        server.wait(30)
        scratch.cleanup()


if __name__ == "__main__":
    main()
