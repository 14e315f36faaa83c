"""GPU pretraining throughput and MFU: gptlab's GPT vs Hugging Face `LlamaForCausalLM` of the same shape.

Both sides (the HF side built by bench_decode.hf_twin): the same config (depth 12 by default: 12 x 768, 12 heads, SwiGLU 2048, tied 50304-token
vocabulary, ~124M parameters, T=1024), fp32 master weights with bf16 autocast, torch.compile, fused AdamW
(betas 0.9/0.95, weight decay on matrices), gradient clipping at 1.0, random tokens (speed does not depend
on the data), one optimizer step per `--grad-accum` micro-batches of `--micro-batches` rows (the `gpt2`
pretraining preset: 16 x 32 rows = 0.5M tokens). Time is measured between
CUDA synchronizations over `--steps` steps after `--warmup` steps (which include compilation).
MFU = tokens/s x FLOPs per token / 989e12 (H100 SXM dense bf16 peak), FLOPs per token from
`GPT.flops_per_token` (6N + 12 L H Dh T, the convention of nanoGPT's estimate, so the figures compare with
docs/peers.md's nanoGPT 40% and HF GPT-2 33%).

    python bench/bench_train_gpu.py --depth 12 --micro-batches 16 32 --steps 10
    python bench/bench_train_gpu.py --sides gptlab --grad-accum 16 --compile-mode max-autotune-no-cudagraphs
    python bench/bench_train_gpu.py --sides gptlab --attention cudnn --fused-projections --profile 2

Variants for the MFU search (gptlab side): `--attention cudnn|flash` pins the SDPA backend,
`--fused-projections` runs q/k/v as one matmul and gate/up as one (weights concatenated on the fly: the
parameters keep their HF names), `--coordinate-descent` lets inductor tune its pointwise/reduction kernels,
`--profile N` prints where N profiled steps spend their GPU time (kernels grouped: matmul, attention,
inductor's fused elementwise, other).
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from bench_decode import hf_twin  # bench/, beside this script

from gptlab.model import GPT, Attention, GPTConfig, MLP, apply_rotary
from gptlab.train.optim import TrainConfig, build_optimizers
from gptlab.train.pretrain import H100_BF16_PEAK_FLOPS


def fused_attention_forward(self, x, cos, sin, layer, kv_cache, mask):
    """Attention.forward for training with q, k and v from one matmul (no cache, no mask, no QK-norm)."""
    c = self.config
    B, T, _ = x.shape
    weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
    q, k, v = F.linear(x, weight).split([c.n_head * c.head_dim, c.n_kv_head * c.head_dim,
                                         c.n_kv_head * c.head_dim], dim=-1)
    q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)
    k = k.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
    v = v.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.n_kv_head != c.n_head)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))


def fused_mlp_forward(self, x):
    gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, dim=-1)
    return self.down_proj(F.silu(gate) * up)


def attention_context(backend: str):
    if backend == "default":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend])


def kernel_category(name: str) -> str:
    lowered = name.lower()
    if any(key in lowered for key in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(key in lowered for key in ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "matmul", "mm_")):
        return "matmul"
    if lowered.startswith("triton"):
        return "inductor (fused elementwise/reductions)"
    return "other"


def profile_steps(step, first: int, count: int) -> None:
    """Print GPU time per kernel category and the top kernels over `count` steps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(first, first + count):
            step(i)
        torch.cuda.synchronize()
    totals, kernels = defaultdict(float), []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        totals[kernel_category(event.key)] += us
        kernels.append((us, event.count, event.key))
    whole = sum(totals.values())
    print(f"profile over {count} steps: {whole / 1e3 / count:.1f} ms of GPU time per step")
    for category, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {category}: {us / 1e3 / count:.1f} ms/step ({100 * us / whole:.0f}%)")
    for us, calls, name in sorted(kernels, reverse=True)[:25]:
        print(f"  {us / 1e3 / count:8.2f} ms/step {calls // count:5d} calls/step  {name[:110]}")


def run(side: str, config: GPTConfig, micro_batch: int, steps: int, warmup: int, compile_mode: str | None,
        flops_per_token: float, grad_accum: int, attention: str = "default", profile: int = 0) -> dict:
    torch.manual_seed(0)
    device = torch.device("cuda")
    # the HF side starts from the same initial weights (speed does not depend on them)
    model = (GPT(config) if side == "gptlab" else hf_twin(GPT(config))).to(device).train()
    optimizers = build_optimizers(model, TrainConfig(lr=6e-4))
    step_model = torch.compile(model, mode=compile_mode) if compile_mode else model
    T = config.max_seq_len
    data = torch.randint(0, config.vocab_size, (8, micro_batch, T + 1), device=device)

    def step(i: int) -> torch.Tensor:
        for micro in range(grad_accum):
            batch = data[(i * grad_accum + micro) % len(data)]
            x, y = batch[:, :-1], batch[:, 1:]
            with torch.autocast("cuda", dtype=torch.bfloat16), attention_context(attention):
                if side == "gptlab":
                    _, loss = step_model(x, y)
                else:
                    logits = step_model(input_ids=x).logits
                    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                                             y.reshape(-1))
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / steps
    tokens_per_s = grad_accum * micro_batch * T / dt
    result = {"side": side, "micro_batch": micro_batch, "tok_s": tokens_per_s,
              "mfu": tokens_per_s * flops_per_token / H100_BF16_PEAK_FLOPS, "ms_step": dt * 1e3,
              "warmup_s": warmup_s, "mem_gb": torch.cuda.max_memory_allocated() / 2**30, "loss": loss.item(),
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if profile:
        profile_steps(step, warmup + steps, profile)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304, help="GPT-2's vocabulary padded to a multiple of 64")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[32])
    parser.add_argument("--sides", nargs="+", default=["gptlab", "hf"], choices=["gptlab", "hf"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (default, max-autotune-no-cudagraphs, ...) or none")
    parser.add_argument("--attention", default="default", choices=["default", "cudnn", "flash"],
                        help="SDPA backend (default: PyTorch's choice)")
    parser.add_argument("--fused-projections", action="store_true", help="q/k/v and gate/up as one matmul each")
    parser.add_argument("--coordinate-descent", action="store_true",
                        help="inductor's coordinate-descent tuning of its generated kernels")
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps after the timed ones")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.fused_projections:
        Attention.forward, MLP.forward = fused_attention_forward, fused_mlp_forward
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config
        inductor_config.coordinate_descent_tuning = True
    config = GPTConfig.from_depth(args.depth, args.vocab, max_seq_len=args.seq_len)
    flops_per_token = GPT(config).flops_per_token(args.seq_len)  # the same shape on both sides
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, depth {args.depth}, T {args.seq_len}, "
          f"vocab {args.vocab}, compile mode {args.compile_mode}, grad accum {args.grad_accum}, attention "
          f"{args.attention}, fused projections {args.fused_projections}, coordinate descent "
          f"{args.coordinate_descent}", flush=True)
    print("| side | params | micro-batch | tokens/s | MFU | ms/step | peak memory GiB | warm-up s | loss |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for micro_batch in args.micro_batches:
        for side in args.sides:
            try:
                mode = None if args.compile_mode == "none" else args.compile_mode
                r = run(side, config, micro_batch, args.steps, args.warmup, mode, flops_per_token, args.grad_accum,
                        args.attention if side == "gptlab" else "default", args.profile)
                torch.cuda.empty_cache()  # the finished side's model and optimizer state are garbage now
            except Exception:  # one failing configuration (e.g. out of memory) must not hide the others
                traceback.print_exc()
                torch.cuda.empty_cache()
                continue
            print(f"| {r['side']} | {r['params_m']:.1f}M | {r['micro_batch']} | {r['tok_s']:,.0f} | "
                  f"{100 * r['mfu']:.1f}% | {r['ms_step']:.1f} | {r['mem_gb']:.1f} | {r['warmup_s']:.0f} | "
                  f"{r['loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
