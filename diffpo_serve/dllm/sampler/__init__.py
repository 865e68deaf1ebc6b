"""The one batched masked-diffusion sampler: a step function over an explicit batch state.

Callers import from here; the parts live along their seams:

- :mod:`.params`  what a decode is asked to do: the samplers (``steps``, ``confidence``, ``eb``, ``learned``,
  ``policy``; :class:`Sampler`), the cache modes (:class:`CacheMode`) and :class:`SamplingParams`;
- :mod:`.state`   the batch (:class:`BatchState`, :func:`init_state`): prompts, answers, per-row knobs and
  generators; rows join and leave between steps;
- :mod:`.rules`   the pure maths: the policy and behaviour distributions and each sampler's commit rule;
- :mod:`.cache`   the KV-cache schedule (``off``, ``prefix``, ``dual``) and the step's logits through it;
- :mod:`.step`    :func:`denoise_step`, one pass in named phases, and what it reports (:class:`StepOutput`);
- :mod:`.loop`    :func:`generate`, the step looped to completion for evaluation and RL rollouts.

Each row has its own seeded generator, so a row's output does not depend on the rest of the batch. The server's
batcher calls :func:`denoise_step` itself (through :mod:`diffpo_serve.dllm.decoding`).
"""

from diffpo_serve.dllm.sampler.cache import step_logits
from diffpo_serve.dllm.sampler.loop import GenerationOutput, PolicyTrace, generate
from diffpo_serve.dllm.sampler.params import (CACHE_MODES, DEFAULT_THRESHOLD, SAMPLERS, CacheMode, Sampler,
                                              SamplingParams, default_steps)
from diffpo_serve.dllm.sampler.rules import (entropy_before, greedy_tokens, low_confidence_commits, policy_logprobs,
                                             remasking_confidence, sampling_logprobs, select_commits,
                                             transfer_counts)
from diffpo_serve.dllm.sampler.state import (HALF_PRECISION_ALIGN, BatchState, first_masked_block, init_state,
                                             prompt_alignment, round_up)
from diffpo_serve.dllm.sampler.step import StepOutput, block_columns, denoise_step, masked_columns

__all__ = ["CACHE_MODES", "DEFAULT_THRESHOLD", "HALF_PRECISION_ALIGN", "SAMPLERS", "BatchState", "CacheMode",
           "GenerationOutput", "PolicyTrace", "Sampler", "SamplingParams", "StepOutput", "block_columns",
           "default_steps", "denoise_step", "entropy_before", "first_masked_block", "generate", "greedy_tokens",
           "init_state", "low_confidence_commits", "masked_columns", "policy_logprobs", "prompt_alignment",
           "remasking_confidence", "round_up", "sampling_logprobs", "select_commits", "step_logits",
           "transfer_counts"]
