"""Prompts for instruction-tuned models: d1's prompt for the task in the model's chat template.

A model without a chat template (the project's own) reads the raw task prompt; one with a template
reads d1's prompt (its evaluation prompt and ``<reasoning>`` prefill in ``diffpo-train eval``, its
training prompt in RL rollouts) rendered by that template, unless ``--no-chat-template``. That the
strings are d1's word for word: tests/test_d1_prompts.py.
"""

from __future__ import annotations

import json

import pytest

from diffpo_serve.dllm.loading import load_model
from test_server_support import save_chat_model
from training.cli import main as cli_main
from training.prompting import prompt_text
from training.rollout import rollout
from diffpo_serve.dllm.sampler import SamplingParams
from training.tasks import get_task

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("chat") / "tiny-chat", TEMPLATE)


def test_instructions_state_the_problem_and_d1s_answer_format():
    cd = get_task("countdown").make_dataset("test", 1, 0)[0]
    sd = get_task("sudoku").make_dataset("test", 1, 0)[0]
    for stage in ("train", "eval"):
        text = get_task("countdown").instruction(cd, stage)
        assert str(list(cd["numbers"])) in text and str(cd["target"]) in text
        text_s = get_task("sudoku").instruction(sd, stage)
        assert sd["puzzle"] in text_s
        for t in (text, text_s):
            assert "<reasoning>\n" in t and "<answer>" in t
    assert get_task("countdown").instruction(cd, "train") != get_task("countdown").instruction(cd, "eval")


def test_chat_model_reads_the_instruction_in_its_template(chat_model_dir, model_path):
    chat = load_model(chat_model_dir)
    ex = get_task("countdown").make_dataset("test", 1, 0)[0]
    want = "[user]" + get_task("countdown").instruction(ex, "eval") + "[assistant]<reasoning>"
    assert prompt_text(chat, "countdown", ex) == want  # eval's prompt, d1's prefill after the template
    want = "[user]" + get_task("countdown").instruction(ex, "train") + "[assistant]"
    assert prompt_text(chat, "countdown", ex, stage="train") == want
    assert prompt_text(chat, "countdown", ex, chat_template=False) == ex["prompt"]
    plain = load_model(model_path)  # no template: the raw prompt
    assert prompt_text(plain, "countdown", ex) == ex["prompt"]
    # an example without a task is sent as its prompt, in the template
    assert prompt_text(chat, None, {"prompt": "2+2?"}) == "[user]2+2?[assistant]"


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
    from diffpo_serve.dllm import decoding
    real = decoding.MaskedDecoder.explore

    def spy(self, model, prompts, *a, **kw):  # the prompts the rollout hands the model's decoder
        seen.extend(prompts)
        return real(self, model, prompts, *a, **kw)

    monkeypatch.setattr(decoding.MaskedDecoder, "explore", spy)
    rollout(chat.model, chat, [ex], lambda t, e: 0.0, 2, SamplingParams("steps", 4, steps=4), seed=0)
    want = chat.encode("[user]" + get_task("sudoku").instruction(ex, "train") + "[assistant]")  # d1's training prompt
    assert seen == [want, want]
