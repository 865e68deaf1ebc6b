"""DiffusionGemma decoder throughput: diffpo's batched canvas decoder vs transformers' ``generate`` one prompt
at a time, on a random small DiffusionGemma built here (no checkpoint is downloaded).

Both decode the same random token prompts with the same settings (entropy bound, denoising steps per block,
answer length); row i uses seed i, which makes the two token-identical (``canvas.generate`` draws a row's
random numbers as transformers' ``generate`` does for a batch of one after ``torch.manual_seed(i)``; see
docs/diffusion_gemma.md), so ``outputs_identical`` checks that at this size too. Ours runs the prompts in
batches (``--batch-sizes``); the reference runs them one by one, as transformers' batched ``generate`` would
give a row an output that depends on its batch. Reports decoder passes per second (the work; a random
model rarely stops a block early, so both do about ``steps`` passes per block), answer tokens per second
(prompts x gen_length / seconds) and the speed-up, the median over ``--runs`` interleaved runs. Writes
docs/results/real_models/diffusion_gemma.{md,json} unless ``--no-save``.

Accuracy against NFE for fixed bounds and the learned bound is **not** measured: that needs a DiffusionGemma
that solves the tasks, and training one (its encoder-decoder objective over noised canvases) is beyond a few
minutes of CPU here; the published checkpoint (26B parameters, 4B active) needs a GPU.

    python -m benchmarks.diffusion_gemma [--prompts 64] [--batch-sizes 8,32] [--runs 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from benchmarks.common import machine, markdown_table, save
from diffpo_serve.dllm import canvas

EOS, PAD = 1, 0


def random_model(hidden: int, layers: int, vocab: int, canvas_length: int, seed: int = 0) -> DiffusionGemmaForBlockDiffusion:
    """A random DiffusionGemma: mixture-of-experts text stack (alternating sliding and full attention), a
    one-layer vision tower (it must exist; prompts are text)."""
    torch.manual_seed(seed)
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, global_head_dim=hidden // 4,
                num_experts=4, top_k_experts=2, moe_intermediate_size=hidden // 2, sliding_window=64,
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                max_position_embeddings=4096, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)
    vision = dict(model_type="gemma4_vision", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=1, num_key_value_heads=1, head_dim=8, patch_size=2, position_embedding_size=16,
                  pooling_kernel_size=1)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length,
                                  boi_token_id=vocab - 3, eoi_token_id=vocab - 2, image_token_id=vocab - 1)
    return DiffusionGemmaForBlockDiffusion(config).eval()


def random_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (n,), generator=g).tolist()
    return [torch.randint(3, vocab - 3, (k,), generator=g).tolist() for k in lengths]  # no special or image ids


def reference(model, prompt: list[int], seed: int, p: canvas.CanvasParams) -> torch.Tensor:
    """transformers' own ``generate`` for one prompt (its answer, whole blocks, pad after an EOS block)."""
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=p.gen_length, eos_token_id=EOS,
                         pad_token_id=PAD, max_denoising_steps=p.steps, sampler_config=EntropyBoundSamplerConfig(p.threshold),
                         t_min=p.t_min, t_max=p.t_max, stability_threshold=p.stability_threshold,
                         confidence_threshold=p.confidence_threshold)
    return out.sequences[0, len(prompt):].cpu()


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per block")
    ap.add_argument("--threshold", type=float, default=0.1, help="the entropy bound")
    ap.add_argument("--canvas", type=int, default=32, help="canvas length (block)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-save", action="store_true", help="print only (smoke runs)")
    args = ap.parse_args(argv)
    model = random_model(args.hidden, args.layers, args.vocab, args.canvas).to(args.device)
    denoiser = canvas.denoiser_for(model)
    prompts = random_prompts(args.prompts, args.vocab)
    base = canvas.CanvasParams(gen_length=args.gen_length, steps=args.steps, threshold=args.threshold).resolved(
        denoiser.defaults)
    params = [canvas.CanvasParams(**{**base.__dict__, "seed": i}) for i in range(len(prompts))]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    ours: dict[int, list[tuple[float, int]]] = {b: [] for b in sizes}
    ref: list[tuple[float, int]] = []
    identical = True
    for _ in range(args.runs):
        for b in sizes:
            t0 = time.perf_counter()
            outs = [canvas.generate(denoiser, prompts[i:i + b], params[i:i + b], eos_ids=[EOS], pad_id=PAD)
                    for i in range(0, len(prompts), b)]
            ours[b].append((time.perf_counter() - t0, sum(int(o.nfe.sum()) for o in outs)))
            batched = [row.cpu() for o in outs for row in o.sequences]
        t0 = time.perf_counter()
        alone = [reference(model, p, i, base) for i, p in enumerate(prompts)]
        # transformers' count of passes is not returned per row; ours alone equals it (tests/test_canvas.py)
        ref.append((time.perf_counter() - t0, sum(int(o.nfe.sum()) for o in outs)))
        identical &= all(torch.equal(a, s[:len(a)]) and bool((s[len(a):] == PAD).all()) for a, s in zip(alone, batched))
    tokens = len(prompts) * args.gen_length
    rows = []
    ref_passes = statistics.median(n / t for t, n in ref)
    for b in sizes:
        rows.append({"batch_size": b, "prompts": len(prompts), "decoder_passes_per_s": statistics.median(n / t for t, n in ours[b]),
                     "reference_passes_per_s": ref_passes, "answer_tok_s": statistics.median(tokens / t for t, _ in ours[b]),
                     "reference_tok_s": statistics.median(tokens / t for t, _ in ref),
                     "speedup": statistics.median(r / t for (t, _), (r, _) in zip(ours[b], ref)),
                     "outputs_identical": identical})
        print(rows[-1], flush=True)
    if not args.no_save:
        text = (f"# DiffusionGemma decoder throughput\n\nA random DiffusionGemma (hidden {args.hidden}, {args.layers} "
                f"layers, vocabulary {args.vocab}, canvas {args.canvas}), {len(prompts)} random prompts of 8-32 tokens, "
                f"gen_length {args.gen_length}, bound {args.threshold}, {args.steps} steps per block, seeds 0..; "
                f"diffpo's batched `canvas.generate` vs transformers' `generate` one prompt at a time; medians over "
                f"{args.runs} interleaved runs on {args.device}. Machine: {machine()}. Accuracy vs NFE: not measured "
                "(no trained model; see the script's docstring).\n\n" + markdown_table(rows, list(rows[0])) + "\n")
        print(save("real_models/diffusion_gemma", text, rows))
    return rows


if __name__ == "__main__":
    main()
