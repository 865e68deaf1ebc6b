"""diffpo's prompts for instruction-tuned models are d1's, word for word.

``tests/fixtures/d1_prompts.json`` holds d1's strings as d1's files spell them (extracted once from commit
837888f: tests/fixtures/README.md). For each task (gsm8k and math500 read from data files, countdown, cd3 and
sudoku generated) and each stage, the user turn diffpo renders must equal the one d1 builds for the same
example (training: ``diffu-grpo/data_utils.py``; evaluation: ``eval/*.py``), and the full prompt through a chat
template must be that template applied to it, plus d1's ``<reasoning>`` prefill in evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffpo_serve.dllm.loading import load_model
from test_server_support import save_chat_model
from training.prompting import prompt_ids, prompt_text
from training.tasks import d1_prompts, get_task

D1 = json.loads((Path(__file__).parent / "fixtures" / "d1_prompts.json").read_text())
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
GSM8K_QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                  "How many clips did Natalia sell altogether in April and May?")
MATH_PROBLEM = ("If $f(x) = \\frac{3x-2}{x-2}$, what is the value of $f(-2) +f(-1)+f(0)$? Express your answer as "
                "{a} fraction.")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return load_model(save_chat_model(tmp_path_factory.mktemp("d1chat") / "tiny-chat", TEMPLATE))


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """One example per task: gsm8k and math500 through their data-file loaders, the others generated."""
    d = tmp_path_factory.mktemp("d1data")
    (d / "gsm8k.jsonl").write_text(json.dumps({"question": GSM8K_QUESTION, "answer": "48/2 = 24\n#### 72"}) + "\n")
    (d / "math.jsonl").write_text(json.dumps({"problem": MATH_PROBLEM, "answer": "\\frac{14}{3}"}) + "\n")
    return {"gsm8k": get_task("gsm8k").load_file(d / "gsm8k.jsonl")[0],
            "math500": get_task("math500").load_file(d / "math.jsonl")[0],
            "countdown": get_task("countdown").make_dataset("test", 1, 0)[0],
            "cd3": get_task("cd3").make_dataset("test", 1, 0)[0],
            "sudoku": get_task("sudoku").make_dataset("test", 1, 0)[0]}


def d1_train_turn(task: str, ex: dict) -> str:
    """The user turn d1's ``diffu-grpo/data_utils.py`` builds for ``ex`` (its templates, from the fixture)."""
    c, turn = D1["train"]["constants"], D1["train"]["user_turn"]
    if task == "gsm8k":
        return turn["gsm8k"].format(SYSTEM_PROMPT=c["SYSTEM_PROMPT"], question=ex["question"])
    if task == "math500":
        return turn["math"].format(SYSTEM_PROMPT=c["SYSTEM_PROMPT"], problem=ex["question"])
    if task in ("countdown", "cd3"):
        return turn["countdown"].format(SYSTEM_PROMPT=c["SYSTEM_PROMPT"], nums=list(ex["numbers"]), target=ex["target"])
    return turn["sudoku"].format(SUDOKU_SYSTEM_PROMPT=c["SUDOKU_SYSTEM_PROMPT"], Puzzle=ex["puzzle"])


def d1_eval_turn(task: str, ex: dict) -> str:
    """The user turn d1's ``eval/*.py`` build (``create_prompt`` on ``__getitem__``'s question, zero-shot)."""
    e = D1["eval"]
    key = {"math500": "math", "cd3": "countdown"}.get(task, task)
    question = (e["question"]["countdown"].format(numbers=list(ex["numbers"]), target=ex["target"])
                if key == "countdown" else e["question"]["sudoku"].format(puzzle=ex["puzzle"]) if key == "sudoku"
                else ex["question"])
    return e["user_turn"].format(system_prompt=e["system_prompt"][key], prompt=question)


D1_TURN = {"train": d1_train_turn, "eval": d1_eval_turn}
TASKS = ["gsm8k", "math500", "countdown", "cd3", "sudoku"]


@pytest.mark.parametrize("stage", ["train", "eval"])
@pytest.mark.parametrize("task", TASKS)
def test_user_turn_is_d1s(examples, task, stage):
    ex = examples[task]
    want = D1_TURN[stage](task, ex)
    assert get_task(task).instruction(ex, stage) == want
    # spot checks that the fixture's templates were filled as d1 fills them
    if task in ("countdown", "cd3"):
        assert str(list(ex["numbers"])) in want and f"{ex['target']}" in want
        assert want.startswith("\nRespond in the following format:" if stage == "train" else "Using only the provided")
    if task == "sudoku":
        assert want.endswith(f"Solve the following Sudoku puzzle: {ex['puzzle']}\n")
    if task == "math500":
        assert want.endswith("\n\n" + MATH_PROBLEM) and "{a}" in want


@pytest.mark.parametrize("stage", ["train", "eval"])
@pytest.mark.parametrize("task", TASKS)
def test_full_prompt_is_the_template_on_d1s_turn_plus_d1s_suffix(chat, examples, task, stage):
    ex = {**examples[task], "task": task}
    suffix = D1["eval"]["after_template"].format(user_input="") if stage == "eval" else ""
    want = "<user>" + D1_TURN[stage](task, ex) + "</user><assistant>" + suffix
    assert prompt_text(chat, task, ex, stage=stage) == want
    assert prompt_ids(chat, task, ex, stage=stage) == chat.encode(want)
    assert prompt_text(chat, task, ex, chat_template=False, stage=stage) == ex["prompt"]  # raw: no d1 prompt


def test_eval_is_the_default_stage_and_the_prefill_is_reasoning(chat, examples):
    ex = examples["sudoku"]
    assert D1["eval"]["after_template"] == "{user_input}<reasoning>"
    assert prompt_text(chat, "sudoku", ex) == prompt_text(chat, "sudoku", ex, stage="eval")
    assert prompt_text(chat, "sudoku", ex).endswith("</user><assistant><reasoning>")
    assert prompt_text(chat, "sudoku", ex, stage="train").endswith("</user><assistant>")


def test_d1s_strings_are_in_one_module_as_d1_spells_them():
    c, e = D1["train"]["constants"], D1["eval"]["system_prompt"]
    assert d1_prompts.SYSTEM_PROMPT == c["SYSTEM_PROMPT"]
    assert d1_prompts.SUDOKU_SYSTEM_PROMPT == c["SUDOKU_SYSTEM_PROMPT"]
    assert d1_prompts.GSM_SYSTEM_PROMPT == e["gsm8k"]
    assert d1_prompts.MATH500_SYSTEM_PROMPT == e["math"]
    assert d1_prompts.CTD_SYSTEM_PROMPT == e["countdown"]
    assert d1_prompts.EVAL_SYSTEM_PROMPT["sudoku"] == e["sudoku"]
    # the two trailing spaces d1's files carry (a whitespace-stripping editor would lose them)
    assert "\\boxed{}. \nRespond" in d1_prompts.GSM_SYSTEM_PROMPT and d1_prompts.MATH500_SYSTEM_PROMPT.endswith('" \n')


def test_missing_fields_and_bad_stages_are_named(chat, examples):
    with pytest.raises(ValueError, match="gsm8k example has no 'question' field"):
        get_task("gsm8k").instruction({"prompt": "2+2?"}, "train")
    with pytest.raises(ValueError, match="countdown example has no 'target' field"):
        get_task("countdown").instruction({"numbers": [1, 2, 3]}, "eval")
    with pytest.raises(ValueError, match="prompt stage must be one of train, eval; got 'test'"):
        prompt_text(chat, "sudoku", examples["sudoku"], stage="test")
