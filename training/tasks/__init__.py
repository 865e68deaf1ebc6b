"""Task registry: each task module (sudoku, countdown, cd3, gsm8k, math500; sudoku_easy and sudoku_hard are
sudoku with 4-8 and 9-12 blanks) exposes
NAME, GEN_LENGTH, make_dataset, load_file, reward and uses common.extract_answer.
``reward_function(task, kind)`` (rewards.py) gives RL its reward: the task's correctness, or d1's terms."""

from types import ModuleType

from . import cd3, countdown, gsm8k, math500, sudoku
from .common import DataFileError, extract_answer

TASKS: dict[str, ModuleType] = {m.NAME: m for m in (sudoku, countdown, cd3, gsm8k, math500, sudoku.EASY, sudoku.HARD)}

__all__ = ["TASKS", "get_task", "DataFileError", "extract_answer", "reward_function", "REWARD_KINDS"]


def get_task(name: str) -> ModuleType:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


from .rewards import REWARD_KINDS, reward_function  # noqa: E402  (rewards.py uses get_task)
