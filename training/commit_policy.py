"""Training the per-step commit policy (:mod:`diffpo_serve.dllm.step_policy`): warm start and RL loss.

Supervised warm start: decode training prompts with a behaviour sampler (EB at a small gamma by default;
in later DAgger rounds the policy itself) while recording the policy's features of every pass
(``trace_features``); a masked token of the current block is labelled 1 when the model's argmax there
already equals the token of an answer A (:func:`commit_labels`), and the policy is fit to those labels by
binary cross-entropy. ``--warm-start-label`` chooses A (:data:`WARM_START_LABELS`): ``trajectory`` (the
default), the answer the behaviour decode itself ends with; ``full_steps``, the full-step greedy answer (the
step oracle of ``benchmarks/step_policy.py`` commits exactly its label-1 tokens; countdown has several right
answers, and where the two decodes reach different ones it calls every token of the behaviour's answer not final);
``continuation``, per pass the full-step completion of the answer as it stood before that pass
(:func:`continuation_answers`). docs/benchmarks.md compares them.

RL (``diffpo-train rl --train sampler|joint --sampler-kind policy``): rollouts draw every commit bit
from Bernoulli(p) and record the policy's features and bits per pass (the sampler's ``PolicyTrace``);
:func:`policy_rl_loss` is group-relative REINFORCE on the sum of a rollout's decision log-probs,
with the advantages of the speed-aware reward r * (1 - lambda NFE / NFE_max), the model frozen
(``sampler``) or trained by DiFFPO / d1 on the same rollouts (``joint``).
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from diffpo_serve.dllm.loading import LoadedModel
from diffpo_serve.dllm.sampler import PolicyTrace, SamplingParams, generate
from diffpo_serve.dllm.step_policy import StepPolicy, decision_entropy, decision_logprob
from training.loss import threshold_head_loss

log = logging.getLogger(__name__)

WARM_START_LABELS = ("full_steps", "trajectory", "continuation")


def commit_labels(argmax: torch.Tensor, answer: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(b, S, n) argmax per pass, the answer: (b, n) one per row or (b, S, n) one per pass, (b, S, n) bool ->
    (b, S, n) bool labels: the argmax equals the answer's token, on candidates only."""
    if answer.dim() == 2:
        answer = answer[:, None, :]
    return (argmax == answer) & candidates


def pass_states(sequences: torch.Tensor, commit_step: torch.Tensor, passes: int, mask_id: int) -> torch.Tensor:
    """The answer as it stood before each pass of a decode: (b, n) final tokens and the pass that committed
    each (-1: never decoded, kept) -> (b, S, n), ``mask_id`` where the token was committed at that pass or later."""
    s = torch.arange(passes, device=sequences.device)[None, :, None]
    later = commit_step[:, None, :] >= s
    return torch.where(later, torch.full_like(later, mask_id, dtype=sequences.dtype), sequences[:, None, :])


def continuation_answers(loaded: LoadedModel, prompts: list[list[int]], out, full: SamplingParams,
                         batch_size: int = 256) -> torch.Tensor:
    """(b, S, n): for every pass s of a decode ``out`` (with its trajectory), the completion by ``full`` (the
    full-step greedy decode) of the answer as it stood before pass s. Pass 0's is the full-step answer; later
    ones keep what the decode had committed by then. Passes a row did not take repeat its final answer."""
    kw = dict(mask_id=loaded.mask_id, eos_id=loaded.eos_id, pad_id=loaded.pad_id)
    b, passes, gen_length = len(prompts), int(out.nfe.max()), full.gen_length
    states = pass_states(out.sequences, out.commit_step, passes, loaded.mask_id)
    answers = out.sequences[:, None, :].expand(-1, passes, -1).clone()
    todo = [(i, s) for i in range(b) for s in range(int(out.nfe[i]))]
    for k in range(0, len(todo), batch_size):
        chunk = todo[k:k + batch_size]
        done = generate(loaded.model, [prompts[i] for i, _ in chunk], full, **kw, stop_at_eos=False,
                        answers=[states[i, s, :gen_length].tolist() for i, s in chunk]).sequences
        for (i, s), seq in zip(chunk, done):
            answers[i, s, :gen_length] = seq[:gen_length].to(answers.device)
    return answers


def policy_rl_loss(policy: StepPolicy, trace: PolicyTrace, advantages: torch.Tensor, entropy_coef: float = 0.0):
    """Group-relative REINFORCE on the commit decisions: -mean(A * log pi(bits)) - c * mean(H), where
    log pi(bits) sums the Bernoulli log-probs of a rollout's bits over all its passes and candidates
    and H is the summed Bernoulli entropy of the same decisions. Returns (loss, log-probs (b,), entropy (b,))."""
    prob = policy.probability(trace.features)  # b, S, n
    logp = decision_logprob(prob, trace.decisions, trace.candidates).sum(-1)
    entropy = decision_entropy(prob, trace.candidates).sum(-1)
    return threshold_head_loss(logp, advantages, entropy, entropy_coef), logp, entropy


@torch.no_grad()
def warm_start_data(loaded: LoadedModel, prompts: list[list[int]], gen_length: int, behaviour: SamplingParams,
                    batch_size: int = 256, policy: StepPolicy | None = None,
                    label: str = "trajectory", progress: bool = False,
                    bar: tqdm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate features (N, F) and labels (N,) from ``behaviour`` trajectories of ``prompts``.

    ``label`` (:data:`WARM_START_LABELS`): ``full_steps`` compares each pass's argmax with the full-step greedy
    answer (the step oracle's labels); ``trajectory`` with the answer the behaviour decode itself ends with (a
    token already final in its own trajectory; where the two decodes reach different answers, as countdown's
    orders of one sum do, the first label calls every token of the other answer wrong; but every token the
    behaviour commits is final in its own trajectory by construction, right or wrong); ``continuation`` with
    the full-step completion of the answer as it stood before that pass (:func:`continuation_answers`): it
    follows the answer the decode had chosen so far, and a token is labelled 1 only if a careful decode from
    there would have put it there too, whether or not the behaviour committed it.

    ``policy`` is needed when the behaviour sampler is ``policy`` itself (later rounds of data
    collection); its feature set also decides whether hidden states are traced. ``progress``: a progress bar;
    ``bar``: one to advance instead (a caller's, over more prompts than these).
    """
    if label not in WARM_START_LABELS:
        raise ValueError(f"label must be one of {', '.join(WARM_START_LABELS)}; got {label!r}")
    kw = dict(mask_id=loaded.mask_id, eos_id=loaded.eos_id, pad_id=loaded.pad_id)
    full = SamplingParams("steps", gen_length, block_length=behaviour.block_length)  # one token per pass, its blocks
    feats, labels = [], []
    own = bar is None
    if own:
        bar = tqdm(total=len(prompts), desc=f"warm start ({behaviour.sampler}, {label} labels)", disable=not progress)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        out = generate(loaded.model, chunk, behaviour, **kw, stop_at_eos=False, return_trajectory=True,
                       policy=policy, trace_features=True)
        if label == "trajectory":
            answer = out.sequences
        elif label == "continuation":
            answer = continuation_answers(loaded, chunk, out, full, batch_size)
        else:
            answer = generate(loaded.model, chunk, full, **kw, stop_at_eos=False).sequences
        trace = out.policy_trace
        label_bits = commit_labels(trace.argmax, answer, trace.candidates)
        feats.append(trace.features[trace.candidates])
        labels.append(label_bits[trace.candidates])
        bar.update(len(chunk))
    if own:
        bar.close()
    return torch.cat(feats), torch.cat(labels)


def fit_warm_start(policy: StepPolicy, features: torch.Tensor, labels: torch.Tensor, epochs: int = 5,
                   lr: float = 3e-3, batch_size: int = 1024, seed: int = 0) -> float:
    """Fit the policy to the labels by binary cross-entropy (standardising its inputs first); returns the
    final epoch's mean loss."""
    policy.fit_normalisation(features)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    y = labels.float()
    mean = float("nan")
    policy.train()
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=g)
        total, count = 0.0, 0
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(policy(features[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        mean = total / max(count, 1)
        log.info("warm start epoch %d: BCE %.4f on %d tokens (%.3f positive)", epoch + 1, mean, len(y),
                 float(y.mean()))
    return mean
