"""Accuracy vs mean NFE of the samplers on the test splits of sudoku and countdown.

Sweeps ``steps`` (several step counts), ``confidence`` and ``eb`` (threshold sweeps), and adds the
model's learned samplers at their defaults (``learned`` with a threshold head, ``policy`` with a step
policy), all greedy, one block, on the same prompts; writes docs/results/samplers/sampler_front.{md,json,png}.

    python -m benchmarks.sampler_front [--model DIR] [--n 1000]
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS, machine, markdown_table, load_model, save  # noqa: E402

from diffpo_serve.dllm.sampler import SamplingParams  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.tasks import get_task  # noqa: E402

STEPS = [1, 2, 4, 8, 16]
CONFIDENCE = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
EB = [0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]


def sweep(loaded, task_name: str, data, batch_size: int) -> list[dict]:
    gen = get_task(task_name).GEN_LENGTH
    configs = ([SamplingParams("steps", gen, steps=s) for s in STEPS]
               + [SamplingParams("confidence", gen, threshold=t) for t in CONFIDENCE]
               + [SamplingParams("eb", gen, threshold=t) for t in EB]
               + [SamplingParams(name, gen) for name, has in (("learned", loaded.threshold_head),
                                                                ("policy", loaded.step_policy)) if has is not None])
    rows = []
    for p in configs:
        r = evaluate(loaded, task_name, data, p, batch_size=batch_size, progress=False)
        knob = (f"steps={p.steps}" if p.sampler == "steps" else "default" if p.threshold is None
                else f"threshold={p.threshold}")
        rows.append({"task": task_name, "sampler": p.sampler, "setting": knob, "accuracy": r.accuracy,
                     "exact": r.exact, "mean_nfe": r.mean_nfe, "tokens_per_second": r.tokens_per_second})
        print(f"{task_name:10s} {p.sampler:10s} {knob:18s} acc {r.accuracy:.3f} exact {r.exact:.3f} "
              f"nfe {r.mean_nfe:.2f}", flush=True)
    return rows


def plot(rows: list[dict], tasks: list[str], path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2))
    for ax, task in zip(axes, tasks):
        for sampler, style in [("steps", "o-"), ("confidence", "s--"), ("eb", "^-")]:
            pts = sorted((r["mean_nfe"], r["accuracy"]) for r in rows if r["task"] == task and r["sampler"] == sampler)
            ax.plot(*zip(*pts), style, label=sampler)
        for sampler, marker, color in (("learned", "*", "gold"), ("policy", "P", "crimson")):
            for n, a in ((r["mean_nfe"], r["accuracy"]) for r in rows if r["task"] == task and r["sampler"] == sampler):
                ax.plot(n, a, marker, color=color, mec="black", ms=12, label=f"{sampler} (default)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean NFE (forward passes per prompt)")
        ax.set_ylabel("accuracy (mean reward)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--n", type=int, default=1000, help="test prompts per task")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--tasks", default="sudoku,cd3")
    args = ap.parse_args(argv)
    loaded = load_model(args.model)
    tasks = args.tasks.split(",")
    t0 = time.time()
    rows = []
    for task in tasks:
        data = get_task(task).make_dataset("test", args.n, seed=0)
        rows += sweep(loaded, task, data, args.batch_size)
    plot(rows, tasks, RESULTS / "samplers" / "sampler_front.png")
    text = (f"# Accuracy vs NFE of the samplers\n\nModel `{loaded.path.split('/')[-1]}`; {args.n} generated test "
            f"prompts per task (test split, seed 0), greedy, one block of the task's gen_length; one run each "
            f"(greedy decoding is deterministic). Machine: {machine()}; {time.time() - t0:.0f} s in all.\n\n"
            + markdown_table(rows, ["task", "sampler", "setting", "accuracy", "exact", "mean_nfe"])
            + "\n\n![accuracy vs NFE](sampler_front.png)\n")
    print(save("samplers/sampler_front", text, rows))


if __name__ == "__main__":
    main()
