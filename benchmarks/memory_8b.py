"""Memory arithmetic of ``diffpo-train rl`` on LLaDA-8B on one GPU: weights, LoRA adapters and their AdamW
state, activations with and without gradient checkpointing, and the logits at vocabulary 126,464.

Every number is computed from a formula stated in docs/real_models.md, on the published LLaDA-8B sizes;
the parameter counts come from instantiating our own LLaDA module (diffpo_serve/dllm/families/llada.py) on
the meta device (no memory, nothing downloaded) and applying the family's ``LORA_TARGET_MODULES`` to it.
The activation formula is checked against a measurement: the bytes autograd saves for the backward pass of
one LoRA training forward of a small LLaDA (bf16, CPU), counted with ``saved_tensors_hooks``.

    python -m benchmarks.memory_8b            # writes docs/results/real_models/memory_8b.{md,json}

The result files record their provenance (commit, date, command, machine) through ``benchmarks.common.save``;
no model is loaded (the sizes are LLaDA-8B's published ones), so none is checksummed.
"""

from __future__ import annotations

import argparse
import re

import torch

from benchmarks.common import save
from diffpo_serve.dllm.families.llada import LORA_TARGET_MODULES, LLaDAConfig, LLaDAModelLM

GB = 1e9
LLADA_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                embedding_size=126464, max_sequence_length=4096, rope_theta=500000.0, weight_tying=False,
                mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, block_type="llama", rope=True,
                alibi=False, activation_type="silu", layer_norm_type="rms", rms_norm_eps=1e-5, include_bias=False)
SMALL = {k: v for k, v in LLADA_8B.items() if k in ("block_type", "rope", "alibi", "activation_type",
                                                   "layer_norm_type", "rms_norm_eps", "include_bias")}


def counts(config: dict, rank: int) -> dict:
    """Parameters of the model and of rank-``rank`` LoRA on the family's targets (meta device: no memory)."""
    with torch.device("meta"):
        model = LLaDAModelLM(LLaDAConfig(**config))
    total = sum(p.numel() for p in model.parameters())
    lora = block_linear = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(LORA_TARGET_MODULES, name):
            lora += rank * (module.in_features + module.out_features)  # A: r x in, B: out x r
            block_linear += module.weight.numel()
    return {"params": total, "lora_params": lora, "block_linear_params": block_linear}


def base_bytes_per_token_layer(d: int, m: int) -> int:
    """Bytes autograd keeps per token per layer of a bf16 LLaDA block with frozen weights, outside the
    attention kernel: each RMSNorm's float32 input, bf16 output and float32 1/rms (2 x (4d + 2d + 4)), and
    the MLP's gate and up outputs and the activation (3 x 2m)."""
    return 12 * d + 6 * m + 8


def fused_attention_bytes_per_token_layer(d: int) -> int:
    """A fused (flash / memory-efficient) attention kernel keeps q, k, v and its output in bf16 (4 x 2d) and
    one float32 log-sum-exp per head; no L x L scores."""
    return 8 * d


def lora_bytes_per_token_layer(d: int, m: int, r: int) -> int:
    """What float32 LoRA adapters on the seven projections add: peft casts each adapted layer's input to the
    adapters' float32 (six inputs of width d, ff_out's of width m: 4 x (6d + m)) and keeps each
    rank-r intermediate (7 x 4r)."""
    return 24 * d + 4 * m + 28 * r


def activation_bytes_per_token_layer(d: int, m: int, r: int) -> int:
    return base_bytes_per_token_layer(d, m) + fused_attention_bytes_per_token_layer(d) + \
        lora_bytes_per_token_layer(d, m, r)


def table(rows_per_pass: int, prompt: int, gen: int, rank: int, cfg: dict = LLADA_8B) -> dict:
    c = counts(cfg, rank)
    d, m, n_layers, vocab = cfg["d_model"], cfg["mlp_hidden_size"], cfg["n_layers"], cfg["vocab_size"]
    length = prompt + gen
    tokens = rows_per_pass * length
    per_layer = activation_bytes_per_token_layer(d, m, rank)
    out = {
        "weights_bf16": c["params"] * 2,
        # d1's 4-bit base (bitsandbytes NF4, blocks of 64 with a float32 scale each) for the blocks' Linears,
        # the rest (embedding, output layer, norms) in bf16; diffpo-train does not load 4-bit weights
        "weights_4bit": c["block_linear_params"] * (0.5 + 4 / 64) + (c["params"] - c["block_linear_params"]) * 2,
        "lora_fp32": c["lora_params"] * 4,
        "lora_grads_fp32": c["lora_params"] * 4,
        "adamw_state_fp32": c["lora_params"] * 8,  # two moments
        "reference_copy_bf16": c["params"] * 2,  # only without LoRA; with LoRA the reference is adapters-off: 0
        "activations_no_checkpointing": tokens * n_layers * per_layer,
        # checkpointing keeps each layer's bf16 input, and recomputes one layer at a time in the backward pass
        "activations_checkpointing": tokens * n_layers * d * 2 + tokens * per_layer,
        "activation_bytes_per_token_layer": per_layer,
        # the model's bf16 logits over the whole row, then the answer's float32 copy and its log-softmax
        "logits": rows_per_pass * (length * vocab * 2 + 2 * gen * vocab * 4),
    }
    return {"counts": c, "rows": rows_per_pass, "prompt": prompt, "gen": gen, "rank": rank, "bytes": out}


def measure_small(d=96, m=160, heads=4, rows=3, length=40, rank=8) -> dict:
    """Saved-for-backward bytes per token of the second block of a small bf16 LLaDA in a training forward (the
    first block's input needs no gradient under LoRA), without and with LoRA, next to the formulas.
    Parameters are not activations and are left out; so is what the attention kernel keeps (on CPU the math
    kernel, with its L x L scores, not the fused GPU kernel): the tensors with a head dimension. The sizes
    are distinct (d, m, rows x length all differ) so shapes tell them apart."""
    from peft import LoraConfig, get_peft_model
    config = LLaDAConfig(**SMALL, d_model=d, n_heads=heads, n_layers=2, mlp_hidden_size=m, vocab_size=64,
                         embedding_size=64, max_sequence_length=length, mask_token_id=3)
    result = {"d": d, "m": m, "heads": heads, "rows": rows, "length": length, "rank": rank}
    for lora in (False, True):
        torch.manual_seed(0)
        model = LLaDAModelLM(config).to(torch.bfloat16).requires_grad_(False)
        if lora:
            model = get_peft_model(model, LoraConfig(r=rank, target_modules=LORA_TARGET_MODULES))
        else:  # frozen weights, as under LoRA: the embedding's gradient makes the blocks keep their inputs
            model.get_input_embeddings().weight.requires_grad_(True)
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        block = next(mod for name, mod in model.named_modules() if name.endswith("blocks.1"))
        saved: dict[int, int] = {}
        inside = [False]

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            token_major = tuple(t.shape[:2]) == (rows, length) or t.shape[0] == rows * length
            if inside[0] and ptr not in params and token_major:
                saved[ptr] = t.untyped_storage().nbytes()
            return t
        hooks = [block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
                 block.register_forward_hook(lambda *_: inside.__setitem__(0, False))]
        ids = torch.randint(0, 64, (rows, length), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        result["lora" if lora else "base"] = sum(saved.values()) / (rows * length)
    result["formula_base"] = base_bytes_per_token_layer(d, m)
    result["formula_lora"] = lora_bytes_per_token_layer(d, m, rank)
    return result


def markdown(results: list[dict], check: dict) -> str:
    lines = ["| rows per pass | weights bf16 | LoRA + grads + AdamW (fp32) | activations, no checkpointing | "
             "activations, checkpointing | logits | total, checkpointing | total, no checkpointing |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = r["bytes"]
        lora = b["lora_fp32"] + b["lora_grads_fp32"] + b["adamw_state_fp32"]
        with_ckpt = b["weights_bf16"] + lora + b["activations_checkpointing"] + b["logits"]
        without = b["weights_bf16"] + lora + b["activations_no_checkpointing"] + b["logits"]
        lines.append(f"| {r['rows']} | {b['weights_bf16'] / GB:.1f} GB | {lora / GB:.2f} GB | "
                     f"{b['activations_no_checkpointing'] / GB:.1f} GB | "
                     f"{b['activations_checkpointing'] / GB:.2f} GB | "
                     f"{b['logits'] / GB:.2f} GB | {with_ckpt / GB:.1f} GB | {without / GB:.1f} GB |")
    c = results[0]["counts"]
    lines += ["", f"LLaDA-8B: {c['params']:,} parameters ({c['block_linear_params']:,} in the blocks' Linears); "
                  f"LoRA rank {results[0]['rank']} on `LORA_TARGET_MODULES`: {c['lora_params']:,} parameters. "
                  f"d1's 4-bit base would take {results[0]['bytes']['weights_4bit'] / GB:.1f} GB.",
              f"Activations per token per layer at 8B (bf16 base, fp32 LoRA, fused attention): "
              f"{results[0]['bytes']['activation_bytes_per_token_layer']:,} bytes.",
              f"Check of the formulas on the second block of a small bf16 LLaDA (d {check['d']}, MLP {check['m']}, "
              f"{check['rows']} rows x {check['length']} tokens, LoRA r {check['rank']}, CPU, one run), bytes "
              f"autograd saved per token outside the attention kernel: frozen base {check['base']:.0f} "
              f"(formula {check['formula_base']}), LoRA's addition {check['lora'] - check['base']:.0f} "
              f"(formula {check['formula_lora']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="6,12,24,48", help="rows per likelihood pass (comma-separated)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per row (padded)")
    p.add_argument("--gen", type=int, default=256, help="answer tokens per row")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank")
    p.add_argument("--name", default="real_models/memory_8b", help="writes docs/results/NAME.md and NAME.json")
    args = p.parse_args(argv)
    results = [table(int(r), args.prompt, args.gen, args.rank) for r in args.rows.split(",")]
    check = measure_small()
    text = markdown(results, check)
    print(text)
    save(args.name, text, {"results": results, "check": check})


if __name__ == "__main__":
    main()
