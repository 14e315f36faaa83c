"""The HTTP backend of the application layer's LLM: any OpenAI-compatible endpoint (`gptlab serve`, vLLM,
llama.cpp's server, OpenAI) through the official `openai` client. Design decisions (token counts, scoring by
echo + logprobs, errors and retries, structured output, tool calls): apps/llm.py's docstring."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from ..common import GptlabError, get_logger, read_json
from .llm_base import (LLM, ContextOverflow, Generation, Messages, SamplingOptions, _check_continuations, _fits,
                       _streaming_options)

log = get_logger("llm")


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
        if getattr(e, "code", None) == "context_length_exceeded":  # a caller may shorten the prompt and retry
            return ContextOverflow(f"{self.base_url} rejected the request ({e.status_code}): {message}")
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
