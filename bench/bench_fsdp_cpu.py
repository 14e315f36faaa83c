"""What FSDP buys per rank: training-state bytes and step time, DDP vs `--fsdp` (gptlab/sharding.py), same
model, same data, 2 gloo ranks on the CPU.

    torchrun --standalone --nproc_per_node 2 bench/bench_fsdp_cpu.py --depth 4 --steps 6

State bytes are counted, not sampled: the local part of every parameter, gradient and AdamW moment a rank
holds after a step (for FSDP the shards; the all-gathered block weights are transient and freed after each
block's forward/backward). Step time is the median over steps after the first, wall clock, rank 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from gptlab.model import GPT, GPTConfig
from gptlab.train.optim import TrainConfig, build_optimizers
from gptlab.train.sharding import shard_model


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def measure(mode: str, args, world: int) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, args.vocab, max_seq_len=args.seq_len))
    if mode == "fsdp":
        shard_model(model)
        train_model = model
    else:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizers(model, TrainConfig(lr=1e-3))[0]
    gen = torch.Generator().manual_seed(dist.get_rank())
    times = []
    for _ in range(args.steps):
        x = torch.randint(args.vocab, (args.batch_size, args.seq_len), generator=gen)
        t0 = time.perf_counter()
        _, loss = train_model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: they are part of the state
        dist.barrier()
        times.append(time.perf_counter() - t0)
    params = list(model.parameters())
    moments = [v for state in optimizer.state.values() for v in state.values()]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
            "adam": local_bytes(moments), "step_s": statistics.median(times[1:]),
            "tokens": args.batch_size * args.seq_len * world}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per rank per step")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = {mode: measure(mode, args, world) for mode in ("ddp", "fsdp")}
    if rank == 0:
        params = sum(p.numel() for p in GPT(GPTConfig.from_depth(args.depth, args.vocab)).parameters())
        print(f"depth {args.depth} ({params / 1e6:.2f}M parameters), {world} gloo ranks, "
              f"{args.batch_size} x {args.seq_len} tokens per rank per step, fp32, AdamW, torch {torch.__version__}\n")
        print("| mode | params / rank | grads / rank | AdamW moments / rank | state / rank | step (median) | tokens/s |")
        print("|---|---|---|---|---|---|---|")
        for mode, r in rows.items():
            state = r["params"] + r["grads"] + r["adam"]
            print(f"| {mode} | {r['params'] / 2**20:.1f} MiB | {r['grads'] / 2**20:.1f} MiB | "
                  f"{r['adam'] / 2**20:.1f} MiB | {state / 2**20:.1f} MiB | {r['step_s']:.3f} s | "
                  f"{r['tokens'] / r['step_s']:,.0f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
