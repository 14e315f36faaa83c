"""A scripted LLM for the prompting and pipeline tests: it implements gptlab.apps.llm.LLM with a Python
function in place of a model, so the plumbing (prompts sent, votes, retries, caching, tables) is tested
on exactly known replies. Every call is recorded."""

from __future__ import annotations

from collections.abc import Callable

from gptlab.apps.llm import LLM, Generation


def last_user(prompt) -> str:
    """The text a reply function should answer: the last user turn, or the whole document."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


class ScriptedLLM(LLM):
    """`reply(prompt, index, call)` gives the text of choice `index` of the call-th call; `scores(prompt,
    continuation)` the log-probability of a continuation (None: no log-probabilities)."""

    name = "scripted"
    context_window = 4096
    exact_token_count = True

    def __init__(self, reply: Callable[[object, int, int], str], scores: Callable[[object, str], float] | None = None):
        self.reply, self.scores = reply, scores
        self.calls: list[dict] = []

    @property
    def supports_logprobs(self) -> bool:
        return self.scores is not None

    def _generate(self, prompt, n=1, **kw) -> list[Generation]:
        self.calls.append({"prompt": prompt, "n": n, **kw})
        texts = [self.reply(prompt, i, len(self.calls)) for i in range(n)]
        return [Generation(t, "stop", self.count_tokens(str(prompt)), self.count_tokens(t)) for t in texts]

    def chat(self, messages, **kw):
        return self._generate(messages, **kw)

    def complete(self, prompt, **kw):
        return self._generate(prompt, **kw)

    def stream_chat(self, messages, **kw):
        yield self.chat(messages, **kw)[0].text

    def stream_complete(self, prompt, **kw):
        yield self.complete(prompt, **kw)[0].text

    def logprobs(self, prompt, continuations):
        return [self.scores(prompt, c) for c in continuations]

    def chat_logprobs(self, messages, continuations):
        return [self.scores(messages, c) for c in continuations]

    def count_tokens(self, text: str) -> int:
        return len(text.split())
