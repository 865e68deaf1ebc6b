"""Countdown as d1 evaluates it ("cd3"): three numbers in 1-100, a target in 1-100.

d1 (arXiv 2504.12216) tests countdown on three numbers from 1 to 100 and targets from 1 to 100,
each solvable with + - * /. This task draws that distribution with countdown's generator (one drawn
expression per problem is the reference answer) and shares everything else with it: the prompt
format (``countdown a,b,c=target``, so one model serves both), the hash-based train/test split
(a (numbers, target) pair is in the same split in both tasks), file loading and the reward.
``countdown`` keeps the wider range (targets up to 999) as a harder task.
"""

from __future__ import annotations

import datasets

from . import countdown as _countdown

NAME = "cd3"
GEN_LENGTH = _countdown.GEN_LENGTH
MAX_NUMBER, MAX_TARGET = 100, 100

instruction = _countdown.instruction
load_file = _countdown.load_file
reward = _countdown.reward


def make_dataset(split: str, n: int, seed: int = 0) -> datasets.Dataset:
    return _countdown.generate(split, n, seed, NAME, MAX_NUMBER, MAX_TARGET)
