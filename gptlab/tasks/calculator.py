"""Multi-digit arithmetic that calls for the calculator tool: the reference response is an assistant tool
call, the tool's output and a final answer.

The system prompt describes the tool exactly as the server and the agents do (`tool_system_prompt`: the
header line and the tool's JSON line; no other hint, since the speedrun's models have 256 tokens of context), so a model trained here calls gptlab's `calculator`
tool, through the OpenAI API or an agent, without glue."""

from __future__ import annotations

import random

from . import Example, Task, register
from .checks import EVASIVE, states_number
from ..tools import tool_system_prompt
from ..tools.calculator import calculator

SYSTEM = tool_system_prompt(None, [calculator])
PHRASINGS = ["What is {expr}?", "Calculate {expr}.", "Please compute {expr}.", "{expr} = ?"]


def tool_use(expression: str, final: str) -> list[dict]:
    """Assistant calls the calculator on `expression`, receives the real result, then says `final`."""
    return [{"role": "assistant", "content": "",
             "tool_calls": [{"name": "calculator", "arguments": {"expression": expression}}]},
            {"role": "tool", "content": calculator(expression)},
            {"role": "assistant", "content": final}]


def _mistype(expr: str) -> str:
    """`expr` with one operator swapped (* -> +, else + -> *, else - -> +): always a different value for
    operands of at least 100."""
    for old, new in (("*", "+"), ("+", "*"), ("-", "+")):
        if f" {old} " in expr:
            return expr.replace(f" {old} ", f" {new} ", 1)
    raise AssertionError(f"no operator in {expr!r}")


@register
class Calculator(Task):
    name = "calculator"
    description = "products and sums of 3-5 digit numbers, solved with a calculator tool call"

    def _draw(self, rng: random.Random) -> Example:
        a, b = rng.randint(100, 99999), rng.randint(100, 9999)
        expr = f"{a} {rng.choice('+-*')} {b}"
        if rng.random() < 0.3:
            expr += f" {rng.choice('+-')} {rng.randint(100, 9999)}"
        answer = calculator(expr)
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": rng.choice(PHRASINGS).format(expr=expr)}]
        return Example(self.name, messages, answer, [tool_use(expr, f"{expr} = {answer}.")], {"expression": expr})

    def split_key(self, example: Example) -> str:
        return example.metadata["expression"]

    def check(self, example: Example, response_text: str) -> bool:
        """Right when the final text commits to the exact result (`checks.states_number`): last number equal
        to it (thousands separators allowed), not denied, hedged or listed with another, and any equation
        it writes ("12 * 34 = 408") true, so the result cannot be pinned to a different expression."""
        return states_number(response_text, example.answer_text)

    def _bad_responses(self, example: Example, rng: random.Random):
        expr, answer = example.metadata["expression"], int(example.answer_text)
        # a mental-arithmetic slip in the last digits
        yield f"{expr} = {answer + rng.choice([-10, -1, 1, 9, 100])}."
        # the right tool called on a mistyped expression, then its (correct) output trusted
        wrong = _mistype(expr)
        yield tool_use(wrong, f"{expr} = {calculator(wrong)}.")
        # the tool's result ignored
        yield tool_use(expr, f"{expr} = {answer + rng.choice([-1000, 1000])}.")
        yield rng.choice(EVASIVE)
