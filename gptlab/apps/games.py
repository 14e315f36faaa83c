"""Game of 24: four numbers, + - * / and parentheses, each number used exactly once, reach 24.

The puzzle tree of thoughts is measured on (Yao et al. 2023, "Tree of Thoughts", section 4.1).

Design decisions
- Exact arithmetic only: values are `fractions.Fraction`, so 8 / (3 - 8 / 3) = 24 is right and no float
  rounding can accept a near miss. Answers are parsed with `ast` (never `eval`): only number literals,
  binary + - * / and parentheses are accepted; the literals, as a multiset, must equal
  the puzzle's four numbers.
- The generator is seeded and keeps only solvable puzzles (`solve` searches every pair-combination, the
  same state space tree of thoughts walks), so an accuracy of 0 never comes from an impossible puzzle.
- The puzzle is also a `tasks.Task` (not registered in the suite's registry, so other stages' "all tasks"
  are unchanged): the train/test split is by the sorted numbers, and the reference answer is a solution.
"""

from __future__ import annotations

import ast
import functools
import itertools
import random
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

from ..tasks import Example, Task
from ..tasks.checks import EVASIVE

TARGET = 24
LOW, HIGH = 1, 13  # the card values of the usual deck game (and of the paper's 4nums.com puzzles)
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
_SYMBOLS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
            "/": lambda a, b: a / b if b else None}


def _evaluate(node: ast.AST, literals: list[int]) -> Fraction:
    """Exact value of an arithmetic expression tree; appends every integer literal to `literals`. Raises
    ValueError for anything but integer literals and binary + - * / (no unary minus: the game combines
    the four numbers with the four operations only)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left, literals), _evaluate(node.right, literals)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _OPS[type(node.op)](left, right)
    raise ValueError(f"not allowed in an answer: {type(node).__name__}")


def normalise_expression(text: str) -> str:
    """Typographic operators as Python's: × x · -> *, ÷ -> /, − – -> -; a trailing '= 24' dropped."""
    text = text.replace("×", "*").replace("·", "*").replace("÷", "/").replace("−", "-").replace("–", "-")
    text = re.sub(r"(?<=[\d)\s])x(?=[\s\d(])", "*", text)
    return re.sub(r"=\s*24\s*\.?\s*$", "", text.strip()).strip()


def expression_value(expression: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, integer literals used) of an arithmetic expression, or None if it is not one."""
    try:
        tree = ast.parse(normalise_expression(expression), mode="eval")
        literals: list[int] = []
        return _evaluate(tree.body, literals), literals
    except (SyntaxError, ValueError, RecursionError):
        return None


def check_expression(expression: str | None, numbers: list[int]) -> bool:
    """Whether `expression` uses each of `numbers` exactly once and evaluates to exactly 24."""
    if not expression:
        return False
    result = expression_value(expression)
    return result is not None and result[0] == TARGET and Counter(result[1]) == Counter(numbers)


# an arithmetic expression: digits, operators, parentheses and spaces, with at least one operator
_EXPRESSION = re.compile(r"[\d(][\d\s+\-*/×÷x·−–()]*[\d)]")


def extract_expression(text: str, numbers: list[int]) -> str | None:
    """The answer expression in a model's reply: the last candidate that is a valid solution, else the
    last candidate that is any well-formed expression (so a wrong answer is reported as given), else None.
    Candidates are maximal operator/digit runs, scanned on the text before each '= 24' first."""
    candidates = [m.group(0) for m in _EXPRESSION.finditer(text)]
    candidates = [c for c in candidates if re.search(r"[+\-*/×÷x·−–]", c)]
    for candidate in reversed(candidates):
        if check_expression(candidate, numbers):
            return normalise_expression(candidate)
    for candidate in reversed(candidates):
        if expression_value(candidate) is not None:
            return normalise_expression(candidate)
    return None


def solve(numbers: Sequence[int | Fraction]) -> str | None:
    """One solution expression for the puzzle, or None: exhaustive search over choosing two numbers,
    combining them with an operator, and recursing on the shorter list (exact fractions throughout).
    Multisets of values already found dead are not searched again, and results are cached per puzzle."""
    return _solve_sorted(tuple(sorted(Fraction(n) for n in numbers)))


@functools.lru_cache(maxsize=4096)
def _solve_sorted(values: tuple[Fraction, ...]) -> str | None:
    dead: set[tuple[Fraction, ...]] = set()

    def search(items: list[tuple[Fraction, str]]) -> str | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == TARGET else None
        key = tuple(sorted(v for v, _ in items))
        if key in dead:
            return None
        for i, j in itertools.permutations(range(len(items)), 2):
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            (a, ea), (b, eb) = items[i], items[j]
            for symbol, op in _SYMBOLS.items():
                if symbol in "+*" and i > j:
                    continue  # commutative: the other order is tried already
                value = op(a, b)
                if value is not None:
                    found = search(rest + [(value, f"({ea} {symbol} {eb})")])
                    if found:
                        return found
        dead.add(key)
        return None

    found = search([(v, str(v)) for v in values])
    return found[1:-1] if found and found.startswith("(") and found.endswith(")") else found


def generate_puzzles(n: int, seed: int = 0, low: int = LOW, high: int = HIGH) -> list[list[int]]:
    """`n` distinct solvable puzzles (sorted number lists), the same for the same seed."""
    rng, seen, out = random.Random(f"game24:{seed}"), set(), []
    possible = len(list(itertools.combinations_with_replacement(range(low, high + 1), 4)))
    while len(out) < n and len(seen) < possible:
        numbers = tuple(sorted(rng.randint(low, high) for _ in range(4)))
        if numbers not in seen:
            seen.add(numbers)
            if solve(list(numbers)):
                out.append(list(numbers))
    return out


def puzzle_text(numbers: list[int]) -> str:
    return (f"Use the numbers {' '.join(map(str, numbers))} and the operations + - * / (with parentheses) to "
            f"make {TARGET}. Use each number exactly once. Give the expression.")


class Game24(Task):
    """Game of 24 as a task (unregistered: see the module docstring)."""

    name = "game24"
    description = "make 24 from four numbers with + - * /, each used once"

    def _draw(self, rng: random.Random) -> Example:
        while True:
            numbers = sorted(rng.randint(LOW, HIGH) for _ in range(4))
            solution = solve(numbers)
            if solution:
                return Example(self.name, [{"role": "user", "content": puzzle_text(numbers)}], solution,
                               [f"{solution} = {TARGET}", f"The answer is {solution}."], {"numbers": numbers})

    def split_key(self, example: Example) -> str:
        return " ".join(map(str, example.metadata["numbers"]))

    def check(self, example: Example, response_text: str) -> bool:
        numbers = example.metadata["numbers"]
        return check_expression(extract_expression(response_text, numbers), numbers)

    def _bad_responses(self, example: Example, rng: random.Random):
        a, b, c, d = example.metadata["numbers"]
        yield f"{a} + {b} + {c} + {d} = {TARGET}" if a + b + c + d != TARGET else f"{a} * {b} * {c} * {d}"
        yield f"{a} + {b} + {c} = {TARGET}"
        yield rng.choice(EVASIVE)


GAME24 = Game24()
