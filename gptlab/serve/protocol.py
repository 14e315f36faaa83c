"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Design decisions
- Field names, defaults and ranges follow the OpenAI API reference, so the official clients (and the eval
  harnesses built on them) work unchanged: chat `max_tokens` defaults to "as much as fits", legacy
  completions default to 16; `stop` is a string or up to 4 strings; `n` choices per request.
- Unknown fields are ignored (clients send fields like `user`, `store` or `parallel_tool_calls` that change
  nothing here), but fields that ask for a feature we cannot honour (`logit_bias`, penalties other than 0,
  ...) are rejected with a 400 naming the field: silently ignoring them would return answers that look
  right and are not. Tools: see gptlab/tools/calls.py.
- `response_format` (json_object, json_schema) is honoured by constrained decoding in both endpoints
  (legacy completions accept it too, an extension): see routes.py.
- Two extensions, spelled as in vLLM so `extra_body={"top_k": 40}` works: `top_k` and
  `repetition_penalty`.
- The sampling settings (temperature, top_p, top_k, repetition_penalty) default to None, "not given": the
  server then takes the model's generation_config.json value, else its own default for the endpoint
  (`infer.generation_config`: temperature 0.8 and top_p 0.95 for chat, 1 and 1 for completions).
- Response models exist for the OpenAPI document (`/docs`); the handlers build the same shapes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class _Sampling(BaseModel):
    """Fields shared by chat and legacy completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, ge=0, le=2)  # None: the model's default (see the docstring)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream_options: dict[str, Any] | None = None
    top_k: int | None = Field(None, ge=0)  # extension (vLLM spelling)
    repetition_penalty: float | None = Field(None, gt=0)  # extension (vLLM spelling)
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}: routes.py
    response_format: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _check_unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ValueError(f"{name} is not supported (use repetition_penalty)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # a string, or OpenAI content parts of which only {"type": "text"} is supported
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant: OpenAI shape {"id", "type", "function"}
    tool_call_id: str | None = None  # tool: the call this message answers
    name: str | None = None

    def text(self) -> str | None:
        if not isinstance(self.content, list):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported (text only)")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer OpenAI name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    rag: bool | dict[str, Any] | None = None  # retrieval with `serve --rag-index` (serve/rag.py)

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    # a string, a list of strings, token ids, or a list of token-id lists (as in the OpenAI API)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)  # 0 with echo + logprobs: score the prompt only (eval harnesses)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _check_completion(self):
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 only makes sense with echo=true (scoring the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


# ---- responses (documentation of the shapes the handlers return) ------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI convention)


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptlab"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
