"""The OpenAI-compatible server, driven with the official `openai` client (and raw httpx for malformed
input) against live uvicorn servers on free localhost ports: answers equal the engine's, streaming equals
non-streaming, concurrent requests are decoded together, disconnects and shutdown cancel cleanly, and
bad input gets 4xx errors in the OpenAI shape."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from _serve_helpers import LiveServer, free_port, load_engine, make_model_dir, serve_app, train_on_answers
from gptlab.chat import render_for_completion, tool_call_json
from gptlab.checkpoint import load_model_dir
from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams
from gptlab.serve.app import ServeConfig, create_app
from gptlab.tools.calls import CALL_END, CALL_START, ToolCallParser, parse_tools, to_chat_messages
from gptlab.tools import TOOLS_HEADER

MODEL = "tiny"
HELLO = [{"role": "user", "content": "def dedent(text):"}]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A tiny model decodes several times faster on one thread than on two contended ones (the test box
    is 2 shared cores); restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def engine(model_dir):
    return load_engine(model_dir)


@pytest.fixture(scope="module")
def server(engine):
    live = LiveServer(create_app(engine, ServeConfig(model_name=MODEL, max_batch=8, max_queue=64,
                                                     max_body_bytes=64 * 1024, max_tokens_limit=1500)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# ---- the happy path through the official client ----------------------------------------------------------
def test_models_health_and_openapi(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert health(server)["status"] == "ok"
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(spec["paths"])
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_chat_greedy_equals_engine_and_streaming_equals_non_streaming(client, engine):
    ids = render_for_completion(engine.tokenizer, HELLO)
    expected = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=24))[0]
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 24)

    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_stop_strings_and_system_prompt(client, engine):
    messages = [{"role": "system", "content": "be brief"}, *HELLO]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    stop = text[10:13]  # a string that the greedy answer is known to contain
    assert stop and stop.strip()
    cut = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_choices_are_reproducible_and_match_the_engine(client, engine):
    ids = render_for_completion(engine.tokenizer, HELLO)
    kwargs = dict(model=MODEL, messages=HELLO, temperature=1.0, top_p=0.9, max_tokens=12, n=3, seed=1234)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # choice i is seeded with seed + i
    # the engine seeds row r of one prefill with seed + r: the same three rows
    expected = engine.generate([ids] * 3, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=1234))
    assert texts == [c.text for c in expected]


def test_chat_logprobs_are_the_models(client, engine):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    ids = render_for_completion(engine.tokenizer, HELLO)
    out = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=6))[0].token_ids
    scores = engine.score([ids], [out])[0]
    for entry, token, expected in zip(content, out, scores.token_logprobs):
        assert bytes(entry.bytes) == engine.tokenizer.id_to_bytes(token)
        assert entry.logprob == pytest.approx(expected, abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy = the argmax
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)


def test_completions_echo_scores_like_the_engine(client, engine):
    """What eval harnesses do: echo the prompt with max_tokens=0 and read each token's logprob."""
    context = engine.encode("def dedent(text):")
    continuation = engine.tokenizer.encode("\n    return text")
    reply = client.completions.create(model=MODEL, prompt=context + continuation, max_tokens=0, echo=True,
                                      logprobs=1)
    lp = reply.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(context) + len(continuation)
    expected = engine.score([context], [continuation])[0]
    got = lp.token_logprobs[len(context):]
    assert sum(got) == pytest.approx(expected.logprob, abs=1e-3)
    # logprobs=1: the top dict holds the argmax only, so "each token is its top entry" is lm-eval's is_greedy
    is_greedy = all(tok in lp.top_logprobs[len(context) + i] for i, tok in enumerate(lp.tokens[len(context):]))
    assert is_greedy == expected.is_greedy
    # and a continuation that IS the greedy one is recognised as such
    greedy = engine.generate([context], SamplingParams(temperature=0, max_new_tokens=4))[0].token_ids
    lp = client.completions.create(model=MODEL, prompt=context + greedy, max_tokens=0, echo=True,
                                   logprobs=1).choices[0].logprobs
    assert all(tok in lp.top_logprobs[len(context) + i] for i, tok in enumerate(lp.tokens[len(context):]))
    # a text prompt: echo returns it verbatim, text offsets index into it
    reply = client.completions.create(model=MODEL, prompt="class JSONDecoder", max_tokens=5, echo=True,
                                      logprobs=2, temperature=0)
    choice = reply.choices[0]
    assert choice.text.startswith("class JSONDecoder") and len(choice.logprobs.tokens) == len(
        engine.tokenizer.encode("class JSONDecoder")) + 5
    assert [choice.text[o:o + len(t)] for o, t in zip(choice.logprobs.text_offset, choice.logprobs.tokens)] == \
        choice.logprobs.tokens
    assert reply.usage.completion_tokens == 5


def test_completions_streaming_and_prompt_lists(client, engine):
    prompts = ["def f(x):", "import json"]
    expected = [c.text for c in engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))]
    reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == expected
    texts = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == expected


# ---- continuous batching -------------------------------------------------------------------------------
def test_concurrent_clients_are_batched_and_answers_stay_exact(client, server, engine):
    prompts = [[{"role": "user", "content": f"item {i}: " + "x" * i}] for i in range(16)]
    expected = [engine.generate([render_for_completion(engine.tokenizer, m)],
                                SamplingParams(temperature=0, max_new_tokens=20))[0].text for m in prompts]
    before = health(server)

    def ask(i):
        if i % 2:
            return client.chat.completions.create(model=MODEL, messages=prompts[i], temperature=0,
                                                  max_tokens=20).choices[0].message.content
        stream = client.chat.completions.create(model=MODEL, messages=prompts[i], temperature=0, max_tokens=20,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == expected  # batched rows (left padding, joins) give each row's solo answer
    after = health(server)
    tokens = after["generated_tokens"] - before["generated_tokens"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert tokens == 16 * 20
    assert steps < tokens / 2, f"{steps} decode steps for {tokens} tokens: requests were not batched"


def test_new_request_joins_a_running_batch(client, server):
    """A short request sent while a long one is decoding finishes first: it joined between steps."""
    long_stream = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=1200,
                                                 stream=True)
    first = next(iter(long_stream))
    assert first.choices[0].delta.role == "assistant"
    wait_until(lambda: health(server)["running_rows"] == 1)
    short = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=5)
    assert short.choices[0].finish_reason == "length"
    assert health(server)["running_rows"] == 1  # the long one is still going
    long_stream.close()
    wait_until(lambda: health(server)["running_rows"] == 0)


class ShapeRecorder(torch.nn.Module):
    """The model, plus a log of the (rows, tokens) of every forward call the decode thread makes."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, []

    def forward(self, idx, *args, **kwargs):
        self.calls.append(tuple(idx.shape))
        return self.inner(idx, *args, **kwargs)


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(model_dir):
    model, tok = load_model_dir(model_dir)
    recorder = ShapeRecorder(model.eval())
    engine = Engine(recorder, tok, strict_context=True)
    live = LiveServer(create_app(engine, ServeConfig(model_name=MODEL, prefill_chunk_tokens=32)))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        running = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=1500,
                                                 stream=True)
        next(iter(running))
        wait_until(lambda: httpx.get(live.url + "/health").json()["running_rows"] == 1)
        long_prompt = [{"role": "user", "content": "def dedent(text): " * 40}]
        ids = render_for_completion(tok, long_prompt)
        recorder.calls.clear()
        reply = client.chat.completions.create(model=MODEL, messages=long_prompt, temperature=0, max_tokens=5)
        calls = list(recorder.calls)
        running.close()
    finally:
        live.stop()
    # the long prompt went in as ceil(len / 32) chunks of 32 tokens, with a decode step of the running
    # stream (1 row, 1 token) after each chunk: that stream never waited for the whole prefill
    chunks = [i for i, shape in enumerate(calls) if shape[1] > 1]
    assert [calls[i] for i in chunks] == [(1, min(32, len(ids) - k)) for k in range(0, len(ids), 32)]
    assert len(ids) > 5 * 32 and all(calls[i + 1] == (1, 1) for i in chunks[:-1])
    # and the answer is the one an unchunked prefill gives
    expected = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=5))[0].text
    assert reply.choices[0].message.content == expected


@pytest.fixture
def slow_decode(engine, monkeypatch):
    """Each decode step held 2 ms, so 1,500 tokens take at least 3 s: the disconnect tests then do not
    depend on how fast this machine decodes the tiny model (one thread decodes them in well under 1 s)."""
    step = engine.step

    def slow_step(batch):
        time.sleep(0.002)
        return step(batch)

    monkeypatch.setattr(engine, "step", slow_step)


def test_disconnecting_stream_leaves_the_batch(server, slow_decode):
    before = health(server)
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        wait_until(lambda: health(server)["running_rows"] == 1)
    # the connection is closed: the row must leave the batch long before its 1500 tokens
    wait_until(lambda: health(server)["running_rows"] == 0, timeout=10)
    time.sleep(0.3)
    after = health(server)
    assert after["generated_tokens"] - before["generated_tokens"] < 1500
    assert after["running_rows"] == 0


def test_disconnecting_non_streaming_client_cancels(server, slow_decode):
    """The client gives up after 0.5 s, long before the 1,500 tokens it asked for (>= 3 s)."""
    before = health(server)
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 1500}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
    wait_until(lambda: health(server)["running_rows"] == 0, timeout=10)
    assert health(server)["generated_tokens"] - before["generated_tokens"] < 1500


def test_batch_cache_stays_bounded_while_rows_come_and_go(engine):
    """Under continuous batching the batch may never empty: once the rows that filled the oldest cache
    slots leave, those slots are dropped, and the remaining row still decodes exactly as alone."""
    greedy = SamplingParams(temperature=0, max_new_tokens=30)
    a_ids, b_ids = engine.encode("def f(x):"), engine.encode("import json")
    batch = engine.prefill([a_ids], SamplingParams(temperature=0, max_new_tokens=20))
    for _ in range(10):
        engine.step(batch)
    batch.join(engine.prefill([b_ids], greedy, first_index=1))
    b_steps, b_text = 0, ""
    while batch.rows:
        for event in engine.step(batch):
            if event.row == 1:
                b_steps, b_text = b_steps + 1, b_text + event.text
        if batch.rows and [r.index for r in batch.rows] == [1]:
            assert batch.cache.length == len(b_ids) + b_steps  # nothing left of row 0's slots
    assert b_text == engine.generate([b_ids], greedy)[0].text


# ---- tool calls ----------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PARIS = {"role": "user", "content": "What is the weather in Paris?"}
BROKEN = {"role": "user", "content": "Break it."}
PARIS_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
BAD_CALL_JSON = '{"name": "get_weather", "arguments": {"city": '


@pytest.fixture(scope="module")
def tool_engine(model_dir):
    """A 2-layer model trained (from a fresh init, ~60 Adam steps) to answer three prompts in the chat
    format: a well-formed get_weather call, a call with broken JSON, and a final answer after the tool's
    output. The prompts carry the tool list in the system prompt, written out here as tools.py documents
    it, so the server reproduces these answers only if it renders requests exactly that way."""
    _, tok = load_model_dir(model_dir)
    sp = tok.special_id
    system = {"role": "system", "content": "Tools you can call, one JSON per line (name, description, JSON Schema "
              "of the arguments):\n" + json.dumps(
                  {"name": "get_weather", "description": "Current weather in a city",
                   "parameters": WEATHER["function"]["parameters"]})}
    call_ids = [sp("<|tool_call_start|>"), *tok.encode(tool_call_json(PARIS_CALL)), sp("<|tool_call_end|>")]
    after_output = [system, PARIS, {"role": "assistant", "content": None, "tool_calls": [PARIS_CALL]},
                    {"role": "tool", "content": "sunny, 21 C"}]
    examples = [
        (render_for_completion(tok, [system, PARIS]), call_ids),
        (render_for_completion(tok, [system, BROKEN]),
         [sp("<|tool_call_start|>"), *tok.encode(BAD_CALL_JSON), sp("<|tool_call_end|>")]),
        (render_for_completion(tok, after_output), [*tok.encode("It is sunny in Paris."), sp("<|assistant_end|>")]),
    ]
    model, loss = train_on_answers(examples, tok.vocab_size, max_seq_len=512)
    engine = Engine(model.eval(), tok, strict_context=True)
    for prompt, answer in examples:  # the premise of the tests below: greedy decoding writes the answers
        out = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=len(answer), stop_token_ids=()))
        assert out[0].token_ids == answer, f"training did not converge (loss {loss:.3f})"
    return engine


@pytest.fixture(scope="module")
def tool_client(tool_engine):
    live = LiveServer(create_app(tool_engine, ServeConfig(model_name=MODEL)))
    yield openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    live.stop()


def test_tool_call_round_trip_through_the_official_client(tool_client):
    reply = tool_client.chat.completions.create(model=MODEL, messages=[PARIS], tools=[WEATHER], temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > len("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(tool_client.chat.completions.create(model=MODEL, messages=[PARIS], tools=[WEATHER],
                                                      temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(streamed) == 1 and streamed[0].index == 0 and streamed[0].id.startswith("call_")
    assert (streamed[0].function.name, streamed[0].function.arguments) == (call.function.name, call.function.arguments)
    assert "".join(d.content or "" for d in deltas) == ""  # the call's JSON never leaks into the content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    # the next request sends the call back (as the client returned it) with the tool's output: the model
    # was trained to answer that exact rendering
    messages = [PARIS, choice.message, {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    final = tool_client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0)
    assert final.choices[0].message.content == "It is sunny in Paris."
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.tool_calls is None


def test_malformed_tool_call_is_repaired(tool_client):
    # the model closed its call after '"city": ': read defensively (json-repair), a call with an empty city
    reply = tool_client.chat.completions.create(model=MODEL, messages=[BROKEN], tools=[WEATHER], temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": ""} and reply.choices[0].finish_reason == "tool_calls"
    # streamed: the same call in one delta (a call to a tool not offered stays content: the parser test below)
    chunks = [c for c in tool_client.chat.completions.create(model=MODEL, messages=[BROKEN], tools=[WEATHER],
                                                             temperature=0, stream=True) if c.choices]
    (streamed,) = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert streamed.function.arguments == call.function.arguments and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_stops_before_a_call(tool_client):
    # the model starts its answer with a call; with "none" decoding ends before it, so nothing is returned
    reply = tool_client.chat.completions.create(model=MODEL, messages=[PARIS], tools=[WEATHER], tool_choice="none",
                                                temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content == ""
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 0


def test_tool_call_parser_on_scripted_events(small_tokenizer):
    """The parser alone, fed decode events as the scheduler delivers them: (token id, released text,
    finish reason). Text before a call stays content; a call to a tool that was not offered, or one cut
    by the token budget, comes back as the model's raw text."""
    start, end = small_tokenizer.special_id(CALL_START), small_tokenizer.special_id(CALL_END)

    def run(events, names=("get_weather",)):
        parser = ToolCallParser(start, end, frozenset(names))
        content, calls, finish = "", [], None
        for token, text, reason in events:
            piece, call, finish = parser.feed(token, text, reason)
            content += piece
            calls += [call] if call else []
        return content, calls, finish

    call = [(start, "Let me check." + CALL_START, None), (7, '{"name": "get_weather", ', None),
            (8, '"arguments": {"city": "Oslo"}}', None), (end, "", "stop")]
    content, calls, finish = run(call)
    assert (content, finish) == ("Let me check.", "tool_calls")
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert run(call, names=("get_time",)) == ("Let me check." + CALL_START + '{"name": "get_weather", '
                                              '"arguments": {"city": "Oslo"}}' + CALL_END, [], "stop")
    assert run(call[:2] + [(8, '"argu', "length")]) == (
        "Let me check." + CALL_START + '{"name": "get_weather", "argu', [], "length")
    assert run([(5, "plain", None), (end, "", "stop")]) == ("plain", [], "stop")  # no call started


def test_tool_messages_follow_their_calls_and_tools_join_the_system_prompt():
    calls = [{"id": cid, "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
             for cid, city in (("a", "Oslo"), ("b", "Rome"))]
    messages = [{"role": "system", "content": "Be brief."}, PARIS, {"role": "assistant", "content": None,
                                                                     "tool_calls": calls},
                {"role": "tool", "tool_call_id": "b", "content": "rain"},  # answered out of order
                {"role": "tool", "tool_call_id": "a", "content": "snow"}]
    offered = parse_tools([WEATHER])
    converted = to_chat_messages(messages, offered)
    assert converted[0]["content"] == "Be brief.\n\n" + TOOLS_HEADER + "\n" + json.dumps(offered[0])
    assert converted[2]["tool_calls"] == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                                          {"name": "get_weather", "arguments": '{"city": "Rome"}'}]
    assert converted[3:] == [{"role": "tool", "content": "snow"}, {"role": "tool", "content": "rain"}]
    assert to_chat_messages([PARIS], offered)[0]["role"] == "system"  # created when the request has none


@pytest.mark.parametrize("extra, param, contains", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "not among the tools"),
    ({"tool_choice": "auto"}, "tool_choice", "only allowed when tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0]"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"messages": [PARIS, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "call_2", "content": "x"}]},
     "messages", "call_2"),
    ({"messages": [PARIS, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]},
     "messages", "not a JSON object"),
])
def test_bad_tool_requests(server, extra, param, contains):
    assert_openai_error(post(server, "/v1/chat/completions", chat_body(**extra)), 400, param, None, contains)


# ---- bad input -----------------------------------------------------------------------------------------
def post(server, path, content: bytes | str, headers=None):
    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30)


def assert_openai_error(response, status, param=None, code=None, contains=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if contains is not None:
        assert contains in error["message"]


def chat_body(**overrides) -> str:
    return json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 4, **overrides})


@pytest.mark.parametrize("content, status, param, code, contains", [
    (b'{"model": "tiny", "messages": [', 400, None, "invalid_json", "not valid JSON"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "caf\xe9"}]}', 400, None, None, "UTF-8"),
    (chat_body(temperature="hot"), 400, "temperature", None, None),
    (chat_body(messages="hello"), 400, "messages", None, None),
    (chat_body(messages=[]), 400, "messages", None, None),
    (chat_body(messages=[{"role": "wizard", "content": "x"}]), 400, None, None, None),
    (chat_body(messages=[{"role": "assistant", "content": "hi"}]), 400, "messages", None, "expected"),
    (chat_body(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), 400, "messages", None,
     "alternate"),
    (chat_body(messages=[*HELLO, {"role": "system", "content": "late"}]), 400, "messages", None, "first"),
    (chat_body(model="gpt-9"), 404, "model", "model_not_found", "gpt-9"),
    (chat_body(max_tokens=10 ** 9), 400, "max_tokens", None, "limit"),
    (chat_body(max_tokens=-1), 400, "max_tokens", None, None),
    (chat_body(max_tokens=1400, messages=[{"role": "user", "content": "x " * 700}]), 400, "max_tokens",
     "context_length_exceeded", None),
    (chat_body(messages=[{"role": "user", "content": "word " * 3000}]), 400, "messages", "context_length_exceeded",
     None),
    (chat_body(n=9), 400, "n", None, None),
    (chat_body(top_logprobs=2), 400, None, None, "logprobs"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None, None),
    (chat_body(frequency_penalty=0.5), 400, None, None, "repetition_penalty"),
    (chat_body(top_p=0), 400, "top_p", None, None),
    (json.dumps({"model": MODEL, "messages": HELLO, "padding": "y" * 70_000}), 413, None, None, "limit"),
])
def test_bad_chat_requests(server, content, status, param, code, contains):
    assert_openai_error(post(server, "/v1/chat/completions", content), status, param, code, contains)


@pytest.mark.parametrize("body, param, contains", [
    ({"prompt": [], "max_tokens": 3}, "prompt", "empty"),
    ({"prompt": [1, 2, 99999], "max_tokens": 3}, "prompt", "vocabulary"),
    ({"prompt": "x", "max_tokens": 0}, None, "echo"),
    ({"prompt": "x", "logprobs": 50}, "logprobs", None),
])
def test_bad_completion_requests(server, body, param, contains):
    response = post(server, "/v1/completions", json.dumps({"model": MODEL, **body}))
    assert_openai_error(response, 400, param, None, contains)


def test_official_client_raises_its_usual_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10 ** 9)
    assert e.value.body["param"] == "max_tokens"


def test_server_survives_bad_input_and_serves_after(server, client):
    for content in [b"", b"null", b"[]", b"\x00\x01", b'{"model": 1}', b"{}" * 1000]:
        assert post(server, "/v1/chat/completions", content).status_code == 400
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices[0].finish_reason


# ---- API key and the bounded queue ---------------------------------------------------------------------
def test_api_key_and_full_queue(engine):
    live = LiveServer(create_app(engine, ServeConfig(model_name=MODEL, api_key="s3cret", max_batch=1, max_queue=1)))
    try:
        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=live.url + "/v1", api_key=key or "x", max_retries=0).models.list()
        assert httpx.get(live.url + "/v1/models").status_code == 401
        authed = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert authed.models.list().data[0].id == MODEL
        # one request decoding (batch of 1), one waiting (queue of 1): the third is refused with 429
        running = authed.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1500, temperature=0,
                                                 stream=True)
        next(iter(running))
        wait_until(lambda: httpx.get(live.url + "/health").json()["running_rows"] == 1)
        waiting = authed.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True)
        wait_until(lambda: httpx.get(live.url + "/health").json()["waiting_requests"] == 1)
        with pytest.raises(openai.RateLimitError):
            authed.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
        running.close()  # its row leaves; the waiting request gets the slot and completes
        assert [c.choices[0].finish_reason for c in waiting if c.choices][-1] == "length"
    finally:
        live.stop()


# ---- the real command: SIGTERM -------------------------------------------------------------------------
def test_cli_serve_graceful_shutdown_on_sigterm(tmp_path):
    """SIGTERM with two streams running: 'short' (30 tokens) finishes inside a generous grace period on
    any machine; 'long' (16,000 tokens of a 16k-context model) is ended by our decode loop with an SSE
    error event when the grace period runs out, never before it (or, on a machine fast enough to write
    it all in time, it finishes normally)."""
    grace = 5.0
    model_dir = make_model_dir(tmp_path / MODEL, max_seq_len=16384)
    port = free_port()
    env = {**os.environ, "GPTLAB_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "gptlab.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--shutdown-timeout", str(grace), "--threads", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        wait_until(up, timeout=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=120)
        assert client.models.list().data[0].id == MODEL
        results, ended = {}, {}

        def consume(name, max_tokens):
            chunks = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=max_tokens,
                                                    stream=True, stream_options={"include_usage": True})
            finish, tokens = None, None
            try:
                for c in chunks:
                    finish = (c.choices[0].finish_reason if c.choices else None) or finish
                    tokens = c.usage.completion_tokens if c.usage else tokens
                results[name] = (finish, tokens)
            except (httpx.HTTPError, openai.APIError) as e:
                results[name] = (f"cut: {type(e).__name__}", None)
            ended[name] = time.monotonic()

        threads = [threading.Thread(target=consume, args=("short", 30)),
                   threading.Thread(target=consume, args=("long", 16000))]
        for t in threads:
            t.start()
        # both streams decoding; on a fast machine 'short' may already be done before both are ever seen at
        # once, which is fine: it must then have ended normally too
        wait_until(lambda: httpx.get(url + "/health").json()["running_rows"] == 2 or "short" in results,
                   timeout=120)
        wait_until(lambda: httpx.get(url + "/health").json()["running_rows"] >= 1, timeout=120)  # 'long' runs
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(grace + 60)
        # uvicorn re-raises the signal after its graceful shutdown, the conventional exit for SIGTERM
        assert proc.wait(60) in (0, -signal.SIGTERM)
        output = proc.stdout.read()
        assert "decode loop stopped" in output and "Traceback" not in output, output
        assert not any(t.is_alive() for t in threads)
        assert results["short"] == ("length", 30)  # finished normally during the grace period
        assert results["long"] in (("length", 16000), ("cut: APIError", None)), results  # APIError: the error event
        if results["long"][0].startswith("cut"):
            assert ended["long"] - sent >= grace - 1.0  # cut when the grace period ran out, not before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- served model names (--served-model-name) ----------------------------------------------------------
def test_unknown_model_404_lists_the_served_names(server):
    response = post(server, "/v1/chat/completions", chat_body(model="gptlab"))
    assert_openai_error(response, 404, "model", "model_not_found", "this server serves 'tiny'")


def test_served_model_names_from_the_command_line(model_dir, monkeypatch):
    from starlette.testclient import TestClient

    app = serve_app(["serve", "--model", str(model_dir), "--served-model-name", "gptlab", "alias"], monkeypatch)
    with TestClient(app) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["gptlab", "alias"]
        for name in ("gptlab", "alias"):  # either name is accepted; responses carry the first
            reply = http.post("/v1/chat/completions", json={"model": name, "messages": HELLO, "max_tokens": 2,
                                                            "temperature": 0})
            assert reply.status_code == 200 and reply.json()["model"] == "gptlab"
        refused = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2})
        assert_openai_error(refused, 404, "model", "model_not_found", "serves 'gptlab', 'alias'")
    app = serve_app(["serve", "--model", str(model_dir)], monkeypatch)  # default: the directory's name
    with TestClient(app) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [model_dir.name]


def test_readme_client_example_works_with_the_readme_serve_command(model_dir, tmp_path, monkeypatch):
    """The README's `gptlab serve` line and its Python client example, as written (only the model files,
    the port and a max_tokens limit, which keeps the random model's answer short, are this test's)."""
    import re
    import shlex
    import shutil
    from pathlib import Path

    from starlette.testclient import TestClient

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    serve_line = next(line for line in readme.splitlines() if line.startswith("gptlab serve "))
    argv = shlex.split(serve_line, comments=True)[1:]
    model_path = Path(argv[argv.index("--model") + 1])
    # the model directory under the README's own path, so a default name would be the same as there
    shutil.copytree(model_dir, tmp_path / model_path)
    monkeypatch.chdir(tmp_path)
    app = serve_app([*argv, "--max-tokens-limit", "8"], monkeypatch)
    example = re.search(r"Any OpenAI client works against `gptlab serve`.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "http://localhost:8000/v1" in example
    with TestClient(app) as http:
        # the official client, sending its requests through the in-process app instead of a socket
        import openai as openai_module

        class Client(openai_module.OpenAI):
            def __init__(self, **kwargs):
                super().__init__(**{**kwargs, "base_url": "http://testserver/v1"}, http_client=http)

        namespace: dict = {}
        monkeypatch.setattr(openai_module, "OpenAI", Client)
        exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["reply"].choices[0].message.content
    assert namespace["reply"].choices[0].finish_reason == "length"


# ---- route functions called directly, without HTTP -----------------------------------------------------
def run_routes(engine, coroutine_fn, **config):
    """`coroutine_fn(state)` on an event loop with the state's decode thread running."""
    import asyncio

    from gptlab.serve.state import ServerState

    state = ServerState(engine, ServeConfig(model_name=MODEL, **config))

    async def run():  # as the app's lifespan: the decode thread stops while the loop it reports to still runs
        state.scheduler.start()
        try:
            return await coroutine_fn(state)
        finally:
            await asyncio.to_thread(state.scheduler.stop)

    return asyncio.run(run())


def test_route_functions_answer_without_http(engine):
    from gptlab.serve import routes
    from gptlab.serve.protocol import ChatCompletionRequest, CompletionRequest

    ids = render_for_completion(engine.tokenizer, HELLO)
    expected = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=10))[0]
    prompt_expected = engine.generate(["def f("], SamplingParams(temperature=0, max_new_tokens=6))[0]

    async def calls(state):
        chat = ChatCompletionRequest(model="alias", messages=HELLO, temperature=0, max_tokens=10)
        reply = await routes.chat_completions(chat, state)
        stream = await routes.chat_completions(chat.model_copy(update={"stream": True}), state)
        events = [line async for line in stream.body_iterator]
        text = await routes.completions(CompletionRequest(model=MODEL, prompt="def f(", max_tokens=6, temperature=0),
                                        state)
        return reply, events, text, routes.list_models(state), routes.health(state)

    reply, events, text, models, health = run_routes(engine, calls, aliases=("alias",))
    assert reply["model"] == MODEL and reply["choices"][0]["message"]["content"] == expected.text
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 10, "total_tokens": len(ids) + 10}
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text
    assert text["choices"][0]["text"] == prompt_expected.text
    assert [m["id"] for m in models["data"]] == [MODEL, "alias"]
    assert health["model"] == MODEL and health["generated_tokens"] >= 10 + 10 + 6  # counted before delivery


def test_route_functions_raise_api_errors(engine):
    import asyncio

    from gptlab.serve import routes
    from gptlab.serve.protocol import ChatCompletionRequest
    from gptlab.serve.state import ApiError

    async def calls(state):
        errors = []
        for update in ({"model": "gpt-9"}, {"max_tokens": 10 ** 6}):
            with pytest.raises(ApiError) as e:
                body = ChatCompletionRequest(**{"model": MODEL, "messages": HELLO, **update})
                await routes.chat_completions(body, state)
            errors.append(e.value)
        with pytest.raises(ApiError) as e:
            state.check_api_key("Bearer wrong")
        errors.append(e.value)
        state.check_api_key("Bearer s3cret")  # the right key passes

        async def gone() -> bool:  # the client has disconnected: the request is cancelled, its row dropped
            return True

        with pytest.raises(ApiError) as e:
            await routes.chat_completions(ChatCompletionRequest(model=MODEL, messages=HELLO, temperature=0,
                                                                max_tokens=1500), state, gone)
        errors.append(e.value)
        for _ in range(200):
            if state.scheduler.running_rows == 0:
                break
            await asyncio.sleep(0.05)
        return errors, state.scheduler.running_rows, state.scheduler.generated_tokens

    errors, running, generated = run_routes(engine, calls, api_key="s3cret", poll_disconnect_s=0.01)
    assert [(e.status, e.param, e.code) for e in errors] == [(404, "model", "model_not_found"),
                                                             (400, "max_tokens", "invalid_value"),
                                                             (401, None, "invalid_api_key"), (499, None, None)]
    assert "this server serves 'tiny'" in errors[0].message
    assert running == 0 and generated < 1500
