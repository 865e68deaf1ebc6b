"""diffpo's task rewards against d1's published evaluator, on LLaDA-8B-Instruct's real generations.

d1 (github.com/dllm-reasoning/d1, commit 837888f) ships LLaDA-8B-Instruct's generations for gsm8k, math500,
countdown and sudoku at generation lengths 128, 256 and 512 (``eval/eval_baselines/*_generations.json``) and
the evaluator behind its published table (``eval/parse_and_get_acc.py``). This script scores every item with
diffpo's reward (``get_task(task).reward``; sudoku also with ``sudoku.d1_cell_accuracy``) and with d1's
verdict, and writes per task and length: how many items agree, how many diffpo scores above or below d1,
and both accuracies (sudoku: cells right over blank cells, summed over the set, as d1's table).

d1's verdicts: length 256 is committed (``tests/fixtures/d1/``, what tests/test_rewards_d1.py checks);
128 and 512 are computed here by running d1's own evaluator from ``--d1-dir`` (d1's repository, unpacked).
Its ``parse_*_answers`` functions are imported and run unchanged on each shard; only ``tiktoken`` is
replaced by a stub, since d1 uses it for a token count that no verdict depends on and its encoding file
is a download. With ``--d1-dir`` the 256 verdicts are recomputed too and must equal the committed ones.
``--write-fixtures`` (re)writes ``tests/fixtures/d1/`` from ``--d1-dir``.
Writes docs/results/real_models/d1_rewards.{md,json}.

    python -m benchmarks.d1_rewards [--d1-dir /path/to/d1] [--write-fixtures]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib
import json
import re
import subprocess
import sys
import time
import types
from pathlib import Path

from benchmarks.common import machine, markdown_table, save
from training.tasks import get_task, grading, math500, sudoku

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "d1"
TASKS = ("gsm8k", "math500", "countdown", "sudoku")
LENGTHS = {128: "128_64", 256: "256_128", 512: "512_256"}  # gen length -> d1's file tag (length_blocklength)
FIXTURE_LENGTH = 256

# d1 reads GSM8K's reference answer with a pattern that has no minus sign, so these two negative answers
# become null there and no completion can match them. Their true values, from GSM8K's test set
# (openai/grade-school-math, "#### -10" and "#### -3"), keyed by a phrase of the question:
GSM8K_NEGATIVE_GOLDS = {"highest temperature ever recorded in Southlandia": "-10",
                        "dropped 8 degrees Celsius overnight": "-3"}


def _stub_tiktoken() -> None:
    """A stand-in for ``tiktoken`` (d1 counts tokens with it; no verdict depends on the count)."""
    stub = types.ModuleType("tiktoken")

    class _Encoding:
        def encode(self, text):
            return text.split()

    stub.get_encoding = lambda name: _Encoding()
    sys.modules["tiktoken"] = stub


def d1_evaluator(d1_dir: Path):
    """d1's ``eval/parse_and_get_acc.py``, imported from ``d1_dir`` as it is."""
    eval_dir = Path(d1_dir) / "eval"
    if not (eval_dir / "parse_and_get_acc.py").is_file():
        raise SystemExit(f"--d1-dir {d1_dir}: no eval/parse_and_get_acc.py there (d1's repository root?)")
    _stub_tiktoken()
    sys.path.insert(0, str(eval_dir))
    try:
        return importlib.import_module("parse_and_get_acc")
    finally:
        sys.path.remove(str(eval_dir))


def shard_files(d1_dir: Path, task: str, length: int) -> list[Path]:
    """d1's generation shards of one task and length, in shard-number order (item indices follow it)."""
    folder = Path(d1_dir) / "eval" / "eval_baselines"
    files = list(folder.glob(f"{task}_instruct_{LENGTHS[length]}_*_generations.json"))
    if not files:
        raise SystemExit(f"no {task} generations of length {length} under {folder}")
    return sorted(files, key=lambda f: int(re.search(r"_(\d+)_generations\.json$", f.name)[1]))


def example_for(task: str, question: str, ground_truth) -> dict:
    """The task example diffpo's reward reads, built from one of d1's items."""
    if task == "gsm8k":
        if ground_truth is None:  # a negative answer d1 could not read
            golds = [v for k, v in GSM8K_NEGATIVE_GOLDS.items() if k in question]
            if len(golds) != 1:
                raise SystemExit("gsm8k item with a null reference answer not in GSM8K_NEGATIVE_GOLDS: "
                                 f"{question[:80]!r}")
            return {"answer": golds[0]}
        value = float(ground_truth)
        return {"answer": str(int(value)) if value.is_integer() else str(value)}
    if task == "math500":
        return {"answer": str(ground_truth)}
    if task == "countdown":
        numbers, target = ground_truth
        return {"numbers": list(numbers), "target": int(target)}
    if task == "sudoku":
        m = re.search(r"Sudoku puzzle: ([0-9]{16})", question)
        if m is None:
            raise SystemExit(f"sudoku item without a 16-digit puzzle in its question: {question[:80]!r}")
        return {"puzzle": m[1], "solution": str(ground_truth)}
    raise ValueError(f"unknown task {task!r}")


def d1_rows(evaluator, d1_dir: Path, task: str, length: int) -> list[dict]:
    """Every item of one task and length with d1's verdict, from running d1's evaluator on each shard.

    A row: index (over the shards in order), shard, position (in its shard), completion, ground_truth (d1's
    reading of the reference), example (diffpo's), d1 (verdict: 1/0, sudoku the cell fraction) and, for
    sudoku, d1_cells ([right, blank])."""
    parse = {"gsm8k": evaluator.parse_gsm_answers, "math500": evaluator.parse_math_answers,
             "countdown": evaluator.parse_countdown_answers, "sudoku": evaluator.parse_sudoku_answers}[task]
    rows = []
    for path in shard_files(d1_dir, task, length):
        items = json.loads(path.read_text())["generations"]
        verdicts = parse(json_path=str(path))[2]  # (right, processed or blank cells, per-item verdicts, tokens)
        if len(verdicts) != len(items):
            raise SystemExit(f"{path}: d1's evaluator returned {len(verdicts)} verdicts for {len(items)} items")
        for k, (item, v) in enumerate(zip(items, verdicts)):
            row = {"index": len(rows), "shard": path.name, "position": k, "completion": item["generations"],
                   "ground_truth": item["ground_truth"],
                   "example": example_for(task, item["question"], item["ground_truth"])}
            if task == "sudoku":
                row["d1_cells"] = [v["correct_cells"], v["empty_cells"]]
                row["d1"] = v["correct_cells"] / v["empty_cells"] if v["empty_cells"] else 0.0
            else:
                row["d1"] = 1.0 if v["is_correct"] else 0.0
            rows.append(row)
    return rows


def fixture_path(task: str) -> Path:
    return FIXTURES / f"{task}_{FIXTURE_LENGTH}.jsonl.gz"


def write_fixture(task: str, rows: list[dict]) -> Path:
    path = fixture_path(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same rows give the same bytes
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return path


def read_fixture(task: str) -> list[dict]:
    """The committed rows of one task at length 256 (see :func:`d1_rows`)."""
    with gzip.open(fixture_path(task), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def diffpo_score(task: str, row: dict) -> float:
    """diffpo's reward for a row, on d1's scale: countdown's 0.1 for a wrong expression counts as wrong."""
    r = get_task(task).reward(row["completion"], row["example"])
    return (1.0 if r == 1.0 else 0.0) if task == "countdown" else r


def summarise(task: str, length: int, rows: list[dict]) -> dict:
    """Agreement and accuracies of one task and length (accuracy in %, sudoku's summed over cells)."""
    ours = [diffpo_score(task, r) for r in rows]
    d1 = [r["d1"] for r in rows]
    n = len(rows)
    agree = sum(abs(a - b) < 1e-9 for a, b in zip(ours, d1))
    out = {"task": task, "gen length": length, "items": n, "agree": agree, "agree %": 100 * agree / n,
           "diffpo > d1": sum(a > b + 1e-9 for a, b in zip(ours, d1)),
           "diffpo < d1": sum(a < b - 1e-9 for a, b in zip(ours, d1))}
    if task == "sudoku":
        blanks = [r["d1_cells"][1] for r in rows]
        metric = [sudoku.d1_cell_accuracy(r["completion"], r["example"]) for r in rows]
        out["d1 metric agree"] = sum(abs(m - b) < 1e-12 for m, b in zip(metric, d1))
        out["diffpo accuracy"] = 100 * sum(o * e for o, e in zip(ours, blanks)) / sum(blanks)
        out["d1 accuracy"] = 100 * sum(r["d1_cells"][0] for r in rows) / sum(blanks)
    else:
        out["diffpo accuracy"] = 100 * sum(ours) / n
        out["d1 accuracy"] = 100 * sum(d1) / n
    return out


def _by_string(pred: str | None, gold: str) -> bool:
    """math500's comparison without math-verify: normalised strings or one number each."""
    if grading.is_placeholder(pred):
        return False
    a, b = grading.normalize_math(pred), grading.normalize_math(gold)
    x, y = grading.number_value(pred), grading.number_value(gold)
    return bool(a) and a == b or (x is not None and x == y)


def _by_math_verify(pred: str | None, gold: str) -> bool:
    """math500's comparison by math-verify alone."""
    return not grading.is_placeholder(pred) and grading.verify_equal(pred.strip(), gold.strip())


MATH_COMPARISONS = {"normalised string": _by_string, "math-verify": _by_math_verify,
                    "both (the reward)": grading.math_equal}


def compare_math(length: int, rows: list[dict]) -> list[dict]:
    """math500's answer comparison three ways against d1's verdicts: agreement, and items above or below d1."""
    out = []
    for name, equal in MATH_COMPARISONS.items():
        t = time.time()
        ours = [1.0 if equal(math500.final_answer(r["completion"]), r["example"]["answer"]) else 0.0 for r in rows]
        d1 = [r["d1"] for r in rows]
        out.append({"comparison": name, "gen length": length, "agree": sum(a == b for a, b in zip(ours, d1)),
                    "diffpo > d1": sum(a > b for a, b in zip(ours, d1)),
                    "diffpo < d1": sum(a < b for a, b in zip(ours, d1)), "seconds": round(time.time() - t, 2)})
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d1-dir", type=Path, default=None,
                    help="d1's repository (unpacked): score lengths 128 and 512 too, running d1's evaluator")
    ap.add_argument("--write-fixtures", action="store_true",
                    help="(re)write tests/fixtures/d1/ from --d1-dir's length-256 generations")
    ap.add_argument("--name", default="real_models/d1_rewards", help="results file name under docs/results/")
    args = ap.parse_args(argv)
    if args.write_fixtures and args.d1_dir is None:
        raise SystemExit("--write-fixtures needs --d1-dir")
    evaluator = d1_evaluator(args.d1_dir) if args.d1_dir else None
    results, math_rows, t0 = [], [], time.time()
    for task in TASKS:
        for length in LENGTHS:
            if evaluator is None and length != FIXTURE_LENGTH:
                continue
            if evaluator is not None:
                rows = d1_rows(evaluator, args.d1_dir, task, length)
                if length == FIXTURE_LENGTH:
                    if args.write_fixtures:
                        print("wrote", write_fixture(task, rows))
                    elif fixture_path(task).exists() and \
                            [r["d1"] for r in read_fixture(task)] != [r["d1"] for r in rows]:
                        raise SystemExit(f"d1's verdicts for {task} differ from the committed fixture")
            else:
                rows = read_fixture(task)
            t = time.time()
            row = summarise(task, length, rows)
            row["seconds"] = round(time.time() - t, 2)
            print(json.dumps(row))
            results.append(row)
            if task == "math500":
                math_rows += compare_math(length, rows)
    columns = ["task", "gen length", "items", "agree", "agree %", "diffpo > d1", "diffpo < d1",
               "diffpo accuracy", "d1 accuracy", "seconds"]
    meta = {"commit": _git_commit(), "date": datetime.date.today().isoformat(), "machine": machine(),
            "command": "python -m benchmarks.d1_rewards " + " ".join(argv if argv is not None else sys.argv[1:]),
            "d1": "github.com/dllm-reasoning/d1 at 837888f, eval/eval_baselines (LLaDA-8B-Instruct)",
            "seconds": round(time.time() - t0, 1)}
    text = "\n".join([
        "# diffpo's rewards against d1's evaluator (LLaDA-8B-Instruct's generations)", "",
        f"`{meta['command']}` at commit {meta['commit']}, {meta['date']}; {meta['machine']}.", "",
        "Each item of d1's published generations (" + meta["d1"] + ") scored by diffpo's task reward and by "
        "d1's own evaluator (eval/parse_and_get_acc.py, run unchanged). agree: items with the same score "
        "(sudoku: the same fraction of blank cells); diffpo > d1 / diffpo < d1: items scored higher / lower. "
        "Accuracies in %; sudoku's are cells right over blank cells, summed over the set as d1's table does. "
        "Every departure at length 256 is an item d1 scores wrongly, listed with its reason in "
        "tests/test_rewards_d1.py; 128 and 512 were not tuned on.", "",
        markdown_table(results, columns), "",
        "## math500: how answers are compared", "",
        "The same final answers (math500.final_answer) compared with the reference by normalised string only "
        "(grading.normalize_math, or one number each), by math-verify only, and by both (the reward: equal "
        "if either says so). diffpo > d1 counts answers a comparison finds equal that d1 does not (at length "
        "256 each is listed in tests/test_rewards_d1.py with its reason); diffpo < d1, answers d1 finds equal "
        "and it does not.", "",
        markdown_table(math_rows, ["comparison", "gen length", "agree", "diffpo > d1", "diffpo < d1", "seconds"]),
        ""])
    print(text)
    save(args.name, text, {"meta": meta, "rows": results, "math500_comparisons": math_rows})


if __name__ == "__main__":
    main()
