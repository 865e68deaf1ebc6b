"""Surrogate log-likelihoods of a completion under a masked dLLM, for policy-gradient training.

A masked dLLM has no tractable sequence likelihood, so RL on it scores tokens with cheap surrogates:

``mean_field`` (d1's diffu-GRPO, Zhao et al. 2025, arXiv 2504.12216): one forward pass on
    [prompt with each token masked w.p. ``p_mask`` ; completion fully masked]; every completion token
    gets the per-position marginal log p(y_j | masked prompt, all-mask completion).
``two_stage`` (DiFFPO, arXiv 2510.02212, the "two-times mean-field" surrogate): a time tau is drawn
    among the rollout's own sampling steps 1..K and the rollout's intermediate state z_tau (the tokens
    committed at steps <= tau) is taken from its trajectory. Pass A, on [masked prompt ; all masks],
    scores the tokens committed at steps <= tau; pass B, on [masked prompt ; z_tau], scores the tokens
    committed after tau. Every sampled token gets exactly one log-prob; tau = K is d1's estimate.

Two choices of the estimator are left open by the sources and are options (``RLConfig``): which passes tau is
drawn among (:func:`draw_tau`; ``--tau-over all``: every pass 1..K, as above; ``answer``: only the passes that
commit at least one scored token, :func:`answer_passes`, because a sampler that commits the EOS tail first would
otherwise often draw a z_tau that reveals only the answer's length), and which prompt the importance weight's
numerator sees (``--is-numerator``, :data:`IS_NUMERATORS`; ``training/rl.py`` computes it).

Both score tokens under the policy the sampler draws from, :func:`~diffpo_serve.dllm.sampler.policy_logprobs`
(the model's softmax without the mask token), so that DiFFPO's importance weight compares one family
of distributions (``training/loss.py``).

Commit steps follow the sampler's convention: ``commit_step`` is 0-based (the token was committed by
the forward pass numbered commit_step + 1), and -1 marks positions the sampler filled with EOS after
the text was complete, or padding past a row's length (``sampled`` below).

Which tokens the loss scores (:func:`scored`): as d1 and TRL's GRPO do, a completion's tokens up to and
including its first EOS (any of the model's EOS ids), nothing after it. A dLLM commits most of that tail
itself, often first (at LLaDA's 256 tokens a 30-token answer leaves a tail of ~225 EOS), so scoring every
committed token would make the objective mostly about the tail. The surrogates still compute log-probs at
every position, and DiFFPO's tau and z_tau are unchanged: z_tau is the rollout's own state, tail tokens
committed by step tau included, so it conditions pass B for the scored tokens; the tail's own log-probs are
just never scored.
"""

from __future__ import annotations

import torch

from diffpo_serve.dllm.forward import model_logits
from diffpo_serve.dllm.sampler import policy_logprobs


def prompt_mask(prompt_attention: torch.Tensor, p_mask: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """d1's random prompt masking: each real prompt token is masked independently with prob. p_mask."""
    draw = torch.rand(prompt_attention.shape, generator=generator, device="cpu").to(prompt_attention.device)
    return (draw < p_mask) & prompt_attention


IS_NUMERATORS = ("masked", "unmasked")  # the importance weight's pi_old sees the p_mask-masked prompt, or all of it
TAU_OVER = ("all", "answer")  # tau is drawn among every pass, or among the passes that commit scored tokens


def answer_passes(commit_step: torch.Tensor, token_mask: torch.Tensor, num_steps: torch.Tensor) -> torch.Tensor:
    """(b, K) bool, K = the largest ``num_steps``: column s - 1 is True where the row's pass s committed at least
    one token of ``token_mask`` (the scored tokens, :func:`scored`): the passes that commit answer tokens.
    ``commit_step`` is 0-based (pass s commits the tokens with commit_step s - 1); -1 (fills) is never a pass."""
    width = max(int(num_steps.max()), int(commit_step.max()) + 1, 1)
    steps = torch.arange(width, device=commit_step.device)
    return ((commit_step[..., None] == steps) & token_mask.bool()[..., None]).any(1)


def draw_tau(num_steps: torch.Tensor, generator: torch.Generator | None = None,
             passes: torch.Tensor | None = None) -> torch.Tensor:
    """tau (b,), 1-based, uniform over each row's allowed passes: every pass 1..K (``passes`` None; K = the row's
    number of sampling steps, its NFE) or those marked True in ``passes`` (b, >= K), column s - 1 for pass s
    (:func:`answer_passes`); a row with none marked draws from 1..K (it has no scored token: its tau changes
    nothing). One uniform u per row either way, mapped to the floor(u * n)-th of the row's n allowed passes, so
    both variants consume the generator alike and ``passes`` marking every pass draws the same tau as None."""
    u = torch.rand(num_steps.shape, generator=generator, device="cpu").to(num_steps.device)
    most = int(num_steps.max())
    if passes is not None and passes.shape[1] < most:
        raise ValueError(f"draw_tau: passes has {passes.shape[1]} columns, fewer than the most passes of a row "
                         f"({most})")
    every = torch.arange(most if passes is None else passes.shape[1], device=num_steps.device) < num_steps[:, None]
    allowed = every if passes is None else passes.bool() & every
    allowed = torch.where(allowed.any(1, keepdim=True), allowed, every)
    n = allowed.sum(1)
    pick = (u * n).floor().long().clamp(max=n - 1)  # 0-based rank among the allowed passes
    return (allowed.long().cumsum(1) <= pick[:, None]).sum(1) + 1


def sampled(commit_step: torch.Tensor) -> torch.Tensor:
    """Completion positions that carry a sampled token (not an EOS fill or padding)."""
    return commit_step >= 0


def through_first_eos(completion: torch.Tensor, eos_ids) -> torch.Tensor:
    """d1's completion mask: (b, n) True at positions up to and including each row's first EOS (any id of
    ``eos_ids``), False after it; a row without an EOS is True everywhere."""
    eos_ids = [int(i) for i in eos_ids]
    if not eos_ids:
        raise ValueError("eos_ids is empty: the completion mask needs the model's EOS ids (LoadedModel.eos_ids)")
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device)).long()
    return (is_eos.cumsum(-1) - is_eos) == 0  # no EOS strictly before the position


def scored(completion: torch.Tensor, commit_step: torch.Tensor, eos_ids) -> torch.Tensor:
    """The tokens the RL loss scores (its ``token_mask``, KL and per-token means included): sampled tokens up
    to and including the first EOS of each completion (module docstring)."""
    return sampled(commit_step) & through_first_eos(completion, eos_ids)


def _token_logprobs(model, prompt_ids, prompt_attention, canvas, completion, mask_id, masked_prompt):
    """log p(completion_j | [masked prompt ; canvas]) at every completion position j (b, n)."""
    noisy_prompt = torch.where(masked_prompt, torch.full_like(prompt_ids, mask_id), prompt_ids)
    ids = torch.cat([noisy_prompt, canvas], 1)
    attention = torch.cat([prompt_attention, torch.ones_like(canvas, dtype=torch.bool)], 1)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    logits = model_logits(model, ids, attention, positions)[:, prompt_ids.shape[1]:]
    return policy_logprobs(logits, mask_id).gather(-1, completion[..., None]).squeeze(-1)


def mean_field_logprobs(model, prompt_ids, prompt_attention, completion, masked_prompt, mask_id) -> torch.Tensor:
    """d1's one-pass estimate: (b, n) log-probs of every completion token from an all-mask completion."""
    return _token_logprobs(model, prompt_ids, prompt_attention, torch.full_like(completion, mask_id), completion,
                           mask_id, masked_prompt)


def two_stage_logprobs(model, prompt_ids, prompt_attention, completion, commit_step, tau, masked_prompt,
                       mask_id) -> torch.Tensor:
    """DiFFPO's two-stage estimate: (b, n) log-probs, tokens committed at steps <= tau from pass A,
    the rest from pass B conditioned on the rollout's own z_tau (every token committed by then, an EOS
    tail's too). ``tau`` (b,) is 1-based. Which positions count is the caller's mask (:func:`scored`).

    Both passes run as one forward call (rows needing no pass B are not repeated), which keeps a
    single forward per backward under DistributedDataParallel.
    """
    early = sampled(commit_step) & (commit_step < tau[:, None])  # committed by the first tau passes: z_tau
    late = sampled(commit_step) & ~early
    rows = late.any(-1).nonzero().squeeze(-1)
    all_masked = torch.full_like(completion, mask_id)
    z_tau = torch.where(early[rows], completion[rows], all_masked[rows])
    logp_all = _token_logprobs(model, torch.cat([prompt_ids, prompt_ids[rows]]),
                               torch.cat([prompt_attention, prompt_attention[rows]]),
                               torch.cat([all_masked, z_tau]), torch.cat([completion, completion[rows]]), mask_id,
                               torch.cat([masked_prompt, masked_prompt[rows]]))
    b = completion.shape[0]
    logp = logp_all[:b].clone()
    logp[rows] = torch.where(late[rows], logp_all[b:], logp[rows])
    return logp
