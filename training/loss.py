"""Pure loss functions of RL post-training; no model, no I/O.

The clipped policy-gradient objective of GRPO/d1, with DiFFPO's truncated importance weight
(arXiv 2510.02212): per completion token,

    loss_j = - w_j * min(rho_j * A, clip(rho_j, 1 - eps, 1 + eps) * A) + beta * KL_j
    rho_j  = exp(logp_theta_j - logp_old_j)                          (surrogate ratio)
    w_j    = min(C, exp(logp_old_j - logp_behaviour_j)), no gradient (truncated IS weight)
    KL_j   = exp(r_j) - r_j - 1,  r_j = logp_ref_j - logp_theta_j    (k3 estimator, Schulman 2020)

averaged over each sequence's scored tokens, then over the sequences. d1 is w = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_std: bool = False, eps: float = 1e-4):
    """Advantage = reward - group mean (optionally / group std); also the count of zero-variance groups.

    ``rewards`` (b,) is ordered group by group: rows [g*G, (g+1)*G) share a prompt.
    """
    groups = rewards.view(-1, num_generations)
    centred = groups - groups.mean(1, keepdim=True)
    std = groups.std(1, keepdim=True, unbiased=False)
    if scale_std:
        centred = centred / (std + eps)
    zero_variance = int((std.squeeze(1) < 1e-8).sum())
    return centred.reshape(-1), zero_variance


def truncated_is_weight(logp_old: torch.Tensor, logp_behaviour: torch.Tensor, cap: float) -> torch.Tensor:
    """w = min(C, pi_old / pi_behaviour) per token, detached."""
    return torch.exp(logp_old - logp_behaviour).clamp(max=cap).detach()


@dataclass
class LossStats:
    loss: float
    kl: float  # mean k3 KL per scored token
    ratio_clip_fraction: float  # tokens where the clipped term was the active one
    is_clip_fraction: float  # tokens whose IS weight hit the cap C
    mean_is_weight: float


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor,
    *,
    epsilon: float,
    beta: float = 0.0,
    logp_ref: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
    is_cap: float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The per-token clipped objective averaged per sequence then over the batch.

    logp, logp_old, logp_ref, is_weight, token_mask: (b, n); advantages: (b,).
    """
    mask = token_mask.float()
    ratio = torch.exp(logp - logp_old.detach())
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv
    surrogate = torch.minimum(unclipped, clipped)
    w = torch.ones_like(logp) if is_weight is None else is_weight.detach()
    per_token = -w * surrogate
    kl = torch.zeros_like(logp)
    if beta and logp_ref is not None:
        r = logp_ref.detach() - logp
        kl = torch.exp(r) - r - 1
        per_token = per_token + beta * kl
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    loss = per_seq.mean()
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = LossStats(
            loss=float(loss),
            kl=float((kl * mask).sum() / n),
            ratio_clip_fraction=float(((clipped < unclipped).float() * mask).sum() / n),
            is_clip_fraction=float((((is_weight >= is_cap) if is_weight is not None and is_cap is not None
                                     else torch.zeros_like(mask, dtype=torch.bool)).float() * mask).sum() / n),
            mean_is_weight=float((w * mask).sum() / n),
        )
    return loss, stats


# ----------------------------------------------------------------------------- the learned threshold (DiFFPO "fast")

def sampler_reward(reward: torch.Tensor, nfe: torch.Tensor, nfe_max: float, lam: float) -> torch.Tensor:
    """r = reward * (1 - lam * NFE / NFE_max): correctness first, then fewer forward passes.

    A wrong answer earns nothing however fast it was, so speed is never bought with accuracy.
    """
    return reward * (1 - lam * nfe.float() / nfe_max)


def threshold_head_loss(log_prob: torch.Tensor, advantages: torch.Tensor, entropy: torch.Tensor,
                        entropy_coef: float) -> torch.Tensor:
    """Group-relative REINFORCE for the head: -mean(A * log pi(gamma | prompt)) - c * mean(H(pi))."""
    return -(advantages.detach() * log_prob).mean() - entropy_coef * entropy.mean()
