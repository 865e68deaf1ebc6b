"""MATH-500 task for real LLMs: file loading, the \\boxed{} answer prompt, and a reward that reads the
final answer as d1's evaluator does (last \\boxed{}, else the <answer> tags) and compares it with the
reference by normalised string or by value (math-verify), in training/tasks/grading.py."""

from __future__ import annotations

import re

import datasets

from . import d1_prompts
from .common import field, file_error, load_question_answer, no_generator
from .grading import answer_tag, boxed_spans, is_placeholder, last_boxed, math_equal, strip_end

NAME = "math500"
GEN_LENGTH = 256
# the raw prompt's instruction (``prompt`` = question + this), for a model read without a chat template
INSTRUCTION = (
    "Solve the problem step by step. Show your reasoning, then give the final answer "
    "as \\boxed{...} inside <answer></answer> tags."
)


def instruction(example: dict, stage: str) -> str:
    """d1's MATH user turn for the example's ``question`` (a file's ``problem``), for RL rollouts (``train``) or
    evaluation (``eval``): training/tasks/d1_prompts.py."""
    return d1_prompts.math500(d1_prompts.field(example, "question", NAME), stage)


def final_answer(completion: str) -> str | None:
    """The answer a completion gives: its last closed ``\\boxed{}`` (d1's reading), else the content of its
    ``<answer>`` tags with a box whose brace never closes unwrapped; else the whole text.

    d1 compares the whole completion when there is no box, so an answer in ``<answer>`` tags alone scores 0
    there; here it is read. An empty box (``\\boxed{}``) falls back to the tags, as in d1."""
    text = strip_end(completion)
    boxed = last_boxed(text)
    if not is_placeholder(boxed):
        return boxed
    tag = answer_tag(text)
    if tag is None:  # neither: the whole text, as d1 compares it (right only when it is the answer alone)
        return None if boxed is not None or is_placeholder(text) else text.strip()
    spans = boxed_spans(tag)
    if spans:  # "\\boxed{2000" with no closing brace, inside the tags
        tag = spans[-1][0]
    elif m := re.fullmatch(r"boxed\{(.*)\}", tag, re.S):  # "boxed{4}": the backslash lost
        tag = m[1]
    return None if is_placeholder(tag) else tag.strip()


def is_equiv(pred: str, gold: str) -> bool:
    """True when the final answer of ``pred`` (a completion) equals the reference answer ``gold``."""
    return math_equal(final_answer(pred), gold)


def make_dataset(split: str, n: int, seed: int = 0) -> datasets.Dataset:
    no_generator(NAME, split, n)


def answer_parts(path, where, record: dict) -> tuple[str, str]:
    """(final answer, reasoning) of one MATH record: its ``answer`` (MATH-500's field), else the last
    \\boxed{} of its ``solution``; the reasoning is the ``solution`` ("" if absent)."""
    solution = field(path, where, record, "solution", required=False) or ""
    answer = field(path, where, record, "answer", kinds=(str, int, float), required=False)
    if answer is None:
        answer = last_boxed(solution)
        if answer is None or not answer.strip():
            raise file_error(path, where, "missing key 'answer' (and no 'solution' with a \\boxed{} answer)")
    return str(answer).strip(), solution.strip()


def load_file(path) -> datasets.Dataset:
    """JSONL, CSV or Parquet rows in MATH-500's layout (openai/prm800k's test file: ``problem``, ``solution``,
    ``answer``, ``subject``, ``level``, ``unique_id``; ``question`` is accepted for ``problem``) -> prompt,
    answer, question, reasoning."""
    return load_question_answer(path, INSTRUCTION, answer_parts, question_keys=("problem", "question"))


def reward(completion: str, example: dict) -> float:
    """1.0 when the completion's final answer (:func:`final_answer`) equals ``example["answer"]``
    (:func:`grading.math_equal`: normalised strings, or equal in value by math-verify), else 0.0."""
    try:
        return 1.0 if is_equiv(completion, str(example["answer"])) else 0.0
    except Exception:  # defensive: reward must never raise
        return 0.0
