"""RL rollouts: G completions per prompt from the shared sampler, with their trajectories and rewards."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from diffpo_serve.dllm.loading import LoadedModel
from diffpo_serve.dllm.sampler import PolicyTrace, SamplingParams, generate
from training.data import left_pad
from training.prompting import prompt_ids as encode_prompt


@dataclass
class RolloutBatch:
    """B = prompts x G rows, grouped: rows [g*G, (g+1)*G) answer prompt g."""

    prompt_ids: torch.Tensor  # B, P  left-padded
    prompt_attention: torch.Tensor  # B, P  bool
    completion: torch.Tensor  # B, n  generated ids
    commit_step: torch.Tensor  # B, n  0-based step of each commit, -1 = EOS fill / padding
    behaviour_logprob: torch.Tensor  # B, n  log-prob under the sampling distribution when committed
    nfe: torch.Tensor  # B
    rewards: torch.Tensor  # B
    texts: list[str]
    num_generations: int
    threshold: torch.Tensor  # B  the threshold each row used
    threshold_choice: torch.Tensor  # B  the head's grid index, -1 where the head did not choose
    head_features: torch.Tensor  # B, d  the prompt features the head saw
    policy_trace: PolicyTrace | None = None  # sampler `policy`: its features and drawn bits at every pass

    @property
    def exact(self) -> torch.Tensor:
        return (self.rewards >= 1.0).float()


@torch.no_grad()
def rollout(model: torch.nn.Module, loaded: LoadedModel, examples: list[dict], reward_fn, num_generations: int,
            params: SamplingParams, seed: int, head: torch.nn.Module | None = None,
            chat_template: bool = True, policy: torch.nn.Module | None = None) -> RolloutBatch:
    """Sample ``num_generations`` completions for each example (each row seeded ``seed + row``).

    With sampler ``learned`` each row draws its own gamma from ``head``, so a group shows the
    accuracy/NFE trade-off of its prompt. With sampler ``policy`` each row draws its commits from
    ``policy`` (Bernoulli per token and pass), and the batch carries the policy's trace. An example's
    ``task`` names its task; a model with a chat template reads the task's instruction in it
    (training/prompting.py) unless ``chat_template`` is False.
    """
    encoded = [encode_prompt(loaded, ex.get("task"), ex, chat_template) for ex in examples]
    prompts = [ids for ids in encoded for _ in range(num_generations)]
    row_examples = [ex for ex in examples for _ in range(num_generations)]
    row_params = [replace(params, seed=seed + i) for i in range(len(prompts))]
    was_training = model.training
    model.eval()
    out = generate(model, prompts, row_params, mask_id=loaded.mask_id, eos_id=loaded.eos_id, eos_ids=loaded.eos_ids,
                   pad_id=loaded.pad_id, return_trajectory=True, head=head, sample_threshold=True, policy=policy,
                   sample_commits=policy is not None)
    model.train(was_training)
    texts = [loaded.decode(seq)[0] for seq in out.sequences.tolist()]
    rewards = torch.tensor([reward_fn(t, ex) for t, ex in zip(texts, row_examples)])
    prompt_ids, prompt_attention = left_pad(prompts, loaded.pad_id)
    return RolloutBatch(prompt_ids=prompt_ids.to(out.sequences.device),
                        prompt_attention=prompt_attention.to(out.sequences.device), completion=out.sequences,
                        commit_step=out.commit_step, behaviour_logprob=out.logprob, nfe=out.nfe, rewards=rewards,
                        texts=texts, num_generations=num_generations, threshold=out.threshold,
                        threshold_choice=out.threshold_choice, head_features=out.head_features,
                        policy_trace=out.policy_trace if policy is not None else None)
