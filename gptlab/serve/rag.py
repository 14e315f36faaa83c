"""Retrieval in the server (`gptlab serve --rag-index DIR`): OpenAI's `POST /v1/embeddings`, and grounded
chat completions for requests that ask for them.

    client.embeddings.create(model="all-minilm-l6-v2", input=["a text", "another"])
    client.chat.completions.create(model=..., messages=[{"role": "user", "content": "Who ...?"}],
                                   extra_body={"rag": {"k": 4}})   # or {"rag": true}
    # -> the answer cites [1] [2]; response.model_extra["rag_sources"] lists them

Design decisions
- The embedder is the index's own (the one recorded in its rag.json), or `--embedder` without an index:
  `/v1/embeddings` must return vectors comparable with what the index holds. A request may name it by its
  registry name or by the served model's name; `input` is a string or a list of strings (token-id input,
  which OpenAI also accepts, needs the embedder's tokenizer on the client side: refused with a 400).
  `encoding_format` "float" or "base64" (little-endian float32, what the openai client decodes);
  `dimensions` other than the model's own is refused (MiniLM cannot shorten its vectors).
- Asking for retrieval is a request field, spelled like vLLM's extensions so the openai client sends it
  with `extra_body`: `"rag": true` or `{"k", "retriever", "source", "min_similarity"}`. The query is the
  last user message. The server then does exactly what `gptlab rag ask` does (apps/rag/answer.py): the
  last user message is replaced by the instructions, the numbered sources that fit the context window
  (token-budgeted with the served model's tokenizer) and the question; earlier messages (a system prompt,
  the conversation) are kept. When no chunk passes the relevance gate, the reply is the "I don't know"
  sentence without calling the model (finish_reason "stop", 0 completion tokens), as in `rag ask`.
- The sources travel in the response as an extra field `rag_sources` ([{number, id, file, title, start,
  end, score, similarity}]): in the JSON body, and in streaming as one extra chunk with no choices right
  after the first (OpenAI clients accept choice-less chunks: the usage chunk is one).
- Retrieval and embedding run in the thread pool: they are CPU work (MiniLM, BM25) that must not block
  the event loop, and they do not touch the decode thread.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, StreamingResponse

from ..apps.rag.answer import DONT_KNOW, INSTRUCTIONS, MIN_SIMILARITY, build_messages
from ..apps.rag.embedders import Embedder, open_embedder
from ..apps.rag.store import RETRIEVERS, RagIndex
from ..common import GptlabError
from .state import ApiError, ServerState

MAX_EMBED_INPUTS = 2048  # OpenAI's own limit on inputs per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class RagOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(4, ge=1, le=50)
    retriever: Literal["bm25", "vector", "hybrid"] = "hybrid"
    source: str | None = None
    min_similarity: float = MIN_SIMILARITY


assert set(RagOptions.model_fields["retriever"].annotation.__args__) == set(RETRIEVERS)


class Retrieval:
    """The server's index and/or embedder (created once at start-up)."""

    def __init__(self, index_dir: str | None, embedder: str | None):
        if index_dir is None and embedder is None:
            raise GptlabError("retrieval needs --rag-index DIR or --embedder NAME")
        self.index = RagIndex(index_dir) if index_dir else None
        if self.index is not None:
            if embedder is not None and embedder != self.index.meta["embedder"]:
                raise GptlabError(f"--embedder {embedder} differs from the index's embedder "
                                  f"{self.index.meta['embedder']}; leave --embedder out")
            self.embedder: Embedder = self.index.embedder
        else:
            self.embedder = open_embedder(embedder)
        self.names = {self.embedder.name, Path(self.embedder.name).name}


class _Counter:
    """The few LLM methods `build_messages` needs, answered by the served model's tokenizer."""

    def __init__(self, state: ServerState):
        self.context_window = state.window
        self.tokenizer = state.tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))


def _retrieval(state: ServerState) -> Retrieval:
    if state.retrieval is None:
        raise ApiError(404, "this server has no embedder: start it with --rag-index DIR or --embedder NAME",
                       code="not_found")
    return state.retrieval


async def embeddings(body: EmbeddingRequest, state: ServerState) -> dict:
    retrieval = _retrieval(state)
    if body.model not in retrieval.names and body.model not in state.names:
        raise ApiError(404, f"embedding model {body.model!r} does not exist; this server embeds with "
                       f"{retrieval.embedder.name!r}", param="model", code="model_not_found")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "input must be a non-empty string or list of strings (token-id input is not "
                       "supported: this server tokenizes with the embedder's own tokenizer)", param="input")
    if len(texts) > MAX_EMBED_INPUTS:
        raise ApiError(400, f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(texts)}", param="input")
    if any(not t for t in texts):
        raise ApiError(400, "input strings must not be empty", param="input")
    if body.dimensions is not None and body.dimensions != retrieval.embedder.dim:
        raise ApiError(400, f"dimensions {body.dimensions} is not supported: {retrieval.embedder.name} gives "
                       f"{retrieval.embedder.dim}", param="dimensions")
    vectors = await run_in_threadpool(retrieval.embedder.embed, texts)
    tokens = sum(retrieval.embedder.count_tokens(t) for t in texts)

    def encode(vector: np.ndarray):
        if body.encoding_format == "base64":
            return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
        return [float(x) for x in vector]

    return {"object": "list", "model": retrieval.embedder.name,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def rag_options(raw: Any) -> RagOptions | None:
    """The request's `rag` field: absent/false -> None, true -> defaults, an object -> checked options."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return RagOptions()
    if not isinstance(raw, dict):
        raise ApiError(400, "rag must be true or an object {k, retriever, source, min_similarity}", param="rag")
    try:
        return RagOptions(**raw)
    except ValueError as e:
        raise ApiError(400, f"rag: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}", param="rag") from None


async def ground(body, state: ServerState, options: RagOptions) -> tuple[Any, list[dict]]:
    """(the chat request with its last user message replaced by the sourced prompt, the sources); sources
    == [] means nothing relevant was found and the caller answers DONT_KNOW."""
    retrieval = _retrieval(state)
    if retrieval.index is None:
        raise ApiError(400, "this server has an embedder but no index: start it with --rag-index DIR", param="rag")
    last = max((i for i, m in enumerate(body.messages) if m.role == "user"), default=None)
    question = body.messages[last].text() if last is not None else None
    if not (question or "").strip():
        raise ApiError(400, "rag needs a user message with text to use as the query", param="messages")
    try:
        hits = await run_in_threadpool(retrieval.index.search, question, options.k, options.retriever,
                                       options.source)
    except GptlabError as e:
        raise ApiError(400, str(e), param="rag") from None
    if not hits or max(hit.similarity for hit in hits) < options.min_similarity:
        return body, []
    budget = body.max_new_tokens or max(state.window // 4, 1)
    try:
        grounded, used = build_messages(_Counter(state), question, hits, INSTRUCTIONS, budget)
    except GptlabError as e:
        raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
    messages = list(body.messages)
    messages[last] = type(messages[last])(role="user", content=grounded[0]["content"])
    sources = [{"number": n, **{key: value for key, value in asdict(hit).items() if key != "text"}}
               for n, hit in enumerate(used, 1)]
    return body.model_copy(update={"messages": messages}), sources


def dont_know(body, state: ServerState, rid: str, now: int):
    """The reply when retrieval finds nothing relevant: no model call."""
    message = {"role": "assistant", "content": DONT_KNOW}
    if not body.stream:
        return JSONResponse({"id": rid, "object": "chat.completion", "created": now,
                             "model": state.config.model_name,
                             "choices": [{"index": i, "message": message, "logprobs": None, "finish_reason": "stop"}
                                         for i in range(body.n)],
                             "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                             "rag_sources": []})

    def chunk(delta: dict, finish: str | None) -> str:
        data = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": state.config.model_name,
                "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
                            for i in range(body.n)], "rag_sources": []}
        return f"data: {json.dumps(data)}\n\n"

    async def events():
        yield chunk(message, None)
        yield chunk({}, "stop")
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def attach_sources(response, sources: list[dict]):
    """Add `rag_sources` to a chat response: a key of the JSON body, or a choice-less chunk after the
    first event of a stream."""
    if isinstance(response, dict):  # a JSONResponse: the route's response_model would drop the extra field
        return JSONResponse({**response, "rag_sources": sources})

    async def events():
        sent = False
        async for event in response.body_iterator:
            yield event
            text = event if isinstance(event, str) else event.decode()
            if not sent and text.startswith("data: {"):
                first = json.loads(text[len("data: "):])
                extra = {key: first[key] for key in ("id", "object", "created", "model")}
                yield f"data: {json.dumps({**extra, 'choices': [], 'rag_sources': sources})}\n\n"
                sent = True

    return StreamingResponse(events(), media_type=response.media_type)
