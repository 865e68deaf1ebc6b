"""Decoder throughput: the batched sampler vs a one-prompt-at-a-time LLaDA loop, same model and prompts.

Both decode the same prompts greedily with the ``steps`` sampler at equal steps (no early stop at EOS,
so both do exactly ``steps`` forward passes per prompt), measured side by side in one process and
repeated ``--runs`` times (interleaved). Reports generated tokens per second (prompts x gen_length /
wall seconds), the speed-up ratio, and whether the outputs agree token for token. Writes
docs/results/server/decoder_throughput.{md,json}.

    python -m benchmarks.decoder_throughput [--model DIR] [--n 256] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import machine, markdown_table, load_model, save
from benchmarks.llada_reference import llada_generate

from diffpo_serve.dllm.sampler import SamplingParams, generate
from training.tasks import get_task


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=256, help="prompts (half sudoku, half countdown)")
    ap.add_argument("--batch-sizes", default="16,64,128", help="batched sampler batch sizes to compare")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", default="16,4", help="comma-separated step counts")
    args = ap.parse_args(argv)
    loaded = load_model(args.model)
    m = loaded.model
    gen = 16
    data = [ex["prompt"] for t in ("sudoku", "cd3") for ex in get_task(t).make_dataset("test", args.n // 2)]
    prompts = [loaded.encode(p) for p in data]
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        params = SamplingParams("steps", gen, steps=steps)
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        ours, ref, agree = {b: [] for b in sizes}, [], True
        for _ in range(args.runs):
            for b in sizes:
                t0 = time.perf_counter()
                outs = [generate(m, prompts[i:i + b], params, mask_id=loaded.mask_id, eos_id=loaded.eos_id,
                                 pad_id=loaded.pad_id, stop_at_eos=False).sequences
                        for i in range(0, len(prompts), b)]
                ours[b].append(len(prompts) * gen / (time.perf_counter() - t0))
                batched = torch.cat(outs)
            t0 = time.perf_counter()
            alone = [llada_generate(m, p, gen_length=gen, block_length=gen, steps=steps, mask_id=loaded.mask_id)
                     for p in prompts]
            ref.append(len(prompts) * gen / (time.perf_counter() - t0))
            agree &= all(torch.equal(a, b) for a, b in zip(alone, batched))
        for b in sizes:
            row = {"steps": steps, "batch_size": b, "prompts": len(prompts),
                   "batched_tok_s": statistics.median(ours[b]), "reference_tok_s": statistics.median(ref),
                   "speedup": statistics.median(o / r for o, r in zip(ours[b], ref)), "outputs_identical": agree}
            print(row, flush=True)
            rows.append(row)
    text = (f"# Decoder throughput\n\nModel `{loaded.name}`; {len(prompts)} test prompts (half sudoku, half "
            f"countdown), gen_length {gen}, greedy `steps` sampler, batched at several batch sizes vs one prompt at a "
            f"time (benchmarks/llada_reference.py); speed-up = median over {args.runs} interleaved runs of the "
            f"per-run ratio; outputs_identical compares the greedy tokens. Machine: {machine()}.\n\n"
            + markdown_table(rows, list(rows[0])) + "\n")
    print(save("server/decoder_throughput", text, rows))


if __name__ == "__main__":
    main()
