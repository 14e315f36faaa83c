"""Optimization shared by every training stage (pretrain, SFT, reward model, DPO): the options, the
optimizers and the learning-rate schedule.

Design decisions
- One `TrainConfig` base holds the optimizer, schedule and run options; each stage's config subclasses it
  and redeclares only the defaults it changes (SFT and DPO use much lower learning rates than
  pretraining), so a flag means the same thing in every `gptlab` training command.
- AdamW (Loshchilov & Hutter 2019) for everything, or Muon (Jordan et al. 2024; `torch.optim.Muon`) for
  the 2-D matrices inside the transformer blocks with AdamW for embeddings, head, norms and biases.
  Weight decay applies to matrices only. Muon is for GPUs: its Newton-Schulz step runs in bf16, which
  was 13x slower than fp32 on our CPU (docs/LOG.md).
- Schedules: linear warmup, then cosine decay to `min_lr_frac` of the peak, or warmup-stable-decay (WSD:
  constant, then a linear decay over the last `decay_frac` of the steps; Hu et al. 2024, MiniCPM).
- Divergence: every loop checks its figures with `raise_if_diverged` before the optimizer step, so a run
  that blows up stops with one message (the figure, the step, the last good checkpoint) and never writes
  NaN weights over a good model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import latest_valid_checkpoint
from ..common import GptlabError, torch_dtype
from ..config import option


@dataclass
class TrainConfig:
    num_steps: int = option(300, "optimizer steps")
    optimizer: str = option("adamw", "adamw or muon (Muon for block matrices, AdamW for the rest)")
    lr: float = option(3e-3, "peak AdamW learning rate")
    muon_lr: float = option(0.02, "peak Muon learning rate (optimizer=muon)")
    weight_decay: float = option(0.1, "decoupled weight decay on matrices")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    schedule: str = option("cosine", "cosine or wsd (warmup-stable-decay)")
    warmup_steps: int = option(20, "linear warmup steps")
    decay_frac: float = option(0.2, "wsd: fraction of steps in the final linear decay")
    min_lr_frac: float = option(0.1, "final learning rate as a fraction of the peak")
    eval_every: int = option(50, "evaluate every N steps (0 = only at the end)")
    checkpoint_every: int = option(100, "save a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = option(3, "keep the newest N checkpoints (0 = all)")
    resume: bool = option(False, "continue from the newest valid checkpoint of the output directory")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    dtype: str = option("auto", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    tensorboard: bool = option(True, "also write TensorBoard scalars")
    progress: bool = option(True, "show a progress bar")
    seed: int = option(0, "seed for init and data order")

    def __post_init__(self):
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.num_steps < 0 or self.warmup_steps < 0:
            raise ValueError("num_steps and warmup_steps must not be negative")


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` as a fraction of the peak (warmup, then cosine or WSD decay)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_frac
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.num_steps - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, round(cfg.decay_frac * cfg.num_steps))
    decay_start = cfg.num_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)


def bf16_autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast | None:
    """The bf16 autocast context `cfg.dtype` asks for on `device` ("auto": on CUDA only, since most CPUs
    multiply bf16 slowly), or None for plain fp32."""
    if torch_dtype(cfg.dtype, device) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return None


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW for all parameters, or Muon for 2-D matrices inside the blocks + AdamW for the rest.
    Each param group remembers its peak `base_lr`; the schedule scales it every step."""
    # named_parameters de-duplicates the tied embedding / head; frozen parameters (LoRA's base) are left out
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    in_blocks = {n for n, p in params.items() if n.startswith("model.layers.") and p.ndim == 2}
    muon_names = in_blocks if cfg.optimizer == "muon" else set()
    decay = [p for n, p in params.items() if n not in muon_names and p.ndim >= 2]
    no_decay = [p for n, p in params.items() if n not in muon_names and p.ndim < 2]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                              # one kernel for the whole update on GPU (torch's default there is foreach)
                              fused=all(p.is_cuda for p in decay + no_decay) or None)
    optimizers: list[torch.optim.Optimizer] = [adamw]
    if muon_names:
        optimizers.append(torch.optim.Muon([params[n] for n in sorted(muon_names)], lr=cfg.muon_lr,
                                           weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True))
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def raise_if_diverged(figures: dict[str, float], *, step: int, checkpoints: str | Path,
                      limits: dict[str, float] | None = None, context: str = "", hint: str = "") -> None:
    """Stop a run whose figures went bad: raise GptlabError when one of `figures` is NaN/inf or above its
    entry in `limits`. The message names that figure and its value, the others, the step, `context`,
    and the newest valid checkpoint under `checkpoints` (the one to resume from), then `hint`."""
    limits = limits or {}
    bad = [name for name, value in figures.items()
           if not math.isfinite(value) or (name in limits and value > limits[name])]
    if not bad:
        return
    name, value = bad[0], figures[bad[0]]
    above = f" (above the limit {limits[name]:g})" if math.isfinite(value) else ""
    others = ", ".join(f"{k} {v:.4g}" for k, v in figures.items() if k != name)
    kept = latest_valid_checkpoint(checkpoints)
    raise GptlabError(f"{name} became {value:.4g}{above}{f' ({others})' if others else ''} at step {step}{context}; "
                      f"weights were not updated; last good checkpoint: {kept or 'none'}"
                      + (f". {hint}" if hint else ""))
