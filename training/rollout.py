"""RL rollouts: G completions per prompt from the shared sampler, with their trajectories and rewards.

Rows decode with the model's :meth:`Decoder.explore <diffpo_serve.dllm.decoding.Decoder.explore>`: a masked model
records commit steps and behaviour log-probs for the model's loss (which scores each completion up to its first
EOS, any of ``LoadedModel.eos_ids``: :func:`training.likelihood.scored`); a canvas model (DiffusionGemma) records
each row's bound and the head's features but no per-token trajectory (it has no mask state; only its threshold
head is trained: :mod:`training.canvas_rl`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from diffpo_serve.dllm import canvas
from diffpo_serve.dllm.decoding import decoder_for
from diffpo_serve.dllm.loading import LoadedModel
from diffpo_serve.dllm.sampler import PolicyTrace, SamplingParams
from training.data import left_pad
from training.prompting import prompt_ids as encode_prompt


@dataclass
class RolloutBatch:
    """B = prompts x G rows, grouped: rows [g*G, (g+1)*G) answer prompt g."""

    prompt_ids: torch.Tensor  # B, P  left-padded
    prompt_attention: torch.Tensor  # B, P  bool
    completion: torch.Tensor  # B, n  generated ids
    commit_step: torch.Tensor | None  # B, n  0-based step of each commit, -1 = EOS fill / padding (None: canvas)
    eos_ids: tuple[int, ...]  # the model's EOS ids: the loss scores each completion up to its first one
    behaviour_logprob: torch.Tensor | None  # B, n  log-prob under the sampling distribution when committed
    nfe: torch.Tensor  # B
    rewards: torch.Tensor  # B
    texts: list[str]
    num_generations: int
    threshold: torch.Tensor  # B  the threshold each row used
    threshold_choice: torch.Tensor  # B  the head's grid index, -1 where the head did not choose
    head_features: torch.Tensor  # B, d  the prompt features the head saw
    policy_trace: PolicyTrace | None = None  # sampler `policy`: its features and drawn bits at every pass
    correctness: torch.Tensor | None = None  # B  the task's correctness when the reward adds other terms (d1's)

    @property
    def exact(self) -> torch.Tensor:
        """1.0 where the answer is right: correctness 1 (the reward itself when no correctness was recorded)."""
        return ((self.rewards if self.correctness is None else self.correctness) >= 1.0).float()


@torch.no_grad()
def rollout(model: torch.nn.Module, loaded: LoadedModel, examples: list[dict], reward_fn, num_generations: int,
            params: SamplingParams | canvas.CanvasParams, seed: int, head: torch.nn.Module | None = None,
            chat_template: bool = True, policy: torch.nn.Module | None = None,
            correctness_fn=None) -> RolloutBatch:
    """Sample ``num_generations`` completions for each example (each row seeded ``seed + row``).

    With sampler ``learned`` each row draws its own gamma from ``head``, so a group shows the
    accuracy/NFE trade-off of its prompt. With sampler ``policy`` each row draws its commits from
    ``policy`` (Bernoulli per token and pass), and the batch carries the policy's trace. ``correctness_fn``
    (same signature as ``reward_fn``) scores exact-match accuracy when the reward is more than correctness
    (d1's format terms); by default a reward of at least 1 counts as right. An example's
    ``task`` names its task; a model with a chat template reads d1's training prompt for it in the template
    (training/prompting.py, stage ``train``) unless ``chat_template`` is False.
    """
    encoded = [encode_prompt(loaded, ex.get("task"), ex, chat_template, stage="train") for ex in examples]
    prompts = [ids for ids in encoded for _ in range(num_generations)]
    row_examples = [ex for ex in examples for _ in range(num_generations)]
    row_params = [replace(params, seed=seed + i) for i in range(len(prompts))]
    was_training = model.training
    model.eval()
    out = decoder_for(loaded).explore(model, prompts, row_params, head, policy)
    model.train(was_training)
    completion = out.sequences
    texts = [loaded.decode(ids)[0] for ids in out.rows()]
    rewards = torch.tensor([reward_fn(t, ex) for t, ex in zip(texts, row_examples)])
    correctness = None if correctness_fn is None else torch.tensor(
        [correctness_fn(t, ex) for t, ex in zip(texts, row_examples)])
    prompt_ids, prompt_attention = left_pad(prompts, loaded.pad_id)
    return RolloutBatch(prompt_ids=prompt_ids.to(completion.device),
                        prompt_attention=prompt_attention.to(completion.device), completion=completion,
                        commit_step=out.commit_step, eos_ids=tuple(loaded.eos_ids), behaviour_logprob=out.logprob,
                        nfe=out.nfe, rewards=rewards,
                        texts=texts, num_generations=num_generations, threshold=out.threshold,
                        threshold_choice=out.threshold_choice, head_features=out.head_features,
                        policy_trace=out.policy_trace,
                        correctness=correctness)
