"""`GET /metrics` of `gptlab serve`, in the Prometheus text format.

Design decisions
- prometheus_client (the Prometheus project's own Python client) writes the exposition format and keeps
  the histograms, rather than our own writer: the format's details (escaping, `_bucket`/`_sum`/`_count`
  series with cumulative `le` buckets, `_total` and `_created` samples, HELP/TYPE lines) are exactly what
  scrapers parse, the library is small, pure Python, dependency-free and thread-safe (histograms are
  observed from the decode thread), and the tests read the output back with its parser. Each server gets
  its own `CollectorRegistry`, so several apps in one process (tests) do not collide.
- Counters that the scheduler and the engine already keep (tokens, decode steps, prefix-cache hits,
  misses, evictions, bytes) are read at scrape time by a custom collector, so the decode loop pays nothing
  for them; only the per-request histograms (time to first token, end-to-end latency) are observed when a
  request ends, and the requests by status are counted by an ASGI middleware as each response starts.
- Names follow Prometheus conventions (`gptlab_` prefix, base units: seconds and bytes, `_total` counters)
  and vLLM's where one exists (prompt / generation tokens, time to first token, e2e request latency,
  prefix cache queries and hits in tokens).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .scheduler import Request, Scheduler

__all__ = ["CONTENT_TYPE_LATEST", "MetricsMiddleware", "ServerMetrics"]

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
COUNTED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class ServerMetrics:
    def __init__(self, scheduler: Scheduler, max_batch: int, max_queue: int):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gptlab_requests", "HTTP requests to the API by path and status code",
                                ["path", "status"], registry=self.registry)
        self.ttft = Histogram("gptlab_time_to_first_token_seconds",
                              "Request admitted to the queue -> its first generated token", buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        self.latency = Histogram("gptlab_e2e_request_latency_seconds",
                                 "Request admitted to the queue -> its last token (completed requests)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_SchedulerCollector(scheduler, max_batch, max_queue))

    def request_done(self, request: Request, aborted: bool) -> None:
        """The scheduler's hook (decode thread): a request finished, or left because its client went."""
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.submitted_at)
        if not aborted:
            self.latency.observe(request.done_at - request.submitted_at)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware counting each response by path (the API's; any other is "other", so random paths
    cannot blow up the label set) and status code, as the response starts."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in COUNTED_PATHS else "other"

        async def send_counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_counted)


class _SchedulerCollector:
    """Counters and gauges kept by the scheduler and the engine, read at scrape time."""

    def __init__(self, scheduler: Scheduler, max_batch: int, max_queue: int):
        self.scheduler, self.max_batch, self.max_queue = scheduler, max_batch, max_queue

    def describe(self):
        return []  # unknown until the first collect: no name clash checks needed for this fixed set

    def collect(self):
        s, engine = self.scheduler, self.scheduler.engine

        def counter(name, doc, value):
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name, doc, value):
            return GaugeMetricFamily(name, doc, value=value)

        yield counter("gptlab_prompt_tokens", "Prompt tokens of admitted requests (each choice counted)",
                      s.prompt_tokens)
        yield counter("gptlab_generation_tokens", "Generated tokens", s.generated_tokens)
        yield counter("gptlab_decode_steps", "Decode steps of the running batch", s.steps)
        yield counter("gptlab_requests_aborted", "Requests cancelled before they finished (client went away)",
                      s.aborted_requests)
        yield counter("gptlab_prefill_computed_tokens",
                      "Prompt tokens run through the model (not taken from the prefix cache)",
                      engine.prefill_tokens_computed)
        yield gauge("gptlab_queue_requests", "Requests waiting for a batch slot", s.waiting)
        yield gauge("gptlab_queue_limit_requests", "Waiting requests beyond which new ones get 429", self.max_queue)
        yield gauge("gptlab_running_rows", "Rows (choices) decoding in the running batch", s.running_rows)
        yield gauge("gptlab_max_batch_rows", "Most rows decoded together", self.max_batch)
        cache = engine.prefix_cache
        yield gauge("gptlab_prefix_cache_enabled", "1 if automatic prefix caching is on", int(cache is not None))
        if cache is None:
            return
        st = cache.stats
        yield counter("gptlab_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", st.prompt_tokens)
        yield counter("gptlab_prefix_cache_hits",
                      "Prompt tokens not computed: cached prefixes and repeats of a prompt in one prefill",
                      max(0, st.prompt_tokens - st.computed_tokens))
        yield counter("gptlab_prefix_cache_misses", "Prompt tokens computed by prefills that consult the cache",
                      st.computed_tokens)
        yield counter("gptlab_prefix_cache_evictions", "Blocks evicted (least recently used first)",
                      st.evicted_blocks)
        yield counter("gptlab_prefix_cache_stored_blocks", "Blocks stored", st.stored_blocks)
        yield gauge("gptlab_prefix_cache_bytes", "Bytes of keys/values held by the prefix cache", cache.bytes)
        yield gauge("gptlab_prefix_cache_capacity_bytes", "The prefix cache's memory budget", cache.max_bytes)
        yield gauge("gptlab_prefix_cache_blocks", "Blocks held by the prefix cache", len(cache))
