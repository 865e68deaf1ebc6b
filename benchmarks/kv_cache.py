"""The sampler's KV cache (``cache`` off / prefix / dual): decoding speed, and accuracy on the bundled model.

Speed: one random native LLaDA (``--preset mid``: 8 layers, width 512, 8 heads, MLP 1,376, vocabulary 126,464;
``--preset 8b``: LLaDA-8B's shape, 32 layers, width 4,096, MLP 12,288, for ``--device cuda --dtype bfloat16``;
``--preset tiny`` for a smoke run) decodes ``--batch-sizes`` prompts of ``--prompt`` random tokens to ``--gen``
tokens in blocks of ``--block`` with the ``steps`` sampler at ``--steps`` forward passes (greedy, no stop at
EOS, so every configuration runs the same number of passes). Each cache mode is timed ``--runs`` times,
interleaved (off, prefix, dual, off, ...) so the machine's load hits all alike; the table gives the median
tokens/s (rows x gen / seconds) and each mode's ratio to ``off`` from the same run, and the fraction of tokens
equal to the uncached decode (random weights: a lower bound on agreement, not an accuracy).

Accuracy (``--accuracy``): the bundled model (or ``--model``) on its tasks (``--tasks``, default
sudoku,countdown; ``--n`` generated test prompts each), greedy, block_length 4, with each cache mode and
sampler (``--samplers``: ``steps`` at 16 passes, ``learned``): accuracy, its standard error
sqrt(p (1 - p) / n) and mean NFE.

    python -m benchmarks.kv_cache [--preset mid] [--batch-sizes 1,16] [--runs 1] [--accuracy --n 1000]
    python -m benchmarks.kv_cache --preset 8b --device cuda --dtype bfloat16 --batch-sizes 1,16

Writes docs/results/kv_cache/kv_cache[_NAME].{md,json} and a bar plot kv_cache[_NAME].png.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from benchmarks.common import RESULTS, machine, markdown_table, save
from diffpo_serve.dllm.families.llada import LLaDAConfig, LLaDAModelLM
from diffpo_serve.dllm.sampler import CACHE_MODES, SamplingParams, generate

PRESETS = {  # d_model, n_heads, n_layers, mlp_hidden_size, vocabulary
    "tiny": (64, 4, 2, 128, 1024),
    "mid": (512, 8, 8, 1376, 126464),
    "8b": (4096, 32, 32, 12288, 126464),
}
MASK, EOS = 126336, 126081  # LLaDA's ids; a smaller vocabulary (preset tiny) uses its last two ids


def special_ids(vocab: int) -> tuple[int, int]:
    return (MASK, EOS) if vocab > MASK else (vocab - 1, vocab - 2)


def random_llada(preset: str, device: str, dtype: torch.dtype) -> LLaDAModelLM:
    d, heads, layers, mlp, vocab = PRESETS[preset]
    cfg = LLaDAConfig(d_model=d, n_heads=heads, n_kv_heads=heads, n_layers=layers, mlp_hidden_size=mlp,
                      vocab_size=vocab, embedding_size=vocab, block_type="llama", rope=True, layer_norm_type="rms",
                      activation_type="silu", weight_tying=False, rope_theta=500000.0,
                      mask_token_id=special_ids(vocab)[0])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LLaDAModelLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def columns_ratio(cache: str, prompt: int, gen: int, block: int, steps: int) -> float:
    """The ceiling of a cache mode's speedup from the work it skips: columns the uncached decode runs through
    the layers over all passes, divided by those the mode runs. Each block's first pass is a full forward
    (the refresh); its other passes run the block and everything after it (``prefix``, as Fast-dLLM's prefix
    cache does) or the block alone (``dual``). Attention's quadratic term and the block's logits are ignored."""
    blocks = -(-gen // block)
    per_block = steps // blocks
    full = prompt + gen
    if cache == "off":
        return 1.0
    work = 0
    for b in range(blocks):
        query = gen - b * block if cache == "prefix" else min(block, gen - b * block)
        work += full + (per_block - 1) * query
    return blocks * per_block * full / work


class LayerTimer:
    """Wall time spent inside one module's forward (hooks around it; CUDA synchronised at both ends)."""

    def __init__(self, module: torch.nn.Module, cuda: bool):
        self.seconds, self._t0, self._cuda = 0.0, 0.0, cuda
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _sync(self):
        if self._cuda:
            torch.cuda.synchronize()

    def _start(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self._sync()
        self.seconds += time.perf_counter() - self._t0


def logits_kept_ceiling(off_seconds: float, off_logits: float, mode_logits: float, columns: float) -> float:
    """The speedup a mode could reach if its layers' time fell by the columns ratio while the output
    projection (the logits at the block's masked columns, which every mode computes alike) kept its measured
    time: off / (mode's logits time + off's non-logits time / columns ratio)."""
    return off_seconds / (mode_logits + (off_seconds - off_logits) / columns)


def speed(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    model = random_llada(args.preset, args.device, dtype)
    cuda = args.device.startswith("cuda")
    timer = LayerTimer(model.get_output_embeddings(), cuda)
    vocab = PRESETS[args.preset][4]
    mask, eos = special_ids(vocab)
    g = torch.Generator().manual_seed(1)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = torch.randint(10, min(vocab - 2, MASK), (batch, args.prompt), generator=g).tolist()
        times: dict[str, list[float]] = {c: [] for c in CACHE_MODES}
        logits: dict[str, list[float]] = {c: [] for c in CACHE_MODES}
        outputs = {}
        for _ in range(args.runs):
            for cache in CACHE_MODES:
                params = SamplingParams("steps", args.gen, block_length=args.block, steps=args.steps, cache=cache)
                if cuda:
                    torch.cuda.synchronize()
                timer.seconds = 0.0
                t0 = time.perf_counter()
                out = generate(model, prompts, params, mask_id=mask, eos_id=eos, pad_id=eos, stop_at_eos=False)
                if cuda:
                    torch.cuda.synchronize()
                times[cache].append(time.perf_counter() - t0)
                logits[cache].append(timer.seconds)
                outputs[cache] = out.sequences
                print(f"batch {batch} cache {cache}: {times[cache][-1]:.1f} s", flush=True)
        base = statistics.median(times["off"])
        base_logits = statistics.median(logits["off"])
        for cache in CACHE_MODES:
            seconds = statistics.median(times[cache])
            columns = columns_ratio(cache, args.prompt, args.gen, args.block, args.steps)
            mode_logits = statistics.median(logits[cache])
            rows.append({"batch": batch, "cache": cache, "tokens_per_s": batch * args.gen / seconds,
                         "speedup": base / seconds, "ceiling": columns,
                         "logits_share": mode_logits / seconds,
                         "ceiling_logits_kept": logits_kept_ceiling(base, base_logits, mode_logits, columns),
                         "seconds": seconds, "runs": len(times[cache]),
                         "same_tokens_as_off": float((outputs[cache] == outputs["off"]).float().mean())})
    return rows


def accuracy(args) -> list[dict]:
    from benchmarks.common import load_model
    from training.evaluate import evaluate
    from training.tasks import get_task

    loaded = load_model(args.model)
    rows = []
    for task in args.tasks.split(","):
        data = get_task(task).make_dataset("test", args.n, seed=0)
        gen = get_task(task).GEN_LENGTH
        for sampler in args.samplers.split(","):
            for cache in CACHE_MODES:
                params = SamplingParams(sampler, gen, block_length=4, cache=cache)
                result = evaluate(loaded, task, data, params, batch_size=64, progress=False)
                p = result.accuracy
                rows.append({"task": task, "sampler": sampler, "cache": cache, "n": result.n, "accuracy": p,
                             "stderr": math.sqrt(max(p * (1 - p), 0.0) / max(result.n, 1)),
                             "mean_nfe": result.mean_nfe, "seconds": result.seconds})
                print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(CACHE_MODES)
    for k, cache in enumerate(CACHE_MODES):
        values = [next(r["tokens_per_s"] for r in rows if r["batch"] == b and r["cache"] == cache) for b in batches]
        bars = ax.bar([i + k * width for i in range(len(batches))], values, width, label=f"cache {cache}")
        for bar, b in zip(bars, batches):
            ratio = next(r["speedup"] for r in rows if r["batch"] == b and r["cache"] == cache)
            ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
    ax.set_xticks([i + width for i in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("generated tokens / s")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid", choices=list(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="forward passes per decode, a multiple of gen / block "
                    "(default: gen, one token per pass, as LLaDA's and Fast-dLLM's baselines decode)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    ap.add_argument("--accuracy", action="store_true", help="also measure accuracy on the bundled model")
    ap.add_argument("--model", default=None, help="model for --accuracy (default: the bundled one)")
    ap.add_argument("--n", type=int, default=1000, help="--accuracy: test prompts per task")
    ap.add_argument("--samplers", default="steps,learned", help="--accuracy: samplers to compare")
    ap.add_argument("--tasks", default="sudoku,cd3", help="--accuracy: tasks (generated test prompts)")
    ap.add_argument("--name", default="", help="suffix of the result files")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = args.gen
    name = "kv_cache/kv_cache" + (f"_{args.name}" if args.name else "")
    speed_rows = [] if args.no_speed else speed(args)
    accuracy_rows = accuracy(args) if args.accuracy else []
    d, heads, layers, mlp, vocab = PRESETS[args.preset]
    text = f"# KV cache: off / prefix / dual\n\nMachine: {machine()}\n"
    if speed_rows:
        text += (f"\n## Speed\n\nRandom native LLaDA `{args.preset}` ({layers} layers, width {d}, {heads} heads, MLP "
                 f"{mlp}, vocabulary {vocab:,}), {args.dtype} on {args.device}; prompt {args.prompt}, gen {args.gen}, "
                 f"block {args.block}, `steps` sampler at {args.steps} passes, greedy; median of {args.runs} "
                 "interleaved run(s) per mode; speedup = off's seconds / the mode's, same run; ceiling = the columns "
                 "the uncached decode runs through the layers / those the mode runs (each block's first pass is a "
                 "full refresh), the speedup if time were proportional to columns; logits_share = the fraction of the "
                 "mode's time spent in the output projection (timed by hooks around it), which a cache cannot "
                 "shrink: every mode computes the logits of the block's masked columns; ceiling_logits_kept = off's "
                 "seconds / (the mode's logits seconds + off's other seconds / ceiling), the speedup if only the "
                 "layers' work fell by the columns ratio.\n\n"
                 + markdown_table(speed_rows, ["batch", "cache", "tokens_per_s", "speedup", "ceiling", "logits_share",
                                               "ceiling_logits_kept", "seconds", "runs", "same_tokens_as_off"])
                 + "\n")
        plot(speed_rows, RESULTS / f"{name}.png")
    if accuracy_rows:
        text += (f"\n## Accuracy\n\n{args.model or 'the bundled model'}, {args.n} generated test prompts per task "
                 "(seed 0), greedy, block_length 4; stderr = sqrt(p (1 - p) / n); one run each (greedy decoding "
                 "is deterministic).\n\n"
                 + markdown_table(accuracy_rows, ["task", "sampler", "cache", "n", "accuracy", "stderr", "mean_nfe",
                                                  "seconds"]) + "\n")
    print(text)
    save(name, text, {"args": vars(args), "speed": speed_rows, "accuracy": accuracy_rows, "machine": machine()})


if __name__ == "__main__":
    main()
