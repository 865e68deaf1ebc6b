"""``diffpo-train sft``: masked-diffusion supervised fine-tuning.

Forward process (LLaDA, arXiv 2502.09992, eq. 3-5): draw t ~ U(0, 1] per sequence, mask every
completion token independently with probability t (the prompt is never masked) and train the model
to predict the masked tokens. Two estimates of the loss are offered:

``inv_t``        LLaDA's: sum over masked positions of CE / t, divided by the completion length;
                 an upper bound on the negative log-likelihood.
``masked_mean``  the mean CE over the masked positions; same minimiser, lower variance at small t,
                 and on our tiny model it leaves the early plateau much sooner.

Runs under accelerate (``accelerate launch --multi_gpu --num_processes N -m training.cli sft ...`` for
several processes; on CPU they use gloo), with a
progress bar, JSONL metrics, periodic atomic checkpoints, ``--resume`` and, with ``--eval-every N``,
greedy full-step accuracy on each task's generated test split (or its ``--eval-data`` file) every N steps
(``eval_<task>_accuracy`` lines in metrics.jsonl, the task's reward averaged over ``--eval-examples`` prompts).
``--data`` trains on a file's examples instead of generated ones (:mod:`training.data`).

``--cache-loss prefix|dual|both`` adds a second loss, the same objective as the sampler's KV-cached decode
computes it in the middle of a block (:func:`cached_view_loss`): a small model otherwise leans on the
prompt's keys/values changing as the block fills in, which a cache holds fixed, and loses accuracy with it.

``--targets model`` scores both losses against a frozen copy of ``--model`` (KL from its uncached logits at
the same masked positions) instead of the completion's tokens: with ``--cache-loss`` it trains a model's
cached decode to predict what its uncached decode does while holding the uncached predictions where they
were, so a threshold head or step policy trained on the model still reads the states it was trained on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from diffpo_serve.dllm.loading import LoadedModel, load_model
from diffpo_serve.dllm.model import DiffpoConfig, DiffpoForMaskedLM
from diffpo_serve.dllm.sampler import SamplingParams
from diffpo_serve.dllm.tokenizer import build_tokenizer
from training.checkpoint import (export_model, load_trainer_state, recover_interrupted, save_checkpoint, set_rng_state,
                                 start_metrics)
from training.distributed import finish_run
from training.config import SFTConfig
from training.data import encode_examples, eval_sets as eval_sets_of, left_pad, sft_examples, sft_pool
from training.evaluate import evaluate_tasks
from training.prompting import prompt_text

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint"


def forward_mask(completion_mask: torch.Tensor, generator: torch.Generator, eps: float = 1e-3):
    """Sample t ~ U(eps, 1] per row and a mask of the completion positions, each kept with prob. t."""
    b, n = completion_mask.shape
    t = eps + (1 - eps) * (1 - torch.rand(b, generator=generator))
    masked = (torch.rand(b, n, generator=generator) < t[:, None]) & completion_mask
    return t, masked


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                          weighting: str = "inv_t") -> torch.Tensor:
    """Loss of the masked-diffusion objective on one batch.

    logits (b, n, V) at the completion positions, masked (b, n) bool, t (b,). targets (b, n) are tokens (the
    cross-entropy at each position) or (b, n, V) a teacher's logits at the same positions (``--targets
    model``: KL(teacher || model) at each position, 0 where the two agree); either is weighted the same way.
    """
    if targets.dim() == 3:
        teacher = torch.log_softmax(targets.float(), -1)
        ce = (teacher.exp() * (teacher - torch.log_softmax(logits.float(), -1))).sum(-1)  # b, n
    else:
        ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # b, n
    ce = ce * masked
    if weighting == "inv_t":
        return (ce / t[:, None]).sum() / masked.numel()
    if weighting == "masked_mean":
        return ce.sum() / masked.sum().clamp(min=1)
    raise ValueError(f"unknown loss weighting {weighting!r}")


def batch_loss(model, prompts: list[list[int]], targets: torch.Tensor, generator: torch.Generator, mask_id: int,
               pad_id: int, weighting: str = "inv_t", device=None, teacher=None):
    """One SFT batch: mask the completions at random t, run the model, score the masked positions.

    prompts: token lists (left-padded here); targets (b, n) completions. With a ``teacher`` (a frozen model,
    ``--targets model``) the masked positions are scored against its logits on the same input instead of the
    tokens. Returns (loss, logits, targets, masked), the last three on the model's device, for metrics.
    """
    p_ids, p_attn = left_pad(prompts, pad_id)
    t, masked = forward_mask(torch.ones_like(targets, dtype=torch.bool), generator)
    noisy = torch.where(masked, torch.full_like(targets, mask_id), targets)
    input_ids = torch.cat([p_ids, noisy], 1).to(device)
    attention = torch.cat([p_attn, torch.ones_like(targets, dtype=torch.bool)], 1).to(device)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, p_ids.shape[1]:]
    targets, masked = targets.to(logits.device), masked.to(logits.device)
    scored = targets if teacher is None else teacher_logits(teacher, input_ids, attention)[:, p_ids.shape[1]:]
    return masked_diffusion_loss(logits, scored, masked, t.to(logits.device), weighting), logits, targets, masked


@torch.no_grad()
def teacher_logits(teacher, input_ids: torch.Tensor, attention: torch.Tensor,
                   logits_index: torch.Tensor | None = None) -> torch.Tensor:
    """A frozen teacher's logits from its full (uncached) forward over the sequence: every column's, or with
    ``logits_index`` (b, k; a native model's forward argument) those columns' only."""
    if logits_index is None:
        return teacher(input_ids=input_ids, attention_mask=attention).logits
    return teacher(input_ids=input_ids, attention_mask=attention, logits_index=logits_index).logits


def cached_view(targets: torch.Tensor, block_length: int, generator: torch.Generator, mask_id: int,
                eps: float = 1e-3):
    """A decode state of a KV-cached sampler mid-block, drawn at random (pure; ``--cache-loss``).

    targets (b, n): the completions. One block k (uniform over the n / block_length blocks, the same for
    the batch) is the one being decoded. Returns ``(k, t, refresh, current, masked)``:

    refresh (b, n)  the completion at block k's first step, when the sampler refreshes the cache: blocks
                    before k hold their tokens, block k and everything after it are masks;
    current (b, n)  a later step of the same block: as ``refresh``, with some of block k's tokens
                    committed (each of its tokens stays masked with probability t ~ U(eps, 1] per row;
                    one random token of the block always stays masked, so there is something to predict);
    masked (b, n)   the tokens of block k still masked in ``current`` (the positions scored).
    """
    b, n = targets.shape
    if n % block_length:
        raise ValueError(f"--cache-block-length {block_length} does not divide the completion length {n}")
    k = int(torch.randint(n // block_length, (1,), generator=generator))
    lo, hi = k * block_length, (k + 1) * block_length
    t = eps + (1 - eps) * (1 - torch.rand(b, generator=generator))
    col = torch.arange(n)
    inside = (col >= lo) & (col < hi)
    masked = (torch.rand(b, n, generator=generator) < t[:, None]) & inside
    masked[torch.arange(b), lo + torch.randint(block_length, (b,), generator=generator)] = True
    mask = torch.full_like(targets, mask_id)
    refresh = torch.where(col < lo, targets, mask)
    current = torch.where(masked | (col >= hi), mask, targets)
    return k, t, refresh, current, masked


def cached_view_loss(model, prompts: list[list[int]], targets: torch.Tensor, block_length: int, mode: str,
                     view: tuple, pad_id: int, weighting: str = "inv_t", device=None, teacher=None):
    """The masked-diffusion loss of block k as the sampler's ``prefix`` / ``dual`` cache computes it.

    ``view`` is :func:`cached_view`'s ``(k, t, refresh, current, masked)``. The keys/values come from a
    forward over [prompt ; refresh] (what the sampler stores at block k's first step); the query columns
    of [prompt ; current] are block k and, with ``prefix``, everything after it (``dual`` reads the later
    blocks from the cache too), as in ``sampler.cache.query_columns``. The prompt's and the finished blocks'
    keys/values are thus stale by the tokens committed in block k since the refresh: the approximation the
    cached decode makes (Fast-dLLM, arXiv 2505.22618), trained for here. Gradients flow through both
    forwards. With a ``teacher`` (``--targets model``) block k's masked tokens are scored against the teacher's
    logits from its full, uncached forward over [prompt ; current]: the cached decode is trained to predict
    what the uncached one does. Returns (loss, logits (b, block_length, V), targets and masked of block k)."""
    if mode not in ("prefix", "dual"):
        raise ValueError(f"cache mode {mode!r}: expected prefix or dual")
    k, t, refresh, current, masked = view
    p_ids, p_attn = left_pad(prompts, pad_id)
    width, (b, n) = p_ids.shape[1], targets.shape
    lo, hi = k * block_length, (k + 1) * block_length
    attention = torch.cat([p_attn, torch.ones_like(targets, dtype=torch.bool)], 1).to(device)
    first = torch.full((b, 1), width, dtype=torch.long, device=device)  # the refresh's logits are not needed
    cache = model(input_ids=torch.cat([p_ids, refresh], 1).to(device), attention_mask=attention,
                  return_kv=True, logits_index=first).kv_cache
    query = (width + torch.arange(lo, hi if mode == "dual" else n, device=device)).expand(b, -1)
    now = torch.cat([p_ids, current], 1).to(device)
    logits = model(input_ids=now, attention_mask=attention, kv_cache=cache, query_index=query,
                   logits_index=query[:, :block_length]).logits
    block_targets, block_masked = targets[:, lo:hi].to(logits.device), masked[:, lo:hi].to(logits.device)
    scored = block_targets if teacher is None else teacher_logits(teacher, now, attention, query[:, :block_length])
    return (masked_diffusion_loss(logits, scored, block_masked, t.to(logits.device), weighting), logits,
            block_targets, block_masked)


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warm-up then cosine decay to ``lr * min_lr_ratio`` (multiplier of the peak lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def new_model(cfg: SFTConfig):
    tokenizer = build_tokenizer()
    config = DiffpoConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                          num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                          intermediate_size=cfg.intermediate_size, mask_token_id=tokenizer.mask_token_id,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return DiffpoForMaskedLM(config), tokenizer


def evaluate_model(model, tokenizer, eval_sets: dict, gen_length: int, chat_template: bool = False) -> dict:
    """:func:`training.evaluate.evaluate_tasks` of the model being trained, greedy at full steps (one token
    per pass), on each task's prompts (``eval_sets``: name -> dataset; through the tokenizer's chat template
    with ``chat_template``), in eval mode; the model is left in the mode it was in."""
    loaded = LoadedModel(model=model, tokenizer=tokenizer, mask_id=model.config.mask_token_id,
                         pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, path="", name="sft",
                         max_length=getattr(model.config, "max_position_embeddings", 1 << 30))
    was_training = model.training
    model.eval()
    try:
        return evaluate_tasks(loaded, eval_sets, SamplingParams("steps", gen_length, steps=gen_length),
                              chat_template=chat_template)
    finally:
        model.train(was_training)


def train_sft(cfg: SFTConfig, pool=None) -> Path:
    """Run SFT; returns the output directory, itself a loadable model directory.

    ``pool`` (a dataset with ``prompt`` and ``answer`` columns, texts used as they are) replaces the tasks'
    training examples (generated, or read from ``--data``: :mod:`training.data`); ``diffpo-train distill``
    passes the model's own answers. A ``--model`` with a chat template (and ``--chat-template``) reads d1's
    training prompt in it and learns :func:`training.data.chat_target`.
    """
    if cfg.cache_loss != "off" and (cfg.cache_block_length < 1 or cfg.gen_length % cfg.cache_block_length):
        raise ValueError(f"--cache-block-length {cfg.cache_block_length} must divide --gen-length {cfg.gen_length}")
    if cfg.targets == "model" and not cfg.model:
        raise ValueError("--targets model scores against the starting model's predictions: give it with --model")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # else a CPU DDP launch runs rank 0 twice
    tasks = cfg.tasks.split(",")
    # the examples first: a bad --data / --eval-data file fails before the model loads
    examples = sft_examples(tasks, cfg.train_examples, cfg.seed, cfg.data) if pool is None else None
    eval_sets = eval_sets_of(tasks, cfg.eval_examples, cfg.eval_data) if cfg.eval_every else {}
    eval_sets = eval_sets if accelerator.is_main_process else {}
    out = Path(cfg.output_dir)
    ckpt, metrics_file = out / CHECKPOINT, out / "metrics.jsonl"
    torch.manual_seed(cfg.seed)
    recover_interrupted(ckpt)
    start = 0
    if cfg.resume and ckpt.exists():
        loaded = load_model(ckpt)
        model, tokenizer = loaded.model.train(), loaded.tokenizer
        state = load_trainer_state(ckpt)
        start = state["step"] + 1
    elif cfg.model:
        loaded = load_model(cfg.model)
        model, tokenizer, state = loaded.model.train(), loaded.tokenizer, None
    else:
        if cfg.resume:
            log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt)
        (model, tokenizer), state = new_model(cfg), None
    if accelerator.is_main_process:
        start_metrics(metrics_file, state["step"] if state else None)
    mask_id = model.config.mask_token_id if getattr(model.config, "mask_token_id", None) is not None \
        else tokenizer.mask_token_id
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    model, optimizer = accelerator.prepare(model, optimizer)
    # the teacher is always --model as given, also on --resume (the checkpoint is the student)
    teacher = load_model(cfg.model, device=accelerator.device).model.eval().requires_grad_(False) \
        if cfg.targets == "model" else None

    chat = cfg.chat_template and bool(getattr(tokenizer, "chat_template", None))
    if pool is None:
        view = SimpleNamespace(tokenizer=tokenizer)  # all of a LoadedModel that prompting.prompt_text reads
        pool = sft_pool(tasks, cfg.train_examples, cfg.seed, examples=examples, prompt_text=(
            lambda task, ex: prompt_text(view, task, ex, stage="train")) if chat else None)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts, completions = encode_examples(encode, pool["prompt"], pool["answer"], cfg.gen_length, eos_id)
    completions = torch.tensor(completions, dtype=torch.long)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="sft",
               disable=not accelerator.is_local_main_process)
    window, t0 = [], time.time()
    for step in bar:
        # the batch and its mask depend only on (seed, step, rank): a resumed run sees the same data
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * accelerator.num_processes
                                          + accelerator.process_index)
        idx = torch.randint(0, len(prompts), (cfg.batch_size,), generator=g)
        batch_prompts, batch_targets = [prompts[i] for i in idx.tolist()], completions[idx]
        loss, logits, targets, masked = batch_loss(model, batch_prompts, batch_targets, g, mask_id, pad_id,
                                                   cfg.loss_weighting, accelerator.device, teacher)
        cache_loss = None
        if cfg.cache_loss != "off":
            mode = ("prefix", "dual")[step % 2] if cfg.cache_loss == "both" else cfg.cache_loss
            view = cached_view(batch_targets, cfg.cache_block_length, g, mask_id)
            cache_loss, *_ = cached_view_loss(model, batch_prompts, batch_targets, cfg.cache_block_length, mode,
                                              view, pad_id, cfg.loss_weighting, accelerator.device, teacher)
            loss = loss + cfg.cache_loss_weight * cache_loss
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            acc = ((logits.argmax(-1) == targets) & masked).sum() / masked.sum().clamp(min=1)
        window.append((loss.item(), acc.item(), float(grad_norm), 0.0 if cache_loss is None else cache_loss.item()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            loss_m, acc_m, gn, cache_m = (sum(x) / len(window) for x in zip(*window))
            record = {"step": step + 1, "loss": round(loss_m, 5), "masked_token_acc": round(acc_m, 4),
                      "grad_norm": round(gn, 4), "lr": scheduler.get_last_lr()[0],
                      "steps_per_second": round(len(window) / (time.time() - t0), 3)}
            if cfg.cache_loss != "off":
                record["cache_loss"] = round(cache_m, 5)  # its share of `loss`: cache_loss_weight x this
            bar.set_postfix(loss=f"{loss_m:.4f}", acc=f"{acc_m:.3f}")
            if accelerator.is_main_process:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            window, t0 = [], time.time()
        if eval_sets and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            record = {"step": step + 1, **evaluate_model(accelerator.unwrap_model(model), tokenizer, eval_sets,
                                                         cfg.gen_length, chat)}
            bar.write(" ".join(f"{k}={v}" for k, v in record.items()))
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(ckpt, model=accelerator.unwrap_model(model), tokenizer=tokenizer, step=step,
                                optimizer=optimizer, scheduler=scheduler)
    if accelerator.is_main_process:  # the trained model itself, once (checkpoints are for --resume)
        export_model(accelerator.unwrap_model(model), tokenizer, out)
    finish_run(accelerator, bar)
    return out
