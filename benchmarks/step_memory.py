"""Peak memory of one batched sampler step at a 126,464-token vocabulary (LLaDA's), before and after the
sampler materialised logits for the current block only.

One :func:`denoise_step` of a fresh batch (``--rows`` rows, a 16-token prompt, gen 256, block 32, ``steps``
sampler, greedy) on a small random native LLaDA (2 layers, width 256, vocabulary 126,464: the logits, not the
layers, are what a step's memory is about). Each measurement runs in its own process: the peak resident
memory (``ru_maxrss``) after the step minus the resident memory just before it (model and state built,
nothing else run). "before" runs the sampler of git revision ``--before-ref`` (extracted with ``git archive``
into a temporary directory), "after" this checkout's. The "before" step at 32 rows needs about 17 GB (a
float32 (32, 272, 126464) logits tensor plus three float32 copies of its answer region), more than a shared
machine should be asked for, so ``--before-max-rows`` caps it; the table then adds the linear fit over the
measured row counts (memory per row is constant) at 32 rows, marked as extrapolated. On a GPU
(``--device cuda``) the peak is ``torch.cuda.max_memory_allocated``.

    python -m benchmarks.step_memory [--rows 1,2,4,8,32] [--before-ref REV] [--before-max-rows 8]

Writes docs/results/server/step_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from benchmarks.common import machine, markdown_table, save

ROOT = Path(__file__).resolve().parents[1]
VOCAB, GEN, BLOCK, PROMPT = 126464, 256, 32, 16

MEASURE = r"""
import json, resource, sys, torch
from diffpo_serve.dllm.families.llada import LLaDAConfig, LLaDAModelLM
from diffpo_serve.dllm.sampler import SamplingParams, denoise_step, init_state
rows, device, dtype = int(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3])
torch.manual_seed(0)
cfg = LLaDAConfig(d_model=256, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=512, vocab_size=%(vocab)d,
                  embedding_size=%(vocab)d, block_type="llama", rope=True, layer_norm_type="rms",
                  activation_type="silu", weight_tying=False, mask_token_id=126336)
model = LLaDAModelLM(cfg).to(device=device, dtype=dtype).eval()
prompts = [[(7 * r + i) %% 1000 + 10 for i in range(%(prompt)d)] for r in range(rows)]
params = SamplingParams("steps", %(gen)d, block_length=%(block)d, steps=%(gen)d)
state = init_state(prompts, params, mask_id=126336, eos_id=126081, pad_id=126081, device=device, align=0)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
if device.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = rss()
denoise_step(model, state)
if device.startswith("cuda"):
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(json.dumps({"rows": rows, "peak_bytes": peak}))
""" % dict(vocab=VOCAB, prompt=PROMPT, gen=GEN, block=BLOCK)


def measure(code_dir: Path, rows: int, device: str, dtype: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(code_dir))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(rows), device, dtype], env=env, cwd=code_dir,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"measurement failed ({code_dir}, {rows} rows):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def checkout(ref: str, into: Path) -> Path:
    """``diffpo_serve`` of git revision ``ref`` extracted under ``into``."""
    archive = subprocess.run(["git", "archive", ref, "diffpo_serve"], cwd=ROOT, capture_output=True, check=True)
    tar = into / "code.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into


def fit(points: list[tuple[int, int]], rows: int) -> float:
    """Least-squares line through (rows, bytes) evaluated at ``rows``."""
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / max(sum((x - mx) ** 2 for x, _ in points), 1e-9)
    return my + slope * (rows - mx)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,32")
    ap.add_argument("--before-ref", default=None, help="git revision whose sampler is 'before' (none: after only)")
    ap.add_argument("--before-max-rows", type=int, default=8, help="largest row count run with the old sampler")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--name", default="server/step_memory")
    args = ap.parse_args(argv)
    sizes = [int(r) for r in args.rows.split(",")]
    gib = 1 << 30
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("after", ROOT)]
        if args.before_ref:
            variants.insert(0, ("before", checkout(args.before_ref, Path(tmp))))
        for label, code in variants:
            points = []
            for rows in sizes:
                if label == "before" and rows > args.before_max_rows:
                    continue
                peak = measure(code, rows, args.device, args.dtype)
                points.append((rows, peak))
                results.append({"sampler": label, "rows": rows, "peak_GiB": peak / gib, "measured": "yes"})
                print(results[-1], flush=True)
            if label == "before" and len(points) > 1:
                for rows in sizes:
                    if rows > args.before_max_rows:
                        results.append({"sampler": label, "rows": rows, "peak_GiB": fit(points, rows) / gib,
                                        "measured": f"no: linear fit over {len(points)} measured row counts"})
    text = (f"# Peak memory of one sampler step (vocabulary {VOCAB:,}, gen {GEN}, block {BLOCK}, prompt {PROMPT})\n\n"
            f"Random native LLaDA (2 layers, width 256), {args.dtype}, device {args.device}; one run per row count, "
            f"each in its own process. before = git {args.before_ref or '-'}, after = this checkout.\n\n"
            + markdown_table(results, ["sampler", "rows", "peak_GiB", "measured"]) + f"\n\nMachine: {machine()}\n")
    print(text)
    save(args.name, text, {"rows": results, "before_ref": args.before_ref, "dtype": args.dtype,
                           "device": args.device, "machine": machine()})


if __name__ == "__main__":
    main()
