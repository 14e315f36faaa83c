"""Decode throughput of gptlab.infer.engine vs Hugging Face `generate` on the same weights (CPU).

Both sides get the same GPT (random init; speed does not depend on the values), loaded into
`transformers.LlamaForCausalLM` built from our config, the same prompt (repeated `batch` times, so neither
side pads), greedy decoding, exactly `new_tokens` new tokens (no stop token). Our engine runs in up to
three ways: "forward" (decode steps through `GPT.forward`, `fused_decode=False`), "fused" (the default
`FusedDecoder`) and, with --compile, "compiled" (`compile=True`; the first call's extra time is reported
as compile time, apart from tok/s). Repetitions are interleaved (forward, fused, compiled, HF, forward, ...)
so load from other work on the machine hits every side alike; the median is reported. The generated
token ids of all sides are compared, so they are known to do the same work. Timings include the prompt's
prefill; every step ends with a host sync on each side (`.tolist()`), so GPU timings are exact.

    python bench/bench_decode.py --depths 4 8 --batches 1 32 --new-tokens 64 --reps 5 --compile
"""

from __future__ import annotations

import argparse
import inspect
import json.decoder
import json.encoder
import os
import statistics
import textwrap
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer


def hf_twin(model: GPT) -> LlamaForCausalLM:
    c = model.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                         head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta,
                         rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings, attention_bias=c.attn_bias)
    hf = LlamaForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like ours with no stop token
    hf.generation_config.pad_token_id = 0
    return hf


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written: the memory
    bandwidth a decode step could reach at best (median of 10 copies after a warm-up)."""
    src = torch.randn(int(gib * 2**30) // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def matmuls_alone_ms(weights: list[torch.Tensor], batch: int, transposed: bool, reps: int = 20) -> float:
    """ms for one step's matmuls and nothing else (random inputs): the floor under any decode step that
    uses these weights in this layout. transposed: (in, out) weights, `x @ w`; else (out, in), F.linear."""
    inputs = [torch.randn(batch, w.shape[0 if transposed else 1], device=w.device, dtype=w.dtype) for w in weights]
    with torch.inference_mode():
        best = float("inf")
        for _ in range(3):
            synchronize(weights[0].device)
            start = time.perf_counter()
            for _ in range(reps):
                for x, w in zip(inputs, weights):
                    (x @ w) if transposed else F.linear(x, w)
            synchronize(weights[0].device)
            best = min(best, (time.perf_counter() - start) / reps)
    return best * 1e3


def bench(depth: int, batch: int, prompt_len: int, new_tokens: int, reps: int, tokenizer, device: str,
          dtype: torch.dtype, compile: bool) -> dict:
    torch.manual_seed(0)
    config = GPTConfig.from_depth(depth, vocab_size=tokenizer.vocab_size, max_seq_len=512)
    model = GPT(config).eval()
    hf = hf_twin(model).to(device=device, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    engines = {"forward": Engine(model, tokenizer, fused_decode=False), "fused": Engine(model, tokenizer)}
    if compile:
        engines["compiled"] = Engine(model, tokenizer, compile=True)
    prompt = tokenizer.encode(inspect.getsource(json.decoder))[:prompt_len]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_token_ids=())
    input_ids = torch.tensor([prompt] * batch, device=device)

    def ours(engine):
        return lambda: [c.token_ids for c in engine.generate([prompt] * batch, params)]

    def run_hf():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          do_sample=False)
        return out[:, prompt_len:].tolist()

    sides = {name: ours(engine) for name, engine in engines.items()} | {"hf": run_hf}
    first_call = {}
    outputs = {}
    for name, fn in sides.items():  # warm-up; the compiled engine compiles here
        start = time.perf_counter()
        outputs[name] = fn()
        first_call[name] = time.perf_counter() - start
    times = {name: [] for name in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {"depth": depth, "params_m": model.num_params() / 1e6, "batch": batch,
              "same_tokens": all(out == outputs["hf"] for out in outputs.values())}
    for name in sides:
        result[f"{name}_tps"] = batch * new_tokens / median[name]
        result[f"{name}_ratio"] = median["hf"] / median[name]
    if compile:  # the warm-up call minus a steady-state call
        result["compile_s"] = first_call["compiled"] - median["compiled"]
    for name in sides:
        result[f"{name}_ms"] = median[name] / new_tokens * 1e3
    decoder = engines["fused"]._decoder
    fused_weights = [p.weight for layer in decoder.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    fused_weights.append(decoder.head.weight)
    result["mm_fused_ms"] = matmuls_alone_ms(fused_weights, batch, transposed=True)
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    result["mm_linear_ms"] = matmuls_alone_ms(linears, batch, transposed=False)
    # bytes a step must read at least: every weight of the fused layout once (the embedding is a lookup of
    # `batch` rows) and the KV cache filled so far (mean over the generated steps)
    weight_bytes = sum(w.numel() * w.element_size() for w in fused_weights)
    c = model.config
    mean_len = prompt_len + new_tokens / 2
    kv_bytes = 2 * c.n_layer * batch * c.n_kv_head * c.head_dim * mean_len * dtype.itemsize
    result["step_bytes"] = weight_bytes + kv_bytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true",
                        help="also time Engine(compile=True); its compilation is reported apart from tok/s")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: on a CPU shared with other jobs, OpenMP "
                             "regions wait on descheduled threads and 2 threads ran 10-1000x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder) + inspect.getsource(textwrap)
    tokenizer = train_tokenizer([text], args.vocab_size)
    print(f"torch {torch.__version__}, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
          f"load: {os.getloadavg()}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, median of {args.reps} "
          f"interleaved reps, vocab {tokenizer.vocab_size}")
    columns = ["forward", "fused"] + (["compiled"] if args.compile else [])
    print("| depth | params | batch | HF generate tok/s | " + " | ".join(f"gptlab {c} tok/s (vs HF)" for c in columns)
          + " | same tokens |" + (" compile s |" if args.compile else ""))
    print("|---" * (5 + len(columns) + args.compile) + "|")
    results = []
    for depth in args.depths:
        for batch in args.batches:
            r = bench(depth, batch, args.prompt_len, args.new_tokens, args.reps, tokenizer, args.device,
                      getattr(torch, args.dtype), args.compile)
            results.append(r)
            cells = " | ".join(f"{r[f'{c}_tps']:.0f} ({r[f'{c}_ratio']:.2f}x)" for c in columns)
            extra = f" {r['compile_s']:.1f} |" if args.compile else ""
            print(f"| {r['depth']} | {r['params_m']:.1f}M | {r['batch']} | {r['hf_tps']:.0f} | {cells} "
                  f"| {r['same_tokens']} |{extra}", flush=True)
    print("\nms per generated step (prefill included) and the step's matmuls alone, in our fused (in, out) "
          "layout and in F.linear's (out, in) layout (what HF and `GPT.forward` run):")
    print("| depth | batch | HF | " + " | ".join(f"gptlab {c}" for c in columns) +
          " | matmuls alone, fused | matmuls alone, F.linear |")
    print("|---" * (4 + len(columns)) + "|---|")
    for r in results:
        cells = " | ".join(f"{r[f'{c}_ms']:.2f}" for c in columns)
        print(f"| {r['depth']} | {r['batch']} | {r['hf_ms']:.2f} | {cells} | {r['mm_fused_ms']:.2f} "
              f"| {r['mm_linear_ms']:.2f} |")
    if args.device.startswith("cuda"):
        bandwidth = copy_bandwidth(torch.device(args.device))
        print(f"\nmemory-bandwidth limit at batch 1: bytes a step must read (weights + KV cache) / step time, "
              f"as a fraction of the measured device-to-device copy rate {bandwidth / 1e12:.2f} TB/s "
              f"(H100 SXM datasheet: 3.35 TB/s):")
        print("| depth | batch | MB per step | " + " | ".join(f"gptlab {c}" for c in columns) + " | HF |")
        print("|---" * (3 + len(columns)) + "|---|")
        for r in results:
            cells = " | ".join(f"{r['step_bytes'] / (r[f'{c}_ms'] / 1e3) / bandwidth:.1%}" for c in columns + ["hf"])
            print(f"| {r['depth']} | {r['batch']} | {r['step_bytes'] / 1e6:.0f} | {cells} |")
    print(f"load at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
