"""Tree of thoughts (Yao et al. 2023): breadth-first search over partial solutions, where the LLM both
proposes the next steps and values the states they reach.

    sample, stats = tree_of_thoughts(Prompter(llm), prompt_task("game24"), example, TotConfig(breadth=5))

Design decisions
- The search is the paper's BFS: from every state of the frontier the model proposes next steps (one
  "propose" call listing several), each new state is valued by `evaluations` sampled "value" calls that
  say sure / likely / impossible (scored 20 / 1 / 0.001 and summed, the paper's weights), and the
  `breadth` best states form the next frontier, for `depth` levels. Values are cached per state.
- Two problems. Game of 24: a state is the numbers left (with the expression that made each), a step is
  "a op b = c"; a proposed step is kept only when both operands are numbers left and the stated result is
  exactly right (fractions): a wrong step is the model's error and is dropped, never repaired. After three
  steps one number is left and the answer is the expression that made it; the model values those leaves
  too (no gold checker steers the search). Step-by-step tasks (the suite's arithmetic and word problems):
  a state is the reasoning so far, the model proposes k sampled next sentences, a state that states "the
  answer is X" is final and stays in the frontier unexpanded. The answer is the best-valued final state
  (the best state when none is final).
- Prompts are questions rendered by the same `Prompter` as every other technique, so tree of thoughts runs
  on chat and document formats alike; tokens of every call are counted.
- Context window: the worked examples of the Game of 24 prompts are dropped from the end where they do not
  fit (`Prompter.generate_fitting`, counted in `shots_dropped`); a state whose propose or value prompt
  does not fit even alone (long reasoning in a small window) is not expanded / valued 0 and counted in
  `over_context`. Only the root not fitting ends the search (ContextOverflow).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from ..common import GptlabError
from ..tasks import Example
from .llm_base import ContextOverflow
from .prompting import Prompter, PromptTask, Sample, final_answer_span, named_label

VALUE_WEIGHTS = {"sure": 20.0, "likely": 1.0, "impossible": 0.001}


@dataclass
class TotConfig:
    breadth: int = 5  # states kept per level (beam width b)
    depth: int = 3  # levels (Game of 24 needs 3)
    proposals: int = 5  # next steps kept per state
    evaluations: int = 3  # sampled value calls per state
    temperature: float = 0.7  # for sampled steps and values
    max_tokens: int = 160


@dataclass
class TotStats:
    calls: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    proposed: int = 0
    rejected: int = 0  # proposed steps that were malformed or wrong
    shots_dropped: int = 0  # worked examples left out of prompts to fit the context window
    over_context: int = 0  # states not expanded or valued because their prompt did not fit
    levels: list[list[tuple[str, float]]] = field(default_factory=list)  # (state, value) kept per level


class _Caller:
    """Asks questions through a Prompter and counts calls and tokens."""

    def __init__(self, prompter: Prompter, stats: TotStats, config: TotConfig):
        self.prompter, self.stats, self.config = prompter, stats, config

    def ask(self, question: str, shots: Sequence[tuple[str, str]] = (), n: int = 1, temperature: float = 0.0) -> list[str]:
        _, gens, kept = self.prompter.generate_fitting(question, shots, n=n, temperature=temperature,
                                                       max_tokens=self.config.max_tokens)
        self.stats.calls += 1
        self.stats.shots_dropped += len(shots) - kept
        self.stats.completion_tokens += sum(g.completion_tokens for g in gens)
        self.stats.prompt_tokens += sum(g.prompt_tokens for g in gens)
        return [g.text for g in gens]


# ---------------------------------------------------------------------------------------------------------
# Game of 24


Item = tuple[Fraction, str]  # a number left and the expression that made it


def _show(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"({value.numerator}/{value.denominator})"


def _numbers(state: Sequence[Item]) -> str:
    return " ".join(_show(v) for v, _ in state)


_OPERAND = r"\(\s*-?\d+\s*/\s*\d+\s*\)|-?\d+(?:\.\d+)?"
_STEP = re.compile(rf"({_OPERAND})\s*([+\-*/×÷])\s*({_OPERAND})\s*=\s*({_OPERAND})")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
PROPOSE_24 = ("Numbers: {numbers}\nCombine two of the numbers with +, -, * or / to get a new number. List "
              "several possible next steps, one per line, as 'a op b = c (left: ...)'.")
PROPOSE_24_SHOT = ("Numbers: 2 8 8 14\nCombine two of the numbers with +, -, * or / to get a new number. List "
                   "several possible next steps, one per line, as 'a op b = c (left: ...)'.",
                   "2 + 8 = 10 (left: 8 10 14)\n8 / 2 = 4 (left: 4 8 14)\n14 + 2 = 16 (left: 8 8 16)\n"
                   "2 * 8 = 16 (left: 8 14 16)\n8 - 2 = 6 (left: 6 8 14)\n14 - 8 = 6 (left: 2 6 8)")
VALUE_24 = "Numbers: {numbers}\nCan these numbers reach 24 with + - * /, each used once? Answer sure, likely or impossible."
VALUE_24_SHOTS = [
    ("Numbers: 10 14\nCan these numbers reach 24 with + - * /, each used once? Answer sure, likely or impossible.",
     "10 + 14 = 24. sure"),
    ("Numbers: 4 4 10\nCan these numbers reach 24 with + - * /, each used once? Answer sure, likely or impossible.",
     "(10 - 4) * 4 = 24. sure"),
    ("Numbers: 1 3 3\nCan these numbers reach 24 with + - * /, each used once? Answer sure, likely or impossible.",
     "1 * 3 * 3 = 9, (1 + 3) * 3 = 12. The numbers are too small. impossible"),
    ("Numbers: 11 12\nCan these numbers reach 24 with + - * /, each used once? Answer sure, likely or impossible.",
     "11 + 12 = 23, 12 - 11 = 1, 11 * 12 = 132, 11 / 12 is not whole. impossible"),
]


def _operand(text: str) -> Fraction:
    return Fraction(text.replace("(", "").replace(")", "").replace(" ", ""))


def game24_steps(state: Sequence[Item], text: str) -> tuple[list[tuple[str, tuple[Item, ...]]], int]:
    """The valid steps in a propose reply: (step text, new state) per distinct new state, and how many
    steps were rejected (an operand that is not a number left, or a wrong result)."""
    steps, seen, rejected = [], set(), 0
    for match in _STEP.finditer(text.replace("×", "*").replace("÷", "/")):
        a, op, b, stated = _operand(match.group(1)), match.group(2), _operand(match.group(3)), _operand(match.group(4))
        left = list(state)
        picked = []
        for wanted in (a, b):
            index = next((i for i, (v, _) in enumerate(left) if v == wanted), None)
            if index is None:
                break
            picked.append(left.pop(index))
        if len(picked) < 2 or (op == "/" and b == 0) or _APPLY[op](a, b) != stated:
            rejected += 1
            continue
        new = tuple(sorted(left + [(stated, f"({picked[0][1]} {op} {picked[1][1]})")]))
        key = tuple(v for v, _ in new)
        if key not in seen:
            seen.add(key)
            steps.append((f"{_show(a)} {op} {_show(b)} = {_show(stated)} (left: {_numbers(new)})", new))
    return steps, rejected


class Game24Search:
    def initial(self, example: Example) -> tuple[Item, ...]:
        return tuple(sorted((Fraction(n), str(n)) for n in example.metadata["numbers"]))

    def is_final(self, state: tuple[Item, ...]) -> bool:
        return len(state) == 1

    def expand(self, caller: _Caller, example: Example, state, config: TotConfig):
        reply = caller.ask(PROPOSE_24.format(numbers=_numbers(state)), [PROPOSE_24_SHOT])[0]
        steps, rejected = game24_steps(state, reply)
        caller.stats.proposed += len(steps) + rejected
        caller.stats.rejected += rejected
        return [new for _, new in steps[:config.proposals]]

    def value_question(self, example: Example, state) -> tuple[str, list[tuple[str, str]]]:
        return VALUE_24.format(numbers=_numbers(state)), VALUE_24_SHOTS

    def key(self, state) -> str:
        return _numbers(state)

    def answer_text(self, example: Example, state) -> str:
        if len(state) != 1:
            return "No solution found."
        value, expression = state[0]
        expression = expression[1:-1] if expression.startswith("(") and expression.endswith(")") else expression
        return f"The answer is {expression} = {_show(value)}."  # the value reached, 24 or not


# ---------------------------------------------------------------------------------------------------------
# Step-by-step tasks


PROPOSE_STEP = ("Question: {question}\n\nSteps so far:\n{steps}\n\nWrite only the next step, one short sentence. "
                "If the steps already give the result, write 'The answer is X.'")
VALUE_STEP = ("Question: {question}\n\nSteps so far:\n{steps}\n\nAre these steps correct and on track to the "
              "answer? Answer sure, likely or impossible.")


class StepSearch:
    def initial(self, example: Example) -> tuple[str, ...]:
        return ()

    def is_final(self, state: tuple[str, ...]) -> bool:
        return bool(state) and final_answer_span(state[-1]) is not None

    def _steps(self, state) -> str:
        return "\n".join(state) if state else "(none yet)"

    def expand(self, caller: _Caller, example: Example, state, config: TotConfig):
        replies = caller.ask(PROPOSE_STEP.format(question=example.question, steps=self._steps(state)),
                             n=config.proposals, temperature=config.temperature)
        lines = [next((line.strip() for line in r.splitlines() if line.strip()), "") for r in replies]
        fresh = list(dict.fromkeys(line for line in lines if line))
        caller.stats.proposed += len(replies)
        caller.stats.rejected += len(replies) - len(fresh)
        return [state + (line,) for line in fresh]

    def value_question(self, example: Example, state) -> tuple[str, list[tuple[str, str]]]:
        return VALUE_STEP.format(question=example.question, steps=self._steps(state)), []

    def key(self, state) -> str:
        return "\n".join(state)

    def answer_text(self, example: Example, state) -> str:
        return " ".join(state)


SEARCHES = {"expression": Game24Search, "number": StepSearch}


def supports_tot(task: PromptTask) -> bool:
    """Tree of thoughts runs on Game of 24 and on tasks with a numeric answer (stepwise reasoning)."""
    return task.kind in SEARCHES


def state_value(replies: Sequence[str]) -> float:
    """Sum of the paper's weights over the verdicts of sampled value replies (unclear counts 0)."""
    total = 0.0
    for reply in replies:
        word = named_label(reply, tuple(VALUE_WEIGHTS))
        total += VALUE_WEIGHTS[word] if word else 0.0
    return total


def tree_of_thoughts(prompter: Prompter, task: PromptTask, example: Example,
                     config: TotConfig | None = None) -> tuple[Sample, TotStats]:
    """BFS tree of thoughts on one example: the graded answer of the best state found, and statistics."""
    config = config or TotConfig()
    if not supports_tot(task):
        raise GptlabError(f"tree of thoughts needs Game of 24 or a numeric task, not {task.name!r} ({task.kind})")
    search, stats = SEARCHES[task.kind](), TotStats()
    caller = _Caller(prompter, stats, config)
    values: dict[str, float] = {}

    def value(state: Any) -> float:
        key = search.key(state)
        if key not in values:
            question, shots = search.value_question(example, state)
            try:
                values[key] = state_value(caller.ask(question, shots, n=config.evaluations,
                                                     temperature=config.temperature if config.evaluations > 1 else 0.0))
            except ContextOverflow:
                stats.over_context += 1
                values[key] = 0.0
        return values[key]

    def expand(state: Any) -> list:
        if search.is_final(state):
            return [state]
        try:
            return search.expand(caller, example, state, config)
        except ContextOverflow:
            if state == root:
                raise
            stats.over_context += 1
            return []

    root = search.initial(example)
    frontier = [root]
    for _ in range(config.depth):
        children = []
        for state in frontier:
            children += expand(state)
        if not children:
            break
        unique = list({search.key(c): c for c in children}.values())
        frontier = sorted(unique, key=value, reverse=True)[:config.breadth]
        stats.levels.append([(search.key(s), values[search.key(s)]) for s in frontier])
    finals = [s for s in frontier if search.is_final(s)]
    best = max(finals or frontier, key=lambda s: values.get(search.key(s), 0.0))
    text = search.answer_text(example, best)
    sample = Sample(text, task.key(example, text), task.grade(example, text), stats.completion_tokens,
                    stats.prompt_tokens)
    return sample, stats
