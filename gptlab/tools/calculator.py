"""The `calculator` tool: exact, safe evaluation of arithmetic expressions (the tool the `calculator` task
trains the assistant to call).

Design decisions
- The calculator never calls `eval`: the expression is parsed with `ast` and only number literals, unary
  +/-, parentheses and + - * / // % ** are evaluated, by our own recursive walk. Size limits (expression
  length, literal size, exponent, result digits) keep a model-written expression from burning CPU or
  memory (`9**9**9` is refused before it is computed).
- Refusals are `GptlabError`s, which `Toolbox.call` turns into the "error: ..." observation the model sees.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from ..common import GptlabError
from .base import tool

MAX_EXPRESSION_CHARS = 200
MAX_LITERAL = 10**15
MAX_RESULT_DIGITS = 60
MAX_EXPONENT = 100

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _digits(x: int | float) -> float:
    return math.log10(abs(x)) + 1 if x else 1.0


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool is an int subclass; strings, None, complex are out
            raise GptlabError(f"calculator: {node.value!r} is not a number")
        if abs(node.value) > MAX_LITERAL:
            raise GptlabError(f"calculator: number {node.value} is too large")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT or (abs(left) > 1 and right * math.log10(abs(left)) > MAX_RESULT_DIGITS):
                raise GptlabError("calculator: power too large")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise GptlabError("calculator: division by zero") from None
        except OverflowError:
            raise GptlabError("calculator: result too large") from None
        if isinstance(result, complex):
            raise GptlabError("calculator: result is not a real number")
        if isinstance(result, float) and not math.isfinite(result) or _digits(result) > MAX_RESULT_DIGITS:
            raise GptlabError("calculator: result too large")
        return result
    raise GptlabError(f"calculator: unsupported syntax {type(node).__name__} (only numbers, parentheses and "
                      "+ - * / // % ** are allowed)")


def calculate(expression: str) -> int | float:
    """Value of an arithmetic expression; GptlabError if it is not allowed or not computable."""
    if not isinstance(expression, str) or not expression.strip():
        raise GptlabError("calculator: empty expression")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise GptlabError(f"calculator: expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise GptlabError(f"calculator: cannot parse {expression!r}") from None
    return _evaluate(tree.body)


def format_number(value: int | float) -> str:
    """Integers exactly; floats with up to 12 significant digits and no '.0' on whole numbers."""
    if isinstance(value, float) and value.is_integer() and abs(value) < MAX_LITERAL:
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.12g}"


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly."""  # short: it is in every calculator training prompt
    return format_number(calculate(expression))
