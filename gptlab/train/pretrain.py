"""Pretraining: next-token prediction on packed batches, one plain loop from a laptop CPU to a GPU node.

    gptlab pretrain --preset tiny --data-dir runs/X/data --out-dir runs/X/pretrain
    torchrun --nproc_per_node 8 -m gptlab.train.pretrain --preset gpt2 --data-dir ... --out-dir ...

Design decisions
- One dial: the model is `GPTConfig.from_depth(depth)`; presets (`tiny`, `small` for CPU, `gpt2` for GPU)
  pick depth, sequence length, batch and steps, and every field can be overridden with a flag.
- Batch size is a number of tokens per optimizer step (`total_batch_tokens`); the micro-batch
  (`batch_size` rows of `seq_len` per rank) is what fits in memory, and gradient accumulation makes up the
  difference. The loss of each micro-batch is divided by the number of micro-batches so the accumulated
  gradient is the gradient of the mean loss over the whole batch, whatever the split.
- Distributed = DistributedDataParallel over the same loop. `PackedLoader` numbers rows globally, so W
  ranks x A micro-batches read exactly the rows one process reads with W*A micro-batches, and the two give
  the same weights (tests/test_pretrain.py checks this). `--fsdp true` shards weights, gradients and
  AdamW state instead (FSDP2, `gptlab/sharding.py`); checkpoints then hold the full states gathered on
  rank 0, the same files as any other run.
- Optimizers: AdamW (Loshchilov & Hutter 2019) for everything, or Muon (Jordan et al. 2024,
  `torch.optim.Muon`) for the 2-D weight matrices inside the blocks with AdamW for embeddings, head and
  norms: Muon orthogonalizes the update of a matrix (Newton-Schulz), which is meaningless for an
  embedding lookup or a gain vector. Weight decay only on matrices (decaying norm gains toward 0 is harm).
  Muon is meant for GPUs: torch's Newton-Schulz runs in bf16, which most CPUs multiply slowly, so the CPU
  presets use AdamW.
- Schedules: linear warmup, then cosine decay to `min_lr_frac` (GPT-3), or warmup-stable-decay
  (WSD: constant, then linear decay over the last `decay_frac` of steps; Hu et al. 2024 MiniCPM,
  Hagele et al. 2024), whose stable phase lets a run be extended without restarting the schedule.
- Evaluation reports bits per byte next to loss: nats summed over target tokens / ln 2 / UTF-8 bytes
  of those tokens, a figure that compares across tokenizers (special tokens count 0 bytes).
- Exact resume: checkpoints hold weights, optimizer states, loader position and every RNG state, and
  nothing in the loop draws randomness from global state after that (sampling uses its own generator),
  so N steps equal N/2 + resume + N/2. SIGINT/SIGTERM finish the current step, save, and exit. `--resume`
  takes the newest checkpoint that passes its checksums; a fresh run refuses an out_dir that already holds
  checkpoints (pruning would mix two runs).
- Samples every `sample_every` steps go through `gptlab.infer.engine` (KV cache, seeded per-row generators).
- Precision: bf16 autocast + optional `torch.compile` on CUDA, plain fp32 on CPU (CPU bf16 matmuls are
  not faster on most laptops and fp32 keeps the CPU runs exactly reproducible).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import (load_training_checkpoint, model_from_state, rng_state, save_model_dir, save_training_checkpoint, set_rng_state)
from ..common import GptlabError, get_logger, read_json, torch_device
from ..config import option, register_config_command
from ..data.loader import PackedLoader
from ..eval.loss import evaluate
from ..infer.engine import Engine
from ..infer.sampling import SamplingParams
from .loop import (checkpoint_to_resume, clipped_step, due, existing_checkpoints, set_lr_scale, stop_if_requested,
                   training_loop)
from .metrics import MetricsLogger, plot_loss_curve
from ..model import GPT, GPTConfig
from .optim import TrainConfig, bf16_autocast, build_optimizers, lr_multiplier
from .sharding import full_state, load_optimizer_states, shard_model
from ..tokenizer import Tokenizer

log = get_logger("pretrain")

H100_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100 SXM (NVIDIA datasheet)
SAMPLE_PROMPTS = ("", "The ", "def ")



@dataclass
class PretrainConfig(TrainConfig):
    data_dir: str = option("runs/default/data", "prepared dataset (gptlab data prepare)")
    tokenizer: str | None = option(None, "tokenizer.json (default: in or beside the data dir)")
    out_dir: str = option("runs/default/pretrain", "checkpoints, metrics, final model dir")
    depth: int = option(4, "layers; width = 64 * depth (GPTConfig.from_depth)")
    width: int | None = option(None, "model width, a multiple of 64 (default: 64 * depth)")
    seq_len: int = option(256, "tokens per row (context length)")
    batch_size: int = option(16, "rows per micro-batch per rank")
    total_batch_tokens: int | None = option(None, "tokens per optimizer step (default: one micro-batch per rank)")
    eval_batches: int = option(8, "val micro-batches per evaluation (split across ranks)")
    sample_every: int = option(100, "print sample generations every N steps (0 = never)")
    sample_tokens: int = option(48, "tokens per sample")
    sample_temperature: float = option(0.8, "sampling temperature (0 = greedy)")
    compile: bool = option(False, "torch.compile the model (CUDA)")
    fsdp: bool = option(False, "under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP2, "
                               "one unit per block; gptlab/sharding.py) instead of replicating them (DDP)")
    peak_flops: float | None = option(None, "peak FLOP/s per device for MFU (default: H100 bf16 on CUDA)")

    def __post_init__(self):
        super().__post_init__()
        if min(self.depth, self.seq_len, self.batch_size, self.num_steps) < 1:
            raise ValueError("depth, seq_len, batch_size and num_steps must be positive")
        if self.width is not None and (self.width < 64 or self.width % 64):
            raise ValueError(f"width must be a positive multiple of 64 (64-dim heads), got {self.width}")
        if self.fsdp and self.optimizer != "adamw":
            raise ValueError(f"--fsdp needs --optimizer adamw (got {self.optimizer}): Muon orthogonalises whole "
                             "matrices, and a rank holds a slice of each")


PRESETS = {
    # CPU, a few minutes on 2 cores: learns word shapes and common words of the mixture.
    "tiny": PretrainConfig(depth=2, seq_len=256, batch_size=8, num_steps=300, lr=3e-3, warmup_steps=20,
                           eval_every=50, sample_every=100, checkpoint_every=100),
    # CPU, 10-20 minutes: 4 layers x 256 wide, twice the batch.
    "small": PretrainConfig(depth=4, seq_len=256, batch_size=16, num_steps=500,
                            lr=2e-3, warmup_steps=30, eval_every=100, sample_every=250, checkpoint_every=250),
    # GPU: GPT-2 small shape (12 x 768, ~124M params with a 50k vocabulary), 0.5M-token batches.
    "gpt2": PretrainConfig(depth=12, seq_len=1024, batch_size=32, total_batch_tokens=524288, num_steps=5000,
                           lr=6e-4, warmup_steps=200, min_lr_frac=0.1, eval_every=250, eval_batches=20,
                           sample_every=1000, checkpoint_every=500, compile=True),
}


# ---------------------------------------------------------------------------------------------------------
# Pieces of the loop


def find_tokenizer(cfg: PretrainConfig) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    data_dir = Path(cfg.data_dir)
    for candidate in (data_dir / "tokenizer.json", data_dir.parent / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise GptlabError(f"no tokenizer.json in or beside {data_dir}; pass --tokenizer")


def setup_distributed(cfg: PretrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (RANK/WORLD_SIZE set) joins the process group:
    NCCL when CUDA is available, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch_device(cfg.device)
    use_cuda = device.type == "cuda"
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return rank, world, device


def _gather_rng_states(world: int) -> list[dict]:
    if world == 1:
        return [rng_state()]
    states: list = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


# ---------------------------------------------------------------------------------------------------------
# The loop


def pretrain(cfg: PretrainConfig) -> Path:
    """Train per `cfg`; return the final model directory (`out_dir/model`)."""
    rank, world, device = setup_distributed(cfg)
    try:
        return _train(cfg, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: PretrainConfig, rank: int, world: int, device: torch.device) -> Path:
    master = rank == 0
    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"
    tokenizer = Tokenizer.load(find_tokenizer(cfg))
    data_meta = read_json(Path(cfg.data_dir) / "meta.json", "dataset metadata (run `gptlab data prepare` first)")
    if data_meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise GptlabError(f"{cfg.data_dir} was tokenized with a different tokenizer than {find_tokenizer(cfg)}")

    rows_per_step = cfg.batch_size * cfg.seq_len * world
    total = cfg.total_batch_tokens or rows_per_step
    if total % rows_per_step:
        raise GptlabError(f"total_batch_tokens={total} is not a multiple of batch_size*seq_len*world_size="
                          f"{rows_per_step}")
    grad_accum = total // rows_per_step

    sharded = world > 1 and cfg.fsdp
    if cfg.fsdp and not sharded:
        log.warning("--fsdp true in a single process: nothing to shard over (launch with torchrun)")
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model_config = GPTConfig.from_depth(cfg.depth, tokenizer.vocab_size, max_seq_len=cfg.seq_len, width=cfg.width)
    model = GPT(model_config).to(device)
    optimizers = build_optimizers(model, cfg)
    train_loader = PackedLoader(cfg.data_dir, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                rank=rank, world_size=world)
    val_loader = PackedLoader(cfg.data_dir, "val", cfg.batch_size, cfg.seq_len, rank=rank, world_size=world)
    token_bytes = torch.from_numpy(tokenizer.token_bytes()).to(device)

    step, last_good, resumed = 0, None, False
    existing = existing_checkpoints(ckpt_root, cfg.resume, "--out-dir")
    if cfg.resume:
        ckpt = checkpoint_to_resume(ckpt_root, existing, log)
        if ckpt is not None:
            meta = load_training_checkpoint(ckpt, model, tokenizer, optimizers)
            if meta["world_size"] != world or meta["grad_accum"] != grad_accum:
                log.warning("resuming with world_size=%d grad_accum=%d (checkpoint: %d, %d): the data order "
                            "continues, but the run is no longer identical to an uninterrupted one",
                            world, grad_accum, meta["world_size"], meta["grad_accum"])
            train_loader.load_state_dict(meta["loader"])
            rngs = meta["rng"]
            set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
            step, last_good, resumed = meta["step"], meta.get("train_loss"), True
            log.info("resumed from %s at step %d", ckpt, step)

    if sharded:  # checkpoints hold full states: load them (above) into the whole model, then shard
        loaded = [opt.state_dict() for opt in optimizers] if resumed else None
        shard_model(model)
        optimizers = build_optimizers(model, cfg)
        if master:
            log.info("FSDP: weights, gradients and AdamW state sharded over %d ranks, one unit per block", world)
        if loaded:
            load_optimizer_states(model, optimizers, loaded)
    bf16 = bf16_autocast(cfg, device)
    autocast = bf16 or nullcontext()
    train_model = torch.compile(model) if cfg.compile else model
    if world > 1 and not sharded:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    peak = cfg.peak_flops or (H100_BF16_PEAK_FLOPS if device.type == "cuda" else None)
    flops_per_step = model.flops_per_token(cfg.seq_len) * total
    metrics = MetricsLogger(out_dir, enabled=master, tensorboard=cfg.tensorboard,
                            resume_step=step if resumed else None)

    def save(at_step: int, train_loss: float | None) -> Path:
        rngs = _gather_rng_states(world)
        state = full_state(model, optimizers) if sharded else None  # a collective: every rank gathers
        path = None
        if master:
            meta = {"loader": train_loader.state_dict(), "train_loss": train_loss, "world_size": world,
                    "grad_accum": grad_accum, "config": asdict(cfg)}
            path = save_training_checkpoint(ckpt_root, at_step, model, tokenizer, optimizers=optimizers,
                                            rng_states=rngs, meta=meta, keep_last=cfg.keep_checkpoints,
                                            state=state)
        if world > 1:
            dist.barrier()
        return path  # None on the other ranks

    def run_eval(at_step: int) -> None:
        result = evaluate(model, val_loader, max(1, cfg.eval_batches // world), token_bytes, autocast, device)
        metrics.log(at_step, **result)
        if master:
            log.info("step %d: val loss %.4f, %.4f bits/byte", at_step, result["val/loss"], result["val/bpb"])

    def show_samples(at_step: int) -> None:
        # sharded: rank 0 samples from a whole copy (the engine reads weights directly, and a forward of
        # the sharded model alone would wait for the other ranks' all-gathers)
        state = full_state(model, [])[0] if sharded else None
        if not master:
            return
        whole = model_from_state(model_config, state, "gathered shards").to(device) if sharded else model
        whole.eval()
        # seeded per step: samples are reproducible and never draw from the global RNG (exact resume)
        params = SamplingParams(max_new_tokens=cfg.sample_tokens, temperature=cfg.sample_temperature,
                                seed=cfg.seed + at_step)
        with autocast:
            completions = Engine(whole, tokenizer).generate(list(SAMPLE_PROMPTS), params)
        model.train()
        for prompt, completion in zip(SAMPLE_PROMPTS, completions):
            log.info("sample at step %d: %r", at_step, prompt + completion.text)
            metrics.text(at_step, f"sample/{prompt!r}", prompt + completion.text)

    if master:
        log.info("model: depth %d, %.2fM params; %d tokens/step = %d ranks x %d micro-batches x %dx%d; "
                 "device %s%s", cfg.depth, model.num_params() / 1e6, total, world, grad_accum, cfg.batch_size,
                 cfg.seq_len, device, " (bf16 autocast)" if bf16 else "")
    loss_value = last_good
    with training_loop(cfg.num_steps, step, progress=master and cfg.progress, metrics=metrics,
                       logger=log) as (bar, stop):
        if step == 0 and cfg.eval_every:
            run_eval(0)
        while step < cfg.num_steps:
            t0 = time.perf_counter()
            scale = lr_multiplier(step, cfg)
            set_lr_scale(optimizers, scale)
            loss_sum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                x, y = (t.to(device, non_blocking=True) for t in train_loader.next_batch())
                # DDP all-reduces (FSDP reduce-scatters) gradients only on the last micro-batch of the step
                sync = world == 1 or micro == grad_accum - 1
                if sharded:
                    model.set_requires_gradient_sync(sync)
                with (nullcontext() if sync or sharded else train_model.no_sync()):
                    with autocast:
                        _, loss = train_model(x, y)
                    (loss / grad_accum).backward()
                loss_sum += loss.detach() / grad_accum
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            loss_value = loss_sum.item()
            grad_norm = clipped_step(optimizers, model.parameters(), cfg.grad_clip,
                                     {"training loss": loss_value}, step=step, checkpoints=ckpt_root,
                                     context=f" (lr scale {scale:.4g}, peak lr {cfg.lr:g}); last good loss "
                                     f"{last_good}", hint="Try a lower --lr, --grad-clip, or more --warmup-steps")
            step += 1
            last_good = loss_value
            dt = time.perf_counter() - t0
            tok_per_s = total / dt
            record = {"train/loss": loss_value, "train/lr_scale": scale, "train/grad_norm": grad_norm,
                      "train/tokens_per_s": tok_per_s}
            postfix = {"loss": f"{loss_value:.3f}", "tok/s": f"{tok_per_s:,.0f}"}
            if peak:
                record["train/mfu"] = flops_per_step / dt / (peak * world)
                postfix["mfu"] = f"{100 * record['train/mfu']:.1f}%"
            metrics.log(step, **record)
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)

            stopping = stop.requested
            if world > 1:  # every rank must agree to stop at the same step
                flag = torch.tensor(float(stopping), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            stop_if_requested(stopping, lambda at: save(at, loss_value), step, log)
            if due(step, cfg.eval_every, cfg.num_steps):
                run_eval(step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                show_samples(step)
            if due(step, cfg.checkpoint_every, cfg.num_steps):
                save(step, loss_value)
        run_eval(step)
        save(step, loss_value)

    final = out_dir / "model"
    state = full_state(model, [])[0] if sharded else None
    if master:
        save_model_dir(final, model, tokenizer, state=state)
        plot_loss_curve(metrics.path, out_dir / "loss.png")
        log.info("final model: %s (loss curve %s)", final, out_dir / "loss.png")
    if world > 1:
        dist.barrier()
    return final


# ---------------------------------------------------------------------------------------------------------
# Command line


def register(sub) -> None:
    register_config_command(sub, "pretrain", "pretrain a GPT on a prepared dataset",
                            __doc__.splitlines()[0], PretrainConfig, PRESETS, pretrain)


def main(argv: list[str] | None = None) -> int:
    """`python -m gptlab.train.pretrain ...` (what torchrun launches): the `gptlab pretrain` subcommand alone."""
    parser = argparse.ArgumentParser(prog="gptlab.train.pretrain")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["pretrain", *(argv if argv is not None else sys.argv[1:])])
    try:
        args.func(args)
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
