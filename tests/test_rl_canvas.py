"""RL on a canvas model (training/canvas_rl.py): ``--train sampler`` trains the threshold head on a tiny random
DiffusionGemma with the model frozen, by the same group-relative REINFORCE as for masked models; model RL and
masked-sampler settings are refused with the reason."""

from __future__ import annotations

import copy
import json
from dataclasses import replace as dc_replace

import pytest
import torch
from safetensors.torch import load_file
from tiny_diffusion_gemma import random_model, write_checkpoint

import training.rl as rl
from diffpo_serve.dllm.canvas import CanvasParams
from diffpo_serve.dllm.loading import load_model
from diffpo_serve.dllm.threshold_head import load_head
from training.config import RLConfig
from training.evaluate import evaluate
from training.loss import group_advantages
from training.tasks import get_task

G = 4
GENERATION = {"max_new_tokens": 16, "max_denoising_steps": 3,
              "sampler_config": {"entropy_bound": 0.5, "_cls_name": "EntropyBoundSamplerConfig"}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("dgrl") / "tiny-dg", random_model(seed=3), generation=GENERATION)


def cfg(checkpoint, out, **kw):
    base = dict(model=str(checkpoint), output_dir=str(out), train="sampler", tasks="sudoku", train_examples=16,
                num_generations=G, prompts_per_step=2, max_steps=1, save_every=1, gen_length=12, seed=0,
                head_features="prompt+answer+eb", entropy_coef=0.0, head_lr=0.05)
    return RLConfig(**{**base, **kw})


def text_reward(text: str, example: dict) -> float:
    """A deterministic reward that differs between completions (a random model solves no sudoku)."""
    return float(sum(map(ord, text)) % 3) / 2


def test_one_sampler_step_moves_only_the_head_in_the_rewarded_direction(checkpoint, tmp_path, monkeypatch):
    seen = {}
    real_update, real_reward = rl._head_update, rl.sampler_reward

    def spy_update(c, head, optimizer, accelerator, batch, r):
        seen.update(head=copy.deepcopy(head), features=batch.head_features.clone(),
                    choice=batch.threshold_choice.clone(), threshold=batch.threshold.clone(), r=r.clone(),
                    nfe=batch.nfe.clone(), commit_step=batch.commit_step)
        return real_update(c, head, optimizer, accelerator, batch, r)

    def spy_reward(reward, nfe, nfe_max, lam):
        seen["nfe_max"] = nfe_max
        return real_reward(reward, nfe, nfe_max, lam)

    monkeypatch.setattr(rl, "_reward", text_reward)
    monkeypatch.setattr(rl, "_head_update", spy_update)
    monkeypatch.setattr(rl, "sampler_reward", spy_reward)
    out = rl.train_rl(cfg(checkpoint, tmp_path / "run")).output_dir

    # the model is frozen: every weight of the exported model is the checkpoint's
    before, after = load_file(str(checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the head moved, and was saved beside the model (loads with it)
    head_before, head_after = seen["head"], load_head(out)
    assert head_after is not None and load_model(out).threshold_head is not None
    assert any(not torch.equal(a, b) for a, b in zip(head_before.state_dict().values(),
                                                      head_after.state_dict().values()))
    # rollouts: each row decoded with the bound it drew (several distinct ones), no per-token trajectory
    choice = seen["choice"]
    assert bool((choice >= 0).all()) and len(set(choice.tolist())) > 1
    assert torch.allclose(seen["threshold"], head_before.grid[choice])
    assert seen["commit_step"] is None
    # NFE_max = blocks x steps per block: ceil(12 / 8) x 3 = 6 decoder passes (a masked model's: gen_length)
    assert seen["nfe_max"] == 6 and bool((seen["nfe"] <= 6).all())
    # the sign: REINFORCE raises the log-prob of above-average bounds and lowers the others, so the
    # advantage-weighted change of log-probs is positive (Adam's first step moves along the gradient's signs)
    advantages, _ = group_advantages(seen["r"], G)
    assert bool((advantages != 0).any())
    with torch.no_grad():
        delta = head_after.log_prob(seen["features"], choice) - head_before.log_prob(seen["features"], choice)
    assert float((advantages * delta).sum()) > 0
    assert float(delta[advantages.argmax()]) > 0 and float(delta[advantages.argmin()]) < 0


@pytest.mark.parametrize("kw, match", [
    (dict(train="model"), "--train model is not supported.*mask tokens"),
    (dict(train="joint"), "--train joint is not supported"),
    (dict(train="joint", sampler_kind="policy"), "--train joint is not supported.*mask tokens"),
    (dict(sampler_kind="policy"), "--sampler-kind policy"),
    (dict(cache="prefix"), "--cache is a masked-sampler setting"),
    (dict(block_length=4), "--block-length"),
    (dict(temperature=0.0), "--temperature"),
])
def test_what_a_canvas_model_cannot_train_is_refused_with_the_reason(checkpoint, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        rl.train_rl(cfg(checkpoint, tmp_path / "refused", **kw))


def test_rollout_params_and_nfe_max(checkpoint):
    base = load_model(checkpoint)
    loaded = dc_replace(base, threshold_head=rl._setup_head(base, RLConfig(train="sampler"), checkpoint, False))
    # the chat template's block length (32) is not a canvas model's: its blocks are its canvas of 8
    params, nfe_max = rl.rollout_params(RLConfig(steps=5), loaded, "learned", None, 20, 32)
    assert (params.sampler, params.gen_length, params.threshold, params.steps) == ("learned", 20, None, 5)
    assert nfe_max == 3 * 5  # ceil(20 / 8) blocks of at most 5 passes
    params, nfe_max = rl.rollout_params(RLConfig(), loaded, "learned", None, 16, None)
    assert nfe_max == 2 * 3  # the checkpoint's 3 steps per block


def test_eval_every_logs_the_heads_decoding_with_fixed_seeds(checkpoint, tmp_path, monkeypatch):
    """``--eval-every 1``: step 0 evaluates the starting head, step 1 the trained one, each decoding the test
    prompts as ``diffpo-train eval`` does with the head's bounds and seeds 0, 1, 2 (so the values are reproducible
    and the two points differ only by the head)."""
    heads = []
    real_update = rl._head_update

    def spy_update(c, head, optimizer, accelerator, batch, r):
        heads.append(copy.deepcopy(head))
        return real_update(c, head, optimizer, accelerator, batch, r)

    monkeypatch.setattr(rl, "_reward", text_reward)
    monkeypatch.setattr(rl, "_head_update", spy_update)
    out = rl.train_rl(cfg(checkpoint, tmp_path / "run", eval_every=1, eval_examples=3, head_lr=0.5)).output_dir
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval_sudoku_accuracy" in r}
    assert sorted(evals) == [0, 1]

    data = get_task("sudoku").make_dataset("test", 3, seed=0)
    params = CanvasParams(gen_length=12, sampler="learned", seed=0)
    loaded = load_model(checkpoint)
    for step, head in [(0, heads[0]), (1, load_head(out))]:
        expected = evaluate(dc_replace(loaded, threshold_head=head), "sudoku", data, params, progress=False)
        assert evals[step]["eval_sudoku_accuracy"] == round(expected.accuracy, 4)
        assert evals[step]["eval_sudoku_exact"] == round(expected.exact, 4)
        assert evals[step]["eval_sudoku_mean_nfe"] == round(expected.mean_nfe, 3)
    # the two points are different heads' decodings: at least the bounds they chose differ
    again = [evaluate(dc_replace(loaded, threshold_head=h), "sudoku", data, params, progress=False)
             for h in (heads[0], load_head(out))]
    assert [r["threshold"] for r in again[0].rows] != [r["threshold"] for r in again[1].rows]
