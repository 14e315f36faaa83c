"""apps.prompting, prompting_tot, prompting_eval and games: Game of 24 exactness, answer extraction, the
prompts each technique sends, voting, check-your-work, tree of thoughts, the resumable technique table
and its command line. Plumbing runs on a scripted LLM (exact replies); the command line on a tiny model."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import replace
from fractions import Fraction

import pytest

from _scripted_llm import ScriptedLLM, last_user
from _serve_helpers import make_model_dir
from gptlab.apps.games import check_expression, extract_expression, generate_puzzles, solve
from gptlab.apps.prompting import (COT_TRIGGER, Prompter, answer, answer_key, check_your_work,
                                   choice_scores, choose, majority, prompt_task, self_consistency, shot_pairs,
                                   vote)
from gptlab.eval.stats import wilson_interval
from gptlab.apps.prompting_eval import PromptEvalConfig, prompt_eval
from gptlab.apps.prompting_tot import TotConfig, tree_of_thoughts
from gptlab.cli import main
from gptlab.common import GptlabError
from gptlab.eval.gold import ASSISTANT_HEADER, STYLES, draw_shots

# ---------------------------------------------------------------------------------------------------------
# Game of 24


def test_game24_checker_is_exact_and_strict():
    assert check_expression("8 / (3 - 8 / 3)", [3, 3, 8, 8])  # 24 only in exact arithmetic: floats give 23.99..
    assert 8 / (3 - 8 / 3) != 24
    assert check_expression("(10 - 4) × (13 - 9) = 24", [4, 9, 10, 13])
    for wrong in ["8 * 3", "3 * 8 + 8 - 8", "(8 + 8 + 3 + 3) + 2", "8 // 3 * 3 * 3 + 0", "-3 * -8 + 3 - 3",
                  "8 / (3 - 3) * 8 * 3", "3 ** 3 - 8 + 8 - 3", "24.0", "__import__('os').getcwd()", "", None]:
        assert not check_expression(wrong, [3, 3, 8, 8]), wrong


def _reaches_24(numbers: list[int]) -> bool:
    """Reference: every order of the numbers, every operator triple and the five bracketings of a op b op c
    op d, in exact fractions (an enumeration unlike `solve`'s pairwise search)."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: None if b == 0 else a / b}

    def f(op, a, b):
        return None if a is None or b is None else ops[op](a, b)

    for a, b, c, d in set(itertools.permutations(map(Fraction, numbers))):
        for x, y, z in itertools.product(ops, repeat=3):
            for value in (f(z, f(y, f(x, a, b), c), d), f(y, f(x, a, b), f(z, c, d)), f(z, f(x, a, f(y, b, c)), d),
                          f(x, a, f(z, f(y, b, c), d)), f(x, a, f(y, b, f(z, c, d)))):
                if value == 24:
                    return True
    return False


def test_game24_solver_agrees_with_an_independent_enumeration():
    for numbers in itertools.combinations_with_replacement(range(1, 6), 4):
        solution = solve(list(numbers))
        assert (solution is not None) == _reaches_24(list(numbers)), numbers
        if solution:
            assert check_expression(solution, list(numbers)), (numbers, solution)


def test_game24_generator_is_seeded_distinct_and_solvable():
    puzzles = generate_puzzles(12, seed=1)
    assert puzzles == generate_puzzles(12, seed=1) and puzzles != generate_puzzles(12, seed=2)
    assert len({tuple(p) for p in puzzles}) == 12
    assert all(solve(p) for p in puzzles)
    numbers = [4, 9, 10, 13]
    reply = "Try 4 + 9 = 13 (left: 10 13 13). Hmm, no.\nFinal: (10 - 4) * (13 - 9) = 24"
    assert extract_expression(reply, numbers) == "(10 - 4) * (13 - 9)"
    assert extract_expression("I give up", numbers) is None


# ---------------------------------------------------------------------------------------------------------
# Extraction, voting, intervals


@pytest.mark.parametrize("text,kind,expected", [
    ("3 + 4 = 7, then 7 + 5 = 12. The answer is 12.", "number", "12"),
    ("The answer is 12. Check: 12 - 5 = 7.", "number", "12"),  # the stated answer, not the last number
    ("So the total is 1,250.50 dollars", "number", "1250.5"),
    ("\\boxed{15.0} since 3 * 5 = 15", "number", "15"),
    ("Answer: -3", "number", "-3"),
    ("we get one hundred", "number", None),
    ("It is positive, or not? The answer is negative.", "label", "negative"),
    ("I think this review is Positive!", "label", "positive"),
    ("This review is positive. However, it has a negative tone.", "label", None),
    ('It is negative, and the answer is "The answer is 100."', "label", "negative"),
    ("no idea", "label", None),
    ('Here you go: {"b": 1, "a": "x"}', "json", '{"a": "x", "b": 1}'),
    ("Reasoning first.\nThe answer is The Eiffel Tower.", "text", "eiffel tower"),
    ("first line\nParis!", "text", "paris"),
])
def test_answer_key(text, kind, expected):
    assert answer_key(text, kind, ("positive", "negative")) == expected


def test_grading_reads_the_stated_answer_with_the_tasks_own_checker():
    task = prompt_task("word_problems")
    example = task.examples("test", 1)[0]
    gold = int(example.answer_text)
    text = f"First {gold - 5} + 5 = {gold}. The answer is {gold}. Check: {gold} - 5 = {gold - 5}."
    assert task.grade(example, text) == 1.0  # the checker alone would read the last number
    assert task.grade(example, f"The answer is {gold + 1}.") == 0.0


def test_vote_majority_ties_and_missing_answers():
    assert vote(["1", "2", "2", None, "1"]) == ("1", 0.4)  # tie: the first-seen answer
    assert vote([None, None, "3"]) == ("3", pytest.approx(1 / 3))
    assert vote([None, None]) == (None, 0.0)


def test_wilson_interval_bounds_solve_its_defining_equation():
    for successes, n in [(0, 10), (3, 10), (10, 10), (17, 40)]:
        low, high = wilson_interval(successes, n)
        p = successes / n
        assert 0 <= low <= p <= high <= 1
        for bound in (low, high):  # (p - bound)^2 = z^2 bound (1 - bound) / n, unless clipped at 0 or 1
            if 0 < bound < 1:
                assert (p - bound) ** 2 == pytest.approx(1.96 ** 2 * bound * (1 - bound) / n, rel=1e-9)
        mirrored = wilson_interval(n - successes, n)
        assert (low, high) == pytest.approx((1 - mirrored[1], 1 - mirrored[0]))


# ---------------------------------------------------------------------------------------------------------
# Prompts and techniques on a scripted LLM


def _value(expression: str) -> int:
    """The value of the suite's arithmetic expressions ('3 + 8 - 4')."""
    tokens = expression.split()
    total = int(tokens[0])
    for op, n in zip(tokens[1::2], tokens[2::2]):
        total += int(n) if op == "+" else -int(n)
    return total


def oracle(prompt, index: int, call: int) -> str:
    """Right answers to arithmetic and Game of 24 questions."""
    text = last_user(prompt)
    numbers = re.search(r"Use the numbers (\d+) (\d+) (\d+) (\d+)", text)
    if numbers:
        return f"The answer is {solve([int(n) for n in numbers.groups()])}."
    expression = re.findall(r"\d+(?: [+-] \d+)+", text)[-1]
    return f"{expression} = {_value(expression)}. The answer is {_value(expression)}."


@pytest.fixture
def arithmetic():
    task = prompt_task("arithmetic")
    return task, task.examples("test", 1)[0]


def test_prompts_reuse_the_eval_formats_and_shots(arithmetic):
    task, example = arithmetic
    llm = ScriptedLLM(oracle)
    shots = shot_pairs(task, example, 2, seed=0, index=0)
    assert [q for q, _ in shots] == [s.question for s in draw_shots(example, 2, 0, 0)]
    sample = answer(Prompter(llm, "qa"), task, example, shots=shots)[0]
    assert llm.calls[-1]["prompt"] == STYLES["qa"].prompt(example.question, shots)
    assert llm.calls[-1]["stop"] == list(STYLES["qa"].stops) and llm.calls[-1]["temperature"] == 0.0
    assert sample.score == 1.0 and sample.key == example.answer_text
    answer(Prompter(llm, "assistant"), task, example, instruction="Be exact.")
    assert llm.calls[-1]["prompt"].startswith(ASSISTANT_HEADER + "Be exact.\n\nUser: ")
    answer(Prompter(llm, "chat"), task, example, shots=shots, instruction="Be exact.")
    assert llm.calls[-1]["prompt"] == [{"role": "system", "content": "Be exact."},
                                       {"role": "user", "content": shots[0][0]}, {"role": "assistant", "content": shots[0][1]},
                                       {"role": "user", "content": shots[1][0]}, {"role": "assistant", "content": shots[1][1]},
                                       {"role": "user", "content": example.question}]
    cot = answer(Prompter(llm, "qa"), task, example, cot=True)[0]
    assert llm.calls[-1]["prompt"].endswith(f"A: {COT_TRIGGER}") and cot.text.startswith(COT_TRIGGER)


@pytest.mark.parametrize("fmt", ["chat", "qa"])
def test_chain_of_thought_without_an_answer_gets_the_answer_extraction_call(arithmetic, fmt):
    task, example = arithmetic
    llm = ScriptedLLM(lambda p, i, call: "we add things up" if call == 1 else f" {example.answer_text}.")
    sample = answer(Prompter(llm, fmt), task, example, cot=True)[0]
    assert len(llm.calls) == 2 and sample.score == 1.0 and sample.key == example.answer_text
    assert sample.text.endswith(f"Therefore, the answer is {example.answer_text}.")
    assert sample.completion_tokens == 4 + 1
    second = llm.calls[1]["prompt"]
    if fmt == "qa":
        assert second.endswith("we add things up\nTherefore, the answer is")
    else:
        assert second[-2] == {"role": "assistant", "content": "we add things up"} and second[-1]["role"] == "user"


def test_self_consistency_votes_over_prefixes_of_one_draw(arithmetic):
    task, example = arithmetic
    gold = int(example.answer_text)
    said = [gold, gold + 1, gold, gold + 2, gold + 1, gold + 1]
    llm = ScriptedLLM(lambda p, i, call: f"Adding up. The answer is {said[i]}.")
    samples = self_consistency(Prompter(llm), task, example, k=6)
    assert len(llm.calls) == 1 and llm.calls[0]["n"] == 6 and llm.calls[0]["temperature"] == 0.7
    assert [s.key for s in samples] == [str(x) for x in said]
    best, agreement = majority(samples[:3])
    assert (best.key, agreement, best.score) == (str(gold), pytest.approx(2 / 3), 1.0)
    best, agreement = majority(samples)
    assert (best.key, agreement, best.score) == (str(gold + 1), 0.5, 0.0)


def test_check_your_work_retries_while_the_model_says_wrong(arithmetic):
    task, example = arithmetic
    gold = int(example.answer_text)
    script = [f"The answer is {gold + 1}.", "Checking: that is wrong", f"The answer is {gold}.", "It is correct."]
    llm = ScriptedLLM(lambda p, i, call: script[call - 1])
    attempts, verdicts = check_your_work(Prompter(llm), task, example, retries=2)
    assert verdicts == ["wrong", "correct"] and [a.score for a in attempts] == [0.0, 1.0]
    assert [c["temperature"] for c in llm.calls] == [0.0, 0.0, 0.7, 0.0]
    assert "Proposed answer: The answer is" in last_user(llm.calls[1]["prompt"])
    llm = ScriptedLLM(lambda p, i, call: script[call - 1])
    attempts, verdicts = check_your_work(Prompter(llm), task, example, retries=0)
    assert len(llm.calls) == 1 and verdicts == [] and attempts[0].score == 0.0


def _numbers_in(text: str) -> list[Fraction]:
    line = [l for l in text.splitlines() if l.startswith("Numbers:")][-1]
    return [Fraction(t.strip("()")) for t in re.findall(r"\(-?\d+/\d+\)|-?\d+", line)]


def game24_model(prompt, index: int, call: int) -> str:
    """Proposes one wrong-arithmetic step, one step with a number it does not have, then every valid step
    (those that keep the puzzle solvable first); values states by whether they can still reach 24."""
    text = last_user(prompt)
    numbers = _numbers_in(text)
    if "possible next steps" in text:
        lines = ["1 + 1 = 3 (left: 3)", "99 + 1 = 100 (left: 100)"]
        good, bad = [], []
        for i, j in itertools.permutations(range(len(numbers)), 2):
            a, b = numbers[i], numbers[j]
            rest = [numbers[k] for k in range(len(numbers)) if k not in (i, j)]
            for op, value in (("+", a + b), ("-", a - b), ("*", a * b), ("/", a / b if b else None)):
                if value is not None:
                    show = lambda v: str(v) if v.denominator == 1 else f"({v})"
                    (good if solve(rest + [value]) else bad).append(f"{show(a)} {op} {show(b)} = {show(value)}")
        return "\n".join(lines + good + bad)
    return "sure" if solve(numbers) else "impossible"


def test_tree_of_thoughts_finds_24_when_the_model_values_states_well():
    task = prompt_task("game24")
    for example in task.examples("test", 3):
        llm = ScriptedLLM(game24_model)
        sample, stats = tree_of_thoughts(Prompter(llm), task, example, TotConfig(breadth=2, depth=3, evaluations=1))
        assert sample.score == 1.0, (example.metadata, sample.text)
        assert check_expression(extract_expression(sample.text, example.metadata["numbers"]), example.metadata["numbers"])
        assert stats.rejected >= 2 * 1 and len(stats.levels) == 3 and stats.calls == len(llm.calls)
        assert all(len(level) <= 2 for level in stats.levels)


def test_tree_of_thoughts_on_a_stepwise_task(arithmetic):
    task, example = arithmetic

    def model(prompt, index, call):
        text = last_user(prompt)
        if "Write only the next step" in text:
            return ["Add the first two numbers.", f"The answer is {example.answer_text}.", "Add them."][index % 3]
        return "sure" if "The answer is" in text.split("Steps so far:")[1] else "likely"

    sample, stats = tree_of_thoughts(Prompter(ScriptedLLM(model)), task, example,
                                     TotConfig(breadth=2, depth=2, proposals=3, evaluations=1))
    assert sample.score == 1.0 and sample.text.endswith(f"The answer is {example.answer_text}.")


def test_multiple_choice_by_log_likelihood_and_length_normalisation():
    scores = {" cat sat.": -2.0, " elephant sat.": -3.0}
    llm = ScriptedLLM(lambda *a: "", lambda prompt, c: scores[c])
    assert choose(llm, "The {cat|elephant} sat.") == (0, [-2.0, -3.0])
    best, per_byte = choose(llm, "The {cat|elephant} sat.", "bytes")
    assert best == 1 and per_byte == [-2.0 / 9, -3.0 / 14]
    with pytest.raises(GptlabError, match="no log-probabilities"):
        choice_scores(ScriptedLLM(lambda *a: ""), "The", [" cat"])


def test_label_tasks_by_log_likelihood_in_the_table(tmp_path):
    def scores(prompt, continuation):  # a model that reads the review right: "loved" -> positive
        review = last_user(prompt) if not isinstance(prompt, str) else prompt.rsplit("Q:", 1)[1]
        positive = re.search(r"\b(?:wonderful|excellent|delightful|fantastic|superb|lovely|great|impressive|charming|"
                             r"reliable)\b", review) is not None
        return -1.0 if (continuation.strip() == "positive") == positive else -3.0

    llm = ScriptedLLM(lambda *a: "never called", scores)
    for fmt in ("chat", "qa"):
        result = prompt_eval(llm, PromptEvalConfig(tasks="sentiment,arithmetic", techniques="loglik", n=6, shots=1,
                                                   format=fmt, out=str(tmp_path / fmt), progress=False))
        (row,) = result["rows"]
        assert (row["technique"], row["task"], row["accuracy"], row["tokens_per_question"]) == ("loglik", "sentiment", 1.0, 0)
        assert result["skipped"] == [("loglik", "arithmetic")] and not llm.calls


# ---------------------------------------------------------------------------------------------------------
# The technique table


def test_prompt_eval_table_resumes_and_recomputes_only_what_changed(tmp_path):
    def model(prompt, index, call):
        right = oracle(prompt, index, call)
        return right if index % 3 == 0 else "The answer is 99999."  # samples: right, wrong, wrong, ...

    llm = ScriptedLLM(model)
    cfg = PromptEvalConfig(tasks="arithmetic,game24", techniques="direct,fewshot,self-consistency", n=3, k="1,2,3",
                           out=str(tmp_path), progress=False)
    result = prompt_eval(llm, cfg)
    rows = {(r["technique"], r["task"]): r for r in result["rows"]}
    assert rows["direct", "arithmetic"]["accuracy"] == 1.0 and rows["direct", "game24"]["accuracy"] == 1.0
    assert rows["direct", "all (pooled)"]["n"] == 6
    assert rows["direct", "arithmetic"]["wilson_low"] == pytest.approx(wilson_interval(3, 3)[0])
    assert [rows[f"self-consistency@{k}", "arithmetic"]["accuracy"] for k in (1, 2, 3)] == [1.0, 1.0, 0.0]
    assert rows["self-consistency@3", "arithmetic"]["mean_agreement"] == pytest.approx(2 / 3)
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2 * 3
    assert "| self-consistency@2 | arithmetic | 3 | 100.0% |" in (tmp_path / "prompt_eval.md").read_text()
    assert (tmp_path / "prompt_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    calls = len(llm.calls)
    assert prompt_eval(llm, cfg)["rows"] == result["rows"] and len(llm.calls) == calls  # all cached
    prompt_eval(llm, replace(cfg, shots=2))
    assert len(llm.calls) == calls + 2 * 3  # only fewshot, one call per question
    with open(tmp_path / "answers.jsonl", "a") as f:
        f.write('{"technique": "direct", "task": "arith')  # killed while writing: that line is redone
    assert prompt_eval(llm, cfg)["rows"] == result["rows"] and len(llm.calls) == calls + 2 * 3
    assert (tmp_path / "answers.jsonl").read_text().endswith("}\n")
    with open(tmp_path / "answers.jsonl", "a") as f:
        f.write('{"technique": "direct"}\n')
    with pytest.raises(GptlabError, match=r"answers.jsonl:25: not an answer record"):
        prompt_eval(llm, cfg)


def test_prompt_eval_rejects_unknown_techniques_and_bad_k(tmp_path):
    llm = ScriptedLLM(oracle)
    with pytest.raises(GptlabError, match="unknown techniques"):
        prompt_eval(llm, PromptEvalConfig(techniques="direct,magic", out=str(tmp_path)))
    with pytest.raises(GptlabError, match=r"unknown task 'chess' \(available: .*word_problems, game24\)"):
        prompt_eval(llm, PromptEvalConfig(tasks="arithmetic,chess", out=str(tmp_path)))
    with pytest.raises(GptlabError, match="--k"):
        prompt_eval(llm, PromptEvalConfig(k="1,x", out=str(tmp_path)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("prompting") / "tiny", max_seq_len=512)


def test_prompt_eval_command_line_on_a_tiny_model(tiny_model, tmp_path, capsys):
    out = tmp_path / "table"
    argv = ["prompt", "eval", "--model", str(tiny_model), "--threads", "1", "--tasks", "arithmetic,game24",
            "--techniques", "direct,cot,self-consistency,tot", "--n", "2", "--k", "1,2", "--max-tokens", "8",
            "--breadth", "1", "--evaluations", "1", "--out", str(out), "--progress", "false"]
    assert main(argv) == 0
    result = json.loads((out / "prompt_eval.json").read_text())
    techniques = {r["technique"] for r in result["rows"]}
    assert techniques == {"direct", "cot", "self-consistency@1", "self-consistency@2", "tot"}
    for row in result["rows"]:
        assert row["n"] in (2, 4) and 0 <= row["wilson_low"] <= row["accuracy"] <= row["wilson_high"] <= 1
        assert row["tokens_per_question"] > 0 and math.isfinite(row["seconds_per_question"])
    assert main(argv) == 0  # resumed: same table
    assert json.loads((out / "prompt_eval.json").read_text())["rows"] == result["rows"]
    assert main(["prompt", "eval", "--model", str(tiny_model), "--techniques", "direct,guess", "--out", str(out)]) == 2
    assert "error: unknown techniques ['guess']" in capsys.readouterr().err
