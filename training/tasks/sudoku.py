"""4x4 sudoku task: grid enumeration, train/test split by solution grid,
puzzle generation, CSV loading (Puzzle,Solution) and the blank-cell reward.

Generated puzzles have exactly one solution, as published sudoku sets do: the reward compares the filled
blanks with the one solution, so a puzzle that several grids complete would score a right answer as wrong.
(Blanking 4-12 random cells without that check left 33% of 1,000 test puzzles ambiguous, which capped cell
accuracy near 0.89 whatever the model.)"""

from __future__ import annotations

import csv
import random
from functools import lru_cache

import datasets

from .common import ANSWER_FORMAT, check_split, extract_answer, file_error, make_rng, open_text, require_rows

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


def instruction(example: dict) -> str:
    """The puzzle in words for an instruction-tuned model (training/prompting.py)."""
    return (f"Solve this 4x4 sudoku. The grid is written row by row as 16 digits, 0 for an empty cell: "
            f"{example['puzzle']}. Fill the empty cells so that every row, every column and every 2x2 box "
            f"holds 1, 2, 3 and 4 once each. The answer is the completed grid as 16 digits. {ANSWER_FORMAT}")


def _row(puzzle: str, solution: str) -> dict:
    return {"prompt": f"{NAME} {puzzle}", "answer": solution, "puzzle": puzzle, "solution": solution}


def _to_dataset(rows: list[dict]) -> datasets.Dataset:
    cols = ("prompt", "answer", "puzzle", "solution")
    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in cols})


def make_dataset(split: str, n: int, seed: int = 0) -> datasets.Dataset:
    check_split(split, n)
    grids = split_grids(split)
    rng = make_rng(NAME, split, seed)
    rows = []
    for _ in range(n):
        k = rng.randint(MIN_BLANKS, MAX_BLANKS)  # uniform, as before uniqueness was required
        while True:  # blank sets of k cells whose puzzle has more than one solution are redrawn
            solution = rng.choice(grids)
            blanks = set(rng.sample(range(16), k))
            puzzle = "".join("0" if i in blanks else ch for i, ch in enumerate(solution))
            if solution_count(puzzle) == 1:
                break
        rows.append(_row(puzzle, solution))
    return _to_dataset(rows)


def load_file(path) -> datasets.Dataset:
    """Read a CSV with (at least) columns Puzzle,Solution; '0' marks a blank."""
    rows = []
    with open_text(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise file_error(path, 1, "empty file, expected a header with Puzzle,Solution")
            names = [h.strip().lower() for h in header]
            missing = [c for c in ("Puzzle", "Solution") if c.lower() not in names]
            if missing:
                raise file_error(path, 1, f"header lacks column(s) {','.join(missing)}: {header}")
            ip, isol = names.index("puzzle"), names.index("solution")
            for rec in reader:
                line = reader.line_num
                if not any(x.strip() for x in rec):
                    continue
                if len(rec) <= max(ip, isol):
                    raise file_error(path, line, f"expected {len(header)} columns, got {len(rec)}")
                puzzle, solution = rec[ip].strip(), rec[isol].strip()
                if len(puzzle) != 16 or not set(puzzle) <= set("01234"):
                    raise file_error(path, line, f"Puzzle must be 16 characters of 0-4, got {puzzle!r}")
                if len(solution) != 16 or not set(solution) <= set("1234"):
                    raise file_error(path, line, f"Solution must be 16 characters of 1-4, got {solution!r}")
                if not is_valid_solution(solution):
                    raise file_error(path, line, f"Solution {solution!r} is not a valid 4x4 sudoku")
                bad = [i + 1 for i, (p, s) in enumerate(zip(puzzle, solution)) if p != "0" and p != s]
                if bad:
                    raise file_error(path, line, f"Puzzle disagrees with Solution at cell(s) {bad}")
                rows.append(_row(puzzle, solution))
        except csv.Error as e:
            raise file_error(path, reader.line_num, f"CSV error ({e})") from None
        except UnicodeDecodeError:
            raise file_error(path, reader.line_num + 1, "not valid UTF-8 text") from None
    require_rows(path, rows)
    return _to_dataset(rows)


def reward(completion: str, example: dict) -> float:
    """Fraction of the puzzle's blank cells filled correctly (digits 1-4 read in order)."""
    digits = [c for c in extract_answer(completion) if c in "1234"]
    puzzle, solution = example["puzzle"], example["solution"]
    blanks = [i for i, c in enumerate(puzzle) if c == "0"]
    if not blanks:
        return 1.0 if digits[:16] == list(solution) else 0.0
    right = sum(1 for i in blanks if i < len(digits) and digits[i] == solution[i])
    return right / len(blanks)
