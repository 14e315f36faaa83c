"""Sampling: a request's parameters, logit processing, and drawing one token per row of a batch.

Design decisions
- Randomness: every row owns a `torch.Generator` seeded with `seed + row` (or from OS entropy when no seed
  is given; `Engine.prefill` makes them), and a token is drawn with the exponential race
  argmax(p_i / E_i), E_i ~ Exp(1), which picks i with probability p_i. So a row's samples depend only on
  its own seed, never on the batch it shares.
- Logit processing order (as in CTRL and HF): repetition penalty -> temperature -> top-k -> top-p.
  Repetition penalty (Keskar et al. 2019): a logit of a token already in the prompt or output is divided by
  the penalty when positive and multiplied by it when negative. Top-p keeps the smallest set of most likely
  tokens whose mass reaches p (Holtzman et al. 2019). Temperature 0 (or top_k = 1) is greedy.
- Parameters may differ per row: `SamplingTensors` holds them as (B,)/(B, 1) tensors, so one batch (and
  one set of batched ops per step) serves requests with different settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common import GptlabError
from .constraints import Constraint


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop: tuple[str, ...] = ()  # stop strings, matched on decoded text
    stop_token_ids: tuple[int, ...] | None = None  # None = the tokenizer's end tokens; () = none
    seed: int | None = None  # row r uses seed + r; None = fresh OS entropy
    num_beams: int = 1  # > 1: beam search (ignores temperature, top_k, top_p, seed)
    length_penalty: float = 1.0  # beam score = sum logprob / length ** length_penalty
    early_stopping: bool = True  # beam search ends once num_beams hypotheses have finished
    constraint: Constraint | None = None  # grammar the output must match (constraints.py); None = free text

    def __post_init__(self):
        if isinstance(self.stop, str):  # a lone string would otherwise become a tuple of characters
            object.__setattr__(self, "stop", (self.stop,))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (all(self.stop), "stop strings must not be empty"),
            (self.constraint is None or self.num_beams == 1, "constrained decoding does not support beam search"),
        ]
        for ok, message in checks:
            if not ok:
                raise GptlabError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def accept_first(self) -> bool:
        """May a constrained row sample first and mask only a refused token (constraints.py)? Exact when every
        logit processing step it uses keeps a masked (-inf) logit masked: greedy, temperature, repetition
        penalty; not top-k or top-p, whose kept set depends on the tokens the mask removes."""
        return self.greedy or (self.top_k == 0 and self.top_p == 1)


# ---- logit processing (public so tests can check each against a hand computation) -----------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL penalty: for seen tokens, positive logits / penalty, negative logits * penalty. penalty (B, 1)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Set logits below each row's k-th largest to -inf; top_k (B,) with 0 = keep all."""
    kmax = min(int(top_k.max()), logits.shape[-1])
    if kmax == 0:
        return logits
    values = logits.topk(kmax, dim=-1).values
    kth = values.gather(1, (top_k.clamp(1, kmax) - 1)[:, None])
    kth = torch.where(top_k[:, None] > 0, kth, torch.full_like(kth, -float("inf")))
    return logits.masked_fill(logits < kth, -float("inf"))


def filter_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their mass reaches p (always at least one).
    top_p (B, 1); rows with p = 1 are unchanged."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill((mass_before >= top_p) & (top_p < 1), -float("inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


@dataclass
class SamplingTensors:
    """Per-row sampling parameters as (B,)/(B, 1) tensors, so one batch may mix requests."""

    all_greedy: bool
    greedy: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor | None  # None when no row uses a repetition penalty
    any_top_p: bool  # known on the host, so a step without nucleus rows does no device sync for it

    @classmethod
    def from_params(cls, params: list[SamplingParams], device) -> SamplingTensors:
        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        use_penalty = any(p.repetition_penalty != 1 for p in params)
        return cls(all_greedy=all(p.greedy for p in params),
                   greedy=column([p.greedy for p in params], torch.bool)[:, 0],
                   temperature=column([p.temperature if not p.greedy else 1.0 for p in params], torch.float32),
                   top_k=column([p.top_k for p in params], torch.long)[:, 0],
                   top_p=column([p.top_p for p in params], torch.float32),
                   penalty=column([p.repetition_penalty for p in params], torch.float32) if use_penalty else None,
                   any_top_p=any(p.top_p < 1 for p in params))


def sample_tokens(logits: torch.Tensor, sampling: SamplingTensors, generators: list[torch.Generator | None],
                  seen: torch.Tensor | None) -> torch.Tensor:
    """One token id per row from float32 logits (B, V)."""
    if sampling.penalty is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.penalty)
    greedy_tokens = logits.argmax(dim=-1)
    if sampling.all_greedy:
        return greedy_tokens
    logits = filter_top_k(logits / sampling.temperature, sampling.top_k)
    if sampling.any_top_p:
        logits = filter_top_p(logits, sampling.top_p)
    probs = logits.softmax(dim=-1)
    race = torch.ones_like(probs)
    for i, generator in enumerate(generators):
        if generator is not None:
            race[i].exponential_(generator=generator)
    sampled = (probs / race).argmax(dim=-1)
    return torch.where(sampling.greedy, greedy_tokens, sampled)

