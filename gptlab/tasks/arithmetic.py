"""Multi-step arithmetic with small numbers ("3 + 8 + 4 = ?"), answered directly or step by step."""

from __future__ import annotations

import random

from . import Example, Task, register
from .checks import EVASIVE, states_number

PHRASINGS = ["{expr} = ?", "What is {expr}?", "Compute {expr}.", "Calculate {expr}.", "{expr} equals what?"]


@register
class Arithmetic(Task):
    name = "arithmetic"
    description = "sums and differences of 2-5 numbers below 20, direct or chain-of-thought answers"

    def _draw(self, rng: random.Random) -> Example:
        numbers = [rng.randint(1, 19) for _ in range(rng.randint(2, 5))]
        ops = [rng.choice("+-") for _ in numbers[1:]]
        expr = str(numbers[0]) + "".join(f" {op} {n}" for op, n in zip(ops, numbers[1:]))
        steps, total = [], numbers[0]
        for op, n in zip(ops, numbers[1:]):
            new = total + n if op == "+" else total - n
            steps.append(f"{total} {op} {n} = {new}.")
            total = new
        direct = f"{expr} = {total}."
        chain = " ".join(steps) + f" The answer is {total}."
        return Example(self.name, [{"role": "user", "content": rng.choice(PHRASINGS).format(expr=expr)}],
                       str(total), [direct, chain], {"expression": expr, "numbers": numbers, "ops": ops})

    def split_key(self, example: Example) -> str:
        return example.metadata["expression"]

    def check(self, example: Example, response_text: str) -> bool:
        """Right when the reply commits to the total (`checks.states_number`): its last number is the total,
        not denied, hedged or listed with another, and every step it writes is true arithmetic, because the
        chain-of-thought reference shows its steps and a wrong step with a lucky total is not a solution."""
        return states_number(response_text, example.answer_text)

    def _bad_responses(self, example: Example, rng: random.Random):
        total, expr = int(example.answer_text), example.metadata["expression"]
        off = rng.choice([-2, -1, 1, 2, 10])
        yield f"{expr} = {total + off}."
        yield str(total - off)
        # a chain of thought that forgets the last number (never correct: every number is at least 1)
        partial = sum(n if op == "+" else -n for op, n in zip(["+"] + example.metadata["ops"][:-1],
                                                             example.metadata["numbers"][:-1]))
        yield f"Working step by step, the total is {partial}. The answer is {partial}."
        yield rng.choice(EVASIVE)
        yield "The answer is a number."
