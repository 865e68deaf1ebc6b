"""The pure helpers of the benchmark scripts (the scripts themselves are run on purpose, not in CI)."""

import json
import math
import re
import time

import pytest
import torch

from benchmarks.pareto import mixed_rows, parse_models


def test_parse_models_expands_all_tasks_and_keeps_task_entries():
    entries = parse_models("sft=a,d1@countdown=b,d1@sudoku=c", ["sudoku", "countdown"])
    assert entries == [("sft", "sudoku", "a"), ("sft", "countdown", "a"), ("d1", "countdown", "b"),
                       ("d1", "sudoku", "c")]


@pytest.mark.parametrize("spec", ["sft", "=a", "x@gsm8k=a"])
def test_parse_models_rejects_bad_entries(spec):
    with pytest.raises(SystemExit, match="--models"):
        parse_models(spec, ["sudoku", "countdown"])


def test_mixed_rows_average_settings_present_on_every_task():
    rows = [{"model": "m", "task": "sudoku", "setting": "eb 0.3", "accuracy": 0.9, "exact": 0.8, "mean_nfe": 2.0},
            {"model": "m", "task": "countdown", "setting": "eb 0.3", "accuracy": 0.3, "exact": 0.2, "mean_nfe": 7.0},
            {"model": "m", "task": "countdown", "setting": "learned", "accuracy": 0.3, "exact": 0.2, "mean_nfe": 5.0}]
    mixed = mixed_rows(rows, ["sudoku", "countdown"])
    assert len(mixed) == 1  # `learned` ran on one task only: no mixed point
    assert mixed[0]["setting"] == "eb 0.3" and mixed[0]["task"] == "mixed"
    assert mixed[0]["accuracy"] == pytest.approx(0.6) and mixed[0]["mean_nfe"] == pytest.approx(4.5)


def test_oracle_takes_each_prompts_best_reward_then_fewest_nfe():
    from benchmarks.pareto import oracle_row
    per_setting = {"steps=16": [{"reward": 1.0, "nfe": 16}] * 3,  # not a gamma: ignored
                   "eb 0.1": [{"reward": 1.0, "nfe": 8}, {"reward": 0.0, "nfe": 8}, {"reward": 0.5, "nfe": 6}],
                   "eb 1.0": [{"reward": 1.0, "nfe": 3}, {"reward": 1.0, "nfe": 4}, {"reward": 0.0, "nfe": 2}]}
    row = oracle_row("m", "countdown", per_setting)
    assert row["accuracy"] == pytest.approx(2.5 / 3) and row["exact"] == pytest.approx(2 / 3)
    assert row["mean_nfe"] == pytest.approx((3 + 4 + 6) / 3)


def test_front_mixes_two_fixed_points_across_prompts():
    from benchmarks.oracle_head import front_at
    points = [(1.0, 0.1), (4.0, 0.4), (8.0, 0.5), (5.0, 0.2)]
    assert front_at(points, 2.0) == pytest.approx(0.2)  # between (1, 0.1) and (4, 0.4)
    assert front_at(points, 6.0) == pytest.approx(0.45)  # the hull skips the dominated (5, 0.2)
    assert front_at(points, 9.0) == pytest.approx(0.5)  # beyond the last point: the best one reached


def test_thread_cpu_sees_this_threads_work():
    import os
    import threading

    from benchmarks.server_load import thread_cpu
    tid = threading.get_native_id()
    before = thread_cpu(os.getpid())[tid]
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn CPU on this thread only
        pass
    assert thread_cpu(os.getpid())[tid] - before >= 0.2


def test_cores_busy_sees_work_on_the_given_core_only():
    import os

    from benchmarks.server_load import cores_busy
    core = min(os.sched_getaffinity(0))
    before, before_all = cores_busy({core}), cores_busy(None)
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:  # burn CPU on that core only
            pass
    finally:
        os.sched_setaffinity(0, saved)
    busy, total = (a - b for a, b in zip(cores_busy({core}), before))
    assert busy >= 0.2 * os.sysconf("SC_CLK_TCK") and 0 < busy <= total
    assert cores_busy(None)[1] - before_all[1] >= total  # all cores count at least that core's time
    assert cores_busy({10_000}) == (0, 0)  # a core that does not exist contributes nothing


def test_batcher_without_http_decodes_every_prompt_once():
    from benchmarks.server_load import batcher_no_http
    out = batcher_no_http(batch_size=4, n=12, clients=3)
    assert out["requests"] == 12
    assert 12 <= out["output_tok_s"] * out["requests"] / out["req_s"] <= 12 * 16  # 1-16 tokens per request


def test_batch_dependent_counts_rows_whose_output_changes_with_the_batch(model, tokenizer):
    import torch.nn as nn

    from benchmarks.common import batch_dependent
    from conftest import EOS, MASK, PAD
    from diffpo_serve.dllm.loading import LoadedModel
    from diffpo_serve.dllm.sampler import SamplingParams

    class BatchSensitive(nn.Module):
        """The tiny model, plus a logit bonus for token 7 at every position whenever it decodes >1 row."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, *args, **kwargs):
            out = self.inner(input_ids, *args, **kwargs)
            if input_ids.shape[0] > 1:
                out.logits[..., 7] += 100.0
            return out

    loaded = LoadedModel(model, tokenizer, MASK, PAD, EOS, "tiny", "tiny", 512)
    prompts = [[5 + i, 9, 11 + i] for i in range(6)]
    params = SamplingParams("eb", 8, threshold=0.3)
    assert batch_dependent(loaded, prompts, params, batch=3) == 0  # float32: each row as if alone
    sensitive = LoadedModel(BatchSensitive(model), tokenizer, MASK, PAD, EOS, "tiny", "tiny", 512)
    assert batch_dependent(sensitive, prompts, params, batch=3) == 6
    assert batch_dependent(sensitive, prompts, params, batch=1) == 0  # batches of one are alone


# ----------------------------------------------------------------------------- benchmarks/step_policy.py

def test_eb_nfe_at_accuracy_mixes_two_fixed_points():
    from benchmarks.step_policy import nfe_at_accuracy
    front = [(1.0, 0.5), (4.0, 0.8), (16.0, 0.9), (8.0, 0.7)]
    assert nfe_at_accuracy(front, 0.5) == pytest.approx(1.0)
    assert nfe_at_accuracy(front, 0.6) == pytest.approx(2.0)  # a third of the prompts at 4 passes, the rest at 1
    assert nfe_at_accuracy(front, 0.85) == pytest.approx(10.0)
    assert nfe_at_accuracy(front, 0.95) != nfe_at_accuracy(front, 0.95)  # unreachable: nan


def test_step_policy_summary_compares_within_one_standard_error():
    from benchmarks.step_policy import summarise, summary_rows
    s = summarise([{"reward": 1.0, "nfe": 2}, {"reward": 0.0, "nfe": 4}, {"reward": 1.0, "nfe": 3}])
    assert s["accuracy"] == pytest.approx(2 / 3) and s["mean_nfe"] == pytest.approx(3.0)
    assert s["se"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5)  # sample std sqrt(1/3), over sqrt(n)
    rows = [{"task": "t", "name": "eb", "sampler": "eb", "setting": "a", "accuracy": 0.50, "se": 0.02, "mean_nfe": 8},
            {"task": "t", "name": "eb", "sampler": "eb", "setting": "b", "accuracy": 0.49, "se": 0.02, "mean_nfe": 4},
            {"task": "t", "name": "eb", "sampler": "eb", "setting": "c", "accuracy": 0.40, "se": 0.02, "mean_nfe": 1},
            {"task": "t", "name": "p", "sampler": "policy", "setting": "x", "accuracy": 0.485, "se": 0.02,
             "mean_nfe": 3},
            {"task": "t", "name": "p", "sampler": "policy", "setting": "y", "accuracy": 0.45, "se": 0.02,
             "mean_nfe": 2}]
    (row,) = summary_rows(rows)
    assert (row["setting"], row["eb_setting"]) == ("x", "b")  # y is more than one SE below 0.50
    assert row["fewer_nfe"] == pytest.approx(0.25)
    assert row["of_oracle"] != row["of_oracle"]  # no oracle row: nan
    oracle = {"task": "t", "name": "oracle", "sampler": "oracle", "setting": "o", "accuracy": 0.49, "se": 0.02,
              "mean_nfe": 1.5}
    rows2 = rows + [oracle, {**oracle, "task": "u", "mean_nfe": 9}] + [{**r, "task": "u"} for r in rows]
    got = {(r["task"], r["name"]): r for r in summary_rows(rows2)}
    # the oracle saves 1 - 1.5 / 4 = 0.625 against gamma b; p saves 0.25 of that: 0.4
    assert got["t", "oracle"]["of_oracle"] == pytest.approx(1.0)
    assert got["t", "p"]["of_oracle"] == pytest.approx(0.25 / 0.625)
    assert got["u", "p"]["of_oracle"] != got["u", "p"]["of_oracle"]  # an oracle slower than the front: nan


def test_step_oracle_with_full_step_answers_commits_them(model):
    """On a tiny model, the oracle's decode reproduces every full-step answer (a bound that holds by
    construction) in no more passes than full steps, and in fewer on some prompt."""
    from types import SimpleNamespace

    from benchmarks.step_policy import oracle_decode
    from conftest import EOS, MASK, PAD
    from diffpo_serve.dllm.sampler import SamplingParams, generate

    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [20, 21, 22, 23]]
    full = generate(model, prompts, SamplingParams("steps", 8), mask_id=MASK, eos_id=EOS, pad_id=PAD)
    loaded = SimpleNamespace(model=model, mask_id=MASK, eos_id=EOS, pad_id=PAD, device="cpu",
                             encode=lambda text: [int(t) for t in text.split()],
                             decode=lambda ids: (" ".join(map(str, ids)), False))
    task = SimpleNamespace(reward=lambda text, ex: float(text == ex["answer"]))
    data = [{"prompt": " ".join(map(str, p)), "answer": " ".join(map(str, a))}
            for p, a in zip(prompts, full.sequences.tolist())]
    rows = oracle_decode(loaded, task, data, 8, 3)  # batches of 3: the oracle pads and stops rows like the sampler
    assert [r["reward"] for r in rows] == [1.0] * 4
    assert all(1 <= r["nfe"] <= int(n) for r, n in zip(rows, full.nfe))
    assert sum(r["nfe"] for r in rows) < int(full.nfe.sum())


def test_prompt_cache_computes_a_miss_once_and_merges_with_other_writers(tmp_path):
    from benchmarks.step_policy import PromptCache
    path = tmp_path / "cache.json"
    calls = []
    a = PromptCache(str(path))
    assert a.get("k1", lambda: calls.append(1) or [{"reward": 1.0, "nfe": 2}]) == [{"reward": 1.0, "nfe": 2}]
    assert a.get("k1", lambda: calls.append(2) or []) == [{"reward": 1.0, "nfe": 2}] and calls == [1]
    b = PromptCache(str(path))  # a second process: reads k1, adds k2
    assert b.get("k1", lambda: calls.append(3) or []) == [{"reward": 1.0, "nfe": 2}] and calls == [1]
    b.get("k2", lambda: [{"reward": 0.0, "nfe": 4}])
    a.get("k3", lambda: [{"reward": 0.5, "nfe": 1}])  # a writes after b: b's k2 survives
    assert set(json.loads(path.read_text())) == {"k1", "k2", "k3"}
    assert PromptCache(None).get("k", lambda: [7]) == [7]  # no file: computed


def _fill_cache(path: str, prefix: str) -> None:
    from benchmarks.step_policy import PromptCache
    cache = PromptCache(path)
    for i in range(200):
        cache.get(f"{prefix}{i}", lambda: [{"reward": 1.0, "nfe": i}])


def test_prompt_cache_shared_by_processes_writing_at_once_loses_nothing(tmp_path):
    """Two benchmark processes on one cache file (a run once crashed here: both wrote through one temporary
    file): every key of both survives and the file stays readable."""
    import multiprocessing
    path = str(tmp_path / "cache.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_fill_cache, args=(path, p)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert set(json.loads((tmp_path / "cache.json").read_text())) == {f"{p}{i}" for p in "ab" for i in range(200)}


def test_prompt_key_names_the_test_set_as_saved_caches_do():
    from benchmarks.step_policy import prompt_key
    assert prompt_key("cd3", 1000, 0, "runs/base", "eb", "gamma 1") == "cd3|1000|runs/base|eb|gamma 1"
    assert prompt_key("cd3", 2000, 2, "runs/base", "eb", "gamma 1") == "cd3|2000@2|runs/base|eb|gamma 1"


# ----------------------------------------------------------------------------- benchmarks/joint_policy.py

def _row(model, sampler, setting, acc, nfe, se=0.02, task="t"):
    return {"task": task, "model": model, "sampler": sampler, "setting": setting, "accuracy": acc, "se": se,
            "mean_nfe": nfe}


def test_joint_equal_accuracy_measures_every_series_against_every_reference_front():
    from benchmarks.joint_policy import equal_accuracy
    rows = [_row("start", "eb", "g1", 0.60, 8), _row("start", "eb", "g2", 0.59, 5), _row("start", "eb", "g3", 0.50, 2),
            _row("start", "steps", "s", 0.61, 16),  # full steps are not part of a fixed-gamma front
            _row("fast", "eb", "g1", 0.55, 4, se=0.01), _row("fast", "eb", "g2", 0.545, 3, se=0.01),
            _row("joint", "policy", "k1", 0.585, 3), _row("joint", "policy", "k2", 0.55, 2),
            _row("joint", "policy", "k3", 0.53, 1)]
    got = {(r["reference"], r["model"], r["sampler"]): r for r in equal_accuracy(rows)}
    assert set(got) == {("start", "fast", "eb"), ("start", "joint", "policy"), ("fast", "start", "eb"),
                        ("fast", "joint", "policy")}
    r = got[("start", "joint", "policy")]  # target 0.60 - 0.02: k1 (0.585) reaches it, k2 does not
    assert (r["target"], r["ref_setting"], r["ref_mean_nfe"]) == (pytest.approx(0.58), "g2", 5)
    assert (r["setting"], r["fewer_nfe"]) == ("k1", pytest.approx(1 - 3 / 5))
    r = got[("start", "fast", "eb")]  # fast's best (0.55) is below the target: none, with its best accuracy
    assert r["setting"] == "none" and r["accuracy"] == 0.55 and r["fewer_nfe"] != r["fewer_nfe"]
    r = got[("fast", "joint", "policy")]  # target 0.55 - 0.01 = 0.54; fast's cheapest there g2 (3 passes)
    assert (r["ref_setting"], r["setting"], r["fewer_nfe"]) == ("g2", "k2", pytest.approx(1 - 2 / 3))
    r = got[("fast", "start", "eb")]  # start's cheapest gamma at or above 0.54 is g2 (5 passes): 2/3 more
    assert (r["setting"], r["fewer_nfe"]) == ("g2", pytest.approx(1 - 5 / 3))


def test_joint_pooled_stream_needs_every_task_and_pools_prompts():
    from benchmarks.step_policy import mixed
    rows = [_row("m", "eb", "g", 0, 0, task="a"), _row("m", "eb", "g", 0, 0, task="b"),
            _row("m", "eb", "h", 0, 0, task="a")]  # h only on task a: not in the stream
    per = {("a", "m", "eb", "g"): [{"reward": 1.0, "nfe": 1}], ("b", "m", "eb", "g"): [{"reward": 0.0, "nfe": 3},
                                                                                      {"reward": 0.5, "nfe": 2}],
           ("a", "m", "eb", "h"): [{"reward": 1.0, "nfe": 1}]}
    (row,) = mixed(rows, ["a", "b"], per, by="model")
    assert (row["task"], row["setting"]) == ("mixed", "g")
    assert row["accuracy"] == pytest.approx(0.5) and row["mean_nfe"] == pytest.approx(2.0)


def test_memory_arithmetic_counts_and_formulas():
    """benchmarks/memory_8b.py: LLaDA-8B's parameter and LoRA counts by hand, and the activation formulas
    equal to the bytes autograd saves in a small bf16 LLaDA block (frozen base, and LoRA's addition)."""
    from benchmarks.memory_8b import LLADA_8B, counts, measure_small, table
    d, m, v, n, r = 4096, 12288, 126464, 32, 128
    per_layer = 4 * d * d + 3 * d * m + 2 * d  # q k v attn_out, ff_proj up_proj ff_out, two norms
    assert counts(LLADA_8B, r) == {"params": 2 * v * d + n * per_layer + d,  # wte, ff_out (untied), ln_f
                                   "lora_params": n * r * (4 * 2 * d + 3 * (d + m)),
                                   "block_linear_params": n * (4 * d * d + 3 * d * m)}
    check = measure_small()
    assert check["base"] == check["formula_base"]
    assert check["lora"] - check["base"] == check["formula_lora"]
    b = table(rows_per_pass=6, prompt=256, gen=256, rank=r)["bytes"]
    tokens = 6 * 512
    assert b["activations_no_checkpointing"] == tokens * n * b["activation_bytes_per_token_layer"]
    assert b["activations_checkpointing"] == tokens * n * 2 * d + tokens * b["activation_bytes_per_token_layer"]
    assert b["logits"] == 6 * (512 * v * 2 + 2 * 256 * v * 4)
    assert b["adamw_state_fp32"] == 2 * b["lora_fp32"] == 8 * counts(LLADA_8B, r)["lora_params"]


def test_step_memory_fit_is_the_least_squares_line():
    from benchmarks.step_memory import fit
    assert fit([(1, 5), (2, 7), (4, 11)], 32) == pytest.approx(2 * 32 + 3)  # y = 2x + 3 exactly
    assert fit([(1, 1), (2, 3), (3, 2)], 4) == pytest.approx(3.0)  # slope 0.5, through the mean (2, 2)


def test_kv_cache_speed_runs_every_mode_on_the_tiny_preset():
    import argparse

    from benchmarks.kv_cache import speed
    args = argparse.Namespace(preset="tiny", device="cpu", dtype="float32", batch_sizes="2", prompt=8, gen=8,
                              block=4, steps=4, runs=1)
    rows = speed(args)
    assert [r["cache"] for r in rows] == ["off", "prefix", "dual"]
    off = rows[0]
    assert off["speedup"] == 1.0 and off["same_tokens_as_off"] == 1.0
    assert all(r["tokens_per_s"] == pytest.approx(2 * 8 / r["seconds"]) for r in rows)
    assert all(0 < r["logits_share"] < 1 for r in rows)
    assert off["ceiling_logits_kept"] == pytest.approx(1.0)  # off against itself: columns ratio 1


def test_kv_cache_logits_kept_ceiling_by_hand():
    """off 10 s of which 2 s logits; a mode with columns ratio 4 and 3 s of logits: 10 / (3 + 8 / 4) = 2."""
    from benchmarks.kv_cache import logits_kept_ceiling
    assert logits_kept_ceiling(10.0, 2.0, 3.0, 4.0) == pytest.approx(2.0)
    assert logits_kept_ceiling(10.0, 0.0, 0.0, 4.0) == pytest.approx(4.0)  # no logits: the columns ratio


def test_layer_timer_counts_only_the_modules_forward(monkeypatch):
    """A fake clock that advances 1 s per reading outside the module and 10 s per reading inside it: the
    timer sums the two forwards' (stop - start) and nothing between them."""
    import benchmarks.kv_cache as kv
    now = {"t": 0.0}

    class Clock:
        @staticmethod
        def perf_counter():
            return now["t"]

    class Slow(torch.nn.Module):
        def forward(self, x):
            now["t"] += 10.0  # the module's own work
            return x

    monkeypatch.setattr(kv, "time", Clock)
    slow = Slow()
    timer = kv.LayerTimer(slow, cuda=False)
    now["t"] += 5.0  # outside the module: not counted
    slow(torch.zeros(1))
    now["t"] += 7.0
    slow(torch.zeros(1))
    assert timer.seconds == 20.0


def test_kv_cache_ceiling_counts_columns_by_hand():
    """prompt 4, gen 8, block 4, 4 passes (2 per block): off runs 4 x 12 columns. prefix: block 0 = 12 + 8,
    block 1 = 12 + 4 -> 48 / 36. dual: 12 + 4 per block -> 48 / 32."""
    from benchmarks.kv_cache import columns_ratio
    assert columns_ratio("off", 4, 8, 4, 4) == 1.0
    assert columns_ratio("prefix", 4, 8, 4, 4) == pytest.approx(48 / 36)
    assert columns_ratio("dual", 4, 8, 4, 4) == pytest.approx(48 / 32)
    # one pass per block: every pass is a refresh, nothing to skip
    assert columns_ratio("dual", 4, 8, 4, 2) == 1.0


def test_rl_curves_comparison_by_hand():
    """base = mean of the six step-0 points; finals d1 0.30/0.32/0.34 (mean 0.32, var 0.0004), diffpo
    0.40/0.42/0.44 (mean 0.42, var 0.0004): spread sqrt(0.0008 / 3) = 0.01633; binomial with N = 2000:
    sqrt((0.32 * 0.68 + 0.42 * 0.58) / 6000) = 0.008658 < spread -> z = 0.10 / 0.01633 = 6.12."""
    from benchmarks.rl_curves import comparison
    d1 = {0: [(0, 0.20), (9, 0.30)], 1: [(0, 0.22), (9, 0.32)], 2: [(0, 0.24), (9, 0.34)]}
    diffpo = {0: [(0, 0.20), (9, 0.40)], 1: [(0, 0.22), (9, 0.42)], 2: [(0, 0.24), (9, 0.44)]}
    c = comparison(d1, diffpo, [0, 1, 2], 2000)
    assert c["base"] == pytest.approx(0.22)
    assert c["diffpo_gain"] == pytest.approx(0.20) and c["diffpo_minus_d1"] == pytest.approx(0.10)
    assert c["se_diff"] == pytest.approx(math.sqrt(0.0008 / 3))
    assert c["z"] == pytest.approx(0.10 / math.sqrt(0.0008 / 3))
    # seeds that agree exactly: the test set's noise is the floor
    flat = {s: [(0, 0.2), (9, 0.5)] for s in range(3)}
    c = comparison(flat, flat, [0, 1, 2], 100)
    assert c["se_diff"] == pytest.approx(math.sqrt(2 * 0.25 / 300)) and c["z"] == 0.0


def test_rl_curves_reads_one_record_per_step_the_last_logged():
    from benchmarks.rl_curves import curve_records

    text = "\n".join(json.dumps(r) for r in [{"step": 0, "a": 1}, {"step": 0, "a": 2}, {"step": 200, "a": 3},
                                             {"step": 100, "a": 4}, {"step": 300, "a": 5}])
    assert curve_records(text, 200) == [{"step": 0, "a": 2}, {"step": 100, "a": 4}, {"step": 200, "a": 3}]


def test_rl_curves_algos_trains_only_those_and_writes_no_partial_table(monkeypatch, tmp_path, capsys):
    """``--algos diffpo`` (one process per algorithm, to use two cores) trains only DiFFPO's runs, for every
    seed, and writes no table from half a comparison; an unknown algorithm is a usage error."""
    import benchmarks.rl_curves as rc
    trained = []
    monkeypatch.setattr(rc, "run_one", lambda task, algo, seed, args, n: trained.append((task, algo, seed)) or [])
    monkeypatch.setattr(rc, "RESULTS", tmp_path)
    rc.main(["--tasks", "cd3", "--seeds", "0,2", "--algos", "diffpo"])
    assert trained == [("cd3", "diffpo", 0), ("cd3", "diffpo", 2)]
    assert list(tmp_path.iterdir()) == [] and "no table" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        rc.main(["--algos", "ppo"])
    assert len(trained) == 2


def test_rl_curves_training_signal_by_hand():
    """First and last ``window`` update steps (eval-only records, without a reward, are skipped)."""
    from benchmarks.rl_curves import training_signal
    recs = [{"step": 0, "eval_cd3_accuracy": 0.5}]
    recs += [{"step": k, "reward": r, "zero_variance_groups": z, "mean_is_weight": w, "is_clip_fraction": c}
             for k, (r, z, w, c) in enumerate([(0.1, 4, 1.0, 0.0), (0.3, 6, 0.8, 0.1), (0.5, 8, 0.6, 0.02),
                                               (0.9, 12, 0.4, 0.04)], 1)]
    assert training_signal(recs, window=2) == {
        "reward_first": pytest.approx(0.2), "reward_last": pytest.approx(0.7),
        "zero_variance_groups_first": 5, "zero_variance_groups_last": 10, "mean_is_weight_last": pytest.approx(0.5),
        "is_clip_fraction_last": pytest.approx(0.03)}


def test_rl_curves_summary_by_hand():
    """Mean over seeds per point, the final accuracy's sample sd (n - 1, not the population's), the best mean."""
    from benchmarks.rl_curves import mean_curve, summary
    runs = {0: [(0, 0.20), (80, 0.30), (160, 0.26)],
            1: [(0, 0.20), (80, 0.34), (160, 0.28)],
            2: [(0, 0.20), (80, 0.32), (160, 0.33)]}
    assert mean_curve(runs, [0, 1, 2]) == ([0, 80, 160], pytest.approx([0.20, 0.32, 0.29]))
    row = summary(runs, [0, 1, 2])
    assert row["rollouts"] == 160 and row["seeds"] == 3
    assert row["final_acc_mean"] == pytest.approx(0.29)
    assert row["final_acc_sd"] == pytest.approx((((0.26 - 0.29) ** 2 + 0.01 ** 2 + 0.04 ** 2) / 2) ** 0.5)
    assert row["best_mean"] == pytest.approx(0.32)


def test_diffusion_gemma_benchmark_smoke():
    """benchmarks/diffusion_gemma.py at a toy size: it runs, and the batched decoder is token-identical to
    transformers' generate one prompt at a time (the same seeds)."""
    from benchmarks.diffusion_gemma import main
    rows = main(["--prompts", "4", "--batch-sizes", "2,4", "--runs", "1", "--gen-length", "12", "--steps", "3",
                 "--canvas", "8", "--hidden", "32", "--layers", "2", "--vocab", "64", "--no-save"])
    assert [r["batch_size"] for r in rows] == [2, 4]
    assert all(r["outputs_identical"] and r["decoder_passes_per_s"] > 0 and r["speedup"] > 0 for r in rows)


def test_policy_cost_pairs_the_steps_and_takes_the_median_ratio(monkeypatch):
    """A fake clock: the eb step of the k-th call takes 1 + 0.1 k seconds (drifting) and the policy step 5 %
    more than the eb step of the same pair, so the paired median share is 0.05 whatever the drift (eb and
    policy swapped would give -0.048); inside the policy step the sampler's policy part takes 0.03 of the
    eb step, so its share of the rest of that step is 0.03 / 1.02 (of the whole step, 0.03 / 1.05, would
    be wrong), and the sampler's own part is back in place afterwards."""
    from types import SimpleNamespace

    import benchmarks.step_policy as sp

    clock, calls = [0.0], [0]
    real_part = sp.sampler_module._policy_step

    def fake_step(model, state):  # the n-th call belongs to pair n // 2 (the warm-up pair first)
        base = 1 + 0.1 * (calls[0] // 2)
        calls[0] += 1
        if state == "policy":
            clock[0] += 1.02 * base
            sp.sampler_module._policy_step(base)
        else:
            clock[0] += base

    def fake_part(base):
        clock[0] += 0.03 * base

    monkeypatch.setattr(sp.sampler_module, "_policy_step", fake_part)

    monkeypatch.setattr(sp, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(sp, "init_state", lambda prompts, params, **kw: params.sampler)
    monkeypatch.setattr(sp, "denoise_step", fake_step)
    loaded = SimpleNamespace(encode=lambda text: [1, 2], mask_id=0, eos_id=1, pad_id=2, device="cpu", model=None)
    cost = sp.policy_cost(loaded, None, [{"prompt": "x"}] * 4, gen=8, batch=4, repeats=5)
    assert cost["rows"] == 4
    assert cost["policy_share"] == pytest.approx(0.05)
    assert cost["policy_step_ms"] == pytest.approx(1.05 * cost["eb_step_ms"], rel=0.2)
    assert cost["policy_part"] == pytest.approx(0.03 / 1.02)
    assert sp.sampler_module._policy_step is fake_part and fake_part is not real_part


# ----------------------------------------------------------------------------- provenance of result files


def test_model_checksum_is_sha256_of_the_weight_files_by_name(tmp_path):
    import hashlib
    from benchmarks import common
    (tmp_path / "b.safetensors").write_bytes(b"BBB")
    (tmp_path / "a.safetensors").write_bytes(b"AA")
    (tmp_path / "config.json").write_text("{}")  # not a weight file: not hashed
    expected = hashlib.sha256(b"a.safetensors" + b"AA" + b"b.safetensors" + b"BBB").hexdigest()[:16]
    assert common.model_checksum(tmp_path) == expected
    (tmp_path / "config.json").write_text('{"changed": 1}')
    assert common.model_checksum(tmp_path) == expected
    (tmp_path / "a.safetensors").write_bytes(b"AB")
    assert common.model_checksum(tmp_path) != expected
    empty = tmp_path / "empty"
    empty.mkdir()
    assert common.model_checksum(empty) == "no weights"


def test_save_records_provenance_and_load_saved_strips_it(tmp_path, monkeypatch):
    from benchmarks import common
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "LOADED_MODELS", {})
    loaded = common.load_model()  # the bundled model, recorded with its checksum
    assert common.LOADED_MODELS == {str(loaded.path): common.model_checksum(loaded.path)}
    monkeypatch.setattr(common, "git_commit", lambda: "abc1234")
    monkeypatch.setattr("sys.argv", ["benchmarks/x.py", "--n", "5", "--name", "a b"])
    common.save("topic/rows", "# table\n", [{"x": 1}])
    common.save("topic/dict", "# table\n", {"x": 1})
    md = (tmp_path / "topic" / "rows.md").read_text()
    assert md.startswith("# table\n\n---\nProvenance: commit abc1234, ")
    assert "--n 5 --name 'a b'" in md and common.model_checksum(loaded.path) in md and common.machine() in md
    assert re.search(r"load average \d+\.\d\d / \d+\.\d\d / \d+\.\d\d over 1 / 5 / 15 min at the save; models", md)
    rows = json.loads((tmp_path / "topic" / "rows.json").read_text())
    assert rows["rows"] == [{"x": 1}] and rows["provenance"]["commit"] == "abc1234"
    assert rows["provenance"]["models"] == {str(loaded.path): common.model_checksum(loaded.path)}
    assert common.load_saved("topic/rows") == [{"x": 1}]
    assert common.load_saved("topic/dict") == {"x": 1}
    (tmp_path / "old.json").write_text('[{"x": 2}]')  # a file written before provenance reads as it was
    assert common.load_saved("old") == [{"x": 2}]


def test_provenance_names_the_commit_a_run_started_at_when_the_checkout_moved(monkeypatch):
    """A long benchmark whose checkout gets a new commit while it runs records both: the code it imported is the
    one it started at."""
    from benchmarks import common
    monkeypatch.setattr(common, "git_commit", lambda: "bbb2222")
    monkeypatch.setattr(common, "COMMIT_AT_START", "bbb2222")
    assert "commit_at_start" not in common.provenance()
    assert "started at" not in common.provenance_text(common.provenance())
    monkeypatch.setattr(common, "COMMIT_AT_START", "aaa1111")
    info = common.provenance()
    assert info["commit"] == "bbb2222" and info["commit_at_start"] == "aaa1111"
    assert "Provenance: commit bbb2222, " in common.provenance_text(info)
    assert f"{info['date']} (the run started at aaa1111)" in common.provenance_text(info)
