"""A plain, one-prompt-at-a-time re-implementation of LLaDA's published sampler.

Low-confidence remasking (Nie et al. 2025, arXiv 2502.09992, Algorithm 2 with the semi-autoregressive
blocks of sec. 2.4), greedy, written as directly as possible from the paper and the published ``generate``:
per block, per step, run the unpadded sequence, predict every masked token (the argmax), score each by the
softmax of its logits taken in the logits' own dtype (the mask token included), and commit the ``k`` best
scored masked tokens of the current block with ``torch.topk`` over a vector as long as the sequence (-inf
everywhere else), as the published code does: in bfloat16 many scores tie, and topk's order among ties
depends on that vector. ``k`` follows LLaDA's schedule. It is the ground truth the tests compare the batched
sampler with, and the baseline loop of the throughput benchmark. It is not used to serve or train anything.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def llada_generate(model, prompt: list[int], *, gen_length: int, block_length: int, steps: int,
                   mask_id: int) -> torch.Tensor:
    """Decode one prompt (a list of ids) and return its ``gen_length`` generated ids."""
    assert gen_length % block_length == 0, "LLaDA needs gen_length divisible by block_length"
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0, "LLaDA needs steps divisible by the number of blocks"
    steps_per_block = steps // num_blocks
    device = next(model.parameters()).device
    x = torch.tensor([prompt + [mask_id] * gen_length], device=device)
    p = len(prompt)
    for b in range(num_blocks):
        lo, hi = p + b * block_length, p + (b + 1) * block_length
        n_masked = int((x[0, lo:hi] == mask_id).sum())
        counts = [n_masked // steps_per_block + (s < n_masked % steps_per_block) for s in range(steps_per_block)]
        for s in range(steps_per_block):
            logits = model(input_ids=x).logits[0]
            x0 = logits.argmax(-1)
            score = torch.softmax(logits, -1).gather(-1, x0[:, None]).squeeze(-1)  # in the logits' dtype
            vector = torch.full_like(score, float("-inf"))
            masked = x[0] == mask_id
            masked[hi:] = False
            vector[masked] = score[masked]
            for j in torch.topk(vector, counts[s]).indices.tolist():
                x[0, j] = x0[j]
    return x[0, p:]
