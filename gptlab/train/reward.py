"""Reward model: a scalar score for (prompt, completion), trained on ranked completions.

    gptlab rm --model runs/default/sft/model --out runs/default/rm
    python -c "from gptlab.reward_model import RewardModel; rm = RewardModel.load('runs/default/rm/model'); ..."

Design decisions
- The model is `gptlab.reward_model.RewardModel` (an SFT trunk with a scalar readout on the last token);
  its training loop is `gptlab.train.preference_fit`'s, shared with DPO (Bradley-Terry over all pairs of
  each ranked set). The head starts at zero, so every run starts at loss ln 2 (no evaluation is spent on
  step 0: its figures are known, loss ln 2 and accuracy 0.5).
- The loss only sees reward differences, so the head's bias is free: after training it is set so that the
  best-ranked validation completions average 0 (InstructGPT normalises its RM the same way before RL), which
  makes a reward's sign meaningful for the RL stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint import load_model_dir
from ..common import get_logger
from ..config import register_config_command
from ..reward_model import HEAD_FILE, RewardModel
from .loop import device_and_autocast
from .optim import build_optimizers
from .preference_fit import PreferenceTrainConfig, encoded_preference_data, fit_preferences, resume_checkpoint
from .preferences import PreferenceBatch, by_length

log = get_logger("reward")


# ---- configuration --------------------------------------------------------------------------------------------

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


# ---- the reward-model stage -----------------------------------------------------------------------------------
def train_reward_model(cfg: RewardConfig) -> Path:
    """Train per `cfg`; return the final reward model directory (`out/model`)."""
    device, autocast = device_and_autocast(cfg)
    gpt, tokenizer = load_model_dir(cfg.model, device)
    train, val = encoded_preference_data(cfg, gpt, tokenizer, log)

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


def register(sub) -> None:
    register_config_command(sub, "rm", "train a reward model on ranked completions",
                            __doc__.splitlines()[0], RewardConfig, PRESETS, train_reward_model)
