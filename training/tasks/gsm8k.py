"""GSM8K task for real LLMs: JSONL loading ({"question", "answer"}), the
reasoning prompt, and the numeric final-answer reward."""

from __future__ import annotations

import re

import datasets

from .common import check_split, extract_answer, get_field, read_jsonl, require_rows

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
    check_split(split, n)
    raise ValueError(f"{NAME} has no procedural generator; it needs --data FILE (JSONL with question/answer)")


def load_file(path) -> datasets.Dataset:
    cols: dict[str, list] = {"prompt": [], "answer": [], "question": []}
    for lineno, obj in read_jsonl(path):
        question = get_field(path, lineno, obj, "question").strip()
        answer = get_field(path, lineno, obj, "answer", kinds=(str, int, float))
        cols["prompt"].append(f"{question}\n{INSTRUCTION}")
        cols["answer"].append(reference_answer(str(answer)))
        cols["question"].append(question)
    require_rows(path, cols["prompt"])
    return datasets.Dataset.from_dict(cols)


def reward(completion: str, example: dict) -> float:
    """1.0 if the last number of the extracted answer equals the reference number."""
    pred = last_number(extract_answer(completion))
    gold = last_number(str(example["answer"]))
    if pred is None or gold is None:
        return 0.0
    return 1.0 if abs(pred - gold) <= 1e-6 else 0.0
