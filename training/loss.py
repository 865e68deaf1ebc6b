"""Pure loss functions of RL post-training; no model, no I/O.

The clipped policy-gradient objective of GRPO/d1, with DiFFPO's truncated importance weight
(arXiv 2510.02212): per completion token,

    loss_j = - w_j * min(rho_j * A, clip(rho_j, 1 - eps, 1 + eps) * A) + beta * KL_j
    rho_j  = exp(logp_theta_j - logp_old_j)                          (surrogate ratio)
    w_j    = min(C, exp(logp_old_j - logp_behaviour_j)), no gradient (truncated IS weight)
    KL_j   = exp(r_j) - r_j - 1,  r_j = logp_ref_j - logp_theta_j    (k3 estimator, Schulman 2020)

summed over the scored tokens of the whole batch and divided by their number. d1 is w = 1.

Scored tokens (``token_mask``, :func:`training.likelihood.scored`): each completion's sampled tokens up to
and including its first EOS, as d1 and TRL's GRPO build ``completion_mask``. The normaliser is d1's:
``(per_token_loss * completion_mask).sum() / completion_mask.sum()`` over a process's batch (d1's
``compute_loss``), a token-level mean, so a long completion weighs more than a short one (TRL's earlier
GRPO averaged per sequence first; d1 does not). Under DDP each process normalises by its own count and
the gradients are averaged across processes, as in d1. The KL term and the logged means (KL, clip
fractions, IS weight) are over the same tokens.

The learned samplers' losses below (the threshold head's, and the step policy's in
``training/commit_policy.py``) take no token mask: they are REINFORCE on a rollout's own decisions (its
gamma; every commit bit of every pass, the tail's included, since those decisions set the NFE the sampler
reward pays for), one log-probability per rollout.

The importance weight, defined once. Token y_j was committed at the rollout's step s_j in the context
z_{s_j} (the prompt and the tokens committed before that step). The behaviour policy is what the
sampler actually drew it from:

    q(y | z) = nucleus_top_p( softmax(log pi(. | z) / T) )(y),   pi = softmax(logits) without the mask token

(a point mass on the argmax at T = 0), computed by ``sampling_logprobs(policy_logprobs(...))`` in
``diffpo_serve/dllm/sampler/rules.py`` and recorded by the sampler as ``logp_behaviour_j = log q(y_j | z_{s_j})``.
The numerator is the surrogate of ``training/likelihood.py`` under the frozen policy: log pi_old(y_j |
the surrogate's context: the prompt and either all masks or z_tau), from the same ``policy_logprobs`` at
T = 1 and top_p = 1, because the policy RL trains is the model's own pi. Its prompt is an option
(``--is-numerator``): ``masked``, the prompt with d1's p_mask masking, so the numerator is the clipped
ratio's ``logp_old_j`` itself, or ``unmasked``, the whole prompt the sampler saw (one more no-grad pass).
The mask token is in neither term. So w_j = min(C, pi_old(y_j | surrogate context) / q(y_j | z_{s_j}))
corrects exactly the ways the sample differs from the surrogate being trained:

- the prompt: with the masked numerator, pi_old sees a prompt with about p_mask of its tokens hidden, which
  the sampler never did (the unmasked numerator gives the p_mask 0 weights for the same rollouts and tau);
- the canvas: the surrogate scores y_j in another context than the sampler drew it in. At T = 1,
  top_p = 1 and an unmasked prompt, a token committed at step 0 (scored by pass A on all masks) or at step
  tau (pass B on z_tau) is scored in its own context, and w = 1 exactly; the others are not, and on
  countdown from the bundled model at p_mask 0 the mean weight over a run's last 50 steps was 0.67-0.73
  (docs/results/rl/rl_curves_headroom-p0.md: the canvas alone keeps it well below 1);
- the reshaping: at T != 1 the ratio carries pi / pi_T, with pi_T proportional to pi^(1/T) (T < 1 weights
  down the likely tokens the sampler over-drew, up the unlikely ones, capped at C); with top_p < 1 a
  token inside the nucleus gets pi / (pi / nucleus mass) = the nucleus mass < 1 (same context), and the
  tokens outside the nucleus are never drawn, so their share of pi is missing from the estimate (a
  bias toward the nucleus that no weight on drawn tokens can repair). At T = 0 q is a point mass, so
  w = min(C, pi_old(y_j)).

This is DiFFPO's truncated importance weight (arXiv 2510.02212): the samples come from the true
multi-step sampler, the likelihood from the tractable two-stage surrogate, and truncating at C bounds
the variance (truncated importance sampling, Ionides 2008).
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
    """w = min(C, pi_old / q) per token, detached: ``logp_old`` the surrogate under the frozen policy,
    ``logp_behaviour`` the sampler's recorded log q (see the module docstring for both)."""
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
    """The per-token clipped objective, averaged over the batch's scored tokens (d1's normaliser).

    logp, logp_old, logp_ref, is_weight, token_mask: (b, n); advantages: (b,). Positions outside
    ``token_mask`` contribute neither value nor gradient.
    """
    token_mask = token_mask.bool()
    mask = token_mask.float()
    zero = torch.zeros_like(logp)

    def scored_only(x):  # unscored positions hold 0 before any exp: whatever they held (even inf) stays out
        return torch.where(token_mask, x, zero)

    ratio = torch.exp(scored_only(logp - logp_old.detach()))
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv
    surrogate = torch.minimum(unclipped, clipped)
    w = torch.ones_like(logp) if is_weight is None else scored_only(is_weight.detach())
    per_token = -w * surrogate
    kl = zero
    if beta and logp_ref is not None:
        r = scored_only(logp_ref.detach() - logp)
        kl = torch.exp(r) - r - 1
        per_token = per_token + beta * kl
    n = mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
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

def sampler_reward(reward: torch.Tensor, nfe: torch.Tensor, nfe_max: float,
                   lam: float | torch.Tensor) -> torch.Tensor:
    """r = reward * (1 - lam * NFE / NFE_max): correctness first, then fewer forward passes.

    A wrong answer earns nothing however fast it was, so speed is never bought with accuracy. ``lam`` is one
    number or one per row (a per-task penalty: a task whose accuracy must not move gets a smaller one).
    """
    return reward * (1 - lam * nfe.float() / nfe_max)


def threshold_head_loss(log_prob: torch.Tensor, advantages: torch.Tensor, entropy: torch.Tensor,
                        entropy_coef: float) -> torch.Tensor:
    """Group-relative REINFORCE for the head: -mean(A * log pi(gamma | prompt)) - c * mean(H(pi))."""
    return -(advantages.detach() * log_prob).mean() - entropy_coef * entropy.mean()
