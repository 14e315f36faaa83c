"""Chat rollouts: a model writes assistant turns for rendered chat prompts, with tool calls run in line.

Evaluation (greedy) and reinforcement learning (sampled) both go through `generate_chat`, so the two see
exactly the same conversation layout that `chat.render` trains on.

Design decisions
- Decoding stops at `<|tool_call_end|>`; the call runs through the `Toolbox` given (by default the
  calculator, the tool the tasks train; `Toolbox.call_written`: never raises) and the output block `<|tool_output_start|> output <|tool_output_end|>` is appended before decoding continues,
  at most `max_tool_calls` times per turn (after that `<|tool_call_end|>` is an ordinary token).
  `max_new_tokens` bounds each stretch of decoding between tool calls; after a tool call it shrinks to
  what is left of the context window, so the conversation is never cut from the left. A tool output
  that would not fit in the window ends the turn there (unfinished) instead of overflowing it.
- A `Turn` records which tokens the model sampled (`generated` = 1) and which the environment inserted
  (the tool-output blocks, 0): the same split as `chat.render`'s loss mask, which RL needs to put policy
  gradient, KL and entropy on the model's own actions only. The closing `<|assistant_end|>` (or
  `<|endoftext|>`) is kept in `ids` when the model wrote it: choosing to stop is an action too.
- Sampling seeds are per prompt: the engine seeds row r of a call with `seed + r`, and a turn is decoded
  in several calls whose rows are the prompts still pending, so each call passes `seed - r` back; a
  prompt's samples then depend only on its own seed and the round, never on its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .engine import Engine
from .sampling import SamplingParams
from ..tools import Toolbox
from ..tools.calculator import calculator

MAX_TOOL_CALLS = 3
_ROUND_SEED_STRIDE = 1_000_003  # seeds of successive decoding rounds of one prompt, far apart


@dataclass
class Turn:
    """One generated assistant turn (what follows the prompt)."""

    ids: list[int]  # sampled tokens and inserted tool-output blocks, in order; the end token if written
    generated: list[int]  # 1 where the model sampled the token, 0 where the tool inserted it
    finished: bool  # closed by an end token; False when cut by the token budget or the context window

    @property
    def body(self) -> list[int]:
        """`ids` without the closing end token."""
        return self.ids[:-1] if self.finished else list(self.ids)


def generate_chat(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  max_tool_calls: int = MAX_TOOL_CALLS, *, temperature: float = 0.0, top_k: int = 0,
                  seeds: Sequence[int] | None = None, toolbox: Toolbox | None = None) -> list[Turn]:
    """Assistant turns for rendered chat prompts (token ids ending where the assistant writes next),
    greedy by default or sampled at `temperature` / `top_k` with one seed per prompt; tool calls run
    through `toolbox` (default: the calculator alone)."""
    toolbox = toolbox if toolbox is not None else Toolbox([calculator])
    tok = engine.tokenizer
    special = tok.special_tokens
    call_start, call_end = special.get("<|tool_call_start|>"), special.get("<|tool_call_end|>")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    turns = [Turn([], [], False) for _ in prompts]
    pending = list(range(len(prompts)))
    for round_ in range(max_tool_calls + 1):
        if not pending:
            break
        can_call = call_end is not None and round_ < max_tool_calls
        stops = tuple(engine.default_stop_ids | ({call_end} if can_call else set()))
        params = []
        for position, i in enumerate(pending):
            room = engine.window - len(prompts[i]) - len(turns[i].ids)
            seed = None if seeds is None else seeds[i] + round_ * _ROUND_SEED_STRIDE - position
            params.append(SamplingParams(max_new_tokens=max_new_tokens if not round_ else min(max_new_tokens, room),
                                         temperature=temperature, top_k=top_k, stop_token_ids=stops, seed=seed))
        completions = engine.generate([list(prompts[i]) + turns[i].ids for i in pending], params)
        called = []
        for i, completion in zip(pending, completions):
            turn = turns[i]
            turn.ids += completion.token_ids
            turn.generated += [1] * len(completion.token_ids)
            if completion.finish_reason != "stop" or not isinstance(completion.stop, int):
                continue  # cut by the budget or the window
            turn.ids.append(completion.stop)
            turn.generated.append(1)
            if completion.stop != call_end:
                turn.finished = True
                continue
            opened = max((j for j, t in enumerate(turn.ids) if t == call_start), default=-1)
            output = toolbox.call_written(tok.decode(turn.ids[opened + 1:-1])).output
            block = [special["<|tool_output_start|>"], *tok.encode(output), special["<|tool_output_end|>"]]
            # decoding continues only with at least one free position after the block
            if len(prompts[i]) + len(turn.ids) + len(block) < engine.window:
                turn.ids += block
                turn.generated += [0] * len(block)
                called.append(i)
        pending = called
    return turns
