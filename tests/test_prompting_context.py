"""Prompting on a model whose context window is smaller than the prompts (the speedrun's 256 tokens):
few-shot prompts keep the demonstrations that fit, tree of thoughts drops its worked examples and the
states that do not fit, and `prompt eval` reports questions over the window instead of stopping. The
window is a ScriptedLLM's (tokens = words) checked with the backends' own `_fits`."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from _scripted_llm import ScriptedLLM
from test_prompting import game24_model, oracle
from gptlab.apps.llm import ContextOverflow
from gptlab.apps.llm_base import _fits
from gptlab.apps.prompting import Prompter, answer, prompt_task, shot_pairs
from gptlab.apps.prompting_eval import PromptEvalConfig, prompt_eval
from gptlab.apps.prompting_tot import TotConfig, tree_of_thoughts


class WindowedLLM(ScriptedLLM):
    """A scripted LLM that refuses prompts of `window` words or more, as LocalLLM refuses tokens."""

    def __init__(self, reply, window: int):
        super().__init__(reply)
        self.context_window = window

    def _generate(self, prompt, n=1, **kw):
        _fits(self.name, self.context_window, self.count_tokens(str(prompt)), kw.get("max_tokens", 256))
        return super()._generate(prompt, n=n, **kw)


def _words(prompt) -> int:
    return len(str(prompt).split())


@pytest.fixture
def arithmetic():
    task = prompt_task("arithmetic")
    return task, task.examples("test", 1)[0]


def test_fewshot_keeps_the_demonstrations_that_fit(arithmetic):
    task, example = arithmetic
    shots = shot_pairs(task, example, 3, seed=0, index=0)
    render = Prompter(ScriptedLLM(oracle)).render
    one, two = _words(render(example.question, shots[:1])), _words(render(example.question, shots[:2]))
    assert one < two
    llm = WindowedLLM(oracle, window=two)  # two shots are one word too many
    sample = answer(Prompter(llm), task, example, shots=shots)[0]
    assert sample.shots == 1 and sample.score == 1.0
    assert llm.calls[-1]["prompt"] == render(example.question, shots[:1])
    assert answer(Prompter(WindowedLLM(oracle, window=two + 1)), task, example, shots=shots)[0].shots == 2
    assert answer(Prompter(llm), task, example)[0].shots is None  # none asked for
    alone = _words(render(example.question))
    with pytest.raises(ContextOverflow, match=f"prompt of {alone} tokens does not fit the context window"):
        answer(Prompter(WindowedLLM(oracle, window=alone)), task, example, shots=shots)


def test_chain_of_thought_that_fills_the_window_is_graded_without_the_extraction_call(arithmetic):
    task, example = arithmetic
    prompt = Prompter(ScriptedLLM(oracle)).render(example.question, answer_prefix="Let's think step by step.")
    llm = WindowedLLM(lambda p, i, call: "we add " * 40, window=_words(prompt) + 20)
    sample = answer(Prompter(llm), task, example, cot=True)[0]
    assert len(llm.calls) == 1 and sample.score == 0.0 and sample.text.startswith("we add")


def test_tree_of_thoughts_drops_worked_examples_that_do_not_fit():
    task = prompt_task("game24")
    example = task.examples("test", 1)[0]
    config = TotConfig(breadth=2, depth=3, evaluations=1)
    sample, stats = tree_of_thoughts(Prompter(ScriptedLLM(game24_model)), task, example, config)
    assert sample.score == 1.0 and stats.shots_dropped == 0 and stats.over_context == 0
    sample, stats = tree_of_thoughts(Prompter(WindowedLLM(game24_model, window=60)), task, example, config)
    assert sample.score == 1.0  # the scripted model needs no examples: the search still finds 24
    assert stats.shots_dropped > 0 and stats.over_context == 0
    with pytest.raises(ContextOverflow):  # not even the first propose question fits
        tree_of_thoughts(Prompter(WindowedLLM(game24_model, window=10)), task, example, config)


def test_prompt_eval_reports_questions_over_the_window_and_goes_on(tmp_path):
    task = prompt_task("arithmetic")
    examples = task.examples("test", 3)
    alone = [_words(Prompter(ScriptedLLM(oracle)).render(e.question)) for e in examples]
    llm = WindowedLLM(oracle, window=sorted(alone)[1])  # the shortest question fits, the others do not
    cfg = PromptEvalConfig(tasks="arithmetic,game24", techniques="direct,fewshot,self-consistency", n=3, k="1,2",
                           max_tokens=8, out=str(tmp_path), progress=False)
    rows = {(r["technique"], r["task"]): r for r in prompt_eval(llm, cfg)["rows"]}
    fits = sum(a < sorted(alone)[1] for a in alone)
    assert 1 <= fits < 3
    # direct and few-shot send the question alone (few-shot drops all its shots); self-consistency adds the
    # chain-of-thought request, which fits no question; no Game of 24 question fits
    over = {"direct": 3 - fits, "fewshot": 3 - fits, "self-consistency@1": 3, "self-consistency@2": 3}
    for technique, skipped in over.items():
        row = rows[technique, "arithmetic"]
        assert (row["n"], row["over_context"]) == (3 - skipped, skipped)
        assert rows[technique, "game24"]["over_context"] == 3 and rows[technique, "game24"]["n"] == 0
        assert "accuracy" not in rows[technique, "game24"]
        assert rows[technique, "all (pooled)"]["over_context"] == skipped + 3
    assert rows["direct", "arithmetic"]["accuracy"] == 1.0
    assert rows["fewshot", "arithmetic"]["mean_shots_kept"] == 0.0
    text = (tmp_path / "prompt_eval.md").read_text()
    assert "| direct | game24 | 0 | - | - | - | - | 3 |" in text
    assert "Over context:" in text and "fewshot on arithmetic 0.0" in text
    assert (tmp_path / "prompt_eval.png").read_bytes()[:4] == b"\x89PNG"
    calls = len(llm.calls)
    prompt_eval(llm, cfg)  # over-context questions are cached like answers: nothing is retried
    assert len(llm.calls) == calls


def test_tree_of_thoughts_states_the_value_its_expression_reaches():
    """A model that proposes dead ends first and calls every state 'sure' ends on a leaf that is not 24;
    the answer names that leaf's real value (the text must not claim 24 for it)."""
    task = prompt_task("game24")
    example = task.examples("test", 1)[0]

    def model(prompt, index, call):
        if "possible next steps" in str(prompt):
            return "\n".join(reversed(game24_model(prompt, index, call).splitlines()))
        return "sure"

    sample, _ = tree_of_thoughts(Prompter(ScriptedLLM(model)), task, example, TotConfig(breadth=1, depth=3, evaluations=1))
    expression, stated = re.fullmatch(r"The answer is (.+) = (\S+)\.", sample.text).groups()
    assert Fraction(stated.strip("()")) == _evaluate(expression) != 24 and sample.score == 0.0


def _evaluate(expression: str) -> Fraction:
    """Exact value of a Game of 24 expression (operands made Fractions, then Python's own precedence)."""
    return eval(re.sub(r"(\d+)", r"Fraction(\1)", expression), {"Fraction": Fraction})
