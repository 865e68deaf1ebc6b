"""Models trained for speed against the model they started from: fixed-gamma fronts and step policies.

This comparison is across different weights: a model trained jointly with its step
policy (``--train joint --sampler-kind policy``) against the starting model's fixed-gamma EB front, and
against model-only DiFFPO trained with the same rollout budget at its best fixed gamma. Each
``--models NAME=DIR`` is decoded greedily on the same generated test prompts (``--seed``) with full
steps and every gamma of the threshold head's grid; a model that holds a step policy is also decoded
with it, its own weights, swept over the policy's knob. ``mixed`` pools the tasks in equal parts.

``equal accuracy``: for every reference model R (each model's EB front in turn) and every other series
S (a model's EB front, or a model's policy sweep): the target is R's most accurate fixed gamma minus its
standard error; S's cheapest point at or above it against R's cheapest fixed gamma there,
``fewer_nfe`` = 1 - NFE_S / NFE_R ("none" where S never reaches it). The first model is the starting
model. Writes docs/results/NAME.{md,json,png}.

    python -m benchmarks.joint_policy --models start=runs/base,model-only=runs/fast,joint=runs/joint \\
        --tasks cd3,sudoku [--n 1000] [--cache runs/bench_cache.json]
"""

from __future__ import annotations

import argparse
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS, machine, markdown_table, load_model, save  # noqa: E402
from benchmarks.step_policy import PromptCache, add_front_arguments, decode, mixed, prompt_key, summarise  # noqa: E402

from diffpo_serve.dllm.sampler import SamplingParams  # noqa: E402
from diffpo_serve.dllm.threshold_head import DEFAULT_GRID  # noqa: E402
from training.tasks import get_task  # noqa: E402


def equal_accuracy(rows: list[dict]) -> list[dict]:
    """Per task, reference model R and other series S (model, sampler in {eb, policy}): S's cheapest point
    within one SE of R's most accurate fixed gamma, against R's cheapest fixed gamma there."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        here = [r for r in rows if r["task"] == task]
        series = list(dict.fromkeys((r["model"], r["sampler"]) for r in here if r["sampler"] in ("eb", "policy")))
        for ref in dict.fromkeys(r["model"] for r in here if r["sampler"] == "eb"):
            eb = [r for r in here if r["model"] == ref and r["sampler"] == "eb"]
            top = max(eb, key=lambda r: r["accuracy"])
            target = top["accuracy"] - top["se"]
            ref_best = min((r for r in eb if r["accuracy"] >= target), key=lambda r: r["mean_nfe"])
            for model, sampler in series:
                if (model, sampler) == (ref, "eb"):
                    continue
                row = {"task": task, "reference": ref, "target": target, "ref_setting": ref_best["setting"],
                       "ref_mean_nfe": ref_best["mean_nfe"], "model": model, "sampler": sampler}
                cands = [r for r in here if r["model"] == model and r["sampler"] == sampler
                         and r["accuracy"] >= target]
                if not cands:
                    best_acc = max(r["accuracy"] for r in here if r["model"] == model and r["sampler"] == sampler)
                    out.append({**row, "setting": "none", "accuracy": best_acc, "mean_nfe": float("nan"),
                                "fewer_nfe": float("nan")})
                    continue
                best = min(cands, key=lambda r: r["mean_nfe"])
                out.append({**row, "setting": best["setting"], "accuracy": best["accuracy"],
                            "mean_nfe": best["mean_nfe"], "fewer_nfe": 1 - best["mean_nfe"] / ref_best["mean_nfe"]})
    return out


def plot(rows: list[dict], panels: list[str], path) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = plt.get_cmap("tab10").colors
    for ax, task in zip(axes[0], panels):
        for k, model in enumerate(models):
            for sampler, style in (("eb", "--"), ("policy", "-")):
                pts = sorted((r["mean_nfe"], r["accuracy"]) for r in rows
                             if r["task"] == task and r["model"] == model and r["sampler"] == sampler)
                if pts:
                    ax.plot(*zip(*pts), style, color=colors[k % 10], marker="." if sampler == "eb" else "o", ms=4,
                            label=f"{model}: {'EB fixed gamma' if sampler == 'eb' else 'step policy (knob sweep)'}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean NFE (log scale)")
        ax.set_ylabel("accuracy (mean reward)")
        ax.set_title(task if task != "mixed" else "mixed stream (equal parts)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated NAME=DIR, the starting model first")
    add_front_arguments(ap, "step_policy/joint_policy")
    args = ap.parse_args(argv)
    models = {}
    for item in args.models.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--models: expected NAME=DIR, got {item!r}")
        models[name] = path
    tasks, knobs = args.tasks.split(","), [float(k) for k in args.knobs.split(",")]
    cache, rows, per_prompt, t0 = PromptCache(args.cache), [], {}, time.time()
    for name, path in models.items():
        loaded = load_model(path)
        for task_name in tasks:
            task = get_task(task_name)
            gen, data = task.GEN_LENGTH, list(task.make_dataset("test", args.n, seed=args.seed))
            runs = [("steps", f"steps={gen}", SamplingParams("steps", gen), None)]
            runs += [("eb", f"gamma {g:.4g}", SamplingParams("eb", gen, threshold=g), None) for g in DEFAULT_GRID]
            if loaded.step_policy is not None:
                runs += [("policy-own", f"p >= {k:g}", SamplingParams("policy", gen, threshold=k), loaded.step_policy)
                         for k in knobs]
            for sampler, setting, params, policy in runs:
                key = prompt_key(task_name, args.n, args.seed, path, sampler, setting)
                per = cache.get(key, lambda: decode(loaded, task, data, params, args.batch_size, policy))
                sampler = "policy" if sampler == "policy-own" else sampler
                per_prompt[(task_name, name, sampler, setting)] = per
                rows.append({"task": task_name, "model": name, "sampler": sampler, "setting": setting,
                             **summarise(per)})
                print(json.dumps(rows[-1]), flush=True)
    if len(tasks) > 1:
        rows += mixed(rows, tasks, per_prompt, by="model")
    compared = equal_accuracy(rows)
    panels = tasks + (["mixed"] if len(tasks) > 1 else [])
    (RESULTS / args.name).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, panels, RESULTS / f"{args.name}.png")
    text = (f"# Models trained for speed against their starting model\n\nModels: "
            + ", ".join(f"`{n}` = `{p}`" for n, p in models.items())
            + f" (the first is the starting model). {args.n} generated test prompts per task (seed {args.seed}), "
            f"greedy, one block; full steps, EB at each gamma of the head's grid and, for a model with a step "
            f"policy, that policy on its own weights over its knob. `mixed` pools the tasks in equal parts. "
            f"Machine: {machine()}; {time.time() - t0:.0f} s.\n\n## Equal accuracy\n\nFor each reference model's "
            f"EB front: the target is its most accurate fixed gamma minus that point's standard error; each other "
            f"series' cheapest point at or above it, against the reference's cheapest fixed gamma there "
            f"(`fewer_nfe` = 1 - mean_nfe / ref_mean_nfe; `none`: never reached, `accuracy` then its best).\n\n"
            + markdown_table(compared, ["task", "reference", "target", "ref_setting", "ref_mean_nfe", "model",
                                        "sampler", "setting", "accuracy", "mean_nfe", "fewer_nfe"])
            + "\n\n## Every point\n\n"
            + markdown_table(rows, ["task", "model", "sampler", "setting", "accuracy", "se", "mean_nfe"])
            + f"\n\n![joint policy]({args.name.rsplit('/', 1)[-1]}.png)\n")
    print(save(args.name, text, {"models": models, "rows": rows, "equal_accuracy": compared}))


if __name__ == "__main__":
    main()
