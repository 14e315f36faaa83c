"""Training on preferences, shared by the reward model (`gptlab rm`) and DPO (`gptlab dpo`): their options,
their data, the Bradley-Terry loss and the loop.

Design decisions
- Loss: Bradley-Terry, -log sigmoid(r_better - r_worse), over ALL pairs of each ranked set, averaged per
  set and then over sets, with all of a set's completions in one batch (InstructGPT's K choose 2 per
  prompt; see `gptlab.train.preferences`).
- One loop (`fit_preferences`) for both stages: DPO is the reward model's loop with the policy's implicit
  reward beta * (log pi - log pi_ref) in place of the head's output (Rafailov et al. 2023). It reuses
  pretraining's optimizer grouping, LR schedule, NaN guard, metrics and checksummed checkpoints
  (gptlab.train.loop); the data order is a pure function of (seed, step), so a resumed run reads exactly the
  batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_training_checkpoint, rng_state, save_training_checkpoint
from ..common import GptlabError, get_logger
from ..config import option
from ..model import GPT
from ..tasks import sample_examples, task_names
from ..tokenizer import Tokenizer
from .loop import (batch_indices, checkpoint_to_resume, clipped_step, due, existing_checkpoints, set_lr_scale,
                   stop_if_requested, training_loop)
from .metrics import MetricsLogger, plot_loss_curve
from .optim import TrainConfig, lr_multiplier
from .preferences import (EncodedSet, PreferenceBatch, PreferenceSet, collate, default_preferences, encode_sets,
                          read_preferences_jsonl, row_offsets, sampled_preferences)

log = get_logger("preferences")


def bradley_terry_loss(scores: torch.Tensor, pairs: torch.Tensor,
                       pair_set: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over sets of the mean over each set's pairs of -log sigmoid(s_better - s_worse)
    (Bradley & Terry 1952; InstructGPT eq. 1). scores (N,), pairs (P, 2) rows (better, worse), pair_set (P,)
    the set of each pair. Returns (loss, margins (P,))."""
    margins = scores[pairs[:, 0]] - scores[pairs[:, 1]]
    pairs_in_set = torch.bincount(pair_set)
    n_sets = int((pairs_in_set > 0).sum())
    weights = 1.0 / (pairs_in_set[pair_set].to(scores.dtype) * n_sets)
    return (-F.logsigmoid(margins) * weights).sum(), margins


def pairwise_accuracy(margins: torch.Tensor) -> float:
    """Fraction of pairs ranked right; a tie counts half, so an untrained (constant) scorer is at chance."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()


@dataclass
class PreferenceTrainConfig(TrainConfig):
    """Options shared by `gptlab rm` and `gptlab dpo`."""

    model: str = option("runs/default/sft/model", "starting model directory (normally the SFT model)")
    out: str = option("runs/default/rm", "output directory: checkpoints, metrics, final model")
    data: str = option("tasks", "'tasks' (generated from the task suite), a preference JSONL file, a HF "
                                 "dataset folder (save_to_disk) or hf:NAME[:SPLIT]")
    val_data: str | None = option(None, "held-out preference JSONL (default: the task test split, or "
                                      "val_fraction of a data file)")
    val_fraction: float = option(0.1, "fraction of a JSONL file held out when val_data is not given")
    tasks: str = option("all", "task names for generated data, comma-separated, or 'all'")
    train_prompts: int = option(2000, "generated training preference sets (task train split)")
    val_prompts: int = option(200, "generated held-out preference sets (task test split)")
    policy_samples: int = option(0, "also sample this many completions per prompt from the starting model, "
                                  "ranked correct > incorrect by the gold checkers (0 = off)")
    sample_prompts: int = option(200, "training prompts to sample policy completions for")
    sample_temperature: float = option(1.0, "temperature of the policy samples")
    max_new_tokens: int = option(64, "token limit of generated completions (samples, gold evaluation)")
    batch_size: int = option(8, "preference sets per optimizer step (all of a set's pairs train together)")
    lr: float = option(1e-4, "peak AdamW learning rate")
    muon_lr: float = option(0.005, "peak Muon learning rate (optimizer=muon)")
    weight_decay: float = option(0.0, "decoupled weight decay on matrices")
    keep_checkpoints: int = option(2, "keep the newest N checkpoints (0 = all)")

    def __post_init__(self):
        super().__post_init__()
        if min(self.batch_size, self.num_steps, self.train_prompts, self.val_prompts) < 1:
            raise ValueError("batch_size, num_steps, train_prompts and val_prompts must be positive")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")



def load_preference_data(cfg: PreferenceTrainConfig, policy: GPT, tokenizer: Tokenizer
                         ) -> tuple[list[PreferenceSet], list[PreferenceSet]]:
    """(train, held-out) preference sets per `cfg`; policy samples (if asked) come from `policy`."""
    if cfg.data == "tasks":
        train = default_preferences(cfg.tasks, cfg.train_prompts, "train", cfg.seed)
        val = default_preferences(cfg.tasks, cfg.val_prompts, "test", cfg.seed)
    else:
        train = read_preferences_jsonl(cfg.data)
        if cfg.val_data:
            val = read_preferences_jsonl(cfg.val_data)
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            n_val = max(1, round(cfg.val_fraction * len(train)))
            if n_val >= len(train):
                raise GptlabError(f"{cfg.data} has too few records ({len(train)}) to hold out a validation set")
            val, train = [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]
    if cfg.policy_samples:
        examples = sample_examples(task_names(cfg.tasks), cfg.sample_prompts, "train", seed=f"{cfg.seed}-samples")
        train += sampled_preferences(policy, tokenizer, examples, cfg.policy_samples, cfg.sample_temperature,
                                     cfg.max_new_tokens, cfg.seed)
    return train, val


# ---- the shared training loop ---------------------------------------------------------------------------------
ScoreFn = Callable[[PreferenceBatch, str], torch.Tensor]  # (batch, "train" | "val") -> scores (N,)


def encoded_preference_data(cfg: PreferenceTrainConfig, model: GPT, tokenizer: Tokenizer,
                            logger: logging.Logger = log) -> tuple[list[EncodedSet], list[EncodedSet]]:
    """`load_preference_data`, encoded for `model`'s context window (too-long sets are an error there)."""
    train_sets, val_sets = load_preference_data(cfg, model, tokenizer)
    window = model.config.max_seq_len
    train = encode_sets(tokenizer, train_sets, window, "training preferences")
    val = encode_sets(tokenizer, val_sets, window, "held-out preferences")
    logger.info("%d training sets (%d pairs), %d held-out sets (%d pairs)", len(train),
                sum(len(s.pairs) for s in train), len(val), sum(len(s.pairs) for s in val))
    return train, val


def resume_checkpoint(cfg: PreferenceTrainConfig, gpt: GPT, tokenizer: Tokenizer,
                      optimizers: list[torch.optim.Optimizer]) -> tuple[int, dict | None]:
    """(start step, checkpoint meta or None): loads the newest valid checkpoint when cfg.resume; refuses
    to start fresh over an earlier run's checkpoints."""
    root = Path(cfg.out) / "checkpoints"
    existing = existing_checkpoints(root, cfg.resume)
    ckpt = checkpoint_to_resume(root, existing, log) if cfg.resume else None
    if ckpt is None:
        return 0, None
    meta = load_training_checkpoint(ckpt, gpt, tokenizer, optimizers)
    meta["path"] = str(ckpt)
    log.info("resumed from %s at step %d", ckpt, meta["step"])
    return meta["step"], meta


@torch.no_grad()
def evaluate_preferences(sets: Sequence[EncodedSet], scores_of: ScoreFn, batch_size: int, pad_id: int,
                         device: torch.device) -> dict[str, float]:
    """Held-out Bradley-Terry loss (mean over sets), pairwise accuracy and mean margin (over pairs)."""
    offsets = row_offsets(sets)
    loss_sum, margins = 0.0, []
    for start in range(0, len(sets), batch_size):
        index = list(range(start, min(start + batch_size, len(sets))))
        batch = collate(sets, index, offsets, pad_id).to(device)
        loss, m = bradley_terry_loss(scores_of(batch, "val").float(), batch.pairs, batch.pair_set)
        loss_sum += loss.item() * len(index)
        margins.append(m.float().cpu())
    margin = torch.cat(margins)
    return {"val/loss": loss_sum / len(sets), "val/accuracy": pairwise_accuracy(margin),
            "val/margin": margin.mean().item()}


def fit_preferences(cfg: PreferenceTrainConfig, *, trainable: nn.Module, gpt: GPT, tokenizer: Tokenizer,
                    optimizers: list[torch.optim.Optimizer], train: list[EncodedSet], val: list[EncodedSet],
                    scores_of: ScoreFn, device: torch.device, start_step: int = 0,
                    checkpoint_files: Callable[[], dict[str, bytes]] = dict,
                    checkpoint_meta: dict | None = None, logger: logging.Logger = log) -> dict[str, float]:
    """Minimise the all-pairs Bradley-Terry loss of `scores_of` over `train` for cfg.num_steps steps,
    evaluating on `val`, checkpointing `gpt` (+ `checkpoint_files()`) under cfg.out; returns the last
    validation figures. `logger`: the calling stage's, so its lines grep under that stage."""
    out = Path(cfg.out)
    pad_id = tokenizer.special_tokens.get("<|pad|>", tokenizer.eot_id)
    offsets = row_offsets(train)
    params = [p for p in trainable.parameters() if p.requires_grad]
    metrics = MetricsLogger(out, tensorboard=cfg.tensorboard, resume_step=start_step if start_step else None)
    last: dict[str, float] = {}

    def run_eval(at_step: int) -> None:
        trainable.eval()
        last.update(evaluate_preferences(val, scores_of, cfg.batch_size, pad_id, device))
        trainable.train()
        metrics.log(at_step, **last)
        logger.info("step %d: held-out loss %.4f, pairwise accuracy %.3f, margin %.3f", at_step, last["val/loss"],
                 last["val/accuracy"], last["val/margin"])

    def save(at_step: int, train_loss: float | None) -> Path:
        return save_training_checkpoint(out / "checkpoints", at_step, gpt, tokenizer, optimizers=optimizers,
                                        rng_states=[rng_state()], keep_last=cfg.keep_checkpoints,
                                        meta={"train_loss": train_loss, "config": asdict(cfg),
                                              **(checkpoint_meta or {})},
                                        extra_files=checkpoint_files())

    step, loss_value = start_step, None
    trainable.train()
    with training_loop(cfg.num_steps, step, progress=cfg.progress, metrics=metrics, logger=logger) as (bar, stop):
        while step < cfg.num_steps:
            t0 = time.perf_counter()
            scale = lr_multiplier(step, cfg)
            set_lr_scale(optimizers, scale)
            batch = collate(train, batch_indices(step, cfg.batch_size, len(train), cfg.seed), offsets,
                            pad_id).to(device)
            loss, margins = bradley_terry_loss(scores_of(batch, "train").float(), batch.pairs, batch.pair_set)
            loss.backward()
            loss_value = loss.item()
            grad_norm = clipped_step(optimizers, params, cfg.grad_clip, {"loss": loss_value}, step=step,
                                     checkpoints=out / "checkpoints",
                                     context=f" (lr scale {scale:.4g}, peak lr {cfg.lr:g})",
                                     hint="Try a lower --lr or --grad-clip")
            step += 1
            accuracy = pairwise_accuracy(margins)
            metrics.log(step, **{"train/loss": loss_value, "train/accuracy": accuracy,
                                 "train/margin": margins.mean().item(), "train/lr_scale": scale,
                                 "train/grad_norm": grad_norm, "train/step_s": time.perf_counter() - t0})
            bar.set_postfix({"loss": f"{loss_value:.3f}", "acc": f"{accuracy:.2f}"}, refresh=False)
            bar.update(1)
            stop_if_requested(stop.requested, lambda at: save(at, loss_value), step, logger)
            if due(step, cfg.eval_every, cfg.num_steps):
                run_eval(step)
            if due(step, cfg.checkpoint_every, cfg.num_steps):
                save(step, loss_value)
        run_eval(step)
        save(step, loss_value)
    plot_loss_curve(metrics.path, out / "loss.png")
    return last


