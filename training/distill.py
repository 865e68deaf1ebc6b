"""``diffpo-train distill``: self-distillation of a model's full-step answers into few-pass decoding.

A masked dLLM decoded in few passes commits several tokens from one forward pass, each from its own
marginal. Where the model spreads its belief over several answers (two orders of the same sum, two
near-identical numbers), those marginals mix them and a few-pass decode writes digits of one answer
next to digits of another; decoded one token per pass, the model settles on one answer first. This
stage makes the model confident in the answer it would give at full steps:

1. the model (the teacher) decodes each task's training prompts with the ``steps`` sampler, one token
   per pass, greedily;
2. answers whose task reward is at least ``min_reward`` are kept (default 1.0: only correct ones, so
   the model is never taught a wrong answer), in equal numbers per task;
3. the same model (the student) is fine-tuned on them with the masked-diffusion SFT loss, at every
   masking ratio including the all-mask canvas the first pass of a fast decode sees.

Entropy-bounded and confidence samplers then commit more tokens per pass. This is the idea of
certainty-forcing distillation (dParallel, arXiv 2509.26488), which fine-tunes a dLLM on its own
trajectories to be confident on masked tokens in parallel; here the plain SFT loss on the model's own
greedy answers does it. The teacher's answers are written to ``OUTPUT_DIR/distill_data.jsonl``
(prompt, answer, task, reward) before training, and ``--resume`` reads them back from there;
``OUTPUT_DIR/distill_teacher.json`` records, per task, the teacher's accuracy and exact rate and the answers kept.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

import datasets
import torch

from diffpo_serve.dllm.loading import default_model_path, load_model
from diffpo_serve.dllm.sampler import SamplingParams
from training.config import DistillConfig, SFTConfig
from training.data import data_files, task_examples
from training.evaluate import evaluate
from training.sft import CHECKPOINT, train_sft
from training.tasks import get_task
from training.tasks.common import file_error, get_field, read_jsonl

log = logging.getLogger(__name__)
DATA_FILE = "distill_data.jsonl"
TEACHER_FILE = "distill_teacher.json"  # per task: prompts, the teacher's accuracy and exact, answers kept


def select_answers(rows_by_task: dict[str, list[dict]], min_reward: float) -> list[dict]:
    """The rows with ``reward >= min_reward``, the same number from each task (the first ones kept).

    ``rows_by_task``: task -> rows with ``prompt``, ``completion`` and ``reward``. Returns rows with
    ``task``, ``prompt``, ``answer`` and ``reward``, tasks in the given order.
    """
    kept = {t: [r for r in rows if r["reward"] >= min_reward] for t, rows in rows_by_task.items()}
    if not kept:
        return []
    per_task = min(len(rows) for rows in kept.values())
    return [{"task": t, "prompt": r["prompt"], "answer": r["completion"], "reward": r["reward"]}
            for t, rows in kept.items() for r in rows[:per_task]]


def teacher_answers(cfg: DistillConfig) -> list[dict]:
    """Decode every task's training prompts (generated, or its ``--data`` file's) with the model at full
    steps; the kept rows."""
    tasks = cfg.tasks.split(",")
    files = data_files(cfg.data, tasks)  # read before the model loads: a bad file fails first
    prompts = {name: task_examples(name, "train", cfg.train_examples, cfg.seed, files.get(name)) for name in tasks}
    loaded = load_model(cfg.model, device=cfg.device)
    torch.manual_seed(cfg.seed)
    rows_by_task, summary = {}, {}
    for name in tasks:
        task = get_task(name)
        params = SamplingParams(sampler="steps", gen_length=cfg.gen_length or task.GEN_LENGTH, steps=cfg.teacher_steps)
        data = prompts[name]
        result = evaluate(loaded, name, data, params, batch_size=cfg.teacher_batch_size, desc="teacher")
        log.info("teacher on %s: %d prompts, accuracy %.3f, exact %.3f", name, result.n, result.accuracy, result.exact)
        rows_by_task[name] = result.rows
        summary[name] = {"prompts": result.n, "accuracy": result.accuracy, "exact": result.exact,
                         "reward_at_least_min": sum(r["reward"] >= cfg.min_reward for r in result.rows)}
    chosen = select_answers(rows_by_task, cfg.min_reward)
    for name, rows in rows_by_task.items():
        summary[name]["kept"] = sum(r["task"] == name for r in chosen)
        log.info("%s: %d of %d answers have reward >= %g", name, summary[name]["reward_at_least_min"],
                 len(rows), cfg.min_reward)
    if not chosen:
        raise ValueError(f"no teacher answer has reward >= {cfg.min_reward} on some task of {cfg.tasks!r}: "
                         "nothing to distill (lower --min-reward or drop that task)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / TEACHER_FILE).write_text(json.dumps({"min_reward": cfg.min_reward, "tasks": summary}, indent=2))
    return chosen


def write_data(path: Path, rows: list[dict]) -> None:
    """Atomic write; under a multi-process launch every rank decodes the same rows and writes its own tmp."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def read_data(path: Path) -> list[dict]:
    """The rows of a distill_data.jsonl; a malformed line is reported with the file and line."""
    rows = []
    for lineno, obj in read_jsonl(path):
        rows.append({"task": get_field(path, lineno, obj, "task"), "prompt": get_field(path, lineno, obj, "prompt"),
                     "answer": get_field(path, lineno, obj, "answer"),
                     "reward": get_field(path, lineno, obj, "reward", kinds=(int, float))})
    if not rows:
        raise file_error(path, None, "no rows")
    return rows


def sft_config(cfg: DistillConfig) -> SFTConfig:
    """The SFT run that trains the student: constant lr after warm-up, from the teacher's weights."""
    gen_length = cfg.gen_length or max(get_task(t).GEN_LENGTH for t in cfg.tasks.split(","))
    return SFTConfig(output_dir=cfg.output_dir, model=cfg.model, tasks=cfg.tasks, gen_length=gen_length,
                     max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                     min_lr_ratio=1.0, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                     loss_weighting=cfg.loss_weighting, seed=cfg.seed, save_every=cfg.save_every,
                     log_every=cfg.log_every, resume=cfg.resume, cache_loss=cfg.cache_loss,
                     cache_loss_weight=cfg.cache_loss_weight, cache_block_length=cfg.cache_block_length,
                     targets=cfg.targets, data=cfg.data, eval_data=cfg.eval_data, eval_every=cfg.eval_every,
                     eval_examples=cfg.eval_examples)


def train_distill(cfg: DistillConfig) -> Path:
    """Run self-distillation; returns the output directory, a loadable model directory.

    The output has no threshold head, even if the teacher had one: the head reads the model's hidden
    states, which this stage changes; train a new one with ``rl --train sampler`` or ``--train joint``.
    """
    cfg = replace(cfg, model=cfg.model or default_model_path())
    out = Path(cfg.output_dir)
    data_file = out / DATA_FILE
    if cfg.resume and data_file.exists():
        rows = read_data(data_file)
        log.info("--resume: %d teacher answers read from %s", len(rows), data_file)
    else:
        if cfg.resume and (out / CHECKPOINT).exists():
            raise ValueError(f"--resume: {out / CHECKPOINT} exists but {data_file} does not; the teacher's answers "
                             "of that run are lost (start a new run without --resume)")
        rows = teacher_answers(cfg)
        out.mkdir(parents=True, exist_ok=True)
        write_data(data_file, rows)
        (out / "distill_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    pool = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    return train_sft(sft_config(cfg), pool=pool.shuffle(seed=cfg.seed))
