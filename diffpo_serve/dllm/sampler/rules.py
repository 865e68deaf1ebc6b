"""The commit rules and the distributions they read: pure functions of logits, scores and candidates.

Confidence and entropy are those of the model's policy pi = :func:`policy_logprobs` (softmax of the logits with
the mask token excluded: a committed mask would never be unmasked), except the score ``steps`` ranks by, which is
LLaDA's (:func:`remasking_confidence`: mask included, in the model's dtype); tokens are drawn from the behaviour
distribution q = :func:`sampling_logprobs` (pi at ``temperature`` cut to ``top_p``; a point mass on the argmax when
the temperature is 0), and log q of each committed token is recorded with its commit step: the trajectory that RL
needs (its importance weight divides the surrogate's pi_old, computed with the same :func:`policy_logprobs`, by
this q; see ``training/loss.py``).
"""

from __future__ import annotations

import torch

from diffpo_serve.dllm.sampler.params import Sampler


def policy_logprobs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log pi(x): the model's distribution over the vocabulary without the mask token, (..., V) float.

    The one definition of the policy a dLLM samples from and RL trains: the sampler reads confidence
    and entropy from it and draws from :func:`sampling_logprobs` of it, and RL's likelihood surrogates
    (``training/likelihood.py``) score completions with it, so that the truncated importance weight
    pi_old / q compares two distributions of one family. The mask token gets log-prob -inf: it is
    never drawn, so it never enters either term. Out of place (autograd-safe).
    """
    column = torch.tensor([mask_id], device=logits.device)
    return torch.log_softmax(logits.float().index_fill(-1, column, float("-inf")), dim=-1)


def sampling_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """log q(x): the behaviour distribution a row actually draws its tokens from.

    ``logits`` (b, n, V) are the policy's log-probs (:func:`policy_logprobs`; logits with the mask
    at -inf give the same q); temperature, top_p (b,). With T > 0, q = softmax(log pi / T) restricted
    to the top-p nucleus (the smallest prefix of the sorted distribution whose mass reaches top_p,
    the first token always) and renormalised; with T = 0 (greedy) q is the point mass on the argmax
    (log q = 0 there, -inf elsewhere), whatever top_p. T = 1 with top_p = 1 is pi itself.
    """
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logq = torch.log_softmax(logits.float() / t[:, None, None], dim=-1)
    if bool((top_p < 1).any()):
        sorted_logq, order = logq.sort(dim=-1, descending=True)
        probs = sorted_logq.exp()
        # keep the smallest prefix whose mass reaches top_p (the first token always)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p[:, None, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logq = torch.log_softmax(logq.masked_fill(drop, float("-inf")), dim=-1)
    if bool((temperature == 0).any()):
        point = torch.full_like(logq, float("-inf")).scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
        logq = torch.where((temperature == 0)[:, None, None], point, logq)
    return logq


def transfer_counts(block_size: torch.Tensor, steps_per_block: torch.Tensor, block_step: torch.Tensor) -> torch.Tensor:
    """LLaDA's schedule: tokens committed at step s of a block of n masks decoded in S steps.

    n // S each, plus one for the first n % S steps; at least one.
    """
    base = block_size // steps_per_block
    extra = (block_step < block_size % steps_per_block).long()
    return (base + extra).clamp(min=1)


def _ranks(scores: torch.Tensor, candidates: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0 = best) of every candidate position by score; non-candidates rank last. Also the order."""
    fill = float("-inf") if descending else float("inf")
    order = scores.masked_fill(~candidates, fill).argsort(dim=-1, descending=descending, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                             .expand_as(order).contiguous())
    return ranks, order


def entropy_before(entropy: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantity the EB rule bounds: for each candidate position (b, n), the summed entropy of the
    candidates ranked before it by ascending entropy (position order; EB commits the prefix where this
    is <= gamma, and always the first). Also each position's rank."""
    rank, order = _ranks(entropy, candidates, descending=False)
    sorted_h = entropy.gather(-1, order).masked_fill(~candidates.gather(-1, order), 0.0)
    exclusive = sorted_h.cumsum(-1) - sorted_h
    return exclusive.gather(-1, rank), rank  # back to position order


def greedy_tokens(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The greedy token at each position (...,): the argmax of the raw logits with the mask token left out
    (the policy never commits it), without copying the logits: the rare positions whose argmax is the mask
    token take the argmax of their logits with that column at -inf. Ties go to the lowest id, as ``argmax``."""
    tokens = logits.argmax(-1)
    hit = tokens == mask_id
    if bool(hit.any()):
        column = torch.tensor([mask_id], device=logits.device)
        tokens[hit] = logits[hit].index_fill(-1, column, float("-inf")).argmax(-1)
    return tokens


def remasking_confidence(logits: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The score LLaDA's low-confidence remasking ranks by (its ``generate``'s ``x0_p``), (b, n) in float64
    (exactly the values it computes): the softmax of the raw logits (b, n, V), the mask token included, taken
    in the logits' own dtype as the published sampler takes it, at the position's prediction: for a greedy
    decode (``tokens`` None) the largest probability (the raw argmax's, even where that is the mask token,
    which the policy never commits), else the probability of each drawn token (``tokens``, b, n).

    It is not the policy's confidence (:func:`policy_logprobs`: float32, the mask excluded): in bfloat16 the
    softmax rounds to 8 significant bits, so many scores tie and the order among ties decides the commits.
    """
    probs = torch.softmax(logits, dim=-1)
    if tokens is None:
        return probs.amax(-1).double()
    return probs.gather(-1, tokens[..., None]).squeeze(-1).double()


def low_confidence_commits(score: torch.Tensor, candidates: torch.Tensor, num_transfer: torch.Tensor,
                           cols: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                           length: torch.Tensor | None = None) -> torch.Tensor:
    """The ``steps`` rule (b, n bool): each row commits its ``num_transfer`` highest-scoring candidates.

    Ties are broken as LLaDA's ``generate`` breaks them: it calls ``torch.topk`` on a vector as long as the
    row's sequence (prompt + answer) holding the scores of the block's masked positions and -inf elsewhere,
    and topk's order among equal values depends on that layout. So the same vector is built here: ``cols``
    (b, n) are the block's generation positions, ``offset`` (b,) the row's prompt length and ``length`` (b,)
    its answer length (default: the block alone, at offset 0).
    """
    b, n = score.shape
    cols = torch.arange(n, device=score.device).expand(b, n) if cols is None else cols
    offset = torch.zeros(b, dtype=torch.long, device=score.device) if offset is None else offset
    length = torch.full((b,), n, dtype=torch.long, device=score.device) if length is None else length
    at = offset[:, None] + cols  # b, n  positions in the row's sequence
    ends = (offset + length).tolist()
    sequence = score.new_full((b, max(ends, default=0)), float("-inf"))
    # a narrower block repeats its last column (not a candidate, so -inf): amax keeps the real score there
    sequence.scatter_reduce_(1, at, score.masked_fill(~candidates, float("-inf")), "amax")
    chosen = torch.zeros(sequence.shape, dtype=torch.bool, device=score.device)
    for i, k in enumerate(num_transfer.tolist()):
        if k > 0 and ends[i] > 0:  # one 1-D topk per row, as LLaDA's generate calls it
            chosen[i, torch.topk(sequence[i, :ends[i]], min(k, ends[i])).indices] = True
    return chosen.gather(1, at) & candidates


def select_commits(
    confidence: torch.Tensor,
    entropy: torch.Tensor,
    candidates: torch.Tensor,
    sampler: torch.Tensor,
    threshold: torch.Tensor,
    num_transfer: torch.Tensor,
    layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Which candidate positions each row commits now (b, n bool); rows with a candidate commit >= 1.

    confidence, entropy, candidates: (b, n); sampler (:class:`Sampler` values), threshold, num_transfer: (b,).
    ``steps`` rows select with :func:`low_confidence_commits` (their confidence should be
    :func:`remasking_confidence`; ``layout`` = its ``(cols, offset, length)``). ``learned`` rows select like
    ``eb`` (their threshold is the head's gamma).
    """
    conf_rank, _ = _ranks(confidence, candidates, descending=True)
    top1 = (conf_rank == 0) & candidates
    steps_sel = torch.zeros_like(candidates)
    steps = (sampler == Sampler.STEPS).nonzero().squeeze(-1)
    if len(steps):
        cols, offset, length = (None, None, None) if layout is None else (t[steps] for t in layout)
        steps_sel[steps] = low_confidence_commits(confidence[steps], candidates[steps], num_transfer[steps],
                                                  cols, offset, length)
    conf_sel = ((confidence >= threshold[:, None]) & candidates) | top1
    before, ent_rank = entropy_before(entropy, candidates)
    eb_sel = ((before <= threshold[:, None]) & candidates) | ((ent_rank == 0) & candidates)
    code = sampler[:, None]
    return torch.where(code == Sampler.STEPS, steps_sel, torch.where(code == Sampler.CONFIDENCE, conf_sel, eb_sel))

