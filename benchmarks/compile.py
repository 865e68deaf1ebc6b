"""Eager vs ``--compile`` (torch.compile of the transformer layers): speed, agreement, batch dependence.

For float32 and bfloat16 (each with the sampler's own prompt layout for that dtype), one model loaded
as it is and one with ``load_model(compile=True)``:
  - load time (the compiled one's includes compilation and warm-up; inductor's on-disk cache,
    warm after a first run, shortens it; also measured in a fresh process with an empty cache),
  - one denoising step in ms per row at several batch sizes, eager and compiled measured in
    alternation, ``--rounds`` rounds of ``--reps`` first steps each (median of the round medians;
    the speed-up is the median of the per-round ratios),
  - accuracy, mean NFE and tokens/s of ``evaluate`` (batches of 64) on ``--n`` test prompts per task
    with the model's default sampler, and how many of those prompts decode to another completion or
    NFE compiled than eager,
  - how many of 256 mixed prompts decode differently in batches of 64 than alone, compiled.
One process, one torch thread; greedy decoding is deterministic, so the counts are from one run.
Writes docs/results/server/compile.{md,json}.

    python -m benchmarks.compile [--model DIR] [--n 500] [--rounds 5] [--reps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import batch_dependent, machine, markdown_table, load_model, save
from benchmarks.dtype import DTYPES, TASKS, samplers, step_ms_per_row

from diffpo_serve.dllm.sampler import SamplingParams, prompt_alignment
from training.evaluate import evaluate
from training.tasks import get_task


def cold_start_seconds(model: str | None, dtype: str) -> float:
    """Seconds ``load_model(compile=True)`` takes in a fresh process with an empty inductor cache."""
    code = ("import sys, time, torch; torch.set_num_threads(1)\n"
            "from diffpo_serve.dllm.loading import load_model\n"
            "t = time.perf_counter(); load_model(sys.argv[1] or None, dtype=sys.argv[2], compile=True)\n"
            "print(time.perf_counter() - t)\n")
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run([sys.executable, "-c", code, model or "", dtype], capture_output=True, text=True,
                             check=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    return float(out.stdout.split()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--n", type=int, default=500, help="test prompts per task")
    ap.add_argument("--rounds", type=int, default=5, help="alternating eager/compiled timing rounds")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per batch size and round")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--invariance-prompts", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    data = {t: get_task(t).make_dataset("test", args.n) for t in TASKS}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    speed_rows, task_rows = [], []
    for dtype in DTYPES:
        started = time.perf_counter()
        eager = load_model(args.model, dtype=dtype)
        eager_s = time.perf_counter() - started
        started = time.perf_counter()
        compiled = load_model(args.model, dtype=dtype, compile=True)
        compiled_s = time.perf_counter() - started
        align = prompt_alignment(eager.model)
        mixed = [eager.encode(data[t][i]["prompt"]) for i in range(args.n) for t in TASKS]
        times = {(kind, b): [] for kind in ("eager", "compiled") for b in sizes}
        for _ in range(args.rounds):
            for b in sizes:
                for kind, loaded in (("eager", eager), ("compiled", compiled)):
                    times[kind, b].append(step_ms_per_row(loaded, mixed, b, args.reps, align))
        for b in sizes:
            e, c = times["eager", b], times["compiled", b]
            row = {"dtype": dtype, "batch": b, "eager ms/row": round(statistics.median(e), 3),
                   "compiled ms/row": round(statistics.median(c), 3),
                   "speed-up": round(statistics.median(x / y for x, y in zip(e, c)), 2)}
            speed_rows.append(row)
            print(row, flush=True)
        sampler, threshold = samplers(eager)[0]
        for task in TASKS:
            params = SamplingParams(sampler, get_task(task).GEN_LENGTH, threshold=threshold)
            results = {kind: evaluate(loaded, task, data[task], params, progress=False)
                       for kind, loaded in (("eager", eager), ("compiled", compiled))}
            differ = sum(a["completion"] != b["completion"] or a["nfe"] != b["nfe"]
                         for a, b in zip(results["eager"].rows, results["compiled"].rows))
            row = {"dtype": dtype, "task": task, "sampler": sampler}
            for kind, r in results.items():
                s = r.summary()
                row[f"{kind} accuracy"], row[f"{kind} NFE"] = round(s["accuracy"], 3), round(s["mean_nfe"], 2)
                row[f"{kind} tok/s"] = round(s["tokens_per_second"])
            row["prompts decoded differently"] = differ
            row["load s (eager / compiled)"] = f"{eager_s:.1f} / {compiled_s:.1f}"
            if task == TASKS[0]:
                row["compiled load s, empty inductor cache"] = round(cold_start_seconds(args.model, dtype), 1)
                params0 = SamplingParams(sampler, 16, threshold=threshold)
                row["compiled: batch-dependent of 256"] = batch_dependent(
                    compiled, mixed[:args.invariance_prompts], params0, align=align)
            task_rows.append(row)
            print(row, flush=True)
    text = (f"# Eager vs --compile\n\nModel: {eager.name}; `load_model(compile=True)` compiles its transformer "
            f"layers ({compiled.compiled}) with torch.compile (dynamic shapes) and warms them up. Machine: "
            f"{machine()}; {time.time() - t0:.0f} s.\n\n"
            f"One denoising step (eb gamma 0.3, 16 tokens, mixed sudoku/countdown test prompts, each dtype "
            f"with its own prompt layout), ms per row: median of {args.rounds} alternating rounds of "
            f"{args.reps} first steps; speed-up: median of the per-round ratios.\n\n"
            + markdown_table(speed_rows, list(speed_rows[0]))
            + f"\n\n`evaluate` (batches of 64, greedy) on {args.n} test prompts per task, eager and compiled; "
            f"prompts decoded differently: other tokens or another NFE compiled than eager. Batch-dependent: "
            f"of the first {args.invariance_prompts} mixed prompts, those that decode differently in batches "
            f"of 64 than alone with the compiled model (the model's default sampler, 16 tokens). Load time "
            f"includes compilation and warm-up: in this process, after inductor's on-disk cache may have been "
            f"filled by an earlier run, and in a fresh process with an empty cache (one run each).\n\n"
            + markdown_table(task_rows, list(dict.fromkeys(k for r in task_rows for k in r))) + "\n")
    print(save("server/compile", text, {"speed": speed_rows, "tasks": task_rows}))


if __name__ == "__main__":
    main()
