"""The learned per-step commit policy (sampler `policy`): features, decisions, log-probs, state, save/load."""

import math

import pytest
import torch

from conftest import EOS, MASK, PAD, tiny_model
from diffpo_serve.dllm.forward import model_logits
from diffpo_serve.dllm.loading import ModelLoadError, load_model
from diffpo_serve.dllm.sampler import BatchState, SamplingParams, denoise_step, generate, init_state
from diffpo_serve.dllm.step_policy import (FEATURE_NAMES, NEAR_CERTAIN, StepPolicy, decision_entropy, decision_logprob,
                                           load_policy, policy_commits, token_features)

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [30]]
IDS = dict(mask_id=MASK, eos_id=EOS, pad_id=PAD)


def constant_policy(p: float) -> StepPolicy:
    """A policy that gives every token commit probability ``p`` (0 < p < 1) or ~0 / ~1 (p = 0 / 1)."""
    policy = StepPolicy()
    with torch.no_grad():
        for m in policy.net:
            if isinstance(m, torch.nn.Linear):
                m.weight.zero_()
                m.bias.zero_()
        policy.net[-1].bias.fill_(40.0 if p >= 1 else -40.0 if p <= 0 else math.log(p / (1 - p)))
    return policy.eval()


def random_policy(seed: int = 0, threshold: float = 0.5) -> StepPolicy:
    torch.manual_seed(seed)
    policy = StepPolicy(threshold=threshold)
    with torch.no_grad():  # spread the logits so that decisions depend on the features
        for m in policy.net:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(4.0)
    return policy.eval()


# ----------------------------------------------------------------------------- features by hand

def test_features_by_hand_on_a_tiny_model(model):
    """Six passes of a 12-token answer in blocks of 4 (block 0's four, block 1's first two): every feature
    recomputed from the logits, positions and fractions relative to the row's current block; `unchanged` is 0 at
    a block's first pass (a pass computes its own block only, so nothing of the next block is known before)."""
    prompt = [5, 6, 7]
    params = SamplingParams("eb", gen_length=12, block_length=4, threshold=0.0)  # one token per pass
    state = init_state([prompt], params, **IDS, trace_features=True)
    outs = []
    for _ in range(6):
        canvas = state.canvas.clone()
        outs.append((canvas, denoise_step(model, state)))
    seen_unchanged, seen_left = set(), set()
    for s, (canvas, out) in enumerate(outs):
        with torch.no_grad():
            logits = model_logits(model, canvas, torch.ones_like(canvas, dtype=torch.bool),
                                  torch.arange(canvas.shape[1])[None])[0, 3:].double()
        logits[:, MASK] = float("-inf")
        probs = torch.softmax(logits, -1)
        start, step = 4 * (s // 4), s % 4  # the current block's first position, the pass within the block
        masked = [j for j in range(start, start + 4) if canvas[0, 3 + j] == MASK]
        assert len(masked) == 4 - step
        ent = {j: -sum(float(q) * math.log(float(q)) for q in probs[j] if q > 0) for j in masked}
        f = out.features[0]
        for j in range(12):
            if j not in masked:
                assert f[j].abs().sum() == 0
                continue
            top = sorted(probs[j].tolist(), reverse=True)
            before = sum(ent[k] for k in masked if (ent[k], k) < (ent[j], j))
            rank = sum(1 for k in masked if (ent[k], k) < (ent[j], j))
            unchanged = 0.0 if step == 0 else float(outs[s - 1][1].argmax[0, j] == out.argmax[0, j])
            seen_unchanged.add(unchanged) if step else None
            left = float(j == start or (j - 1) not in masked)
            expected = [top[0], ent[j], top[0] - top[1], before, (j - start) / 4, len(masked) / 4, unchanged,
                        step / 4, rank / 4, left, math.log(top[0]), float(ent[j] < 0.01)]
            seen_left.add(left)
            assert f[j].tolist() == pytest.approx(expected, abs=1e-5), (s, j)
        assert out.argmax[0, start:start + 4].tolist() == logits.argmax(-1)[start:start + 4].tolist()
        assert (out.argmax[0, start + 4:] == -1).all() and (out.argmax[0, :start] == -1).all()  # nothing else
    assert seen_unchanged == {0.0, 1.0}  # the run exercises both values of `unchanged` after the first pass
    assert seen_left == {0.0, 1.0}
    assert len(FEATURE_NAMES) == out.features.shape[-1]


def test_token_features_pure_function_by_hand():
    conf = torch.tensor([[0.9, 0.5, 0.7, 0.2]])
    ent = torch.tensor([[0.1, 1.0, 0.4, 2.0]])
    margin = torch.tensor([[0.8, 0.1, 0.5, 0.05]])
    before = torch.tensor([[0.0, 0.5, 0.1, 1.5]])
    unchanged = torch.tensor([[True, False, True, False]])
    cand = torch.tensor([[False, True, True, True]])
    ent = torch.tensor([[0.1, 1.0, 0.005, 2.0]])
    rank = torch.tensor([[3, 1, 0, 2]])  # ascending entropy among the candidates (column 0 is none)
    f = token_features(conf, ent, margin, before, rank, unchanged, cand, torch.tensor([1]), torch.tensor([3]),
                       torch.tensor([2]))
    assert f[0, 0].abs().sum() == 0
    # column 1 follows a committed token (column 0 is no candidate); columns 2 and 3 follow masked ones
    assert f[0, 1].tolist() == pytest.approx([0.5, 1.0, 0.1, 0.5, 0.0, 1.0, 0.0, 2 / 3, 1 / 3, 1.0, math.log(0.5),
                                              0.0])
    assert f[0, 2].tolist() == pytest.approx([0.7, 0.005, 0.5, 0.1, 1 / 3, 1.0, 1.0, 2 / 3, 0.0, 0.0, math.log(0.7),
                                              1.0])
    assert f[0, 3].tolist() == pytest.approx([0.2, 2.0, 0.05, 1.5, 2 / 3, 1.0, 0.0, 2 / 3, 2 / 3, 0.0, math.log(0.2),
                                              0.0])
    # the first column's left neighbour is the previous block (or the prompt): committed
    first = token_features(conf, ent, margin, before, rank, unchanged, torch.ones_like(cand), torch.tensor([0]),
                           torch.tensor([4]), torch.tensor([0]))
    assert first[0, :, FEATURE_NAMES.index("left_committed")].tolist() == [1.0, 0.0, 0.0, 0.0]
    # near_certain is entropy < NEAR_CERTAIN, strictly
    at = token_features(conf, torch.tensor([[NEAR_CERTAIN, NEAR_CERTAIN / 2, 1.0, 0.0]]), margin, before, rank,
                        unchanged, torch.ones_like(cand), torch.tensor([0]), torch.tensor([4]), torch.tensor([0]))
    assert at[0, :, FEATURE_NAMES.index("near_certain")].tolist() == [0.0, 1.0, 0.0, 1.0]


# ----------------------------------------------------------------------------- decisions

def test_policy_commits_threshold_sampling_and_at_least_one():
    prob = torch.tensor([[0.2, 0.6, 0.9, 0.1], [0.1, 0.2, 0.3, 0.4]])
    conf = torch.tensor([[0.5, 0.4, 0.3, 0.9], [0.1, 0.8, 0.3, 0.2]])
    cand = torch.tensor([[True, True, True, False], [True, True, True, True]])
    commit, bits = policy_commits(prob, conf, cand, torch.tensor([0.6, 0.5]))
    assert bits.tolist() == [[False, True, True, False], [False, False, False, False]]
    # row 1 sets no bit: its most confident candidate (position 1) is committed
    assert commit.tolist() == [[False, True, True, False], [False, True, False, False]]
    uniform = torch.tensor([[0.1, 0.7, 0.95, 0.0], [0.05, 0.5, 0.5, 0.5]])
    commit, bits = policy_commits(prob, conf, cand, torch.tensor([0.6, 0.5]), uniform, torch.tensor([True, False]))
    assert bits.tolist() == [[True, False, False, False], [False, False, False, False]]  # u < p; non-candidate off
    assert commit.tolist() == [[True, False, False, False], [False, True, False, False]]
    # a sampled bit is u < p, strictly: probability 0 never fires, even at u = 0, and u = p is a 0
    edge = torch.tensor([[0.0, 0.5, 0.25, 0.75]])
    _, bits = policy_commits(edge, conf[:1], torch.ones(1, 4, dtype=torch.bool), torch.tensor([0.5]),
                             torch.tensor([[0.0, 0.5, 0.0, 0.75]]), torch.tensor([True]))
    assert bits.tolist() == [[False, False, True, False]]


def test_decision_logprob_by_hand():
    prob = torch.tensor([0.2, 0.7, 0.9, 0.5])
    bits = torch.tensor([True, False, True, True])
    cand = torch.tensor([True, True, True, False])
    expected = math.log(0.2) + math.log(0.3) + math.log(0.9)  # the non-candidate does not count
    assert float(decision_logprob(prob, bits, cand)) == pytest.approx(expected, rel=1e-5)


def test_decision_entropy_by_hand():
    prob = torch.tensor([0.5, 0.2, 0.9])
    cand = torch.tensor([True, True, False])
    expected = math.log(2) - (0.2 * math.log(0.2) + 0.8 * math.log(0.8))  # the non-candidate does not count
    assert float(decision_entropy(prob, cand)) == pytest.approx(expected, rel=1e-5)


def test_saturated_decisions_stay_finite_at_eps():
    """A saturated policy (p = 0 or 1) is clamped to [eps, 1 - eps]: the unlikely bit costs log(eps), and
    the entropy is the clamped Bernoulli's, both finite (no -inf or NaN reaches the REINFORCE loss)."""
    eps = 1e-6
    prob = torch.tensor([1.0, 0.0, 1.0, 0.0])
    bits = torch.tensor([False, True, True, False])
    one = torch.tensor([True, True, False, False])
    assert float(decision_logprob(prob, bits, one)) == pytest.approx(2 * math.log(eps), rel=1e-3)
    assert float(decision_logprob(prob, bits, ~one)) == pytest.approx(2 * math.log(1 - eps), abs=1e-5)
    h = -(eps * math.log(eps) + (1 - eps) * math.log(1 - eps))
    assert float(decision_entropy(prob, one)) == pytest.approx(2 * h, rel=1e-2)


def test_constant_policies_commit_a_block_per_pass_or_one_token_per_pass(model):
    params = SamplingParams("policy", gen_length=12, block_length=4)
    all_at_once = generate(model, PROMPTS, params, **IDS, policy=constant_policy(1.0), stop_at_eos=False,
                           return_trajectory=True)
    assert all_at_once.nfe.tolist() == [3] * len(PROMPTS)
    for row in all_at_once.commit_step.tolist():
        assert row == [0] * 4 + [1] * 4 + [2] * 4
    one_each = generate(model, PROMPTS, params, **IDS, policy=constant_policy(0.0), stop_at_eos=False,
                        return_trajectory=True)
    assert one_each.nfe.tolist() == [12] * len(PROMPTS)
    # one token per pass, the most confident: the same decode as `confidence` with an unreachable threshold
    assert sorted(one_each.commit_step[0].tolist()) == list(range(12))
    conf = generate(model, PROMPTS, SamplingParams("confidence", gen_length=12, block_length=4, threshold=2.0),
                    **IDS, stop_at_eos=False, return_trajectory=True)
    assert one_each.sequences.tolist() == conf.sequences.tolist()
    assert one_each.commit_step.tolist() == conf.commit_step.tolist()


def test_the_knob_is_a_probability_threshold(model):
    """p = 0.6 everywhere: threshold 0.59 commits the block at once, 0.61 one token per pass; the
    policy's stored operating point is the default."""
    policy = constant_policy(0.6)
    kw = dict(**IDS, policy=policy, stop_at_eos=False)
    assert generate(model, PROMPTS[:1], SamplingParams("policy", 8, threshold=0.59), **kw).nfe.tolist() == [1]
    assert generate(model, PROMPTS[:1], SamplingParams("policy", 8, threshold=0.61), **kw).nfe.tolist() == [8]
    policy.threshold = 0.59
    out = generate(model, PROMPTS[:1], SamplingParams("policy", 8), **kw)
    assert out.nfe.tolist() == [1] and out.threshold.tolist() == [pytest.approx(0.59)]
    with pytest.raises(ValueError, match="step policy"):
        generate(model, PROMPTS[:1], SamplingParams("policy", 8), **IDS)


def test_sampled_commits_logprob_matches_a_replay_by_hand(model):
    """Rollouts draw each bit from Bernoulli(p) with the row's generator; the recorded log-prob is
    the sum of log p (bit set) and log(1 - p) (bit clear) over each pass's candidates."""
    policy = random_policy(1)
    params = [SamplingParams("policy", gen_length=8, block_length=4, seed=11 + i) for i in range(3)]
    out = generate(model, PROMPTS[:3], params, **IDS, policy=policy, sample_commits=True, return_trajectory=True)
    trace = out.policy_trace
    for i in range(3):
        g = torch.Generator().manual_seed(11 + i)
        total = 0.0
        for s in range(int(out.nfe[i])):
            cand = trace.candidates[i, s]
            p = policy.probability(trace.features[i, s]).detach()
            u = torch.rand(8, generator=g)  # the row's own draw at this pass
            bits = (u < p) & cand
            assert trace.decisions[i, s].tolist() == bits.tolist()
            total += sum(math.log(float(p[j])) if bits[j] else math.log(1 - float(p[j]))
                         for j in range(8) if cand[j])
            committed = (out.commit_step[i] == s)
            assert committed.tolist() == (bits if bits.any() else committed & cand).tolist()
            assert int(committed.sum()) == max(1, int(bits.sum()))
        assert float(out.policy_logprob[i]) == pytest.approx(total, rel=1e-4, abs=1e-4)
    # the decisions are stochastic: another seed gives another trajectory
    other = generate(model, PROMPTS[:3], [SamplingParams("policy", 8, 4, seed=99 + i) for i in range(3)], **IDS,
                     policy=policy, sample_commits=True, return_trajectory=True)
    assert other.commit_step.tolist() != out.commit_step.tolist()


# ----------------------------------------------------------------------------- batching and state

def test_greedy_policy_batch_equals_alone(model):
    policy = random_policy(2)
    params = [SamplingParams("policy", gen_length=16, block_length=8), SamplingParams("policy", 12, 4, threshold=0.3),
              SamplingParams("eb", 16, 4, threshold=0.5), SamplingParams("policy", 8, 8, threshold=0.8)]
    batched = generate(model, PROMPTS, params, **IDS, policy=policy)
    nfes = set()
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        alone = generate(model, [prompt], p, **IDS, policy=policy)
        n = p.gen_length
        assert batched.sequences[i, :n].tolist() == alone.sequences[0, :n].tolist()
        assert batched.nfe[i] == alone.nfe[0]
        assert float(batched.policy_logprob[i]) == pytest.approx(float(alone.policy_logprob[0]), abs=1e-4)
        nfes.add(int(alone.nfe[0]))
    assert len(nfes) > 1  # the policy's rows did not all degenerate to one schedule


def test_previous_argmax_survives_select_and_concat(model):
    policy = random_policy(3)
    p1 = SamplingParams("policy", gen_length=8, block_length=4, threshold=0.9)
    p2 = SamplingParams("policy", gen_length=12, block_length=4, threshold=0.7)
    first = init_state(PROMPTS[:2], p1, **IDS, policy=policy)
    denoise_step(model, first)
    before = first.prev_argmax.clone()
    assert (before[:, :4] != -1).all() and (before[:, 4:] == -1).all() and before.shape == (2, 8)  # block 0 only
    late = init_state(PROMPTS[2:], p2, **IDS, policy=policy)
    joined = BatchState.concat([first, late])
    assert joined.prev_argmax[:2, :8].tolist() == before.tolist()
    assert (joined.prev_argmax[:2, 8:] == -1).all() and (joined.prev_argmax[2:] == -1).all()
    kept = joined.select([1, 3])
    assert kept.prev_argmax[0, :8].tolist() == before[1].tolist()
    # rows that joined and left decode exactly as alone (the `unchanged` feature included)
    while not joined.finished.all():
        denoise_step(model, joined)
        if bool(joined.finished[0]) and joined.batch_size == 4:
            joined = joined.select([1, 2, 3])
    expected = [generate(model, [p], pp, **IDS, policy=policy) for p, pp in zip(PROMPTS[1:], [p1, p2, p2])]
    for row, exp in enumerate(expected):
        n = int(joined.gen_length[row])
        assert joined.generated[row, :n].tolist() == exp.sequences[0, :n].tolist()
        assert joined.nfe[row] == exp.nfe[0]
        assert float(joined.policy_logprob[row]) == pytest.approx(float(exp.policy_logprob[0]), abs=1e-4)


# ----------------------------------------------------------------------------- save / load

def test_policy_saved_next_to_the_model_loads_with_it(tmp_path, tokenizer):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert load_model(tmp_path).step_policy is None
    policy = random_policy(4, threshold=0.37)
    policy.fit_normalisation(torch.randn(50, len(FEATURE_NAMES)) * 3 + 1)
    policy.save(tmp_path)
    loaded = load_model(tmp_path)
    f = torch.randn(5, len(FEATURE_NAMES))
    assert torch.equal(loaded.step_policy(f), policy(f))
    assert loaded.step_policy.threshold == pytest.approx(0.37)
    hidden = StepPolicy(model.config.hidden_size, features="basic+hidden")
    hidden.save(tmp_path)
    assert load_policy(tmp_path).feature_size == len(FEATURE_NAMES) + model.config.hidden_size
    (tmp_path / "step_policy.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="step_policy.safetensors"):
        load_model(tmp_path)
    (tmp_path / "step_policy.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="step_policy.json"):
        load_model(tmp_path)


def test_fitted_standardisation_is_what_the_network_sees():
    """fit_normalisation stores each feature's mean and sample std (n - 1), floored at 1e-3 for a constant
    feature; forward feeds the network (x - mean) / std, so the fitted inputs have mean 0 and std 1."""
    policy = random_policy(5)
    x = torch.randn(64, len(FEATURE_NAMES)) * torch.linspace(0.5, 4, len(FEATURE_NAMES)) + torch.arange(12.0)
    x[:, 3] = 2.5  # a constant feature
    policy.fit_normalisation(x.reshape(4, 16, -1))
    col = [float(v) for v in x[:, 0]]
    mean = sum(col) / 64
    std = (sum((v - mean) ** 2 for v in col) / 63) ** 0.5
    assert float(policy.shift[0]) == pytest.approx(mean, abs=1e-5)
    assert float(policy.scale[0]) == pytest.approx(std, rel=1e-5)
    assert float(policy.shift[3]) == pytest.approx(2.5) and float(policy.scale[3]) == pytest.approx(1e-3)
    seen = []
    hook = policy.net[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        policy(x)
    hook.remove()
    z = seen[0]
    assert torch.allclose(z[:, 0], (x[:, 0] - mean) / std, atol=1e-5)
    keep = [i for i in range(len(FEATURE_NAMES)) if i != 3]
    assert torch.allclose(z[:, keep].mean(0), torch.zeros(len(keep)), atol=1e-5)
    assert torch.allclose(z[:, keep].std(0), torch.ones(len(keep)), atol=1e-4)
    assert torch.equal(z[:, 3], torch.zeros(64))


def test_hidden_features_need_a_hidden_size_of_at_least_one():
    assert StepPolicy(1, features="basic+hidden").feature_size == len(FEATURE_NAMES) + 1
    with pytest.raises(ValueError, match="hidden_size"):
        StepPolicy(0, features="basic+hidden")


def test_hidden_state_features_reach_the_policy(model):
    policy = StepPolicy(model.config.hidden_size, features="basic+hidden")
    out = generate(model, PROMPTS[:2], SamplingParams("policy", 8), **IDS, policy=policy, return_trajectory=True)
    f = out.policy_trace.features
    assert f.shape[-1] == len(FEATURE_NAMES) + model.config.hidden_size
    with torch.no_grad():
        _, hidden = model_logits(model, *_first_pass_inputs(PROMPTS[:2], 8), hidden=True)
    cand0 = out.policy_trace.candidates[:, 0]
    pw = max(len(p) for p in PROMPTS[:2])
    assert torch.allclose(f[:, 0, :, len(FEATURE_NAMES):][cand0], hidden[:, pw:][cand0], atol=1e-5)
    assert (f[~out.policy_trace.candidates] == 0).all()  # hidden states too are zero off the candidates
    assert torch.isfinite(out.policy_logprob).all()


def _first_pass_inputs(prompts, gen):
    state = init_state(prompts, SamplingParams("eb", gen, threshold=0.1), **IDS)
    return state.canvas, state.attention_mask, state.position_ids()


def test_setting_the_operating_point_moves_the_threshold_into_the_network():
    policy = random_policy(6)
    f = torch.randn(400, len(FEATURE_NAMES))
    p = policy.probability(f).detach()
    policy.set_operating_point(0.8)
    q = policy.probability(f).detach()
    assert policy.threshold == 0.5
    expected = torch.sigmoid(torch.logit(p.double()) - math.log(0.8 / 0.2))
    assert torch.allclose(q.double(), expected, atol=1e-5)
    assert ((q >= 0.5) == (p >= 0.8)).float().mean() > 0.99  # the same greedy rule (up to rounding at the edge)
    assert 0 < float((p >= 0.8).float().mean()) < 1
    with pytest.raises(ValueError, match="operating point"):
        policy.set_operating_point(1.0)


def test_unchanged_is_zero_at_a_blocks_first_pass_and_no_pass_reads_past_its_block(model):
    """A pass computes logits for its own block only (no look-ahead: at a 256-token answer in blocks of 32 that
    would be up to 8x the block's vocabulary projection per pass), so at block 1's first pass `unchanged` is 0 on
    every candidate, as at block 0's, and block 1's second pass compares with its first; the argmax a pass
    reports is -1 outside its block and the full forward's inside it."""
    prompt = [5, 6, 7]
    params = SamplingParams("eb", gen_length=8, block_length=4, threshold=0.0)  # one token per pass
    out = generate(model, [prompt], params, **IDS, trace_features=True, return_trajectory=True)
    trace = out.policy_trace
    assert int(out.nfe[0]) == 8
    last, first = 3, 4  # block 0's last pass, block 1's first
    unchanged = FEATURE_NAMES.index("unchanged")
    assert trace.candidates[0, first].tolist() == [False] * 4 + [True] * 4
    assert (trace.argmax[0, last, 4:] == -1).all() and (trace.argmax[0, first, :4] == -1).all()
    assert trace.features[0, first, :, unchanged].tolist() == [0.0] * 8
    second = first + 1
    candidates = trace.candidates[0, second]
    expected = ((trace.argmax[0, second] == trace.argmax[0, first]) & candidates).float()
    assert trace.features[0, second, :, unchanged].tolist() == expected.tolist()
    canvas = torch.tensor([prompt + out.sequences[0].tolist()])
    canvas[0, 3:][out.commit_step[0] >= first] = MASK  # the canvas block 1's first pass saw
    with torch.no_grad():
        logits = model_logits(model, canvas, torch.ones_like(canvas, dtype=torch.bool),
                              torch.arange(canvas.shape[1])[None])[0, 3:]
    logits[:, MASK] = float("-inf")
    assert trace.argmax[0, first, 4:].tolist() == logits[4:].argmax(-1).tolist()
