"""benchmarks/rl_curves.py's protocol statistic by hand: the area under the exact-match curve, the T = 1 accuracy and
zero-variance groups beside it, their standard errors over seeds, and the guard that keeps one arm's runs out of
another's."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

import benchmarks.common as common
import benchmarks.rl_curves as rc
from training.config import RLConfig


def test_curve_auc_is_the_trapezoid_mean_over_the_window():
    """(0, 0.2) -> (25, 0.4) -> (50, 0.4): 25 * 0.3 + 25 * 0.4 = 17.5, over 50 steps 0.35 (a rectangle rule from
    the left gives 0.30, from the right 0.40). A window ending between two points interpolates: (0, 0) -> (40, 0.4)
    over 0-20 is the triangle up to 0.2, mean 0.1; later points are ignored."""
    assert rc.curve_auc([(0, 0.2), (25, 0.4), (50, 0.4)], 50) == pytest.approx(0.35)
    assert rc.curve_auc([(25, 0.4), (0, 0.2), (50, 0.4), (75, 1.0)], 50) == pytest.approx(0.35)
    assert rc.curve_auc([(0, 0.0), (40, 0.4), (80, 0.0)], 20) == pytest.approx(0.1)
    assert rc.curve_auc([(0, 0.3), (300, 0.3)], 300) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="step 0"):
        rc.curve_auc([(25, 0.4), (50, 0.4)], 50)
    with pytest.raises(ValueError, match="ends at step 25"):
        rc.curve_auc([(0, 0.2), (25, 0.4)], 50)


def test_window_means_take_the_update_steps_inside_the_window():
    """Steps 1-2 of a window of 2: the eval-only record at step 0 and step 3 are left out."""
    recs = [{"step": 0, "eval_cd3_exact": 0.5},
            {"step": 1, "reward": 0.1, "accuracy": 0.25, "zero_variance_groups": 4},
            {"step": 2, "reward": 0.3, "accuracy": 0.50, "zero_variance_groups": 9},
            {"step": 3, "reward": 0.9, "accuracy": 1.00, "zero_variance_groups": 16}]
    assert rc.window_means(recs, 2) == {"t1_accuracy": pytest.approx(0.375), "zero_variance_groups": 6.5}
    with pytest.raises(ValueError):
        rc.window_means(recs[:1], 2)


def test_auc_comparison_by_hand():
    """AUCs d1 0.30/0.32/0.34 (sd 0.02), diffpo 0.40/0.43/0.46 (sd 0.03): SEs 0.02/sqrt3 and 0.03/sqrt3, difference
    0.11 with SE sqrt((0.0004 + 0.0009) / 3); the same mean/SE for the quantities beside it."""
    def run(auc, t1, zero):
        return {"auc": auc, "t1_accuracy": t1, "zero_variance_groups": zero}
    per_run = {"d1": {0: run(0.30, 0.5, 10), 1: run(0.32, 0.5, 11), 2: run(0.34, 0.8, 12)},
               "diffpo": {0: run(0.40, 0.6, 8), 1: run(0.43, 0.6, 8), 2: run(0.46, 0.6, 8)}}
    rows, diff = rc.auc_comparison(per_run, [0, 1, 2])
    d1, diffpo = rows
    assert (d1["algo"], d1["seeds"]) == ("d1", 3)
    assert d1["auc_mean"] == pytest.approx(0.32) and d1["auc_se"] == pytest.approx(0.02 / math.sqrt(3))
    assert diffpo["auc_mean"] == pytest.approx(0.43) and diffpo["auc_se"] == pytest.approx(0.03 / math.sqrt(3))
    assert d1["t1_accuracy_mean"] == pytest.approx(0.6) and d1["t1_accuracy_se"] == pytest.approx(0.1)
    assert d1["zero_variance_groups_se"] == pytest.approx(1 / math.sqrt(3)) and diffpo["zero_variance_groups_se"] == 0
    se = math.sqrt((0.0004 + 0.0009) / 3)
    assert diff == {"diffpo_minus_d1_auc": pytest.approx(0.11), "se_diff": pytest.approx(se),
                    "z": pytest.approx(0.11 / se)}


def test_paired_comparison_by_hand():
    """Per seed DiFFPO - d1: 0.10, 0.13, 0.04 (mean 0.09, sample sd sqrt(0.0021) = 0.0458..); the unpaired SE of
    the same numbers is larger, since the seeds move both algorithms together."""
    def run(auc):
        return {"auc": auc, "t1_accuracy": 0.0, "zero_variance_groups": 0}
    per_run = {"d1": {0: run(0.20), 1: run(0.30), 2: run(0.40)},
               "diffpo": {0: run(0.30), 1: run(0.43), 2: run(0.44)}}
    got = rc.paired_comparison(per_run, [0, 1, 2])
    se = math.sqrt(((0.10 - 0.09) ** 2 + (0.13 - 0.09) ** 2 + (0.04 - 0.09) ** 2) / 2 / 3)
    assert got == {"paired_diff": pytest.approx(0.09), "paired_se": pytest.approx(se),
                   "paired_z": pytest.approx(0.09 / se)}
    assert rc.auc_comparison(per_run, [0, 1, 2])[1]["se_diff"] > 2 * se
    # the order of the difference: d1 ahead gives a negative one
    assert rc.paired_comparison({"d1": per_run["diffpo"], "diffpo": per_run["d1"]}, [0, 1, 2])["paired_diff"] \
        == pytest.approx(-0.09)


def test_a_run_directory_trained_with_other_settings_is_refused(tmp_path, monkeypatch):
    """The p_mask 0.15 run under tag t is not continued as a p_mask 0 run; a file from before the estimator options
    (no is_numerator / tau_over) matches their defaults; a longer --max-steps continues a run."""
    monkeypatch.setattr(rc, "RUNS", tmp_path)
    trained = []
    monkeypatch.setattr(rc, "train_rl", lambda cfg: trained.append(cfg))
    out = tmp_path / "t" / "cd3-diffpo-s0"
    out.mkdir(parents=True)
    saved = {k: v for k, v in vars(RLConfig(algo="diffpo", output_dir=str(out), tasks="cd3", seed=0, max_steps=100,
                                            eval_every=25, save_every=25, eval_examples=1000, beta=0.0)).items()
             if k not in ("is_numerator", "tau_over")}
    (out / "rl_config.json").write_text(json.dumps(saved))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 100}) + "\n")
    args = SimpleNamespace(tag="t", model=None, eval_every=25, eval_examples=1000, lr=3e-5, num_generations=8,
                           prompts_per_step=16, num_iterations=4, temperature=1.0, beta=0.0, p_mask=0.15,
                           is_numerator="masked", tau_over="all")
    rc.run_one("cd3", "diffpo", 0, args, 200)
    assert [c.max_steps for c in trained] == [200] and trained[0].resume
    with pytest.raises(SystemExit, match=r"other settings \(p_mask, tau_over\)"):
        rc.run_one("cd3", "diffpo", 0, SimpleNamespace(**{**vars(args), "p_mask": 0.0, "tau_over": "answer"}), 200)
    assert len(trained) == 1


def fake_records(exact: list[float], t1: float, zero: float, eval_every: int = 2) -> list[dict]:
    """A run's metrics: an evaluation at step 0 and every ``eval_every`` steps (accuracy = exact + 0.05: partial
    credit), update steps with a constant T = 1 accuracy and zero-variance count."""
    steps = eval_every * (len(exact) - 1)
    recs = [{"step": 0, "rollouts": 0, "eval_cd3_accuracy": exact[0] + 0.05, "eval_cd3_exact": exact[0]}]
    for k in range(1, steps + 1):
        r = {"step": k, "rollouts": 10 * k, "reward": t1, "accuracy": t1, "zero_variance_groups": zero,
             "mean_is_weight": 1.0, "is_clip_fraction": 0.0}
        if k % eval_every == 0:
            r.update({"eval_cd3_accuracy": exact[k // eval_every] + 0.05, "eval_cd3_exact": exact[k // eval_every]})
        recs.append(r)
    return recs


def test_main_writes_the_auc_table_and_replot_rebuilds_it(tmp_path, monkeypatch):
    """Two seeds per algorithm, 4 steps evaluated every 2, window 4: the AUCs by hand in the JSON and the table,
    and ``--replot`` rebuilds the same tables from the JSON alone."""
    exact = {("d1", 0): [0.2, 0.2, 0.2], ("d1", 1): [0.2, 0.4, 0.4],
             ("diffpo", 0): [0.2, 0.6, 0.6], ("diffpo", 1): [0.2, 0.6, 1.0]}
    monkeypatch.setattr(rc, "run_one", lambda task, algo, seed, args, n: fake_records(exact[algo, seed], 0.5, 3))
    monkeypatch.setattr(rc, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)  # where save() writes
    monkeypatch.setattr(rc, "machine", lambda: "test")
    rc.main(["--tasks", "cd3", "--seeds", "0,1", "--max-steps", "4", "--eval-every", "2", "--tag", "x"])
    saved = json.loads((tmp_path / "rl" / "rl_curves_x.json").read_text())
    # trapezoids over 0-4, divided by 4: d1 0.2 and (0.3 + 0.4) / 2 = 0.35; diffpo 0.5 and (0.4 + 0.8) / 2 = 0.6
    aucs = {a: [saved["per_run"]["cd3"][a][s]["auc"] for s in ("0", "1")] for a in ("d1", "diffpo")}
    assert aucs == {"d1": [pytest.approx(0.2), pytest.approx(0.35)], "diffpo": [pytest.approx(0.5), pytest.approx(0.6)]}
    assert saved["per_run"]["cd3"]["d1"]["0"]["t1_accuracy"] == 0.5
    assert saved["accuracy"]["cd3"]["d1"]["1"] == [[0, 0.25], [20, 0.45], [40, 0.45]]
    assert saved["exact"]["cd3"]["d1"]["1"] == [[0, 0.2], [20, 0.4], [40, 0.4]]
    text = (tmp_path / "rl" / "rl_curves_x.md").read_text()
    diff, se = 0.55 - 0.275, math.hypot(0.075, 0.05)  # SE of two values = |a - b| / 2
    assert f"| cd3 | 0-4 | {diff:.3f} | {se:.3f} | {diff / se:.3f} |" in text
    # paired by seed: 0.5 - 0.2 = 0.3 and 0.6 - 0.35 = 0.25, mean 0.275, SE |0.3 - 0.25| / 2 = 0.025, z 11
    assert "| cd3 | 0-4 | 0.275 | 0.025 | 11.000 |" in text
    assert "](rl_curves_x.png)" in text
    # the plotted curve is exact match: d1's finals 0.2 and 0.4 (mean 0.3, sd 0.141), its mean curve's best 0.3;
    # the accuracy table has the same runs with the partial credit (finals 0.25 and 0.45)
    assert "| task | algo | seeds | rollouts | final_exact_mean | final_exact_sd | best_mean |" in text
    assert "| cd3 | d1 | 2 | 40 | 0.300 | 0.141 | 0.300 |" in text
    assert "| cd3 | d1 | 2 | 40 | 0.350 | 0.141 | 0.350 |" in text
    rc.main(["--tasks", "cd3", "--seeds", "0,1", "--max-steps", "4", "--eval-every", "2", "--tag", "x", "--replot"])
    again = (tmp_path / "rl" / "rl_curves_x.md").read_text()
    def tables(md):  # everything after the header line, up to the provenance footer
        return md.split("\n\n", 2)[2].split("\n---\n")[0]
    assert tables(again) == tables(text)
    older = {k: v for k, v in saved.items() if k != "exact"}  # a file from before the exact curves: accuracy plotted
    (tmp_path / "rl" / "rl_curves_x.json").write_text(json.dumps(older))
    rc.main(["--tasks", "cd3", "--seeds", "0,1", "--max-steps", "4", "--eval-every", "2", "--tag", "x", "--replot"])
    old = (tmp_path / "rl" / "rl_curves_x.md").read_text()
    assert "Exact match along the curve" not in old and "| cd3 | d1 | 2 | 40 | 0.350 | 0.141 | 0.350 |" in old
    assert "d1 runs are those of" not in text
    rc.main(["--tasks", "cd3", "--seeds", "0,1", "--max-steps", "4", "--eval-every", "2", "--tag", "x-opt",
             "--d1-tag", "x", "--is-numerator", "unmasked"])
    opt = (tmp_path / "rl" / "rl_curves_x-opt.md").read_text()
    assert "IS numerator unmasked" in opt and "The d1 runs are those of `x` (d1 reads neither estimator option)" in opt


def test_a_d1_tag_reuses_that_arms_d1_runs_whatever_diffpos_options(tmp_path, monkeypatch):
    """--d1-tag: an option arm's d1 runs are the primary arm's (trained there, continued there), since d1 never reads
    --is-numerator / --tau-over; DiFFPO's runs stay under the arm's own tag, and a d1 run with another p_mask is
    still refused."""
    monkeypatch.setattr(rc, "RUNS", tmp_path)
    trained = []

    def train(cfg):  # a finished run: its config and last step on disk
        trained.append(cfg)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "rl_config.json").write_text(json.dumps(vars(cfg)))
        (Path(cfg.output_dir) / "metrics.jsonl").write_text(json.dumps({"step": cfg.max_steps}) + "\n")

    monkeypatch.setattr(rc, "train_rl", train)
    out = tmp_path / "base-arm" / "cd3-d1-s0"
    out.mkdir(parents=True)
    cfg = RLConfig(algo="d1", output_dir=str(out), tasks="cd3", seed=0, max_steps=100, eval_every=25, save_every=25,
                   eval_examples=1000, beta=0.0, p_mask=0.0)
    (out / "rl_config.json").write_text(json.dumps(vars(cfg)))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 100}) + "\n")
    args = SimpleNamespace(tag="opt", d1_tag="base-arm", model=None, eval_every=25, eval_examples=1000, lr=3e-5,
                           num_generations=8, prompts_per_step=16, num_iterations=4, temperature=1.0, beta=0.0,
                           p_mask=0.0, is_numerator="unmasked", tau_over="answer")
    assert rc.run_one("cd3", "d1", 0, args, 100) == [{"step": 100}] and trained == []  # complete there: read
    rc.run_one("cd3", "d1", 0, args, 200)
    rc.run_one("cd3", "diffpo", 0, args, 200)
    assert [(Path(c.output_dir).parent.name, c.algo, c.is_numerator) for c in trained] == [
        ("base-arm", "d1", "unmasked"), ("opt", "diffpo", "unmasked")]
    with pytest.raises(SystemExit, match=r"other settings \(p_mask\)"):
        rc.run_one("cd3", "d1", 0, SimpleNamespace(**{**vars(args), "p_mask": 0.15}), 200)
    # without --d1-tag the d1 run is the arm's own
    rc.run_one("cd3", "d1", 0, SimpleNamespace(**{**vars(args), "d1_tag": None}), 200)
    assert Path(trained[-1].output_dir).parent.name == "opt"


def test_settings_changed_frees_diffpos_options_for_d1_only():
    saved = vars(RLConfig(algo="d1"))
    assert rc.settings_changed(saved, RLConfig(algo="d1", is_numerator="unmasked", tau_over="answer")) == []
    assert rc.settings_changed({**saved, "algo": "diffpo"}, RLConfig(algo="diffpo", is_numerator="unmasked",
                                                                     tau_over="answer")) == ["is_numerator", "tau_over"]
    assert rc.settings_changed(saved, RLConfig(algo="d1", p_mask=0.0, max_steps=5)) == ["p_mask"]
