"""MATH-500 task for real LLMs: JSONL loading, the \\boxed{} answer prompt,
and a normalising string/number comparison reward."""

from __future__ import annotations

import re
from fractions import Fraction

import datasets

from .common import extract_answer, load_question_answer_jsonl, no_generator

NAME = "math500"
GEN_LENGTH = 256
INSTRUCTION = (
    "Solve the problem step by step. Show your reasoning, then give the final answer "
    "as \\boxed{...} inside <answer></answer> tags."
)

_REMOVE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "$", "^\\circ", "^{\\circ}", "\\%", "%")
_TEXT = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":  # "\boxed 5" form
        rest = text[i:].split()
        return rest[0].rstrip("$") if rest else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return text[i + 1:]  # unbalanced: take the rest


def normalize(s: str) -> str:
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 shorthand
    for token in _REMOVE:
        s = s.replace(token, "")
    prev = None
    while prev != s:  # unwrap nested \text{...}
        prev, s = s, _TEXT.sub(r"\1", s)
    s = "".join(s.split()).rstrip(".")
    if s.count("=") == 1 and re.match(r"^[A-Za-z]\w*=", s):  # "x=5" -> "5"
        s = s.split("=", 1)[1]
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    return s


def to_number(s: str) -> Fraction | None:
    """Exact value of a normalised plain number, a/b, or \\frac{a}{b}; else None."""
    try:
        if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
            return Fraction(s)
        if m := re.fullmatch(r"(-?\d+)/(-?\d+)", s):
            return Fraction(int(m[1]), int(m[2]))
        if m := _FRAC.fullmatch(s):
            value = Fraction(int(m[2]), int(m[3]))
            return -value if m[1] else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _final(text: str) -> str:
    boxed = last_boxed(text)
    return normalize(boxed if boxed is not None else text)


def is_equiv(pred: str, gold: str) -> bool:
    a, b = _final(pred), _final(gold)
    if a == b:
        return bool(a)
    x, y = to_number(a), to_number(b)
    return x is not None and x == y


def make_dataset(split: str, n: int, seed: int = 0) -> datasets.Dataset:
    no_generator(NAME, split, n)


def load_file(path) -> datasets.Dataset:
    """JSONL with 'question' (or 'problem', as in the public MATH-500 release) and 'answer'."""
    return load_question_answer_jsonl(path, INSTRUCTION, str.strip, question_keys=("question", "problem"))


def reward(completion: str, example: dict) -> float:
    """1.0 if the (boxed) final answer matches the reference after normalisation."""
    try:
        return 1.0 if is_equiv(extract_answer(completion), str(example["answer"])) else 0.0
    except Exception:  # defensive: reward must never raise
        return 0.0
