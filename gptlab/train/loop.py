"""The pieces every training stage's loop shares: stop handling, resume rules, the LR schedule's rescale, the
clipped and guarded optimizer step, the eval/checkpoint cadence, and the progress bar.

Design decisions
- Helpers, not a framework: each stage (pretrain, sft, the preference loop of rm/dpo, rl) keeps its whole
  loop in its own file, readable top to bottom as in nanoGPT; only the lines that were the same in all of
  them live here. A loop reads: `with training_loop(...) as (bar, stop)`, `set_lr_scale`, forward/backward,
  `clipped_step`, metrics, `stop_if_requested`, `due(...)` for eval and checkpoints.
- A stop (SIGINT/SIGTERM) is honoured between steps: the loop saves a checkpoint and raises
  KeyboardInterrupt, so a rerun with `--resume true` continues exactly where it stopped.
- A fresh run refuses to start over an earlier run's checkpoints (it would prune them and mix two runs);
  a resume that finds checkpoints but none passing its checksums is an error, never a silent restart.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..checkpoint import checkpoint_dirs, latest_valid_checkpoint
from ..common import GptlabError, get_logger, torch_device
from .optim import TrainConfig, bf16_autocast, raise_if_diverged
from .sharding import grad_norm_value

log = get_logger("train")


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step (then it saves and exits); a second
    Ctrl-C interrupts at once. Handlers are restored on exit. `logger`: the stage's own, so the notice
    greps under the stage that received the signal."""

    def __init__(self, logger: logging.Logger = log):
        self.requested = False
        self.previous = {}
        self.log = logger

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def device_and_autocast(cfg: TrainConfig) -> tuple[torch.device, Any]:
    """(device, autocast context) per cfg.device / cfg.dtype; the context is a no-op without bf16."""
    device = torch_device(cfg.device)
    return device, bf16_autocast(cfg, device) or nullcontext()


def existing_checkpoints(root: Path, resume: bool, out_flag: str = "--out") -> list[Path]:
    """The checkpoints under `root`. Starting fresh over them is an error: the new run would prune them
    (keep_checkpoints) and a later resume would mix two runs."""
    existing = checkpoint_dirs(root)
    if existing and not resume:
        raise GptlabError(f"{root} holds checkpoints of an earlier run ({existing[-1].name}): pass --resume true "
                          f"to continue it, or choose another {out_flag}")
    return existing


def checkpoint_to_resume(root: Path, existing: list[Path], logger: logging.Logger = log) -> Path | None:
    """The newest checkpoint under `root` that passes its checksums; None (start from scratch) when there
    are none at all; an error when there are some but none is intact."""
    ckpt = latest_valid_checkpoint(root)
    if ckpt is None and existing:
        raise GptlabError(f"no checkpoint in {root} passes its checksums (see the warnings above); move them "
                          "away to start from scratch")
    if ckpt is None:
        logger.info("no checkpoint in %s: starting from scratch", root)
    return ckpt


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Items of optimizer step `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch),
    a pure function of the step so resuming needs no loader state."""
    out, orders = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(position, n)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(n, generator=generator).tolist()
        out.append(orders[epoch][i])
    return out


def set_lr_scale(optimizers: Iterable[torch.optim.Optimizer], scale: float) -> None:
    """Every param group's lr = its base_lr (set by build_optimizers) x the schedule's multiplier."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale


def clipped_step(optimizers: list[torch.optim.Optimizer], params: Iterable[torch.Tensor], grad_clip: float,
                 figures: dict[str, float], *, step: int, checkpoints: Path, context: str, hint: str) -> float:
    """Clip the gradient norm (computed even without clipping: it is logged and checked), stop with
    `raise_if_diverged` if a figure or the norm is not finite, step every optimizer and clear the gradients.
    Returns the gradient norm before clipping."""
    params = list(params)
    grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf))
    raise_if_diverged({**figures, "gradient norm": grad_norm}, step=step, checkpoints=checkpoints,
                      context=context, hint=hint)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return grad_norm


def due(step: int, every: int, num_steps: int) -> bool:
    """An every-N event (evaluation, checkpoint) at `step`, except the last step, which the loop's ending
    always evaluates and saves."""
    return bool(every) and step % every == 0 and step < num_steps


def stop_if_requested(stopping: bool, save: Callable[[int], Path | None], step: int,
                      logger: logging.Logger = log) -> None:
    """After a step: on a stop request save a checkpoint and end the run with KeyboardInterrupt."""
    if stopping:
        path = save(step)
        if path is not None:
            logger.warning("stopped at step %d; checkpoint %s; continue with --resume true", step, path)
        raise KeyboardInterrupt


@contextmanager
def training_loop(total: int, initial: int, *, progress: bool, metrics, logger: logging.Logger = log
                  ) -> Iterator[tuple[tqdm, StopRequest]]:
    """The loop's surroundings: a progress bar over steps, log lines printed above it, SIGINT/SIGTERM turned
    into a stop request, and the bar and metrics closed however the loop ends."""
    bar = tqdm(total=total, initial=initial, disable=not progress, unit="step", dynamic_ncols=True)
    try:
        with StopRequest(logger) as stop, logging_redirect_tqdm([logging.getLogger("gptlab")]):
            yield bar, stop
    finally:
        bar.close()
        metrics.close()
