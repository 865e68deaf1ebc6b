"""Pins of the model-side checks that mutation testing found loose: DiffusionGemma's generation-config defaults
(a stated 0 is a value, not a gap; the entropy bound as serialised or as transformers resolves it), the canvas
schedule's validation at each edge (the smallest valid value accepted, the next refused, and explicit zeros never
replaced by the checkpoint's defaults), the serving 400 naming the schedule's field, and loading a saved step policy
(each file missing alone, its config's fields honoured, bad values named with the file) and its operating point.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from diffpo_serve.dllm import canvas as cv
from diffpo_serve.dllm.families import diffusion_gemma as dg
from diffpo_serve.dllm.step_policy import (CONFIG, DEFAULT_OPERATING_POINT, FEATURE_NAMES, WEIGHTS, StepPolicy,
                                           StepPolicyError, load_policy)

DEFAULTS = {"gen_length": 24, "steps": 6, "threshold": 0.2, "t_min": 0.4, "t_max": 0.8, "stability_threshold": 2,
            "confidence_threshold": 0.005}  # a checkpoint's, as CanvasDenoiser.defaults holds them


# ----------------------------------------------------------------------------- DiffusionGemma's generation config

def test_stated_zeros_are_the_checkpoints_values_not_gaps():
    generation = SimpleNamespace(max_new_tokens=8, max_denoising_steps=1, sampler_config={"entropy_bound": 0.0},
                                 t_min=0.0, t_max=0.5, stability_threshold=0, confidence_threshold=0.0)
    assert dg.canvas_defaults(generation) == {"gen_length": 8, "steps": 1, "threshold": 0.0, "t_min": 0.0,
                                              "t_max": 0.5, "stability_threshold": 0, "confidence_threshold": 0.0}


def test_the_entropy_bound_as_serialised_or_as_resolved_by_transformers():
    resolved = SimpleNamespace(sampler_config=SimpleNamespace(entropy_bound=0.35))
    serialised = SimpleNamespace(sampler_config={"entropy_bound": 0.45, "_cls_name": "EntropyBoundSamplerConfig"})
    assert dg.canvas_defaults(resolved)["threshold"] == 0.35
    assert dg.canvas_defaults(serialised)["threshold"] == 0.45
    for unset in (SimpleNamespace(sampler_config={}), SimpleNamespace(sampler_config=SimpleNamespace()),
                  SimpleNamespace(), None):
        assert dg.canvas_defaults(unset) == dg.TRANSFORMERS_DEFAULTS


def test_each_unset_field_falls_back_alone():
    only_steps = dg.canvas_defaults(SimpleNamespace(max_denoising_steps=5, t_max=None))
    assert only_steps == {**dg.TRANSFORMERS_DEFAULTS, "steps": 5}
    assert dg.TRANSFORMERS_DEFAULTS == {"gen_length": 256, "steps": 48, "threshold": 0.1, "t_min": 0.4, "t_max": 0.8,
                                        "stability_threshold": 1, "confidence_threshold": 0.005}


# ----------------------------------------------------------------------------- the canvas schedule's validation

def resolved(**kw) -> cv.CanvasParams:
    return cv.CanvasParams(**kw).resolved(DEFAULTS)


def test_unset_fields_take_the_checkpoints_defaults_and_set_ones_win_zero_included():
    assert resolved() == cv.CanvasParams(gen_length=24, threshold=0.2, steps=6, t_min=0.4, t_max=0.8,
                                         stability_threshold=2, confidence_threshold=0.005)
    p = resolved(gen_length=1, threshold=0.0, steps=1, t_min=0.0, t_max=0.3, stability_threshold=0,
                 confidence_threshold=0.0, seed=4)
    assert (p.gen_length, p.threshold, p.steps, p.t_min, p.t_max, p.stability_threshold, p.confidence_threshold,
            p.seed) == (1, 0.0, 1, 0.0, 0.3, 0, 0.0, 4)
    assert [type(getattr(p, k)) for k in ("threshold", "t_min", "t_max", "stability_threshold",
                                          "confidence_threshold")] == [float, float, float, int, float]
    assert resolved(stability_threshold=3.0).stability_threshold == 3  # a whole float is that integer


def test_learned_rows_keep_their_bound_unset_for_the_head():
    assert resolved(sampler="learned").threshold is None
    assert resolved(sampler="learned", threshold=0.7).threshold == 0.7
    assert resolved(sampler="eb").threshold == 0.2
    with pytest.raises(ValueError, match="sampler must be one of eb, learned for a canvas model"):
        resolved(sampler="steps")


@pytest.mark.parametrize("good,bad,message", [
    (dict(gen_length=1), dict(gen_length=0), "gen_length must be >= 1; got 0"),
    (dict(steps=1), dict(steps=0), "steps must be >= 1; got 0"),
    (dict(threshold=0.0), dict(threshold=-1e-9), "threshold (the entropy bound) must be a finite number >= 0"),
    (dict(threshold=1e300), dict(threshold=math.inf), "threshold (the entropy bound) must be a finite number >= 0"),
    (dict(t_min=0.8, t_max=0.8), dict(t_min=0.8 + 1e-9, t_max=0.8), "the temperature schedule needs"),
    (dict(t_min=0.0, t_max=1e-9), dict(t_min=0.0, t_max=0.0), "the temperature schedule needs"),
    (dict(t_min=0.0), dict(t_min=-1e-9), "the temperature schedule needs"),
    (dict(t_max=1e300), dict(t_max=math.inf), "the temperature schedule needs"),
    (dict(stability_threshold=0), dict(stability_threshold=-1), "stability_threshold must be an integer >= 0"),
    (dict(stability_threshold=2), dict(stability_threshold=1.5), "stability_threshold must be an integer >= 0"),
    (dict(confidence_threshold=0.0), dict(confidence_threshold=-1e-9), "confidence_threshold must be a finite"),
    (dict(confidence_threshold=1e300), dict(confidence_threshold=math.inf), "confidence_threshold must be a finite"),
])
def test_schedule_validation_at_each_edge(good, bad, message):
    p = resolved(**good)
    assert all(getattr(p, k) == v for k, v in good.items())
    with pytest.raises(ValueError) as e:
        resolved(**bad)
    assert str(e.value).startswith(message)


def test_learned_rows_skip_the_bound_check_but_not_the_schedule():
    assert resolved(sampler="learned", t_min=0.1, t_max=0.1).t_max == 0.1
    with pytest.raises(ValueError, match="temperature schedule"):
        resolved(sampler="learned", t_min=0.9)
    with pytest.raises(ValueError, match="entropy bound"):
        resolved(sampler="learned", threshold=-1.0)


# ----------------------------------------------------------------------------- loading a saved step policy

def saved(directory, policy: StepPolicy | None = None):
    policy = policy or StepPolicy(width=8, threshold=0.3)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_()
    policy.save(directory)
    return policy


def test_a_saved_policy_loads_with_its_config_in_eval_mode(tmp_path):
    policy = saved(tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text()) == {"hidden_size": 0, "width": 8, "features": "basic",
                                                           "threshold": 0.3}
    loaded = load_policy(tmp_path)
    assert (loaded.width, loaded.threshold, loaded.features, loaded.hidden_size, loaded.training) == (
        8, 0.3, "basic", 0, False)
    f = torch.randn(3, len(FEATURE_NAMES))
    assert torch.equal(loaded(f), policy(f))


def test_a_config_without_optional_fields_takes_the_defaults(tmp_path):
    saved(tmp_path, StepPolicy())  # width 64, basic
    (tmp_path / CONFIG).write_text("{}")
    loaded = load_policy(tmp_path)
    assert (loaded.width, loaded.threshold, loaded.features, loaded.hidden_size) == (64, DEFAULT_OPERATING_POINT,
                                                                                     "basic", 0)


def test_no_policy_files_is_no_policy_and_either_file_alone_is_an_error(tmp_path):
    assert load_policy(tmp_path) is None
    saved(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(StepPolicyError, match=f"{WEIGHTS}: cannot load the step policy"):
        load_policy(tmp_path)
    saved(tmp_path)
    (tmp_path / CONFIG).unlink()
    with pytest.raises(StepPolicyError, match=f"{CONFIG}: unreadable step-policy config"):
        load_policy(tmp_path)


@pytest.mark.parametrize("config,problem", [
    ({"features": "hidden"}, "features must be one of basic, basic\\+hidden"),
    ({"features": "basic+hidden", "hidden_size": 0}, "basic\\+hidden features need the model's hidden_size"),
    ({"width": "wide"}, "invalid literal"),
    ({"threshold": "high"}, "could not convert"),
])
def test_a_bad_config_value_is_named_with_the_file(tmp_path, config, problem):
    saved(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps(config))
    with pytest.raises(StepPolicyError, match=f"{CONFIG}: unreadable step-policy config: {problem}"):
        load_policy(tmp_path)


def test_weights_of_another_shape_are_named_with_the_weights_file(tmp_path):
    saved(tmp_path, StepPolicy(width=8))
    (tmp_path / CONFIG).write_text(json.dumps({"width": 16}))
    with pytest.raises(StepPolicyError, match=f"{WEIGHTS}: cannot load the step policy"):
        load_policy(tmp_path)


def test_hidden_features_load_with_their_hidden_size(tmp_path):
    policy = saved(tmp_path, StepPolicy(3, width=8, features="basic+hidden"))
    loaded = load_policy(tmp_path)
    assert (loaded.hidden_size, loaded.feature_size, loaded.uses_hidden) == (3, len(FEATURE_NAMES) + 3, True)
    f = torch.randn(2, len(FEATURE_NAMES) + 3)
    assert torch.equal(loaded(f), policy(f))


# ----------------------------------------------------------------------------- the operating point

@pytest.mark.parametrize("point", [0.0, 1.0, -0.1, 1.5])
def test_an_operating_point_outside_the_open_unit_interval_is_refused(point):
    policy = StepPolicy(width=4)
    bias = policy.net[-1].bias.clone()
    with pytest.raises(ValueError, match=f"operating point must be in \\(0, 1\\); got {point}"):
        policy.set_operating_point(point)
    assert torch.equal(policy.net[-1].bias, bias) and policy.threshold == DEFAULT_OPERATING_POINT


@pytest.mark.parametrize("point", [1e-6, 0.25, 0.5, 0.9, 1 - 1e-6])
def test_the_operating_point_shifts_the_bias_by_its_logit(point):
    policy = StepPolicy(width=4, threshold=0.7)
    bias = policy.net[-1].bias.clone()
    policy.set_operating_point(point)
    assert policy.threshold == 0.5
    assert float((policy.net[-1].bias - bias).detach()) == pytest.approx(-math.log(point / (1 - point)), abs=1e-5)
