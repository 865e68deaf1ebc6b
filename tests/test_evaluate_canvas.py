"""``diffpo-train eval`` on a canvas model (a tiny random DiffusionGemma): each example decodes as
``canvas.generate`` alone with seed ``--seed + i`` and the given bound (prompts through the chat template), the
summary's NFE / encoder passes are those decodes' means, ``learned`` takes the head's bound, and the flags a canvas
cannot honour are refused naming the flag, as the server refuses the request fields."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_model
from test_threshold_head import always
from tiny_diffusion_gemma import random_model, write_checkpoint

from diffpo_serve.dllm import canvas
from diffpo_serve.dllm.loading import load_model
from diffpo_serve.dllm.threshold_head import ThresholdHead
from training.cli import main
from training.tasks import get_task

GENERATION = {"max_new_tokens": 16, "max_denoising_steps": 3,
              "sampler_config": {"entropy_bound": 0.5, "_cls_name": "EntropyBoundSamplerConfig"}}
N = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("dgeval") / "tiny-dg", random_model(seed=3), generation=GENERATION)


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def solo(loaded, example, seed, **params):
    """``example`` decoded alone by ``canvas.generate``: its prompt rendered by the tokenizer's chat template
    (d1's sudoku eval prompt as one user turn, the model's turn opened, d1's ``<reasoning>`` prefilled)."""
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": get_task("sudoku").instruction(example, "eval")}], tokenize=False,
        add_generation_prompt=True)
    assert text.startswith("<bos><|turn>user\n") and text.endswith("<|turn>model\n")
    text += "<reasoning>"
    out = canvas.generate(canvas.denoiser_for(loaded.model), [loaded.encode(text)],
                          canvas.CanvasParams(seed=seed, **params), eos_ids=loaded.eos_ids, pad_id=loaded.pad_id,
                          head=loaded.threshold_head)
    ids = out.sequences[0, :int(out.gen_length[0])].tolist()
    return {"completion": loaded.decode(ids)[0], "nfe": int(out.nfe[0]), "threshold": float(out.threshold[0]),
            "encoder_passes": int(out.encoder_passes[0])}


def test_eb_rows_equal_canvas_generate_alone(checkpoint, tmp_path, capsys):
    """Batched eval (batches of 3) with ``--threshold`` 3, ``--steps`` 4 (per block), ``--seed`` 11: row i is
    ``canvas.generate`` alone with seed 11 + i at that bound (not the checkpoint's 0.5, not seed 12), text, NFE and encoder passes; the summary holds
    their means and the task's rewards."""
    out = tmp_path / "rows.jsonl"
    assert main(["eval", "--model", str(checkpoint), "--task", "sudoku", "--limit", str(N), "--batch-size", "3",
                 "--sampler", "eb", "--threshold", "3", "--steps", "4", "--gen-length", "12", "--block-length", "8",
                 "--seed", "11", "--output", str(out)]) == 0
    summary, rows = last_json(capsys), rows_of(out)
    loaded = load_model(checkpoint)
    data = get_task("sudoku").make_dataset("test", 1000, 11).select(range(N))
    expected = [solo(loaded, ex, 11 + i, gen_length=12, threshold=3.0, steps=4) for i, ex in enumerate(data)]
    assert [{k: r[k] for k in expected[0]} for r in rows] == expected
    assert [r["reward"] for r in rows] == [get_task("sudoku").reward(e["completion"], ex)
                                          for e, ex in zip(expected, data)]
    assert len({e["completion"] for e in expected}) > 1  # per-example seeds: not one decode repeated
    assert solo(loaded, data[0], 12, gen_length=12, threshold=3.0, steps=4) != expected[0]
    assert [solo(loaded, ex, 11 + i, gen_length=12, threshold=0.5, steps=4)["completion"]
            for i, ex in enumerate(data)] != [e["completion"] for e in expected]  # the bound changes the decode
    assert summary["mean_nfe"] == pytest.approx(sum(e["nfe"] for e in expected) / N)
    assert summary["mean_encoder_passes"] == pytest.approx(sum(e["encoder_passes"] for e in expected) / N)
    assert 1 <= summary["mean_encoder_passes"] <= 2 and summary["mean_nfe"] <= 8  # ceil(12/8) blocks x 4 steps
    assert (summary["sampler"], summary["threshold"], summary["steps"], summary["block_length"], summary["cache"],
            summary["gen_length"], summary["n"], summary["chat_template"]) == ("eb", 3.0, 4, 8, "off", 12, N, True)


def test_defaults_take_the_checkpoints_bound_and_steps(checkpoint, tmp_path, capsys):
    """No sampler flags: ``eb`` (no head) at the generation config's bound 0.5 and 3 steps per block."""
    out = tmp_path / "rows.jsonl"
    assert main(["eval", "--model", str(checkpoint), "--task", "sudoku", "--limit", "2", "--gen-length", "8",
                 "--seed", "4", "--output", str(out)]) == 0
    summary = last_json(capsys)
    assert (summary["sampler"], summary["threshold"], summary["steps"]) == ("eb", 0.5, 3)
    loaded = load_model(checkpoint)
    data = get_task("sudoku").make_dataset("test", 1000, 4).select(range(2))
    expected = [solo(loaded, ex, 4 + i, gen_length=8, threshold=0.5, steps=3) for i, ex in enumerate(data)]
    assert [{k: r[k] for k in expected[0]} for r in rows_of(out)] == expected


def test_learned_takes_the_heads_bound(checkpoint, tmp_path, capsys):
    """A head that always picks grid index 9 is the default sampler; every row decodes as ``eb`` alone at
    that grid bound and the summary reports it."""
    model_dir = tmp_path / "with-head"
    shutil.copytree(checkpoint, model_dir)
    torch.manual_seed(0)
    head = always(ThresholdHead(canvas.denoiser_for(load_model(checkpoint).model).hidden_size,
                                features="prompt+answer+eb"), 9)
    head.save(model_dir)
    gamma = float(head.grid[9])
    out = tmp_path / "rows.jsonl"
    assert main(["eval", "--model", str(model_dir), "--task", "sudoku", "--limit", "3", "--gen-length", "12",
                 "--seed", "5", "--output", str(out)]) == 0
    summary = last_json(capsys)
    assert summary["sampler"] == "learned" and summary["threshold"] == pytest.approx(gamma)
    assert summary["threshold_distribution"] == {f"{gamma:.4g}": 3}
    plain = load_model(checkpoint)  # no head: a fixed bound
    data = get_task("sudoku").make_dataset("test", 1000, 5).select(range(3))
    expected = [solo(plain, ex, 5 + i, gen_length=12, threshold=gamma) for i, ex in enumerate(data)]
    rows = rows_of(out)
    assert [r["completion"] for r in rows] == [e["completion"] for e in expected]
    assert [r["nfe"] for r in rows] == [e["nfe"] for e in expected]
    assert [r["threshold"] for r in rows] == pytest.approx([gamma] * 3)


@pytest.mark.parametrize("flags, flag, says", [
    (["--sampler", "steps"], "--sampler", "masked-model sampler"),
    (["--sampler", "learned"], "--sampler", "threshold head"),
    (["--cache", "prefix"], "--cache", "masked-model feature"),
    (["--block-length", "4"], "--block-length", "canvases of 8 tokens"),
    (["--temperature", "0.5"], "--temperature", "temperature schedule"),
    (["--t-min", "0.9", "--t-max", "0.5"], "--t-min", "temperature schedule"),
    (["--threshold", "-1"], "--threshold", "entropy bound"),
    (["--steps", "0"], "--steps", "steps must be >= 1"),
    (["--mask-id", "3"], "--mask-id", "no mask token"),
])
def test_flags_a_canvas_cannot_honour_are_refused(checkpoint, capsys, flags, flag, says):
    args = ["eval", "--model", str(checkpoint), "--task", "sudoku", "--limit", "1", "--gen-length", "8"]
    assert main(args + flags) == 2
    err = capsys.readouterr().err
    assert f"{flag}:" in err and says in err and str(checkpoint) in err


def test_canvas_flags_are_refused_for_masked_models(tmp_path, tokenizer, capsys):
    tiny_model().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--task", "sudoku", "--limit", "1", "--t-max", "0.5"]) == 2
    assert "--t-max is an option of canvas models" in capsys.readouterr().err
