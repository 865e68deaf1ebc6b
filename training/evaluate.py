"""``diffpo-train eval``: accuracy, exact-match rate and NFE of a model on a task.

Decodes every prompt with the shared sampler (batched), scores it with the task's reward, prints a
readable table and, as the last stdout line, one JSON object with the summary. Where a task's published number
is computed differently from its reward (sudoku: d1 compares cells with the one stored solution, so a right
answer to a puzzle with several solutions loses cells), ``d1_accuracy`` reports d1's number beside it.

The model decodes through its :class:`~diffpo_serve.dllm.decoding.Decoder`, whatever its paradigm; the flags
become the decoder's knobs (:func:`eval_params`), validated as the server validates a request's fields, and a
refused knob is an error naming its flag. A canvas model (DiffusionGemma): ``--threshold`` is the entropy bound,
``--steps`` the most denoising steps per block, ``--t-min``/``--t-max``/``--stability-threshold``/
``--confidence-threshold`` its schedule and early stop; masked-only flags are refused. Its NFE counts decoder
passes; the summary adds the mean encoder passes (one per block).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from diffpo_serve.dllm import canvas
from diffpo_serve.dllm.decoding import CANVAS_ONLY, Decoder, KnobError, Knobs, decoder_for
from diffpo_serve.dllm.loading import LoadedModel, load_model, parse_ids
from diffpo_serve.dllm.sampler import SamplingParams
from training.config import EvalConfig
from training.prompting import default_steps, generation_lengths, prompt_ids, uses_chat_template
from training.tasks import get_task


@dataclass
class EvalResult:
    task: str
    n: int
    accuracy: float  # mean reward
    exact: float  # fraction with reward 1
    mean_nfe: float  # model passes (a canvas model's: decoder passes)
    mean_encoder_passes: float | None  # a canvas model's encoder passes (one per block); None for masked models
    tokens_per_second: float  # completion tokens (up to EOS) per second of decoding
    sampler: str
    threshold: float | None
    gen_length: int
    block_length: int  # a canvas model's: its canvas length
    steps: int | None  # `steps` sampler: passes; a canvas model: the most denoising steps per block
    seconds: float
    cache: str  # the KV cache decoded with (off / prefix / dual)
    threshold_distribution: dict | None  # `learned`: how often each gamma was chosen
    d1_accuracy: float | None  # the task's number as d1's evaluator computes it, where it differs (sudoku)
    rows: list  # per example: prompt, completion, reward, nfe, threshold (canvas: also encoder_passes)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "rows"}


def evaluate(loaded: LoadedModel, task_name: str, dataset, params: SamplingParams | canvas.CanvasParams,
             batch_size: int = 64, progress: bool = True, desc: str = "eval", chat_template: bool = True) -> EvalResult:
    """Decode and score every example of ``dataset`` (columns: prompt + the task's fields).

    ``params``: :class:`SamplingParams` for a masked model, :class:`canvas.CanvasParams` for a canvas model;
    with a ``seed``, example i decodes with ``seed + i``. ``chat_template``: a model with a chat template reads
    the task's instruction in it (training/prompting.py); False sends the raw prompts.
    """
    task = get_task(task_name)
    decoder = decoder_for(loaded)
    params = decoder.resolve(params)
    rows, total_tokens, seconds, scored = [], 0, 0.0, []
    examples = list(dataset)
    bar = tqdm(total=len(examples), desc=f"{desc} {task_name}", disable=not progress)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [prompt_ids(loaded, task_name, ex, chat_template) for ex in chunk]
        chunk_params = params if params.seed is None else [
            replace(params, seed=params.seed + start + i) for i in range(len(chunk))]
        t0 = time.perf_counter()
        sequences, nfes, thresholds, encoder_passes = _decode(loaded, decoder, prompts, chunk_params)
        seconds += time.perf_counter() - t0
        for ex, ids, nfe, thr, enc in zip(chunk, sequences, nfes, thresholds, encoder_passes):
            text, _ = loaded.decode(ids)
            end = loaded.eos_index(ids)
            total_tokens += end if end is not None else params.gen_length
            scored.append((text, ex))
            rows.append({"prompt": ex["prompt"], "completion": text, "reward": task.reward(text, ex), "nfe": nfe,
                         "threshold": thr, **({} if enc is None else {"encoder_passes": enc})})
        bar.update(len(chunk))
    bar.close()
    n = len(rows)
    rewards = [r["reward"] for r in rows]
    return EvalResult(
        task=task_name, n=n, accuracy=sum(rewards) / max(n, 1), exact=sum(r >= 1.0 for r in rewards) / max(n, 1),
        mean_nfe=sum(r["nfe"] for r in rows) / max(n, 1), tokens_per_second=total_tokens / max(seconds, 1e-9),
        mean_encoder_passes=(sum(r["encoder_passes"] for r in rows) / max(n, 1) if rows and "encoder_passes" in
                             rows[0] else None),
        sampler=params.sampler,
        threshold=(sum(r["threshold"] for r in rows) / max(n, 1) if params.sampler == "learned" and
                   params.threshold is None else params.threshold if params.sampler != "steps" else None),
        gen_length=params.gen_length, seconds=seconds, rows=rows, **decoder.summary(params),
        threshold_distribution=_distribution([r["threshold"] for r in rows]) if params.sampler == "learned" else None,
        d1_accuracy=task.d1_accuracy(scored) if hasattr(task, "d1_accuracy") else None)


def _decode(loaded: LoadedModel, decoder: Decoder, prompts: list[list[int]],
            params: list) -> tuple[list, list, list, list]:
    """One batch: per row its token ids (cut at its ``gen_length``), NFE, bound and encoder passes (None for a
    masked model)."""
    out = decoder.generate(prompts, params)
    encoder = [None] * len(prompts) if out.encoder_passes is None else out.encoder_passes.tolist()
    return out.rows(), out.nfe.tolist(), out.threshold.tolist(), encoder


def eval_params(cfg: EvalConfig, loaded: LoadedModel, gen_length: int, block_length: int | None, chat: bool):
    """The eval flags as the model's decoder params (:meth:`~diffpo_serve.dllm.decoding.Decoder.params_for`),
    validated and refused as the server validates a request's fields; a refusal is a ValueError naming the model
    and the flag. ``--sampler`` unset: ``steps`` for a model that decodes masked tokens, else the model's own.
    ``--temperature 0`` (the default) means unset, as the server's ``--default-temperature 0``; ``block_length``
    (the chat-template default of 32 where ``--block-length`` is unset) applies where the caller picks the blocks
    (a canvas model's blocks are its canvas)."""
    decoder = decoder_for(loaded)
    if cfg.mask_id is not None and not decoder.masks:
        raise ValueError(f"{loaded.path}: --mask-id: this model has no mask token (it decodes a random-token canvas)")
    sampler = cfg.sampler or ("steps" if decoder.masks else decoder.fallback_sampler())
    steps = cfg.steps if cfg.steps is not None else default_steps(chat and sampler == "steps", gen_length)
    knobs = Knobs(sampler=sampler, threshold=cfg.threshold, steps=steps,
                  block_length=block_length if decoder.block_length is None else cfg.block_length, cache=cfg.cache,
                  temperature=cfg.temperature or None, seed=cfg.seed,
                  **{name: getattr(cfg, name) for name in CANVAS_ONLY})
    try:
        return decoder.params_for(knobs, gen_length)
    except KnobError as e:
        flag = "--" + e.param.replace("_", "-")
        if e.param in CANVAS_ONLY and e.code == "unsupported_parameter":  # a masked model refusing them
            raise ValueError(f"{loaded.path}: {flag} is an option of canvas models (DiffusionGemma's temperature "
                             "schedule and early stop); this model decodes masked tokens") from None
        raise ValueError(f"{loaded.path}: {flag}: {e}") from None


def canvas_params(cfg: EvalConfig, loaded: LoadedModel, gen_length: int) -> canvas.CanvasParams:
    """A canvas model's :func:`eval_params` (it ignores the chat-template lengths)."""
    return eval_params(cfg, loaded, gen_length, None, chat=False)


def _distribution(values: list[float]) -> dict:
    counts: dict = {}
    for v in values:
        counts[f"{v:.4g}"] = counts.get(f"{v:.4g}", 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: float(kv[0])))


def load_eval_data(cfg: EvalConfig):
    task = get_task(cfg.task)
    data = task.load_file(cfg.data) if cfg.data else task.make_dataset("test", cfg.num_examples, cfg.seed)
    if cfg.limit is not None:
        data = data.select(range(min(cfg.limit, len(data))))
    return data


def format_table(result: EvalResult) -> str:
    s = result.summary()
    width = max(len(k) for k in s)
    lines = [f"{k:<{width}}  {round(v, 4) if isinstance(v, float) else v}" for k, v in s.items()]
    return "\n".join(lines)


def run_eval(cfg: EvalConfig) -> dict:
    data = load_eval_data(cfg)  # read the data first: a bad file fails before the model loads
    loaded = load_model(cfg.model, mask_id=cfg.mask_id, pad_id=cfg.pad_id,
                        eos_ids=parse_ids(cfg.eos_id, "--eos-id") if cfg.eos_id is not None else None,
                        device=cfg.device, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype,
                        compile=cfg.compile)
    task = get_task(cfg.task)
    chat = uses_chat_template(loaded, cfg.chat_template)
    gen_length, block_length = generation_lengths(chat, task.GEN_LENGTH, cfg.gen_length, cfg.block_length)
    params = eval_params(cfg, loaded, gen_length, block_length, chat)
    torch.manual_seed(cfg.seed)
    result = evaluate(loaded, cfg.task, data, params, batch_size=cfg.batch_size, chat_template=cfg.chat_template)
    if cfg.output:
        with open(cfg.output, "w") as f:
            for r in result.rows:
                f.write(json.dumps(r) + "\n")
    print(format_table(result))
    summary = {**result.summary(), "chat_template": chat, "model": loaded.path, "dtype": str(next(loaded.model.parameters()).dtype)[6:]}
    print(json.dumps(summary))
    return summary


def evaluate_tasks(loaded: LoadedModel, eval_sets: dict, params: SamplingParams | canvas.CanvasParams,
                   chat_template: bool = True) -> dict:
    """Accuracy, exact rate and NFE of ``loaded`` on each task's prompts (``eval_sets``: task name -> dataset),
    as the ``eval_<task>_<metric>`` fields the trainers log. A masked model decodes with ``params`` made greedy;
    a canvas model cannot (it starts from random tokens and samples with its temperature schedule), so it
    decodes with fixed seeds (example i with seed i) and every point of a curve sees the same random streams
    (:meth:`~diffpo_serve.dllm.decoding.Decoder.reproducible`)."""
    record = {}
    fixed = decoder_for(loaded).reproducible(params)
    for task, data in eval_sets.items():
        r = evaluate(loaded, task, data, fixed, progress=False, chat_template=chat_template)
        record.update({f"eval_{task}_accuracy": round(r.accuracy, 4), f"eval_{task}_exact": round(r.exact, 4),
                       f"eval_{task}_mean_nfe": round(r.mean_nfe, 3)})
        if r.d1_accuracy is not None:
            record[f"eval_{task}_d1_accuracy"] = round(r.d1_accuracy, 4)
    return record
