"""d1 vs DiFFPO: greedy test accuracy against rollouts, and the area under the exact-match curve.

For each task and seed, trains both algorithms with identical budgets (same prompts per step, G,
mu, learning rate, p_mask, steps) and evaluates greedy full-step accuracy on held-out test prompts every
``--eval-every`` steps. Runs are kept under runs/bench_rl/TAG/ and skipped when already complete (a run
that stopped resumes from its checkpoint; one whose saved settings differ from the command's is refused),
so an interrupted benchmark continues where it stopped, across sessions; ``--algos d1`` and ``--algos
diffpo`` in two processes train one algorithm each. Writes docs/results/rl/rl_curves[_TAG].{md,json,png}.

    python -m benchmarks.rl_curves [--model DIR] [--tasks countdown,sudoku] [--seeds 0,1,2]
        [--max-steps 150 | countdown=240,sudoku=120] [--lr 3e-5] [--num-generations 8] [--p-mask 0.15]
        [--is-numerator masked|unmasked] [--tau-over all|answer] [--temperature 1.0] [--beta 0.04]
        [--auc-steps 300] [--tag NAME] [--d1-tag NAME] [--algos d1,diffpo]

The comparison protocol, written down before its runs
-----------------------------------------------------
Question: does DiFFPO's estimator (two-stage likelihood, truncated importance weight) train a dLLM to a
higher exact-match accuracy per rollout than d1's one-pass mean-field estimate?

- **Task and base.** Primary, with headroom: ``countdown`` (three numbers up to 99, targets up to 999) from
  the bundled model, which solves 0.266 of its 1,000 generated test prompts exactly (greedy, full steps,
  ``diffpo-train eval --task countdown``): inside the 20-50 % band where both algorithms can gain >= 0.05. A
  base outside that band on the same prompts is not used. Second, low headroom: ``cd3`` from ``runs/base``
  (0.654 exact; docs/benchmarks.md, "A base model with headroom for RL").
- **Metric.** Exact match (``eval_<task>_exact``: reward 1), greedy full-step decoding, on 1,000 held-out
  test prompts (the task's generated test split, never trained on), at step 0 and every 25 steps.
- **Primary statistic.** Per run, the area under the exact-match curve over steps 0-300 (trapezoid rule,
  divided by 300: the curve's mean over the window, :func:`curve_auc`); per algorithm its mean over seeds and
  standard error (sample sd / sqrt(seeds)); DiFFPO - d1 with the standard error sqrt(SE_d1^2 + SE_diffpo^2)
  and z = difference / SE (:func:`auc_comparison`). Separated: |z| >= 3.
- **Secondary, added after the first 7 primary runs** (so not pre-registered): the same difference paired by
  seed (:func:`paired_comparison`), since a seed fixes every step's prompts for both algorithms and its two runs
  were seen to rise or stay flat together. Reported beside the primary statistic, never instead of it.
- **Logged beside it** (:func:`window_means`, same window, mean and SE over seeds): the T = 1 accuracy (exact
  match of the temperature-1 training rollouts, fresh prompts every step: what greedy evaluation may hide)
  and the zero-variance groups per step (groups whose G rewards are equal carry no gradient); the final
  point's comparison and each run's training signal (IS weight, clip fraction) as before.
- **Fixed settings.** 300 steps of 16 prompts x G = 8 rollouts at temperature 1 (the ``steps`` sampler,
  one token per pass), mu = 4, lr 3e-5, eps 0.5, beta 0, C = 2, ``--is-numerator masked``, ``--tau-over
  all``; one torch thread per run.
- **Arms.** d1 vs DiFFPO x p_mask {0, 0.15}, seeds 0-4 each, on the primary task: 20 runs, tags
  ``headroom-p0`` and ``headroom-p15``. Then cd3 from runs/base at the better p_mask (the one with the larger
  DiFFPO AUC), 5 seeds per algorithm. Then the estimator's open choices (``--is-numerator unmasked``,
  ``--tau-over answer``, DiFFPO only, 5 seeds each) on the setting where the core arms separate, or, where
  none does, on the primary task, to test whether those choices are why. Every arm is reported, also those
  that do not separate.
- **Confirmatory run.** The setting the project then ships as default is rerun with fresh seeds 100-104, 5
  per algorithm (tag ``confirm``); the reported difference is that run's, not the exploratory arms'.

Commands (each run resumes; run the two algorithms in two processes to use two cores)::

    python -m benchmarks.rl_curves --tasks countdown --seeds 0,1,2,3,4 --max-steps 300 --eval-every 25 \
        --eval-examples 1000 --beta 0 --p-mask 0 --tag headroom-p0 [--algos d1 | --algos diffpo]
    python -m benchmarks.rl_curves ... --p-mask 0.15 --tag headroom-p15
    python -m benchmarks.rl_curves ... --is-numerator unmasked --tag headroom-p0-unmasked --d1-tag headroom-p0

Budget, measured before the runs (the 2-core AMD EPYC development machine, shared: load average about 7
during the measurement, so an idle machine is faster; one torch thread per process; bundled model,
countdown, 16 x 8 rollouts, mu = 4, beta 0): a step takes 6.5 s for d1 (6 steps) and 12.5 s for DiFFPO (6
steps: two likelihood passes and the z_tau rows; ``--is-numerator unmasked`` adds one pass, about 20 s); a
1,000-prompt greedy evaluation takes 47 s. The 20 primary runs: 10 x 300 x 6.5 s + 10 x 300 x 12.5 s =
15.8 process-hours of steps, plus 20 x 13 evaluations x 47 s = 3.4 hours, about 19 process-hours: about
10 hours wall-clock with one process per core, likely 4-6 on an idle machine. The cd3 arm and the
confirmatory run (10 runs each) take about half that each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS, load_saved, machine, markdown_table, record_model, save  # noqa: E402
from training.config import RLConfig  # noqa: E402
from training.likelihood import IS_NUMERATORS, TAU_OVER  # noqa: E402
from training.rl import train_rl  # noqa: E402

RUNS = Path("runs/bench_rl")
AUC_STEPS = 300  # the protocol's window: steps 0-300


def steps_per_task(spec: str, tasks: list[str]) -> dict[str, int]:
    """``--max-steps``: one number for every task, or ``task=N,...`` pairs."""
    if "=" not in spec:
        return {t: int(spec) for t in tasks}
    given = {k: int(v) for k, v in (item.split("=") for item in spec.split(","))}
    missing = [t for t in tasks if t not in given]
    if missing:
        raise SystemExit(f"--max-steps names no step count for {', '.join(missing)}")
    return given


def mean_curve(runs: dict, seeds: list[int]) -> tuple[list, list[float]]:
    """The evaluation points (rollouts) and the mean accuracy over seeds at each; ``runs``: seed ->
    [(rollouts, accuracy), ...], the same points for every seed."""
    xs = [x for x, _ in runs[seeds[0]]]
    return xs, [statistics.mean(runs[s][i][1] for s in seeds) for i in range(len(xs))]


def summary(runs: dict, seeds: list[int]) -> dict:
    """One table row: final accuracy's mean and sample standard deviation (n - 1) over seeds, and the
    best point of the mean curve."""
    xs, mean = mean_curve(runs, seeds)
    finals = [runs[s][-1][1] for s in seeds]
    return {"seeds": len(seeds), "rollouts": xs[-1], "final_acc_mean": statistics.mean(finals),
            "final_acc_sd": statistics.stdev(finals) if len(finals) > 1 else float("nan"), "best_mean": max(mean)}


def comparison(d1: dict, diffpo: dict, seeds: list[int], n_eval: int) -> dict:
    """The final-point comparison from two algorithms' curves (seed -> [(rollouts, accuracy), ...], step 0 first):
    the base accuracy (mean of every run's first point), DiFFPO's final gain over it, and DiFFPO - d1 at the
    final point with the standard error of that difference of seed means. The error is the larger of two:
    from the seeds' spread, sqrt(sd_d1^2 / k + sd_diffpo^2 / k) (k seeds, sample sd), and the evaluation's own
    noise, sqrt(p1 (1 - p1) / (N k) + p2 (1 - p2) / (N k)) (N test prompts per evaluation; p (1 - p) bounds
    the variance of a reward in [0, 1] with mean p), so three seeds that happen to agree cannot claim more
    precision than their test set holds. ``z`` = difference / its error."""
    k = len(seeds)
    base = statistics.mean(run[s][0][1] for run in (d1, diffpo) for s in seeds)
    f1 = [d1[s][-1][1] for s in seeds]
    f2 = [diffpo[s][-1][1] for s in seeds]
    m1, m2 = statistics.mean(f1), statistics.mean(f2)
    binom = math.sqrt((m1 * (1 - m1) + m2 * (1 - m2)) / (n_eval * k))
    se = max(math.sqrt((statistics.variance(f1) + statistics.variance(f2)) / k), binom) if k > 1 else binom
    diff = m2 - m1
    return {"base": base, "d1_final": m1, "diffpo_final": m2, "diffpo_gain": m2 - base, "diffpo_minus_d1": diff,
            "se_diff": se, "z": diff / se if se > 0 else float("nan")}


RESUMABLE = ("max_steps", "resume")  # settings a run may change when it is continued
DIFFPO_ONLY = ("is_numerator", "tau_over")  # settings d1's loss never reads (training/rl.py's _model_update)


def settings_changed(saved: dict, cfg: RLConfig) -> list[str]:
    """The settings of ``cfg`` that differ from a run's saved ``rl_config.json`` (``saved``), other than those a
    continued run may change (:data:`RESUMABLE`) and, for a d1 run, DiFFPO's estimator options
    (:data:`DIFFPO_ONLY`); a setting the saved file predates counts only when ``cfg`` moves it off its default."""
    now = dataclasses.asdict(cfg)
    defaults = dataclasses.asdict(RLConfig())
    free = RESUMABLE + (DIFFPO_ONLY if cfg.algo == "d1" else ())
    return sorted(k for k, v in now.items() if k not in free and saved.get(k, defaults[k]) != v)


def run_one(task: str, algo: str, seed: int, args, max_steps: int) -> list[dict]:
    """Train (or continue) one run up to ``max_steps``; its records up to that step. A run directory that holds
    a run with other settings is refused (SystemExit naming them): its curve would be mixed into the wrong arm.
    d1 runs live under ``args.d1_tag`` when it is set (an arm that changes DiFFPO's estimator only)."""
    tag = args.d1_tag if algo == "d1" and getattr(args, "d1_tag", None) else args.tag
    out = RUNS / tag / f"{task}-{algo}-s{seed}"
    metrics = out / "metrics.jsonl"
    cfg = RLConfig(algo=algo, model=args.model, output_dir=str(out), tasks=task, seed=seed,
                   max_steps=max_steps, eval_every=args.eval_every, eval_examples=args.eval_examples,
                   save_every=args.eval_every, lr=args.lr, num_generations=args.num_generations,
                   prompts_per_step=args.prompts_per_step, num_iterations=args.num_iterations,
                   temperature=args.temperature, beta=args.beta, p_mask=args.p_mask, is_numerator=args.is_numerator,
                   tau_over=args.tau_over, resume=metrics.exists())
    saved = out / "rl_config.json"
    if saved.exists() and (changed := settings_changed(json.loads(saved.read_text()), cfg)):
        raise SystemExit(f"{saved}: this run was trained with other settings ({', '.join(changed)}); use another "
                         "--tag for this configuration")
    done = metrics.exists() and any(json.loads(x)["step"] >= max_steps for x in metrics.read_text().splitlines())
    if not done:
        train_rl(cfg)
    return curve_records(metrics.read_text(), max_steps)


def curve_records(text: str, max_steps: int) -> list[dict]:
    """A metrics.jsonl's records up to ``max_steps``, one per step in step order: where a step was logged twice
    (a file written before the trainer moved a restarted run's old lines aside), the later line wins."""
    by_step = {}
    for record in map(json.loads, text.splitlines()):
        if record["step"] <= max_steps:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


SIGNAL_WINDOW = 50  # update steps at each end of a run that training_signal averages


def training_signal(records: list[dict], window: int = SIGNAL_WINDOW) -> dict:
    """What the updates saw at a run's start and end: the mean over its first and last ``window`` steps of the
    rollouts' mean reward (temperature-sampled, not greedy), of the groups per step whose G rewards were all
    equal (zero variance: no advantage, no gradient), and, over the last steps, of the truncated importance weight
    (1 for d1) and of the fraction of scored tokens whose weight was capped at C."""
    steps = [r for r in records if "reward" in r]
    first, last = steps[:window], steps[-window:]

    def mean(rows, key):
        return round(statistics.mean(r[key] for r in rows), 4)

    return {"reward_first": mean(first, "reward"), "reward_last": mean(last, "reward"),
            "zero_variance_groups_first": mean(first, "zero_variance_groups"),
            "zero_variance_groups_last": mean(last, "zero_variance_groups"),
            "mean_is_weight_last": mean(last, "mean_is_weight"),
            "is_clip_fraction_last": mean(last, "is_clip_fraction")}


def curve_auc(points: list[tuple[int, float]], window: int) -> float:
    """The area under a (step, value) curve over steps [0, window] by the trapezoid rule, divided by ``window``:
    the curve's mean over the window (a flat curve at v has AUC v). The curve must start at step 0 and reach
    ``window``; past it, a point only sets the value at ``window`` by linear interpolation."""
    pts = sorted(points)
    if not pts or pts[0][0] != 0:
        raise ValueError(f"curve_auc: the curve must start at step 0, got steps {[x for x, _ in pts]}")
    if pts[-1][0] < window:
        raise ValueError(f"curve_auc: the curve ends at step {pts[-1][0]}, before the window's end {window}")
    area = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 >= window:
            break
        if x1 > window:
            x1, y1 = window, y0 + (y1 - y0) * (window - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2
    return area / window


def window_means(records: list[dict], window: int) -> dict:
    """A run's means over its update steps 1..``window``: the T = 1 accuracy (``accuracy``: exact match of the
    step's rollouts, sampled at the rollout temperature) and the zero-variance groups per step."""
    steps = [r for r in records if "reward" in r and r["step"] <= window]
    if not steps:
        raise ValueError(f"window_means: no update step in 1..{window}")
    return {"t1_accuracy": statistics.mean(r["accuracy"] for r in steps),
            "zero_variance_groups": statistics.mean(r["zero_variance_groups"] for r in steps)}


def mean_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error, sample sd (n - 1) / sqrt(n); nan for a single value."""
    n = len(values)
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")


def auc_comparison(per_run: dict, seeds: list[int]) -> tuple[list[dict], dict]:
    """The protocol's statistic: ``per_run`` algo -> seed -> {"auc", "t1_accuracy", "zero_variance_groups"}.
    Returns one row per algorithm (each quantity's mean and SE over ``seeds``) and DiFFPO - d1 in AUC with the
    standard error sqrt(SE_d1^2 + SE_diffpo^2) and z = difference / SE."""
    rows, auc = [], {}
    for algo in ("d1", "diffpo"):
        row = {"algo": algo, "seeds": len(seeds)}
        for key in ("auc", "t1_accuracy", "zero_variance_groups"):
            row[f"{key}_mean"], row[f"{key}_se"] = mean_se([per_run[algo][s][key] for s in seeds])
        rows.append(row)
        auc[algo] = (row["auc_mean"], row["auc_se"])
    diff, se = auc["diffpo"][0] - auc["d1"][0], math.hypot(auc["d1"][1], auc["diffpo"][1])
    return rows, {"diffpo_minus_d1_auc": diff, "se_diff": se, "z": diff / se if se > 0 else float("nan")}


def paired_comparison(per_run: dict, seeds: list[int]) -> dict:
    """A secondary statistic, added after the first primary runs showed that a seed's two runs rise or stay
    flat together (the seed fixes the prompts of every step, so d1 and DiFFPO train on the same stream): the
    mean over seeds of DiFFPO's AUC minus d1's on the same seed, its standard error (sample sd of the
    differences / sqrt(seeds)) and z. Not the protocol's statistic (:func:`auc_comparison`)."""
    diffs = [per_run["diffpo"][s]["auc"] - per_run["d1"][s]["auc"] for s in seeds]
    diff, se = mean_se(diffs)
    return {"paired_diff": diff, "paired_se": se, "paired_z": diff / se if se > 0 else float("nan")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="starting model (default: the bundled model; the published "
                    "runs started from the SFT checkpoint, runs/sft)")
    ap.add_argument("--tasks", default="cd3,sudoku")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-steps", default="150", help="RL steps per run: N, or task=N pairs (countdown=240,sudoku=120)")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-examples", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--num-generations", type=int, default=8, help="G: rollouts per prompt")
    ap.add_argument("--p-mask", type=float, default=RLConfig.p_mask, help="d1's prompt masking in the likelihood "
                    "passes (both algorithms)")
    ap.add_argument("--is-numerator", default=RLConfig.is_numerator, choices=IS_NUMERATORS, help="DiFFPO's "
                    "importance-weight numerator: masked or unmasked prompt (diffpo-train rl --help)")
    ap.add_argument("--tau-over", default=RLConfig.tau_over, choices=TAU_OVER, help="DiFFPO's tau: among all "
                    "passes or the passes that commit answer tokens (diffpo-train rl --help)")
    ap.add_argument("--auc-steps", type=int, default=AUC_STEPS, help="the AUC's window: steps 0..N (cut to a "
                    "task's --max-steps when shorter)")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--num-iterations", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    ap.add_argument("--beta", type=float, default=RLConfig.beta, help="weight of the KL to the reference model")
    ap.add_argument("--tag", default="", help="a name for this configuration: runs under runs/bench_rl/TAG/, "
                    "results in docs/results/rl/rl_curves_TAG.*")
    ap.add_argument("--d1-tag", default=None, help="the d1 runs are those of this tag (runs/bench_rl/D1_TAG, "
                    "trained there if missing): an arm that changes only DiFFPO's estimator (--is-numerator, "
                    "--tau-over, which d1 never reads) compares with that arm's d1 runs instead of repeating them")
    ap.add_argument("--algos", default="d1,diffpo", help="train only these algorithms (e.g. one per process to "
                    "use two cores); the table and plot are written only when both are given")
    ap.add_argument("--replot", action="store_true", help="rebuild the table and plot from the curves saved in "
                    "docs/results/rl/rl_curves[_TAG].json (no training, no evaluation; pass the run's other flags "
                    "so the header describes it)")
    args = ap.parse_args(argv)
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    algos = args.algos.split(",")
    if not algos or set(algos) - {"d1", "diffpo"}:
        ap.error(f"--algos: expected d1, diffpo or both (comma-separated), got {args.algos!r}")
    max_steps = steps_per_task(args.max_steps, tasks)
    name = f"rl/rl_curves_{args.tag}" if args.tag else "rl/rl_curves"
    t0 = time.time()
    curves: dict = {}  # task -> algo -> seed -> [(rollouts, greedy accuracy)]: the final-point comparison
    exact_curves: dict = {}  # task -> algo -> seed -> [(rollouts, greedy exact match)]: the plot
    per_run: dict = {}  # task -> algo -> seed -> AUC of the exact-match curve, T = 1 accuracy, zero-variance groups
    windows = {t: min(args.auc_steps, n) for t, n in max_steps.items()}
    signal: list[dict] = []  # one row per algorithm and seed
    if args.replot:
        saved = load_saved(name)
        def by_seed(runs, point):  # JSON's keys are strings
            return {int(s): point(v) for s, v in runs.items()}

        old_format = "accuracy" not in saved  # files written before the AUC hold the curves alone
        curves = {t: {a: by_seed(runs, lambda pts: [tuple(p) for p in pts]) for a, runs in by_algo.items()}
                  for t, by_algo in (saved if old_format else saved["accuracy"]).items()}
        per_run = {} if old_format else {t: {a: by_seed(runs, dict) for a, runs in by_algo.items()}
                                         for t, by_algo in saved["per_run"].items()}
        signal = [] if old_format else saved["signal"]
        exact_curves = {t: {a: by_seed(runs, lambda pts: [tuple(p) for p in pts]) for a, runs in by_algo.items()}
                        for t, by_algo in saved.get("exact", {}).items()}  # files before it: accuracy plotted
    else:
        for task in tasks:
            for seed in seeds:
                for algo in algos:
                    recs = run_one(task, algo, seed, args, max_steps[task])
                    key = f"eval_{task}_accuracy"
                    curves.setdefault(task, {}).setdefault(algo, {})[seed] = [(r["rollouts"], r[key]) for r in recs
                                                                              if key in r]
                    exact_key = f"eval_{task}_exact"
                    exact_curves.setdefault(task, {}).setdefault(algo, {})[seed] = [
                        (r["rollouts"], r[exact_key]) for r in recs if exact_key in r]
                    if recs:
                        signal.append({"task": task, "algo": algo, "seed": seed, **training_signal(recs)})
                        exact = [(r["step"], r[exact_key]) for r in recs if exact_key in r]
                        per_run.setdefault(task, {}).setdefault(algo, {})[seed] = {
                            "auc": curve_auc(exact, windows[task]), **window_means(recs, windows[task])}
    if set(algos) != {"d1", "diffpo"}:
        print(f"trained {args.algos} only: no table or plot (run again with both algorithms to write them)")
        return
    rows, exact_rows, compared, auc_rows, auc_compared, paired = [], [], [], [], [], []
    fig = plt.figure(figsize=(5.5 * len(tasks), 4.2))
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), k + 1)
        plot_exact = task in exact_curves and all(exact_curves[task][a].get(s) for a in ("d1", "diffpo")
                                                  for s in seeds)
        for algo, color in (("d1", "tab:blue"), ("diffpo", "tab:red")):
            runs = curves[task][algo]
            plotted = exact_curves[task][algo] if plot_exact else runs
            xs, mean = mean_curve(plotted, seeds)
            for s in seeds:
                ax.plot(*zip(*plotted[s]), color=color, alpha=0.25, lw=1)
            ax.plot(xs, mean, color=color, lw=2, label=f"{algo} (mean of {len(seeds)} seeds)")
            rows.append({"task": task, "algo": algo, **summary(runs, seeds)})
            if plot_exact:
                exact_rows.append({"task": task, "algo": algo, **{key.replace("acc", "exact"): v for key, v in
                                                                 summary(plotted, seeds).items()}})
        compared.append({"task": task, **comparison(curves[task]["d1"], curves[task]["diffpo"], seeds,
                                                    args.eval_examples)})
        if task in per_run:
            algo_rows, diff = auc_comparison(per_run[task], seeds)
            where = {"task": task, "steps": f"0-{windows[task]}"}
            auc_rows += [{**where, **r} for r in algo_rows]
            auc_compared.append({**where, **diff})
            paired.append({**where, **paired_comparison(per_run[task], seeds)})
        ax.set_xlabel("rollouts")
        ax.set_ylabel("greedy test exact match" if plot_exact else "greedy test accuracy (mean reward)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    (RESULTS / name).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    start = f"`{args.model}`" if args.model else "the bundled model"
    budget = ", ".join(f"{n} steps ({t})" for t, n in max_steps.items())
    text = (f"# d1 vs DiFFPO: test accuracy against rollouts\n\nFrom {start}; per run {budget} "
            f"of {args.prompts_per_step} prompts x G={args.num_generations} rollouts, mu={args.num_iterations}, "
            f"lr={args.lr}, rollout temperature {args.temperature:g}, beta={args.beta:g}, p_mask={args.p_mask:g}, "
            f"IS numerator {args.is_numerator}, tau over {args.tau_over} passes, other settings RLConfig "
            f"defaults; greedy full-step accuracy on {args.eval_examples} "
            f"held-out test prompts before training and every {args.eval_every} steps. Seeds "
            f"{seeds}; `final_acc_sd` is the sample standard deviation (n - 1) of the seeds' final accuracies. "
            + (f"The d1 runs are those of `{args.d1_tag}` (d1 reads neither estimator option). "
               if getattr(args, "d1_tag", None) else "")
            + ("Table and plot rebuilt from the saved curves (`--replot`)." if args.replot else
               f"Machine: {machine()}; {time.time() - t0:.0f} s for this invocation (runs already complete "
               f"under runs/bench_rl are reused, not retrained).") + "\n\n"
            + (("The protocol's statistic (module docstring; `auc_comparison` in the script): per run the area "
                "under the greedy exact-match curve over the steps shown, divided by their number (the curve's "
                "mean); beside it the T = 1 accuracy (exact match of the temperature-sampled training rollouts) "
                "and the zero-variance groups per step, means over the same steps; each as mean and standard "
                "error (sample sd / sqrt(seeds)) over seeds.\n\n" + markdown_table(auc_rows, list(auc_rows[0]))
                + "\n\nDiFFPO - d1 in AUC, its standard error sqrt(SE_d1^2 + SE_diffpo^2) and z = difference / "
                "SE:\n\n" + markdown_table(auc_compared, list(auc_compared[0]))
                + "\n\nSecondary, not the protocol's (`paired_comparison`; added after the first runs showed a "
                "seed's two runs rising or staying flat together: a seed fixes every step's prompts for both "
                "algorithms): the mean over seeds of DiFFPO's AUC minus d1's on the same seed, its standard error "
                "and z:\n\n" + markdown_table(paired, list(paired[0])) + "\n\n")
               if auc_rows else "")
            + ("Exact match along the curve (the plot):\n\n" + markdown_table(exact_rows, list(exact_rows[0]))
               + "\n\n" if exact_rows else "")
            + "Accuracy (the task's mean reward) along the curve:\n\n" + markdown_table(rows, list(rows[0]))
            + "\n\nThe final-point comparison (`comparison` in the script): DiFFPO's final gain over the base (the mean "
              "of every run's step-0 accuracy) and DiFFPO - d1 at the final point, with the standard error of that "
              "difference (the larger of the seeds' spread and the test set's binomial noise) and z = difference / "
              "error.\n\n"
            + markdown_table(compared, list(compared[0])) + f"\n\n![rl curves]({Path(name).name}.png)\n"
            + ("\nWhat the updates saw (`training_signal` in the script; means over each run's first and last "
               f"{SIGNAL_WINDOW} steps): the sampled rollouts' mean reward, the groups per step (of "
               f"{args.prompts_per_step}) whose {args.num_generations} rewards were all equal, and the mean "
               "truncated importance weight and the fraction of tokens whose weight was capped at C, over the last "
               f"{SIGNAL_WINDOW} steps.\n\n" + markdown_table(signal, list(signal[0]))
               + "\n" if signal else ""))
    record_model(args.model)  # the starting model: its checksum in the result's provenance
    print(save(name, text, {"accuracy": curves, "exact": exact_curves, "per_run": per_run, "signal": signal}))


if __name__ == "__main__":
    main()
