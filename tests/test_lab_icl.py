"""In-context learning lab (gptlab.lab.icl): the tasks (balanced, demonstrations disjoint from questions), the
label conditions, the prefix-reusing scorer against LLM.logprobs, the context stop, resuming from the answer
cache, the sweep layout with missing and foreign runs, a served model (--base-url) answering as in process,
and the CLI. A tiny random-init model: these tests
check the machinery, not the accuracy."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from _serve_helpers import LiveServer, load_engine, make_model_dir
from gptlab.apps.llm import LocalLLM
from gptlab.cli import main as cli_main
from gptlab.common import GptlabError
from gptlab.lab import icl
from gptlab.serve.app import create_app
from gptlab.serve.state import ServeConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("icl") / "tiny", max_seq_len=256)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LocalLLM(model_dir)


@pytest.mark.parametrize("name", list(icl.TASK_BUILDERS))
def test_tasks_are_balanced_and_questions_never_demonstrations(name):
    task = icl.TASK_BUILDERS[name](10)
    n_labels = len(task.labels)
    assert [item.label for item in task.test] == [i % n_labels for i in range(10)]
    assert len(task.pool) == icl.POOL_SIZE and {item.label for item in task.pool} == set(range(n_labels))
    pool_texts = {item.text for item in task.pool}
    assert len(pool_texts) == icl.POOL_SIZE  # distinct demonstrations
    assert not pool_texts & {item.text for item in task.test}
    assert icl.TASK_BUILDERS[name](10) == task  # deterministic


def test_label_conditions_and_nested_orderings():
    task = icl.sentiment_task(4)
    demos = {c: icl.demonstrations(task, c, 32, seed=1) for c in icl.CONDITIONS}
    true_words = [word for _, word in demos["true"]]
    by_text = {item.text: item.label for item in task.pool}
    assert true_words == [task.labels[by_text[text]] for text, _ in demos["true"]]
    assert [w for _, w in demos["flipped"]] == [task.labels[1 - task.labels.index(w)] for w in true_words]
    assert [w for _, w in demos["unrelated"]] == [{"positive": "foo", "negative": "bar"}[w] for w in true_words]
    random_words = [w for _, w in demos["random"]]
    assert set(random_words) <= set(task.labels) and random_words != true_words
    for condition in icl.CONDITIONS:  # k demonstrations are the first k of the same ordering
        assert icl.demonstrations(task, condition, 8, seed=1) == demos[condition][:8]
    assert icl.demonstrations(task, "true", 8, seed=2) != demos["true"][:8]
    bbc = icl.bbc_task(5)
    flipped = icl.demonstrations(bbc, "flipped", 16, seed=0)
    shown = {text: word for text, word in flipped}
    assert all(shown[item.text] == bbc.labels[(item.label + 1) % 5] for item in bbc.pool if item.text in shown)
    prompt = icl.render(task, demos["true"][:2], "Great.")
    assert prompt.endswith("Review: Great.\nSentiment:") and prompt.count("\nSentiment: ") == 2


def test_scorer_reuses_prefixes_and_matches_logprobs(llm):
    singles = [w for w in ("the", "a", "in", "is", "if", "not", "and", "or", "to") if len(llm.tokenizer.encode(f" {w}")) == 1]
    assert len(singles) >= 2
    task = icl.sentiment_task(3)
    scorer = icl.LabelScorer(llm)
    prompts = [icl.render(task, icl.demonstrations(task, "true", k, 0), item.text) for k in (1, 2) for item in task.test]
    prompts.append("Something else entirely:")  # shares no prefix
    assert max(map(len, map(llm.engine.encode, prompts))) < 256
    for prompt in prompts:
        got = scorer(prompt, singles[:3])
        want = llm.logprobs(prompt, [f" {w}" for w in singles[:3]])
        assert got == pytest.approx(want, abs=2e-4)
        assert scorer.ids == llm.engine.encode(prompt)
    multi = [w for w in ("positive", "negative", "quux", "entertainment") if len(llm.tokenizer.encode(f" {w}")) > 1]
    assert len(multi) >= 2  # several-token labels run on the prompt's keys/values too
    for prompt in prompts[:3]:
        assert scorer(prompt, multi + singles[:1]) == pytest.approx(
            llm.logprobs(prompt, [f" {w}" for w in multi + singles[:1]]), abs=2e-4)


def test_run_stops_where_the_context_ends_and_resumes_from_cache(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = icl.IclConfig(str(out), ("sentiment", "bbc_topics"), icl.CONDITIONS, icl.KS, n=2, seeds=2)
    report = icl.run([("tiny", str(model_dir), None)], cfg)
    model = report["models"][0]
    ks = sorted(int(k) for k in model["table"]["sentiment"]["true"])
    assert ks[0] == 0 and ks[-1] < 32  # 256 tokens hold a few reviews, not 32
    assert any("cannot hold" in note and "sentiment" in note for note in model["notes"])
    cell = model["table"]["sentiment"]["true"][str(ks[-1])]
    assert cell["seeds"] == 2 and 0 <= cell["min"] <= cell["mean"] <= cell["max"] <= 1
    assert model["table"]["sentiment"]["true"]["0"]["std"] == 0  # k = 0: no demonstrations to reorder
    assert (out / "icl_tiny.png").stat().st_size > 1000
    assert "cannot hold" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["models"][0]["name"] == "tiny"
    answers = (out / "answers" / "tiny.jsonl").read_text().splitlines()

    def no_scoring(self, prompt, words):
        raise AssertionError("a cached answer was asked again")

    monkeypatch.setattr(icl.LabelScorer, "__call__", no_scoring)
    again = icl.run([("tiny", str(model_dir), None)], cfg)
    assert again["models"][0]["table"] == model["table"]
    assert (out / "answers" / "tiny.jsonl").read_text().splitlines() == answers


def test_sweep_lists_and_skips_missing_and_foreign_runs(model_dir, tmp_path, caplog, capsys):
    sweep = tmp_path / "sweep"
    for name in ("b", "a"):
        shutil.copytree(model_dir, sweep / "runs" / name / "model")
    (sweep / "runs" / "stray").mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"runs": [{"name": "a", "n_params": 2000}, {"name": "b", "n_params": 1000},
                                                           {"name": "unfinished", "n_params": 9000}]}))
    with caplog.at_level(logging.WARNING):
        models = icl.sweep_models(sweep)
    assert [(name, n) for name, _, n in models] == [("b", 1000), ("a", 2000)]
    assert "stray" in caplog.text and "unfinished" in caplog.text
    out = tmp_path / "out"
    assert cli_main(["lab", "icl", "--sweep", str(sweep), "--out", str(out), "--tasks", "syllogism",
                     "--ks", "0,1,2", "--n", "2", "--seeds", "1"]) == 0
    assert "sweep: 2 models: b, a" in capsys.readouterr().out
    assert (out / "icl_flipped.png").is_file() and (out / "icl_a.png").is_file()
    with pytest.raises(GptlabError, match="no model directories"):
        icl.sweep_models(sweep / "runs")


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["lab", "icl", "--out", str(tmp_path)]) == 2
    assert "give --model" in capsys.readouterr().err
    assert cli_main(["lab", "icl", "--sweep", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(GptlabError, match="unknown icl task"):
        icl.run([], icl.IclConfig(str(tmp_path), ("nope",)))


def test_served_model_answers_as_in_process(model_dir, tmp_path):
    args = ["--tasks", "sentiment", "--conditions", "true,flipped", "--ks", "0,2", "--n", "2", "--seeds", "1"]
    assert cli_main(["lab", "icl", "--model", str(model_dir), "--threads", "1", "--out", str(tmp_path / "local"),
                     *args]) == 0
    live = LiveServer(create_app(load_engine(model_dir), ServeConfig(model_name="tiny-served")))
    try:  # without the tokenizer: the server's own prompt log-probabilities, matched by text offsets
        assert cli_main(["lab", "icl", "--base-url", live.url, "--out", str(tmp_path / "http"), *args]) == 0
    finally:
        live.stop()
    local = json.loads((tmp_path / "local" / "results.json").read_text())["models"][0]
    served = json.loads((tmp_path / "http" / "results.json").read_text())["models"][0]
    assert served["name"] == "tiny-served" and served["n_params"] is None and local["n_params"] > 0
    assert set(served["table"]["sentiment"]) == {"true", "flipped"}
    answers = [{r["key"]: r["scores"] for r in map(json.loads, (tmp_path / where / "answers" / f"{name}.jsonl")
                                                   .read_text().splitlines())}
               for where, name in (("local", local["name"]), ("http", "tiny-served"))]
    assert answers[0].keys() == answers[1].keys() and len(answers[0]) == 2 + 2 * 2  # k=0 shared, then k=2 each
    for key, scores in answers[0].items():
        assert answers[1][key] == pytest.approx(scores, abs=1e-3), key


def test_base_url_and_conditions_errors(model_dir, tmp_path, capsys):
    assert cli_main(["lab", "icl", "--base-url", "http://127.0.0.1:9", "--model", "a", "b", "--out", str(tmp_path)]) == 2
    assert "one served model" in capsys.readouterr().err
    assert cli_main(["lab", "icl", "--base-url", "http://x", "--sweep", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "one of them" in capsys.readouterr().err
    assert cli_main(["lab", "icl", "--model", str(model_dir), "--conditions", "true,upside-down", "--out", str(tmp_path)]) == 2
    assert "--conditions must be among" in capsys.readouterr().err


def test_flipped_following_separates_a_constant_answer_from_following():
    task = icl.sentiment_task(4)
    answers = {}
    for item in task.test:  # a model that always says label 0, whatever the demonstrations
        for condition in ("true", "flipped"):
            key = icl.answer_key(task.name, condition, 4, 0, item.text)
            answers[key] = {"pred": 0}
    follows, changed, total = icl.flipped_following(answers, [task], 4, 1)
    assert (follows, changed, total) == (0.5, 0.0, 4)  # "follows" half by chance, changes nothing
    for item in task.test:  # a model that answers the flipped mapping after flipped demonstrations
        answers[icl.answer_key(task.name, "true", 4, 0, item.text)] = {"pred": item.label}
        answers[icl.answer_key(task.name, "flipped", 4, 0, item.text)] = {"pred": 1 - item.label}
    assert icl.flipped_following(answers, [task], 4, 1) == (1.0, 1.0, 4)
