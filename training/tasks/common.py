"""Shared helpers for the task modules: the one answer parser, split checks,
seeded RNGs, and strict readers for the public data files (DataFileError).

A task's ``load_file`` reads JSONL, CSV or Parquet by extension (:func:`read_records`) and picks its fields
with :func:`field` (the file's own spelling first, then any letter case). JSONL and CSV are read line by line
here, so an error names the file's 1-based line (CSV cells stay strings: a puzzle's leading zeros survive);
Parquet goes through the ``datasets`` library (pyarrow) and an error names the 1-based row."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Iterator

SPLITS = ("train", "test")

_OPEN, _CLOSE = "<answer>", "</answer>"


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


def file_error(path: Any, lineno: int | str | None, problem: str) -> DataFileError:
    """``PATH line N: problem``; ``lineno`` may instead be a place already spelled out (``"row 3"``)."""
    where = str(path) if lineno is None else f"{path} line {lineno}" if isinstance(lineno, int) \
        else f"{path} {lineno}"
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


JSONL_SUFFIXES, CSV_SUFFIXES, PARQUET_SUFFIXES = (".jsonl", ".json", ".ndjson"), (".csv",), (".parquet", ".pq")


def read_records(path: Any, columns: tuple[tuple[str, ...], ...] = ()) -> Iterator[tuple[int | str, dict]]:
    """Yield (place, record) for each example of a data file, the format picked by its extension.

    place: the 1-based line of a JSONL or CSV file (a CSV row's last line), or ``"row N"`` (1-based) of a
    Parquet file; pass it to :func:`file_error`. ``columns``: alternatives of names a CSV header or Parquet
    schema must hold one of each (any letter case), checked before the first row (JSONL rows are checked
    one by one by :func:`field`). Blank lines and all-empty CSV rows are skipped."""
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(path)
    if suffix in CSV_SUFFIXES:
        return _read_csv(path, columns)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, columns)
    open_text(path).close()  # a missing file is reported as such
    raise file_error(path, None, f"unknown data file extension {suffix!r}: expected .jsonl (or .json), .csv "
                                 "or .parquet")


def _check_columns(path: Any, lineno: int | None, names: list[str], columns) -> None:
    have = {n.lower() for n in names}
    missing = [alts[0] for alts in columns if not any(a.lower() in have for a in alts)]
    if missing:
        what = "header" if lineno is not None else "columns"
        raise file_error(path, lineno, f"{what} lacks column(s) {','.join(missing)}: {names}")


def _read_csv(path: Any, columns) -> Iterator[tuple[int, dict]]:
    """CSV rows as {header name: cell string}; a row with more or fewer cells than the header is an error."""
    with open_text(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise file_error(path, 1, "empty file, expected a header row"
                                 + (f" with {','.join(a[0] for a in columns)}" if columns else ""))
            names = [h.strip() for h in header]
            _check_columns(path, 1, names, columns)
            for rec in reader:
                if not any(x.strip() for x in rec):
                    continue
                if len(rec) != len(names):
                    raise file_error(path, reader.line_num, f"expected {len(names)} columns, got {len(rec)}")
                yield reader.line_num, dict(zip(names, rec))
        except csv.Error as e:
            raise file_error(path, reader.line_num, f"CSV error ({e})") from None
        except UnicodeDecodeError:
            raise file_error(path, reader.line_num + 1, "not valid UTF-8 text") from None


def _read_parquet(path: Any, columns) -> Iterator[tuple[str, dict]]:
    """Parquet rows through ``datasets`` (an empty cell reads as None)."""
    import datasets
    p = Path(path)
    if not p.is_file():
        raise file_error(path, None, "file not found" if not p.exists() else "not a regular file")
    try:
        data = datasets.Dataset.from_parquet(str(p), keep_in_memory=True)
    except Exception as e:  # pyarrow's ArrowInvalid and friends: not a Parquet file, or a damaged one
        raise file_error(path, None, f"not a readable Parquet file ({e})") from None
    _check_columns(path, None, data.column_names, columns)
    for i, rec in enumerate(data, 1):
        yield f"row {i}", rec


def field(path: Any, where: int | str, record: dict, *keys: str, kinds=(str,), required: bool = True) -> Any:
    """The value of the first of ``keys`` that ``record`` holds (its exact spelling first, then any letter
    case), checked to be one of ``kinds``. An absent key, a null (an empty Parquet cell) or a blank string
    is missing: an error naming the keys, or None when not ``required``."""
    lower = {k.lower(): k for k in record if isinstance(k, str)}
    empty = None
    for key in keys:
        name = key if key in record else lower.get(key.lower())
        if name is None:
            continue
        value = record[name]
        if value is None or (isinstance(value, str) and not value.strip()):
            empty = empty or name
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            want = " or ".join(k.__name__ for k in kinds)
            raise file_error(path, where, f"field {name!r} must be {want}, got {value!r}")
        return value
    if required:
        raise file_error(path, where, f"field {empty!r} is empty" if empty
                         else f"missing key {' or '.join(map(repr, keys))}")
    return None


def load_question_answer(path: Any, instruction: str, final_answer, question_keys=("question", "problem")):
    """A file of word problems (gsm8k, math500) -> columns prompt (question + instruction), answer (the
    reference final answer), question and reasoning (the worked solution, "" if the file has none).

    ``final_answer(path, where, record) -> (answer, reasoning)`` reads a task's answer fields."""
    import datasets
    cols: dict[str, list] = {"prompt": [], "answer": [], "question": [], "reasoning": []}
    for where, obj in read_records(path, columns=(question_keys,)):
        question = field(path, where, obj, *question_keys).strip()
        answer, reasoning = final_answer(path, where, obj)
        cols["prompt"].append(f"{question}\n{instruction}")
        cols["answer"].append(answer)
        cols["question"].append(question)
        cols["reasoning"].append(reasoning)
    require_rows(path, cols["prompt"])
    return datasets.Dataset.from_dict(cols)


class NoGeneratorError(ValueError):
    """A task without a procedural generator was asked for generated examples (it needs a data file)."""


def no_generator(name: str, split: str, n: int):
    check_split(split, n)
    raise NoGeneratorError(f"{name} has no procedural generator; give its examples with --data FILE "
                           f"(or --data {name}=FILE among several tasks): JSONL, CSV or Parquet with "
                           "question/answer fields")
