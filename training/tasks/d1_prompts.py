"""d1's prompts for instruction-tuned models, word for word, for RL rollouts and for evaluation.

The prompt strings in this module are d1's: Zhao et al. 2025, "d1: Scaling Reasoning in Diffusion Large Language
Models via Reinforcement Learning" (arXiv 2504.12216), https://github.com/dllm-reasoning/d1 at commit 837888f,
licensed under the Apache License 2.0; taken from ``diffu-grpo/data_utils.py`` (training) and
``eval/gsm8k.py``, ``eval/math500.py``, ``eval/countdown.py``, ``eval/sudoku.py`` (evaluation). They are
written here line by line with explicit newlines, so that no editor can strip the trailing spaces two of
them carry; ``tests/test_d1_prompts.py`` checks every one against d1's files (``tests/fixtures/``).

d1 prompts its RL training and its evaluation differently, and so does diffpo (``stage``):

``train`` (RL rollouts), as ``diffu-grpo/data_utils.py`` builds its one user turn per example:
    gsm8k      SYSTEM_PROMPT + "\\n\\n" + question
    math500    SYSTEM_PROMPT, "\\n\\nYou are a math expert. ... \\\\boxed{}. \\n\\n", the problem
    countdown  SYSTEM_PROMPT, "\\nUsing only the numbers [a, b, c], create ... </answer>" (numbers and target in it)
    sudoku     SUDOKU_SYSTEM_PROMPT + "\\n\\nSolve the following Sudoku puzzle: " + puzzle + "\\n"
and TRL renders it with the chat template, the assistant's turn opened, nothing after it.

``eval`` (``diffpo-train eval``, RL's ``--eval-every``), as ``eval/*.py`` build it: the task's own system prompt
(:data:`EVAL_SYSTEM_PROMPT`), "\\n\\n", the question (gsm8k and math500: the question itself; countdown:
"Numbers: [a, b, c]\\nTarget: t"; sudoku: "Solve the following Sudoku puzzle: <puzzle>\\n") as one user turn,
rendered by the chat template with the assistant's turn opened, then :data:`EVAL_PREFILL` ("<reasoning>")
after it: d1's eval prefills it for every model (``add_reasoning=True``), and d1's published accuracies were
measured with these prompts (zero-shot).

The eval prompts of gsm8k and countdown ask for the answer as ``\\boxed{...}`` inside ``<answer>``; the
training prompts ask for the bare answer there (math500's both for ``\\boxed{}``).
"""

from __future__ import annotations

STAGES = ("train", "eval")

# ----------------------------------------------------------------------------- diffu-grpo/data_utils.py

SYSTEM_PROMPT = "\n".join([
    "",
    "Respond in the following format:",
    "<reasoning>",
    "...",
    "</reasoning>",
    "<answer>",
    "...",
    "</answer>",
    "",
])

SUDOKU_SYSTEM_PROMPT = "\n".join([
    "",
    "Please solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading "
    "left-to-right, top-to-bottom, where '0' represents empty cells.",
    "",
    "Rules:",
    "- Fill empty cells with digits 1-4",
    "- Each row must contain digits 1-4 exactly once",
    "- Each column must contain digits 1-4 exactly once",
    "- Each 2x2 box must contain digits 1-4 exactly once",
    "",
    "Important: Your solution must be a COMPLETE 16-character string with only the digits 1-4, representing "
    "your final solved grid.",
    "",
    "Respond in this exact format:",
    "<reasoning>",
    "Your step-by-step solving process",
    "</reasoning>",
    "<answer>",
    "[16-character solution string with no spaces or separators]",
    "</answer>",
    "",
])

MATH_TRAIN_INSTRUCTION = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
                          "Wrap the final answer in a \\boxed{}. ")

COUNTDOWN_TRAIN_INSTRUCTION = (
    "Using only the numbers {numbers}, create an arithmetic expression that evaluates to exactly {target}. "
    "You must use all numbers from the list, and each number must be used exactly once. You may use the "
    "operations +, -, *, and / as needed. After reasoning, provide only your final expression inside "
    "<answer></answer> tags without including an equals sign or the target number. For example, if the numbers "
    "are [2, 3, 4] and the target is 5, a valid answer is: <answer>\n2*4-3\n</answer>")

# ----------------------------------------------------------------------------- eval/{gsm8k,math500,countdown,sudoku}.py

_EVAL_FORMAT = "\n".join([
    "Respond in the following format:",
    "<reasoning>",
    "Your reasoning here",
    "</reasoning>",
    "<answer>",
    "\\boxed{...}",
    "</answer>",
])

GSM_SYSTEM_PROMPT = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
                     "Wrap the final answer in a \\boxed{}. \n" + _EVAL_FORMAT)

MATH500_SYSTEM_PROMPT = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
                         "Wrap the final answer in a \\boxed{}.\n" + _EVAL_FORMAT + '" \n')  # d1's stray quote

CTD_SYSTEM_PROMPT = (
    "Using only the provided numbers, create an arithmetic expression that evaluates to exactly the provided "
    "target number. You may use the operations +, -, *, and / as needed, but each number must be used exactly "
    "once. Think step-by-step. After reasoning, provide only your final expression inside \\boxed{} tags "
    "without including an equals sign or the target number. For example: \\boxed{a + b * c}" + _EVAL_FORMAT)

EVAL_SYSTEM_PROMPT = {"gsm8k": GSM_SYSTEM_PROMPT, "math500": MATH500_SYSTEM_PROMPT, "countdown": CTD_SYSTEM_PROMPT,
                      "sudoku": SUDOKU_SYSTEM_PROMPT}  # eval/sudoku.py's is data_utils.py's, character for character

EVAL_PREFILL = "<reasoning>"  # what d1's eval appends after the chat template (create_prompt, add_reasoning)


# ----------------------------------------------------------------------------- building a prompt

def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"prompt stage must be one of {', '.join(STAGES)}; got {stage!r}")


def field(example: dict, key: str, task: str):
    """``example[key]``, or a ValueError naming the task and the field d1's prompt is built from."""
    try:
        return example[key]
    except KeyError:
        raise ValueError(f"{task} example has no {key!r} field, which d1's prompt is built from "
                         f"(its fields: {', '.join(map(str, example)) or 'none'})") from None


def _eval_turn(task: str, question: str) -> str:
    return EVAL_SYSTEM_PROMPT[task] + "\n\n" + question


def gsm8k(question: str, stage: str) -> str:
    """d1's gsm8k user turn for ``question``."""
    check_stage(stage)
    return SYSTEM_PROMPT + "\n\n" + question if stage == "train" else _eval_turn("gsm8k", question)


def math500(problem: str, stage: str) -> str:
    """d1's MATH user turn for ``problem``."""
    check_stage(stage)
    if stage == "train":
        return SYSTEM_PROMPT + "\n\n" + MATH_TRAIN_INSTRUCTION + "\n\n" + problem
    return _eval_turn("math500", problem)


def countdown(numbers, target, stage: str) -> str:
    """d1's countdown user turn; ``numbers`` are written as a Python list of ints ("[44, 19, 35]"), as d1
    formats them."""
    check_stage(stage)
    numbers, target = [int(n) for n in numbers], int(target)
    if stage == "train":
        return SYSTEM_PROMPT + "\n" + COUNTDOWN_TRAIN_INSTRUCTION.format(numbers=numbers, target=target)
    return _eval_turn("countdown", f"Numbers: {numbers}\nTarget: {target}")


def sudoku(puzzle: str, stage: str) -> str:
    """d1's sudoku user turn for a 16-character ``puzzle`` (0 for a blank): the same in both stages."""
    check_stage(stage)
    return (SUDOKU_SYSTEM_PROMPT if stage == "train" else EVAL_SYSTEM_PROMPT["sudoku"]) + "\n\n" + \
        f"Solve the following Sudoku puzzle: {puzzle}\n"


def after_template(stage: str) -> str:
    """What follows the rendered chat template: d1's eval prefill, nothing in training."""
    check_stage(stage)
    return EVAL_PREFILL if stage == "eval" else ""
