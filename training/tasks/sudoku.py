"""4x4 sudoku task: grid enumeration, train/test split by solution grid,
puzzle generation, CSV loading (Puzzle,Solution), the reward and d1's cell-accuracy metric.

Generated puzzles have exactly one solution (blanking 4-12 random cells without that check left 33% of 1,000
test puzzles ambiguous). Published sets need not: 124 of d1's 500 test puzzles have several. So the reward
scores any grid that solves the puzzle 1.0, and otherwise d1's metric (the blank cells that match the stored
solution, read by position); ``d1_cell_accuracy`` is d1's metric alone, for reports beside the reward."""

from __future__ import annotations

import random
import re
from functools import lru_cache
from types import ModuleType

import datasets

from . import d1_prompts
from .common import (check_split, extract_answer, field, file_error, make_rng, read_records,
                     require_rows)

NAME = "sudoku"
GEN_LENGTH = 16
N_TEST_GRIDS = 58
SPLIT_SEED = 1234  # fixed: the grid split never depends on the `seed` argument
MIN_BLANKS, MAX_BLANKS = 4, 12

_UNITS = (
    [[r * 4 + c for c in range(4)] for r in range(4)]
    + [[r * 4 + c for r in range(4)] for c in range(4)]
    + [[(br + r) * 4 + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
)


def is_valid_solution(grid: str) -> bool:
    """True when grid is 16 chars of 1-4 forming a valid 4x4 sudoku."""
    return (
        len(grid) == 16
        and set(grid) <= set("1234")
        and all(len({grid[i] for i in unit}) == 4 for unit in _UNITS)
    )


@lru_cache(maxsize=None)
def all_grids() -> tuple[str, ...]:
    """All 288 valid 4x4 grids, sorted (backtracking in row-major order)."""
    out: list[str] = []
    cells = [""] * 16

    def fill(i: int) -> None:
        if i == 16:
            out.append("".join(cells))
            return
        for d in "1234":
            if all(cells[j] != d for unit in _UNITS if i in unit for j in unit if j < i):
                cells[i] = d
                fill(i + 1)
        cells[i] = ""

    fill(0)
    return tuple(sorted(out))


@lru_cache(maxsize=None)
def _digit_sets() -> list[list[int]]:
    """For each cell and digit 1-4, the set of grids (a bit per grid of :func:`all_grids`) holding that digit there."""
    sets = [[0] * 5 for _ in range(16)]
    for k, grid in enumerate(all_grids()):
        for i, ch in enumerate(grid):
            sets[i][int(ch)] |= 1 << k
    return sets


def solution_count(puzzle: str) -> int:
    """How many valid grids complete ``puzzle`` (16 chars, '0' for a blank): those that agree with every given."""
    sets = _digit_sets()
    consistent = (1 << len(all_grids())) - 1
    for i, ch in enumerate(puzzle):
        if ch != "0":
            consistent &= sets[i][int(ch)]
    return bin(consistent).count("1")


@lru_cache(maxsize=None)
def split_grids(split: str) -> tuple[str, ...]:
    """The solution grids reserved for `split` (disjoint; 230 train / 58 test)."""
    check_split(split, 0)
    grids = all_grids()
    order = list(range(len(grids)))
    random.Random(SPLIT_SEED).shuffle(order)
    chosen = order[:N_TEST_GRIDS] if split == "test" else order[N_TEST_GRIDS:]
    return tuple(sorted(grids[i] for i in chosen))


def instruction(example: dict, stage: str) -> str:
    """d1's sudoku user turn for the example's ``puzzle``, for RL rollouts (``train``) or evaluation (``eval``):
    training/tasks/d1_prompts.py."""
    return d1_prompts.sudoku(d1_prompts.field(example, "puzzle", NAME), stage)


def _row(puzzle: str, solution: str) -> dict:
    return {"prompt": f"{NAME} {puzzle}", "answer": solution, "puzzle": puzzle, "solution": solution}


def _to_dataset(rows: list[dict]) -> datasets.Dataset:
    cols = ("prompt", "answer", "puzzle", "solution")
    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in cols})


def make_dataset(split: str, n: int, seed: int = 0, blanks: tuple[int, int] = (MIN_BLANKS, MAX_BLANKS),
                 name: str = NAME) -> datasets.Dataset:
    """``n`` puzzles from ``split``'s solution grids, each with a number of blank cells drawn uniformly from
    ``blanks`` (inclusive) and exactly one solution; ``name`` keys the random stream (a variant's draws are its
    own, the prompt format is the same)."""
    check_split(split, n)
    lo, hi = blanks
    if not MIN_BLANKS <= lo <= hi <= MAX_BLANKS:
        raise ValueError(f"sudoku blanks {lo}-{hi}: expected a range inside {MIN_BLANKS}-{MAX_BLANKS}")
    grids = split_grids(split)
    rng = make_rng(name, split, seed)
    rows = []
    for _ in range(n):
        k = rng.randint(lo, hi)  # uniform, as before uniqueness was required
        while True:  # blank sets of k cells whose puzzle has more than one solution are redrawn
            solution = rng.choice(grids)
            cells = set(rng.sample(range(16), k))
            puzzle = "".join("0" if i in cells else ch for i, ch in enumerate(solution))
            if solution_count(puzzle) == 1:
                break
        rows.append(_row(puzzle, solution))
    return _to_dataset(rows)


def load_file(path) -> datasets.Dataset:
    """CSV (d1's ``Puzzle,Solution``, any letter case, other columns ignored), JSONL or Parquet rows with
    puzzle and solution: 16 characters each, '0' marks a blank."""
    rows = []
    for where, rec in read_records(path, columns=(("Puzzle",), ("Solution",))):
        puzzle = field(path, where, rec, "Puzzle").strip()
        solution = field(path, where, rec, "Solution").strip()
        if len(puzzle) != 16 or not set(puzzle) <= set("01234"):
            raise file_error(path, where, f"Puzzle must be 16 characters of 0-4, got {puzzle!r}")
        if len(solution) != 16 or not set(solution) <= set("1234"):
            raise file_error(path, where, f"Solution must be 16 characters of 1-4, got {solution!r}")
        if not is_valid_solution(solution):
            raise file_error(path, where, f"Solution {solution!r} is not a valid 4x4 sudoku")
        bad = [i + 1 for i, (p, s) in enumerate(zip(puzzle, solution)) if p != "0" and p != s]
        if bad:
            raise file_error(path, where, f"Puzzle disagrees with Solution at cell(s) {bad}")
        rows.append(_row(puzzle, solution))
    require_rows(path, rows)
    return _to_dataset(rows)


# Where d1's evaluator looks for the grid, in order (the first non-empty match wins): a ``` block inside
# <answer>, the <answer> content up to </answer> or an end-of-text marker, the text after </answer>, 16
# digits just before </answer>, 16 digits standing alone.
_END = r"(?:<\|eot_id\|>|<\|endoftext\|>|</answer>)"
_D1_GRID_PLACES = (
    re.compile(r"<answer>.*?```\s*([\d\s]+)```", re.S),
    re.compile(r"<answer>(.*?)" + _END, re.S),
    re.compile(r"</answer>\s*(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|$)", re.S),
    re.compile(r"(\d{16})\s*</answer>"),  # d1 writes ".*?(\d{16})..."; the same first match, in linear time
    re.compile(r"\b(\d{16})\b"),
)


def read_grid(completion: str) -> str | None:
    """The 16 cells a completion answers, read as d1's evaluator reads them: the text at the first place of
    ``_D1_GRID_PLACES`` that holds some, whitespace removed, cut or padded with '0' to 16 characters (any
    character is a cell, so a wrong digit is one wrong cell). When d1 finds nothing and the answer
    (:func:`extract_answer`) is digits and separators only (``1 2 3 4 | 3 4 1 2 ...``, ``12``), its digits
    in order; None when there is no grid."""
    text = completion if isinstance(completion, str) else str(completion)
    for place in _D1_GRID_PLACES:
        m = place.search(text)
        if m and m.group(1).strip():
            cells = re.sub(r"\s", "", m.group(1))
            return cells[:16].ljust(16, "0")
    answer = extract_answer(text)
    if re.search(r"\d", answer) and not re.search(r"[^\d\s|,;.:/\\\-+_()\[\]]", answer):
        return "".join(re.findall(r"\d", answer))[:16].ljust(16, "0")
    return None


def d1_cell_accuracy(completion: str, example: dict) -> float:
    """d1's sudoku metric for one completion: the fraction of the puzzle's blank cells whose digit in the grid
    read (:func:`read_grid`) is the stored solution's (0.0 for a puzzle with no blanks, as in d1). d1's
    table sums right cells and blank cells over the test set before dividing."""
    try:
        grid, puzzle, solution = read_grid(completion), example["puzzle"], example["solution"]
        blanks = [i for i, c in enumerate(puzzle) if c == "0"]
        if grid is None or not blanks:
            return 0.0
        return sum(grid[i] == solution[i] for i in blanks) / len(blanks)
    except Exception:  # defensive: a metric must never raise
        return 0.0


def d1_accuracy(pairs) -> float:
    """d1's published sudoku number for a set of ``(completion, example)`` pairs: right blank cells summed over
    the set divided by blank cells summed over the set (d1's table divides the totals, not the mean of rows),
    each completion read as :func:`d1_cell_accuracy` reads it; 0.0 for a set with no blanks."""
    right = blanks = 0
    for completion, example in pairs:
        n = example["puzzle"].count("0")
        right += round(d1_cell_accuracy(completion, example) * n)
        blanks += n
    return right / blanks if blanks else 0.0


def solves(grid: str | None, puzzle: str) -> bool:
    """True when ``grid`` is a valid 4x4 sudoku that keeps every given of ``puzzle``."""
    return grid is not None and is_valid_solution(grid) and all(p in ("0", g) for p, g in zip(puzzle, grid))


def reward(completion: str, example: dict) -> float:
    """1.0 for a grid that solves the puzzle (any of its solutions: 124 of d1's 500 test puzzles have more
    than one); otherwise d1's metric (:func:`d1_cell_accuracy`): the fraction of blank cells that hold the
    stored solution's digit, cells read by position as d1 reads them."""
    try:
        if solves(read_grid(completion), example["puzzle"]):
            return 1.0
    except Exception:  # defensive: reward must never raise
        return 0.0
    return d1_cell_accuracy(completion, example)


def variant(name: str, blanks: tuple[int, int], doc: str) -> ModuleType:
    """A task that is sudoku with ``blanks`` (inclusive) blank cells per generated puzzle: the same prompts,
    files, reward and metric, its own test and train draws (the same split of solution grids). For measuring a
    learned sampler away from its training distribution (trained on few blanks, tested on many)."""
    mod = ModuleType(f"{__name__}.{name}", doc)
    for attr in ("GEN_LENGTH", "instruction", "load_file", "reward", "d1_accuracy", "d1_cell_accuracy"):
        setattr(mod, attr, globals()[attr])
    mod.NAME, mod.BLANKS = name, blanks
    mod.make_dataset = lambda split, n, seed=0: make_dataset(split, n, seed, blanks=blanks, name=name)
    return mod


EASY = variant("sudoku_easy", (4, 8), "4x4 sudoku with 4-8 blank cells (sudoku's lower range).")
HARD = variant("sudoku_hard", (9, 12), "4x4 sudoku with 9-12 blank cells (sudoku's upper range).")
