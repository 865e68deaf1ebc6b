"""Prompt generators of the load test (imported by locustfile.py and by benchmarks/server_load.py,
whose offline decoder must decode prompts from the same distribution). Standard library only."""

from __future__ import annotations

import random

# valid 4x4 sudoku solutions; puzzles blank a few cells with "0", as the model was trained on
SUDOKU_SOLUTIONS = ["1234341221434321", "2143341212344321", "3412214343211234", "4321123421433412",
                    "1243342121344312", "2314142332414132"]


def sudoku_prompt(rng: random.Random) -> str:
    solution = rng.choice(SUDOKU_SOLUTIONS)
    blanks = set(rng.sample(range(16), rng.randint(4, 10)))
    return "sudoku " + "".join("0" if i in blanks else c for i, c in enumerate(solution))


def countdown_prompt(rng: random.Random) -> str:
    """Three numbers and a reachable target, e.g. ``countdown 32,62,20=114``."""
    while True:
        a, b, c = rng.sample(range(1, 100), 3)
        op1, op2 = rng.choice("+-*"), rng.choice("+-")
        target = eval(f"{a}{op1}{b}{op2}{c}")  # noqa: S307 - our own digits and operators
        if 1 <= target <= 999:
            return f"countdown {','.join(map(str, rng.sample([a, b, c], 3)))}={target}"
