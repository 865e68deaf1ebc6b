"""The RL trainer's wiring, pinned by values: what reaches the loss (advantages, mask, tau, the
importance weight), which way one step moves the policy, d1 as DiFFPO's special case through the
trainer, the threshold head's update, and the rollout's grouping.

Each test drives ``training.rl._model_update`` / ``_head_update`` (the functions ``train_rl`` calls
every step) on a tiny model with hand-built rollouts, and checks against numbers computed here
independently (forward passes on unpadded inputs, the formulas written out).
"""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

import training.rl as rl
from conftest import EOS, MASK, PAD, tiny_model
from diffpo_serve.dllm.sampler import SamplingParams, generate
from diffpo_serve.dllm.step_policy import StepPolicy
from diffpo_serve.dllm.threshold_head import ThresholdHead
from training.config import RLConfig
from training.data import left_pad
from training.likelihood import draw_tau, mean_field_logprobs, two_stage_logprobs
from training.rollout import RolloutBatch, rollout

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


def cfg(**kw) -> RLConfig:
    base = dict(model="unused", output_dir="unused", num_generations=2, num_iterations=1, p_mask=0.0, beta=0.0,
                epsilon=0.2, C=2.0, max_grad_norm=1e9)
    return RLConfig(**{**base, **kw})


def make_batch(model, prompts, num_generations, rewards, **params) -> RolloutBatch:
    """Real rollouts of ``model`` (row i seeded i), grouped like ``training.rollout``."""
    rows = [p for p in prompts for _ in range(num_generations)]
    out = generate(model, rows, [SamplingParams(**params, seed=i) for i in range(len(rows))], mask_id=MASK,
                   eos_id=EOS, pad_id=PAD, return_trajectory=True)
    ids, attention = left_pad(rows, PAD)
    return RolloutBatch(prompt_ids=ids, prompt_attention=attention, completion=out.sequences,
                        commit_step=out.commit_step, eos_ids=(EOS,), behaviour_logprob=out.logprob, nfe=out.nfe,
                        rewards=torch.tensor(rewards, dtype=torch.float), texts=[""] * len(rows),
                        num_generations=num_generations, threshold=out.threshold,
                        threshold_choice=out.threshold_choice, head_features=out.head_features)


EB = dict(sampler="eb", gen_length=8, block_length=4, threshold=0.6)


def update(config, model, batch, rewards=None, seed=0, lr=0.05):
    """One call of the trainer's model update with plain SGD; returns its metrics."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    return rl._model_update(config, model, model, None, optimizer, Accelerator(cpu=True), batch,
                            batch.rewards if rewards is None else rewards, torch.Generator().manual_seed(seed),
                            MASK)


@pytest.fixture
def spy(monkeypatch):
    """Records every call of the trainer's policy_loss (args, kwargs; its stats in ``stats``), draw_tau
    (num_steps, tau) and the gradient clipping (the norm it returned, in ``norms``)."""
    calls = SimpleNamespace(loss=[], stats=[], tau=[], norms=[])
    real_loss, real_tau, real_clip = rl.policy_loss, rl.draw_tau, Accelerator.clip_grad_norm_

    def loss(*args, **kw):
        calls.loss.append((tuple(a.detach().clone() for a in args), dict(kw)))
        out = real_loss(*args, **kw)
        calls.stats.append(out[1])
        return out

    def clip(self, *args, **kw):
        calls.norms.append(float(real_clip(self, *args, **kw)))
        return calls.norms[-1]

    def tau(num_steps, generator=None, *passes):
        t = real_tau(num_steps, generator, *passes)
        calls.tau.append((num_steps.clone(), t.clone()))
        return t

    monkeypatch.setattr(rl, "policy_loss", loss)
    monkeypatch.setattr(rl, "draw_tau", tau)
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)
    return calls


# ----------------------------------------------------------------------------- brute force

def policy_logp(model, prompt, canvas):
    """(n, V) log pi over the completion from one unpadded forward pass, the mask token left out."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + canvas])).logits[0, len(prompt):].float()
    keep = torch.arange(logits.shape[-1]) != MASK
    return (logits - torch.logsumexp(logits[:, keep], -1, keepdim=True)).masked_fill(~keep, float("-inf"))


def hand_mask(batch) -> torch.Tensor:
    """The loss mask written out: a sampled token (commit step >= 0) at or before the row's first EOS."""
    rows = []
    for seq, steps in zip(batch.completion.tolist(), batch.commit_step.tolist()):
        first = next((j for j, t in enumerate(seq) if t in batch.eos_ids), len(seq))
        rows.append([s >= 0 and j <= first for j, s in enumerate(steps)])
    return torch.tensor(rows)


def z(seq, steps, s):
    """The rollout's canvas before its forward pass number s + 1: tokens committed at steps < s."""
    return [t if 0 <= c < s else MASK for t, c in zip(seq, steps)]


def hand_weights(model, prompts, batch, tau, temperature, cap):
    """w_j = min(C, pi_old(y_j | surrogate context) / q(y_j | the rollout's own context)), with
    q = softmax(log pi / T) at the step that committed y_j; 0 where nothing was sampled."""
    w = torch.zeros(batch.completion.shape)
    for i, prompt in enumerate(prompts):
        seq, steps = batch.completion[i].tolist(), batch.commit_step[i].tolist()
        t = int(tau[i])
        surrogate = {False: policy_logp(model, prompt, z(seq, steps, 0)), True: policy_logp(model, prompt,
                                                                                          z(seq, steps, t))}
        for j, (token, s) in enumerate(zip(seq, steps)):
            if s < 0:
                continue
            logq = torch.log_softmax(policy_logp(model, prompt, z(seq, steps, s))[j] / temperature, -1)[token]
            w[i, j] = min(cap, math.exp(surrogate[s >= t][j, token] - logq))
    return w


# ----------------------------------------------------------------------------- what reaches the loss

def test_tau_is_uniform_over_each_rows_steps():
    """tau ~ Uniform{1..K} per row: counted, every value 1..K comes up 1/K of the time and nothing else."""
    ks = torch.tensor([1, 2, 3, 5]).repeat(20_000)
    tau = draw_tau(ks, torch.Generator().manual_seed(0))
    for k in (1, 2, 3, 5):
        counts = torch.bincount(tau[ks == k], minlength=k + 2).float() / 20_000
        assert counts[0] == 0 and counts[k + 1:].sum() == 0, (k, counts)
        assert torch.allclose(counts[1:k + 1], torch.full((k,), 1 / k), atol=0.012), (k, counts)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_is_weight_advantages_and_mask_by_hand(spy, temperature):
    """Two groups with different means; tau drawn from each row's own K; w by hand for both inner steps
    (pi_old from the model *before* the update); at T = 1 a token committed from the very context the
    surrogate scores it in (at step 0: all masks; at step tau: z_tau) has weight exactly 1."""
    model = tiny_model(seed=3, init=0.3)
    prompts = [p for p in PROMPTS[:2] for _ in range(3)]
    batch = make_batch(model, PROMPTS[:2], 3, [1, 0, 0, 1, 1, 0], temperature=temperature, **EB)
    # a second EOS id, the token row 0 holds mid-completion: the loss must stop each row at its first
    batch.eos_ids = (EOS, int(batch.completion[0, 3]))
    before = copy.deepcopy(model)
    metrics = update(cfg(num_generations=3, num_iterations=2, C=3.0), model, batch, lr=0.5)

    assert len(spy.loss) == 2 and len(spy.tau) == 2
    # the metrics are the inner steps' means
    for name in ("loss", "kl", "ratio_clip_fraction", "is_clip_fraction", "mean_is_weight"):
        values = [getattr(s, name) for s in spy.stats]
        assert metrics[name] == pytest.approx(sum(values) / 2, abs=1e-4), name
    assert len(spy.norms) == 2 and spy.norms[0] != spy.norms[1]
    assert metrics["grad_norm"] == pytest.approx(sum(spy.norms) / 2, abs=1e-4)
    sampled, scored = batch.commit_step >= 0, hand_mask(batch)
    assert (sampled & ~scored).any()  # these rollouts commit tokens after an EOS: the tail is left out
    assert metrics["completion_length"] == pytest.approx(float(scored.sum()) / 6, abs=1e-3)
    mask = sampled
    for (num_steps, tau), ((logp, old, adv, token_mask), kw) in zip(spy.tau, spy.loss):
        assert torch.equal(num_steps, batch.nfe)
        torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3]))
        assert torch.equal(token_mask, scored)
        assert kw["is_cap"] == 3.0
        w = hand_weights(before, prompts, batch, tau, temperature, 3.0)
        torch.testing.assert_close(kw["is_weight"] * mask, w, atol=1e-4, rtol=1e-4)
        exact = mask & ((batch.commit_step == 0) | (batch.commit_step == tau[:, None]))
        if temperature == 1.0:
            torch.testing.assert_close(kw["is_weight"][exact], torch.ones(int(exact.sum())), atol=1e-5, rtol=0)
        assert (kw["is_weight"][mask & ~exact] - 1).abs().max() > 1e-3  # the other tokens' contexts differ
        late = mask & (batch.commit_step >= tau[:, None])
        assert late.any()  # pass B was used


def test_top_p_weight_by_hand(spy, monkeypatch):
    """top_p < 1: where contexts coincide, w = pi(y) / q(y) = the nucleus' mass under pi (T = 1)."""
    model = tiny_model(seed=3, init=0.3)
    batch = make_batch(model, PROMPTS[:1], 2, [1, 0], temperature=1.0, top_p=0.8, sampler="steps", gen_length=6,
                       steps=1)
    monkeypatch.setattr(rl, "draw_tau", lambda k, g=None: k.clone())
    update(cfg(C=5.0), model, batch)
    w = spy.loss[0][1]["is_weight"]
    model0 = tiny_model(seed=3, init=0.3)
    pi = policy_logp(model0, PROMPTS[0], [MASK] * 6).exp()  # every token was committed in the first pass
    for i in range(2):
        for j in range(6):
            sorted_p = pi[j].sort(descending=True).values
            before = sorted_p.cumsum(0) - sorted_p
            mass = sorted_p[before < 0.8].sum()
            assert w[i, j].item() == pytest.approx(mass.item(), abs=1e-5)
    assert (w < 1).all()


def test_the_loss_mask_keeps_eos_fills_out_of_the_update(spy):
    """Positions the sampler filled (commit_step -1) change nothing, whatever token they hold; a sampled
    token does."""
    model = tiny_model(seed=3, init=0.3)
    batch = make_batch(model, PROMPTS, 2, [1, 0, 0, 1, 1, 1], temperature=1.0, **EB)
    fills = torch.zeros_like(batch.commit_step, dtype=torch.bool)
    fills[:, -3:] = True
    filled = copy.copy(batch)
    filled.commit_step = batch.commit_step.masked_fill(fills, -1)
    filled.completion = batch.completion.masked_fill(fills, EOS)
    other = copy.copy(filled)
    other.completion = filled.completion.masked_fill(fills, 50)
    changed = copy.copy(filled)
    changed.completion = filled.completion.clone()
    changed.completion[0, 0] = 50 if int(changed.completion[0, 0]) != 50 else 51

    results = []
    for b in (filled, other, changed):
        m = copy.deepcopy(model)
        update(cfg(algo="diffpo"), m, b)
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(spy.loss[0][0][3], hand_mask(filled))
    assert torch.equal(results[0], results[1])
    assert not torch.allclose(results[0], results[2])


@pytest.mark.parametrize("algo", ["d1", "diffpo"])
def test_one_step_raises_the_rewarded_completion_and_lowers_the_other(monkeypatch, algo):
    """Two groups: in each, the completion with the positive advantage gains surrogate log-likelihood
    (per-token mean) from one step and the one with the negative advantage loses it."""
    model = tiny_model(seed=3, init=0.3)
    batch = make_batch(model, PROMPTS[:2], 2, [1, 0, 0, 1], temperature=1.0, **EB)
    tau = torch.div(batch.nfe + 1, 2, rounding_mode="floor")
    monkeypatch.setattr(rl, "draw_tau", lambda k, g=None: tau.clone())
    no_mask = torch.zeros_like(batch.prompt_attention)
    mask = hand_mask(batch).float()

    def mean_logp(m):
        with torch.no_grad():
            if algo == "d1":
                lp = mean_field_logprobs(m, batch.prompt_ids, batch.prompt_attention, batch.completion, no_mask,
                                         MASK)
            else:
                lp = two_stage_logprobs(m, batch.prompt_ids, batch.prompt_attention, batch.completion,
                                        batch.commit_step, tau, no_mask, MASK)
        return (lp * mask).sum(1) / mask.sum(1)

    start = mean_logp(model)
    update(cfg(algo=algo, C=1e9), model, batch, lr=0.02)
    delta = mean_logp(model) - start
    assert delta[0] > 0 and delta[1] < 0 and delta[2] < 0 and delta[3] > 0, delta


@pytest.mark.parametrize("case", ["one-pass rollout", "on-policy behaviour, tau = K"])
def test_d1_is_diffpo_at_tau_k_with_no_truncation_through_the_trainer(spy, monkeypatch, case):
    """algo=d1 and algo=diffpo with tau = K and C -> infinity make the same update when the rollout's
    behaviour policy is the surrogate itself (w = 1): the algorithms differ in nothing else."""
    model = tiny_model(seed=3, init=0.3)
    if case == "one-pass rollout":  # K = 1 at T = 1: every token drawn from pi(. | prompt, all masks)
        batch = make_batch(model, PROMPTS, 2, [1, 0, 0.5, 0, 1, 1], temperature=1.0, sampler="steps",
                           gen_length=8, steps=1)
        assert (batch.nfe == 1).all()
    else:
        batch = make_batch(model, PROMPTS, 2, [1, 0, 0.5, 0, 1, 1], temperature=1.0, **EB)
        assert (batch.nfe > 1).any()
        monkeypatch.setattr(rl, "draw_tau", lambda k, g=None: k.clone())
        no_mask = torch.zeros_like(batch.prompt_attention)
        with torch.no_grad():
            batch.behaviour_logprob = mean_field_logprobs(model, batch.prompt_ids, batch.prompt_attention,
                                                          batch.completion, no_mask, MASK)
    params = {}
    for algo in ("d1", "diffpo"):
        m = copy.deepcopy(model)
        stats = update(cfg(algo=algo, C=1e9, num_iterations=2, beta=0.0), m, batch, lr=0.1)
        params[algo] = torch.cat([p.detach().flatten() for p in m.parameters()])
        if algo == "diffpo":  # every sampled token's weight is 1: the rollout drew it from the surrogate
            for _, kw in spy.loss[-2:]:
                w = kw["is_weight"][batch.commit_step >= 0]
                torch.testing.assert_close(w, torch.ones_like(w), atol=1e-5, rtol=0)
    assert not torch.equal(params["d1"], torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params["d1"], params["diffpo"], atol=1e-6, rtol=1e-5)


def test_diffpo_scores_late_tokens_from_z_tau_not_from_all_masks(spy):
    """With tau < K, the surrogate the trainer optimises is the two-stage one at the drawn tau (not d1's
    one-pass estimate): its pi_old matches pass B on z_tau where a token was committed after tau."""
    model = tiny_model(seed=3, init=0.3)
    prompts = [p for p in PROMPTS for _ in range(2)]
    batch = make_batch(model, PROMPTS, 2, [1, 0, 0, 1, 1, 0], temperature=1.0, **EB)
    update(cfg(algo="diffpo"), model, batch)
    (_, tau), ((_, old, _, _), _) = spy.tau[0], spy.loss[0]
    checked = 0
    for i, prompt in enumerate(prompts):
        seq, steps = batch.completion[i].tolist(), batch.commit_step[i].tolist()
        t = int(tau[i])
        a, b = policy_logp(tiny_model(seed=3, init=0.3), prompt, z(seq, steps, 0)), \
            policy_logp(tiny_model(seed=3, init=0.3), prompt, z(seq, steps, t))
        for j, (token, s) in enumerate(zip(seq, steps)):
            if s >= 0:
                want = b[j, token] if s >= t else a[j, token]
                assert old[i, j].item() == pytest.approx(want.item(), abs=1e-5)
                checked += s >= t and abs(float(b[j, token] - a[j, token])) > 1e-3
    assert checked > 0


def test_d1_weights_are_one_and_diffpo_truncates_at_c(spy):
    model = tiny_model(seed=3, init=0.3)
    batch = make_batch(model, PROMPTS, 2, [1, 0, 0, 1, 1, 0], temperature=0.5, **EB)
    update(cfg(algo="d1"), copy.deepcopy(model), batch)
    assert spy.loss[-1][1]["is_weight"] is None and not spy.tau  # d1 draws no tau
    update(cfg(algo="diffpo", C=1.1), copy.deepcopy(model), batch)
    w = spy.loss[-1][1]["is_weight"][batch.commit_step >= 0]
    assert w.max() == pytest.approx(1.1) and (w < 1.1).any() and (w > 0).all()


def test_reference_kl_uses_the_frozen_reference(spy):
    """beta > 0: logp_ref is the reference model's surrogate, not the policy's."""
    model, ref = tiny_model(seed=3, init=0.3), tiny_model(seed=4, init=0.3)
    batch = make_batch(model, PROMPTS[:2], 2, [1, 0, 0, 1], temperature=1.0, **EB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    rl._model_update(cfg(algo="d1", beta=0.1), model, model, ref, optimizer, Accelerator(cpu=True), batch,
                     batch.rewards, torch.Generator().manual_seed(0), MASK)
    no_mask = torch.zeros_like(batch.prompt_attention)
    with torch.no_grad():
        want = mean_field_logprobs(ref, batch.prompt_ids, batch.prompt_attention, batch.completion, no_mask, MASK)
    got = spy.loss[0][1]["logp_ref"]
    assert spy.loss[0][1]["beta"] == 0.1
    torch.testing.assert_close(got, want)


def test_the_update_centres_the_rewards_it_is_given_with_its_std_scaling_and_clip(spy):
    """The advantages come from the ``rewards`` argument (the model's reward: the task's, or the NFE-penalised
    one), not from the batch's task rewards; ``scale_std`` divides each group by its own std; epsilon and
    beta reach the loss."""
    model = tiny_model(seed=3, init=0.3)
    batch = make_batch(model, PROMPTS[:2], 3, [1, 0, 0, 1, 1, 0], temperature=1.0, **EB)
    given = torch.tensor([0.9, 0.3, 0.0, 0.2, 0.8, 0.8])
    update(cfg(num_generations=3, scale_std=True, epsilon=0.3), model, batch, rewards=given)
    (_, _, adv, _), kw = spy.loss[0]
    std1, std2 = math.sqrt((0.5 ** 2 + 0.1 ** 2 + 0.4 ** 2) / 3), math.sqrt((0.4 ** 2 + 2 * 0.2 ** 2) / 3)
    want = torch.tensor([0.5, -0.1, -0.4, -0.4, 0.2, 0.2]) / (torch.tensor([std1] * 3 + [std2] * 3) + 1e-4)
    torch.testing.assert_close(adv, want)
    assert kw["epsilon"] == 0.3 and kw["beta"] == 0.0


def test_the_update_clips_the_gradient_to_max_grad_norm(spy):
    """``max_grad_norm`` bounds the step: with plain SGD at lr 1 the parameters move by exactly the clipped
    gradient, whose norm is the bound (the raw norm, which the metrics report, is far above it). Catches a
    trainer that computes the norm but does not clip with the configured bound."""
    model = tiny_model(seed=3, init=0.3)
    batch = make_batch(model, PROMPTS[:2], 2, [1, 0, 0, 1], temperature=1.0, **EB)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    metrics = update(cfg(algo="diffpo", max_grad_norm=1e-3), model, batch, lr=1.0)
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert spy.norms[0] > 0.05 and metrics["grad_norm"] == pytest.approx(spy.norms[0], abs=1e-4)
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("algo", ["d1", "diffpo"])
def test_one_prompt_mask_and_tau_serve_the_current_old_and_reference_models(spy, algo):
    """With p_mask > 0 each inner step draws one prompt mask (and tau) and scores the current, old and
    reference models under it: before any update the three surrogates are equal (the reference is the
    same weights), and the mask really masked (they differ from the unmasked surrogate)."""
    model = tiny_model(seed=3, init=0.3)
    batch = make_batch(model, PROMPTS, 2, [1, 0, 0, 1, 1, 0], temperature=1.0, **EB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # no step: the current model stays the old one
    rl._model_update(cfg(algo=algo, beta=0.1, p_mask=0.5, num_iterations=2), model, model, copy.deepcopy(model),
                     optimizer, Accelerator(cpu=True), batch, batch.rewards, torch.Generator().manual_seed(0), MASK)
    no_mask = torch.zeros_like(batch.prompt_attention)
    with torch.no_grad():
        unmasked = mean_field_logprobs(model, batch.prompt_ids, batch.prompt_attention, batch.completion, no_mask,
                                       MASK)
    scoredm = batch.commit_step >= 0
    olds = []
    for (logp, old, _, _), kw in spy.loss:
        torch.testing.assert_close(logp, old, atol=1e-6, rtol=0)
        torch.testing.assert_close(kw["logp_ref"], old, atol=1e-6, rtol=0)
        olds.append(old)
    assert (olds[0] - unmasked)[scoredm].abs().max() > 1e-3
    assert (olds[0] - olds[1])[scoredm].abs().max() > 1e-3  # a fresh mask (and tau) per inner step


# ----------------------------------------------------------------------------- the threshold head

def head_batch(features, choice):
    return SimpleNamespace(head_features=features, threshold_choice=choice)


def head_update(config, head, batch, r, lr=0.1):
    optimizer = torch.optim.SGD(head.parameters(), lr=lr)
    return rl._head_update(config, head, optimizer, Accelerator(cpu=True), batch, r)


def test_head_entropy_bonus_raises_the_heads_entropy():
    torch.manual_seed(0)
    head = ThresholdHead(8, grid=[0.01, 0.1, 1.0, 10.0])
    with torch.no_grad():
        head.net[-1].weight.mul_(10)  # a peaked head: plenty of entropy to gain
    features = torch.randn(4, 8)
    batch = head_batch(features, torch.tensor([0, 1, 2, 3]))
    before = head.distribution(features).entropy()
    head_update(cfg(entropy_coef=0.5), head, batch, torch.ones(4))  # equal rewards: only the bonus acts
    after = head.distribution(features).entropy()
    assert (after > before).all(), (before, after)


def test_head_update_is_group_relative_reinforce(monkeypatch):
    """Advantages are centred per group (groups with different means), and the rewarded gamma gains
    probability on its prompt while the other loses it."""
    import training.rl as rlmod
    seen = []
    real = rlmod.threshold_head_loss
    monkeypatch.setattr(rlmod, "threshold_head_loss", lambda lp, adv, ent, c: seen.append(adv.clone()) or
                        real(lp, adv, ent, c))
    torch.manual_seed(0)
    head = ThresholdHead(8, grid=[0.01, 0.1, 1.0, 10.0])
    f = torch.randn(3, 8)
    features = f.repeat_interleave(2, 0)  # rows of a group share their prompt's features
    choice = torch.tensor([0, 1, 2, 3, 1, 2])
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    before = head.log_prob(features, choice)
    with torch.no_grad():
        entropy = head.distribution(features).entropy()
        want_loss = -(torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 0.0]) * before).mean() - 0.2 * entropy.mean()
    stats = head_update(cfg(entropy_coef=0.2), head, head_batch(features, choice), r, lr=0.05)
    torch.testing.assert_close(seen[0], torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 0.0]))
    assert stats["sampler_reward"] == pytest.approx(0.5)
    assert stats["head_loss"] == pytest.approx(want_loss.item(), abs=1e-5)
    assert stats["head_entropy"] == pytest.approx(entropy.mean().item(), abs=1e-4)
    delta = head.log_prob(features, choice) - before
    assert delta[0] > 0 and delta[1] < 0, delta


# ----------------------------------------------------------------------------- the step policy

def policy_batch(n_prompts=2, g=2):
    """Sampled step-policy rollouts (G per prompt, row i seeded 3 + i) of a fresh policy, with their trace."""
    torch.manual_seed(1)
    policy = StepPolicy()
    rows = [p for p in PROMPTS[:n_prompts] for _ in range(g)]
    out = generate(tiny_model(seed=3, init=0.3), rows,
                   [SamplingParams("policy", gen_length=8, block_length=4, seed=3 + i) for i in range(len(rows))],
                   mask_id=MASK, eos_id=EOS, pad_id=PAD, policy=policy, sample_commits=True, return_trajectory=True)
    return policy, SimpleNamespace(policy_trace=out.policy_trace, nfe=out.nfe)


def policy_update(config, policy, batch, r, lr):
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    return rl._policy_update(config, policy, optimizer, Accelerator(cpu=True), batch, r)


def rollout_logp_and_entropy(policy, trace):
    """Per rollout: the summed Bernoulli log-prob of its drawn bits and the summed entropy, by hand."""
    with torch.no_grad():
        prob = policy.probability(trace.features)
    p = prob.clamp(1e-6, 1 - 1e-6)
    c = trace.candidates.float()
    logp = (torch.where(trace.decisions, p.log(), (1 - p).log()) * c).sum((1, 2))
    entropy = (-(p * p.log() + (1 - p) * (1 - p).log()) * c).sum((1, 2))
    return logp, entropy


def test_policy_update_is_group_relative_reinforce_by_hand():
    """The step policy's update: advantages centred per group (two groups, different means), the loss and
    the per-decision entropy it reports by hand, and one step moves log pi of the bits of the rollout
    with the positive advantage up relative to the other's in each group (the rows share one network, so
    one row's step moves the others too: only the difference within a group is the update's own)."""
    policy, batch = policy_batch()
    trace = batch.policy_trace
    r = torch.tensor([1.0, 0.0, 0.2, 0.6])  # group means 0.5 and 0.4
    adv = torch.tensor([0.5, -0.5, -0.2, 0.2])
    logp, entropy = rollout_logp_and_entropy(policy, trace)
    stats = policy_update(cfg(entropy_coef=0.1), policy, batch, r, lr=0.01)
    want_loss = -(adv * logp).mean() - 0.1 * entropy.mean()
    assert stats["policy_loss"] == pytest.approx(want_loss.item(), abs=2e-5)
    assert stats["policy_entropy_per_decision"] == pytest.approx(float(entropy.sum() / trace.candidates.sum()),
                                                                 abs=1e-4)
    assert stats["sampler_reward"] == pytest.approx(0.45)
    after, _ = rollout_logp_and_entropy(policy, trace)
    delta = after - logp
    assert delta[0] - delta[1] > 0.1 and delta[3] - delta[2] > 0.1, delta


def test_policy_update_entropy_bonus_raises_the_policys_entropy():
    """Equal rewards (zero advantages): only the bonus acts, and the decisions' entropy rises."""
    policy, batch = policy_batch()
    _, before = rollout_logp_and_entropy(policy, batch.policy_trace)
    policy_update(cfg(entropy_coef=1.0), policy, batch, torch.full((4,), 0.5), lr=0.01)
    _, after = rollout_logp_and_entropy(policy, batch.policy_trace)
    assert (after > before).all(), (before, after)


# ----------------------------------------------------------------------------- the rollout

@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tokenizer):
    from diffpo_serve.dllm.loading import load_model
    path = tmp_path_factory.mktemp("wiring")
    tiny_model(seed=3, init=0.3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return load_model(path)


def test_rollout_groups_rows_by_prompt_and_scores_each_with_its_own_example(loaded):
    examples = [{"prompt": "countdown 1,2,3=6", "id": 0}, {"prompt": "sudoku 1", "id": 1},
                {"prompt": "ab", "id": 2}]
    seen = []

    def reward(text, example):
        seen.append((text, example["id"]))
        return float(example["id"]) + 0.25 * len(seen)

    params = SamplingParams("eb", 8, threshold=0.5, temperature=1.0)
    batch = rollout(loaded.model, loaded, examples, reward, 2, params, seed=100)
    encoded = [loaded.encode(e["prompt"]) for e in examples]
    width = batch.prompt_ids.shape[1]
    for i in range(6):
        want = encoded[i // 2]
        assert batch.prompt_ids[i, width - len(want):].tolist() == want
        assert batch.prompt_attention[i].sum() == len(want)
    assert [e for _, e in seen] == [0, 0, 1, 1, 2, 2]
    assert batch.rewards.tolist() == [0.25 * (i + 1) + i // 2 for i in range(6)]
    assert [t for t, _ in seen] == batch.texts
    # row i is decoded with seed + i: the same as generating it alone with that seed
    for i in (0, 3):
        alone = generate(loaded.model, [encoded[i // 2]], SamplingParams("eb", 8, threshold=0.5, temperature=1.0,
                                                                        seed=100 + i),
                         mask_id=loaded.mask_id, eos_id=loaded.eos_id, pad_id=loaded.pad_id, return_trajectory=True)
        assert torch.equal(batch.completion[i, :8], alone.sequences[0])
        assert torch.equal(batch.commit_step[i, :8], alone.commit_step[0])
        torch.testing.assert_close(batch.behaviour_logprob[i, :8], alone.logprob[0])
        assert batch.nfe[i] == alone.nfe[0]
    assert not torch.equal(batch.completion[0], batch.completion[1]) or \
        not torch.equal(batch.completion[2], batch.completion[3])


def test_a_rollout_is_exact_at_full_reward_only():
    """The accuracy the trainer logs counts rewards of 1 (a partial reward below 1 is not exact)."""
    batch = make_batch(tiny_model(seed=3, init=0.3), PROMPTS[:2], 2, [1.0, 0.99, 0.0, 1.0], **EB)
    assert batch.exact.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_train_rl_hands_its_settings_to_rollouts_and_updates(loaded, tmp_path, monkeypatch):
    """One joint step of train_rl: the rollouts get the configured G, temperature and top-p (gamma from
    the head), the head learns from the NFE-penalised reward and the model from the task reward."""
    from training.loss import sampler_reward
    seen = {}
    real_rollout, real_model, real_head = rl.rollout, rl._model_update, rl._head_update

    def spy_rollout(model, loaded_, examples, reward_fn, num_generations, params, seed, head=None, **kw):
        seen["rollout"] = (len(examples), num_generations, params, head)
        seen["batch"] = real_rollout(model, loaded_, examples, reward_fn, num_generations, params, seed, head, **kw)
        return seen["batch"]

    def spy_model(c, model, unwrapped, ref, opt, acc, batch, rewards, *rest):
        seen["model_rewards"] = rewards.clone()
        return real_model(c, model, unwrapped, ref, opt, acc, batch, rewards, *rest)

    def spy_head(c, head, opt, acc, batch, r):
        seen["head_rewards"] = r.clone()
        return real_head(c, head, opt, acc, batch, r)

    monkeypatch.setattr(rl, "rollout", spy_rollout)
    monkeypatch.setattr(rl, "_model_update", spy_model)
    monkeypatch.setattr(rl, "_head_update", spy_head)
    monkeypatch.setattr(rl, "_reward", lambda text, example: 1.0 if len(text) % 2 else 0.5)  # never 0
    config = RLConfig(model=loaded.path, output_dir=str(tmp_path / "run"), tasks="sudoku", train_examples=8,
                      num_generations=3, prompts_per_step=2, num_iterations=1, max_steps=1, save_every=1,
                      gen_length=16, temperature=0.7, top_p=0.9, lam=0.5, train="joint", beta=0.0)
    rl.train_rl(config)
    n_examples, g, params, head = seen["rollout"]
    assert (n_examples, g, head is not None) == (2, 3, True)
    assert (params.sampler, params.temperature, params.top_p, params.threshold, params.gen_length) == \
        ("learned", 0.7, 0.9, None, 16)
    batch = seen["batch"]
    assert torch.equal(seen["model_rewards"], batch.rewards) and (batch.rewards > 0).all()
    torch.testing.assert_close(seen["head_rewards"], sampler_reward(batch.rewards, batch.nfe, 16, 0.5))
    # the step's metrics line, by hand from the batch
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    groups = batch.rewards.view(2, 3)
    assert (record["step"], record["rollouts"]) == (1, 6)
    assert record["reward"] == pytest.approx(float(batch.rewards.mean()), abs=1e-4)
    assert record["accuracy"] == pytest.approx(float((batch.rewards >= 1).float().mean()), abs=1e-4)
    assert record["mean_nfe"] == pytest.approx(float(batch.nfe.float().mean()), abs=1e-3)
    assert record["mean_threshold"] == pytest.approx(float(batch.threshold.mean()), abs=1e-5)
    assert record["zero_variance_groups"] == int((groups.max(1).values == groups.min(1).values).sum())
    assert 0 < record["step_seconds"] < 120
    assert record["rollouts_per_second"] >= 6 / record["step_seconds"]  # the rollouts are part of the step


def test_train_rl_hands_the_step_policy_its_rollouts_and_the_nfe_penalised_reward(loaded, tmp_path, monkeypatch):
    """One --train sampler --sampler-kind policy step: the rollouts draw their commits from the policy being
    trained, and its update gets r = reward * (1 - lambda NFE / NFE_max) of those very rollouts."""
    from training.loss import sampler_reward
    seen = {}
    real_rollout, real_update = rl.rollout, rl._policy_update

    def spy_rollout(*args, **kw):
        seen["policy"], seen["params"] = kw.get("policy"), args[5]
        seen["batch"] = real_rollout(*args, **kw)
        return seen["batch"]

    def spy_update(c, policy, opt, acc, batch, r):
        seen["updated"], seen["r"] = policy, r.clone()
        return real_update(c, policy, opt, acc, batch, r)

    monkeypatch.setattr(rl, "rollout", spy_rollout)
    monkeypatch.setattr(rl, "_policy_update", spy_update)
    monkeypatch.setattr(rl, "_reward", lambda text, example: 1.0 if len(text) % 2 else 0.5)  # never 0
    config = RLConfig(model=loaded.path, output_dir=str(tmp_path / "run"), tasks="sudoku", train_examples=8,
                      num_generations=3, prompts_per_step=2, max_steps=1, save_every=1, gen_length=16, lam=0.5,
                      train="sampler", sampler_kind="policy", warm_start_prompts=0, temperature=0.0)
    rl.train_rl(config)
    batch = seen["batch"]
    assert seen["params"].sampler == "policy" and seen["policy"] is not None
    assert seen["updated"] is seen["policy"] and batch.policy_trace is not None
    assert (batch.nfe > 1).any() and (batch.nfe < 16).any()
    torch.testing.assert_close(seen["r"], sampler_reward(batch.rewards, batch.nfe, 16, 0.5))


def spy_rollouts_and_model_rewards(monkeypatch) -> dict:
    """Record the step's rollouts (``batch``) and the rewards the model's update is handed (``rewards``)."""
    seen = {}
    real_rollout, real_model = rl.rollout, rl._model_update

    def spy_rollout(*args, **kw):
        seen["batch"] = real_rollout(*args, **kw)
        return seen["batch"]

    def spy_model(c, model, unwrapped, ref, opt, acc, batch, rewards, *rest):
        seen["rewards"] = rewards.clone()
        return real_model(c, model, unwrapped, ref, opt, acc, batch, rewards, *rest)

    monkeypatch.setattr(rl, "rollout", spy_rollout)
    monkeypatch.setattr(rl, "_model_update", spy_model)
    return seen


def test_train_rl_model_alone_can_learn_from_the_nfe_penalised_reward(loaded, tmp_path, monkeypatch):
    """--train model --model-reward sampler (no head): the model's update still gets
    r = reward * (1 - lambda NFE / NFE_max) of the step's rollouts."""
    from training.loss import sampler_reward
    seen = spy_rollouts_and_model_rewards(monkeypatch)
    monkeypatch.setattr(rl, "_reward", lambda text, example: 1.0 if len(text) % 2 else 0.5)
    config = RLConfig(model=loaded.path, output_dir=str(tmp_path / "run"), tasks="sudoku", train_examples=8,
                      num_generations=2, prompts_per_step=2, num_iterations=1, max_steps=1, save_every=1,
                      gen_length=16, sampler="eb", threshold=3.0, temperature=1.0, lam=0.5, train="model",
                      model_reward="sampler", beta=0.0)
    rl.train_rl(config)
    batch = seen["batch"]
    assert (batch.nfe < 16).any()
    torch.testing.assert_close(seen["rewards"], sampler_reward(batch.rewards, batch.nfe, 16, 0.5))


def test_nfe_max_is_the_generation_length_whatever_the_blocks(loaded, tmp_path, monkeypatch):
    """NFE_max in r = reward * (1 - lambda NFE / NFE_max) is the whole answer's length (one token per pass),
    also when the answer is decoded in blocks: with gen_length 16 in blocks of 4, a block's length would
    weigh the same NFE four times as much."""
    seen = spy_rollouts_and_model_rewards(monkeypatch)
    monkeypatch.setattr(rl, "_reward", lambda text, example: 1.0)
    config = RLConfig(model=loaded.path, output_dir=str(tmp_path / "run"), tasks="sudoku", train_examples=8,
                      num_generations=2, prompts_per_step=1, num_iterations=1, max_steps=1, save_every=1,
                      gen_length=16, block_length=4, sampler="eb", threshold=0.5, lam=0.5, train="model",
                      model_reward="sampler", beta=0.0)
    rl.train_rl(config)
    nfe = seen["batch"].nfe.float()
    assert (nfe >= 4).all()
    torch.testing.assert_close(seen["rewards"], 1 - 0.5 * nfe / 16)


def test_train_rl_evaluates_logs_and_saves_on_schedule(loaded, tmp_path, monkeypatch):
    """Five steps with eval_every 3, log_every 4, save_every 3: evaluations before the first step and after
    steps 3 and 5 (the last); metric lines for steps 0, 3 (eval), 4 (log) and 5 (eval); checkpoints after
    steps 3 and 5. (Periods of 3 and 4 tell step + 1 from step - 1.)"""
    done, evals, saves = [], [], []
    real_rollout = rl.rollout

    def spy_rollout(*args, **kw):
        done.append(1)
        return real_rollout(*args, **kw)

    def spy_eval(*args, **kw):
        evals.append(len(done))
        return {"eval_sudoku_accuracy": 0.0}

    monkeypatch.setattr(rl, "rollout", spy_rollout)
    monkeypatch.setattr(rl, "evaluate_tasks", spy_eval)
    monkeypatch.setattr(rl, "save_checkpoint", lambda *a, **kw: saves.append(kw["step"] + 1))
    monkeypatch.setattr(rl, "_export", lambda *a, **kw: None)
    config = RLConfig(model=loaded.path, output_dir=str(tmp_path / "run"), tasks="sudoku", train_examples=8,
                      num_generations=2, prompts_per_step=1, num_iterations=1, max_steps=5, eval_every=3,
                      log_every=4, save_every=3, gen_length=8, sampler="eb", threshold=3.0, beta=0.0)
    rl.train_rl(config)
    assert evals == [0, 3, 5]
    assert saves == [3, 5]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 3, 4, 5]
