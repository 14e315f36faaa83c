"""Default sampling settings: explicit > the model's generation_config.json > the command's defaults, for
`gptlab chat`, `gptlab sample` and `gptlab serve` alike; `gptlab import` / `export` carry the file."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from _serve_helpers import load_engine, make_model_dir, serve_app
from gptlab.chat import render_for_completion
from gptlab.checkpoint import CHECKSUMS
from gptlab.cli import main as cli_main
from gptlab.common import GptlabError
from gptlab.infer.sampling import SamplingParams
from gptlab.infer.generation_config import (BASE_DEFAULTS, CHAT_DEFAULTS, GENERATION_CONFIG_FILE,
                                            read_generation_config, resolve_sampling)
from gptlab.interop import export_hf, import_model
from gptlab.serve.protocol import ChatCompletionRequest, CompletionRequest
from gptlab.serve.state import ServeConfig, ServerState

HELLO = [{"role": "user", "content": "def dedent(text):"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("generation") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir):
    return load_engine(model_dir)


@pytest.fixture
def with_config(model_dir):
    """Write `settings` as the model's generation_config.json for one test (removed afterwards)."""
    path = model_dir / GENERATION_CONFIG_FILE

    def write(settings) -> None:
        path.write_text(json.dumps(settings), encoding="utf-8")
    yield write
    path.unlink(missing_ok=True)


def sampling_line(caplog) -> str:
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sampling: ")]
    return line


def test_read_generation_config(tmp_path, caplog):
    assert read_generation_config(tmp_path) == {}
    path = tmp_path / GENERATION_CONFIG_FILE
    # as transformers writes it for e.g. Qwen2.5-Instruct: token ids and versions are not sampling settings
    path.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": True, "temperature": 0.7,
                                "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                                "transformers_version": "4.45.0"}))
    assert read_generation_config(tmp_path) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                "repetition_penalty": 1.05}
    path.write_text(json.dumps({"do_sample": False, "temperature": 0.7}))  # transformers: greedy
    assert read_generation_config(tmp_path) == {"temperature": 0}
    with caplog.at_level(logging.WARNING, logger="gptlab"):
        path.write_text(json.dumps({"temperature": 0.6, "min_p": 0.05}))
        assert read_generation_config(tmp_path) == {"temperature": 0.6}
    assert "min_p not supported" in caplog.text
    for bad, message in [({"top_k": 2.5}, "top_k must be an integer"), ({"temperature": "hot"}, "temperature must be"),
                         ({"top_p": 0}, "top_p must be in"), ({"repetition_penalty": True}, "repetition_penalty"),
                         ([0.7], "expected a JSON object")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(GptlabError, match=message) as e:
            read_generation_config(tmp_path)
        assert str(path) in str(e.value)
    path.write_text("{")
    with pytest.raises(GptlabError, match="not valid JSON"):
        read_generation_config(tmp_path)


def test_resolve_sampling_takes_each_setting_from_the_first_source_that_has_it():
    resolved = resolve_sampling({"temperature": 0.3, "top_k": None}, {"temperature": 0.6, "top_k": 20},
                                CHAT_DEFAULTS)
    assert resolved.values == {"temperature": 0.3, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.0}
    assert resolved.sources == {"temperature": "command line", "top_k": GENERATION_CONFIG_FILE, "top_p": "default",
                                "repetition_penalty": "default"}
    assert resolved.describe().startswith("temperature 0.3 (command line), top_k 20 (generation_config.json), ")
    assert resolve_sampling({}, {}, BASE_DEFAULTS).values == BASE_DEFAULTS
    assert resolve_sampling({"temperature": 0}, {"temperature": 0.6}, BASE_DEFAULTS).values["temperature"] == 0


def test_chat_defaults_file_and_explicit_flags(model_dir, engine, with_config, capsys, caplog):
    greedy = engine.generate([render_for_completion(engine.tokenizer, HELLO)],
                             SamplingParams(temperature=0, max_new_tokens=8))[0].text
    chat = ["chat", "--model", str(model_dir), "-p", HELLO[0]["content"], "--max-new-tokens", "8"]
    caplog.set_level(logging.INFO, logger="gptlab")
    assert cli_main(chat) == 0
    assert sampling_line(caplog) == ("sampling: temperature 0.8 (default), top_k 0 (default), top_p 0.95 (default), "
                                     "repetition_penalty 1 (default)")
    with_config({"do_sample": False})
    caplog.clear()
    capsys.readouterr()
    assert cli_main(chat) == 0
    assert "temperature 0 (generation_config.json)" in sampling_line(caplog)
    assert capsys.readouterr().out == greedy + "\n"
    caplog.clear()
    assert cli_main([*chat, "--temperature", "0.5", "--top-p", "0.9"]) == 0
    assert sampling_line(caplog).startswith("sampling: temperature 0.5 (command line), top_k 0 (default), "
                                            "top_p 0.9 (command line)")


def test_sample_keeps_the_untouched_distribution_unless_the_model_says_otherwise(model_dir, engine, with_config,
                                                                                  capsys, caplog):
    sample = ["sample", "--model", str(model_dir), "--prompt", "def f(", "--max-new-tokens", "6"]
    caplog.set_level(logging.INFO, logger="gptlab")
    assert cli_main(sample) == 0
    assert sampling_line(caplog) == ("sampling: temperature 1 (default), top_k 0 (default), top_p 1 (default), "
                                     "repetition_penalty 1 (default)")
    with_config({"top_k": 1})  # top-k 1 is greedy whatever the temperature
    caplog.clear()
    capsys.readouterr()
    assert cli_main(sample) == 0
    assert "top_k 1 (generation_config.json)" in sampling_line(caplog)
    greedy = engine.generate(["def f("], SamplingParams(temperature=0, max_new_tokens=6))[0].text
    assert capsys.readouterr().out == greedy + "\n"
    with_config({"top_p": 7})
    assert cli_main(sample) == 2
    assert "generation_config.json: top_p must be in (0, 1]" in capsys.readouterr().err


def test_server_requests_resolve_like_the_commands(engine):
    def params(generation_config, body):
        state = ServerState(engine, ServeConfig(model_name="tiny", generation_config=generation_config))
        return state.sampling(body, prompt_len=5, max_tokens=4)

    chat = ChatCompletionRequest(model="tiny", messages=HELLO)
    text = CompletionRequest(model="tiny", prompt="x")
    p = params({}, chat)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.8, 0.95, 0, 1.0)
    p = params({}, text)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (1.0, 1.0, 0, 1.0)
    p = params({"temperature": 0.6, "top_k": 20}, chat)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.95, 20)
    p = params({"temperature": 0.6, "top_k": 20}, chat.model_copy(update={"temperature": 1.2, "top_k": 0}))
    assert (p.temperature, p.top_k) == (1.2, 0)  # the request wins, an explicit 0 included


def test_serve_command_reads_the_models_generation_config(model_dir, engine, with_config, monkeypatch, caplog):
    from starlette.testclient import TestClient

    with_config({"do_sample": False})
    caplog.set_level(logging.INFO, logger="gptlab")
    app = serve_app(["serve", "--model", str(model_dir)], monkeypatch)
    with TestClient(app) as http:
        reply = http.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 8}).json()
    assert "chat requests that leave them out sample with temperature 0 (generation_config.json)" in caplog.text
    greedy = engine.generate([render_for_completion(engine.tokenizer, HELLO)],
                             SamplingParams(temperature=0, max_new_tokens=8))[0].text
    assert reply["choices"][0]["message"]["content"] == greedy


def test_import_copies_and_export_carries_the_generation_config(model_dir, tmp_path):
    export_hf(model_dir, tmp_path / "hf")
    hf_file = tmp_path / "hf" / GENERATION_CONFIG_FILE
    exported = json.loads(hf_file.read_text())
    hf_file.write_text(json.dumps({**exported, "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    (tmp_path / "hf" / CHECKSUMS).unlink()  # edited by hand: a folder without a manifest, as a user's HF folder
    import_model(tmp_path / "hf", tmp_path / "ours")
    assert read_generation_config(tmp_path / "ours") == {"temperature": 0.6, "top_p": 0.9}
    export_hf(tmp_path / "ours", tmp_path / "again")
    again = json.loads((tmp_path / "again" / GENERATION_CONFIG_FILE).read_text())
    assert {key: again.get(key) for key in ("do_sample", "temperature", "top_p")} == \
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    # settings the engine cannot sample with are refused before anything is written
    shutil.rmtree(tmp_path / "ours")
    hf_file.write_text(json.dumps({**exported, "top_p": 1.5}))
    with pytest.raises(GptlabError, match="generation_config.json: top_p"):
        import_model(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
