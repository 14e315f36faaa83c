"""`gptlab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (streaming as
server-sent events, or not), `POST /v1/embeddings` and retrieval in chat with `--rag-index` (rag.py),
`GET /health`, `GET /metrics` (Prometheus text format, metrics.py), the web chat page at `/`, and the
OpenAPI document at
`/openapi.json` (`/docs` renders it when the browser can reach the Swagger UI assets online).

Design decisions
- The routes are plain functions of (parsed request, `ServerState`) in routes.py, their shared state and
  checks in state.py; this module only wires them into FastAPI, maps errors to the OpenAI shape and
  runs uvicorn.
- The event loop never runs the model: handlers validate, tokenize (in the thread pool: a long prompt is
  real CPU work) and hand a `Request` to the `Scheduler`, whose single decode thread batches every
  running request (see scheduler.py). Streams are async generators fed by that thread.
- Errors use the OpenAI shape `{"error": {"message", "type", "param", "code"}}` so clients raise their
  usual exceptions: 400 for invalid input (FastAPI's default 422 is mapped to 400, with `param` naming the
  field), 401 for a missing/wrong API key, 404 for an unknown model (naming the served ones), 413 for an
  oversized body, 429 when the waiting queue is full (with `Retry-After`, as RFC 9110 suggests for a
  server that is overloaded: clients such as the openai package wait that long before retrying), 503
  while shutting down.
- Limits are explicit and checked before any model work: body size (bytes, checked while reading, so a
  huge body is refused without being buffered), `max_tokens` (a request above the limit is refused, not
  silently clamped) and the context window (prompt + max_tokens must fit, as in the OpenAI API).
- A client that disconnects cancels its request: for streams Starlette cancels the response generator
  (ASGI < 2.4 listens for `http.disconnect`), whose `finally` marks the request cancelled; non-streaming
  handlers poll for the disconnect while they wait. The decode thread drops cancelled rows before its
  next step, so an abandoned request stops costing compute within one step.
- Shutdown (SIGTERM/SIGINT): uvicorn stops accepting connections and lets in-flight requests finish for
  up to `--shutdown-timeout` seconds. Just before that grace period ends `run_server` stops the decode
  thread, which ends every request still running with an error event (streams) or a 503, so each
  response is closed by our code rather than by uvicorn cancelling its task mid-write.
- Tool calls (OpenAI function calling) are converted to and from the chat format's tool-call blocks
  in tools/calls.py; with tools, decoding also stops at `<|tool_call_end|>` and the call is returned as
  `message.tool_calls` (streaming: one `delta.tool_calls` chunk) with finish_reason "tool_calls".
- The API key is compared with `secrets.compare_digest` (constant time); `/health`, `/metrics` and the page
  itself stay open so load balancers and browsers can reach them, the page sends the key the user types.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..common import get_logger
from ..infer.engine import Engine
from . import protocol as p
from . import rag, routes
from .metrics import CONTENT_TYPE_LATEST, MetricsMiddleware, ServerMetrics
from .scheduler import Scheduler
from .state import ApiError, ServeConfig, ServerState, error_body

__all__ = ["ServeConfig", "create_app", "run_server"]

log = get_logger("serve")
STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = 1  # what a 429 asks the client to wait: a queue slot frees within a few decode steps


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes (413) and bodies that are not UTF-8
    (400), before the app reads them. The body is counted as it arrives, so a client that lies in (or
    omits) Content-Length is still cut off."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, 413,
                                      f"request body of {int(declared)} bytes exceeds the limit of {self.limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send, 413, f"request body exceeds the limit of {self.limit} bytes")
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await self._refuse(send, 400, f"request body is not valid UTF-8 (byte {e.start})")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for http.disconnect, as the app expects

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, status: int, message: str):
        payload = json.dumps(error_body(message, "invalid_request_error")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def _api_error(_, e: ApiError):
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=headers)


async def _validation_error(_, e: RequestValidationError):
    """FastAPI's 422 as OpenAI's 400, with `param` naming the field."""
    first = e.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body("request body is not valid JSON", "invalid_request_error",
                                       None, "invalid_json"), status_code=400)
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return JSONResponse(error_body(f"{param}: {message}" if param else message, "invalid_request_error",
                                   param, "invalid_value"), status_code=400)


async def _http_error(_, e: StarletteHTTPException):
    return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The FastAPI app: `routes`' functions behind their paths, sharing one `ServerState`."""
    state = ServerState(engine, config)
    if config.rag_index or config.embedder:
        state.retrieval = rag.Retrieval(config.rag_index, config.embedder)
    metrics = ServerMetrics(state.scheduler, config.max_batch, config.max_queue)
    state.scheduler.on_request_done = metrics.request_done

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.scheduler.start()
        log.info("serving %s (context %d, batch %d, queue %d)", ", ".join(state.names), state.window,
                 config.max_batch, config.max_queue)
        for endpoint, chat in (("chat", True), ("completions", False)):
            log.info("%s requests that leave them out sample with %s", endpoint,
                     state.sampling_defaults(chat).describe())
        yield
        await run_in_threadpool(state.scheduler.stop)
        log.info("decode loop stopped")

    app = FastAPI(title="gptlab", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for a gptlab model, with continuous batching.")
    app.state.scheduler = state.scheduler
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: BodyLimit's refusals count too
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    async def require_key(http: HttpRequest) -> None:
        state.check_api_key(http.headers.get("authorization"))

    errors = {status: {"model": p.ErrorResponse} for status in (400, 401, 404, 429)}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        return routes.health(state)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=p.ModelList, dependencies=[Depends(require_key)])
    async def models():
        return routes.list_models(state)

    @app.post("/v1/chat/completions", response_model=p.ChatCompletion, dependencies=[Depends(require_key)],
              responses=errors)
    async def chat_completions(body: p.ChatCompletionRequest, http: HttpRequest):
        options = rag.rag_options(body.rag)
        if options is None:
            return await routes.chat_completions(body, state, http.is_disconnected)
        state.check_model(body.model)
        body, sources = await rag.ground(body, state, options)
        if not sources:
            return rag.dont_know(body, state, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))
        return rag.attach_sources(await routes.chat_completions(body, state, http.is_disconnected), sources)

    @app.post("/v1/embeddings", dependencies=[Depends(require_key)], responses=errors)
    async def embeddings(body: rag.EmbeddingRequest):
        return await rag.embeddings(body, state)

    @app.post("/v1/completions", response_model=p.Completion, dependencies=[Depends(require_key)],
              responses=errors)
    async def completions(body: p.CompletionRequest, http: HttpRequest):
        return await routes.completions(body, state, http.is_disconnected)

    return app


def run_server(app: FastAPI, host: str, port: int, *, shutdown_timeout: float = 10.0,
               log_level: str = "info") -> None:
    """Serve `app` with uvicorn until SIGTERM/SIGINT. On the signal uvicorn stops accepting connections
    and waits for in-flight requests; shortly before its grace period ends we stop the decode loop, so
    requests still running end with an error event (streams) or a 503, instead of uvicorn cancelling
    their tasks mid-write."""
    import uvicorn

    scheduler: Scheduler = app.state.scheduler

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                timer = threading.Timer(max(0.0, shutdown_timeout - 0.5), scheduler.stop)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=shutdown_timeout)
    DrainingServer(config).run()
