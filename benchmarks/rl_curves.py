"""d1 vs DiFFPO from the bundled SFT model: test accuracy against the number of rollouts.

For each task and seed, trains both algorithms with identical budgets (same prompts per step, G,
mu, learning rate, steps) and evaluates greedy full-step accuracy on held-out test prompts every
``--eval-every`` steps. Runs are kept under runs/bench_rl/ and skipped when already complete, so an
interrupted benchmark continues where it stopped. Writes docs/results/rl/rl_curves.{md,json,png}.

    python -m benchmarks.rl_curves [--tasks countdown,sudoku] [--seeds 0,1,2] [--max-steps 150 | countdown=240,sudoku=120]
                                   [--lr 3e-5] [--temperature 1.0] [--beta 0.04] [--tag NAME]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS, machine, markdown_table, save  # noqa: E402
from training.config import RLConfig  # noqa: E402
from training.rl import train_rl  # noqa: E402

RUNS = Path("runs/bench_rl")


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
    """The issue's criterion from two algorithms' curves (seed -> [(rollouts, accuracy), ...], step 0 first):
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


def run_one(task: str, algo: str, seed: int, args, max_steps: int) -> list[dict]:
    """Train (or continue) one run up to ``max_steps``; its records up to that step."""
    out = RUNS / args.tag / f"{task}-{algo}-s{seed}"
    metrics = out / "metrics.jsonl"
    done = metrics.exists() and any(json.loads(x)["step"] >= max_steps for x in metrics.read_text().splitlines())
    if not done:
        cfg = RLConfig(algo=algo, model=args.model, output_dir=str(out), tasks=task, seed=seed,
                       max_steps=max_steps, eval_every=args.eval_every, eval_examples=args.eval_examples,
                       save_every=args.eval_every, lr=args.lr, num_generations=args.num_generations,
                       prompts_per_step=args.prompts_per_step, num_iterations=args.num_iterations,
                       temperature=args.temperature, beta=args.beta, resume=metrics.exists())
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
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--num-iterations", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    ap.add_argument("--beta", type=float, default=RLConfig.beta, help="weight of the KL to the reference model")
    ap.add_argument("--tag", default="", help="a name for this configuration: runs under runs/bench_rl/TAG/, "
                    "results in docs/results/rl/rl_curves_TAG.*")
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
    curves: dict = {}
    signal: list[dict] = []  # one row per algorithm and seed (not kept by --replot)
    if args.replot:
        saved = json.loads((RESULTS / f"{name}.json").read_text())
        curves = {t: {a: {int(s): [tuple(p) for p in pts] for s, pts in runs.items()}
                      for a, runs in by_algo.items()}
                  for t, by_algo in saved.items()}
    else:
        for task in tasks:
            for seed in seeds:
                for algo in algos:
                    recs = run_one(task, algo, seed, args, max_steps[task])
                    key = f"eval_{task}_accuracy"
                    curves.setdefault(task, {}).setdefault(algo, {})[seed] = [(r["rollouts"], r[key]) for r in recs
                                                                              if key in r]
                    if recs:
                        signal.append({"task": task, "algo": algo, "seed": seed, **training_signal(recs)})
    if set(algos) != {"d1", "diffpo"}:
        print(f"trained {args.algos} only: no table or plot (run again with both algorithms to write them)")
        return
    rows, compared, fig = [], [], plt.figure(figsize=(5.5 * len(tasks), 4.2))
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), k + 1)
        for algo, color in (("d1", "tab:blue"), ("diffpo", "tab:red")):
            runs = curves[task][algo]
            xs, mean = mean_curve(runs, seeds)
            for s in seeds:
                ax.plot(*zip(*runs[s]), color=color, alpha=0.25, lw=1)
            ax.plot(xs, mean, color=color, lw=2, label=f"{algo} (mean of {len(seeds)} seeds)")
            rows.append({"task": task, "algo": algo, **summary(runs, seeds)})
        compared.append({"task": task, **comparison(curves[task]["d1"], curves[task]["diffpo"], seeds,
                                                    args.eval_examples)})
        ax.set_xlabel("rollouts")
        ax.set_ylabel("greedy test accuracy (mean reward)")
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
            f"lr={args.lr}, rollout temperature {args.temperature:g}, beta={args.beta:g}, other settings RLConfig "
            f"defaults; greedy full-step accuracy on {args.eval_examples} "
            f"held-out test prompts before training and every {args.eval_every} steps. Seeds "
            f"{seeds}; `final_acc_sd` is the sample standard deviation (n - 1) of the seeds' final accuracies. "
            + ("Table and plot rebuilt from the saved curves (`--replot`)." if args.replot else
               f"Machine: {machine()}; {time.time() - t0:.0f} s for this invocation (runs already complete "
               f"under runs/bench_rl are reused, not retrained).") + "\n\n"
            + markdown_table(rows, list(rows[0]))
            + "\n\nThe issue's criterion (`comparison` in the script): DiFFPO's final gain over the base (the mean "
              "of every run's step-0 accuracy) and DiFFPO - d1 at the final point, with the standard error of that "
              "difference (the larger of the seeds' spread and the test set's binomial noise) and z = difference / "
              "error.\n\n"
            + markdown_table(compared, list(compared[0])) + f"\n\n![rl curves]({name}.png)\n"
            + ("\nWhat the updates saw (`training_signal` in the script; means over each run's first and last "
               f"{SIGNAL_WINDOW} steps): the sampled rollouts' mean reward, the groups per step (of "
               f"{args.prompts_per_step}) whose {args.num_generations} rewards were all equal, and the mean "
               "truncated importance weight and the fraction of tokens whose weight was capped at C, over the last "
               f"{SIGNAL_WINDOW} steps.\n\n" + markdown_table(signal, list(signal[0]))
               + "\n" if signal else ""))
    print(save(name, text, curves))


if __name__ == "__main__":
    main()
