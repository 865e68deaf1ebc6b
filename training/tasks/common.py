"""Shared helpers for the task modules: the one answer parser, split checks,
seeded RNGs, and strict readers for the public data files (DataFileError)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator

SPLITS = ("train", "test")

_OPEN, _CLOSE = "<answer>", "</answer>"

# d1's answer format for instruction-tuned models (training/prompting.py): reasoning, then the answer
ANSWER_FORMAT = ("Think it through step by step inside <reasoning></reasoning> tags, then write only the "
                 "final answer inside <answer></answer> tags.")


class DataFileError(ValueError):
    """A data file is missing or malformed; the message names path and line."""


def extract_answer(completion: str) -> str:
    """Content of the last <answer>...</answer> span (an unclosed <answer>
    takes the rest of the text); the whole text when there is no tag."""
    text = completion if isinstance(completion, str) else str(completion)
    lower = text.lower()
    start = lower.rfind(_OPEN)
    if start < 0:
        return text.strip()
    start += len(_OPEN)
    end = lower.find(_CLOSE, start)
    return (text[start:] if end < 0 else text[start:end]).strip()


def check_split(split: str, n: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def make_rng(task: str, split: str, seed: int) -> random.Random:
    """Deterministic RNG per (task, split, seed); string seeds are stable across runs."""
    return random.Random(f"{task}:{split}:{seed}")


def file_error(path: Any, lineno: int | None, problem: str) -> DataFileError:
    where = f"{path} line {lineno}" if lineno is not None else str(path)
    return DataFileError(f"{where}: {problem}")


def open_text(path: Any, **kwargs):
    """Open a UTF-8 file (BOM tolerated), turning OS errors into DataFileError."""
    p = Path(path)
    if not p.is_file():
        raise file_error(path, None, "file not found" if not p.exists() else "not a regular file")
    try:
        return open(p, encoding="utf-8-sig", **kwargs)
    except OSError as e:
        raise file_error(path, None, f"cannot read file ({e.strerror})") from e


def read_jsonl(path: Any) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank JSONL line."""
    lineno = 0
    with open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise file_error(path, lineno, f"invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise file_error(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
        except UnicodeDecodeError:
            raise file_error(path, lineno + 1, "not valid UTF-8 text") from None


def get_field(path: Any, lineno: int, obj: dict, *keys: str, kinds=(str,)) -> Any:
    """The first present of `keys` in obj, checked to be one of `kinds`."""
    for key in keys:
        if key in obj:
            value = obj[key]
            if isinstance(value, bool) or not isinstance(value, kinds):
                want = " or ".join(k.__name__ for k in kinds)
                raise file_error(path, lineno, f"field {key!r} must be {want}, got {value!r}")
            return value
    raise file_error(path, lineno, f"missing key {' or '.join(map(repr, keys))}")


def require_rows(path: Any, rows: list) -> None:
    if not rows:
        raise file_error(path, None, "file contains no examples")



def load_question_answer_jsonl(path: Any, instruction: str, clean_answer, question_keys=("question",)):
    """JSONL of question/answer pairs (gsm8k, math500) -> columns prompt (question + instruction),
    answer (``clean_answer`` of the reference) and question."""
    import datasets
    cols: dict[str, list] = {"prompt": [], "answer": [], "question": []}
    for lineno, obj in read_jsonl(path):
        question = get_field(path, lineno, obj, *question_keys).strip()
        answer = get_field(path, lineno, obj, "answer", kinds=(str, int, float))
        cols["prompt"].append(f"{question}\n{instruction}")
        cols["answer"].append(clean_answer(str(answer)))
        cols["question"].append(question)
    require_rows(path, cols["prompt"])
    return datasets.Dataset.from_dict(cols)


def no_generator(name: str, split: str, n: int):
    check_split(split, n)
    raise ValueError(f"{name} has no procedural generator; it needs --data FILE (JSONL with question/answer)")
