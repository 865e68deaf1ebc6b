"""RL on a canvas model (DiffusionGemma, :mod:`diffpo_serve.dllm.canvas`): what ``diffpo-train rl`` supports, and why.

**Supported: the threshold head with the model frozen** (``--train sampler``, ``--sampler-kind head``). Each
rollout row draws its entropy bound gamma from the head at its first decoder pass (its own seeded generator;
the head reads that pass's prompt and canvas states and entropies, as :func:`canvas.denoise_step` says), the
row decodes with it, and the head takes DiFFPO's group-relative REINFORCE step on r = reward * (1 - lambda
NFE / NFE_max), exactly as for a masked model (:func:`training.rl._head_update`). NFE counts decoder passes;
NFE_max is the most a row can take, ``ceil(gen_length / C) * steps`` (C the canvas length, ``steps`` the
denoising steps per block), where a masked model's is ``gen_length`` (one token per pass).

**Refused, and why:**

- ``--train model`` / ``joint``: DiFFPO's and d1's likelihood surrogates (:mod:`training.likelihood`) score a
  completion by masking it and reading the model's predictions at the mask tokens. A canvas model has no mask
  token and no mask state (every position always holds a token, random or proposed), so those likelihoods are
  not defined for it; the behaviour log-probs the importance weight needs would be those of the proposals of
  every pass over whole re-randomised canvases, of which the final tokens (an argmax) are not even a draw. A
  sound surrogate would score tokens from noised canvases with the model's own training objective; not done.
- ``--sampler-kind policy``: the step policy decides which *masked* tokens to commit at each pass; a canvas
  has no masked tokens (its accept rule keeps a prefix of the entropy-sorted positions and re-randomises the
  rest).
- ``--cache``, ``--block-length``, ``--temperature`` / ``--top-p`` other than 1: masked-sampler settings (a canvas
  model keeps its own encoder cache per row, decodes whole canvases of C tokens, samples with its checkpoint's
  temperature schedule). ``--steps`` is the most denoising steps per block (default: the checkpoint's); the
  rollouts' params and NFE_max come from the model's decoder (:func:`training.rl.rollout_params`).

``--eval-every`` evaluates the head's decoding (``learned``) on each task's test prompts, with fixed seeds
(:func:`training.evaluate.evaluate_tasks`), and logs ``eval_<task>_accuracy`` / ``_exact`` / ``_mean_nfe``.
"""

from __future__ import annotations

from training.config import RLConfig


def check(cfg: RLConfig, path: str) -> None:
    """Raise ValueError naming the flag when ``cfg`` asks for something a canvas model cannot do (see above)."""
    if cfg.train != "sampler":
        raise ValueError(f"{path} decodes a random-token canvas (no mask state): --train {cfg.train} is not "
                         "supported: DiFFPO's and d1's likelihoods score a completion through mask tokens, which "
                         "this model has none of (training/canvas_rl.py says more); use --train sampler, which "
                         "trains the threshold head with the model frozen")
    if cfg.sampler_kind != "head":
        raise ValueError(f"{path} decodes a random-token canvas: --sampler-kind {cfg.sampler_kind} decides which "
                         "masked tokens to commit, and a canvas has none; use --sampler-kind head")
    refused = [("--cache", cfg.cache != "off"), ("--block-length", cfg.block_length is not None),
               ("--temperature", cfg.temperature != 1.0), ("--top-p", cfg.top_p != 1.0)]
    for flag, used in refused:
        if used:
            raise ValueError(f"{path} decodes a random-token canvas: {flag} is a masked-sampler setting (its blocks "
                             "are the model's canvas, its temperature the checkpoint's schedule); leave it at its "
                             "default")
