"""apps.pipelines: classification by label log-likelihood or by generation mapped to a label (and the
record saying which), extraction, inputs and their errors, the command line on a tiny model; and the same
classifications and few-shot answers through a live `gptlab serve` app as in process."""

from __future__ import annotations

import json
import math

import pytest

from _scripted_llm import ScriptedLLM, last_user
from _serve_helpers import LiveServer, load_engine, make_model_dir
from gptlab.apps.llm import open_llm
from gptlab.apps.pipelines import nearest_label, pipeline, read_inputs
from gptlab.apps.prompting import Prompter, answer, prompt_task, shot_pairs
from gptlab.cli import main
from gptlab.common import GptlabError
from gptlab.serve.app import ServeConfig, create_app

LABELS = ["sport", "politics", "science"]


def test_classify_by_log_likelihood():
    def scores(prompt, label):  # the model likes the label that appears in the text
        return -1.0 if label.strip() in last_user(prompt).split("Text:")[1] else -4.0

    llm = ScriptedLLM(lambda *a: "never called", scores)
    records = pipeline("classify", llm, labels=LABELS)(["A science fair.", "The sport of kings."])
    assert [r["label"] for r in records] == ["science", "sport"] and not llm.calls
    assert records[0]["method"] == "loglik" and sum(records[0]["probabilities"].values()) == pytest.approx(1.0)
    assert records[0]["probabilities"]["science"] == pytest.approx(math.exp(-1) / (math.exp(-1) + 2 * math.exp(-4)))
    seen = []
    llm = ScriptedLLM(lambda *a: "", lambda prompt, c: seen.append((prompt, c)) or (-1.0 if c == " negative" else -2.0))
    document = pipeline("sentiment", llm, format="qa")("Awful.")[0]
    assert document["label"] == "negative" and document["scores"] == {"positive": -2.0, "negative": -1.0}
    assert [c for _, c in seen] == [" positive", " negative"] and seen[0][0].endswith("Text: Awful.\nA:")


def test_classify_by_generation_maps_to_the_nearest_label_and_says_so():
    replies = iter(["I would say Politics.", "sprot", "Hmm."])
    records = pipeline("classify", ScriptedLLM(lambda *a: next(replies)), labels=LABELS)(["a", "b", "c"])
    assert [(r["label"], r["exact"], r["method"]) for r in records] == [
        ("politics", True, "generate"), ("sport", False, "generate"), (records[2]["label"], False, "generate")]
    assert records[1]["raw"] == "sprot" and "no log-probabilities" in records[1]["why_not_loglik"]
    assert nearest_label("It is about SCIENCE, not sport", LABELS) == ("sport", True)  # the label named last


def test_extract_and_the_generating_pipelines():
    llm = ScriptedLLM(lambda *a: 'Sure: {"name": "Ana", "age": 31}')
    record = pipeline("extract", llm, fields=["name", "age", "city"])("Ana is 31.")[0]
    assert record["fields"] == {"name": "Ana", "age": 31, "city": None} and record["missing"] == ["city"]
    assert pipeline("extract", ScriptedLLM(lambda *a: "no idea"), fields=["x"])("t")[0]["error"] == "no JSON object in the reply"
    llm = ScriptedLLM(lambda *a: " Bonjour. ")
    assert pipeline("translate", llm, target_language="French")("Hello.")[0]["translation"] == "Bonjour."
    assert "into French" in last_user(llm.calls[0]["prompt"])
    qa = pipeline("qa", llm, question="Who?")("Ana met Bo.")
    assert qa[0]["answer"] == "Bonjour." and "Context: Ana met Bo.\n\nQuestion: Who?" in last_user(llm.calls[1]["prompt"])
    for task, options, message in [("classify", {}, "two or more distinct labels"), ("extract", {}, "--fields"),
                                   ("translate", {}, "--to"), ("poem", {}, "unknown pipeline")]:
        with pytest.raises(GptlabError, match=message):
            pipeline(task, llm, **options)


def test_inputs_from_arguments_text_files_and_jsonl(tmp_path):
    (tmp_path / "t.txt").write_text("first\n\nsecond\n")
    (tmp_path / "r.jsonl").write_text('{"bio": "x"}\n{"name": "y"}\n')
    assert read_inputs(["arg"], str(tmp_path / "t.txt"), "text") == [
        ("argument 1", "arg"), (f"{tmp_path}/t.txt:1", "first"), (f"{tmp_path}/t.txt:3", "second")]
    with pytest.raises(GptlabError, match=r"r.jsonl:2: expected a JSON object with a string field 'bio'"):
        read_inputs([], str(tmp_path / "r.jsonl"), "bio")
    with pytest.raises(GptlabError, match="input file not found"):
        read_inputs([], str(tmp_path / "missing.txt"), "text")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("pipelines") / "tiny", max_seq_len=512)


def test_command_line_on_a_tiny_model(tiny_model, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["pipeline", "sentiment", "I loved it.", "Never again.", "--model", str(tiny_model), "--threads", "1",
                 "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in records] == ["argument 1", "argument 2"]
    for r in records:
        assert r["method"] == "loglik" and r["label"] in ("positive", "negative")
        assert r["label"] == max(r["scores"], key=r["scores"].get)
    assert main(["pipeline", "summarize", "Some text.", "--model", str(tiny_model), "--max-tokens", "4"]) == 0
    assert "summary" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["pipeline", "translate", "Hello", "--model", str(tiny_model)]) == 2
    assert "error: translate needs a target language" in capsys.readouterr().err


def test_classification_and_prompting_over_http_equal_in_process(tiny_model):
    live = LiveServer(create_app(load_engine(tiny_model), ServeConfig(model_name="tiny")))
    try:
        task = prompt_task("arithmetic")
        example = task.examples("test", 1)[0]
        shots = shot_pairs(task, example, 2, 0, 0)
        replies = [[answer(Prompter(llm, fmt, max_tokens=6), task, example, shots=shots)[0] for fmt in ("chat", "qa")]
                   for llm in (open_llm(str(tiny_model)), open_llm(str(tiny_model), base_url=live.url + "/v1"))]
        assert replies[0] == replies[1]  # same texts, answers, scores and token counts
        local = pipeline("classify", open_llm(str(tiny_model)), labels=LABELS)(["The match ended 2-1."])[0]
        served = pipeline("classify", open_llm(str(tiny_model), base_url=live.url + "/v1"), labels=LABELS)(
            ["The match ended 2-1."])[0]
        assert served["method"] == "loglik" and served["label"] == local["label"]
        assert served["scores"] == pytest.approx(local["scores"], abs=1e-3)
        # without the model's tokenizer the client cannot render the chat template: it generates instead
        blind = pipeline("classify", open_llm(base_url=live.url + "/v1"), labels=LABELS, max_tokens=4)(["x"])[0]
        assert blind["method"] == "generate" and blind["label"] in LABELS and "chat template" in blind["why_not_loglik"]
    finally:
        live.stop()
