"""Candidate int8 / int4 CPU kernels for one projection, per SmolLM2-135M shape (issue 20, item 2).

Each row times y = x @ W.T for x (M, in) float32 -> y (M, out) float32, casts and activation quantization
included (what a decode step pays per projection), microseconds, best of `--reps` runs of `--calls` calls:
- fp32: `x @ wt` on the fused decoder's (in, out) contiguous layout (MKL).
- int8pack: `aten._weight_int8pack_mm`, weight-only int8, bf16 activations (session 10's kernel).
- fbgemm dynamic: `quantized::linear_dynamic` over `quantized::linear_prepack` (torch.ao dynamic
  quantization: activations quantized per tensor at run time, uint8 x int8 -> int32).
- int_mm per row: activations quantized per row in eager ops (symmetric int8), `torch._int_mm` (oneDNN)
  on the (out, in) int8 rows, then both scales applied.
- int4pack: `aten._weight_int4pack_mm_for_cpu`, group 32, bf16 activations.

    python bench/bench_int8_kernels.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

# (name, out, in): SmolLM2-135M's fused decode projections and the tied head
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
          ("lm_head", 49152, 576)]


def best_us(fn, calls: int, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def candidates(w: torch.Tensor) -> dict:
    """{name: fn(x)} for one weight (out, in), each built once (packing is not timed)."""
    out_features, _ = w.shape
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    wt = w.t().contiguous()
    scale_bf16 = scale.to(torch.bfloat16)
    with warnings.catch_warnings():  # torch 2.13 warns that the quantized dtypes are deprecated
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(out_features, dtype=torch.long), 0,
                                        torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)

    def int_mm_per_row(x):
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12) / 127
        xq = torch.round(x / x_scale).to(torch.int8)
        return torch._int_mm(xq, q.t()) * x_scale * scale

    group = 32
    q4 = torch.round(w.view(out_features, -1, group) / (w.view(out_features, -1, group).abs().amax(-1, keepdim=True) / 7))
    s4 = w.view(out_features, -1, group).abs().amax(-1) / 7  # (out, groups), zero point 8 on unsigned codes
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q4.view(out_features, -1) + 8).to(torch.int32), 1)
    scale_zeros = torch.stack([s4.t(), torch.zeros_like(s4.t())], dim=-1).to(torch.bfloat16).contiguous()
    return {
        "fp32": lambda x: x @ wt,
        "int8pack": lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale_bf16).float(),
        "fbgemm dynamic": lambda x: torch.ops.quantized.linear_dynamic(x, packed, False),
        "int_mm per row": int_mm_per_row,
        "int4pack": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), packed4, group, scale_zeros).float(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), quantized engine "
          f"{torch.backends.quantized.engine}, load average {os.getloadavg()}")
    g = torch.Generator().manual_seed(0)
    for rows in args.rows:
        table = None
        for name, out_features, in_features in SHAPES:
            w = torch.randn(out_features, in_features, generator=g) * 0.02
            x = torch.randn(rows, in_features, generator=g)
            fns = candidates(w)
            if table is None:
                print(f"\nM = {rows} rows, microseconds per call (best of {args.reps} x {args.calls})")
                print("| projection (out x in) | " + " | ".join(fns) + " |")
                print("|---" * (len(fns) + 1) + "|")
                table = True
            calls = max(3, args.calls // 10) if name == "lm_head" else args.calls
            cells = " | ".join(f"{best_us(lambda fn=fn: fn(x), calls, args.reps):.0f}" for fn in fns.values())
            print(f"| {name} ({out_features} x {in_features}) | {cells} |", flush=True)
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
