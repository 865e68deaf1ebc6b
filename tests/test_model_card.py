"""The model card's front matter (description, example prompts): read, served, shown, and true.

The bundled model's card is what a newcomer sees first (README, ``/v1/models``, the playground's
presets), so its examples are checked against the model itself: each must be solved, with the
server's default sampler and at full steps.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from diffpo_serve.dllm.loading import BUNDLED_MODEL_DIR, ModelLoadError, load_model
from diffpo_serve.dllm.model_card import ModelCardError, read_card
from diffpo_serve.dllm.sampler import SamplingParams, generate
from test_server_support import live_server, save_tiny_model
from training.tasks import get_task, sudoku

ROOT = Path(__file__).resolve().parents[1]
CARD = """---
description: >
  Solves
  puzzles.
widget:
  - text: "sudoku 1"
  - text: countdown 1,2,3=6
---
# title
"""


def test_front_matter_is_read(tmp_path):
    (tmp_path / "README.md").write_text(CARD)
    card = read_card(tmp_path)
    assert card.description == "Solves puzzles."
    assert card.examples == ("sudoku 1", "countdown 1,2,3=6")


@pytest.mark.parametrize("text", ["# just a title\n", "", "no front matter\n---\n"])
def test_no_front_matter_means_no_card(tmp_path, text):
    (tmp_path / "README.md").write_text(text)
    card = read_card(tmp_path)
    assert card.description is None and card.examples == ()
    assert read_card(tmp_path / "missing").examples == ()


@pytest.mark.parametrize("text, problem", [
    ("---\ndescription: x\n", "never closed"),
    ("---\ndescription: [unclosed\n---\n", "not valid YAML"),
    ("---\n- a\n- b\n---\n", "must be a mapping"),
    ("---\ndescription: 3\n---\n", "'description' must be text"),
    ("---\nwidget: sudoku\n---\n", "'widget' must be a list"),
    ("---\nwidget:\n  - prompt: x\n---\n", "widget entry 0 has no 'text'"),
])
def test_malformed_front_matter_is_named(tmp_path, text, problem):
    (tmp_path / "README.md").write_text(text)
    with pytest.raises(ModelCardError, match=re.escape(problem)) as e:
        read_card(tmp_path)
    assert str(tmp_path / "README.md") in str(e.value)


def test_load_model_reports_a_malformed_card_with_its_path(tmp_path):
    save_tiny_model(tmp_path)
    (tmp_path / "README.md").write_text("---\nwidget: 5\n---\n")
    with pytest.raises(ModelLoadError, match="README.md: 'widget' must be a list"):
        load_model(tmp_path)


def test_models_endpoint_returns_the_card(tmp_path):
    save_tiny_model(tmp_path / "tiny-dllm")
    (tmp_path / "tiny-dllm" / "README.md").write_text(CARD)
    with live_server(model=str(tmp_path / "tiny-dllm")) as srv:
        (card,) = httpx.get(srv.url + "/v1/models").json()["data"]
    assert card["description"] == "Solves puzzles."
    assert card["examples"] == ["sudoku 1", "countdown 1,2,3=6"]


@pytest.fixture(scope="module")
def bundled():
    return load_model(BUNDLED_MODEL_DIR)


def test_bundled_card_states_the_scope_and_lists_both_tasks(bundled):
    card = bundled.card
    assert "sudoku" in card.description and "countdown" in card.description
    assert {e.split()[0] for e in card.examples} == {"sudoku", "countdown"}


@pytest.mark.parametrize("params", [SamplingParams(sampler="policy", gen_length=16, block_length=16),
                                    SamplingParams(sampler="learned", gen_length=16, block_length=16),
                                    SamplingParams(sampler="steps", steps=16, gen_length=16, block_length=16)],
                         ids=["default-policy", "learned", "full-steps"])
def test_bundled_examples_are_solved(bundled, params):
    """Every example the card offers is answered correctly (reward 1) by the bundled model: with its default
    sampler (its step policy), its threshold head and full steps."""
    examples = list(bundled.card.examples)
    prompts = [bundled.encode(p) for p in examples]
    out = generate(bundled.model, prompts, params, mask_id=bundled.mask_id, eos_id=bundled.eos_id,
                   pad_id=bundled.pad_id, head=bundled.threshold_head, policy=bundled.step_policy)
    for prompt, seq in zip(examples, out.sequences):
        task_name, _, body = prompt.partition(" ")
        task = get_task(task_name)
        text, _ = bundled.decode(seq)
        if task_name == "sudoku":  # any valid completion of the givens (a puzzle may have several)
            assert sudoku.is_valid_solution(text) and all(g in ("0", c) for g, c in zip(body, text)), (prompt, text)
        else:
            numbers, _, target = body.partition("=")
            example = {"numbers": [int(x) for x in numbers.split(",")], "target": int(target)}
            assert task.reward(text, example) == 1.0, (prompt, text)


def test_readme_playground_and_client_use_the_cards_examples(bundled):
    examples = set(bundled.card.examples)
    page = (ROOT / "diffpo_serve" / "static" / "playground.html").read_text()
    assert re.findall(r'class="preset" data-prompt="([^"]+)"', page) == list(bundled.card.examples)
    readme = (ROOT / "README.md").read_text()
    curl = re.search(r'"prompt": "([^"]+)"', readme).group(1)
    assert curl in examples
    client = (ROOT / "clients" / "openai_example.py").read_text()
    assert set(re.findall(r'^(?:SUDOKU|COUNTDOWN) = "([^"]+)"', client, re.M)) <= examples


def test_the_readme_tour_shows_what_the_default_sampler_answers(bundled):
    """The README's first request states its answer and its passes (``# -> "TEXT", N passes``): both are what the
    server's default (the step policy at its default knob) gives for that prompt."""
    readme = (ROOT / "README.md").read_text()
    prompt, text, passes = re.search(r'"prompt": "([^"]+)"\}\'\s+# -> "([^"]+)", (\d+) passes', readme).groups()
    out = generate(bundled.model, [bundled.encode(prompt)], SamplingParams(sampler="policy", gen_length=16,
                   block_length=16), mask_id=bundled.mask_id, eos_id=bundled.eos_id, pad_id=bundled.pad_id,
                   head=bundled.threshold_head, policy=bundled.step_policy)
    assert (bundled.decode(out.sequences[0])[0], int(out.nfe[0])) == (text, int(passes))
