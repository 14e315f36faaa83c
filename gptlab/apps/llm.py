"""One LLM interface for the application layer, over two backends: gptlab's engine in this process, or any
OpenAI-compatible HTTP endpoint (`gptlab serve`, vLLM, llama.cpp's server, OpenAI) through the official
`openai` client.

    llm = open_llm("smollm2-135m-instruct")                  # registry name, model directory ...
    llm = open_llm(base_url="http://127.0.0.1:8000")         # ... or a server
    llm.chat([{"role": "user", "content": "Hi"}], max_tokens=32)[0].text

Design decisions
- Same model, same answers: the in-process backend renders chat prompts with `chat.render_for_completion`
  and text prompts with `Engine.encode` (leading `<|endoftext|>`), exactly as `gptlab serve` does, and
  seeds choice i with seed + i as the server does; so greedy output (and seeded sampling) is equal
  through both backends (tested against a real `gptlab serve` subprocess).
- Context window: a prompt that does not fit (prompt tokens >= window) is a GptlabError naming both
  numbers; `max_tokens` is clamped to what is left after the prompt (the generation then ends with
  finish_reason "length"), so a caller never has to budget output tokens exactly. Over HTTP the prompt is
  measured, and max_tokens clamped, only when the client knows the model's tokenizer (see below);
  otherwise the server's own limit applies and its 400 becomes the GptlabError.
- The HTTP client knows the model's tokenizer when given its directory (`open_llm(model=DIR_OR_NAME,
  base_url=URL)`: "the server at URL serves this model"). Then `count_tokens` is exact and scoring sends
  token ids, which is exact parity with the engine. Without it, `count_tokens` is an ESTIMATE,
  ceil(UTF-8 bytes / 4) (OpenAI's rule of thumb for English BPE), flagged by `exact_token_count=False`.
- Log-likelihood of given text over HTTP: `/v1/completions` with `echo=True, logprobs=0, max_tokens=0`
  (retried once with max_tokens=1 for servers that refuse 0; the generated token is then ignored), the
  scheme lm-evaluation-harness uses. With token ids the continuation's tokens are the last ones; with text
  (no tokenizer known) they are found by `text_offset`, and a token that straddles the prompt/continuation
  boundary counts for the continuation (it is the only probability covering that text). Servers without
  echo+logprobs (OpenAI's current models) make `supports_logprobs` False and `logprobs()` raise.
  `chat_logprobs` needs the chat template, so over HTTP it needs the tokenizer too.
- Errors: an unreachable endpoint, a refused API key (401), an unknown model (404, listing the served
  names), a context overflow and any other 4xx are one-line GptlabErrors. 429 and 5xx are retried with
  exponential backoff by the openai client itself (`max_retries`, default 3).
- Structured output: every generating call takes `response_format=` (OpenAI's: {"type": "json_object"} or
  {"type": "json_schema", "json_schema": {"schema": ...}}) or `constraint=` (an infer.constraints
  Constraint: also regex, Lark grammar, choices). In process the engine enforces it (constrained
  decoding). Over HTTP a JSON constraint is sent as the request's `response_format` (through the openai
  client's extra_body, so /v1/completions carries it too; vLLM and OpenAI honour it, `gptlab serve` will);
  regex/grammar/choice constraints have no OpenAI form and are refused with a GptlabError. Either way,
  `apps.structured.parse_json` reads the reply defensively.
- Native tool calls: `chat(messages, tools=[OpenAI tool specs])` returns the model's call in
  `Generation.tool_calls` (finish_reason "tool_calls"). Over HTTP the `tools` list goes in the request as
  OpenAI defines it. In process, gptlab's own chat format has tool-call tokens: the engine decodes exactly
  as `gptlab serve` does (tools/calls.py: the tool list in the system prompt, decoding stops at
  `<|tool_call_end|>`, the call parsed by the same ToolCallParser), so both backends give the same call.
  A model with an imported chat template has no tool tokens: `supports_tools` is False and tools= is a
  GptlabError (callers use a text protocol, apps/agents). Over HTTP `supports_tools` is None (unknown
  until the server answers a request with tools).
- Per-choice completion tokens over HTTP: `usage.completion_tokens` when n == 1; with n > 1 usage only
  has the total, so each choice is counted with `count_tokens` (exact with a known tokenizer).
"""

from __future__ import annotations

import abc
import argparse
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..common import GptlabError, get_logger, read_json

if TYPE_CHECKING:  # imported where used: an HTTP client never loads torch
    from ..infer.constraints import Constraint

log = get_logger("llm")

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


def _fits(name: str, window: int, prompt_tokens: int, max_tokens: int) -> int:
    """max_tokens clamped to the room the prompt leaves; GptlabError if the prompt itself does not fit."""
    if prompt_tokens >= window:
        raise GptlabError(f"prompt of {prompt_tokens} tokens does not fit the context window of {name} "
                          f"({window} tokens, and at least 1 must stay free for the answer)")
    return min(max_tokens, window - prompt_tokens)


# ---- in-process backend ---------------------------------------------------------------------------------
class LocalLLM(LLM):
    """gptlab's engine in this process, on a model directory."""

    supports_logprobs = True
    exact_token_count = True
    supports_grammar = True

    def __init__(self, model_dir: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32",
                 threads: int = 0, name: str | None = None, quantize: str | None = None):
        import torch

        from ..checkpoint import load_for_inference
        from ..common import torch_device
        from ..infer.engine import Engine

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise GptlabError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
        if threads:
            torch.set_num_threads(threads)
        model, tokenizer = load_for_inference(model_dir, device=torch_device(device), dtype=dtypes[dtype],
                                              quantize=quantize)
        self.engine = Engine(model, tokenizer, strict_context=True)
        self.tokenizer = tokenizer
        self.name = name or Path(model_dir).resolve().name
        self.context_window = self.engine.window
        from ..tools.calls import supports_tools

        self.supports_tools = supports_tools(tokenizer)

    def _params(self, options: SamplingOptions, prompt_tokens: int):
        from ..infer.sampling import SamplingParams

        max_new = _fits(self.name, self.context_window, prompt_tokens, options.max_tokens)
        return SamplingParams(max_new_tokens=max_new, temperature=options.temperature, top_p=options.top_p,
                              stop=options.stop, seed=options.seed, constraint=options.constraint)

    def _chat_ids(self, messages: Messages) -> list[int]:
        from ..chat import render_for_completion

        return render_for_completion(self.tokenizer, messages)

    def _generate(self, ids: list[int], options: SamplingOptions) -> list[Generation]:
        completions = self.engine.generate([ids] * options.n, self._params(options, len(ids)))
        return [Generation(c.text, c.finish_reason, c.prompt_tokens, len(c.token_ids)) for c in completions]

    def _stream(self, ids: list[int], options: SamplingOptions) -> Iterator[str]:
        return self.engine.stream(ids, self._params(options, len(ids)))  # checked now, not at the first next()

    def chat(self, messages: Messages, tools: list[dict] | None = None, **sampling) -> list[Generation]:
        options = SamplingOptions.of(**sampling)
        if tools:
            return self._generate_tool_calls(messages, tools, options)
        return self._generate(self._chat_ids(messages), options)

    def _generate_tool_calls(self, messages: Messages, tools: list[dict], options: SamplingOptions) -> list[Generation]:
        """Replies that may be one tool call, decoded as `gptlab serve` decodes them (module docstring)."""
        import dataclasses

        from ..chat import render_for_completion
        from ..tools import calls as tool_format

        if not self.supports_tools:
            raise GptlabError(f"{self.name} has no tool-call tokens in its chat format (an imported chat template); "
                              "use the text protocol")
        try:
            offered = tool_format.parse_tools(tools)
            ids = render_for_completion(self.tokenizer, tool_format.to_chat_messages(messages, offered))
        except tool_format.ToolRequestError as e:
            raise GptlabError(f"tool calling: {e}") from None
        start = self.tokenizer.special_id(tool_format.CALL_START)
        end = self.tokenizer.special_id(tool_format.CALL_END)
        params = dataclasses.replace(self._params(options, len(ids)),
                                     stop_token_ids=tuple(sorted(self.engine.default_stop_ids | {end})))
        names = frozenset(t["name"] for t in offered)
        parsers = [tool_format.ToolCallParser(start, end, names) for _ in range(options.n)]
        texts, calls, finish, counts = [""] * options.n, [None] * options.n, ["stop"] * options.n, [0] * options.n
        for e in self.engine.stream_batch([ids] * options.n, params):
            text, call, reason = parsers[e.row].feed(e.token_id, e.text, e.finish_reason)
            texts[e.row] += text
            counts[e.row] += 1
            if call is not None:
                calls[e.row] = [call]
            if reason:
                finish[e.row] = reason
        return [Generation(texts[i], finish[i], len(ids), counts[i], calls[i]) for i in range(options.n)]

    def complete(self, prompt: str, **sampling) -> list[Generation]:
        return self._generate(self.engine.encode(prompt), SamplingOptions.of(**sampling))

    def stream_chat(self, messages: Messages, **sampling) -> Iterator[str]:
        return self._stream(self._chat_ids(messages), _streaming_options(sampling))

    def stream_complete(self, prompt: str, **sampling) -> Iterator[str]:
        return self._stream(self.engine.encode(prompt), _streaming_options(sampling))

    def _score(self, prompt_ids: list[int], continuations: list[str]) -> list[float]:
        continuations = _check_continuations(continuations)
        scores = self.engine.score([prompt_ids] * len(continuations), continuations)
        return [s.logprob for s in scores]

    def logprobs(self, prompt: str, continuations: list[str]) -> list[float]:
        return self._score(self.engine.encode(prompt), continuations)

    def chat_logprobs(self, messages: Messages, continuations: list[str]) -> list[float]:
        return self._score(self._chat_ids(messages), continuations)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))


# ---- HTTP backend ---------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class HttpLLM(LLM):
    """An OpenAI-compatible endpoint through the `openai` client. `tokenizer_dir`: the served model's
    directory, for exact token counts, client-side context checks, token-id scoring and chat_logprobs."""

    def __init__(self, base_url: str, *, model_name: str | None = None, api_key: str | None = None,
                 tokenizer_dir: str | os.PathLike | None = None, context_window: int | None = None,
                 timeout: float = 120.0, max_retries: int = 3):
        import openai

        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise GptlabError(f"--base-url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        # a bare server address means its OpenAI API under /v1 (gptlab serve, vLLM, llama.cpp all put it there)
        self.base_url = base_url.rstrip("/") + ("/v1" if parts.path in ("", "/") else "")
        self._openai = openai
        # local servers ignore the key but the client insists on one
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                    timeout=timeout, max_retries=max_retries)
        self.tokenizer, self.tokenizer_dir = None, tokenizer_dir
        if tokenizer_dir is not None:
            from ..checkpoint import load_model_tokenizer

            self.tokenizer = load_model_tokenizer(tokenizer_dir)
        self.exact_token_count = self.tokenizer is not None
        self.served = self._served_models()
        ids = [m["id"] for m in self.served]
        if model_name is None:
            if len(ids) != 1:
                raise GptlabError(f"{self.base_url} serves {len(ids)} models ({', '.join(ids) or 'none listed'}); "
                                  "choose one with --model-name")
            model_name = ids[0]
        elif ids and model_name not in ids:
            raise GptlabError(f"{self.base_url} does not serve model {model_name!r}; it serves: {', '.join(ids)}")
        self.name = model_name
        self.context_window = context_window or self._served_window()
        self._max_tokens_zero_ok = True  # cleared if the server refuses echo scoring with max_tokens=0
        self._supports_logprobs: bool | None = None
        self.supports_tools = None  # known once a request with tools has been answered

    # ---- errors and server facts ----
    def _error(self, e: Exception) -> GptlabError:
        """One-line GptlabError for an openai exception."""
        o = self._openai
        if isinstance(e, o.APIConnectionError):  # includes timeouts
            return GptlabError(f"cannot reach {self.base_url}: {_one_line(e.__cause__ or e)}")
        if not isinstance(e, o.APIStatusError):
            return GptlabError(f"{self.base_url}: {_one_line(e)}")
        body = e.body if isinstance(e.body, dict) else {}
        message = _one_line(body.get("message") or e.message)
        if e.status_code == 401:
            return GptlabError(f"{self.base_url} refused the API key (401): {message}; pass --api-key or set "
                               "OPENAI_API_KEY")
        if e.status_code == 404:
            served = ", ".join(m["id"] for m in getattr(self, "served", [])) or "unknown"
            return GptlabError(f"{self.base_url}: not found (404): {message} (served models: {served})")
        if e.status_code == 429 or e.status_code >= 500:
            return GptlabError(f"{self.base_url} still answers {e.status_code} after "
                               f"{self.client.max_retries} retries: {message}")
        return GptlabError(f"{self.base_url} rejected the request ({e.status_code}): {message}")

    def _call(self, fn, **kwargs):
        try:
            return fn(**kwargs)
        except self._openai.OpenAIError as e:
            raise self._error(e) from None

    def _served_models(self) -> list[dict]:
        """The server's model list; empty for a server without GET /v1/models (then --model-name is needed)."""
        try:
            page = self.client.models.list()
        except self._openai.NotFoundError:
            return []
        except self._openai.OpenAIError as e:
            raise self._error(e) from None
        return [m.model_dump() for m in page.data]

    def _served_window(self) -> int:
        """The context window the server reports (vLLM and gptlab serve: max_model_len; llama.cpp:
        meta.n_ctx_train), else the model directory's, else 0 (unknown)."""
        entry = next(m for m in self.served if m["id"] == self.name) if self.served else {}
        window = entry.get("max_model_len") or (entry.get("meta") or {}).get("n_ctx_train")
        if window:
            return int(window)
        if self.tokenizer_dir is not None:
            return int(read_json(Path(self.tokenizer_dir) / "gptlab.json", "model config")["model"]["max_seq_len"])
        log.warning("%s does not report the context window of %s; context checks are left to the server",
                    self.base_url, self.name)
        return 0

    # ---- generation ----
    def _chat_prompt_tokens(self, messages: Messages) -> int | None:
        if self.tokenizer is None:
            return None
        from ..chat import render_for_completion

        return len(render_for_completion(self.tokenizer, messages))

    def _engine_ids(self, prompt: str) -> list[int]:
        """A text prompt's ids as the engine (and so gptlab serve) makes them: <|endoftext|> + the text."""
        bos = [self.tokenizer.eot_id] if self.tokenizer.eot_id is not None else []
        return bos + self.tokenizer.encode(prompt)

    def _text_prompt_tokens(self, prompt: str) -> int | None:
        return None if self.tokenizer is None else len(self._engine_ids(prompt))

    def _request(self, options: SamplingOptions, prompt_tokens: int | None) -> dict:
        max_tokens = options.max_tokens
        if prompt_tokens is not None and self.context_window:
            max_tokens = _fits(self.name, self.context_window, prompt_tokens, max_tokens)
        request = {"model": self.name, "max_tokens": max_tokens, "temperature": options.temperature,
                   "top_p": options.top_p, "n": options.n}
        if options.stop:
            request["stop"] = list(options.stop)
        if options.seed is not None:
            request["seed"] = options.seed
        if options.constraint is not None:  # extra_body: /v1/completions has no response_format argument
            request["extra_body"] = {"response_format": options.constraint.response_format()}
        return request

    def _generations(self, response, texts: list[str], calls: list | None = None) -> list[Generation]:
        usage = response.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        out = []
        calls = calls or [None] * len(texts)
        for choice, text, call in zip(sorted(response.choices, key=lambda c: c.index), texts, calls):
            finish = {"length": "length", "tool_calls": "tool_calls"}.get(choice.finish_reason, "stop")
            if usage and len(response.choices) == 1:
                completion_tokens = usage.completion_tokens
            else:
                completion_tokens = self.count_tokens(text)
            out.append(Generation(text, finish, prompt_tokens, completion_tokens, call))
        return out

    def chat(self, messages: Messages, tools: list[dict] | None = None, **sampling) -> list[Generation]:
        request = self._request(SamplingOptions.of(**sampling), self._chat_prompt_tokens(messages))
        if tools:
            request["tools"] = tools
        try:
            response = self.client.chat.completions.create(messages=messages, **request)
        except self._openai.BadRequestError as e:  # a server without tool calling refuses them with a 400
            if tools and "tool" in str(e).lower():
                self.supports_tools = False
            raise self._error(e) from None
        except self._openai.OpenAIError as e:
            raise self._error(e) from None
        if tools:
            self.supports_tools = True
        ordered = sorted(response.choices, key=lambda c: c.index)
        calls = [[c.model_dump() for c in choice.message.tool_calls] if choice.message.tool_calls else None
                 for choice in ordered]
        return self._generations(response, [c.message.content or "" for c in ordered], calls)

    def complete(self, prompt: str, **sampling) -> list[Generation]:
        request = self._request(SamplingOptions.of(**sampling), self._text_prompt_tokens(prompt))
        response = self._call(self.client.completions.create, prompt=prompt, **request)
        return self._generations(response, [c.text for c in sorted(response.choices, key=lambda c: c.index)])

    def _stream(self, create, delta_text, **request) -> Iterator[str]:
        stream = self._call(create, stream=True, **request)
        try:
            for chunk in stream:
                text = delta_text(chunk.choices[0]) if chunk.choices else None
                if text:
                    yield text
        except self._openai.OpenAIError as e:
            raise self._error(e) from None
        finally:
            stream.close()

    def stream_chat(self, messages: Messages, **sampling) -> Iterator[str]:
        request = self._request(_streaming_options(sampling), self._chat_prompt_tokens(messages))
        return self._stream(self.client.chat.completions.create, lambda c: c.delta.content,
                            messages=messages, **request)

    def stream_complete(self, prompt: str, **sampling) -> Iterator[str]:
        request = self._request(_streaming_options(sampling), self._text_prompt_tokens(prompt))
        return self._stream(self.client.completions.create, lambda c: c.text, prompt=prompt, **request)

    # ---- scoring ----
    def _echo_logprobs(self, prompts: list) -> list:
        """The legacy logprobs objects of `prompts` echoed with max_tokens 0 (or 1), in prompt order."""
        def ask(max_tokens: int):
            return self.client.completions.create(model=self.name, prompt=prompts, max_tokens=max_tokens,
                                                  echo=True, logprobs=0, temperature=0.0)

        try:
            try:
                response = ask(0 if self._max_tokens_zero_ok else 1)
            except self._openai.BadRequestError as e:
                if not self._max_tokens_zero_ok or "max_tokens" not in str(e):
                    raise
                self._max_tokens_zero_ok = False
                response = ask(1)
        except (self._openai.BadRequestError, self._openai.NotFoundError,
                self._openai.UnprocessableEntityError) as e:
            if getattr(e, "code", None) == "context_length_exceeded":  # the text is too long, not the server unable
                raise self._error(e) from None
            self._supports_logprobs = False
            raise GptlabError(f"{self.base_url} cannot score given text (/v1/completions with echo and logprobs "
                              f"was refused: {_one_line(self._error(e))})") from None
        except self._openai.OpenAIError as e:
            raise self._error(e) from None
        choices = sorted(response.choices, key=lambda c: c.index)
        if len(choices) != len(prompts) or any(c.logprobs is None or not c.logprobs.token_logprobs for c in choices):
            self._supports_logprobs = False
            raise GptlabError(f"{self.base_url} answered an echo+logprobs request without prompt log-probabilities; "
                              "it cannot score given text")
        self._supports_logprobs = True
        return [c.logprobs for c in choices]

    @property
    def supports_logprobs(self) -> bool:
        """Whether the server scores given text; asked once (a one-token echo request), then remembered."""
        if self._supports_logprobs is None:
            try:
                self._echo_logprobs(["Hello"])
            except GptlabError:
                pass
        return bool(self._supports_logprobs)

    def _sum_last(self, logprobs, n_tokens: int, generated: int) -> float:
        values = logprobs.token_logprobs[:len(logprobs.token_logprobs) - generated][-n_tokens:]
        if any(v is None for v in values):
            raise GptlabError("the server gave no log-probability for the first token; give a non-empty prompt")
        return math.fsum(values)

    def _score_ids(self, prompt_ids: list[int], continuations: list[str]) -> list[float]:
        conts = [self.tokenizer.encode(c) for c in continuations]
        results = self._echo_logprobs([prompt_ids + c for c in conts])
        generated = 0 if self._max_tokens_zero_ok else 1
        return [self._sum_last(lp, len(c), generated) for lp, c in zip(results, conts)]

    def logprobs(self, prompt: str, continuations: list[str]) -> list[float]:
        continuations = _check_continuations(continuations)
        if self.tokenizer is not None:
            return self._score_ids(self._engine_ids(prompt), continuations)
        results = self._echo_logprobs([prompt + c for c in continuations])
        scores = []
        for lp, cont in zip(results, continuations):
            end = len(prompt) + len(cont)  # a token generated (max_tokens=1) starts at or after `end`
            picked = [v for v, token, offset in zip(lp.token_logprobs, lp.tokens, lp.text_offset)
                      if offset + len(token) > len(prompt) and offset < end]
            if not picked or any(v is None for v in picked):
                raise GptlabError("the server gave no log-probability for the continuation's first token; "
                                  "give a non-empty prompt")
            scores.append(math.fsum(picked))
        return scores

    def chat_logprobs(self, messages: Messages, continuations: list[str]) -> list[float]:
        continuations = _check_continuations(continuations)
        if self.tokenizer is None:
            raise GptlabError("chat_logprobs over HTTP needs the model's chat template: open the client with the "
                              "model directory too (open_llm(model=DIR, base_url=URL) or --model DIR --base-url URL)")
        from ..chat import render_for_completion

        return self._score_ids(render_for_completion(self.tokenizer, messages), continuations)

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text))
        return math.ceil(len(text.encode("utf-8")) / 4)  # estimate: see the module docstring


# ---- opening ----------------------------------------------------------------------------------------------
def open_llm(model: str | None = None, base_url: str | None = None, model_name: str | None = None,
             api_key: str | None = None, **kw) -> LLM:
    """An LLM on a model directory or registry name (in process), or on an OpenAI-compatible server
    (`base_url`; then `model`, if given, is the served model's directory or registry name, used for its
    tokenizer). Extra keywords go to LocalLLM (device, dtype, threads, quantize) or HttpLLM (tokenizer_dir,
    context_window, timeout, max_retries)."""
    from .models import resolve_model_dir

    if base_url is None:
        if model is None:
            raise GptlabError("give a model (a model directory or a name from `gptlab models list`) or a base URL")
        if api_key is not None:
            raise GptlabError("an API key is for a server (base_url); a local model needs none")
        return LocalLLM(resolve_model_dir(model), name=model_name, **kw)
    if model is not None:
        kw.setdefault("tokenizer_dir", resolve_model_dir(model))
    return HttpLLM(base_url, model_name=model_name, api_key=api_key, **kw)


def add_llm_args(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """The flags that choose an LLM: --model DIR|NAME, or --base-url URL [--model-name] [--api-key].
    `several`: --model takes one or more (a command that compares models opens each with `llm_from_args`)."""
    g = parser.add_argument_group("model (in process with --model, or a server with --base-url)")
    g.add_argument("--model", default=None, nargs="+" if several else None,
                   help="model directory or registry name (`gptlab models list`)" + (" (one or more)" if several else "")
                        + "; with --base-url: the served model's directory, for its tokenizer (exact token counts, "
                          "chat log-probabilities)")
    g.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model-name", default=None, help="model id on the server (default: the only one it serves)")
    g.add_argument("--api-key", default=None, help="API key for --base-url (default: $OPENAI_API_KEY)")
    g.add_argument("--device", default="cpu", help="torch device for --model (default: %(default)s)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads for --model (default: torch's choice)")
    g.add_argument("--quantize", choices=["int8"], default=None, help="quantize --model's weights as they load")


def llm_from_args(args: argparse.Namespace, model: str | None = None) -> LLM:
    """The LLM the flags choose; `model` replaces --model (one of several)."""
    model = args.model if model is None else model
    if args.base_url is not None:
        return open_llm(model, base_url=args.base_url, model_name=args.model_name, api_key=args.api_key)
    return open_llm(model, model_name=args.model_name, device=args.device, threads=args.threads,
                    quantize=getattr(args, "quantize", None))
