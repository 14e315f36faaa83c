"""Reward model: a scalar score for (prompt, completion), trained on ranked completions.

    gptlab rm --model runs/default/sft/model --out runs/default/rm
    python -c "from gptlab.train.reward import RewardModel; rm = RewardModel.load('runs/default/rm/model'); ..."

Design decisions
- Architecture (InstructGPT, Ouyang et al. 2022): the SFT model (any model directory) with its language
  head left aside and a linear readout n_embd -> 1 on the final hidden state of the last token, which for
  a rendered conversation is the completion's `<|assistant_end|>`: the one position that has seen the whole
  prompt and the whole answer. Rows may be padded on either side; the readout takes the last real token
  of each row (`RewardModel.forward` takes a key mask), so padding never changes a score.
- Loss: Bradley-Terry, -log sigmoid(r_better - r_worse), over ALL pairs of each ranked set, averaged per
  set and then over sets, with all of a set's completions in one batch (InstructGPT's K choose 2 per
  prompt; see `gptlab.train.preferences`). The head starts at zero, so every run starts at loss ln 2 (no
  evaluation is spent on step 0: its figures are known, loss ln 2 and accuracy 0.5).
- The loss only sees reward differences, so the head's bias is free: after training it is set so that the
  best-ranked validation completions average 0 (InstructGPT normalises its RM the same way before RL), which
  makes a reward's sign meaningful for the RL stage.
- Saved as a model directory (the trunk, reusable by anything that loads models) plus
  `reward_head.safetensors` and `reward.json` (format, tokenizer checksum, validation figures), both
  covered by the directory's SHA256SUMS, which loading verifies (`checkpoint.save_model_dir`).
  A reward model scores token ids, so pairing it with a policy of another tokenizer is an error:
  `check_same_tokenizer` / `RewardModel.check_policy` compare tokenizer checksums.
- The training loop (`fit_preferences`) is shared with DPO: DPO is this loop with the policy's implicit
  reward beta * (log pi - log pi_ref) in place of the head's output (Rafailov et al. 2023). It reuses
  pretraining's optimizer grouping, LR schedule, NaN guard, metrics and checksummed checkpoints; the data
  order is a pure function of (seed, step), so a resumed run reads exactly the batches an uninterrupted
  one would.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..chat import render
from ..checkpoint import (checkpoint_dirs, latest_valid_checkpoint, load_model_dir, load_training_checkpoint,
                         rng_state, save_model_dir, save_training_checkpoint)
from ..common import GptlabError, get_logger, json_bytes, read_json, torch_device
from ..config import add_config_args, build_config, option
from .metrics import MetricsLogger, plot_loss_curve
from ..model import GPT
from .preferences import (EncodedSet, PreferenceBatch, PreferenceSet, by_length, collate, default_preferences,
                          encode_sets, read_preferences_jsonl, row_offsets, sampled_preferences)
from .optim import TrainConfig, bf16_autocast, build_optimizers, lr_multiplier, raise_if_diverged
from .pretrain import StopRequest
from ..tasks import sample_examples, task_names
from ..tokenizer import Tokenizer

log = get_logger("reward")

HEAD_FILE = "reward_head.safetensors"
REWARD_META = "reward.json"
REWARD_FORMAT = 1


# ---- losses -------------------------------------------------------------------------------------------------
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


# ---- the model ----------------------------------------------------------------------------------------------
def check_same_tokenizer(expected_sha256: str, tokenizer: Tokenizer, what: str) -> None:
    """Raise unless `tokenizer` is the one `what` was trained with (token ids mean nothing across tokenizers)."""
    if tokenizer.sha256 != expected_sha256:
        raise GptlabError(f"{what} uses a different tokenizer (checksum {expected_sha256[:12]} != "
                          f"{tokenizer.sha256[:12]}): its scores of these token ids would be meaningless")


class RewardModel(nn.Module):
    def __init__(self, gpt: GPT, tokenizer: Tokenizer):
        super().__init__()
        self.gpt = gpt
        self.tokenizer = tokenizer
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) of token rows `ids` (B, T); `attn_mask` (B, T) is True on real tokens (any padding
        side). The readout is the final hidden state of each row's last real token."""
        B, T = ids.shape
        if attn_mask is None:
            attn_mask = torch.ones_like(ids, dtype=torch.bool)
        attn_mask = attn_mask.bool()
        # right padding needs no key mask (causal attention never looks ahead) and keeps positions 0..T-1;
        # any other padding gets per-row positions that start at 0 on the first real token
        right_padded = bool((attn_mask[:, 1:] <= attn_mask[:, :-1]).all())
        positions = None if right_padded else (attn_mask.long().cumsum(1) - 1).clamp_min(0)
        hidden = self.gpt(ids, positions=positions, attn_mask=None if right_padded else attn_mask,
                          return_hidden=True)
        last = T - 1 - attn_mask.flip(1).long().argmax(dim=1)
        return self.head(hidden[torch.arange(B, device=ids.device), last].to(self.head.weight.dtype)).squeeze(-1)

    @torch.inference_mode()
    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
        """Rewards (N,) float32 on the CPU of token rows (each a whole rendered conversation). Rows are
        batched in order of length, so each batch pads little (the scores do not depend on the batching)."""
        device = self.head.weight.device
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = []
        for start in range(0, len(seqs), batch_size):
            chunk = [seqs[i] for i in order[start:start + batch_size]]
            width = max(map(len, chunk))
            if width > self.gpt.config.max_seq_len:
                raise GptlabError(f"a conversation of {width} tokens exceeds the reward model's context "
                                  f"({self.gpt.config.max_seq_len})")
            ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool, device=device)
            for r, s in enumerate(chunk):
                ids[r, :len(s)] = torch.tensor(list(s), device=device)
                mask[r, :len(s)] = True
            out.append(self(ids, mask).float().cpu())
        scores = torch.empty(len(seqs))
        if order:
            scores[torch.tensor(order)] = torch.cat(out)
        return scores

    def score(self, conversations: Sequence[Sequence[dict[str, Any]]], batch_size: int = 16) -> torch.Tensor:
        """Rewards (N,) of complete conversations (prompt messages followed by the assistant's answer)."""
        return self.score_ids([render(self.tokenizer, c).ids for c in conversations], batch_size)

    def check_policy(self, policy_tokenizer: Tokenizer) -> None:
        """The check the RL stage makes before scoring a policy's samples with this reward model."""
        check_same_tokenizer(self.tokenizer.sha256, policy_tokenizer, "the reward model")

    def head_bytes(self) -> bytes:
        return save({k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()})

    def load_head(self, path: Path) -> None:
        try:
            state = load_file(path)
            self.head.load_state_dict({k: v.to(self.head.weight) for k, v in state.items()})
        except (SafetensorError, OSError, RuntimeError, KeyError) as e:
            raise GptlabError(f"cannot load reward head {path}: {e}") from None

    def save(self, path: str | Path, info: dict[str, Any] | None = None) -> Path:
        meta = {"format": REWARD_FORMAT, "head": HEAD_FILE,
                "readout": "final hidden state of the last token (<|assistant_end|>)",
                "tokenizer_sha256": self.tokenizer.sha256, **(info or {})}
        return save_model_dir(path, self.gpt, self.tokenizer,
                              extra_files={HEAD_FILE: self.head_bytes(), REWARD_META: json_bytes(meta)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> RewardModel:
        path = Path(path)
        meta = read_json(path / REWARD_META, "reward model metadata (not a reward model directory?)")
        if meta.get("format") != REWARD_FORMAT:
            raise GptlabError(f"{path}/{REWARD_META} has format {meta.get('format')}, expected {REWARD_FORMAT}")
        gpt, tokenizer = load_model_dir(path, device, dtype)
        check_same_tokenizer(meta.get("tokenizer_sha256", ""), tokenizer, f"reward model {path}")
        model = cls(gpt, tokenizer).to(device)
        model.load_head(path / meta.get("head", HEAD_FILE))
        return model.eval()


# ---- configuration --------------------------------------------------------------------------------------------

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


@dataclass
class RewardConfig(PreferenceTrainConfig):
    pass


PRESETS = {
    # CPU, minutes for a depth-4 model: task-suite preferences, 300 steps of 8 sets (~80 pairs each). A short
    # run from a zero-initialised head wants a high rate: at 1e-4 the speedrun's 60 steps left most held-out
    # margins near 0 (83% pairwise accuracy), 1e-3 gets 89%, 3e-3 83% (docs/LOG.md "Reward model accuracy").
    "cpu": RewardConfig(lr=1e-3),
    # GPU (one H100, about a minute at 110M): 8x the sets, 64 a step, policy samples of 2000 prompts
    # included; the CPU rate scaled down 10x for a 20x wider-and-deeper model (not swept).
    "gpu": RewardConfig(train_prompts=20000, val_prompts=1000, policy_samples=4, sample_prompts=2000,
                        batch_size=64, num_steps=300, lr=1e-4, warmup_steps=20, eval_every=100,
                        checkpoint_every=100),
}


# ---- data ---------------------------------------------------------------------------------------------------
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


def resolve_device(cfg: PreferenceTrainConfig) -> tuple[torch.device, Any]:
    """(device, autocast context) per cfg.device / cfg.dtype."""
    device = torch_device(cfg.device)
    return device, bf16_autocast(cfg, device) or nullcontext()


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Sets of optimizer step `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch),
    a pure function of the step so resuming needs no loader state."""
    out, orders = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(position, n)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(n, generator=generator).tolist()
        out.append(orders[epoch][i])
    return out


# ---- the shared training loop ---------------------------------------------------------------------------------
ScoreFn = Callable[[PreferenceBatch, str], torch.Tensor]  # (batch, "train" | "val") -> scores (N,)


def resume_checkpoint(cfg: PreferenceTrainConfig, gpt: GPT, tokenizer: Tokenizer,
                      optimizers: list[torch.optim.Optimizer]) -> tuple[int, dict | None]:
    """(start step, checkpoint meta or None): loads the newest valid checkpoint when cfg.resume; refuses
    to start fresh over an earlier run's checkpoints."""
    root = Path(cfg.out) / "checkpoints"
    existing = checkpoint_dirs(root)
    if existing and not cfg.resume:
        raise GptlabError(f"{root} holds checkpoints of an earlier run ({existing[-1].name}): pass --resume true "
                          "to continue it, or choose another --out")
    if not cfg.resume:
        return 0, None
    ckpt = latest_valid_checkpoint(root)
    if ckpt is None:
        if existing:
            raise GptlabError(f"no checkpoint in {root} passes its checksums (see the warnings above)")
        log.info("no checkpoint in %s: starting from scratch", root)
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
    bar = tqdm(total=cfg.num_steps, initial=step, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    try:
        with StopRequest(logger) as stop, logging_redirect_tqdm([logging.getLogger("gptlab")]):
            while step < cfg.num_steps:
                t0 = time.perf_counter()
                scale = lr_multiplier(step, cfg)
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] = group["base_lr"] * scale
                batch = collate(train, batch_indices(step, cfg.batch_size, len(train), cfg.seed), offsets,
                                pad_id).to(device)
                loss, margins = bradley_terry_loss(scores_of(batch, "train").float(), batch.pairs, batch.pair_set)
                loss.backward()
                loss_value = loss.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf).item()
                raise_if_diverged({"loss": loss_value, "gradient norm": grad_norm}, step=step,
                                  checkpoints=out / "checkpoints",
                                  context=f" (lr scale {scale:.4g}, peak lr {cfg.lr:g})",
                                  hint="Try a lower --lr or --grad-clip")
                for opt in optimizers:
                    opt.step()
                trainable.zero_grad(set_to_none=True)
                step += 1
                accuracy = pairwise_accuracy(margins)
                metrics.log(step, **{"train/loss": loss_value, "train/accuracy": accuracy,
                                     "train/margin": margins.mean().item(), "train/lr_scale": scale,
                                     "train/grad_norm": grad_norm, "train/step_s": time.perf_counter() - t0})
                bar.set_postfix({"loss": f"{loss_value:.3f}", "acc": f"{accuracy:.2f}"}, refresh=False)
                bar.update(1)
                if stop.requested:
                    path = save(step, loss_value)
                    logger.warning("stopped at step %d; checkpoint %s; continue with --resume true", step, path)
                    raise KeyboardInterrupt
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
                    run_eval(step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.num_steps:
                    save(step, loss_value)
            run_eval(step)
            save(step, loss_value)
    finally:
        bar.close()
        metrics.close()
    plot_loss_curve(metrics.path, out / "loss.png")
    return last


# ---- the reward-model stage -----------------------------------------------------------------------------------
def train_reward_model(cfg: RewardConfig) -> Path:
    """Train per `cfg`; return the final reward model directory (`out/model`)."""
    device, autocast = resolve_device(cfg)
    gpt, tokenizer = load_model_dir(cfg.model, device)
    train_sets, val_sets = load_preference_data(cfg, gpt, tokenizer)
    window = gpt.config.max_seq_len
    train = encode_sets(tokenizer, train_sets, window, "training preferences")
    val = encode_sets(tokenizer, val_sets, window, "held-out preferences")
    log.info("%d training sets (%d pairs), %d held-out sets (%d pairs)", len(train),
             sum(len(s.pairs) for s in train), len(val), sum(len(s.pairs) for s in val))

    model = RewardModel(gpt, tokenizer).to(device)
    optimizers = build_optimizers(gpt, cfg)
    optimizers[0].add_param_group({"params": list(model.head.parameters()), "weight_decay": 0.0,
                                   "lr": cfg.lr, "base_lr": cfg.lr})
    start, meta = resume_checkpoint(cfg, gpt, tokenizer, optimizers)
    if meta is not None:
        model.load_head(Path(meta["path"]) / HEAD_FILE)

    def scores_of(batch: PreferenceBatch, split: str) -> torch.Tensor:
        with autocast:
            return by_length(lambda ids, attn_mask, _: model(ids, attn_mask), batch)

    figures = fit_preferences(cfg, trainable=model, gpt=gpt, tokenizer=tokenizer, optimizers=optimizers,
                              train=train, val=val, scores_of=scores_of, device=device, start_step=start,
                              checkpoint_files=lambda: {HEAD_FILE: model.head_bytes()})
    # the loss ignores the bias: centre the best-ranked held-out completions on 0 (module docstring)
    model.eval()
    best_rows = [ids for s in val for i, ids in enumerate(s.ids) if i not in {worse for _, worse in s.pairs}]
    with torch.no_grad():
        model.head.bias -= model.score_ids(best_rows).mean().to(model.head.bias)
    final = model.save(Path(cfg.out) / "model", {
        "base_model": str(cfg.model), "held_out_pairwise_accuracy": figures["val/accuracy"],
        "held_out_loss": figures["val/loss"], "held_out_sets": len(val), "steps": cfg.num_steps,
        "config": asdict(cfg)})
    log.info("reward model: %s (held-out pairwise accuracy %.3f)", final, figures["val/accuracy"])
    return final


def _cmd_rm(args: argparse.Namespace) -> None:
    print(train_reward_model(build_config(RewardConfig, args, PRESETS)))


def register(sub) -> None:
    parser = sub.add_parser("rm", help="train a reward model on ranked completions",
                            description=__doc__.splitlines()[0])
    add_config_args(parser, RewardConfig, PRESETS)
    parser.set_defaults(func=_cmd_rm)
