"""A step policy's warm start killed part-way resumes (--resume) to the policy an uninterrupted run fits, decoding
and fitting only what was not saved; other settings, a run without --resume and damaged files are handled."""

import json

import pytest
import torch
from safetensors.torch import load_file

import training.commit_policy as cp
import training.warm_start as ws
from training.checkpoint import CheckpointError
from training.config import RLConfig
from training.rl import train_rl

ROUNDS, PROMPTS, PART = 2, 5, 2  # 5 prompts in parts of 2: parts at 0, 2, 4 (the last one short), per round


def cfg(out, **kw):
    base = dict(output_dir=str(out), tasks="sudoku", train_examples=8, max_steps=0, gen_length=8, train="sampler",
                sampler_kind="policy", warm_start_prompts=PROMPTS, warm_start_epochs=2, warm_start_rounds=ROUNDS,
                warm_start_gamma=0.2, seed=3)
    return RLConfig(**{**base, **kw})


@pytest.fixture
def counted(monkeypatch):
    """Parts of 2 prompts; ``calls`` logs (round's sampler, prompts) per decoded part and ``fits`` the tokens of
    each fit; ``kill["data"]`` / ``kill["fit"]`` = k: the k-th such call (from 1) is interrupted instead."""
    monkeypatch.setattr(ws, "PART_PROMPTS", PART)
    real_data, real_fit = cp.warm_start_data, cp.fit_warm_start
    log = {"calls": [], "fits": [], "kill": {}}

    def data(loaded, prompts, gen_length, behaviour, **kw):
        log["calls"].append((behaviour.sampler, len(prompts)))
        if log["kill"].get("data") == len(log["calls"]):
            raise KeyboardInterrupt
        return real_data(loaded, prompts, gen_length, behaviour, **kw)

    def fit(policy, features, labels, **kw):
        log["fits"].append(len(labels))
        if log["kill"].get("fit") == len(log["fits"]):
            raise KeyboardInterrupt
        return real_fit(policy, features, labels, **kw)

    monkeypatch.setattr(cp, "warm_start_data", data)
    monkeypatch.setattr(cp, "fit_warm_start", fit)
    return log


def policy_weights(out):
    return load_file(out / "step_policy.safetensors")


def interrupted(base_dir, out, counted, **kill):
    counted["kill"] = kill
    with pytest.raises(KeyboardInterrupt):
        train_rl(cfg(out, model=str(base_dir)))
    counted.update(calls=[], fits=[], kill={})


@pytest.mark.parametrize("kill, saved_parts, redone_calls, redone_fits", [
    ({"data": 2}, {"round0": ["part000000000"]}, [("eb", 2), ("eb", 1), ("policy", 2), ("policy", 2), ("policy", 1)], 2),
    ({"fit": 1}, {"round0": ["part000000000", "part000000002", "part000000004"]},
     [("policy", 2), ("policy", 2), ("policy", 1)], 2),
    ({"data": 5}, {"round0": ["fit", "part000000000", "part000000002", "part000000004", "policy"],
                   "round1": ["part000000000"]}, [("policy", 2), ("policy", 1)], 1),
])
def test_a_killed_warm_start_resumes_to_the_uninterrupted_policy(base_dir, tmp_path, counted, kill, saved_parts,
                                                                 redone_calls, redone_fits):
    whole = train_rl(cfg(tmp_path / "whole", model=str(base_dir))).output_dir
    assert counted["calls"] == [("eb", 2), ("eb", 2), ("eb", 1), ("policy", 2), ("policy", 2), ("policy", 1)]
    assert not (whole / ws.WARM_START_DIR).exists()  # removed once the model is exported
    tokens = counted["fits"]
    counted.update(calls=[], fits=[])

    out = tmp_path / "killed"
    interrupted(base_dir, out, counted, **kill)
    store = out / ws.WARM_START_DIR
    assert {d.name: sorted(p.stem for p in d.iterdir()) for d in store.iterdir() if d.is_dir()} == saved_parts

    resumed = train_rl(cfg(out, model=str(base_dir), resume=True)).output_dir
    assert counted["calls"] == redone_calls  # only what was not saved is decoded again
    assert counted["fits"] == tokens[ROUNDS - redone_fits:]  # and refitted, on all rounds' tokens
    a, b = policy_weights(whole), policy_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not store.exists()


def test_a_resume_under_other_settings_is_refused_naming_them(base_dir, tmp_path, counted):
    out = tmp_path / "w"
    interrupted(base_dir, out, counted, data=2)
    with pytest.raises(ValueError, match=r"gamma: 0\.2 there, 0\.3 now; label: 'trajectory' there, 'continuation' now"):
        train_rl(cfg(out, model=str(base_dir), resume=True, warm_start_gamma=0.3, warm_start_label="continuation"))
    assert counted["calls"] == []  # refused before decoding anything
    # more rounds is not another setting: a finished round does not depend on how many follow
    train_rl(cfg(out, model=str(base_dir), resume=True, warm_start_rounds=ROUNDS + 1))
    assert counted["calls"][0] == ("eb", 2) and len(counted["calls"]) == 3 * (ROUNDS + 1) - 1


def test_without_resume_an_unfinished_warm_start_is_discarded(base_dir, tmp_path, counted):
    out = tmp_path / "w"
    interrupted(base_dir, out, counted, data=5)
    train_rl(cfg(out, model=str(base_dir)))
    assert len(counted["calls"]) == 3 * ROUNDS and len(counted["fits"]) == ROUNDS


@pytest.mark.parametrize("damage, problem", [
    ("round0/part000000000.safetensors", "cannot read this part of the warm start's data"),
    ("round0/fit.json", "cannot read round 0's fitted policy"),
    ("run.json", "unreadable record of the warm start's settings"),
])
def test_a_damaged_warm_start_file_is_named_with_its_problem(base_dir, tmp_path, counted, damage, problem):
    out = tmp_path / "w"
    interrupted(base_dir, out, counted, data=5)
    (out / ws.WARM_START_DIR / damage).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=problem) as e:
        train_rl(cfg(out, model=str(base_dir), resume=True))
    assert str(out / ws.WARM_START_DIR / damage.split("/")[0]) in str(e.value)


def test_the_store_records_the_settings_its_data_depends_on(base_dir, tmp_path, counted):
    out = tmp_path / "w"
    interrupted(base_dir, out, counted, data=2)
    run = json.loads((out / ws.WARM_START_DIR / "run.json").read_text())
    assert run["model"] == str(base_dir.resolve()) and run["prompts"] == PROMPTS and run["gamma"] == 0.2
    assert run["seed"] == 3 and run["gen_length"] == 8 and "rounds" not in run
