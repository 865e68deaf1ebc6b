"""Prompts for instruction-tuned models: the task's instruction in the model's chat template.

A model without a chat template (the project's own) reads the raw task prompt; one with a template
reads the task's instruction (d1's reasoning/answer format) rendered by that template, in
``diffpo-train eval`` and in RL rollouts, unless ``--no-chat-template``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffpo_serve.dllm.loading import load_model
from test_server_support import save_tiny_model
from training.cli import main as cli_main
from training.prompting import prompt_text
from training.rollout import rollout
from diffpo_serve.dllm.sampler import SamplingParams
from training.tasks import get_task

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("chat") / "tiny-chat")
    cfg_file = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_file.write_text(json.dumps(cfg))
    return path


def test_instructions_state_the_problem_and_d1s_answer_format():
    cd = get_task("countdown").make_dataset("test", 1, 0)[0]
    text = get_task("countdown").instruction(cd)
    assert ", ".join(map(str, cd["numbers"])) in text and str(cd["target"]) in text
    sd = get_task("sudoku").make_dataset("test", 1, 0)[0]
    text_s = get_task("sudoku").instruction(sd)
    assert sd["puzzle"] in text_s
    for t in (text, text_s):
        assert "<reasoning></reasoning>" in t and "<answer></answer>" in t


def test_chat_model_reads_the_instruction_in_its_template(chat_model_dir, model_path):
    chat = load_model(chat_model_dir)
    ex = get_task("countdown").make_dataset("test", 1, 0)[0]
    want = "[user]" + get_task("countdown").instruction(ex) + "[assistant]"
    assert prompt_text(chat, "countdown", ex) == want
    assert prompt_text(chat, "countdown", ex, chat_template=False) == ex["prompt"]
    plain = load_model(model_path)  # no template: the raw prompt
    assert prompt_text(plain, "countdown", ex) == ex["prompt"]
    # a task without its own instruction (gsm8k's prompts already hold one) is sent as it is, in the template
    assert prompt_text(chat, "gsm8k", {"prompt": "2+2?"}) == "[user]2+2?[assistant]"


def test_eval_uses_the_template_and_d1s_lengths_unless_turned_off(chat_model_dir, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    cli_main(["eval", "--model", chat_model_dir, "--task", "countdown", "--num-examples", "2",
              "--steps", "8", "--output", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["chat_template"] is True and summary["gen_length"] == 256 and summary["block_length"] == 32
    cli_main(["eval", "--model", chat_model_dir, "--task", "countdown", "--num-examples", "2", "--no-chat-template"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["chat_template"] is False and summary["gen_length"] == 16


def test_rollouts_encode_the_templated_instruction(chat_model_dir, monkeypatch):
    chat = load_model(chat_model_dir)
    ex = {**get_task("sudoku").make_dataset("test", 1, 0)[0], "task": "sudoku"}
    seen = []
    import training.rollout as rollout_module
    real = rollout_module.generate

    def spy(model, prompts, *a, **kw):
        seen.extend(prompts)
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr(rollout_module, "generate", spy)
    rollout(chat.model, chat, [ex], lambda t, e: 0.0, 2, SamplingParams("steps", 4, steps=4), seed=0)
    want = chat.encode("[user]" + get_task("sudoku").instruction(ex) + "[assistant]")
    assert seen == [want, want]
