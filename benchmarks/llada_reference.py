"""A plain, one-prompt-at-a-time re-implementation of LLaDA's published sampler.

Low-confidence remasking (Nie et al. 2025, arXiv 2502.09992, Algorithm 2 with the semi-autoregressive
blocks of sec. 2.4), greedy, written as directly as possible from the paper: per block, per step,
predict every masked token, and commit the ``k`` most confident ones of the current block, ``k``
following LLaDA's schedule. It is the ground truth the tests compare the batched sampler with, and
the baseline loop of the throughput benchmark. It is not used to serve or train anything.
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
            confidence = torch.softmax(logits.float(), -1).gather(-1, x0[:, None]).squeeze(-1)
            masked = [j for j in range(lo, hi) if x[0, j] == mask_id]
            for j in sorted(masked, key=lambda j: -float(confidence[j]))[:counts[s]]:
                x[0, j] = x0[j]
    return x[0, p:]
