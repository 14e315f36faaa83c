"""The application layer's LLM interface, shared by both backends (apps/llm.py: in process and opening;
apps/llm_http.py: any OpenAI-compatible endpoint): the Generation record, the sampling options every
generating call takes (checked once, the same way for both), and the abstract LLM. The design decisions are
in apps/llm.py's docstring."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..common import GptlabError

if TYPE_CHECKING:  # imported where used: an HTTP client never loads torch
    from ..infer.constraints import Constraint

Messages = list[dict]


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end of turn, stop token or stop string) | "length" | "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    # native tool calls (chat with tools=...), OpenAI's shape: {"id", "type": "function", "function":
    # {"name", "arguments": "<json>"}}; None when the reply is text
    tool_calls: list[dict] | None = None


@dataclass(frozen=True)
class SamplingOptions:
    """The keyword arguments every generating call takes, checked once for both backends."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    constraint: Constraint | None = None  # structured output (module docstring)

    @classmethod
    def of(cls, max_tokens=256, temperature=0.0, top_p=1.0, n=1, stop=None, seed=None, response_format=None,
           constraint=None) -> SamplingOptions:
        from ..infer.constraints import Constraint

        if response_format is not None and constraint is not None:
            raise GptlabError("give response_format or constraint, not both")
        if constraint is not None and not isinstance(constraint, Constraint):
            raise GptlabError(f"constraint must be a gptlab.infer.constraints.Constraint, got {type(constraint).__name__}")
        constraint = constraint or Constraint.from_response_format(response_format)
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        checks = [(isinstance(max_tokens, int) and max_tokens >= 1, f"max_tokens must be an int >= 1, got {max_tokens!r}"),
                  (temperature >= 0, f"temperature must be >= 0, got {temperature}"),
                  (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
                  (isinstance(n, int) and n >= 1, f"n must be an int >= 1, got {n!r}"),
                  (all(isinstance(s, str) and s for s in stop), "stop strings must be non-empty strings")]
        for ok, message in checks:
            if not ok:
                raise GptlabError(message)
        return cls(max_tokens, float(temperature), float(top_p), n, stop, seed, constraint)


class LLM(abc.ABC):
    """A chat/completion model. Generating calls take max_tokens=256, temperature=0.0 (greedy), top_p=1.0,
    n=1, stop=None, seed=None, response_format=None, constraint=None and return n `Generation`s; streaming
    calls need n == 1."""

    name: str  # model name (directory name or served name)
    context_window: int  # tokens (0: unknown, only possible over HTTP)
    supports_logprobs: bool  # False where the endpoint cannot score given text
    exact_token_count: bool  # False where count_tokens is an estimate (HTTP without the tokenizer)
    supports_tools: bool | None = False  # native tool calls: True, False, or None (unknown: HTTP)
    supports_grammar: bool = False  # regex/Lark/choice constraints (not only JSON Schema): in process only

    @abc.abstractmethod
    def chat(self, messages: Messages, **sampling) -> list[Generation]:
        """n assistant replies to an OpenAI-style conversation; `tools=[OpenAI specs]` (where
        supports_tools is not False) lets the reply be a tool call (Generation.tool_calls)."""

    @abc.abstractmethod
    def complete(self, prompt: str, **sampling) -> list[Generation]:
        """n continuations of a raw document (no chat template)."""

    @abc.abstractmethod
    def stream_chat(self, messages: Messages, **sampling) -> Iterator[str]:
        """Text deltas of one assistant reply."""

    @abc.abstractmethod
    def stream_complete(self, prompt: str, **sampling) -> Iterator[str]:
        """Text deltas of one document continuation."""

    @abc.abstractmethod
    def logprobs(self, prompt: str, continuations: list[str]) -> list[float]:
        """sum log p(continuation | prompt) for each continuation (natural log)."""

    @abc.abstractmethod
    def chat_logprobs(self, messages: Messages, continuations: list[str]) -> list[float]:
        """sum log p(continuation | conversation) for each continuation, as the start of the assistant's turn."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as ordinary text (no BOS); an estimate where exact_token_count is False."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, context_window={self.context_window})"


def _streaming_options(sampling: dict) -> SamplingOptions:
    options = SamplingOptions.of(**sampling)
    if options.n != 1:
        raise GptlabError(f"streaming gives one generation; n must be 1, got {options.n}")
    return options


def _check_continuations(continuations) -> list[str]:
    if isinstance(continuations, str) or not continuations:
        raise GptlabError("continuations must be a non-empty list of strings")
    if not all(isinstance(c, str) and c for c in continuations):
        raise GptlabError("every continuation must be a non-empty string")
    return list(continuations)


class ContextOverflow(GptlabError):
    """A prompt longer than the model's context window: callers that can shorten their prompt (fewer
    demonstrations) or skip the question catch this one, not every GptlabError."""


def _fits(name: str, window: int, prompt_tokens: int, max_tokens: int) -> int:
    """max_tokens clamped to the room the prompt leaves; ContextOverflow if the prompt itself does not fit."""
    if prompt_tokens >= window:
        raise ContextOverflow(f"prompt of {prompt_tokens} tokens does not fit the context window of {name} "
                          f"({window} tokens, and at least 1 must stay free for the answer)")
    return min(max_tokens, window - prompt_tokens)
