"""`gptlab serve` under load, against live servers: `/metrics` in the Prometheus text format (read back
with prometheus_client's own parser), backpressure (429 with Retry-After beyond the queue), and clients
that drop their connection while waiting or while streaming free their place at once."""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from _serve_helpers import LiveServer, load_engine, make_model_dir
from gptlab.serve.app import ServeConfig, create_app

HELLO = [{"role": "user", "content": "def dedent(text):"}]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return load_engine(make_model_dir(tmp_path_factory.mktemp("metrics") / "tiny"))


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics page."""
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def chat(url: str, **overrides) -> httpx.Response:
    body = {"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 8, **overrides}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def wait_until(predicate, timeout=10.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - start


def test_metrics_count_requests_tokens_latency_and_prefix_cache(engine):
    live = LiveServer(create_app(engine, ServeConfig(model_name="tiny")))
    try:
        system = {"role": "system", "content": "You answer in Python. " * 12}  # ~100 shared tokens
        for i in range(3):
            assert chat(live.url, messages=[system, {"role": "user", "content": f"task {i}"}]).status_code == 200
        assert chat(live.url, model="nope").status_code == 404
        m = scrape(live.url)
    finally:
        live.stop()
    path = ("path", "/v1/chat/completions")
    assert m[("gptlab_requests_total", (path, ("status", "200")))] == 3
    assert m[("gptlab_requests_total", (path, ("status", "404")))] == 1
    assert m[("gptlab_generation_tokens_total", ())] == 3 * 8
    assert m[("gptlab_time_to_first_token_seconds_count", ())] == 3
    assert m[("gptlab_e2e_request_latency_seconds_count", ())] == 3
    assert 0 < m[("gptlab_time_to_first_token_seconds_sum", ())] <= m[("gptlab_e2e_request_latency_seconds_sum", ())]
    assert m[("gptlab_queue_requests", ())] == 0 and m[("gptlab_running_rows", ())] == 0
    # the second and third prompts found the system prompt's blocks cached
    queries, hits = m[("gptlab_prefix_cache_queries_total", ())], m[("gptlab_prefix_cache_hits_total", ())]
    assert queries == m[("gptlab_prompt_tokens_total", ())]
    assert hits >= 2 * 64 and hits + m[("gptlab_prefix_cache_misses_total", ())] == queries
    assert m[("gptlab_prefix_cache_bytes", ())] > 0 and m[("gptlab_prefix_cache_evictions_total", ())] == 0


@pytest.fixture
def slow_decode(engine, monkeypatch):
    """2 ms per decode step: 1,500 tokens take >= 3 s on any machine, so a stream is still running when
    the test acts on it."""
    step = engine.step

    def slow_step(batch):
        time.sleep(0.002)
        return step(batch)

    monkeypatch.setattr(engine, "step", slow_step)


def test_backpressure_429_and_dropped_clients_free_their_place(engine, slow_decode):
    live = LiveServer(create_app(engine, ServeConfig(model_name="tiny", max_batch=1, max_queue=1)))
    body = {"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 1500, "stream": True}
    url = live.url + "/v1/chat/completions"
    try:
        def metric(name):
            return scrape(live.url)[(name, ())]

        with httpx.Client(timeout=30) as first, httpx.Client(timeout=30) as second:
            with first.stream("POST", url, json=body) as running:
                lines = running.iter_lines()  # kept: a dropped line iterator closes the stream
                next(lines)
                wait_until(lambda: metric("gptlab_running_rows") == 1)
                with second.stream("POST", url, json=body) as waiting:
                    assert waiting.status_code == 200
                    wait_until(lambda: metric("gptlab_queue_requests") == 1)
                    refused = chat(live.url)  # one decoding, one waiting: the queue is full
                    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                    assert refused.json()["error"]["code"] == "queue_full"
                # the waiting client hung up: its place in the queue is free at once
                left_queue_in = wait_until(lambda: metric("gptlab_queue_requests") == 0, timeout=5)
                assert metric("gptlab_running_rows") == 1
            # the streaming client hung up mid-stream: its row leaves the batch within a few steps,
            # long before its 1,500 tokens (>= 3 s)
            left_batch_in = wait_until(lambda: metric("gptlab_running_rows") == 0, timeout=5)
        assert chat(live.url).status_code == 200  # and the server serves on
        m = scrape(live.url)
    finally:
        live.stop()
    assert left_queue_in < 1 and left_batch_in < 1, (left_queue_in, left_batch_in)
    assert m[("gptlab_requests_aborted_total", ())] == 2
    assert m[("gptlab_generation_tokens_total", ())] < 1500
    assert m[("gptlab_requests_total", (("path", "/v1/chat/completions"), ("status", "429")))] == 1
