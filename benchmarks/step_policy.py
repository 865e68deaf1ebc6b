"""The learned per-step commit policy against fixed gammas, the per-prompt head and the step oracle.

On one model (default: the bundled model), greedy, on the same generated test prompts of each task
(``--seed``, default 0) and on the mixed stream (equal parts of each task; a greedy row decodes the same
in any batch, so its points are the per-task results averaged):

- ``eb``: the fixed-gamma EB front over the threshold head's grid, and full steps;
- ``learned``: the model's per-prompt threshold head (if it has one);
- ``policy``: each given step policy (``NAME=DIR``: a model directory whose weights are the same
  model's and which holds a ``step_policy``), swept over its knob (commit every masked token with
  p >= knob, at least one);
- ``oracle``: the step oracle, a bound, not a sampler: decode at full steps to get the answer A,
  then decode again committing at each pass exactly the masked tokens whose argmax already equals A's
  token (at least the most confident one).

For every point: accuracy (mean reward) with its standard error, and ``eb_nfe_at_acc``, the mean NFE
that fixed gammas need for the same accuracy (mixing two neighbouring gammas across prompts: the
lower hull of NFE vs accuracy), and the saving. ``summary``: for each sampler, its cheapest point
within one standard error of the most accurate fixed gamma's accuracy, against the cheapest fixed
gamma within one standard error of it, and its largest ``saving`` among its points in that range.
``cost``: the policy's own share of a batched step, measured two ways (:func:`policy_cost`): as (time of
a step with policy rows - time with eb rows) / time with eb rows over adjacent pairs, and as the share of
the sampler's step-policy part inside the policy steps themselves; ``--cost-calls`` repeats it.
Writes docs/results/NAME.{md,json,png}.

    python -m benchmarks.step_policy --policies ws=runs/policy/ws,rl=runs/policy/rl [--n 1000]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS, machine, markdown_table, load_model, save  # noqa: E402
from diffpo_serve.dllm.forward import model_logits  # noqa: E402

import diffpo_serve.dllm.sampler.step as sampler_module  # noqa: E402
from diffpo_serve.dllm.sampler import SamplingParams, denoise_step, generate, init_state  # noqa: E402
from diffpo_serve.dllm.threshold_head import DEFAULT_GRID  # noqa: E402
from training.tasks import get_task  # noqa: E402

KNOBS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98]


def decode(loaded, task, data, params: SamplingParams, batch_size: int, policy=None) -> list[dict]:
    """Per prompt: reward and NFE (greedy)."""
    rows = []
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        out = generate(loaded.model, [loaded.encode(ex["prompt"]) for ex in chunk], params, mask_id=loaded.mask_id,
                       eos_id=loaded.eos_id, pad_id=loaded.pad_id, head=loaded.threshold_head, policy=policy)
        rows += [{"reward": task.reward(loaded.decode(seq)[0], ex), "nfe": n}
                 for ex, seq, n in zip(chunk, out.sequences.tolist(), out.nfe.tolist())]
    return rows


@torch.no_grad()
def oracle_decode(loaded, task, data, gen: int, batch_size: int) -> list[dict]:
    """The step oracle (one block of ``gen``): commit exactly the masked tokens whose argmax equals the
    full-step answer's token, at least the most confident one; the decode stops like the sampler's."""
    rows = []
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        prompts = [loaded.encode(ex["prompt"]) for ex in chunk]
        kw = dict(mask_id=loaded.mask_id, eos_id=loaded.eos_id, pad_id=loaded.pad_id)
        answer = generate(loaded.model, prompts, SamplingParams("steps", gen), **kw).sequences
        state = init_state(prompts, SamplingParams("eb", gen, threshold=0.0), **kw, device=loaded.device)
        pw = state.prompt_width
        nfe = torch.zeros(len(prompts), dtype=torch.long)
        done = torch.zeros(len(prompts), dtype=torch.bool)
        while not bool(done.all()):
            logits = model_logits(loaded.model, state.canvas, state.attention_mask, state.position_ids())[:, pw:]
            logits = logits.float()
            logits[..., loaded.mask_id] = float("-inf")
            probs = torch.softmax(logits, -1)
            conf, argmax = probs.max(-1)
            gen_ids = state.canvas[:, pw:]
            masked = gen_ids == loaded.mask_id
            commit = masked & (argmax == answer)
            top = conf.masked_fill(~masked, -1.0).argmax(-1)
            none = ~commit.any(-1) & masked.any(-1)
            commit[none, top[none]] = True
            commit &= ~done[:, None]
            state.canvas[:, pw:] = torch.where(commit, argmax, gen_ids)
            nfe += (~done).long()
            left = state.canvas[:, pw:] == loaded.mask_id
            mask_before = left.long().cumsum(-1) - left.long()
            eos_done = ((state.canvas[:, pw:] == loaded.eos_id) & (mask_before == 0)).any(-1)
            done |= ~left.any(-1) | eos_done
        for k, ex in enumerate(chunk):
            ids = state.canvas[k, pw:].tolist()
            rows.append({"reward": task.reward(loaded.decode(ids)[0], ex), "nfe": int(nfe[k])})
    return rows


class PromptCache:
    """Per-prompt results of greedy decodes (deterministic, so reusable across runs) in a JSON file,
    keyed by strings the caller builds; ``None``: no file, every result computed. Several benchmark
    processes may share one file: it is re-read before a miss is computed and merged before writing."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.data = json.loads(self.path.read_text()) if self.path and self.path.exists() else {}

    def _reread(self) -> None:
        if self.path and self.path.exists():
            self.data = {**json.loads(self.path.read_text()), **self.data}

    def get(self, key: str, run) -> list[dict]:
        if key not in self.data:
            self._reread()
        if key not in self.data:
            self.data[key] = run()
            if self.path:
                # one writer at a time (a lock file beside it), each through its own temporary file
                with open(self.path.with_suffix(".lock"), "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    self._reread()
                    tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(self.data))
                    tmp.replace(self.path)
        return self.data[key]


def prompt_key(task: str, n: int, seed: int, path: str, sampler: str, setting: str) -> str:
    """The cache key of one decode of a test set: task, its size and seed, the directory decoded with, the
    sampler and its setting."""
    return "|".join([task, str(n) + (f"@{seed}" if seed else ""), path, sampler, setting])


def add_front_arguments(ap: argparse.ArgumentParser, name: str) -> None:
    """The options every front benchmark shares: test prompts, the policy knobs, batch, output name, cache."""
    ap.add_argument("--tasks", default="cd3,sudoku")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated test prompts (another seed: a "
                    "fresh test set, to confirm a front measured on seed 0)")
    ap.add_argument("--knobs", default=",".join(map(str, KNOBS)), help="the policy thresholds swept")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--name", default=name)
    ap.add_argument("--cache", default=None, help="JSON file of per-prompt results reused across runs and "
                    "benchmarks (greedy decodes are deterministic), keyed by task, test set, directory, sampler "
                    "and setting")


def summarise(per: list[dict]) -> dict:
    n = len(per)
    r = [x["reward"] for x in per]
    mean = sum(r) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in r) / max(n - 1, 1) / n)
    return {"accuracy": mean, "se": se, "mean_nfe": sum(x["nfe"] for x in per) / n}


def nfe_at_accuracy(front: list[tuple[float, float]], acc: float) -> float:
    """Least mean NFE at which fixed gammas reach accuracy ``acc``, from (nfe, accuracy) points, mixing
    two of them across prompts (nan when none reaches it)."""
    best = min((n for n, a in front if a >= acc), default=float("nan"))
    for n1, a1 in front:
        for n2, a2 in front:
            if a1 < acc <= a2:
                t = (acc - a1) / (a2 - a1)
                mixed = n1 + t * (n2 - n1)
                best = mixed if math.isnan(best) else min(best, mixed)
    return best


def add_front_columns(rows: list[dict]) -> None:
    """eb_nfe_at_acc and saving (1 - NFE / eb_nfe_at_acc) for every row, per task."""
    for task in {r["task"] for r in rows}:
        front = [(r["mean_nfe"], r["accuracy"]) for r in rows if r["task"] == task and r["sampler"] == "eb"]
        for r in rows:
            if r["task"] == task:
                eb = nfe_at_accuracy(front, r["accuracy"])
                r["eb_nfe_at_acc"] = eb
                r["saving"] = 1 - r["mean_nfe"] / eb if eb == eb and eb > 0 else float("nan")


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per task and sampler: the cheapest point within one SE of the most accurate fixed gamma's
    accuracy, against the cheapest fixed gamma within one SE of it."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        eb = [r for r in rows if r["task"] == task and r["sampler"] == "eb"]
        top = max(eb, key=lambda r: r["accuracy"])
        target = top["accuracy"] - top["se"]
        eb_best = min((r for r in eb if r["accuracy"] >= target), key=lambda r: r["mean_nfe"])
        for name in dict.fromkeys(r["name"] for r in rows if r["task"] == task and r["sampler"] != "eb"):
            cands = [r for r in rows if r["task"] == task and r["name"] == name and r["accuracy"] >= target]
            if not cands:
                out.append({"task": task, "name": name, "setting": "(none within 1 SE)", "target": target})
                continue
            best = min(cands, key=lambda r: r["mean_nfe"])
            savings = [r["saving"] for r in cands if r.get("saving") == r.get("saving") and "saving" in r]
            out.append({"task": task, "name": name, "setting": best["setting"], "target": target,
                        "accuracy": best["accuracy"], "mean_nfe": best["mean_nfe"], "eb_setting": eb_best["setting"],
                        "eb_accuracy": eb_best["accuracy"], "eb_mean_nfe": eb_best["mean_nfe"],
                        "fewer_nfe": 1 - best["mean_nfe"] / eb_best["mean_nfe"],
                        "best_saving_vs_front": max(savings) if savings else float("nan")})
    add_oracle_share(out)
    return out


def add_oracle_share(summary: list[dict]) -> None:
    """``of_oracle`` on every summary row: its ``fewer_nfe`` as a share of the step oracle's on the same task (the
    part of the oracle's saving over the fixed gammas that the sampler takes; nan where the task has no oracle
    row or the oracle saves nothing)."""
    oracle = {r["task"]: r.get("fewer_nfe", float("nan")) for r in summary if r["name"] == "oracle"}
    for r in summary:
        o, f = oracle.get(r["task"], float("nan")), r.get("fewer_nfe", float("nan"))
        r["of_oracle"] = f / o if o == o and o > 0 and f == f else float("nan")


def mixed(rows: list[dict], tasks: list[str], per_prompt: dict, by: str = "name") -> list[dict]:
    """Equal parts of each task: the per-prompt results pooled (so the SE is that of the pooled stream), for
    each (row[by], sampler, setting) decoded on every task; ``per_prompt`` is keyed (task, row[by], sampler,
    setting)."""
    out = []
    for key in dict.fromkeys((r[by], r["sampler"], r["setting"]) for r in rows):
        if all((t, *key) in per_prompt for t in tasks):
            pooled = [x for t in tasks for x in per_prompt[(t, *key)]]
            out.append({"task": "mixed", by: key[0], "sampler": key[1], "setting": key[2], **summarise(pooled)})
    return out


@torch.no_grad()
def policy_cost(loaded, policy, data, gen: int, batch: int = 128, repeats: int = 31) -> dict:
    """The policy's own cost: a batched first step with policy rows against the same step with eb rows.

    Timed in ``repeats`` adjacent pairs (the order alternating), so drift on a shared machine hits both
    alike; ``policy_share`` is the median over the pairs of policy / eb - 1, the step times the medians.
    ``policy_part`` is measured inside the policy steps themselves: the median share of the sampler's
    step-policy part (features, the network, its commits: ``sampler._policy_step``) over the rest of the
    same step, so a machine whose speed drifts between two steps does not move it (it leaves out the policy
    rows' other differences from eb rows, e.g. handing out the hidden state)."""
    prompts = [loaded.encode(ex["prompt"]) for ex in data[:batch]]
    kw = dict(mask_id=loaded.mask_id, eos_id=loaded.eos_id, pad_id=loaded.pad_id, device=loaded.device)
    real_part, inside = sampler_module._policy_step, [0.0]

    def timed_part(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_part(*args, **kwargs)
        inside[0] += time.perf_counter() - t0
        return out

    def timed(params):
        state = init_state(prompts, params, **kw, policy=policy)
        inside[0] = 0.0
        t0 = time.perf_counter()
        denoise_step(loaded.model, state)
        return time.perf_counter() - t0, inside[0]

    eb_params, policy_params = SamplingParams("eb", gen, threshold=0.1), SamplingParams("policy", gen)
    sampler_module._policy_step = timed_part
    try:
        timed(eb_params), timed(policy_params)  # warm-up
        eb, pol, part = [], [], []
        for i in range(repeats):
            first, second = (eb_params, policy_params) if i % 2 == 0 else (policy_params, eb_params)
            a, b = timed(first), timed(second)
            (e, _), (p, q) = (a, b) if first is eb_params else (b, a)
            eb.append(e), pol.append(p), part.append(q / (p - q))
    finally:
        sampler_module._policy_step = real_part
    ratios = sorted(p / e for p, e in zip(pol, eb))
    return {"rows": len(prompts), "eb_step_ms": 1000 * sorted(eb)[repeats // 2],
            "policy_step_ms": 1000 * sorted(pol)[repeats // 2], "policy_share": ratios[repeats // 2] - 1,
            "policy_part": sorted(part)[repeats // 2]}


def plot(rows: list[dict], panels: list[str], path) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    names = list(dict.fromkeys(r["name"] for r in rows if r["sampler"] == "policy"))
    colors = plt.get_cmap("tab10").colors
    for ax, task in zip(axes[0], panels):
        def pts(pred):
            return sorted((r["mean_nfe"], r["accuracy"]) for r in rows if r["task"] == task and pred(r))
        ax.plot(*zip(*pts(lambda r: r["sampler"] == "eb")), "-", color="gray", marker=".", label="EB fixed gamma")
        for k, name in enumerate(names):
            p = pts(lambda r: r["name"] == name)
            if p:
                ax.plot(*zip(*p), "-", color=colors[k % 10], marker="o", ms=4, label=f"policy {name} (knob sweep)")
        for sampler, marker, color in (("learned", "*", "gold"), ("oracle", "x", "black"), ("steps", "s", "gray")):
            for n, a in pts(lambda r: r["sampler"] == sampler):
                ax.plot(n, a, marker, color=color, ms=12 if marker == "*" else 7,
                        mec="black" if marker == "*" else color, label=sampler)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean NFE (log scale)")
        ax.set_ylabel("accuracy (mean reward)")
        ax.set_title(task if task != "mixed" else "mixed stream (equal parts)")
        ax.grid(alpha=0.3)
    handles: dict = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.tight_layout()
    fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.97), fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _shown(path: str) -> str:
    """A path relative to the repository when it is inside it."""
    root = RESULTS.parents[1]
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--policies", required=True, help="comma-separated NAME=DIR: model directories holding a "
                    "step policy trained on --model (their own weights are not used)")
    add_front_arguments(ap, "step_policy/step_policy")
    ap.add_argument("--cost-calls", type=int, default=3, help="calls of the policy's cost measurement (each "
                    "31 paired steps), one table row each: on a shared machine they show its spread")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    loaded = load_model(args.model)
    policies = {}
    for item in args.policies.split(","):
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--policies: expected NAME=DIR, got {item!r}")
        policy = load_model(path).step_policy
        if policy is None:
            raise SystemExit(f"--policies: {path} has no step policy (step_policy.json)")
        policies[name] = policy
    knobs = [float(k) for k in args.knobs.split(",")]
    rows, per_prompt, t0 = [], {}, time.time()
    cache = PromptCache(args.cache)
    paths = {"policy": dict(i.partition("=")[::2] for i in args.policies.split(","))}

    def add(task, name, sampler, setting, run):
        key = prompt_key(task, args.n, args.seed, paths["policy"].get(name, loaded.path), sampler, setting)
        per = per_prompt[(task, name, sampler, setting)] = cache.get(key, run)
        rows.append({"task": task, "name": name, "sampler": sampler, "setting": setting, **summarise(per)})
        print(json.dumps(rows[-1]), flush=True)

    for task_name in tasks:
        task, gen = get_task(task_name), get_task(task_name).GEN_LENGTH
        data = list(task.make_dataset("test", args.n, seed=args.seed))
        bs = args.batch_size
        add(task_name, "steps", "steps", f"steps={gen}",
            lambda: decode(loaded, task, data, SamplingParams("steps", gen), bs))
        for g in DEFAULT_GRID:
            add(task_name, "eb", "eb", f"gamma {g:.4g}",
                lambda: decode(loaded, task, data, SamplingParams("eb", gen, threshold=g), bs))
        if loaded.threshold_head is not None:
            add(task_name, "learned", "learned", "head",
                lambda: decode(loaded, task, data, SamplingParams("learned", gen), bs))
        add(task_name, "oracle", "oracle", "step oracle", lambda: oracle_decode(loaded, task, data, gen, bs))
        for name, policy in policies.items():
            for k in knobs:
                add(task_name, name, "policy", f"p >= {k:g}",
                    lambda: decode(loaded, task, data, SamplingParams("policy", gen, threshold=k), bs, policy))
    if len(tasks) > 1:
        rows += mixed(rows, tasks, per_prompt)
    add_front_columns(rows)
    summary = summary_rows(rows)
    first = get_task(tasks[0])
    cost_data = list(first.make_dataset("test", 128, seed=0))
    cost = [{"policy": name, "call": k + 1, **policy_cost(loaded, p, cost_data, first.GEN_LENGTH)}
            for name, p in policies.items() for k in range(args.cost_calls)]
    panels = tasks + (["mixed"] if len(tasks) > 1 else [])
    (RESULTS / args.name).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, panels, RESULTS / f"{args.name}.png")
    text = (f"# The per-step commit policy vs fixed gamma, the per-prompt head and the step oracle\n\n"
            f"Model `{_shown(loaded.path)}`; policies: " + ", ".join(f"`{n}` = `{p}`" for n, p in
                                                            (i.partition('=')[::2] for i in args.policies.split(",")))
            + f". {args.n} generated test prompts per task (seed {args.seed}), greedy, one {first.GEN_LENGTH}-token block, one "
            f"run each (deterministic); `mixed` pools the tasks' prompts in equal parts. `se`: standard error of the "
            f"accuracy. `eb_nfe_at_acc`: mean NFE fixed gammas need for the row's accuracy (two neighbouring "
            f"gammas mixed across prompts); `saving` = 1 - mean_nfe / eb_nfe_at_acc; `of_oracle`: the row's "
            f"`fewer_nfe` over the step oracle's on the same task. Machine: {machine()}; "
            f"{time.time() - t0:.0f} s.\n\n## Equal accuracy (within one SE of the most accurate fixed gamma)\n\n"
            + markdown_table(summary, ["task", "name", "setting", "accuracy", "mean_nfe", "eb_setting", "eb_accuracy",
                                       "eb_mean_nfe", "fewer_nfe", "of_oracle", "best_saving_vs_front"])
            + "\n\n## The policy's own cost per step (first step of a batch, median)\n\n"
            + markdown_table(cost, ["policy", "call", "rows", "eb_step_ms", "policy_step_ms", "policy_share",
                                    "policy_part"])
            + "\n\n## Every point\n\n"
            + markdown_table(rows, ["task", "name", "setting", "accuracy", "se", "mean_nfe", "eb_nfe_at_acc", "saving"])
            + f"\n\n![step policy]({Path(args.name).name}.png)\n")
    print(save(args.name, text, {"rows": rows, "summary": summary, "cost": cost}))


if __name__ == "__main__":
    main()
