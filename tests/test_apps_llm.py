"""apps.llm: the in-process backend and the HTTP backend against a real `gptlab serve` subprocess of the same
tiny model give the same answers, scores and token counts; bad input and unhelpful servers give one-line
GptlabErrors. The retry and refusal cases use a small scripted HTTP server (stdlib http.server) that
answers what a real endpoint without those features answers."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from _serve_helpers import free_port, make_model_dir
from gptlab.apps.llm import ContextOverflow, HttpLLM, LocalLLM, add_llm_args, llm_from_args, open_llm
from gptlab.checkpoint import load_model_dir
from gptlab.common import GptlabError

KEY = "test-key"
WINDOW = 256
HELLO = [{"role": "user", "content": "def dedent(text):"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("llm") / "tiny", max_seq_len=WINDOW)


@pytest.fixture(scope="module")
def url(model_dir):
    """`gptlab serve` of the tiny model in a subprocess on a free loopback port, requiring an API key."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gptlab.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--api-key", KEY, "--threads", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "gptlab serve did not start"
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def local(model_dir):
    return open_llm(str(model_dir), threads=1)


@pytest.fixture(scope="module")
def http(url):
    """The server, knowing nothing of the model but what it serves."""
    return open_llm(base_url=url, api_key=KEY)


@pytest.fixture(scope="module")
def http_tok(url, model_dir):
    """The server, with the model directory's tokenizer on the client side."""
    return open_llm(str(model_dir), base_url=url + "/v1", api_key=KEY)


def test_open_llm_backends_and_facts(local, http, http_tok, model_dir):
    assert isinstance(local, LocalLLM) and isinstance(http, HttpLLM) and isinstance(http_tok, HttpLLM)
    assert local.name == http.name == "tiny"
    assert local.context_window == http.context_window == WINDOW  # the server's max_model_len
    assert local.supports_logprobs and http.supports_logprobs
    _, tok = load_model_dir(model_dir)
    text = "return text.expandtabs()"
    assert local.count_tokens(text) == http_tok.count_tokens(text) == len(tok.encode(text))
    assert not http.exact_token_count and http.count_tokens(text) == math.ceil(len(text.encode()) / 4)


def test_greedy_chat_and_completion_equal_in_process_and_over_http(local, http, http_tok):
    for call, arg in (("chat", HELLO), ("complete", "import os\n")):
        want = getattr(local, call)(arg, max_tokens=12)
        assert len(want) == 1 and want[0].finish_reason == "length" and want[0].completion_tokens == 12
        assert getattr(http, call)(arg, max_tokens=12) == want
        assert getattr(http_tok, call)(arg, max_tokens=12) == want
    # a stop string cuts the text before it, in both backends
    full = local.chat(HELLO, max_tokens=12)[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = local.chat(HELLO, max_tokens=12, stop=[stop])[0]
    assert cut.finish_reason == "stop" and full.startswith(cut.text) and stop not in cut.text
    assert http.chat(HELLO, max_tokens=12, stop=[stop])[0].text == cut.text


def test_seeded_sampling_n_choices_equal_in_both_backends(local, http_tok):
    kwargs = dict(max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=11)
    here, there = local.chat(HELLO, **kwargs), http_tok.chat(HELLO, **kwargs)
    assert [g.text for g in here] == [g.text for g in there] and len(here) == 3
    assert len({g.text for g in here}) > 1  # choice i is seeded seed + i: the choices differ
    # per-choice token counts over HTTP come from the client's tokenizer when n > 1 (usage has the total)
    assert [g.completion_tokens for g in there] == [http_tok.count_tokens(g.text) for g in here]


def test_streaming_equals_non_streaming(local, http):
    for llm in (local, http):
        assert "".join(llm.stream_chat(HELLO, max_tokens=10)) == llm.chat(HELLO, max_tokens=10)[0].text
        assert "".join(llm.stream_complete("x = ", max_tokens=10)) == llm.complete("x = ", max_tokens=10)[0].text
    with pytest.raises(GptlabError, match="n must be 1"):
        local.stream_chat(HELLO, n=2)


def test_logprobs_equal_in_both_backends_and_obey_the_chain_rule(local, http, http_tok):
    prompt, continuations = "import", [" os", " json.decoder", " sys\n"]
    want = local.logprobs(prompt, continuations)
    assert all(v < 0 for v in want)
    assert http_tok.logprobs(prompt, continuations) == pytest.approx(want, abs=1e-4)  # token ids
    assert http.logprobs(prompt, continuations) == pytest.approx(want, abs=1e-4)  # text + text_offset
    # log p(a b | p) = log p(a | p) + log p(b | p a), split at a token boundary
    joint = local.logprobs(prompt, [" json.decoder"])[0]
    assert joint == pytest.approx(local.logprobs(prompt, [" json"])[0] + local.logprobs(prompt + " json", [".decoder"])[0],
                                  abs=1e-4)
    chat_want = local.chat_logprobs(HELLO, ["return", "    return text"])
    assert http_tok.chat_logprobs(HELLO, ["return", "    return text"]) == pytest.approx(chat_want, abs=1e-4)
    with pytest.raises(GptlabError, match="needs the model's chat template"):
        http.chat_logprobs(HELLO, ["return"])
    with pytest.raises(GptlabError, match="non-empty list"):
        local.logprobs(prompt, " os")


def test_context_window_overflow_and_clamping(local, http, http_tok):
    long_chat = [{"role": "user", "content": "text " * 400}]
    for llm in (local, http_tok):  # checked on the client side, with both numbers
        with pytest.raises(ContextOverflow, match=rf"prompt of \d+ tokens does not fit the context window of tiny \({WINDOW}"):
            llm.chat(long_chat)
    with pytest.raises(ContextOverflow, match=rf"\(400\): prompt of \d+ tokens does not fit the context window of {WINDOW}"):
        http.chat(long_chat)  # no tokenizer: the server's check
    with pytest.raises(GptlabError, match=r"\(400\): prompt of \d+ tokens does not fit"):
        http.logprobs("text " * 400, [" end"])
    assert http.supports_logprobs  # a text too long is not a server that cannot score
    # a prompt that fits gets max_tokens clamped to the room left, identically
    fits = [{"role": "user", "content": "text " * 90}]
    here = local.chat(fits, max_tokens=200)[0]
    assert here.finish_reason == "length" and here.prompt_tokens + here.completion_tokens == WINDOW
    assert http_tok.chat(fits, max_tokens=200)[0] == here


def test_http_errors_are_one_line(url):
    with pytest.raises(GptlabError, match="refused the API key \\(401\\)") as e:
        open_llm(base_url=url, api_key="wrong", max_retries=0)
    assert "\n" not in str(e.value)
    with pytest.raises(GptlabError, match="does not serve model 'gpt-5'; it serves: tiny"):
        open_llm(base_url=url, api_key=KEY, model_name="gpt-5")
    port = free_port()  # nothing listens there
    with pytest.raises(GptlabError, match=f"cannot reach http://127.0.0.1:{port}/v1: .*[Cc]onnect"):
        open_llm(base_url=f"http://127.0.0.1:{port}", max_retries=0)
    with pytest.raises(GptlabError, match="must be an http"):
        open_llm(base_url="localhost:8000")


def test_open_llm_input_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(GptlabError, match="run `gptlab models get smollm2-135m-instruct`"):
        open_llm("smollm2-135m-instruct")
    with pytest.raises(GptlabError, match="neither a model directory nor a known model name"):
        open_llm(str(tmp_path / "missing"))
    with pytest.raises(GptlabError, match="give a model"):
        open_llm()


def test_sampling_arguments_are_checked(local):
    for bad, message in ((dict(max_tokens=0), "max_tokens"), (dict(n=0), "n must"), (dict(top_p=0), "top_p"),
                         (dict(temperature=-1), "temperature"), (dict(stop=[""]), "stop strings")):
        with pytest.raises(GptlabError, match=message):
            local.chat(HELLO, **bad)


def test_command_line_flags(model_dir, url, monkeypatch):
    parser = argparse.ArgumentParser()
    add_llm_args(parser)
    assert isinstance(llm_from_args(parser.parse_args(["--model", str(model_dir), "--threads", "1"])), LocalLLM)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the key's fallback
    llm = llm_from_args(parser.parse_args(["--base-url", url, "--model-name", "tiny"]))
    assert isinstance(llm, HttpLLM) and llm.name == "tiny"


# ---- endpoints without gptlab serve's features --------------------------------------------------------------
class ScriptedServer:
    """A loopback HTTP server answering each path from a list of (status, JSON body) in turn (the last one
    repeats); it records the paths it was asked. Responses carry `retry-after-ms: 1`, so the openai client's
    retries do not sleep for seconds."""

    def __init__(self, script: dict[str, list[tuple[int, dict]]]):
        self.script, self.seen = script, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                path = self.path.split("?")[0]
                owner.seen.append(path)
                if int(self.headers.get("content-length") or 0):
                    self.rfile.read(int(self.headers["content-length"]))
                answers = owner.script.get(path, [(404, {"error": {"message": f"no route {path}"}})])
                status, body = answers.pop(0) if len(answers) > 1 else answers[0]
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("retry-after-ms", "1")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


MODELS = (200, {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x"}]})


def test_retries_429_and_5xx_then_reports_them():
    server = ScriptedServer({"/v1/models": [(429, {"error": {"message": "slow down"}}),
                                            (503, {"error": {"message": "busy"}}), MODELS]})
    try:
        llm = open_llm(base_url=server.url, max_retries=2)
        assert llm.name == "m" and server.seen == ["/v1/models"] * 3
        assert llm.context_window == 0  # not reported by this server
    finally:
        server.close()
    server = ScriptedServer({"/v1/models": [(500, {"error": {"message": "broken"}})]})
    try:
        with pytest.raises(GptlabError, match="still answers 500 after 2 retries: broken"):
            open_llm(base_url=server.url, max_retries=2)
        assert server.seen == ["/v1/models"] * 3
    finally:
        server.close()


def test_endpoint_that_cannot_score_text():
    refusal = (400, {"error": {"message": "echo is not supported", "type": "invalid_request_error"}})
    server = ScriptedServer({"/v1/models": [MODELS], "/v1/completions": [refusal],
                             "/v1/chat/completions": [(404, {"error": {"message": "The model `m` does not exist"}})]})
    try:
        llm = open_llm(base_url=server.url, max_retries=0)
        assert llm.supports_logprobs is False
        with pytest.raises(GptlabError, match="cannot score given text.*echo is not supported"):
            llm.logprobs("a", ["b"])
        with pytest.raises(GptlabError, match=r"not found \(404\): The model `m` does not exist \(served models: m\)"):
            llm.chat(HELLO)
    finally:
        server.close()


def test_endpoint_without_a_model_list(model_dir):
    server = ScriptedServer({})  # every path answers 404
    try:
        with pytest.raises(GptlabError, match="serves 0 models \\(none listed\\); choose one with --model-name"):
            open_llm(base_url=server.url, max_retries=0)
        llm = open_llm(str(model_dir), base_url=server.url, model_name="tiny", max_retries=0)
        assert llm.context_window == WINDOW  # from the model directory, as the server does not say
    finally:
        server.close()
