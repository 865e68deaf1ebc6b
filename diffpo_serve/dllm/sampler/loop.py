"""The decode loop: :func:`generate` runs :func:`~.step.denoise_step` until every row is finished, for evaluation
and RL rollouts (the server's batcher steps the state itself, adding and dropping rows between steps)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffpo_serve.dllm.forward import supports_kv_cache
from diffpo_serve.dllm.sampler.params import CacheMode, SamplingParams
from diffpo_serve.dllm.sampler.state import init_state, prompt_alignment
from diffpo_serve.dllm.sampler.step import StepOutput, denoise_step


@dataclass
class GenerationOutput:
    """Result of :func:`generate`; ``commit_step``/``logprob`` are the RL trajectory."""

    sequences: torch.Tensor  # b, gen_width  generated ids (EOS-filled after a stop; pad past gen_length)
    nfe: torch.Tensor  # b  forward passes each row took part in
    commit_step: torch.Tensor | None = None  # b, gen_width  step at which each token was committed (-1: filled)
    logprob: torch.Tensor | None = None  # b, gen_width  behaviour log-prob of each committed token
    gen_length: torch.Tensor | None = None  # b
    threshold: torch.Tensor | None = None  # b  the threshold each row used (the head's gamma for `learned`)
    threshold_choice: torch.Tensor | None = None  # b  head grid index, -1 where the head did not choose
    head_features: torch.Tensor | None = None  # b, d  what the head saw
    policy_logprob: torch.Tensor | None = None  # b  summed log-prob of the step policy's decisions (policy rows)
    policy_trace: "PolicyTrace | None" = None  # per step: the step policy's view (return_trajectory)


@dataclass
class PolicyTrace:
    """The step policy's view of every pass of :func:`generate` (S = the most passes any row took):
    what RL needs to recompute the decisions' log-prob with gradients, and what a supervised warm
    start labels. Rows that had finished before step s have no candidates at s."""

    features: torch.Tensor  # b, S, gen_width, F
    decisions: torch.Tensor  # b, S, gen_width  bool: policy rows' drawn bits; other rows' commits
    candidates: torch.Tensor  # b, S, gen_width  bool
    argmax: torch.Tensor  # b, S, gen_width  the model's argmax at each pass (-1 where the row did not run)


def _stack_trace(steps: list[StepOutput], batch: int) -> PolicyTrace | None:
    """Scatter each step's running rows back into full-batch tensors and stack the steps."""
    traced = [out for out in steps if out.features is not None]
    if not traced:
        return None
    f = traced[0].features
    features = f.new_zeros((batch, len(steps), *f.shape[1:]))
    decisions = torch.zeros((batch, len(steps), f.shape[1]), dtype=torch.bool, device=f.device)
    candidates = torch.zeros_like(decisions)
    argmax = torch.full(decisions.shape, -1, dtype=torch.long, device=f.device)
    for s, out in enumerate(steps):
        if out.features is None:  # no row of this pass used the policy (its policy rows had finished)
            continue
        features[out.rows, s] = out.features
        decisions[out.rows, s] = out.decisions
        candidates[out.rows, s] = out.candidates
        argmax[out.rows, s] = out.argmax
    return PolicyTrace(features, decisions, candidates, argmax)


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    *,
    mask_id: int,
    eos_id: int,
    pad_id: int,
    eos_ids: list[int] | tuple[int, ...] = (),
    stop_at_eos: bool = True,
    return_trajectory: bool = False,
    on_step=None,
    head: torch.nn.Module | None = None,
    sample_threshold: bool = False,
    align: int | None = None,
    policy: torch.nn.Module | None = None,
    sample_commits: bool = False,
    trace_features: bool = False,
    cache_refresh: int = 0,
    answers: list[list[int]] | None = None,
) -> GenerationOutput:
    """Decode a batch of token-id prompts to completion with :func:`denoise_step`.

    ``on_step(state, step_output)`` is called after every step (progress, streaming, inspection).
    ``head``/``sample_threshold``: the threshold head for ``learned`` rows, and whether it samples.
    ``align``: the prompt layout (:class:`BatchState`); default :func:`prompt_alignment` of the model.
    ``eos_ids``: every id that ends a row besides ``eos_id`` (which fills the rest of a finished row).
    ``policy``/``sample_commits``/``trace_features``: the step policy for ``policy`` rows, whether
    they draw their commits, and whether every row's policy features are computed (:func:`init_state`);
    with ``return_trajectory`` the policy's view of every pass is returned as ``policy_trace``.
    ``cache_refresh``: with a KV cache, also refresh it every this many steps of a block (1: every step,
    which makes the cached decode exact; 0: at block starts only, Fast-dLLM's schedule).
    ``answers``: partly filled answers to complete (:func:`init_state`).
    """
    device = next(model.parameters()).device
    state = init_state(prompts, params, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, eos_ids=eos_ids,
                       device=device, stop_at_eos=stop_at_eos, head=head, sample_threshold=sample_threshold,
                       align=prompt_alignment(model) if align is None else align, policy=policy,
                       sample_commits=sample_commits, trace_features=trace_features, cache_refresh=cache_refresh,
                       answers=answers)
    if bool((state.cache != CacheMode.OFF).any()) and not supports_kv_cache(model):
        raise ValueError(f"cache needs a native model ({type(model).__name__} takes no KV cache); use cache 'off'")
    steps = []
    while not bool(state.finished.all()):
        out = denoise_step(model, state)
        if return_trajectory:
            steps.append(out)
        if on_step is not None:
            on_step(state, out)
    result = GenerationOutput(sequences=state.generated.clone(), nfe=state.nfe.clone(), gen_length=state.gen_length,
                              threshold=state.threshold.clone(), threshold_choice=state.threshold_choice.clone(),
                              head_features=state.head_features.clone(), policy_logprob=state.policy_logprob.clone())
    if return_trajectory:
        result.commit_step, result.logprob = state.commit_step.clone(), state.logprob.clone()
        result.policy_trace = _stack_trace(steps, state.batch_size)
    return result
