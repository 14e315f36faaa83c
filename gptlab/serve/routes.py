"""The routes of `gptlab serve` as plain async functions: each takes the parsed request body and the
`ServerState` and returns the response (a dict for JSON, a `StreamingResponse` for server-sent events), or
raises `ApiError`. app.py wires them into FastAPI; tests can call them without HTTP.

Design decisions
- Non-streaming handlers take `is_disconnected` (an async predicate; HTTP: `Request.is_disconnected`) and
  poll it while they wait, cancelling the request when the client has gone. Streams need no such hook:
  Starlette cancels the response generator, whose `finally` cancels the request.
- Streaming and non-streaming answers are built from the same per-step `ChoiceEvent`s of the scheduler,
  so they carry the same text (tests compare them).
- Structured output: `response_format` json_object / json_schema (both endpoints) and forced tool calls
  (tools/calls.py) become an engine constraint (infer/constraints.py, llguidance). It is compiled here, in a
  worker thread, before the request is queued: an invalid or unsupported schema is a 400 naming the
  offending keyword (jsonschema's path, or llguidance's "Unimplemented keys"), and a slow compile never
  stalls the decode thread; compiled grammars are cached (LRU), so a repeated schema costs nothing.
  Schemas are limited to `constraints.MAX_SOURCE_BYTES` (100 KB) of JSON (and the request body to
  `max_body_bytes`), beyond which the request is a 400; llguidance's own limits (grammar size, Earley
  items per step) bound the rest. A constrained choice that reaches max_tokens ends with
  finish_reason "length" and the partial text, never a closed-off object. A grammar that admits no token
  at some step ends its own request with a 400 (code "constraint_failed"; in a stream, an error event):
  the rows of other requests decoding in the same batch go on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..chat import render_for_completion
from ..common import GptlabError
from ..infer.constraints import GRAMMARS, Constraint
from . import protocol as p
from ..tools import calls as tools
from .scheduler import Request, SchedulerStopped, TokenLogprob, prompt_logprobs
from .state import ApiError, ServerState, error_body


async def _never_disconnected() -> bool:
    return False


# ---- shared pieces -------------------------------------------------------------------------------------
async def wait_all(state: ServerState, requests: list[Request],
                   is_disconnected: Callable[[], Awaitable[bool]]) -> list[list[list]]:
    """Collect every event of non-streaming requests; cancel them if the client goes away."""

    async def collect(r: Request):
        return [events async for events in r.events()]

    task = asyncio.gather(*(collect(r) for r in requests))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=state.config.poll_disconnect_s)
            if done:
                results = task.result()
                failed = next((e.error for steps in results for events in steps for e in events if e.error), None)
                if failed is not None:
                    raise ApiError(400, failed, code="constraint_failed")
                return results
            if await is_disconnected():
                raise ApiError(499, "client disconnected")
    except (SchedulerStopped, RuntimeError) as e:
        raise ApiError(503 if isinstance(e, SchedulerStopped) else 500, str(e), "server_error") from None
    finally:
        for r in requests:
            r.cancel()
        task.cancel()
        # a gather cancelled while its children wait ends with their CancelledError as its exception;
        # retrieving it spares the "exception was never retrieved" log when the future is collected
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


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
            elif any(e.error for e in item):  # a constraint dead end: this request ends with the error
                yield sse(error_body(next(e.error for e in item if e.error), "invalid_request_error",
                                     code="constraint_failed"))
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


async def compiled_constraint(state: ServerState, make: Callable[[], Constraint | None],
                              param: str) -> Constraint | None:
    """The constraint `make` builds, compiled in a worker thread (module docstring); its errors are 400s
    naming `param`."""
    try:
        constraint = make()
        if constraint is not None:
            await run_in_threadpool(GRAMMARS.matcher, state.tokenizer, constraint)
    except GptlabError as e:
        raise ApiError(400, str(e), param=param, code="invalid_value") from None
    return constraint


def event_stream(requests: list[Request], chunks, head: list[dict], tail) -> StreamingResponse:
    return StreamingResponse(stream_events(requests, chunks, head, tail), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def chat_logprob(state: ServerState, info: TokenLogprob) -> dict:
    tokenizer = state.tokenizer

    def entry(token_id, logprob):
        return {"token": tokenizer.decode([token_id]), "logprob": logprob,
                "bytes": list(tokenizer.id_to_bytes(token_id))}
    return {**entry(info.token_id, info.logprob), "top_logprobs": [entry(t, lp) for t, lp in info.top]}


def legacy_logprobs(state: ServerState, ids: list[int], infos: list[TokenLogprob | None], offset: int) -> dict:
    """The legacy completions logprobs object; `offset` is where the first token's text starts."""
    tokens = [state.tokenizer.decode([t]) for t in ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [i.logprob if i else None for i in infos],
            "top_logprobs": [{state.tokenizer.decode([t]): lp for t, lp in i.top} if i else None for i in infos],
            "text_offset": offsets}


# ---- GET routes ----------------------------------------------------------------------------------------
def health(state: ServerState) -> dict:
    s = state.scheduler
    return {"status": "ok", "model": state.config.model_name, "running_rows": s.running_rows,
            "waiting_requests": s.waiting, "decode_steps": s.steps, "generated_tokens": s.generated_tokens,
            "max_batch": state.config.max_batch, "auth": state.config.api_key is not None}


def list_models(state: ServerState) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": state.created,
                                        "owned_by": "gptlab", "max_model_len": state.window} for name in state.names]}


# ---- POST /v1/chat/completions -------------------------------------------------------------------------
async def chat_completions(body: p.ChatCompletionRequest, state: ServerState,
                           is_disconnected: Callable[[], Awaitable[bool]] = _never_disconnected):
    state.check_model(body.model)
    tokenizer = state.tokenizer
    try:
        offered = tools.parse_tools(body.tools) if body.tools else []
        tool_choice = tools.check_tool_choice(body.tool_choice, offered)
        native = tools.supports_tools(tokenizer)
        if tool_choice.forced and (body.response_format or {}).get("type", "text") != "text":
            raise tools.ToolRequestError("a forced tool call (tool_choice) and a JSON response_format exclude "
                                         "each other", "response_format")
        shown = offered if native or tool_choice.mode != "none" else []
        messages = tools.to_chat_messages(
            [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
              "tool_calls": m.tool_calls, "tool_call_id": m.tool_call_id} for m in body.messages], shown, native)
        ids = await run_in_threadpool(render_for_completion, tokenizer, messages)
    except tools.ToolRequestError as e:
        raise ApiError(400, str(e), param=e.param, code="invalid_value") from None
    except (GptlabError, ValueError) as e:
        raise ApiError(400, str(e), param="messages", code="invalid_value") from None
    if tool_choice.forced:  # the reply is the call, constrained to its tool's parameters (tools/calls.py)
        constraint = await compiled_constraint(
            state, lambda: Constraint.json_schema(tools.call_schema(offered, tool_choice.forced)), "tools")
        if native:
            ids = ids + [tokenizer.special_id(tools.CALL_START)]
    else:
        constraint = await compiled_constraint(state, lambda: Constraint.from_response_format(body.response_format),
                                               "response_format")
    params = dataclasses.replace(state.sampling(body, len(ids), body.max_new_tokens), constraint=constraint)
    parsers = None
    if tool_choice.forced or (shown and not native and constraint is None):
        names = frozenset(tool_choice.forced or (t["name"] for t in offered))
        parsers = [tools.JsonCallParser(names, forced=bool(tool_choice.forced)) for _ in range(body.n)]
    elif shown:  # native "auto": stop after a call and parse it; "none": stop before a call (tools/calls.py)
        start, end = tokenizer.special_id(tools.CALL_START), tokenizer.special_id(tools.CALL_END)
        stops = state.engine.default_stop_ids | {end if tool_choice.mode == "auto" else start}
        params = dataclasses.replace(params, stop_token_ids=tuple(sorted(stops)))
        if tool_choice.mode == "auto" and constraint is None:
            names = frozenset(t["name"] for t in offered)
            parsers = [tools.ToolCallParser(start, end, names) for _ in range(body.n)]

    def split(e) -> tuple[str, dict | None, str | None]:
        """(content, tool call, finish reason) of one choice event."""
        return parsers[e.choice].feed(e.token_id, e.text, e.finish_reason) if parsers else \
            (e.text, None, e.finish_reason)

    top = (body.top_logprobs or 0) if body.logprobs else None
    request = state.submit(ids, params, body.n, top)
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return _chat_stream(state, body, request, split, top, rid, now, len(ids))
    (steps,) = await wait_all(state, [request], is_disconnected)
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
                logprobs[e.choice].append(chat_logprob(state, e.logprob))
            if finish_reason:
                finish[e.choice] = finish_reason
                completion_tokens += e.completion_tokens
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i] or None if calls[i] else texts[i],
                                        "tool_calls": calls[i]},
                "logprobs": {"content": logprobs[i]} if top is not None else None, "finish_reason": finish[i]}
               for i in range(body.n)]
    return {"id": rid, "object": "chat.completion", "created": now, "model": state.config.model_name,
            "choices": choices, "usage": usage(len(ids), completion_tokens)}


def _chat_stream(state: ServerState, body: p.ChatCompletionRequest, request: Request, split, top: int | None,
                 rid: str, now: int, prompt_tokens: int) -> StreamingResponse:
    completion_tokens = [0]

    def chunk(choices: list[dict], **extra) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": state.config.model_name,
                "choices": choices, **extra}

    head = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(body.n)])]

    def chunks(_, events):
        for e in events:
            completion_tokens[0] += e.completion_tokens
            text, call, finish = split(e)
            logprobs = None
            if top is not None:
                logprobs = {"content": [chat_logprob(state, e.logprob)] if e.logprob else []}
            if call is not None:  # the whole call in one delta, then the finish (as OpenAI sends it)
                delta = {"content": text} if text else {}
                yield chunk([{"index": e.choice, "delta": {**delta, "tool_calls": [{"index": 0, **call}]},
                              "logprobs": logprobs, "finish_reason": None}])
                yield chunk([{"index": e.choice, "delta": {}, "logprobs": None, "finish_reason": finish}])
            elif text or e.logprob or finish:
                yield chunk([{"index": e.choice, "delta": {"content": text} if text else {},
                              "logprobs": logprobs, "finish_reason": finish}])

    def tail():
        return [chunk([], usage=usage(prompt_tokens, completion_tokens[0]))] if body.include_usage else []

    return event_stream([request], chunks, head, tail)


# ---- POST /v1/completions ------------------------------------------------------------------------------
async def completions(body: p.CompletionRequest, state: ServerState,
                      is_disconnected: Callable[[], Awaitable[bool]] = _never_disconnected):
    state.check_model(body.model)
    engine, tokenizer = state.engine, state.tokenizer
    prompts = body.prompts()
    try:
        encoded = [await run_in_threadpool(engine.encode, prompt) for prompt in prompts]
    except GptlabError as e:
        raise ApiError(400, str(e), param="prompt", code="invalid_value") from None
    constraint = await compiled_constraint(state, lambda: Constraint.from_response_format(body.response_format),
                                           "response_format")
    params = [dataclasses.replace(state.sampling(body, len(ids), body.max_tokens), constraint=constraint)
              for ids in encoded]
    top = body.logprobs
    # echo shows a text prompt as given and a token prompt decoded, never the BOS the engine adds
    shown = [ids[1:] if isinstance(prompt, str) and engine.bos_id is not None else ids
             for prompt, ids in zip(prompts, encoded)]
    echo_texts = [prompt if isinstance(prompt, str) else tokenizer.decode(prompt) for prompt in prompts]
    echo_infos: list[list[TokenLogprob | None]] = [[None] * len(ids) for ids in shown]
    if body.echo and top is not None:
        futures = [asyncio.wrap_future(state.scheduler.call(lambda ids=ids: prompt_logprobs(engine, ids, top)))
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
            requests.append(state.submit(ids, ps, body.n, top))
    except ApiError:  # e.g. the queue filled up half-way through a list of prompts
        for r in requests:
            r.cancel()
        raise
    prompt_tokens = sum(map(len, encoded))
    rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def echo_choice(k: int) -> dict:
        lp = legacy_logprobs(state, shown[k], echo_infos[k], 0) if top is not None and body.echo else None
        return {"text": echo_texts[k] if body.echo else "", "logprobs": lp}

    def chunk(choices, **extra):
        return {"id": rid, "object": "text_completion", "created": now, "model": state.config.model_name,
                "choices": choices, **extra}

    if body.stream:
        completion_tokens = [0]
        finish = None if generate else "length"
        head = [chunk([{"index": k * body.n + c, **echo_choice(k), "finish_reason": finish}])
                for k in range(len(prompts)) for c in range(body.n)] if body.echo else []

        def chunks(k, events):
            offset = len(echo_texts[k]) if body.echo else 0
            for e in events:
                completion_tokens[0] += e.completion_tokens
                if e.text or e.logprob or e.finish_reason:
                    lp = legacy_logprobs(state, [e.logprob.token_id], [e.logprob], offset) if e.logprob else None
                    yield chunk([{"index": k * body.n + e.choice, "text": e.text, "logprobs": lp,
                                  "finish_reason": e.finish_reason}])

        def tail():
            return [chunk([], usage=usage(prompt_tokens, completion_tokens[0]))] if body.include_usage else []

        return event_stream(requests, chunks, head, tail)

    results = await wait_all(state, requests, is_disconnected) if generate else [[] for _ in prompts]
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
                own = legacy_logprobs(state, [i.token_id for i in infos], infos, len(echoed["text"]))
                lp = {key: (lp[key] if lp else []) + own[key] for key in own}
            choices.append({"index": k * body.n + c, "text": text, "logprobs": lp, "finish_reason": finish})
    return chunk(choices, usage=usage(prompt_tokens, completion_tokens))
