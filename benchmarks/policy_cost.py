"""The step policy's cost at real dLLM lengths: a step with ``policy`` rows against the same step with ``eb`` rows.

LLaDA's published setting decodes a 256-token answer in blocks of 32. A random native LLaDA (``--preset mid``:
8 layers, width 512, vocabulary 126,464, float32; or ``tiny`` for a smoke run) with a random step policy of the
shipped kind (``basic+hidden`` features, width 64) decodes ``--batch-sizes`` prompts of ``--prompt`` random tokens
to ``--gen`` tokens in blocks of ``--block``. For each batch size and each block in ``--blocks`` (the earlier blocks
given as random tokens, so the decode starts there), one :func:`denoise_step` of policy rows and one of eb rows
(gamma 0.1) are timed in ``--pairs`` adjacent pairs, their order alternating, so drift on the machine hits both
alike; ``policy_share`` = the median over the pairs of policy / eb - 1. A step's cost beyond eb's is what the
policy adds: its features, its network, and whatever logits it makes the step compute (a policy that reads
columns past its block pays the vocabulary projection there at every pass).

``--accuracy``: instead, what a sampler change does to the shipped model's decodes in blocks: the bundled model's
``policy`` sampler (its operating point) and ``eb`` (gamma 0.3), greedy, on ``--n`` generated test prompts of each
of ``--tasks`` decoded in blocks of ``--block-lengths``: mean reward, exact match and mean NFE.

``--ref REV`` also measures git revision REV's sampler (extracted with ``git archive``), each variant in its own
process: the table then compares the two side by side. Timing: run it with nothing else on the machine.

    python -m benchmarks.policy_cost [--preset mid] [--batch-sizes 1,16] [--blocks 0,3,7] [--pairs 9] [--ref REV]

Writes docs/results/step_policy/policy_cost[_NAME].{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import markdown_table, save
from benchmarks.step_memory import checkout

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"tiny": (64, 4, 2, 128, 1024), "mid": (512, 8, 8, 1376, 126464)}  # as benchmarks/kv_cache.py

MEASURE = r"""
import json, statistics, sys, time, torch
from diffpo_serve.dllm.families.llada import LLaDAConfig, LLaDAModelLM
from diffpo_serve.dllm.sampler import SamplingParams, denoise_step, init_state
from diffpo_serve.dllm.step_policy import StepPolicy
cfg = json.loads(sys.argv[1])
d, heads, layers, mlp, vocab = cfg["shape"]
mask, eos = (126336, 126081) if vocab > 126336 else (vocab - 1, vocab - 2)
torch.manual_seed(0)
model = LLaDAModelLM(LLaDAConfig(d_model=d, n_heads=heads, n_kv_heads=heads, n_layers=layers, mlp_hidden_size=mlp,
                                 vocab_size=vocab, embedding_size=vocab, block_type="llama", rope=True,
                                 layer_norm_type="rms", activation_type="silu", weight_tying=False,
                                 rope_theta=500000.0, mask_token_id=mask)).eval()
policy = StepPolicy(hidden_size=d, width=64, features="basic+hidden").eval()
gen, block, prompt = cfg["gen"], cfg["block"], cfg["prompt"]
g = torch.Generator().manual_seed(1)
results = []
for batch in cfg["batch_sizes"]:
    prompts = [torch.randint(10, 1000, (prompt,), generator=g).tolist() for _ in range(batch)]
    for k in cfg["blocks"]:
        given = [torch.randint(10, 1000, (k * block,), generator=g).tolist() + [mask] * (gen - k * block)
                 for _ in range(batch)]
        def step(sampler):
            params = SamplingParams(sampler, gen, block_length=block, threshold=0.1 if sampler == "eb" else None)
            state = init_state(prompts, params, mask_id=mask, eos_id=eos, pad_id=eos, answers=given, policy=policy)
            t0 = time.perf_counter()
            denoise_step(model, state)
            return time.perf_counter() - t0
        step("eb"), step("policy")  # warm-up
        eb, pol = [], []
        for i in range(cfg["pairs"]):
            order = ("eb", "policy") if i % 2 == 0 else ("policy", "eb")
            times = {s: step(s) for s in order}
            eb.append(times["eb"]); pol.append(times["policy"])
        share = statistics.median(p / e for p, e in zip(pol, eb)) - 1
        results.append({"batch": batch, "block": k, "lookahead_columns": gen - (k + 1) * block,
                        "eb_step_ms": 1000 * statistics.median(eb), "policy_step_ms": 1000 * statistics.median(pol),
                        "policy_share": share})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
print(json.dumps(results))
"""


ACCURACY = r"""
import json, sys
from diffpo_serve.dllm.loading import load_model
from diffpo_serve.dllm.sampler import SamplingParams, generate
from training.tasks import get_task
cfg = json.loads(sys.argv[1])
loaded = load_model(cfg["model"])
results = []
for name in cfg["tasks"]:
    task = get_task(name)
    data = list(task.make_dataset("test", cfg["n"], seed=0))
    prompts = [loaded.encode(ex["prompt"]) for ex in data]
    for block in cfg["block_lengths"]:
        for sampler, threshold in (("policy", None), ("eb", 0.3)):
            params = SamplingParams(sampler, task.GEN_LENGTH, block_length=block, threshold=threshold)
            rewards, nfe = [], []
            for i in range(0, len(prompts), 250):
                out = generate(loaded.model, prompts[i:i + 250], params, mask_id=loaded.mask_id, eos_id=loaded.eos_id,
                               pad_id=loaded.pad_id, head=loaded.threshold_head, policy=loaded.step_policy)
                rewards += [task.reward(loaded.decode(seq)[0], ex) for ex, seq in zip(data[i:i + 250],
                                                                                      out.sequences.tolist())]
                nfe += out.nfe.tolist()
            results.append({"task": name, "block_length": block, "sampler": sampler, "accuracy": sum(rewards) / len(rewards),
                            "exact": sum(r == 1 for r in rewards) / len(rewards), "mean_nfe": sum(nfe) / len(nfe)})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
print(json.dumps(results))
"""


def measure(code_dir: Path, cfg: dict, code: str = MEASURE) -> list[dict]:
    """Run ``code`` (:data:`MEASURE` or :data:`ACCURACY`) with the sampler of ``code_dir`` in its own process (the
    rest of the repository from this checkout)."""
    env = dict(os.environ, PYTHONPATH=f"{code_dir}{os.pathsep}{ROOT}")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], env=env, cwd=code_dir,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"measurement failed ({code_dir}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid", choices=list(PRESETS))
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--blocks", default="0,3,7", help="blocks whose first pass is timed (earlier blocks given)")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=9)
    ap.add_argument("--ref", default=None, help="git revision also measured, labelled by it")
    ap.add_argument("--name", default="", help="results under docs/results/step_policy/policy_cost_NAME")
    ap.add_argument("--accuracy", action="store_true", help="the decodes' accuracy and NFE instead of the cost")
    ap.add_argument("--tasks", default="cd3,sudoku", help="--accuracy: the tasks")
    ap.add_argument("--n", type=int, default=1000, help="--accuracy: test prompts per task")
    ap.add_argument("--block-lengths", default="4,8", help="--accuracy: the block lengths")
    args = ap.parse_args(argv)
    if args.accuracy:
        return accuracy(args)
    cfg = {"shape": PRESETS[args.preset], "batch_sizes": [int(b) for b in args.batch_sizes.split(",")],
           "blocks": [int(b) for b in args.blocks.split(",")], "gen": args.gen, "block": args.block,
           "prompt": args.prompt, "pairs": args.pairs}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [(f"git {args.ref}", checkout(args.ref, Path(tmp)))] if args.ref else []
        for label, code in variants + [("this checkout", ROOT)]:
            rows += [{"sampler": label, **r} for r in measure(code, cfg)]
    d, heads, layers, mlp, vocab = PRESETS[args.preset]
    text = (f"# The step policy's cost at real lengths\n\nRandom native LLaDA `{args.preset}` ({layers} layers, width "
            f"{d}, vocabulary {vocab:,}, float32) and a random `basic+hidden` step policy; {args.prompt}-token prompts, "
            f"gen {args.gen} in blocks of {args.block}; the first pass of each block shown (the earlier blocks given). "
            f"Medians over {args.pairs} adjacent eb / policy pairs of one step each; `policy_share` = median of "
            f"policy / eb - 1; `lookahead_columns` = answer columns after the block.\n\n"
            + markdown_table(rows, list(rows[0])) + "\n")
    print(text)
    name = f"step_policy/policy_cost_{args.name}" if args.name else "step_policy/policy_cost"
    save(name, text, {"rows": rows, "config": cfg, "ref": args.ref})


def accuracy(args) -> None:
    """``--accuracy``: the bundled model's policy and eb decodes in blocks, this checkout and ``--ref``."""
    from benchmarks.common import record_model
    from diffpo_serve.dllm.loading import BUNDLED_MODEL_DIR as BUNDLED_MODEL
    cfg = {"model": str(BUNDLED_MODEL), "tasks": args.tasks.split(","), "n": args.n,
           "block_lengths": [int(b) for b in args.block_lengths.split(",")]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [(f"git {args.ref}", checkout(args.ref, Path(tmp)))] if args.ref else []
        for label, code in variants + [("this checkout", ROOT)]:
            rows += [{"sampler code": label, **r} for r in measure(code, cfg, ACCURACY)]
    record_model(BUNDLED_MODEL)
    text = (f"# The shipped step policy decoding in blocks\n\nThe bundled model, greedy, {args.n} generated test "
            f"prompts per task (seed 0); `policy` at its operating point, `eb` at gamma 0.3; each answer of the task's "
            f"length decoded in blocks of the given length; the sampler of each code version named.\n\n"
            + markdown_table(rows, list(rows[0])) + "\n")
    print(text)
    save(f"step_policy/policy_blocks_{args.name}" if args.name else "step_policy/policy_blocks", text,
         {"rows": rows, "config": cfg, "ref": args.ref})


if __name__ == "__main__":
    main()
