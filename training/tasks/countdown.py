"""Countdown task (three numbers -> target): procedural generator with a
hash-based train/test split, JSONL loading, and a safe expression reward."""

from __future__ import annotations

import ast
import hashlib
import operator
from fractions import Fraction

import datasets

from .common import (ANSWER_FORMAT, check_split, extract_answer, file_error, get_field, make_rng,
                     read_jsonl, require_rows)

NAME = "countdown"
GEN_LENGTH = 16
MAX_EXPR_LEN = 15
TEST_BUCKETS = 10  # 1 in 10 (numbers, target) keys goes to test

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ALLOWED_CHARS = set("0123456789+-*/() ")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def split_of(numbers, target) -> str:
    """Stable split for a (numbers, target) pair, independent of number order."""
    key = ",".join(map(str, sorted(numbers))) + f"={target}"
    bucket = int(hashlib.md5(key.encode()).hexdigest(), 16) % TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def _apply(x: int, op: str, y: int) -> int | None:
    """x op y if it is a positive integer, else None."""
    if op == "+":
        return x + y
    if op == "-":
        return x - y if x > y else None
    if op == "*":
        return x * y
    return x // y if x % y == 0 else None


MAX_NUMBER, MAX_TARGET = 99, 999  # this generator's range; cd3.py draws d1's (1-100, target 1-100)


def _draw(rng, max_number: int = MAX_NUMBER, max_target: int = MAX_TARGET) -> tuple[list[int], int, str] | None:
    """One random attempt: (numbers, target, expression) or None if rejected."""
    numbers = [rng.randint(1, max_number) for _ in range(3)]
    a, b, c = rng.sample(numbers, 3)
    op1, op2 = rng.choice("+-*/"), rng.choice("+-*/")
    if rng.random() < 0.5:  # (a op1 b) op2 c
        inner = _apply(a, op1, b)
        value = None if inner is None else _apply(inner, op2, c)
        left = f"{a}{op1}{b}"
        if _PREC[op1] < _PREC[op2]:
            left = f"({left})"
        expr = f"{left}{op2}{c}"
    else:  # a op1 (b op2 c)
        inner = _apply(b, op2, c)
        value = None if inner is None else _apply(a, op1, inner)
        right = f"{b}{op2}{c}"
        if _PREC[op2] < _PREC[op1] or (_PREC[op2] == _PREC[op1] and op1 in "-/"):
            right = f"({right})"
        expr = f"{a}{op1}{right}"
    if value is None or not 1 <= value <= max_target or len(expr) > MAX_EXPR_LEN:
        return None
    return numbers, value, expr


def instruction(example: dict) -> str:
    """The problem in words for an instruction-tuned model (training/prompting.py)."""
    numbers = ", ".join(map(str, example["numbers"]))
    return (f"Use the numbers {numbers}, each exactly once, with + - * / and parentheses to write an "
            f"arithmetic expression equal to {example['target']}. The answer is the expression alone. "
            f"{ANSWER_FORMAT}")


def _prompt(numbers, target) -> str:
    return f"countdown {','.join(map(str, numbers))}={target}"  # one prompt format for every range


def _to_dataset(rows: list[tuple[list[int], int, str]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "prompt": [_prompt(nums, t) for nums, t, _ in rows],
        "answer": [expr for _, _, expr in rows],
        "numbers": [list(nums) for nums, _, _ in rows],
        "target": [t for _, t, _ in rows],
    })


def make_dataset(split: str, n: int, seed: int = 0) -> datasets.Dataset:
    return generate(split, n, seed, NAME, MAX_NUMBER, MAX_TARGET)


def generate(split: str, n: int, seed: int, name: str, max_number: int, max_target: int) -> datasets.Dataset:
    """``n`` drawn problems of one split: three numbers in 1..max_number, a target in 1..max_target
    reached by one drawn expression (the reference answer); ``name`` seeds the draws."""
    check_split(split, n)
    rng = make_rng(name, split, seed)
    rows = []
    while len(rows) < n:
        drawn = _draw(rng, max_number, max_target)
        if drawn is not None and split_of(drawn[0], drawn[1]) == split:
            rows.append(drawn)
    return _to_dataset(rows)


def load_file(path) -> datasets.Dataset:
    """Read JSONL lines {"input": "a,b,c", "output": target}; no reference expression."""
    rows = []
    for lineno, obj in read_jsonl(path):
        raw = get_field(path, lineno, obj, "input")
        try:
            numbers = [int(x) for x in raw.split(",")]
        except ValueError:
            raise file_error(path, lineno, f"'input' must be comma-separated integers, got {raw!r}") from None
        if len(numbers) < 2 or min(numbers) < 0:
            raise file_error(path, lineno, f"'input' must hold at least 2 non-negative integers, got {raw!r}")
        out = get_field(path, lineno, obj, "output", kinds=(str, int))
        try:
            target = int(out)
        except ValueError:
            raise file_error(path, lineno, f"'output' must be an integer target, got {out!r}") from None
        rows.append((numbers, target, ""))
    require_rows(path, rows)
    return _to_dataset(rows)


def _eval(node, literals: list[int]) -> Fraction:
    """Evaluate a whitelisted AST node exactly; raise ValueError on anything else."""
    if isinstance(node, ast.Expression):
        return _eval(node.body, literals)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, literals)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, literals), _eval(node.right, literals)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _BINOPS[type(node.op)](left, right)
    raise ValueError(f"disallowed syntax {type(node).__name__}")


def evaluate(expr: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, integer literals) of an arithmetic expression, or None if not well-formed."""
    expr = expr.strip()
    if not expr or not set(expr) <= _ALLOWED_CHARS:
        return None
    literals: list[int] = []
    try:
        return _eval(ast.parse(expr, mode="eval"), literals), literals
    except Exception:  # SyntaxError, ValueError, RecursionError, MemoryError-ish parser failures
        return None


def reward(completion: str, example: dict) -> float:
    """1.0 correct; 0.1 well-formed but wrong numbers or value; 0.0 otherwise."""
    expr = extract_answer(completion).split("=", 1)[0]
    result = evaluate(expr)
    if result is None:
        return 0.0
    value, literals = result
    ok = sorted(literals) == sorted(example["numbers"]) and value == example["target"]
    return 1.0 if ok else 0.1
