"""What RL trains on: prompts (a pure function of seed and step), sampled answers with their rewards and
verdicts, DAPO's group selection, and the forward passes over the action tokens of rollouts."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

from ..chat import completion_text, read_messages_jsonl, render_for_completion
from ..common import GptlabError
from ..eval.gold import chat_messages
from ..infer.rollout import Turn
from ..model import GPT
from ..tasks import Example, get_task, sample_examples, task_names
from ..tokenizer import Tokenizer
from .loop import batch_indices



class PromptOptions(Protocol):
    """The fields of RLConfig that decide the prompts (a protocol, so this module needs no import of rl.py)."""
    tasks: str
    prompts: str
    max_new_tokens: int
    seed: int

@dataclass
class RLPrompt:
    ids: list[int]
    example: Example | None  # task prompts: the checker's example


@dataclass
class Sample:
    prompt: RLPrompt
    turn: Turn
    reward: float
    correct: bool | None  # the gold checker's verdict (task prompts only)

    @property
    def ids(self) -> list[int]:
        return self.prompt.ids + self.turn.ids

    def action_positions(self) -> list[int]:
        """Positions whose logits predict a sampled token (the token's position - 1)."""
        start = len(self.prompt.ids) - 1
        return [start + j for j, g in enumerate(self.turn.generated) if g]


def check_prompt_lengths(prompts: Sequence[RLPrompt], window: int, max_new_tokens: int, source: str) -> None:
    limit = window - max_new_tokens
    long = [i for i, p in enumerate(prompts) if len(p.ids) > limit]
    if long:
        first = long[0]
        raise GptlabError(f"RL prompts longer than the context: {len(long)} of {len(prompts)} prompts from {source} "
                          f"have more than {limit} tokens (context {window} - max_new_tokens {max_new_tokens}); "
                          f"the first is prompt {first + 1} ({len(prompts[first].ids)} tokens). Shorten them or "
                          "lower --max-new-tokens")


class PromptSource:
    """The prompts of each step: a pure function of (seed, step)."""

    def __init__(self, cfg: PromptOptions, tokenizer: Tokenizer, window: int):
        self.cfg, self.tokenizer, self.window = cfg, tokenizer, window
        self.names = task_names(cfg.tasks)
        self.train_names = self.names  # the tasks RL draws prompts from (`probe_tasks` may narrow them)
        self.replay_names = self.names  # the tasks `ptx_coef` replays (with a probe: the solved ones)
        self.file_prompts: list[RLPrompt] | None = None
        if cfg.prompts != "tasks":
            if not (Path(cfg.prompts).exists() or cfg.prompts.startswith("hf:")):
                raise GptlabError(f"prompts file not found: {cfg.prompts}")
            self.file_prompts = [RLPrompt(render_for_completion(tokenizer, m), None)
                                 for m in read_messages_jsonl(cfg.prompts, complete=False)]
            if not self.file_prompts:
                raise GptlabError(f"{cfg.prompts}: no prompts")
            check_prompt_lengths(self.file_prompts, window, cfg.max_new_tokens, cfg.prompts)

    def at(self, step: int, count: int) -> list[RLPrompt]:
        cfg = self.cfg
        if self.file_prompts is not None:
            return [self.file_prompts[i] for i in batch_indices(step, count, len(self.file_prompts), cfg.seed)]
        examples = sample_examples(self.train_names, count, "train", seed=f"rl-{cfg.seed}-{step}")
        prompts = [RLPrompt(render_for_completion(self.tokenizer, chat_messages(e)), e) for e in examples]
        check_prompt_lengths(prompts, self.window, cfg.max_new_tokens, f"tasks {cfg.tasks!r}")
        return prompts


def sample_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of answer `index` at `step`: a hash, so no two answers share a random stream."""
    digest = hashlib.sha256(f"rl-sample:{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def groups_with_signal(rewards: Sequence[float], group_size: int) -> list[bool]:
    """For each group of `group_size` consecutive rewards: do they differ? A group of equal rewards has zero
    GRPO advantage everywhere and adds nothing to the policy gradient but its KL term."""
    return [len(set(rewards[i:i + group_size])) > 1 for i in range(0, len(rewards), group_size)]


def select_groups(samples: list[Sample], group_size: int, keep: int) -> list[Sample]:
    """DAPO's dynamic sampling (Yu et al. 2025): of the drawn groups, keep `keep`, first those with signal
    (`groups_with_signal`), then the others, each in draw order so the choice is a pure function of the
    rewards."""
    groups = [samples[i:i + group_size] for i in range(0, len(samples), group_size)]
    signal = groups_with_signal([s.reward for s in samples], group_size)
    ranked = [g for g, s in zip(groups, signal) if s] + [g for g, s in zip(groups, signal) if not s]
    return [s for g in ranked[:keep] for s in g]


def verdicts(prompts: Sequence[RLPrompt], turns: Sequence[Turn], tokenizer: Tokenizer) -> list[bool | None]:
    return [None if p.example is None else get_task(p.example.task).check(p.example, completion_text(tokenizer, t.ids))
            for p, t in zip(prompts, turns)]


# ---------------------------------------------------------------------------------------------------------
# Forward passes over rollouts


def pad_samples(samples: Sequence[Sample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs (B, L - 1) (every token but the last, which predicts nothing) and the action
    mask (B, L - 1): True where the logits predict a sampled token."""
    width = max(len(s.ids) for s in samples) - 1
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    act = torch.zeros(len(samples), width, dtype=torch.bool)
    for r, s in enumerate(samples):
        seq = s.ids[:-1]
        ids[r, :len(seq)] = torch.tensor(seq)
        act[r, s.action_positions()] = True
    return ids.to(device), act.to(device)


def action_targets(samples: Sequence[Sample], device) -> torch.Tensor:
    """The sampled tokens of `samples`, flat, in the row-major order of `pad_samples`' action mask."""
    return torch.tensor([t for s in samples for t, g in zip(s.turn.ids, s.turn.generated) if g], device=device)


def action_forward(model: GPT, value_head: nn.Module | None, ids: torch.Tensor, act: torch.Tensor,
                   targets: torch.Tensor, temperature: float, autocast) -> dict[str, torch.Tensor]:
    """Flat per-action-token log-probs of `targets` under softmax(logits / temperature), entropies, and
    values (PPO). Right padding needs no attention mask (causal attention never looks ahead); only the
    action positions' hidden states go through the head."""
    with autocast:
        hidden = model(ids, return_hidden=True)[act]
        logits = model.lm_head(hidden)
    logprobs = (logits.float() / temperature).log_softmax(dim=-1)
    out = {"logp": logprobs.gather(1, targets[:, None])[:, 0],
           "entropy": -(logprobs.exp() * logprobs).sum(dim=-1)}
    if value_head is not None:
        out["values"] = value_head(hidden.float())[:, 0]
    return out


def scatter_rows(flat: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Flat action values -> (B, T) with zeros off the action mask."""
    dense = torch.zeros(act.shape, dtype=flat.dtype, device=flat.device)
    dense[act] = flat
    return dense
