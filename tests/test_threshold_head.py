"""The threshold head: sampling vs log-probs, its REINFORCE gradient, save/load and the `learned` sampler."""

import math

import pytest
import torch

from conftest import EOS, MASK, PAD, tiny_model
from diffpo_serve.dllm.loading import ModelLoadError, load_model
from diffpo_serve.dllm.sampler import SamplingParams, generate
from diffpo_serve.dllm.threshold_head import (DEFAULT_GRID, ThresholdHead, eb_commit_fractions, load_head,
                                              prompt_features)
from training.loss import sampler_reward, threshold_head_loss

IDS = dict(mask_id=MASK, eos_id=EOS, pad_id=PAD)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [30]]


def always(head: ThresholdHead, k: int) -> ThresholdHead:
    """Make the head pick grid index k for every prompt."""
    with torch.no_grad():
        last = head.net[-1]
        last.weight.zero_()
        last.bias.fill_(-50.0)
        last.bias[k] = 50.0
    return head


def test_sampling_frequencies_match_log_probs():
    torch.manual_seed(0)
    head = ThresholdHead(8, grid=[0.01, 0.1, 1.0, 10.0])
    features = torch.randn(1, 8).expand(4000, 8)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    draws = head.choose(features, gens)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    probs = head.log_prob(features[:1].expand(4, 8), torch.arange(4)).exp()
    assert torch.allclose(freq, probs, atol=0.03)
    assert torch.allclose(head.distribution(features[:1]).probs[0], probs)
    # no generators: the mode
    assert (head.choose(features[:3]) == probs.argmax()).all()


def test_reinforce_gradient_moves_probability_to_the_better_threshold():
    torch.manual_seed(0)
    head = ThresholdHead(4, grid=[0.01, 1.0, 10.0])
    features = torch.randn(6, 4)
    choice = torch.tensor([0, 1, 2, 0, 1, 2])
    advantages = torch.tensor([-1.0, 1.0, -1.0, -1.0, 1.0, -1.0])  # gamma = 1.0 was the good choice
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    before = head.distribution(features).probs[:, 1]
    for _ in range(5):
        dist = head.distribution(features)
        loss = threshold_head_loss(dist.log_prob(choice), advantages, dist.entropy(), entropy_coef=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = head.distribution(features).probs[:, 1]
    assert (after > before).all()


def test_sampler_reward_never_pays_for_fast_and_wrong():
    r = sampler_reward(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([16, 2, 16, 1]), 16, lam=0.5)
    assert r.tolist() == pytest.approx([0.5, 0.9375, 0.0, 0.0])


def test_sampler_reward_takes_one_lambda_per_row():
    r = sampler_reward(torch.tensor([1.0, 1.0, 0.5]), torch.tensor([8, 8, 4]), 16, lam=torch.tensor([2.0, 0.0, 1.0]))
    assert r.tolist() == pytest.approx([0.0, 1.0, 0.375])


@pytest.mark.parametrize("lam, expected", [(0.5, {"cd3": 0.5, "sudoku": 0.5}), ("2", {"cd3": 2.0, "sudoku": 2.0}),
                                           ("sudoku=0.25", {"cd3": 0.5, "sudoku": 0.25}),
                                           ("cd3=2,sudoku=0.25", {"cd3": 2.0, "sudoku": 0.25}),
                                           ("sudoku=0,1.5", {"cd3": 1.5, "sudoku": 0.0}),
                                           (" cd3 = 3 , sudoku=1", {"cd3": 3.0, "sudoku": 1.0})])
def test_lam_by_task(lam, expected):
    from training.config import lam_by_task
    assert lam_by_task(lam, "cd3,sudoku") == expected


@pytest.mark.parametrize("lam, message", [("fast", "'fast' is not a number"), ("cd3=-1", "must be >= 0"),
                                          ("nan", "must be >= 0"), ("countdown=1", "not one of the trained tasks")])
def test_lam_by_task_names_the_problem(lam, message):
    from training.config import RLConfig
    with pytest.raises(ValueError, match=message):
        RLConfig(tasks="cd3,sudoku", lam=lam)


def test_prompt_features_ignore_padding():
    hidden = torch.arange(12.0).view(1, 3, 4).expand(2, 3, 4).clone()
    attention = torch.tensor([[False, True, True], [True, True, True]])
    f = prompt_features(hidden, attention)
    assert f[0].tolist() == [6.0, 7.0, 8.0, 9.0] and f[1].tolist() == [4.0, 5.0, 6.0, 7.0]


def test_prompt_features_are_detached():
    """The head's features carry no graph back to the model's hidden states (no gradient of the head's
    REINFORCE loss may reach the model), even from a hidden state that requires grad."""
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    attention = torch.tensor([[False, True, True], [True, True, True]])
    assert not prompt_features(hidden, attention).requires_grad


@pytest.mark.parametrize("k", [0, 5, 12])
def test_learned_with_a_fixed_head_equals_eb(k):
    model = tiny_model(seed=1)
    head = always(ThresholdHead(model.config.hidden_size), k)
    gamma = float(head.grid[k])
    learned = generate(model, PROMPTS, SamplingParams("learned", 16, block_length=8), head=head, **IDS)
    eb = generate(model, PROMPTS, SamplingParams("eb", 16, block_length=8, threshold=gamma), **IDS)
    assert torch.equal(learned.sequences, eb.sequences)
    assert torch.equal(learned.nfe, eb.nfe)
    assert learned.threshold_choice.tolist() == [k] * 4
    assert torch.allclose(learned.threshold, torch.full((4,), gamma))


def test_learned_needs_a_head_unless_a_threshold_overrides_it(model):
    with pytest.raises(ValueError, match="threshold head"):
        generate(model, PROMPTS, SamplingParams("learned", 8), **IDS)
    override = generate(model, PROMPTS, SamplingParams("learned", 8, threshold=0.5), **IDS)
    eb = generate(model, PROMPTS, SamplingParams("eb", 8, threshold=0.5), **IDS)
    assert torch.equal(override.sequences, eb.sequences)


def test_sampled_thresholds_are_seeded_per_row(model):
    head = ThresholdHead(model.config.hidden_size)
    params = [SamplingParams("learned", 8, temperature=1.0, seed=s) for s in range(4)]
    a = generate(model, PROMPTS, params, head=head, sample_threshold=True, **IDS)
    b = generate(model, PROMPTS[::-1], params[::-1], head=head, sample_threshold=True, **IDS)
    assert a.threshold_choice.tolist() == b.threshold_choice.flip(0).tolist()
    assert (a.head_features.abs().sum(-1) > 0).all()


def test_head_saved_next_to_the_model_loads_with_it(tmp_path, tokenizer):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert load_model(tmp_path).threshold_head is None  # a model without a head still loads
    head = ThresholdHead(model.config.hidden_size)
    head.save(tmp_path)
    loaded = load_model(tmp_path)
    f = torch.randn(3, model.config.hidden_size)
    assert torch.equal(loaded.threshold_head(f), head(f))
    assert loaded.threshold_head.grid.tolist() == head.grid.tolist()
    (tmp_path / "threshold_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="threshold_head.safetensors"):
        load_model(tmp_path)
    assert load_head(tmp_path / "nowhere") is None
    (tmp_path / "threshold_head.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="threshold_head.json: unreadable threshold-head config"):
        load_model(tmp_path)


def test_default_grid_is_13_log_spaced_gammas_from_0_001_to_10():
    assert len(DEFAULT_GRID) == 13
    assert DEFAULT_GRID[0] == pytest.approx(0.001) and DEFAULT_GRID[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in zip(DEFAULT_GRID, DEFAULT_GRID[1:])]
    assert ratios == pytest.approx([10 ** (1 / 3)] * 12, rel=1e-3)  # x2.154 per step (6 decimals kept)


def test_prompt_plus_answer_features_by_hand():
    head = ThresholdHead(2, features="prompt+answer")
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [10.0, 20.0], [30.0, 40.0], [99.0, 99.0]]])
    attention = torch.tensor([[False, True, True, True, False]])  # left-padded prompt of 2, answer of 2, 1 pad
    f = head.extract(hidden, attention, prompt_width=3)
    assert f.tolist() == [[6.5, 12.5, 30.0, 40.0]]  # prompt mean (3,5),(10,20); answer mean (30,40) only
    assert head.feature_size == 4 and head(f).shape == (1, len(head.grid))
    with pytest.raises(ValueError, match="features"):
        ThresholdHead(2, features="answer")


def test_eb_commit_fractions_by_hand():
    inf = float("inf")
    logits = torch.tensor([[[0.0, -inf, -inf, -inf],  # entropy 0
                            [0.0, 0.0, 0.0, 0.0],  # ln 4
                            [0.0, 0.0, -inf, -inf],  # ln 2
                            [5.0, 1.0, 2.0, 3.0]]])  # a pad position: ignored
    entropy = torch.special.entr(torch.softmax(logits, -1)).sum(-1)  # as the sampler computes it
    attention = torch.tensor([[True, True, True, False]])
    grid = torch.tensor([0.0, 0.5, 0.7, 2.1, 5.0])
    f = eb_commit_fractions(entropy, attention, grid)
    # ascending entropies 0, ln2, ln4; entropy before each: 0, 0, ln2 = 0.693 -> prefixes of 2, 2, 3, 3, 3
    torch.testing.assert_close(f, torch.tensor([[2 / 3, 2 / 3, 1.0, 1.0, 1.0, math.log(8) / 3]]))
    head = ThresholdHead(2, grid=grid.tolist(), features="prompt+answer+eb")
    assert head.feature_size == 2 * 2 + len(grid) + 1
    hidden = torch.randn(1, 6, 2)
    full_attention = torch.tensor([[True, True, True, True, True, False]])
    features = head.extract(hidden, full_attention, prompt_width=2, answer_entropy=entropy)
    torch.testing.assert_close(features[:, 4:], f)
    with pytest.raises(ValueError, match="answer entropies"):
        head.extract(hidden, full_attention, prompt_width=2)


@pytest.mark.parametrize("features", ["prompt+answer", "prompt+answer+eb"])
def test_answer_feature_heads_decode_rows_as_alone_and_round_trip(tmp_path, features):
    model = tiny_model(seed=2)
    torch.manual_seed(0)
    head = ThresholdHead(model.config.hidden_size, features=features)
    with torch.no_grad():
        head.net[-1].weight.mul_(50)  # a decisive head, so different rows really pick different gammas
    params = SamplingParams("learned", 12, block_length=6)
    together = generate(model, PROMPTS, params, head=head, **IDS)
    assert len(set(together.threshold_choice.tolist())) > 1
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], params, head=head, **IDS)
        assert torch.equal(alone.sequences[0], together.sequences[i])
        assert alone.threshold_choice.item() == together.threshold_choice[i].item()
        assert torch.allclose(alone.head_features[0], together.head_features[i], atol=1e-5)
    assert together.head_features.shape == (len(PROMPTS), head.feature_size)
    head.save(tmp_path)
    again = load_head(tmp_path)
    assert again.features == features
    assert torch.equal(again(together.head_features), head(together.head_features))


def test_greedy_rows_still_draw_their_gamma_when_sampling_thresholds(model):
    head = ThresholdHead(model.config.hidden_size)  # near-uniform: draws differ from the mode
    prompts = [PROMPTS[0]] * 8
    params = [SamplingParams("learned", 8, temperature=0.0, seed=s) for s in range(8)]
    drawn = generate(model, prompts, params, head=head, sample_threshold=True, **IDS)
    assert len(set(drawn.threshold_choice.tolist())) > 1  # explored although decoding is greedy
    again = generate(model, prompts, params, head=head, sample_threshold=True, **IDS)
    assert torch.equal(drawn.threshold_choice, again.threshold_choice)  # seeded per row
    for i, k in enumerate(drawn.threshold_choice.tolist()):  # and each row is the greedy eb decode at its gamma
        eb = generate(model, [PROMPTS[0]], SamplingParams("eb", 8, threshold=float(head.grid[k])), **IDS)
        assert torch.equal(drawn.sequences[i], eb.sequences[0])
    mode = generate(model, prompts, params, head=head, **IDS)  # not sampling: every row takes the mode
    assert len(set(mode.threshold_choice.tolist())) == 1
