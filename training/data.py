"""Turning task examples into token tensors: the SFT pool and the left-padded batches.

A training sequence is ``[left padding | prompt | completion]`` where the completion is the answer's
tokens followed by EOS up to ``gen_length`` (LLaDA trains on the EOS padding too, which is how the
model learns where to stop).
"""

from __future__ import annotations

import logging

import torch
from datasets import concatenate_datasets

from training.tasks import get_task

log = logging.getLogger(__name__)


def sft_pool(tasks: list[str], n_per_task: int, seed: int):
    """A shuffled dataset mixing ``n_per_task`` training examples of each task."""
    parts = [get_task(t).make_dataset("train", n_per_task, seed).select_columns(["prompt", "answer"])
             for t in tasks]
    return concatenate_datasets(parts).shuffle(seed=seed)


def encode_examples(encode, prompts: list[str], answers: list[str], gen_length: int, eos_id: int):
    """Token lists of prompts and EOS-padded completions; answers longer than gen_length are cut."""
    prompt_ids, completion_ids = [], []
    cut = 0
    for p, a in zip(prompts, answers):
        full = encode(a)
        cut += len(full) > gen_length
        c = full[:gen_length]
        prompt_ids.append(encode(p))
        completion_ids.append(c + [eos_id] * (gen_length - len(c)))
    if cut:
        log.warning("%d answers longer than gen_length=%d were truncated", cut, gen_length)
    return prompt_ids, completion_ids


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, P) ids and bool attention mask, prompts aligned to the right edge."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.as_tensor(p)
            attn[i, width - len(p):] = True
    return ids, attn
