"""Accuracy vs mean NFE of several models: fixed-gamma EB sweeps, full steps, and the learned threshold.

For each model directory given: greedy full steps, an EB gamma sweep, and, when the model has a
threshold head, the ``learned`` sampler (the head's mode per prompt), on the same generated test
prompts of each task. One plot per task; the learned points should lie above the fixed-gamma front
of the same model. Writes docs/results/pareto.{md,json,png}.

    python -m benchmarks.pareto --models sft=diffpo_serve/bundled_model,head=runs/sampler-head [--n 1000]
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS, machine, markdown_table, save  # noqa: E402
from diffpo_serve.dllm.loading import load_model  # noqa: E402
from diffpo_serve.dllm.sampler import SamplingParams  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.tasks import get_task  # noqa: E402

GAMMAS = [0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated NAME=DIR pairs")
    ap.add_argument("--tasks", default="sudoku,countdown")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args(argv)
    models = [m.split("=", 1) for m in args.models.split(",")]
    tasks = args.tasks.split(",")
    data = {t: get_task(t).make_dataset("test", args.n, seed=0) for t in tasks}
    rows, t0 = [], time.time()
    for name, path in models:
        loaded = load_model(path)
        for task in tasks:
            gen = get_task(task).GEN_LENGTH
            configs = [SamplingParams("steps", gen)] + [SamplingParams("eb", gen, threshold=g) for g in GAMMAS]
            if loaded.threshold_head is not None:
                configs.append(SamplingParams("learned", gen))
            for p in configs:
                r = evaluate(loaded, task, data[task], p, batch_size=args.batch_size, progress=False)
                setting = {"steps": "steps=16", "eb": f"eb {p.threshold}", "learned": "learned"}[p.sampler]
                rows.append({"model": name, "task": task, "setting": setting, "accuracy": r.accuracy,
                             "exact": r.exact, "mean_nfe": r.mean_nfe,
                             "thresholds": r.threshold_distribution or ""})
                print(rows[-1], flush=True)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2))
    for ax, task in zip(axes, tasks):
        for k, (name, _) in enumerate(models):
            color = f"C{k}"
            pts = sorted((r["mean_nfe"], r["accuracy"]) for r in rows
                         if r["model"] == name and r["task"] == task and r["setting"].startswith("eb"))
            ax.plot(*zip(*pts), "-", color=color, marker=".", label=f"{name}: fixed gamma")
            for r in rows:
                if r["model"] == name and r["task"] == task and r["setting"] in ("steps=16", "learned"):
                    marker = "*" if r["setting"] == "learned" else "s"
                    ax.plot(r["mean_nfe"], r["accuracy"], marker, color=color, ms=12 if marker == "*" else 7,
                            label=f"{name}: {r['setting']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean NFE")
        ax.set_ylabel("accuracy (mean reward)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "pareto.png", dpi=120)
    text = (f"# Accuracy vs NFE: fixed gamma vs the learned threshold\n\nModels: "
            + ", ".join(f"`{n}` = `{p}`" for n, p in models)
            + f"; {args.n} generated test prompts per task (seed 0), greedy, one 16-token block; one run each "
            f"(deterministic). Machine: {machine()}; {time.time() - t0:.0f} s.\n\n"
            + markdown_table(rows, ["model", "task", "setting", "accuracy", "exact", "mean_nfe", "thresholds"])
            + "\n\n![pareto](pareto.png)\n")
    print(save("pareto", text, rows))


if __name__ == "__main__":
    main()
