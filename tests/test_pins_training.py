"""Pins of the trainers' option handling that mutation testing found loose: the teacher of ``--targets model``
reaching the cache loss (sft, and distill, whose teacher is its default model when ``--model`` is left out), and
the step policy's warm-start operating point at its edges (0 and None keep 0.5; a point outside (0, 1) is refused
before anything runs).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import training.commit_policy as commit_policy
import training.distill as distill
import training.rl as rl
import training.sft as sft
from training.config import DistillConfig, RLConfig, SFTConfig


def spy_losses(monkeypatch) -> dict:
    """Record the ``teacher`` argument of every batch_loss and cached_view_loss call of train_sft."""
    seen = {"batch": [], "cache": []}
    real_batch, real_cache = sft.batch_loss, sft.cached_view_loss

    def batch(*a, **kw):
        seen["batch"].append(a[-1] if len(a) == 9 else kw.get("teacher"))
        return real_batch(*a, **kw)

    def cache(*a, **kw):
        seen["cache"].append((a[4], a[-1] if len(a) == 10 else kw.get("teacher")))
        return real_cache(*a, **kw)

    monkeypatch.setattr(sft, "batch_loss", batch)
    monkeypatch.setattr(sft, "cached_view_loss", cache)
    return seen


def sft_cfg(out, **kw) -> SFTConfig:
    base = dict(output_dir=str(out), tasks="sudoku", train_examples=16, max_steps=2, batch_size=4, lr=1e-3,
                warmup_steps=0, save_every=2, log_every=1, gen_length=8, cache_block_length=4)
    return SFTConfig(**{**base, **kw})


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def test_the_cache_loss_is_scored_against_the_frozen_teacher(model_path, tmp_path, monkeypatch):
    from diffpo_serve.dllm.loading import load_model
    seen = spy_losses(monkeypatch)
    sft.train_sft(sft_cfg(tmp_path / "t", model=model_path, targets="model", cache_loss="both"))
    start = load_model(model_path).model
    assert len(seen["batch"]) == len(seen["cache"]) == 2
    assert [mode for mode, _ in seen["cache"]] == ["prefix", "dual"]  # both: alternate by step
    teachers = seen["batch"] + [t for _, t in seen["cache"]]
    assert all(t is teachers[0] for t in teachers)
    teacher = teachers[0]
    assert teacher is not None and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert same_weights(teacher, start)  # the starting model, not the student (which the steps moved)
    seen["batch"].clear(), seen["cache"].clear()
    sft.train_sft(sft_cfg(tmp_path / "tokens", model=model_path, cache_loss="prefix"))
    assert seen["batch"] == [None, None] and seen["cache"] == [("prefix", None), ("prefix", None)]


def test_distill_passes_its_teacher_to_the_cache_loss_even_without_model(model_path, tmp_path, monkeypatch):
    """distill's --model defaults to the bundled model; with --targets model --cache-loss the SFT run gets that
    model as --model (so its teacher) and the cache loss is scored against it."""
    monkeypatch.setattr(distill, "default_model_path", lambda: model_path)
    seen = spy_losses(monkeypatch)
    cfg = DistillConfig(output_dir=str(tmp_path / "d"), tasks="sudoku", train_examples=4, min_reward=0.0, max_steps=1,
                        batch_size=2, save_every=1, log_every=1, teacher_batch_size=4, cache_loss="dual",
                        cache_block_length=4, targets="model")
    assert cfg.model is None
    distill.train_distill(cfg)
    ((mode, teacher),) = seen["cache"]
    assert mode == "dual" and teacher is not None and seen["batch"] == [teacher]
    from diffpo_serve.dllm.loading import load_model
    assert same_weights(teacher, load_model(model_path).model)


def test_cache_block_length_must_divide_the_answer_at_its_edge(tmp_path):
    for bad in (3, 0, 16):
        with pytest.raises(ValueError, match=f"--cache-block-length {bad} must divide --gen-length 8"):
            sft.train_sft(sft_cfg(tmp_path / "x", cache_loss="prefix", cache_block_length=bad))
    with pytest.raises(ValueError, match="--targets model scores against the starting model"):
        sft.train_sft(sft_cfg(tmp_path / "y", targets="model"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    for ok in (1, 8):  # the edges that divide: one token per block, the whole answer as one block
        out = sft.train_sft(sft_cfg(tmp_path / f"ok{ok}", cache_loss="prefix", cache_block_length=ok, max_steps=1,
                                    save_every=1))
        assert (Path(out) / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- the warm start's operating point

def warm_started(base_dir, monkeypatch, point):
    """rl._setup_policy's new policy after a (faked, instant) warm start at ``warm_start_point`` = ``point``, and
    the same seeded policy with no warm start, fitted alike, for comparison."""
    from diffpo_serve.dllm.loading import load_model
    from diffpo_serve.dllm.step_policy import FEATURE_NAMES
    features = torch.linspace(0, 1, 8 * len(FEATURE_NAMES)).view(8, -1)
    monkeypatch.setattr(commit_policy, "warm_start_data", lambda *a, **kw: (features, torch.ones(8)))
    monkeypatch.setattr(commit_policy, "fit_warm_start", lambda policy, f, y, **kw: policy.fit_normalisation(f) or 0.25)
    cfg = RLConfig(model=str(base_dir), tasks="sudoku", train="sampler", sampler_kind="policy", warm_start_prompts=2,
                   warm_start_point=point)
    policy = rl._setup_policy(load_model(base_dir), cfg, base_dir / "none", resuming=False, gen_length=8)
    torch.manual_seed(cfg.seed)
    plain = rl.StepPolicy(policy.hidden_size, features=cfg.policy_features)
    return policy, plain


@pytest.mark.parametrize("point", [0.0, None])
def test_a_zero_or_unset_operating_point_keeps_the_fitted_policy(base_dir, monkeypatch, point):
    policy, plain = warm_started(base_dir, monkeypatch, point)
    assert policy.threshold == 0.5
    assert torch.equal(policy.net[-1].bias, plain.net[-1].bias)


@pytest.mark.parametrize("point", [0.9, 1e-3, 1 - 1e-3])
def test_an_operating_point_is_folded_into_the_bias(base_dir, monkeypatch, point):
    policy, plain = warm_started(base_dir, monkeypatch, point)
    assert policy.threshold == 0.5
    shift = float((policy.net[-1].bias - plain.net[-1].bias).detach())
    assert shift == pytest.approx(-math.log(point / (1 - point)), abs=1e-5)


@pytest.mark.parametrize("point", [1.0, 1.5, -0.5])
def test_an_operating_point_outside_the_unit_interval_is_refused_before_anything_runs(base_dir, tmp_path, point):
    out = tmp_path / "w"
    with pytest.raises(ValueError, match=f"--warm-start-point {point}: a probability in \\(0, 1\\)"):
        rl.train_rl(RLConfig(model=str(base_dir), output_dir=str(out), train="sampler", sampler_kind="policy",
                             warm_start_point=point))
    assert not out.exists()
