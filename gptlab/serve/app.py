"""`gptlab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (streaming as
server-sent events, or not), `GET /health`, the web chat page at `/`, and the OpenAPI document at
`/openapi.json` (`/docs` renders it when the browser can reach the Swagger UI assets online).

Design decisions
- The event loop never runs the model: handlers validate, tokenize (in the thread pool: a long prompt is
  real CPU work) and hand a `Request` to the `Scheduler`, whose single decode thread batches every
  running request (see scheduler.py). Streams are async generators fed by that thread.
- Errors use the OpenAI shape `{"error": {"message", "type", "param", "code"}}` so clients raise their
  usual exceptions: 400 for invalid input (FastAPI's default 422 is mapped to 400, with `param` naming the
  field), 401 for a missing/wrong API key, 404 for an unknown model, 413 for an oversized body, 429 when
  the waiting queue is full, 503 while shutting down.
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
  in tools.py; with tools, decoding also stops at `<|tool_call_end|>` and the call is returned as
  `message.tool_calls` (streaming: one `delta.tool_calls` chunk) with finish_reason "tool_calls".
- The API key is compared with `secrets.compare_digest` (constant time); `/health` and the page itself
  stay open so load balancers and browsers can reach them, the page sends the key the user types.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import render_for_completion
from ..common import GptlabError, get_logger
from ..infer.engine import Engine
from ..infer.sampling import SamplingParams
from . import protocol as p
from . import tools
from .scheduler import QueueFull, Request, Scheduler, SchedulerStopped, TokenLogprob, prompt_logprobs

log = get_logger("serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_batch: int = 32  # rows decoded together (a request with n choices takes n)
    max_queue: int = 256  # requests waiting for a batch slot before new ones get 429
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int | None = None  # largest max_tokens accepted (None: the context window)
    prefill_chunk_tokens: int | None = 128  # prompt tokens prefilled per step while rows decode (None: all)
    poll_disconnect_s: float = 0.25  # how often a non-streaming handler checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


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


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    scheduler = Scheduler(engine, max_batch=config.max_batch, max_queue=config.max_queue,
                          prefill_chunk_tokens=config.prefill_chunk_tokens)
    tokenizer = engine.tokenizer
    window = engine.window
    max_tokens_limit = config.max_tokens_limit or window
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        log.info("serving %s (context %d, batch %d, queue %d)", config.model_name, window, config.max_batch,
                 config.max_queue)
        yield
        await run_in_threadpool(scheduler.stop)
        log.info("decode loop stopped")

    app = FastAPI(title="gptlab", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for a gptlab model, with continuous batching.")
    app.state.scheduler = scheduler
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    # ---- errors ----------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("request body is not valid JSON", "invalid_request_error",
                                           None, "invalid_json"), status_code=400)
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return JSONResponse(error_body(f"{param}: {message}" if param else message, "invalid_request_error",
                                       param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    # ---- shared checks ---------------------------------------------------------------------------------
    async def require_key(http: HttpRequest) -> None:
        if config.api_key is None:
            return
        given = http.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", None, "invalid_api_key")

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {config.model_name!r}",
                           "invalid_request_error", "model", "model_not_found")

    def sampling(body: p._Sampling, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        if max_tokens is not None and max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}",
                           param="max_tokens", code="invalid_value")
        if prompt_len >= window:
            raise ApiError(400, f"prompt of {prompt_len} tokens does not fit the context window of {window} tokens",
                           param="messages" if isinstance(body, p.ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(window - prompt_len, max_tokens_limit)
        if prompt_len + max_tokens > window:
            raise ApiError(400, f"the context window is {window} tokens, but {prompt_len} prompt tokens + "
                           f"{max_tokens} max_tokens were requested; lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        try:
            return SamplingParams(max_new_tokens=max(max_tokens, 1), temperature=body.temperature, top_k=body.top_k,
                                  top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                                  stop=body.stop_list, seed=body.seed)
        except GptlabError as e:
            raise ApiError(400, str(e)) from None

    def submit(prompt_ids: list[int], params: SamplingParams, n: int, top_logprobs: int | None) -> Request:
        request = Request(prompt_ids, params, n, top_logprobs)
        try:
            scheduler.submit(request)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", None, "queue_full") from None
        except SchedulerStopped as e:
            raise ApiError(503, str(e), "server_error", None, "shutting_down") from None
        except ValueError as e:
            raise ApiError(400, str(e), param="n") from None
        return request

    async def wait_all(requests: list[Request], http: HttpRequest) -> list[list[list]]:
        """Collect every event of non-streaming requests; cancel them if the client goes away."""

        async def collect(r: Request):
            return [events async for events in r.events()]

        task = asyncio.gather(*(collect(r) for r in requests))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=config.poll_disconnect_s)
                if done:
                    return task.result()
                if await http.is_disconnected():
                    raise ApiError(499, "client disconnected")
        except (SchedulerStopped, RuntimeError) as e:
            raise ApiError(503 if isinstance(e, SchedulerStopped) else 500, str(e), "server_error") from None
        finally:
            for r in requests:
                r.cancel()
            task.cancel()

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def chat_logprob(info: TokenLogprob) -> dict:
        def entry(token_id, logprob):
            return {"token": token_text(token_id), "logprob": logprob, "bytes": list(tokenizer.id_to_bytes(token_id))}
        return {**entry(info.token_id, info.logprob), "top_logprobs": [entry(t, lp) for t, lp in info.top]}

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(requests: list[Request], chunks, head: list[dict], tail):
        """SSE body: the `head` chunks at once, then `chunks(request_number, events)` for each step's
        events, then `tail()` and [DONE]. A failure mid-stream is sent as an error event (the status
        line is already out)."""
        queue: asyncio.Queue = asyncio.Queue()
        for chunk in head:
            yield sse(chunk)

        async def pump(k: int, r: Request):
            try:
                async for events in r.events():
                    await queue.put((k, events))
                await queue.put((k, None))
            except Exception as e:  # noqa: BLE001 - forwarded to the stream
                await queue.put((k, e))

        tasks = [asyncio.create_task(pump(k, r)) for k, r in enumerate(requests)]
        try:
            remaining = len(requests)
            while remaining:
                k, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    yield sse(error_body(str(item), "server_error"))
                    return
                else:
                    for chunk in chunks(k, item):
                        yield sse(chunk)
            for chunk in tail():
                yield sse(chunk)
            yield "data: [DONE]\n\n"
        finally:  # normal end, error, or the client went away (the generator is cancelled)
            for r in requests:
                r.cancel()
            for t in tasks:
                t.cancel()

    # ---- routes --------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "running_rows": scheduler.running_rows,
                "waiting_requests": scheduler.waiting, "decode_steps": scheduler.steps,
                "generated_tokens": scheduler.generated_tokens, "max_batch": config.max_batch,
                "auth": config.api_key is not None}

    @app.get("/v1/models", response_model=p.ModelList, dependencies=[Depends(require_key)])
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "gptlab", "max_model_len": window}]}

    @app.post("/v1/chat/completions", response_model=p.ChatCompletion, dependencies=[Depends(require_key)],
              responses={400: {"model": p.ErrorResponse}, 401: {"model": p.ErrorResponse},
                         429: {"model": p.ErrorResponse}})
    async def chat_completions(body: p.ChatCompletionRequest, http: HttpRequest):
        check_model(body.model)
        try:
            offered = tools.parse_tools(body.tools) if body.tools else []
            tool_choice = tools.check_tool_choice(body.tool_choice, bool(offered))
            if offered and not tools.supports_tools(tokenizer):
                raise tools.ToolRequestError("this model's chat format has no tool-call tokens", "tools")
            messages = tools.to_chat_messages(
                [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                  "tool_calls": m.tool_calls, "tool_call_id": m.tool_call_id} for m in body.messages], offered)
            ids = await run_in_threadpool(render_for_completion, tokenizer, messages)
        except tools.ToolRequestError as e:
            raise ApiError(400, str(e), param=e.param, code="invalid_value") from None
        except (GptlabError, ValueError) as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        params = sampling(body, len(ids), body.max_new_tokens)
        parsers = None
        if offered:  # "auto": stop after a call and parse it; "none": stop before a call (tools.py)
            start, end = tokenizer.special_id(tools.CALL_START), tokenizer.special_id(tools.CALL_END)
            stops = engine.default_stop_ids | {end if tool_choice == "auto" else start}
            params = dataclasses.replace(params, stop_token_ids=tuple(sorted(stops)))
            if tool_choice == "auto":
                names = frozenset(t["name"] for t in offered)
                parsers = [tools.ToolCallParser(start, end, names) for _ in range(body.n)]

        def split(e) -> tuple[str, dict | None, str | None]:
            """(content, tool call, finish reason) of one choice event."""
            return parsers[e.choice].feed(e.token_id, e.text, e.finish_reason) if parsers else \
                (e.text, None, e.finish_reason)

        top = (body.top_logprobs or 0) if body.logprobs else None
        request = submit(ids, params, body.n, top)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if body.stream:
            completion_tokens = [0]

            def chunk(choices: list[dict], **extra) -> dict:
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": config.model_name,
                        "choices": choices, **extra}

            head = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None} for i in range(body.n)])]

            def chunks(_, events):
                for e in events:
                    completion_tokens[0] += e.completion_tokens
                    text, call, finish = split(e)
                    logprobs = None
                    if top is not None:
                        logprobs = {"content": [chat_logprob(e.logprob)] if e.logprob else []}
                    if call is not None:  # the whole call in one delta, then the finish (as OpenAI sends it)
                        delta = {"content": text} if text else {}
                        yield chunk([{"index": e.choice, "delta": {**delta, "tool_calls": [{"index": 0, **call}]},
                                      "logprobs": logprobs, "finish_reason": None}])
                        yield chunk([{"index": e.choice, "delta": {}, "logprobs": None, "finish_reason": finish}])
                    elif text or e.logprob or finish:
                        yield chunk([{"index": e.choice, "delta": {"content": text} if text else {},
                                      "logprobs": logprobs, "finish_reason": finish}])

            def tail():
                return [chunk([], usage=usage(len(ids), completion_tokens[0]))] if body.include_usage else []

            return StreamingResponse(stream_events([request], chunks, head, tail), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        (steps,) = await wait_all([request], http)
        texts = [""] * body.n
        calls: list[list[dict] | None] = [None] * body.n
        logprobs: list[list[dict]] = [[] for _ in range(body.n)]
        finish, completion_tokens = [None] * body.n, 0
        for events in steps:
            for e in events:
                text, call, finish_reason = split(e)
                texts[e.choice] += text
                if call is not None:
                    calls[e.choice] = [call]
                if e.logprob:
                    logprobs[e.choice].append(chat_logprob(e.logprob))
                if finish_reason:
                    finish[e.choice] = finish_reason
                    completion_tokens += e.completion_tokens
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i] or None if calls[i] else texts[i],
                                            "tool_calls": calls[i]},
                    "logprobs": {"content": logprobs[i]} if top is not None else None, "finish_reason": finish[i]}
                   for i in range(body.n)]
        return {"id": rid, "object": "chat.completion", "created": now, "model": config.model_name,
                "choices": choices, "usage": usage(len(ids), completion_tokens)}

    @app.post("/v1/completions", response_model=p.Completion, dependencies=[Depends(require_key)],
              responses={400: {"model": p.ErrorResponse}, 401: {"model": p.ErrorResponse},
                         429: {"model": p.ErrorResponse}})
    async def completions(body: p.CompletionRequest, http: HttpRequest):
        check_model(body.model)
        prompts = body.prompts()
        try:
            encoded = [await run_in_threadpool(engine.encode, prompt) for prompt in prompts]
        except GptlabError as e:
            raise ApiError(400, str(e), param="prompt", code="invalid_value") from None
        params = [sampling(body, len(ids), body.max_tokens) for ids in encoded]
        top = body.logprobs
        # echo shows a text prompt as given and a token prompt decoded, never the BOS the engine adds
        shown = [ids[1:] if isinstance(prompt, str) and engine.bos_id is not None else ids
                 for prompt, ids in zip(prompts, encoded)]
        echo_texts = [prompt if isinstance(prompt, str) else tokenizer.decode(prompt) for prompt in prompts]
        echo_infos: list[list[TokenLogprob | None]] = [[None] * len(ids) for ids in shown]
        if body.echo and top is not None:
            futures = [asyncio.wrap_future(scheduler.call(lambda ids=ids: prompt_logprobs(engine, ids, top)))
                       for ids in encoded]
            try:
                scored = await asyncio.gather(*futures)
            except SchedulerStopped as e:
                raise ApiError(503, str(e), "server_error", None, "shutting_down") from None
            echo_infos = [lp[len(lp) - len(ids):] for lp, ids in zip(scored, shown)]
        generate = body.max_tokens > 0
        requests: list[Request] = []
        try:
            for ids, ps in zip(encoded if generate else [], params):
                requests.append(submit(ids, ps, body.n, top))
        except ApiError:  # e.g. the queue filled up half-way through a list of prompts
            for r in requests:
                r.cancel()
            raise
        prompt_tokens = sum(map(len, encoded))
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def legacy_logprobs(ids: list[int], infos: list[TokenLogprob | None], offset: int) -> dict:
            """The legacy completions logprobs object; `offset` is where the first token's text starts."""
            tokens = [token_text(t) for t in ids]
            offsets = []
            for text in tokens:
                offsets.append(offset)
                offset += len(text)
            return {"tokens": tokens, "token_logprobs": [i.logprob if i else None for i in infos],
                    "top_logprobs": [{token_text(t): lp for t, lp in i.top} if i else None for i in infos],
                    "text_offset": offsets}

        def echo_choice(k: int) -> dict:
            lp = legacy_logprobs(shown[k], echo_infos[k], 0) if top is not None and body.echo else None
            return {"text": echo_texts[k] if body.echo else "", "logprobs": lp}

        if body.stream:
            completion_tokens = [0]

            def chunk(choices, **extra):
                return {"id": rid, "object": "text_completion", "created": now, "model": config.model_name,
                        "choices": choices, **extra}

            finish = None if generate else "length"
            head = [chunk([{"index": k * body.n + c, **echo_choice(k), "finish_reason": finish}])
                    for k in range(len(prompts)) for c in range(body.n)] if body.echo else []

            def chunks(k, events):
                offset = len(echo_texts[k]) if body.echo else 0
                for e in events:
                    completion_tokens[0] += e.completion_tokens
                    if e.text or e.logprob or e.finish_reason:
                        lp = legacy_logprobs([e.logprob.token_id], [e.logprob], offset) if e.logprob else None
                        yield chunk([{"index": k * body.n + e.choice, "text": e.text, "logprobs": lp,
                                      "finish_reason": e.finish_reason}])

            def tail():
                return [chunk([], usage=usage(prompt_tokens, completion_tokens[0]))] if body.include_usage else []

            return StreamingResponse(stream_events(requests, chunks, head, tail), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        results = await wait_all(requests, http) if generate else [[] for _ in prompts]
        choices, completion_tokens = [], 0
        for k, steps in enumerate(results):
            for c in range(body.n):
                echoed = echo_choice(k)
                text, infos, finish = echoed["text"], [], "length"
                for e in (e for events in steps for e in events if e.choice == c):
                    text += e.text
                    if e.logprob:
                        infos.append(e.logprob)
                    if e.finish_reason:
                        finish = e.finish_reason
                        completion_tokens += e.completion_tokens
                lp = echoed["logprobs"]
                if top is not None:
                    own = legacy_logprobs([i.token_id for i in infos], infos, len(echoed["text"]))
                    lp = {key: (lp[key] if lp else []) + own[key] for key in own}
                choices.append({"index": k * body.n + c, "text": text, "logprobs": lp, "finish_reason": finish})
        return {"id": rid, "object": "text_completion", "created": now, "model": config.model_name,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

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
