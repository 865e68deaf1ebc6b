"""Countdown task (three numbers -> target): procedural generator with a
hash-based train/test split, JSONL loading, and a safe expression reward."""

from __future__ import annotations

import ast
import hashlib
import operator
import re
from fractions import Fraction

import datasets

from . import d1_prompts
from .common import (check_split, extract_answer, field, file_error, make_rng, read_records,
                     require_rows)
from .grading import boxed_spans, is_placeholder, last_boxed, strip_end

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


def instruction(example: dict, stage: str) -> str:
    """d1's countdown user turn for the example's ``numbers`` and ``target``, for RL rollouts (``train``) or
    evaluation (``eval``): training/tasks/d1_prompts.py."""
    return d1_prompts.countdown(d1_prompts.field(example, "numbers", NAME), d1_prompts.field(example, "target", NAME),
                                stage)


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


def parse_numbers(raw) -> list[int] | None:
    """The integers of a countdown ``input``/``nums`` cell: a list of ints, or a string like "1,2,3",
    "[1, 2, 3]" or "1 2 3"; None if it is anything else."""
    if isinstance(raw, list):
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in raw)
        return list(raw) if ok else None
    parts = raw.strip().strip("[]").replace(",", " ").split()
    try:
        return [int(x) for x in parts]
    except ValueError:
        return None


def _key(record: dict, names: tuple[str, ...]) -> str:
    """How the record spells the first of ``names`` it holds (any letter case), for error messages."""
    return next((k for n in names for k in record if k.lower() == n), names[0])


def load_file(path) -> datasets.Dataset:
    """JSONL, CSV or Parquet rows in d1's format {"input": "a,b,c", "output": target} or with ``nums``
    (or ``numbers``: a list or "a,b,c") and ``target``; no reference expression (``answer`` is "")."""
    rows = []
    for where, obj in read_records(path, columns=(("input", "nums", "numbers"), ("output", "target"))):
        raw = field(path, where, obj, "input", "nums", "numbers", kinds=(str, list))
        name = _key(obj, ("input", "nums", "numbers"))
        numbers = parse_numbers(raw)
        if numbers is None:
            raise file_error(path, where, f"{name!r} must be comma-separated integers, got {raw!r}")
        if len(numbers) < 2 or min(numbers) < 0:
            raise file_error(path, where, f"{name!r} must hold at least 2 non-negative integers, got {raw!r}")
        out = field(path, where, obj, "output", "target", kinds=(str, int))
        try:
            target = int(out)
        except ValueError:
            raise file_error(path, where, f"{_key(obj, ('output', 'target'))!r} must be an integer target, "
                                          f"got {out!r}") from None
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


_LATEX_OPS = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("÷", "/"), ("−", "-"))
_EXPR_CHARS = frozenset("0123456789+-*/() \t\n\r\f\v")
_LEADING_EXPR = re.compile(r"[\d+\-*/()\s]*")


def _before_equals(span: str) -> str | None:
    """The run of expression characters that ends at the first ``=`` preceded by one (``95 - 73 = 22``
    -> ``95 - 73 ``), as d1's ``([0-9+\\-*/() ]+)=`` finds it; None when no ``=`` is. Linear time."""
    i = span.find("=")
    while i >= 0:
        j = i
        while j > 0 and span[j - 1] in _EXPR_CHARS:
            j -= 1
        if j < i:
            return span[j:i]
        i = span.find("=", i + 1)
    return None


def final_expression(completion: str) -> str:
    """The expression a completion answers, as d1's evaluator reads it: the last ``\\boxed{}`` (d1's prompt
    asks for one; one cut off before its closing brace reads as far as its expression goes), else the
    ``<answer>`` tags, else the whole text; LaTeX operators (``\\times``,
    ``\\cdot``, ``\\div``) made Python's; of ``expr = 94`` the expression before the first ``=``.

    d1 reads the whole completion when there is no box, so an expression in ``<answer>`` tags alone is
    seen there only if it is the first ``expr = N`` of the text; here the tags are read."""
    text = strip_end(completion)
    span = last_boxed(text)
    if is_placeholder(span):
        unclosed = [content for content, closed in boxed_spans(text) if not closed]
        if unclosed:  # "\\boxed{48 + 29 + 16" cut off: the expression its brace never closed
            span = _LEADING_EXPR.match(unclosed[-1]).group(0)
        else:
            span = extract_answer(text)
    for latex, op in _LATEX_OPS:
        span = span.replace(latex, op)
    before = _before_equals(span)
    if before is not None:
        span = before
    return " ".join(span.split())


def reward(completion: str, example: dict) -> float:
    """1.0 when the completion's expression (:func:`final_expression`) uses each of ``example["numbers"]``
    exactly once and equals ``example["target"]``; 0.1 when it is a well-formed expression that does not
    (d1's training reward gives the same 0.1 format score); 0.0 when there is none."""
    try:
        result = evaluate(final_expression(completion))
    except Exception:  # defensive: reward must never raise
        return 0.0
    if result is None:
        return 0.0
    value, literals = result
    ok = sorted(literals) == sorted(example["numbers"]) and value == example["target"]
    return 1.0 if ok else 0.1
