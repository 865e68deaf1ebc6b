"""GSM8K task for real LLMs: JSONL loading ({"question", "answer"}), the
reasoning prompt, and the numeric final-answer reward."""

from __future__ import annotations

import re
from fractions import Fraction

import datasets

from . import d1_prompts
from .common import extract_answer, field, file_error, load_question_answer, no_generator
from .grading import boxed_spans, is_placeholder, number_value, numbers_in, strip_end

NAME = "gsm8k"
GEN_LENGTH = 256
# the raw prompt's instruction (``prompt`` = question + this), for a model read without a chat template
INSTRUCTION = (
    "Solve the problem step by step. Show your reasoning, then give only the final "
    "number inside <answer></answer> tags."
)


def instruction(example: dict, stage: str) -> str:
    """d1's user turn for the example's ``question``, for RL rollouts (``train``) or evaluation (``eval``):
    training/tasks/d1_prompts.py."""
    return d1_prompts.gsm8k(d1_prompts.field(example, "question", NAME), stage)

def last_number(text: str) -> float | None:
    """The last number in text; tolerates $, thousands commas, a sign and decimals."""
    found = numbers_in(text)
    return float(found[-1]) if found else None


def reference_answer(answer: str) -> str:
    """Final answer of a GSM8K solution: the text after '####' if any, commas removed."""
    return answer.split("####")[-1].replace(",", "").strip()


def make_dataset(split: str, n: int, seed: int = 0) -> datasets.Dataset:
    no_generator(NAME, split, n)


_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: "48/2 = <<48/2=24>>24"


def answer_parts(path, where, record: dict) -> tuple[str, str]:
    """(final answer, reasoning) of one GSM8K record: its ``answer`` is a worked solution ending ``#### 72``
    (openai/grade-school-math) or a bare number; the reasoning is the text before ``####`` without the
    calculator annotations ("" for a bare number). An answer with no number in its final part is an error."""
    raw = str(field(path, where, record, "answer", kinds=(str, int, float)))
    reasoning, marked, _ = raw.rpartition("####")
    answer = reference_answer(raw)
    if not re.search(r"\d", answer):
        raise file_error(path, where, f"field 'answer' has no final number (expected a solution ending "
                                      f"'#### 72', or a number): {raw[-80:]!r}")
    return answer, _CALCULATOR.sub("", reasoning).strip() if marked else ""


def load_file(path) -> datasets.Dataset:
    """JSONL, CSV or Parquet rows with ``question`` (or ``problem``) and ``answer`` (GSM8K's solution ending
    ``#### 72``, or the number alone) -> prompt, answer (the final number, commas dropped), question,
    reasoning."""
    return load_question_answer(path, INSTRUCTION, answer_parts, question_keys=("question", "problem"))


def _box_number(content: str) -> Fraction | None:
    """The number a box holds: its one number (``43,500``, ``\\$18``, ``\\frac{2}{3}``, ``45/3``, ``x = 5``,
    ``8 + 7 = 15``, ``12 \\text{ apples}``), else its first (``2:00 pm``, as d1 reads); None if it has none."""
    value = number_value(content)
    if value is not None:
        return value
    found = numbers_in(content)
    return found[0] if found else None


def final_number(completion: str) -> Fraction | None:
    """The number a completion answers: the first ``\\boxed{}`` that holds one (d1's reading, which the
    prompt asks for; a box whose brace never closes reads to its first ``}``), else the number of its
    ``<answer>`` tags (the last one there; an unclosed tag reads to the end), else None: a completion with
    neither gives no answer, as in d1."""
    text = strip_end(completion)
    for content, closed in boxed_spans(text):
        if not closed:
            content = content.split("}", 1)[0]
        if not is_placeholder(content):
            value = _box_number(content)
            if value is not None:
                return value
    if "<answer>" not in text.lower():
        return None
    tag = extract_answer(text)
    value = number_value(tag)
    if value is None and (found := numbers_in(tag)):
        value = found[-1]
    return value


def reward(completion: str, example: dict) -> float:
    """1.0 when the completion's final number (:func:`final_number`) equals the reference number
    ``example["answer"]`` (its last number, so a GSM8K solution ending ``#### 72`` works too), else 0.0."""
    try:
        gold = last_number(str(example["answer"]))
        pred = final_number(completion)
        return 1.0 if pred is not None and gold is not None and abs(float(pred) - gold) <= 1e-6 else 0.0
    except Exception:  # defensive: reward must never raise
        return 0.0
