"""GSM8K task for real LLMs: JSONL loading ({"question", "answer"}), the
reasoning prompt, and the numeric final-answer reward."""

from __future__ import annotations

import re

import datasets

from .common import extract_answer, load_question_answer_jsonl, no_generator

NAME = "gsm8k"
GEN_LENGTH = 256
INSTRUCTION = (
    "Solve the problem step by step. Show your reasoning, then give only the final "
    "number inside <answer></answer> tags."
)

_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d+(?:\.\d+)?|\.\d+)")


def last_number(text: str) -> float | None:
    """The last number in text; tolerates $, thousands commas, a sign and decimals."""
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text.replace("$", ""))
    found = _NUMBER.findall(text)
    return float(found[-1]) if found else None


def reference_answer(answer: str) -> str:
    """Final answer of a GSM8K solution: the text after '####' if any, commas removed."""
    return answer.split("####")[-1].replace(",", "").strip()


def make_dataset(split: str, n: int, seed: int = 0) -> datasets.Dataset:
    no_generator(NAME, split, n)


def load_file(path) -> datasets.Dataset:
    return load_question_answer_jsonl(path, INSTRUCTION, reference_answer, question_keys=("question",))


def reward(completion: str, example: dict) -> float:
    """1.0 if the last number of the extracted answer equals the reference number."""
    pred = last_number(extract_answer(completion))
    gold = last_number(str(example["answer"]))
    if pred is None or gold is None:
        return 0.0
    return 1.0 if abs(pred - gold) <= 1e-6 else 0.0
