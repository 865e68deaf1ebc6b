"""Accuracy vs mean NFE of several models: fixed-gamma EB sweeps, full steps, and the learned threshold.

For each model directory given: greedy full steps, an EB gamma sweep, when the model has a threshold
head the ``learned`` sampler (the head's mode per prompt), and when it has a step policy the ``policy``
sampler at its trained operating point, on the same generated test prompts of each task. One plot per task; the learned points should lie above the fixed-gamma front
of the same model. A third panel is mixed traffic (equal parts of each task, the situation a server
is in): a global gamma must suit the hardest task there, while the head picks per prompt; its points
are the per-task results averaged, exact because a greedy row decodes the same in any batch.
Writes docs/results/samplers/pareto.{md,json,png}.

    python -m benchmarks.pareto --models sft=diffpo_serve/bundled_model,head=runs/sampler-head [--n 1000]

``NAME@TASK=DIR`` evaluates a model on one task only (e.g. task-specific RL runs under one name):
``d1@countdown=runs/bench_rl/countdown-d1-s0,d1@sudoku=runs/bench_rl/sudoku-d1-s0``.
"""

from __future__ import annotations

import argparse
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS, load_model, load_saved, machine, markdown_table, save  # noqa: E402

from diffpo_serve.dllm.sampler import SamplingParams  # noqa: E402
from diffpo_serve.dllm.threshold_head import DEFAULT_GRID  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.tasks import get_task  # noqa: E402

GAMMAS = DEFAULT_GRID  # the fixed-gamma sweep covers exactly the values a threshold head chooses from


def parse_models(spec: str, tasks: list[str]) -> list[tuple[str, str, str]]:
    """``NAME=DIR`` (every task) or ``NAME@TASK=DIR`` (one task) -> [(name, task, dir)]."""
    entries = []
    for item in spec.split(","):
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise SystemExit(f"--models: expected NAME=DIR or NAME@TASK=DIR, got {item!r}")
        name, _, task = key.partition("@")
        if task and task not in tasks:
            raise SystemExit(f"--models: task {task!r} of {item!r} is not one of --tasks {','.join(tasks)}")
        entries += [(name, t, path) for t in ([task] if task else tasks)]
    return entries


def mixed_rows(rows: list[dict], tasks: list[str]) -> list[dict]:
    """Equal-parts mixed traffic: per model and setting present on every task, the mean over tasks."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        for setting in dict.fromkeys(r["setting"] for r in rows if r["model"] == name):
            per = [r for r in rows if r["model"] == name and r["setting"] == setting]
            if sorted(r["task"] for r in per) != sorted(tasks):
                continue
            out.append({"model": name, "task": "mixed", "setting": setting,
                        **{k: sum(r[k] for r in per) / len(per) for k in ("accuracy", "exact", "mean_nfe")},
                        "thresholds": ""})
    return out


def oracle_row(name: str, task: str, per_setting: dict[str, list[dict]]) -> dict:
    """The per-prompt oracle over the fixed-gamma settings: each prompt decoded with the gamma that
    gives it the highest reward, the fewest NFE among those: the most any per-prompt threshold could get."""
    sweeps = [rows for setting, rows in per_setting.items() if setting.startswith("eb")]
    best = [max(choices, key=lambda r: (r["reward"], -r["nfe"])) for choices in zip(*sweeps)]
    n = len(best)
    return {"model": name, "task": task, "setting": "oracle", "accuracy": sum(r["reward"] for r in best) / n,
            "exact": sum(r["reward"] >= 1.0 for r in best) / n, "mean_nfe": sum(r["nfe"] for r in best) / n,
            "thresholds": ""}


def plot(rows: list[dict], panels: list[str], path, only: list[str] | None = None) -> None:
    """One panel per task; ``only`` limits the drawn models (the table keeps them all)."""
    names = [n for n in dict.fromkeys(r["model"] for r in rows) if not only or n in only]
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    for ax, task in zip(axes[0], panels):
        for k, name in enumerate(names):
            color = colors[k % len(colors)]
            pts = sorted((r["mean_nfe"], r["accuracy"]) for r in rows
                         if r["model"] == name and r["task"] == task and r["setting"].startswith("eb"))
            if pts:
                ax.plot(*zip(*pts), "-", color=color, marker=".", label=f"{name}: fixed gamma")
            for r in rows:
                kind = r["setting"].split("=")[0]
                if r["model"] == name and r["task"] == task and kind in ("steps", "learned", "policy", "oracle"):
                    marker = {"learned": "*", "policy": "D", "steps": "s", "oracle": "x"}[kind]
                    ax.plot(r["mean_nfe"], r["accuracy"], marker, color=color, ms=13 if marker == "*" else 6,
                            mec="black" if marker == "*" else color, label=f"{name}: {r['setting']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean NFE (log scale)")
        ax.set_ylabel("accuracy (mean reward)")
        ax.set_title(task if task != "mixed" else "mixed traffic (equal parts of each task)")
        ax.grid(alpha=0.3)
    handles: dict = {}
    for ax in axes[0]:  # one legend for the figure, outside the panels
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.tight_layout()
    fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.97), fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated NAME=DIR or NAME@TASK=DIR entries")
    ap.add_argument("--tasks", default="sudoku,cd3")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--name", default="samplers/pareto", help="results file stem under docs/results")
    ap.add_argument("--learned-only", default="", help="comma-separated model names to run with their learned "
                    "samplers only (the head, the step policy; e.g. on a model whose sweep another entry has)")
    ap.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                    help="also the per-prompt oracle over the gamma sweep (an upper bound for a learned threshold)")
    ap.add_argument("--plot-models", default="", help="comma-separated model names to draw (default: all; "
                    "the table has every model)")
    ap.add_argument("--replot", action="store_true", help="only redraw docs/results/NAME.png from NAME.json")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    panels = tasks + (["mixed"] if len(tasks) > 1 else [])
    only = [n for n in args.plot_models.split(",") if n] or None
    if args.replot:
        plot(load_saved(args.name), panels, RESULTS / f"{args.name}.png", only)
        return
    if not args.models:
        ap.error("--models is required (unless --replot)")
    entries = parse_models(args.models, tasks)
    learned_only = set(filter(None, args.learned_only.split(",")))
    data = {t: get_task(t).make_dataset("test", args.n, seed=0) for t in tasks}
    rows, t0, cache = [], time.time(), {}
    for name, task, path in entries:
        loaded = cache.get(path) or cache.setdefault(path, load_model(path))
        gen = get_task(task).GEN_LENGTH
        configs = [] if name in learned_only else \
            [SamplingParams("steps", gen)] + [SamplingParams("eb", gen, threshold=g) for g in GAMMAS]
        if loaded.threshold_head is not None:
            configs.append(SamplingParams("learned", gen))
        if loaded.step_policy is not None:
            configs.append(SamplingParams("policy", gen))
        per_setting = {}
        for p in configs:
            r = evaluate(loaded, task, data[task], p, batch_size=args.batch_size, progress=False)
            setting = f"eb {p.threshold:.4g}" if p.sampler == "eb" else \
                {"steps": f"steps={p.gen_length}", "learned": "learned", "policy": "policy"}[p.sampler]
            per_setting[setting] = r.rows
            rows.append({"model": name, "task": task, "setting": setting, "accuracy": r.accuracy,
                         "exact": r.exact, "mean_nfe": r.mean_nfe, "thresholds": r.threshold_distribution or ""})
            print(rows[-1], flush=True)
        if args.oracle and name not in learned_only:
            rows.append(oracle_row(name, task, per_setting))
    if len(tasks) > 1:
        rows += mixed_rows(rows, tasks)
    (RESULTS / args.name).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, panels, RESULTS / f"{args.name}.png", only)
    models = list(dict.fromkeys(f"`{n}{'@' + t if t else ''}` = `{p}`" for n, t, p in
                                [(n, t if any(e[0] == n and e[1] != t for e in entries) else "", p)
                                 for n, t, p in entries]))
    text = ("# Accuracy vs NFE: fixed gamma vs the learned threshold\n\nModels: " + ", ".join(models)
            + f"; {args.n} generated test prompts per task (seed 0), greedy, one 16-token block; one run each "
            f"(deterministic). `mixed`: equal parts of each task, the mean of the per-task rows. `oracle`: each "
            f"prompt with the swept gamma that gives it the highest reward, then the fewest NFE (an upper bound "
            f"for any per-prompt threshold over this grid, not a sampler). "
            f"Machine: {machine()}; {time.time() - t0:.0f} s.\n\n"
            + markdown_table(rows, ["model", "task", "setting", "accuracy", "exact", "mean_nfe", "thresholds"])
            + f"\n\n![pareto]({args.name.rsplit('/', 1)[-1]}.png)\n")
    print(save(args.name, text, rows))


if __name__ == "__main__":
    main()
