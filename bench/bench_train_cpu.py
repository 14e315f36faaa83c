"""CPU training throughput of gptlab's GPT vs `transformers.LlamaForCausalLM` of the same shape and weights.

For each preset (`tiny`, `small`) both sides get the model `GPTConfig.from_depth(depth)` with the preset's
sequence length and micro-batch, identical initial weights (HF Llama parameter names are ours), the same
AdamW param groups (`gptlab.train.pretrain.build_optimizers`), the same batch of token ids, fp32, and the same step:
forward, mean cross-entropy over all positions, backward, clip the gradient norm to 1, optimizer step. The
first step's losses are compared, so the two sides are known to compute the same thing. Repetitions are
interleaved (ours, HF, ours, HF, ...) so load from other work on the machine hits both alike; the median
tokens/s is reported. Token ids are random: speed does not depend on them.

    python bench/bench_train_cpu.py --presets tiny small --reps 5 --steps 3 --out bench/results/train_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_decode import hf_twin
from gptlab.model import GPT, GPTConfig
from gptlab.train.optim import build_optimizers
from gptlab.train.pretrain import PRESETS


def make_step(model, optimizers, forward_loss):
    def step(x, y) -> float:
        loss = forward_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss.item()
    return step


def ours_loss(model, x, y):
    return model(x, y)[1]


def hf_loss(model, x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def bench(preset: str, vocab: int, reps: int, steps: int) -> dict:
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_depth(cfg.depth, vocab, max_seq_len=cfg.seq_len)).train()
    hf = hf_twin(ours).train()
    # batches: (B, T+1) random ids, inputs the first T, targets the last T
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (steps, cfg.batch_size, cfg.seq_len + 1), generator=gen)
    sides = {"gptlab": make_step(ours, build_optimizers(ours, cfg), ours_loss),
             "transformers": make_step(hf, build_optimizers(hf, cfg), hf_loss)}
    first = {name: step(data[0, :, :-1], data[0, :, 1:]) for name, step in sides.items()}  # also warms up
    assert abs(first["gptlab"] - first["transformers"]) < 1e-4, first
    tokens = steps * cfg.batch_size * cfg.seq_len
    rates = {name: [] for name in sides}
    for _ in range(reps):
        for name, step in sides.items():
            t0 = time.perf_counter()
            for i in range(steps):
                step(data[i, :, :-1], data[i, :, 1:])
            rates[name].append(tokens / (time.perf_counter() - t0))
    med = {name: statistics.median(r) for name, r in rates.items()}
    return {"preset": preset, "depth": cfg.depth, "params": ours.num_params(), "B": cfg.batch_size,
            "T": cfg.seq_len, "vocab": vocab, "first_loss": first, "rates": rates, "median": med,
            "ratio": med["gptlab"] / med["transformers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (the default tokenizer's)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per repetition")
    parser.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    args = parser.parse_args()
    import transformers

    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = []
    for preset in args.presets:
        r = bench(preset, args.vocab, args.reps, args.steps)
        results.append(r)
        print(f"{preset}: gptlab {r['median']['gptlab']:,.0f} tok/s, transformers "
              f"{r['median']['transformers']:,.0f} tok/s, ratio {r['ratio']:.2f}", flush=True)
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# CPU training throughput: gptlab vs transformers LlamaForCausalLM",
        "",
        f"Command: `python bench/bench_train_cpu.py --presets {' '.join(args.presets)} --vocab {args.vocab} "
        f"--reps {args.reps} --steps {args.steps}`",
        "",
        f"Machine: 2-core CPU shared with other work ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"fp32. Load before: `{load_before}`; after: `{load_after}`.",
        "",
        "Same weights, same AdamW groups, same batch; one step = forward + cross-entropy + backward + clip + "
        "AdamW step. Median of interleaved repetitions (each = `steps` optimizer steps).",
        "",
        "| preset | depth | params | B x T | gptlab tok/s | transformers tok/s | ratio | first-step loss (ours / HF) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['preset']} | {r['depth']} | {r['params'] / 1e6:.2f}M | {r['B']} x {r['T']} | "
                     f"{r['median']['gptlab']:,.0f} | {r['median']['transformers']:,.0f} | {r['ratio']:.2f} | "
                     f"{r['first_loss']['gptlab']:.5f} / {r['first_loss']['transformers']:.5f} |")
    lines += ["", "All repetitions (tok/s):", ""]
    for r in results:
        for name, rates in r["rates"].items():
            lines.append(f"- {r['preset']} {name}: {', '.join(f'{x:,.0f}' for x in rates)}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
