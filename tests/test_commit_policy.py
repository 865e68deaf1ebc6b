"""Training the per-step commit policy: warm-start labels, the BCE fit, the REINFORCE step, the trainer."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import EOS, MASK, PAD, varied_reward
from diffpo_serve.dllm.sampler import SamplingParams, generate
from diffpo_serve.dllm.step_policy import FEATURE_NAMES, StepPolicy, decision_entropy, decision_logprob
from training.commit_policy import (commit_labels, fit_warm_start, pass_states, policy_rl_loss,
                                     warm_start_data)

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [30]]
IDS = dict(mask_id=MASK, eos_id=EOS, pad_id=PAD)


class Loaded:
    """The part of a LoadedModel that warm_start_data reads."""

    def __init__(self, model):
        self.model, self.mask_id, self.eos_id, self.pad_id = model, MASK, EOS, PAD


def test_commit_labels_by_hand():
    argmax = torch.tensor([[[4, 5, 6], [4, 7, 6]]])  # 1 row, 2 passes, 3 positions
    answer = torch.tensor([[4, 7, 9]])
    cand = torch.tensor([[[True, True, True], [False, True, True]]])
    labels = commit_labels(argmax, answer, cand)
    assert labels.tolist() == [[[True, False, False], [False, True, False]]]


def test_commit_labels_per_row_and_per_pass_answers_by_hand():
    """Two rows, three passes: a (b, n) answer is each row's own for every pass; a (b, S, n) one is per pass."""
    argmax = torch.tensor([[[4, 5], [4, 6], [8, 6]],
                           [[7, 7], [9, 7], [9, 9]]])
    cand = torch.ones(2, 3, 2, dtype=torch.bool)
    cand[1, 2, 0] = False
    per_row = commit_labels(argmax, torch.tensor([[4, 6], [9, 7]]), cand)
    assert per_row.tolist() == [[[True, False], [True, True], [False, True]],
                                [[False, True], [True, True], [False, False]]]
    per_pass = torch.tensor([[[4, 5], [8, 5], [8, 6]],
                             [[7, 9], [7, 7], [9, 9]]])
    assert commit_labels(argmax, per_pass, cand).tolist() == [[[True, True], [False, False], [True, True]],
                                                              [[True, False], [False, True], [False, True]]]


def test_warm_start_labels_on_full_step_trajectories(model):
    """Behaviour = the full-step decode itself: the token each pass commits is the answer's, so it is
    labelled 1, and the last masked token of each block is too."""
    gen = 8
    behaviour = SamplingParams("steps", gen, block_length=4)
    policy = StepPolicy()
    feats, labels = warm_start_data(Loaded(model), PROMPTS, gen, behaviour, policy=policy)
    out = generate(model, PROMPTS, behaviour, **IDS, stop_at_eos=False, return_trajectory=True, trace_features=True)
    trace = out.policy_trace
    assert len(labels) == int(trace.candidates.sum()) == len(PROMPTS) * 2 * (4 + 3 + 2 + 1)
    assert feats.shape == (len(labels), len(FEATURE_NAMES))
    expected = commit_labels(trace.argmax, out.sequences, trace.candidates)[trace.candidates]
    assert labels.tolist() == expected.tolist()
    committed_label = [bool(expected_l) for expected_l, d in zip(expected.tolist(),
                                                              trace.decisions[trace.candidates].tolist()) if d]
    assert committed_label and all(committed_label)
    assert 0 < float(labels.float().mean()) < 1  # not every masked token's argmax is already final


def test_warm_start_trajectory_labels_compare_with_the_behaviours_own_answer(model):
    """label="trajectory": a pass's argmax against the answer the behaviour decode (EB at a loose gamma,
    several tokens per pass) ends with (the default); label="full_steps" compares with the full-step answer,
    which differs here, so the two label sets differ."""
    gen = 8
    behaviour = SamplingParams("eb", gen, block_length=4, threshold=5.0)
    eb = generate(model, PROMPTS, behaviour, **IDS, stop_at_eos=False, return_trajectory=True, trace_features=True)
    full = generate(model, PROMPTS, SamplingParams("steps", gen, block_length=4), **IDS, stop_at_eos=False)
    assert not torch.equal(eb.sequences, full.sequences)
    trace = eb.policy_trace
    _, own = warm_start_data(Loaded(model), PROMPTS, gen, behaviour, policy=StepPolicy())
    _, steps = warm_start_data(Loaded(model), PROMPTS, gen, behaviour, policy=StepPolicy(), label="full_steps")
    assert own.tolist() == commit_labels(trace.argmax, eb.sequences, trace.candidates)[trace.candidates].tolist()
    assert steps.tolist() == commit_labels(trace.argmax, full.sequences, trace.candidates)[trace.candidates].tolist()
    assert own.tolist() != steps.tolist()


def test_pass_states_by_hand():
    seq = torch.tensor([[4, 5, 6, 1]])
    steps = torch.tensor([[1, 0, 2, -1]])  # the last position was never decoded (kept)
    states = pass_states(seq, steps, 3, MASK)
    assert states.tolist() == [[[MASK, MASK, MASK, 1], [MASK, 5, MASK, 1], [4, 5, MASK, 1]]]


def test_continuation_labels_complete_the_answer_as_it_stood_before_each_pass(model):
    """label="continuation": pass s's argmax against the full-step completion of the behaviour's answer with
    every token committed at pass s or later masked again, built here pass by pass with ``answers``. Pass 0's
    completion is the full-step answer; unlike the trajectory label, a token the behaviour committed can be
    labelled 0 (a careful decode from before that pass would have put another token there)."""
    gen = 8
    behaviour = SamplingParams("eb", gen, block_length=4, threshold=5.0)
    eb = generate(model, PROMPTS, behaviour, **IDS, stop_at_eos=False, return_trajectory=True, trace_features=True)
    full = generate(model, PROMPTS, SamplingParams("steps", gen, block_length=4), **IDS, stop_at_eos=False)
    trace = eb.policy_trace
    passes = trace.argmax.shape[1]
    expected = eb.sequences[:, None, :].repeat(1, passes, 1)
    for i, prompt in enumerate(PROMPTS):
        for s in range(int(eb.nfe[i])):
            answer = [t if c < s else MASK for t, c in zip(eb.sequences[i, :gen].tolist(), eb.commit_step[i].tolist())]
            expected[i, s, :gen] = generate(model, [prompt], SamplingParams("steps", gen, block_length=4), **IDS,
                                            stop_at_eos=False, answers=[answer]).sequences[0, :gen]
    assert torch.equal(expected[:, 0], full.sequences)
    _, labels = warm_start_data(Loaded(model), PROMPTS, gen, behaviour, policy=StepPolicy(), label="continuation",
                                batch_size=3)  # chunks of 3 rows: the continuations of a chunk batched together
    want = commit_labels(trace.argmax, expected, trace.candidates)
    assert labels.tolist() == want[trace.candidates].tolist()
    _, own = warm_start_data(Loaded(model), PROMPTS, gen, behaviour, policy=StepPolicy(), label="trajectory")
    assert labels.tolist() != own.tolist()
    committed = trace.decisions & trace.candidates
    assert bool(own[committed[trace.candidates]].all())  # the trajectory label calls every commit final
    assert not bool(want[committed].all())  # the continuation does not


def test_warm_start_label_is_checked(model):
    with pytest.raises(ValueError, match="continuation"):
        warm_start_data(Loaded(model), PROMPTS, 8, SamplingParams("eb", 8, threshold=0.1), label="final")


def test_warm_start_fit_learns_a_separable_rule():
    torch.manual_seed(0)
    x = torch.rand(3000, len(FEATURE_NAMES))
    y = x[:, 0] > 0.6  # "commit when confident"
    policy = StepPolicy()
    loss = fit_warm_start(policy, x, y, epochs=15, lr=1e-2, batch_size=256)
    assert loss < 0.15
    acc = ((policy.probability(x) >= 0.5) == y).float().mean()
    assert acc > 0.95
    assert policy.shift[0] == pytest.approx(float(x[:, 0].mean()), abs=1e-5)  # inputs standardised from the data


def test_warm_start_fit_reports_the_epochs_token_weighted_mean_bce():
    """At lr 0 the policy stays put, so the epoch's reported BCE is the BCE over all tokens (batches of
    unequal size weighted by their size), computed here on the standardised inputs."""
    torch.manual_seed(0)
    x = torch.rand(300, len(FEATURE_NAMES))
    y = x[:, 0] > 0.5
    policy = StepPolicy()
    loss = fit_warm_start(policy, x, y, epochs=1, lr=0.0, batch_size=128)  # batches of 128, 128, 44
    with torch.no_grad():
        want = torch.nn.functional.binary_cross_entropy_with_logits(policy(x), y.float())
    assert loss == pytest.approx(want.item(), rel=1e-5)


def _rollouts(model, policy, n=2):
    params = [SamplingParams("policy", gen_length=8, block_length=4, seed=3 + i) for i in range(n)]
    return generate(model, PROMPTS[:n], params, **IDS, policy=policy, sample_commits=True, return_trajectory=True)


def test_policy_rl_loss_by_hand(model):
    torch.manual_seed(1)
    policy = StepPolicy()
    out = _rollouts(model, policy)
    trace = out.policy_trace
    adv = torch.tensor([0.7, -0.3])
    loss, logp, entropy = policy_rl_loss(policy, trace, adv, entropy_coef=0.1)
    prob = policy.probability(trace.features).detach()
    lp = [sum(float(decision_logprob(prob[i, s], trace.decisions[i, s], trace.candidates[i, s]))
              for s in range(trace.features.shape[1])) for i in range(2)]
    h = [float(decision_entropy(prob[i], trace.candidates[i]).sum()) for i in range(2)]
    assert logp.tolist() == pytest.approx(lp, rel=1e-5)
    assert logp.tolist() == pytest.approx(out.policy_logprob.tolist(), rel=1e-4)  # what the sampler recorded
    assert loss.item() == pytest.approx(-(0.7 * lp[0] - 0.3 * lp[1]) / 2 - 0.1 * (h[0] + h[1]) / 2, rel=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_gradient_step_moves_the_rollouts_logprob_with_its_advantage(model, sign):
    torch.manual_seed(2)
    policy = StepPolicy()
    trace = _rollouts(model, policy, n=1).policy_trace
    opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
    loss, before, _ = policy_rl_loss(policy, trace, torch.tensor([sign]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    _, after, _ = policy_rl_loss(policy, trace, torch.tensor([sign]))
    assert float(before) != float(after)
    assert (float(after) - float(before)) * sign > 0


# ----------------------------------------------------------------------------- the trainer

def test_sampler_training_of_the_step_policy(base_dir, tmp_path):
    from diffpo_serve.dllm.loading import load_model
    from training.config import RLConfig
    from training.rl import train_rl
    cfg = RLConfig(model=str(base_dir), output_dir=str(tmp_path / "policy"), tasks="sudoku", train_examples=64,
                   num_generations=4, prompts_per_step=2, max_steps=2, save_every=2, gen_length=16, seed=0,
                   train="sampler", sampler_kind="policy", warm_start_prompts=16, warm_start_epochs=1,
                   temperature=0.0, eval_every=2, eval_examples=4)
    out = train_rl(cfg).output_dir
    before, after = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is frozen
    loaded = load_model(out)
    assert loaded.step_policy is not None and loaded.threshold_head is None
    assert float(loaded.step_policy.scale.sub(1).abs().sum()) > 0  # the warm start standardised its inputs
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"sampler_reward", "policy_loss", "policy_entropy_per_decision"} <= set(records[-1])
    assert "eval_sudoku_mean_nfe" in records[-1]
    # hidden-state features with a KV cache: warm start and rollouts read the cached forward's hidden states
    hidden = train_rl(RLConfig(model=str(base_dir), output_dir=str(tmp_path / "h"), tasks="sudoku", train_examples=64,
                               num_generations=4, prompts_per_step=2, max_steps=1, save_every=1, gen_length=16,
                               block_length=4, seed=0, train="sampler", sampler_kind="policy", cache="prefix",
                               policy_features="basic+hidden", warm_start_prompts=16, warm_start_epochs=1,
                               temperature=0.0)).output_dir
    assert load_model(hidden).step_policy.uses_hidden
    assert json.loads((hidden / "rl_config.json").read_text())["cache"] == "prefix"
    assert "policy_loss" in json.loads((hidden / "metrics.jsonl").read_text().splitlines()[-1])


def test_per_task_lam_penalises_each_row_by_its_own_tasks_lambda(base_dir, tmp_path, monkeypatch):
    """``--lam cd3=2,sudoku=0``: each rollout's sampler reward uses its own task's lambda (a row of the other task,
    or one lambda for all rows, fails), and a sudoku row's sampler reward is its task reward untouched."""
    import training.rl as rl
    from training.config import RLConfig
    seen = {}
    real_rollout, real_update = rl.rollout, rl._policy_update

    def spy_rollout(*args, **kw):
        seen["tasks"] = [ex["task"] for ex in args[2] for _ in range(args[4])]
        seen["batch"] = batch = real_rollout(*args, **kw)
        return batch

    def spy_update(c, policy, optimizer, accelerator, batch, r):
        seen["r"] = r.clone()
        return real_update(c, policy, optimizer, accelerator, batch, r)

    monkeypatch.setattr(rl, "_reward", varied_reward)
    monkeypatch.setattr(rl, "rollout", spy_rollout)
    monkeypatch.setattr(rl, "_policy_update", spy_update)
    cfg = RLConfig(model=str(base_dir), output_dir=str(tmp_path / "lam"), tasks="cd3,sudoku", train_examples=32,
                   num_generations=4, prompts_per_step=6, max_steps=1, save_every=1, gen_length=16, seed=0,
                   train="sampler", sampler_kind="policy", warm_start_prompts=8, warm_start_epochs=1,
                   temperature=0.0, lam="cd3=2,sudoku=0")
    rl.train_rl(cfg)
    batch, tasks = seen["batch"], seen["tasks"]
    assert {"cd3", "sudoku"} <= set(tasks)
    lam = torch.tensor([2.0 if t == "cd3" else 0.0 for t in tasks])
    expected = batch.rewards * (1 - lam * batch.nfe.float() / 16)
    assert seen["r"].tolist() == pytest.approx(expected.tolist())
    cd3 = torch.tensor([t == "cd3" for t in tasks]) & (batch.rewards > 0)
    assert bool(cd3.any()) and bool((seen["r"][cd3] < batch.rewards[cd3]).all())  # cd3 rows pay for their passes
    with pytest.raises(ValueError, match="'gsm8k' is not one of the trained tasks"):
        RLConfig(tasks="cd3,sudoku", lam="gsm8k=1")

# ----------------------------------------------------------------------------- joint: the model and the policy

def joint_cfg(base, out, **kw):
    from training.config import RLConfig
    base_kw = dict(model=str(base), output_dir=str(out), tasks="sudoku", train_examples=16, num_generations=3,
                   prompts_per_step=2, num_iterations=1, max_steps=1, save_every=1, gen_length=16, seed=0, lr=1e-2,
                   beta=0.0, sampler_kind="policy", warm_start_prompts=8, warm_start_epochs=1, lam=0.5)
    return RLConfig(**{**base_kw, **kw})


def weights(directory, name="model.safetensors"):
    return load_file(Path(directory) / name)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def joint_runs(base_dir, tmp_path_factory):
    """One step from ``base_dir`` of: the warm start alone (sampler, 0 steps), joint, sampler alone, and the
    model alone rolled out by the warm-started policy (from the warm start's export); the joint run's
    rollout batch and what reached its model and policy updates."""
    import training.rl as rl
    tmp = tmp_path_factory.mktemp("joint")
    seen = {"rollout": [], "model": [], "policy": [], "is_weight": [], "loss": []}
    real_rollout, real_model, real_policy = rl.rollout, rl._model_update, rl._policy_update
    real_is_weight, real_loss = rl.truncated_is_weight, rl.policy_loss

    def spy_rollout(*args, **kw):
        batch = real_rollout(*args, **kw)
        seen["rollout"].append((args[5], kw.get("policy"), batch))
        return batch

    def spy_model(c, model, unwrapped, ref, opt, acc, batch, rewards, *rest):
        seen["model"].append((batch, rewards.clone()))
        return real_model(c, model, unwrapped, ref, opt, acc, batch, rewards, *rest)

    def spy_policy(c, policy, opt, acc, batch, r):
        seen["policy"].append((batch, r.clone()))
        return real_policy(c, policy, opt, acc, batch, r)

    def spy_is_weight(old, behaviour, cap):
        seen["is_weight"].append(behaviour.clone())
        return real_is_weight(old, behaviour, cap)

    def spy_loss(logp, old, adv, token_mask, **kw):
        seen["loss"].append((adv.clone(), token_mask.clone()))
        return real_loss(logp, old, adv, token_mask, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rl, "_reward", varied_reward)
        warm = rl.train_rl(joint_cfg(base_dir, tmp / "warm", train="sampler", max_steps=0)).output_dir
        with pytest.MonkeyPatch.context() as spies:
            for name, spy in (("rollout", spy_rollout), ("_model_update", spy_model), ("_policy_update", spy_policy),
                              ("truncated_is_weight", spy_is_weight), ("policy_loss", spy_loss)):
                spies.setattr(rl, name, spy)
            joint = rl.train_rl(joint_cfg(base_dir, tmp / "joint", train="joint")).output_dir
        sampler = rl.train_rl(joint_cfg(base_dir, tmp / "sampler", train="sampler")).output_dir
        model = rl.train_rl(joint_cfg(warm, tmp / "model", train="model", sampler="policy")).output_dir
    return dict(warm=warm, joint=joint, sampler=sampler, model=model, seen=seen)


def test_joint_step_trains_the_model_and_the_policy_on_policy_decoded_rollouts(base_dir, joint_runs):
    from diffpo_serve.dllm.loading import load_model
    from training.likelihood import scored
    from training.loss import group_advantages, sampler_reward
    seen = joint_runs["seen"]
    (params, policy, batch), = seen["rollout"]
    assert params.sampler == "policy" and params.threshold is None and policy is not None
    trace = batch.policy_trace
    assert trace is not None
    # the commits are the policy's Bernoulli draws: every pass commits exactly its drawn bits (or, when none
    # is drawn, one token), and the draws are not the greedy rule p >= threshold
    greedy_differs = False
    for i in range(len(batch.texts)):
        for s in range(int(batch.nfe[i])):
            committed = batch.commit_step[i] == s
            bits = trace.decisions[i, s]
            if bits.any():
                assert torch.equal(committed, bits), (i, s)
            else:
                assert int(committed.sum()) == 1, (i, s)
            with torch.no_grad():
                p = policy.probability(trace.features[i, s])
            cand = trace.candidates[i, s]
            greedy_differs |= not torch.equal(bits[cand], p[cand] >= policy.threshold)
    assert greedy_differs
    assert (batch.nfe > 1).any() and (batch.nfe < 16).any()
    # the model's loss got this batch: its behaviour log-probs (DiFFPO's weight), its commit steps (the mask)
    # and the advantages of its task rewards; the policy's update the same batch with the NFE-penalised reward
    (model_batch, model_rewards), = seen["model"]
    (policy_batch, policy_r), = seen["policy"]
    assert model_batch is batch and policy_batch is batch
    assert torch.equal(model_rewards, batch.rewards)
    torch.testing.assert_close(policy_r, sampler_reward(batch.rewards, batch.nfe, 16, 0.5))
    (behaviour,), ((adv, token_mask),) = seen["is_weight"], seen["loss"]
    assert torch.equal(behaviour, batch.behaviour_logprob)
    assert torch.equal(token_mask, scored(batch.completion, batch.commit_step, batch.eos_ids))
    want, _ = group_advantages(batch.rewards, 3)
    assert bool((want != 0).any())
    torch.testing.assert_close(adv, want)
    # both moved: every model tensor, and the policy away from its warm start; both exported and loadable
    before, after = weights(base_dir), weights(joint_runs["joint"])
    assert not any(torch.equal(before[k], after[k]) for k in before)
    warm = weights(joint_runs["warm"], "step_policy.safetensors")
    assert not same(warm, weights(joint_runs["joint"], "step_policy.safetensors"))
    loaded = load_model(joint_runs["joint"])
    assert loaded.step_policy is not None and loaded.threshold_head is None
    records = [json.loads(x) for x in (Path(joint_runs["joint"]) / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "kl", "policy_loss", "sampler_reward"} <= set(records[-1])


def test_joint_step_is_the_sampler_step_and_the_model_step_on_the_same_rollouts(base_dir, joint_runs):
    """Rollouts come before either update, so the joint step's policy equals --train sampler's (same
    warm start, same batch) and its model equals --train model's rolled out by the warm-started policy."""
    policy = "step_policy.safetensors"
    assert same(weights(joint_runs["joint"], policy), weights(joint_runs["sampler"], policy))
    assert same(weights(joint_runs["joint"]), weights(joint_runs["model"]))
    assert same(weights(joint_runs["model"], policy), weights(joint_runs["warm"], policy))  # frozen there
    assert same(weights(joint_runs["sampler"]), weights(base_dir))  # and the model frozen here
    assert not same(weights(joint_runs["joint"]), weights(base_dir))


def test_joint_policy_resume_replays_the_run(base_dir, tmp_path, kill_after_checkpoint, monkeypatch):
    import training.rl as rl
    from training.checkpoint import load_trainer_state
    monkeypatch.setattr(rl, "_reward", varied_reward)
    straight = rl.train_rl(joint_cfg(base_dir, tmp_path / "straight", train="joint", max_steps=2)).output_dir
    disarm = kill_after_checkpoint(rl)
    with pytest.raises(KeyboardInterrupt):
        rl.train_rl(joint_cfg(base_dir, tmp_path / "killed", train="joint", max_steps=2))
    disarm()
    state = load_trainer_state(tmp_path / "killed" / rl.CHECKPOINT)  # saved after step 1: both optimisers
    assert state["step"] == 0 and state["optimizer"]["state"] and state["extra"]["head_optimizer"]["state"]
    resumed = rl.train_rl(joint_cfg(base_dir, tmp_path / "killed", train="joint", max_steps=2,
                                    resume=True)).output_dir
    for name in ("model.safetensors", "step_policy.safetensors"):
        assert same(weights(straight, name), weights(resumed, name)), name
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_a_warm_start_alone_is_exported(base_dir, tmp_path):
    """max_steps 0: no RL step, but the warm-started policy is written beside the model, loadable."""
    from diffpo_serve.dllm.loading import load_model
    from training.config import RLConfig
    from training.rl import train_rl
    cfg = RLConfig(model=str(base_dir), output_dir=str(tmp_path / "warm"), tasks="sudoku", train_examples=8,
                   max_steps=0, gen_length=8, train="sampler", sampler_kind="policy", warm_start_prompts=4,
                   warm_start_epochs=1)
    out = train_rl(cfg).output_dir
    policy = load_model(out).step_policy
    assert policy is not None and float(policy.scale.sub(1).abs().sum()) > 0  # fitted: inputs standardised


def test_warm_start_rounds_add_the_policys_own_states_and_refit_on_all(base_dir, tmp_path, monkeypatch):
    """DAgger rounds: round 1 from EB decodes; round 2 decodes the same prompts with the round-1 policy (greedy, at
    its folded operating point) and refits a new policy on both rounds' data."""
    import training.commit_policy as cp
    import training.rl as rl
    from training.config import RLConfig
    calls, fits = [], []
    real_data, real_fit = cp.warm_start_data, cp.fit_warm_start

    def data(loaded, prompts, gen_length, behaviour, policy=None, label="full_steps", progress=False, bar=None):
        feats, labels = real_data(loaded, prompts, gen_length, behaviour, policy=policy, label=label)
        calls.append((behaviour.sampler, behaviour.threshold, len(prompts), label, policy, len(labels)))
        return feats, labels

    def fit(policy, features, labels, **kw):
        fits.append((policy, len(labels)))  # (the objects kept: no id reuse)
        return real_fit(policy, features, labels, **kw)

    monkeypatch.setattr(cp, "warm_start_data", data)
    monkeypatch.setattr(cp, "fit_warm_start", fit)
    cfg = RLConfig(model=str(base_dir), output_dir=str(tmp_path / "warm"), tasks="sudoku", train_examples=8,
                   max_steps=0, gen_length=8, train="sampler", sampler_kind="policy", warm_start_prompts=4,
                   warm_start_epochs=1, warm_start_rounds=2, warm_start_label="trajectory", warm_start_gamma=0.2)
    rl.train_rl(cfg)
    (s1, g1, n1, l1, p1, t1), (s2, g2, n2, l2, p2, t2) = calls
    assert (s1, g1, n1, l1) == ("eb", 0.2, 4, "trajectory") and (s2, g2, n2, l2) == ("policy", 0.5, 4, "trajectory")
    assert p2 is fits[0][0]  # round 2 decodes with the round-1 policy
    assert fits[0][1] == t1 and fits[1][1] == t1 + t2 and fits[1][0] is not fits[0][0]  # a new policy, all data


def test_zero_warm_start_rounds_is_refused_before_anything_is_written(base_dir, tmp_path):
    from training.config import RLConfig
    from training.rl import train_rl
    with pytest.raises(ValueError, match="--warm-start-rounds 0: at least 1"):
        train_rl(RLConfig(model=str(base_dir), output_dir=str(tmp_path / "w"), train="sampler", sampler_kind="policy",
                          warm_start_rounds=0))
    assert not (tmp_path / "w").exists()
