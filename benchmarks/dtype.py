"""float32 vs bfloat16 decoding of one model: accuracy, NFE, speed and batch dependence, side by side.

For each task and sampler, the model's test prompts are decoded greedily by ``evaluate`` (the code
behind ``diffpo-train eval``, batches of 64) with the weights in float32 and in bfloat16; the table
gives accuracy (exact), mean NFE and tokens/s of each. Then the per-row cost of one denoising step at
several batch sizes (the median of ``--reps`` first steps on fresh states of mixed prompts) and how
many prompts decode to other tokens or another NFE in a batch of 64 than alone, for each prompt
layout the sampler has (tight left padding, float32's; aligned, half precision's). The count is
taken for batches of mixed prompt lengths and for batches that hold one length each (no padding),
which tells padding apart from batch size. One process, one torch thread; greedy decoding is
deterministic, so one run each (the timings are medians).
Writes docs/results/server/dtype.{md,json}.

    python -m benchmarks.dtype [--model DIR] [--n 1000] [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import batch_dependent, machine, markdown_table, load_model, save

from diffpo_serve.dllm.sampler import SamplingParams, denoise_step, init_state, prompt_alignment
from training.evaluate import evaluate
from training.tasks import get_task

TASKS = ("sudoku", "cd3")
DTYPES = ("float32", "bfloat16")


def samplers(loaded) -> list[tuple[str, float | None]]:
    learned = [("learned", None)] if loaded.threshold_head is not None else []
    return learned + [("eb", 0.3), ("steps", None)]


def step_ms_per_row(loaded, prompts: list[list[int]], batch: int, reps: int, align: int) -> float:
    params = SamplingParams("eb", 16, threshold=0.3)
    times = []
    for _ in range(reps):
        state = init_state(prompts[:batch], [params] * batch, mask_id=loaded.mask_id, eos_id=loaded.eos_id,
                           pad_id=loaded.pad_id, device="cpu", align=align)
        t0 = time.perf_counter()
        denoise_step(loaded.model, state)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / batch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--n", type=int, default=1000, help="test prompts per task")
    ap.add_argument("--reps", type=int, default=20, help="timed steps per batch size")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--invariance-prompts", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    models = {d: load_model(args.model, dtype=d) for d in DTYPES}
    data = {t: get_task(t).make_dataset("test", args.n) for t in TASKS}
    accuracy_rows = []
    for task in TASKS:
        for sampler, threshold in samplers(models["float32"]):
            row = {"task": task, "sampler": sampler + (f" {threshold:g}" if threshold is not None else "")}
            params = SamplingParams(sampler, get_task(task).GEN_LENGTH, threshold=threshold)
            for d in DTYPES:
                r = evaluate(models[d], task, data[task], params, progress=False).summary()
                row[f"{d}_accuracy"], row[f"{d}_exact"] = round(r["accuracy"], 3), round(r["exact"], 3)
                row[f"{d}_nfe"], row[f"{d}_tok_s"] = round(r["mean_nfe"], 2), round(r["tokens_per_second"])
            accuracy_rows.append(row)
            print(row, flush=True)
    mixed = [ex["prompt"] for i in range(args.n) for t in TASKS for ex in [data[t][i]]]
    first = samplers(models["float32"])[0]  # the model's default: learned when it has a head
    params = SamplingParams(first[0], 16, threshold=first[1])
    layout_rows = []
    for d in DTYPES:
        loaded = models[d]
        prompts = [loaded.encode(p) for p in mixed]
        subset = prompts[:args.invariance_prompts]
        by_length: dict[int, list[list[int]]] = {}
        for prompt in subset:
            by_length.setdefault(len(prompt), []).append(prompt)
        own = prompt_alignment(loaded.model)
        for align in sorted({0, own}):  # the tight left-padded layout (float32's), then the model's own if other
            row = {"dtype": d, "layout": f"aligned to {align}" if align else "tight, left-padded",
                   "used by default": align == own}
            row.update({f"batch {b} ms/row": round(step_ms_per_row(loaded, prompts, b, args.reps, align), 3)
                        for b in map(int, args.batch_sizes.split(","))})
            row["batch-dependent, mixed lengths"] = batch_dependent(loaded, subset, params, align=align)
            row["batch-dependent, one length per batch"] = sum(batch_dependent(loaded, group, params, align=align)
                                                               for group in by_length.values())
            layout_rows.append(row)
            print(row, flush=True)
    cols = ["task", "sampler"] + [f"{d}_{k}" for d in DTYPES for k in ("accuracy", "exact", "nfe", "tok_s")]
    text = (f"# float32 vs bfloat16\n\nModel: {models['float32'].name}. {args.n} test prompts per task (seed 0), "
            f"greedy, decoded by `evaluate` in batches of 64 with each dtype. Machine: {machine()}; "
            f"{time.time() - t0:.0f} s.\n\n" + markdown_table(accuracy_rows, cols)
            + "\n\nBy prompt layout: one denoising step in milliseconds per row (median of "
            f"{args.reps} first steps of mixed sudoku/countdown prompts, eb gamma 0.3), and how many of the "
            f"first {args.invariance_prompts} mixed prompts decode (greedy, {first[0]} sampler) to other tokens "
            f"or another NFE in batches of 64 than alone, with mixed prompt lengths in a batch or one length "
            f"per batch (no padding). Tight: prompts left-padded to the batch's longest; aligned: prompts "
            f"first, both canvas regions padded to multiples of that many columns (`prompt_alignment`).\n\n"
            + markdown_table(layout_rows, list(layout_rows[0])) + "\n")
    print(save("server/dtype", text, {"accuracy": accuracy_rows, "layouts": layout_rows}))


if __name__ == "__main__":
    main()
