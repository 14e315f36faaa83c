"""What the route functions of `gptlab serve` share: the configuration, the server state (engine,
scheduler, tokenizer, served names, limits), the OpenAI-shaped error, and the checks every generating
request goes through (model name, API key, limits, sampling settings, queue admission).

Design decisions
- Route functions (routes.py) take the parsed request and a `ServerState` and return a response or raise
  `ApiError`; nothing here depends on HTTP, so the routes can be called directly in tests. app.py turns
  `ApiError` into the OpenAI error JSON.
- Served names follow vLLM's `--served-model-name`: a request may name the model by any of them, and
  responses carry the first (`ServeConfig.model_name`). An unknown name is a 404 that lists them.
- Sampling settings a request leaves out come from the model's generation_config.json, else the endpoint's
  defaults (`infer.generation_config.resolve_sampling`, shared with `gptlab chat` and `gptlab sample`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ..common import GptlabError
from ..infer.engine import Engine
from ..infer.sampling import SamplingParams
from ..infer.generation_config import (BASE_DEFAULTS, CHAT_DEFAULTS, SAMPLING_KEYS, ResolvedSampling,
                                        resolve_sampling)
from . import protocol as p
from .scheduler import QueueFull, Request, Scheduler, SchedulerStopped


@dataclass
class ServeConfig:
    model_name: str  # the model id responses carry (the first --served-model-name)
    aliases: tuple[str, ...] = ()  # further names a request may use for the model
    api_key: str | None = None
    max_batch: int = 32  # rows decoded together (a request with n choices takes n)
    max_queue: int = 256  # requests waiting for a batch slot before new ones get 429
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int | None = None  # largest max_tokens accepted (None: the context window)
    prefill_chunk_tokens: int | None = 128  # prompt tokens prefilled per step while rows decode (None: all)
    poll_disconnect_s: float = 0.25  # how often a non-streaming handler checks that its client is still there
    rag_index: str | None = None  # a `gptlab rag index` directory: /v1/embeddings and chat "rag" (serve/rag.py)
    embedder: str | None = None  # /v1/embeddings without an index: a sentence-transformers folder or name
    # the model's generation_config.json sampling settings (`read_generation_config`), defaults for requests
    generation_config: dict[str, Any] = field(default_factory=dict)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ServerState:
    """The engine and its decode scheduler, the served names and the limits of one server."""

    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer
        self.window = engine.window
        self.max_tokens_limit = config.max_tokens_limit or engine.window
        self.names = (config.model_name, *config.aliases)
        self.created = int(time.time())
        self.retrieval = None  # serve/rag.py's Retrieval when config.rag_index or config.embedder is set
        self.scheduler = Scheduler(engine, max_batch=config.max_batch, max_queue=config.max_queue,
                                   prefill_chunk_tokens=config.prefill_chunk_tokens)

    def check_api_key(self, authorization: str | None) -> None:
        """`authorization` is the request's Authorization header (None when absent)."""
        if self.config.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                    self.config.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", None, "invalid_api_key")

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise ApiError(404, f"model {name!r} does not exist; this server serves "
                           f"{', '.join(map(repr, self.names))}", "invalid_request_error", "model", "model_not_found")

    def sampling_defaults(self, chat: bool) -> ResolvedSampling:
        """The settings a request that gives none samples with (for the start-up log)."""
        return resolve_sampling({}, self.config.generation_config, CHAT_DEFAULTS if chat else BASE_DEFAULTS)

    def sampling(self, body: p._Sampling, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        """SamplingParams of a request whose prompt has `prompt_len` tokens, after checking its lengths
        against the limit and the context window (None max_tokens: as many as fit)."""
        window, limit = self.window, self.max_tokens_limit
        chat = isinstance(body, p.ChatCompletionRequest)
        if max_tokens is not None and max_tokens > limit:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {limit}",
                           param="max_tokens", code="invalid_value")
        if prompt_len >= window:
            raise ApiError(400, f"prompt of {prompt_len} tokens does not fit the context window of {window} tokens",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(window - prompt_len, limit)
        if prompt_len + max_tokens > window:
            raise ApiError(400, f"the context window is {window} tokens, but {prompt_len} prompt tokens + "
                           f"{max_tokens} max_tokens were requested; lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        settings = resolve_sampling({key: getattr(body, key) for key in SAMPLING_KEYS},
                                    self.config.generation_config, CHAT_DEFAULTS if chat else BASE_DEFAULTS,
                                    explicit_source="request")
        try:
            return SamplingParams(max_new_tokens=max(max_tokens, 1), **settings.values, stop=body.stop_list,
                                  seed=body.seed)
        except GptlabError as e:
            raise ApiError(400, str(e)) from None

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int, top_logprobs: int | None) -> Request:
        request = Request(prompt_ids, params, n, top_logprobs)
        try:
            self.scheduler.submit(request)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", None, "queue_full") from None
        except SchedulerStopped as e:
            raise ApiError(503, str(e), "server_error", None, "shutting_down") from None
        except ValueError as e:
            raise ApiError(400, str(e), param="n") from None
        return request
