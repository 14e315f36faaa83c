"""Continuous batching: one background thread owns the model and decodes every running request together.

Design decisions
- One decode thread does all model work (prefill, decode steps, prompt scoring); the asyncio event loop
  only parses requests and streams bytes, so a slow forward pass never blocks accepting or answering
  other connections. The two sides talk through a lock-protected waiting queue (loop -> thread) and
  `loop.call_soon_threadsafe` into a per-request asyncio.Queue (thread -> loop).
- Continuous batching (Yu et al. 2022, "Orca": iteration-level scheduling): between two decode steps the
  thread admits waiting requests (prefilled into their own `DecodeBatch`, then `join`ed into the running
  one) and drops rows whose client went away (`DecodeBatch.keep`); rows that finish leave inside
  `Engine.step`. A request never waits for another request to finish, only for the next step boundary.
- Chunked prefill (Agrawal et al. 2023, "Sarathi"): while rows are decoding, each scheduler step
  prefills at most `prefill_chunk_tokens` prompt tokens (`Engine.prefill_chunks`) before its decode
  step, so a long prompt (or a burst of arrivals) joining the batch delays every running stream by a
  bounded amount per token instead of by its whole prefill. With nothing decoding there is no one to
  protect and pending prefills run to the end at once. Admitted rows count against `max_batch` from
  the moment their prefill starts.
- Admission is first come, first served, bounded by `max_batch` rows (a request with n choices takes n
  rows). The waiting queue is bounded too (`max_queue`): beyond it `submit` raises `QueueFull`, which
  the API answers with 429, because an unbounded queue turns overload into ever-growing latency.
- Seeds: the engine seeds row r of a prefill call with seed + r, so requests that carry a seed are
  prefilled on their own (choice i gets seed + i, whatever else arrives at the same moment); requests
  without one are prefilled together in one forward pass.
- Log-probabilities are those of the model's own distribution (before temperature, top-k and top-p), as
  in the OpenAI API: they say what the model believes, not how it was sampled. They are read from
  `batch.logits` just before the step that samples from it.
- Observability: the scheduler counts prompt and generated tokens, decode steps and aborted requests, and
  stamps each request (submitted, first token, done); `on_request_done` (the server's metrics) is called
  from the decode thread when a request ends, finished or aborted. A client that goes away cancels its
  request (app.py); it leaves the queue, its prefill or the batch before the next step and counts as
  aborted.
- A failure inside model code fails the requests involved (their streams end with an error) and the
  loop keeps serving; it is logged with its traceback since it is a bug, not a user error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..common import get_logger
from ..infer.batch import DecodeBatch
from ..infer.engine import Engine
from ..infer.sampling import SamplingParams

log = get_logger("serve")


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


class SchedulerStopped(Exception):
    """The server is shutting down (HTTP 503)."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class ChoiceEvent:
    choice: int
    token_id: int  # the token sampled this step (a stop token too: it says what ended the choice)
    text: str  # new text of this choice ("" while a partial character or possible stop string is held)
    logprob: TokenLogprob | None  # the output token of this step (None for a stop token or without logprobs)
    finish_reason: str | None = None  # "stop" or "length" on the choice's last event
    completion_tokens: int = 0  # output tokens of the choice, set on its last event
    error: str | None = None  # with finish_reason "error": the choice's constraint failed (a dead end)


class Request:
    """One API request: `n` choices of the same prompt, decoded as n rows. Created and consumed on the
    event loop; its events are produced by the decode thread."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, n: int = 1, top_logprobs: int | None = None):
        self.prompt_ids = prompt_ids
        self.params = params
        self.n = n
        self.top_logprobs = top_logprobs  # None: no logprobs; k >= 0: the sampled token's plus top k
        self.cancelled = False
        # perf_counter stamps: queued (set by `Scheduler.submit`), first generated token, last one
        self.submitted_at: float | None = None
        self.first_token_at: float | None = None
        self.done_at: float | None = None
        self._finished_choices = 0
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        """Stop generating (the client went away); the rows leave the batch before the next step."""
        self.cancelled = True

    def _push(self, item) -> None:  # called from the decode thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def events(self) -> AsyncIterator[list[ChoiceEvent]]:
        """The events of each decode step, until every choice has finished."""
        finished = 0
        while finished < self.n:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            finished += sum(e.finish_reason is not None for e in item)
            yield item


@dataclass
class _Owner:
    request: Request
    choice: int
    row: object  # the engine's row record: its token_ids say whether a step's token joined the output
    emitted_tokens: int = 0


@dataclass
class _Prefill:
    """Requests being prefilled together, a chunk per step."""

    group: list[Request]
    chunks: Iterator
    rows: int


@dataclass
class _Job:
    fn: Callable[[], object]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 32, max_queue: int = 256,
                 prefill_chunk_tokens: int | None = 128,
                 on_request_done: Callable[[Request, bool], None] | None = None):
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk_tokens = prefill_chunk_tokens or None  # None/0: whole prompts in one step
        self._prefilling: deque[_Prefill] = deque()
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._jobs: list[_Job] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._next_row = 0
        self.running_rows = 0
        self.steps = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0  # of admitted requests, each choice counted
        self.aborted_requests = 0
        self.on_request_done = on_request_done  # (request, aborted), called from the decode thread

    # ---- event-loop side ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gptlab-decode", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        if request.n > self.max_batch:
            raise ValueError(f"n={request.n} exceeds the server's batch size {self.max_batch}")
        with self._cond:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            if sum(not r.cancelled for r in self._waiting) >= self.max_queue:
                raise QueueFull(f"server busy: {self.max_queue} requests already waiting; retry later")
            request.submitted_at = time.perf_counter()
            self._waiting.append(request)
            self._cond.notify()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` (model work other than decoding, e.g. scoring a prompt) in the decode thread between
        two steps; await it with `asyncio.wrap_future`."""
        job = _Job(fn)
        with self._cond:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    @property
    def waiting(self) -> int:
        """Requests waiting for a batch slot (not those whose client went away: they hold no place)."""
        with self._cond:
            return sum(not r.cancelled for r in self._waiting)

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, end every waiting and running request with SchedulerStopped, join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- decode thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        batch: DecodeBatch | None = None
        owners: dict[int, _Owner] = {}
        while True:
            with self._cond:
                while not (self._waiting or self._jobs or batch is not None or self._prefilling or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    stopped = SchedulerStopped("the server is shutting down")
                    for request in {id(o.request): o.request for o in owners.values()}.values():
                        request._push(stopped)
                    for request in [*self._waiting, *(r for pf in self._prefilling for r in pf.group)]:
                        request._push(stopped)
                    for job in self._jobs:
                        job.future.set_exception(stopped)
                    self._waiting.clear()
                    return
                jobs, self._jobs = self._jobs, []
                admitted = []
                rows = (len(batch.rows) if batch is not None else 0) + sum(pf.rows for pf in self._prefilling)
                while self._waiting and rows + self._waiting[0].n <= self.max_batch:
                    request = self._waiting.popleft()
                    if request.cancelled:
                        self._ended(request, aborted=True)
                    else:
                        admitted.append(request)
                        rows += request.n
                        self.prompt_tokens += len(request.prompt_ids) * request.n
            for job in jobs:
                self._run_job(job)
            if admitted:
                self._start_prefills(admitted)
            if self._prefilling:
                batch = self._prefill_step(batch, owners)
            if batch is not None:
                batch = self._drop_cancelled(batch, owners)
            if batch is not None:
                batch = self._step(batch, owners)
            self.running_rows = len(batch.rows) if batch is not None else 0

    @staticmethod
    def _run_job(job: _Job) -> None:
        try:
            job.future.set_result(job.fn())
        except Exception as e:  # noqa: BLE001 - handed to the awaiting handler
            job.future.set_exception(e)

    def _start_prefills(self, requests: list[Request]) -> None:
        unseeded = [r for r in requests if r.params.seed is None]
        groups = [[r] for r in requests if r.params.seed is not None] + ([unseeded] if unseeded else [])
        for group in groups:
            prompts = [r.prompt_ids for r in group for _ in range(r.n)]
            params = [r.params for r in group for _ in range(r.n)]
            first = self._next_row
            self._next_row += len(prompts)
            chunks = self.engine.prefill_chunks(prompts, params, first_index=first,
                                                chunk_tokens=self.prefill_chunk_tokens)
            self._prefilling.append(_Prefill(group, chunks, len(prompts)))

    def _prefill_step(self, batch: DecodeBatch | None, owners: dict[int, _Owner]) -> DecodeBatch | None:
        """Advance pending prefills by up to `prefill_chunk_tokens` prompt tokens (no limit while nothing
        decodes); join each finished one to the running batch."""
        budget = self.prefill_chunk_tokens if batch is not None else None
        spent = 0
        while self._prefilling and (budget is None or spent < budget):
            pf = self._prefilling[0]
            if all(r.cancelled for r in pf.group):
                self._prefilling.popleft()
                pf.chunks.close()
                for r in pf.group:
                    self._ended(r, aborted=True)
                continue
            computed = self.engine.prefill_tokens_computed
            try:
                new = next(pf.chunks)
            except Exception as e:
                log.exception("prefill failed")
                self._prefilling.popleft()
                for r in pf.group:
                    r._push(RuntimeError(f"prefill failed: {e}"))
                continue
            # what the chunk really ran through the model: cached prefixes and repeated prompts cost nothing
            spent += self.engine.prefill_tokens_computed - computed
            if new is None:
                continue
            self._prefilling.popleft()
            pairs = [(r, c) for r in pf.group for c in range(r.n)]
            for row, (r, c) in zip(new.rows, pairs):
                owners[row.index] = _Owner(r, c, row)
            if batch is None:
                batch = new
                continue
            try:
                batch.join(new)
            except Exception as e:  # the running batch is in an unknown state: end everything in it
                log.exception("joining a batch failed")
                return self._fail_all(owners, e)
        return batch

    def _drop_cancelled(self, batch: DecodeBatch, owners: dict[int, _Owner]) -> DecodeBatch | None:
        alive = [i for i, row in enumerate(batch.rows) if not owners[row.index].request.cancelled]
        if len(alive) < len(batch.rows):
            gone = {}
            for row in batch.rows:
                if owners[row.index].request.cancelled:
                    request = owners.pop(row.index).request
                    gone[id(request)] = request
            for request in gone.values():
                self._ended(request, aborted=True)
            if not alive:
                return None
            batch.keep(alive)
        return batch

    def _step(self, batch: DecodeBatch, owners: dict[int, _Owner]) -> DecodeBatch | None:
        try:
            wanted = [owners[row.index].request.top_logprobs for row in batch.rows]
            logprobs = top = None
            if any(k is not None for k in wanted):
                logprobs = batch.logits.log_softmax(dim=-1)
                k = max(k for k in wanted if k is not None)
                top = logprobs.topk(k, dim=-1) if k else None
            events = self.engine.step(batch)
        except Exception as e:
            log.exception("decode step failed")
            return self._fail_all(owners, e)
        self.steps += 1
        per_request: dict[int, tuple[Request, list[ChoiceEvent]]] = {}
        for i, event in enumerate(events):
            owner = owners[event.row]
            produced = len(owner.row.token_ids) > owner.emitted_tokens  # False for a stop token
            owner.emitted_tokens = len(owner.row.token_ids)
            self.generated_tokens += produced
            if produced and owner.request.first_token_at is None:
                owner.request.first_token_at = time.perf_counter()
            info = None
            k = owner.request.top_logprobs
            if produced and k is not None:
                alternatives = []
                if k:
                    alternatives = list(zip(top.indices[i, :k].tolist(), top.values[i, :k].tolist()))
                info = TokenLogprob(event.token_id, float(logprobs[i, event.token_id]), alternatives)
            choice_event = ChoiceEvent(owner.choice, event.token_id, event.text, info, event.finish_reason,
                                       error=event.error)
            if event.finish_reason is not None:
                choice_event.completion_tokens = len(owner.row.token_ids)
                del owners[event.row]
                owner.request._finished_choices += 1
                if owner.request._finished_choices == owner.request.n:
                    owner.request.done_at = time.perf_counter()
                    self._ended(owner.request, aborted=False)
            per_request.setdefault(id(owner.request), (owner.request, []))[1].append(choice_event)
        deliver(list(per_request.values()))
        return batch if batch.rows else None

    def _ended(self, request: Request, aborted: bool) -> None:
        self.aborted_requests += aborted
        if self.on_request_done is not None:
            try:
                self.on_request_done(request, aborted)
            except Exception:  # noqa: BLE001 - an observer's bug must not stop the decode loop
                log.exception("on_request_done failed")

    def _fail_all(self, owners: dict[int, _Owner], error: Exception) -> None:
        for request in {id(o.request): o.request for o in owners.values()}.values():
            request._push(RuntimeError(f"generation failed: {error}"))
        owners.clear()
        return None


def deliver(items: list[tuple[Request, object]]) -> None:
    """Hand each request its item with one event-loop wake-up per loop (not one per request): with 100
    streams, 100 cross-thread wake-ups per decode step would cost more than the step itself."""
    by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list]] = {}
    for request, item in items:
        by_loop.setdefault(id(request._loop), (request._loop, []))[1].append((request, item))
    for loop, pairs in by_loop.values():
        loop.call_soon_threadsafe(_put_all, pairs)


def _put_all(pairs: list[tuple[Request, object]]) -> None:
    for request, item in pairs:
        request._queue.put_nowait(item)


@torch.inference_mode()
def prompt_logprobs(engine: Engine, ids: list[int], top: int) -> list[TokenLogprob | None]:
    """Log-probability of each prompt token given the ones before it (None for the first, which has no
    context), with the `top` most likely alternatives: what `echo` + `logprobs` report, and what eval
    harnesses read to score a continuation's likelihood and whether it is the greedy one."""
    logits = engine.model(torch.tensor([ids], device=engine.device))[0, :-1].float()
    logits[:, engine.n_real_tokens:] = -float("inf")
    logprobs = logits.log_softmax(dim=-1)
    target = torch.tensor(ids[1:], device=engine.device)
    token_lp = logprobs.gather(1, target[:, None])[:, 0].tolist()
    alternatives = [[] for _ in token_lp]
    if top:
        values, indices = logprobs.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return [None] + [TokenLogprob(t, lp, alt) for t, lp, alt in zip(ids[1:], token_lp, alternatives)]
