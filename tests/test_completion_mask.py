"""The RL loss scores each completion up to and including its first EOS, as d1 does, and nothing after it.

The mask by hand (EOS first, in the middle, last, absent, several EOS ids, fills), and through the trainer's
model update: whatever follows the first EOS (its tokens, their commit steps, their behaviour log-probs)
changes neither the loss nor the gradient, for d1 and for DiFFPO, while a token before it does. The same
checks run against two mutants of the mask (scoring the tail; leaving the first EOS out) and must fail there.
"""

import copy

import pytest
import torch
from accelerate import Accelerator

import training.rl as rl
from conftest import EOS, MASK, PAD, tiny_model
from training.config import RLConfig
from training.data import left_pad
from training.likelihood import sampled, scored, through_first_eos
from training.rollout import RolloutBatch

OTHER_EOS = 97  # a second end-of-sequence id (a chat model's turn end)
EOS_IDS = (EOS, OTHER_EOS)


def test_the_mask_by_hand():
    """Up to and including the first EOS of any id; all of a row without one."""
    completion = torch.tensor([
        [2, 5, 6, 2, 5],  # EOS first: only it
        [5, 6, 97, 2, 5],  # the second id first, in the middle
        [5, 6, 5, 6, 2],  # EOS last: everything
        [5, 6, 5, 6, 5],  # no EOS: everything
        [5, 2, 97, 2, 97],  # several: up to the first
    ])
    T, F = True, False
    assert through_first_eos(completion, EOS_IDS).tolist() == [
        [T, F, F, F, F],
        [T, T, T, F, F],
        [T, T, T, T, T],
        [T, T, T, T, T],
        [T, T, F, F, F],
    ]
    # with only EOS (2) as an id, 97 is an ordinary token
    assert through_first_eos(completion, (EOS,))[1].tolist() == [T, T, T, T, F]
    # scored = that, and a sampled token (commit step >= 0): fills and padding (-1) are never scored
    steps = torch.tensor([[0, 1, -1, -1, -1], [3, -1, 2, 0, 1], [0, 1, 2, 3, -1], [0] * 5, [1, 0, 2, 3, 4]])
    assert scored(completion, steps, EOS_IDS).tolist() == [
        [T, F, F, F, F],
        [T, F, T, F, F],
        [T, T, T, T, F],
        [T, T, T, T, T],
        [T, T, F, F, F],
    ]
    assert torch.equal(sampled(steps), steps >= 0)
    with pytest.raises(ValueError, match="eos_ids is empty"):
        through_first_eos(completion, ())


# ----------------------------------------------------------------------------- through the trainer

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
K, TAU = 6, 3  # every row's number of steps; DiFFPO's tau, fixed
FIRST_EOS = [2, 0, None, 7]  # per row (row 1's is the second id), with a sampled tail after rows 0 and 1


def hand_batch() -> RolloutBatch:
    """Four completions of 8 tokens (two prompts x G = 2) built by hand: commit steps 0..K-1 (a few fills,
    -1), random behaviour log-probs, the first EOS where FIRST_EOS says."""
    g = torch.Generator().manual_seed(0)
    completion = torch.randint(3, 90, (4, 8), generator=g)
    completion[0, 2], completion[1, 0], completion[1, 4], completion[3, 7] = EOS, OTHER_EOS, EOS, EOS
    steps = torch.randint(0, K, (4, 8), generator=g)
    steps[0, 7] = steps[2, 7] = -1  # fills
    steps[0, 3:7] = torch.tensor([0, TAU, TAU + 1, 1])  # the tail holds tokens committed before and after tau
    steps[1, 1:4] = torch.tensor([TAU, 2, K - 1])
    steps[:, 0] = torch.tensor([1, 0, 4, 2])  # tokens before tau and after it, in pass A and pass B
    ids, attention = left_pad([p for p in PROMPTS for _ in range(2)], PAD)
    return RolloutBatch(prompt_ids=ids, prompt_attention=attention, completion=completion, commit_step=steps,
                        eos_ids=EOS_IDS, behaviour_logprob=-torch.rand(4, 8, generator=g) * 3,
                        nfe=torch.full((4,), K), rewards=torch.tensor([1.0, 0.0, 0.3, 0.9]), texts=[""] * 4,
                        num_generations=2, threshold=torch.zeros(4), threshold_choice=torch.full((4,), -1),
                        head_features=torch.zeros(4, 1))


def tail(batch) -> torch.Tensor:
    """Positions after each row's first EOS."""
    return ~through_first_eos(batch.completion, batch.eos_ids)


def retail(batch, algo, seed) -> RolloutBatch:
    """``batch`` with everything after each first EOS redrawn: tokens, commit steps, behaviour log-probs. For
    DiFFPO the tokens of z_tau (committed before tau) stay: z_tau is the rollout's state, which conditions pass
    B; the others get new tokens and steps (after tau, or -1)."""
    g = torch.Generator().manual_seed(seed)
    out = copy.copy(batch)
    after = tail(batch)
    if algo == "diffpo":
        after &= ~(sampled(batch.commit_step) & (batch.commit_step < TAU))
    new_steps = torch.randint(TAU if algo == "diffpo" else 0, K + 1, batch.commit_step.shape, generator=g)
    new_steps[new_steps == K] = -1
    out.completion = torch.where(after, torch.randint(3, 100, batch.completion.shape, generator=g), batch.completion)
    out.commit_step = torch.where(after, new_steps, batch.commit_step)
    out.behaviour_logprob = torch.where(tail(batch), -torch.rand(batch.completion.shape, generator=g) * 3,
                                        batch.behaviour_logprob)
    assert (out.completion != batch.completion)[after].float().mean() > 0.8
    return out


def loss_and_step(batch, algo, monkeypatch):
    """One model update (two inner steps, KL to a reference, prompt masking): the losses the trainer computed
    and the parameters after its two SGD steps."""
    losses, real = [], rl.policy_loss

    def spy(*args, **kw):
        out = real(*args, **kw)
        losses.append(out[0].item())
        return out

    monkeypatch.setattr(rl, "policy_loss", spy)
    monkeypatch.setattr(rl, "draw_tau", lambda k, g=None: torch.full_like(k, TAU))
    model, ref = tiny_model(seed=3, init=0.3), tiny_model(seed=4, init=0.3).requires_grad_(False)
    cfg = RLConfig(model="unused", output_dir="unused", algo=algo, num_generations=2, num_iterations=2, p_mask=0.3,
                   beta=0.05, epsilon=0.2, C=2.0, max_grad_norm=1e9)
    model.train()
    rl._model_update(cfg, model, model, ref, torch.optim.SGD(model.parameters(), lr=0.5), Accelerator(cpu=True),
                     batch, batch.rewards, torch.Generator().manual_seed(0), MASK)
    return torch.tensor(losses), torch.cat([p.detach().flatten() for p in model.parameters()])


def tail_is_ignored(algo, monkeypatch) -> bool:
    batch = hand_batch()
    loss, params = loss_and_step(batch, algo, monkeypatch)
    for seed in (1, 2):
        other_loss, other_params = loss_and_step(retail(batch, algo, seed), algo, monkeypatch)
        if not (torch.allclose(loss, other_loss, rtol=0, atol=1e-6)
                and torch.allclose(params, other_params, rtol=0, atol=1e-6)):
            return False
    return True


@pytest.mark.parametrize("algo", ["d1", "diffpo"])
def test_nothing_after_the_first_eos_reaches_the_loss_or_the_gradient(algo, monkeypatch):
    assert tail_is_ignored(algo, monkeypatch)
    # ... while a token before the first EOS does (the comparison can fail)
    batch = hand_batch()
    loss, params = loss_and_step(batch, algo, monkeypatch)
    changed = copy.copy(batch)
    changed.completion = batch.completion.clone()
    changed.completion[0, 1] += 1
    other_loss, other_params = loss_and_step(changed, algo, monkeypatch)
    assert (loss - other_loss).abs().max() > 1e-4 and (params - other_params).abs().max() > 1e-5


@pytest.mark.parametrize("algo", ["d1", "diffpo"])
def test_a_mask_that_scores_the_tail_is_caught(algo, monkeypatch):
    monkeypatch.setattr(rl, "scored", lambda completion, steps, eos_ids: sampled(steps))
    assert not tail_is_ignored(algo, monkeypatch)


def trainer_mask_is_d1s(monkeypatch) -> bool:
    """Whether the mask the trainer hands the loss is, row by row, the sampled tokens up to and including the
    first EOS (written out from FIRST_EOS)."""
    batch, seen, real = hand_batch(), [], rl.policy_loss
    monkeypatch.setattr(rl, "policy_loss", lambda *a, **kw: seen.append(a[3].clone()) or real(*a, **kw))
    loss_and_step(batch, "d1", monkeypatch)
    want = batch.commit_step >= 0
    for row, first in enumerate(FIRST_EOS):
        if first is not None:
            want[row, first + 1:] = False
    return all(torch.equal(mask, want) for mask in seen)


def test_the_trainer_scores_up_to_and_including_the_first_eos(monkeypatch):
    assert trainer_mask_is_d1s(monkeypatch)


def test_a_mask_that_leaves_the_first_eos_out_is_caught(monkeypatch):
    def strict(completion, steps, eos_ids):  # the mutant: only positions strictly before the first EOS
        is_eos = torch.isin(completion, torch.tensor(eos_ids)).long()
        return sampled(steps) & (is_eos.cumsum(-1) == 0)

    monkeypatch.setattr(rl, "scored", strict)
    assert not trainer_mask_is_d1s(monkeypatch)
