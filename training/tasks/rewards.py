"""Reward kinds for RL: a task's correctness alone, or d1's training reward (correctness plus format terms).

``reward_function(task, kind)`` returns ``f(completion, example) -> float``:

* ``"correctness"``: the task's ``reward`` (1.0 right, 0.0 wrong; countdown gives 0.1 to a well-formed wrong
  expression, as d1's countdown reward does; sudoku the fraction of blank cells right).
* ``"exact"``: 1.0 when the task's ``reward`` is 1.0 (the whole answer right), else 0.0: no partial credit,
  e.g. for a sampler that should not trade a sudoku cell for a pass.
* ``"d1"``: the sum of d1's training reward terms for the task with d1's weights (``diffu-grpo/reward_func.py``
  and ``diffu_grpo_train.py`` of github.com/dllm-reasoning/d1; its config sets no ``reward_weights``, so TRL
  weighs every term 1.0). gsm8k: :func:`xml_count` + :func:`soft_format` + :func:`strict_format` +
  :func:`integer_answer` + :func:`correctness_x2`; math500: :func:`correctness_x2` + :func:`math_answer_format`;
  countdown, cd3 and sudoku: d1 trains them with its correctness reward alone, so the task's ``reward``.

The format terms reproduce d1's values exactly, quirks included (they are documented on each). The
correctness term gives d1's 2.0 for a right answer, judged by the task's reward (the reading of d1's
evaluator): d1's training check is an exact string match of the ``<answer>`` content, which scores
``72.0``, ``$72`` or ``\\boxed{72}`` 0 for a reference ``72``; here they score 2.0.
"""

from __future__ import annotations

import re
from typing import Callable

from . import get_task

RewardFn = Callable[[str, dict], float]
REWARD_KINDS = ("correctness", "exact", "d1")


def _after_last_answer_tag(text: str) -> str:
    """d1's reading of the answer for its format terms: after the last ``<answer>``, before the next
    ``</answer>``, stripped (the whole text when there is no tag)."""
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def xml_count(completion: str, example: dict | None = None) -> float:
    """d1's ``xmlcount_reward_func``: 0.125 for each of ``<reasoning>\\n``, ``\\n</reasoning>\\n``,
    ``\\n<answer>\\n`` and ``\\n</answer>`` found exactly once, less 0.001 per character of trailing text.

    d1's penalties, reproduced: with ``\\n<answer>\\n`` once, 0.001 per character after the last
    ``\\n</answer>\\n`` (the whole text's length when that never occurs, e.g. no newline after ``</answer>``);
    with ``\\n</answer>`` once, 0.001 per character after it beyond the first (a text ending ``</answer>``
    gains 0.001)."""
    text = completion
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>")
_STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$")


def soft_format(completion: str, example: dict | None = None) -> float:
    """d1's ``soft_format_reward_func``: 0.5 when the text starts ``<reasoning>...</reasoning>`` then
    ``<answer>...</answer>``. As in d1, ``.`` does not cross a newline, so both blocks must be one line each."""
    return 0.5 if _SOFT.match(completion) else 0.0


def strict_format(completion: str, example: dict | None = None) -> float:
    """d1's ``strict_format_reward_func``: 0.5 for exactly
    ``<reasoning>\\nR\\n</reasoning>\\n<answer>\\nA\\n</answer>\\n`` with R and A one line each (a second
    newline at the very end is tolerated, as ``$`` allows in d1)."""
    return 0.5 if _STRICT.match(completion) else 0.0


def integer_answer(completion: str, example: dict | None = None) -> float:
    """d1's ``int_reward_func``: 0.5 when the answer (:func:`_after_last_answer_tag`) is all digits."""
    return 0.5 if _after_last_answer_tag(completion).isdigit() else 0.0


def correctness_x2(task_name: str) -> RewardFn:
    """d1's correctness term for gsm8k and math500: 2.0 for a right answer (the task's reward), else 0.0."""
    task = get_task(task_name)

    def correctness(completion: str, example: dict) -> float:
        return 2.0 * task.reward(completion, example)

    correctness.__name__ = f"{task_name}_correctness_x2"
    return correctness


_D1_BOX_TEST = "\x08oxed"  # sic: d1 writes "\boxed" in a plain string literal, a backspace and "oxed"


def math_answer_format(completion: str, example: dict | None = None) -> float:
    """d1's ``boxed_and_answer_tags_format_reward`` (math): half of (1.0 if the text has an ``<answer>`` tag)
    + (1.0 if the answer holds a box, else 0.5). d1's test for the box looks for a backspace followed by
    "oxed" (see ``_D1_BOX_TEST``), which no completion holds, so the term is 0.75 with a tag and 0.25
    without, box or not; reproduced as d1 computes it."""
    parts = completion.split("<answer>")
    tagged = len(parts) > 1
    answer = parts[1].split("</answer>")[0] if tagged else completion
    return 0.5 * ((1.0 if tagged else 0.0) + (1.0 if _D1_BOX_TEST in answer else 0.5))


def d1_terms(task_name: str) -> tuple[tuple[RewardFn, float], ...]:
    """d1's training reward terms for a task with their weights (TRL's default: 1.0 each)."""
    if task_name == "gsm8k":
        return ((xml_count, 1.0), (soft_format, 1.0), (strict_format, 1.0), (integer_answer, 1.0),
                (correctness_x2("gsm8k"), 1.0))
    if task_name == "math500":
        return ((correctness_x2("math500"), 1.0), (math_answer_format, 1.0))
    return ((get_task(task_name).reward, 1.0),)


def reward_function(task_name: str, kind: str = "correctness") -> RewardFn:
    """``f(completion, example) -> float`` for RL on ``task_name``: ``kind`` "correctness" (the task's
    reward), "exact" (1 for a fully right answer, else 0) or "d1" (d1's weighted sum of terms,
    :func:`d1_terms`). The function never raises: a term that fails on some input counts 0.0."""
    task = get_task(task_name)
    if kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; valid kinds: {', '.join(REWARD_KINDS)}")
    if kind == "correctness":
        return task.reward
    if kind == "exact":
        def exact_reward(completion: str, example: dict) -> float:
            return 1.0 if task.reward(completion, example) == 1.0 else 0.0

        exact_reward.__name__ = f"{task_name}_exact_reward"
        return exact_reward
    terms = d1_terms(task_name)

    def d1_reward(completion: str, example: dict) -> float:
        total = 0.0
        for term, weight in terms:
            try:
                total += weight * term(completion, example)
            except Exception:  # a reward must never raise
                pass
        return total

    d1_reward.__name__ = f"{task_name}_d1_reward"
    return d1_reward
