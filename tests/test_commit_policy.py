"""Training the per-step commit policy: warm-start labels, the BCE fit, the REINFORCE step, the trainer."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import EOS, MASK, PAD, tiny_model
from diffpo_serve.dllm.sampler import SamplingParams, generate
from diffpo_serve.dllm.step_policy import FEATURE_NAMES, StepPolicy, decision_entropy, decision_logprob
from training.commit_policy import commit_labels, fit_warm_start, policy_rl_loss, warm_start_data

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

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("base")
    tiny_model(seed=0, init=0.1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
    with pytest.raises(ValueError, match="joint"):
        train_rl(RLConfig(model=str(base_dir), output_dir=str(tmp_path / "j"), train="joint", sampler_kind="policy"))
    with pytest.raises(ValueError, match="basic\\+hidden.*--cache off"):  # refused before any warm start
        train_rl(RLConfig(model=str(base_dir), output_dir=str(tmp_path / "h"), train="sampler", sampler_kind="policy",
                          policy_features="basic+hidden", cache="prefix"))
    assert not (tmp_path / "h").exists()


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
