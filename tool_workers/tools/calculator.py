"""`calculator`: safe arithmetic on numbers.

The expression is parsed with `ast` and only numbers, `+ - * / // % **`, unary `+ -` and
parentheses are evaluated; anything else (names, calls, attributes, strings) is refused, so
`__import__('os')` is a parse-tree node we reject, never code we run. `^` means power, as people
write it. Sizes are bounded (expression length, exponent, integer bits) so one call cannot eat a
worker's CPU or memory.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from proto.tools import MAX_EXPRESSION_CHARS, CalculatorArgs
from shared import tool_catalogue
from tool_workers.registry import Tool, ToolContext, ToolError

MAX_EXPONENT = 10_000
MAX_INT_BITS = 8_192  # ~2,466 decimal digits

Number = int | float


class CalculatorError(ValueError):
    """The expression is not something this calculator evaluates; the message says why."""


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.BitXor: operator.pow,  # "2^10"
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_SYMBOL = {ast.BitXor: "^", ast.Pow: "**"}


def evaluate(expression: str) -> Number:
    """Evaluates an arithmetic expression; raises CalculatorError for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError("not a valid arithmetic expression") from None
    try:
        return _eval(tree.body)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large") from None
    except RecursionError:
        raise CalculatorError("expression nested too deeply") from None


def _eval(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalculatorError(f"only numbers are allowed, not {value!r}")
        return _checked(value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow | ast.BitXor):
            _check_power(left, right, _SYMBOL[type(node.op)])
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex):
            raise CalculatorError("the result is not a real number")
        return _checked(result)
    raise CalculatorError(
        f"unsupported syntax: {_describe(node)}; only numbers and + - * / // % ** are allowed"
    )


def _check_power(base: Number, exponent: Number, symbol: str) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exponent} is too large (the limit is {MAX_EXPONENT})")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if max(base.bit_length() - 1, 0) * exponent > MAX_INT_BITS:  # lower bound of the result's bits
            raise CalculatorError(f"result of {symbol} too large")


def _checked(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError("result too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result too large")
    return value


def _describe(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        return "function calls"
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    if isinstance(node, ast.Attribute):
        return "attribute access"
    return type(node).__name__


def format_number(value: Number) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".15g")
    return str(value)


async def run(args: CalculatorArgs, ctx: ToolContext) -> str:
    try:
        return format_number(evaluate(args.expression))
    except CalculatorError as exc:
        raise ToolError(f"calculator: {exc}") from None


TOOL = Tool.implementing(tool_catalogue.CALCULATOR, run)
