"""int8 vs fp32 vs bf16 inference on one model directory (CPU): decode speed, quality, memory.

- read bandwidth: `x.sum()` over 1 GiB of float32 (bytes read / time, median of 5), at 1 and 2 threads;
  the cap on decode at batch 1 is that rate / bytes of weights a step reads (fused layout, embedding
  lookup excluded; the KV cache of a short generation is ~1% of it and left out).
- modes: fp32, bf16, int8 (the kernel quant.py picks for this CPU), int8pack (int8 through its fallback
  kernel, `_weight_int8pack_mm` with bf16 activations, for comparison), int8+bf16, int8+compile and
  fp32+compile (`Engine(compile=True)`: its warm-up call compiles, up to a minute or two with fp32's
  GEMM autotuning, not in the figures; bits per byte go through `GPT.forward`, so they are eager's).
- decode tokens/s: `Engine.generate`, greedy, a 32-token prompt repeated `batch` times, `--new-tokens` new
  tokens with no stop token, median of `--reps` after a warm-up call, the modes interleaved; prefill included.
- bits per byte on held-out text (`--text`, a few KB): windows of `--window` tokens, no overlap, the
  summed next-token loss of every token but each window's first over the UTF-8 bytes of those tokens.
- peak RSS (`--rss`): `gptlab sample` (this tree) fp32 and --quantize int8 against the same job in
  transformers on the model's HF export (`--hf`), each in its own process under /usr/bin/time -v.

    python bench/bench_quant.py --model ~/.cache/gptlab/models/smollm2-135m-instruct --hf /tmp/smol-hf \
        --text /work/shared/data/sotu/2016_barack_obama_d.txt --rss
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from gptlab.checkpoint import load_for_inference
from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams

MODES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8"),
         "int8+bf16": (torch.bfloat16, "int8"), "int8pack": (torch.float32, "int8"),
         "int8+compile": (torch.float32, "int8"), "fp32+compile": (torch.float32, None)}
FALLBACK_ENGINE = "qnnpack"  # a quantized engine under which quant.py picks its int8pack kernel
PROMPT = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg"
HF_JOB = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained(sys.argv[1]); model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = tok(sys.argv[2], return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False)
print(tok.decode(out[0, ids.shape[1]:]))
"""


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times)


def step_weight_bytes(engine: Engine) -> int:
    """Bytes of weights a decode step reads (the fused decoder's projections and head)."""
    d = engine._decoder
    projections = [p for layer in d.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [d.head]
    return sum(p.weight.numel() * p.weight.element_size() for p in projections)


def decode_tps(engines: dict[str, Engine], batch: int, new_tokens: int, reps: int) -> dict[str, float]:
    """tokens/s per engine; repetitions interleaved (a, b, c, a, b, c, ...) so load from other work on the
    machine hits every mode alike; median of `reps` after a warm-up call each."""
    prompt = next(iter(engines.values())).tokenizer.encode(PROMPT)[:32]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_token_ids=())
    times = {name: [] for name in engines}
    for rep in range(reps + 1):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.generate([prompt] * batch, params)
            if rep:
                times[name].append(time.perf_counter() - start)
    return {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def bits_per_byte(engine: Engine, text: str, window: int) -> float:
    tok = engine.tokenizer
    ids = tok.encode(text)
    nats, nbytes = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start:start + window]])
        if chunk.shape[1] < 2:
            break
        logits = engine.model(chunk[:, :-1]).float()
        nats += float(torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
        nbytes += sum(len(tok.id_to_bytes(i)) for i in chunk[0, 1:].tolist())
    return nats / math.log(2) / nbytes


def peak_rss_mb(cmd: list[str]) -> float:
    """Maximum resident set size of `cmd` (/usr/bin/time -v, kbytes / 1000), on one thread like HF_JOB."""
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--hf", default=None, help="the model's HF export (gptlab export), for --rss")
    parser.add_argument("--text", required=True, help="held-out text file (the first --text-bytes are used)")
    parser.add_argument("--text-bytes", type=int, default=4000)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS of gptlab sample vs transformers")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, load average {os.getloadavg()}")
    bandwidth = {t: read_bandwidth(t) for t in (1, 2)}
    print("read bandwidth (sum over 1 GiB fp32): " + ", ".join(f"{t} thread(s) {b / 1e9:.1f} GB/s"
                                                                for t, b in bandwidth.items()))
    torch.set_num_threads(args.threads)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()[:args.text_bytes]
    cap_bw = bandwidth[args.threads]
    print(f"decode: {args.threads} thread(s), {args.new_tokens} new tokens, median of {args.reps}; cap = "
          f"{cap_bw / 1e9:.1f} GB/s / weight bytes per step")
    print("| mode | weight MB per step | cap tok/s (batch 1) | " +
          " | ".join(f"tok/s batch {b}" for b in args.batches) + " | batch 1 / cap | bits per byte |")
    print("|---" * (5 + len(args.batches)) + "|")
    engines = {}
    for mode in args.modes:
        dtype, quantize = MODES[mode]
        engines[mode] = Engine(*load_for_inference(args.model, dtype=dtype, quantize=quantize),
                               compile=mode.endswith("+compile"))
        if mode == "int8pack":  # int8 through the fallback kernel: a model's int8 modules and the fused decoder
            # pick their kernel when first used and keep it, so one call under the fallback engine fixes it
            default_engine, torch.backends.quantized.engine = torch.backends.quantized.engine, FALLBACK_ENGINE
            engines[mode].generate([[0, 1]], SamplingParams(max_new_tokens=2, temperature=0, stop_token_ids=()))
            torch.backends.quantized.engine = default_engine
    tps = {b: decode_tps(engines, b, args.new_tokens, args.reps) for b in args.batches}
    for mode, engine in engines.items():
        weight_bytes = step_weight_bytes(engine)
        cap = cap_bw / weight_bytes
        bpb = bits_per_byte(engine, text, args.window)
        cells = " | ".join(f"{tps[b][mode]:.1f}" for b in args.batches)
        print(f"| {mode} | {weight_bytes / 1e6:.0f} | {cap:.0f} | {cells} | {tps[args.batches[0]][mode] / cap:.0%} "
              f"| {bpb:.4f} |", flush=True)
    del engines
    if args.rss:
        sample = [sys.executable, "-m", "gptlab.cli", "sample", "--model", args.model, "--prompt", PROMPT,
                  "--temperature", "0", "--max-new-tokens", str(args.new_tokens)]
        rows = {"gptlab sample fp32": peak_rss_mb(sample),
                "gptlab sample --quantize int8": peak_rss_mb(sample + ["--quantize", "int8"])}
        if args.hf:
            rows["transformers generate fp32"] = peak_rss_mb(
                [sys.executable, "-c", HF_JOB, args.hf, PROMPT, str(args.new_tokens)])
        print("\n| job | peak RSS MB | vs transformers |\n|---|---|---|")
        for name, mb in rows.items():
            ratio = f"{mb / rows['transformers generate fp32']:.2f}x" if args.hf else "-"
            print(f"| {name} | {mb:.0f} | {ratio} |")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
