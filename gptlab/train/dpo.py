"""Direct Preference Optimization: fine-tune a policy on ranked completions without a reward model or RL.

    gptlab dpo --model runs/default/sft/model --out runs/default/dpo

Design decisions
- Loss (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))
  for chosen c and rejected r, where log pi(y) is the sum of log-probabilities of the completion's own
  tokens: the prompt, `<|assistant_start|>` and tool outputs are not the policy's choices and are left out
  (`gptlab.train.preferences` builds that mask). This is the reward model's Bradley-Terry loss with the implicit
  reward beta * (log pi - log ref) in place of a learned head, so DPO runs through the same loop
  (`gptlab.train.preference_fit.fit_preferences`): all pairs of a ranked set in one batch, held-out pairwise accuracy
  and margins of the implicit reward, checkpoints, resume.
- Reference: the starting model, frozen. Its log-probabilities are computed once, before training, for
  every training and held-out completion and kept as one number per completion; no second model sits in
  memory during training. A resumed run recomputes them from the starting model (deterministic) rather
  than storing them.
- beta = 0.1 by default (the paper's usual value): smaller beta lets the policy move further from the
  reference for the same margin.
- Gold accuracy before and after, on task test prompts (greedy generation judged by the task checkers):
  implicit-reward margins can grow while answers get worse (DPO can push down both completions' likelihood,
  or exploit length), so the stage reports whether the policy actually answers better.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint import load_model_dir, save_model_dir
from ..common import atomic_write_json, get_logger
from ..config import option, register_config_command
from ..eval.gold import gold_accuracy
from ..infer.generation_config import greedy_generation_config
from ..model import GPT
from ..tasks import task_names
from .loop import device_and_autocast
from .optim import build_optimizers
from .preference_fit import PreferenceTrainConfig, encoded_preference_data, fit_preferences, resume_checkpoint
from .preferences import EncodedSet, PreferenceBatch, by_length, collate, row_offsets

log = get_logger("dpo")


def sequence_logprobs(model: GPT, ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum over completion tokens of log p(token | everything before it), per row (N,). Rows are
    right-padded, so causal attention needs no key mask; padding has completion_mask 0. The head runs at
    the completion's positions only (`GPT.masked_loss`)."""
    targets = ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -1)
    token_logprobs = -model.masked_loss(ids[:, :-1], targets, reduction="none")  # flat, kept positions
    keep = targets != -1
    rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(keep)[keep]
    return token_logprobs.new_zeros(len(ids)).index_add(0, rows, token_logprobs)


def implicit_reward(policy_logprobs: torch.Tensor, reference_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi(y) - log ref(y)); its Bradley-Terry loss is the DPO loss."""
    return beta * (policy_logprobs - reference_logprobs)


@torch.no_grad()
def reference_logprobs(model: GPT, sets: list[EncodedSet], batch_size: int, pad_id: int, device, autocast
                       ) -> torch.Tensor:
    """Sequence log-probs (float32, one per completion, in `row_offsets` order) under the frozen model."""
    was_training = model.training
    model.eval()
    offsets = row_offsets(sets)
    out = torch.empty(offsets[-1], dtype=torch.float32, device=device)
    for start in range(0, len(sets), batch_size):
        batch = collate(sets, range(start, min(start + batch_size, len(sets))), offsets, pad_id).to(device)
        with autocast:
            out[batch.rows] = by_length(lambda ids, _, mask: sequence_logprobs(model, ids, mask), batch).float()
    model.train(was_training)
    return out


@dataclass
class DPOConfig(PreferenceTrainConfig):
    out: str = option("runs/default/dpo", "output directory: checkpoints, metrics, final model")
    lr: float = option(3e-5, "peak AdamW learning rate")
    beta: float = option(0.1, "DPO beta: strength of the pull toward the reference model")
    gold_prompts: int = option(100, "task test prompts for the gold accuracy before/after (0 = skip)")

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")


PRESETS = {
    # CPU, minutes for a depth-4 model; a small model moves at 1e-4 within tens of steps (bench/results/
    # trl_rm_dpo.md: held-out implicit-reward accuracy 0.83 after 80 steps), at 3e-5 it barely moves.
    "cpu": DPOConfig(lr=1e-4),
    # GPU (one H100, about a minute at 110M): the DPO paper's batch of 64 with policy samples added; the
    # CPU rate scaled down 10x for the larger model (the paper's 1e-6 is for fine-tuned billion-parameter
    # models; not swept).
    "gpu": DPOConfig(train_prompts=20000, val_prompts=1000, policy_samples=4, sample_prompts=2000, batch_size=64,
                     num_steps=200, lr=1e-5, warmup_steps=20, eval_every=100, checkpoint_every=100,
                     gold_prompts=500),
}


def train_dpo(cfg: DPOConfig) -> Path:
    """Train per `cfg`; return the final policy model directory (`out/model`)."""
    device, autocast = device_and_autocast(cfg)
    policy, tokenizer = load_model_dir(cfg.model, device)
    pad_id = tokenizer.special_tokens.get("<|pad|>", tokenizer.eot_id)
    train, val = encoded_preference_data(cfg, policy, tokenizer, log)
    reference = {"train": reference_logprobs(policy, train, cfg.batch_size, pad_id, device, autocast),
                 "val": reference_logprobs(policy, val, cfg.batch_size, pad_id, device, autocast)}
    gold_tasks = task_names(cfg.tasks)
    gold_per_task = -(-cfg.gold_prompts // len(gold_tasks)) if cfg.gold_prompts else 0

    def measure_gold() -> float | None:
        """Macro-averaged gold accuracy on task test prompts, chat mode, greedy, tools run (gptlab.eval.gold)."""
        if not gold_per_task:
            return None
        return gold_accuracy(policy, tokenizer, gold_tasks, gold_per_task, mode="chat",
                             max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)["accuracy"]

    optimizers = build_optimizers(policy, cfg)
    start, meta = resume_checkpoint(cfg, policy, tokenizer, optimizers)
    if meta is not None:
        gold_before = meta.get("gold_accuracy_before")
    else:
        gold_before = measure_gold()
    if gold_before is not None:
        log.info("gold accuracy before DPO: %.3f (%d test prompts per task)", gold_before, gold_per_task)

    def scores_of(batch: PreferenceBatch, split: str) -> torch.Tensor:
        with autocast:
            logprobs = by_length(lambda ids, _, mask: sequence_logprobs(policy, ids, mask), batch)
        return implicit_reward(logprobs.float(), reference[split][batch.rows], cfg.beta)

    figures = fit_preferences(cfg, trainable=policy, gpt=policy, tokenizer=tokenizer, optimizers=optimizers,
                              train=train, val=val, scores_of=scores_of, device=device, start_step=start,
                              checkpoint_meta={"gold_accuracy_before": gold_before}, logger=log)
    gold_after = measure_gold()
    final = save_model_dir(Path(cfg.out) / "model", policy, tokenizer, extra_files=greedy_generation_config())
    summary = {"base_model": str(cfg.model), "gold_accuracy_before": gold_before, "gold_accuracy_after": gold_after,
               "gold_prompts_per_task": gold_per_task, "held_out_implicit_reward_accuracy": figures["val/accuracy"],
               "held_out_implicit_reward_margin": figures["val/margin"], "held_out_loss": figures["val/loss"],
               "config": asdict(cfg)}
    atomic_write_json(Path(cfg.out) / "dpo.json", summary)
    if gold_after is not None:
        log.info("gold accuracy after DPO: %.3f (before %.3f)", gold_after, gold_before)
    log.info("DPO policy: %s (held-out implicit-reward accuracy %.3f)", final, figures["val/accuracy"])
    return final


def register(sub) -> None:
    register_config_command(sub, "dpo", "fine-tune a policy on preferences with DPO",
                            __doc__.splitlines()[0], DPOConfig, PRESETS, train_dpo)
