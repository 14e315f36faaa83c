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
- Context window: a prompt that does not fit (prompt tokens >= window) is a ContextOverflow (a
  GptlabError callers can catch to shorten the prompt) naming both numbers; `max_tokens` is clamped to what is left after the prompt (the generation then ends with
  finish_reason "length"), so a caller never has to budget output tokens exactly. Over HTTP the prompt is
  measured, and max_tokens clamped, only when the client knows the model's tokenizer (see below);
  otherwise the server's own limit applies and its 400 (code context_length_exceeded) becomes the
  ContextOverflow.
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

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

from ..common import GptlabError
from .llm_base import (LLM, ContextOverflow, Generation, Messages, SamplingOptions, _check_continuations, _fits,
                       _streaming_options)
from .llm_http import HttpLLM

# the interface lives in llm_base and the HTTP backend in llm_http (file size); this module is where users
# import all of it from
__all__ = ["LLM", "ContextOverflow", "Generation", "Messages", "SamplingOptions", "LocalLLM", "HttpLLM", "open_llm",
           "add_llm_args", "llm_from_args"]


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
