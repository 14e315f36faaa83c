"""apps.prompt_search: user data files and metrics (errors name the file, line and example), the search's
splits, bootstrapped demonstrations and choice of winner on a scripted LLM, and the winning prompt file
reused by `prompt eval --prompt`."""

from __future__ import annotations

import json
import re

import pytest

from _scripted_llm import ScriptedLLM, last_user
from gptlab.apps.prompt_search import (PromptSearchConfig, data_task, load_data, load_metric, prompt_search,
                                       search_splits, token_f1)
from gptlab.apps.prompting import Program, prompt_task
from gptlab.apps.prompting_eval import PromptEvalConfig, load_program, prompt_eval
from gptlab.cli import main
from gptlab.common import GptlabError
from gptlab.tasks import Example


def exploding_metric(prediction: str, gold: str) -> float:
    return 1 / 0


def first_word_metric(prediction: str, gold: str) -> bool:
    return prediction.split()[:1] == gold.split()[:1]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def sums_file(tmp_path):
    lines = [json.dumps({"input": f"What is {a} plus {b}?", "answer": str(a + b)}) for a in range(1, 13) for b in range(1, 8)]
    return _write(tmp_path / "sums.jsonl", lines)


def test_metrics():
    assert token_f1("the cat sat", "Cat sat down.") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("dog", "cat") == 0.0
    example = Example("data", [{"role": "user", "content": "q"}], "Paris", ["Paris"], {"where": "f.jsonl:3"})
    assert load_metric("exact")(example, "paris.") == 1.0 and load_metric("exact")(example, "Paris, France") == 0.0
    assert load_metric("contains")(example, "It is Paris, France") == 1.0
    assert load_metric(f"{__name__}:first_word_metric")(example, "Paris of course") == 1.0
    with pytest.raises(GptlabError, match=r"metric 'test_prompt_search:exploding_metric' failed on f.jsonl:3 .*ZeroDivisionError"):
        load_metric(f"{__name__}:exploding_metric")(example, "Paris")
    with pytest.raises(GptlabError, match="cannot be loaded"):
        load_metric("no_such_module_xyz:f")
    with pytest.raises(GptlabError, match="unknown metric"):
        load_metric("bleu")


def test_data_file_errors_name_the_file_and_line(tmp_path):
    good = json.dumps({"input": "q", "answer": "a"})
    for bad, message in [("{not json", r"bad.jsonl:2: not valid JSON"),
                         (json.dumps({"input": "q"}), r"bad.jsonl:2: needs an 'answer'"),
                         (json.dumps({"answer": "a"}), r"bad.jsonl:2: needs an 'input'"),
                         ("[1, 2]", r"bad.jsonl:2: expected a JSON object")]:
        with pytest.raises(GptlabError, match=message):
            load_data(_write(tmp_path / "bad.jsonl", [good, bad]))
    assert load_data(_write(tmp_path / "num.jsonl", [json.dumps({"question": "q", "answer": 3})]))


def test_splits_are_disjoint_and_stable(sums_file):
    splits = load_data(sums_file)
    questions = [{e.question for e in examples} for examples in splits.values()]
    assert sum(map(len, questions)) == 84 and not (questions[0] & questions[1] or questions[1] & questions[2])
    assert all(len(q) > 5 for q in questions)  # about 50/20/30
    train, dev, test = search_splits(prompt_task("arithmetic"), PromptSearchConfig(train=8, dev=6, test=5))
    assert not {e.question for e in train} & {e.question for e in dev}
    assert all(e.metadata["split"] == "test" for e in test) and all(e.metadata["split"] == "train" for e in dev)


def sums_model(prompt, index, call):
    """Answers every sum with an instruction (a system message); without one, only sums with an even first
    number. Proposes an instruction when asked; knows nothing else."""
    text = last_user(prompt)
    if "Write one sentence that instructs" in text:
        return "Add the two numbers and reply with the sum."
    found = re.search(r"What is (\d+) plus (\d+)\?", text)
    if found is None:
        return "I don't know."
    a, b = map(int, found.groups())
    instructed = isinstance(prompt, list) and prompt[0]["role"] == "system"
    return str(a + b) if instructed or a % 2 == 0 else str(a + b + 1)


def test_search_bootstraps_demos_picks_the_winner_on_dev_and_reports_it_on_test(sums_file, tmp_path):
    llm = ScriptedLLM(sums_model)
    cfg = PromptSearchConfig(data=str(sums_file), metric="exact", budget=6, train=10, dev=8, test=10, max_demos=2,
                             instructions=2, out=str(tmp_path / "search"), progress=False)
    result = prompt_search(llm, data_task(sums_file, "exact"), cfg)
    bootstrapped = [d for d in result["demo_pool"] if d["source"] == "bootstrapped"]
    assert bootstrapped and all(int(re.search(r"What is (\d+)", d["question"]).group(1)) % 2 == 0 for d in bootstrapped)
    assert "Add the two numbers and reply with the sum." in result["instructions"]
    dev_scores = [c["dev"]["score"] for c in result["candidates"]]
    assert len(dev_scores) == 6 and result["winner"] == dev_scores.index(max(dev_scores))
    winner = result["candidates"][result["winner"]]
    assert winner["instruction"] and winner["dev"]["score"] == 1.0 and result["winner_test"]["score"] == 1.0
    assert result["baseline_test"]["score"] < 1.0 and result["candidates"][0]["instruction"] == ""
    assert result["baseline_test"]["wilson_low"] <= result["baseline_test"]["score"] <= result["baseline_test"]["wilson_high"]
    out = tmp_path / "search"
    assert (out / "search_curve.png").read_bytes()[:4] == b"\x89PNG" and "search winner" in (out / "search.md").read_text()
    program = load_program(out / "prompt.json")
    assert isinstance(program, Program) and program.instruction == winner["instruction"]
    # the prompt file is reusable: prompt eval runs it on the same held-out split
    table = prompt_eval(llm, PromptEvalConfig(tasks="arithmetic", techniques="direct", n=2, prompt=str(out / "prompt.json"),
                                              out=str(tmp_path / "eval"), progress=False))
    row = next(r for r in table["rows"] if r["technique"] == "prompt:prompt")
    assert row["task"] == f"data:{sums_file.name}" and row["n"] == 2 and row["accuracy"] == 1.0


def test_prompt_file_and_command_line_errors(tmp_path, capsys):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"task": "arithmetic", "demos": [{"question": "q"}]}))
    with pytest.raises(GptlabError, match="'demos' must be a list"):
        load_program(bad)
    assert main(["prompt", "search", "--task", "arithmetic", "--data", "x.jsonl", "--model", "m"]) == 2
    assert "exactly one of --task" in capsys.readouterr().err


def test_search_resumes_from_its_answers_after_an_interruption(sums_file, tmp_path):
    """A search killed part way (the LLM raising on its 30th call) and rerun with the same --out asks only
    what it had not answered, and ends with the result of an uninterrupted search."""
    cfg = PromptSearchConfig(data=str(sums_file), metric="exact", budget=5, train=8, dev=6, test=8, max_demos=2,
                             instructions=1, progress=False)
    task = data_task(sums_file, "exact")
    whole_llm = ScriptedLLM(sums_model)
    whole = prompt_search(whole_llm, task, PromptSearchConfig(**{**cfg.__dict__, "out": str(tmp_path / "whole")}))

    def dies_at_30(prompt, index, call):
        if call == 30:
            raise KeyboardInterrupt
        return sums_model(prompt, index, call)

    out = str(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        prompt_search(ScriptedLLM(dies_at_30), task, PromptSearchConfig(**{**cfg.__dict__, "out": out}))
    answered = len((tmp_path / "cut" / "answers.jsonl").read_text().splitlines())
    assert answered == 28  # one proposal call, then one line per graded reply, the 30th call lost
    resumed_llm = ScriptedLLM(sums_model)
    resumed = prompt_search(resumed_llm, task, PromptSearchConfig(**{**cfg.__dict__, "out": out}))
    assert len(resumed_llm.calls) == len(whole_llm.calls) - answered  # the proposal again, then only new questions
    for key in ("winner", "winner_test", "baseline_test", "demo_pool", "instructions"):
        assert resumed[key] == whole[key], key
    assert [c["dev"] for c in resumed["candidates"]] == [c["dev"] for c in whole["candidates"]]
    # a finished search rerun asks nothing but the instruction proposal
    again_llm = ScriptedLLM(sums_model)
    assert prompt_search(again_llm, task, PromptSearchConfig(**{**cfg.__dict__, "out": out}))["winner"] == whole["winner"]
    assert len(again_llm.calls) == 1
