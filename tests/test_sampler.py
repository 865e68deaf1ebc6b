"""The shared sampler against brute-force references and its batching guarantees."""

import math

import pytest
import torch

from benchmarks.llada_reference import llada_generate
from conftest import EOS, MASK, PAD, tiny_model
from diffpo_serve.dllm.sampler import (BatchState, SamplingParams, denoise_step, entropy_before, first_masked_block,
                                       generate, greedy_tokens, init_state, low_confidence_commits, policy_logprobs,
                                       prompt_alignment, remasking_confidence, sampling_logprobs, select_commits,
                                       transfer_counts)

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [30]]
IDS = dict(mask_id=MASK, eos_id=EOS, pad_id=PAD)


def run(model, prompts, params, **kw):
    return generate(model, prompts, params, **IDS, **kw)


# ----------------------------------------------------------------------------- reference: LLaDA's algorithm

@pytest.mark.parametrize("gen_length,block_length,steps", [(16, 16, 16), (16, 8, 8), (16, 4, 8), (12, 4, 6)])
def test_steps_matches_llada_reference(model, gen_length, block_length, steps):
    params = SamplingParams(sampler="steps", gen_length=gen_length, block_length=block_length, steps=steps)
    out = run(model, PROMPTS, params, stop_at_eos=False)
    for i, prompt in enumerate(PROMPTS):
        expected = llada_generate(model, prompt, gen_length=gen_length, block_length=block_length, steps=steps,
                                  mask_id=MASK)
        assert out.sequences[i].tolist() == expected.tolist()
    assert out.nfe.tolist() == [steps] * len(PROMPTS)


# ----------------------------------------------------------------------------- batching invariance

@pytest.mark.parametrize("params", [
    SamplingParams(sampler="steps", gen_length=16, block_length=8, steps=8),
    SamplingParams(sampler="confidence", gen_length=16, block_length=8, threshold=0.5),
    SamplingParams(sampler="eb", gen_length=16, block_length=4, threshold=0.5),
    SamplingParams(sampler="eb", gen_length=12, block_length=12, threshold=2.0),
])
def test_greedy_batch_equals_alone(model, params):
    batched = run(model, PROMPTS, params)
    for i, prompt in enumerate(PROMPTS):
        alone = run(model, [prompt], params)
        assert batched.sequences[i].tolist() == alone.sequences[0].tolist()
        assert batched.nfe[i] == alone.nfe[0]


def test_mixed_params_in_one_batch_equal_alone(model):
    params = [SamplingParams(sampler="steps", gen_length=8, steps=4),
              SamplingParams(sampler="eb", gen_length=16, block_length=4, threshold=0.3),
              SamplingParams(sampler="confidence", gen_length=12, block_length=6, threshold=0.7),
              # a drawing row in narrower blocks than the batch's widest: its stream must not see the width
              SamplingParams(sampler="eb", gen_length=16, block_length=4, threshold=0.3, temperature=1.0, seed=7)]
    batched = run(model, PROMPTS, params)
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        alone = run(model, [prompt], p)
        n = p.gen_length
        assert batched.sequences[i, :n].tolist() == alone.sequences[0, :n].tolist()
        assert (batched.sequences[i, n:] == PAD).all()
        assert batched.nfe[i] == alone.nfe[0]


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    params = SamplingParams(sampler="eb", gen_length=16, block_length=8, threshold=0.5, temperature=1.0, seed=123)
    a = run(model, PROMPTS, params)
    b = run(model, PROMPTS, params)
    assert torch.equal(a.sequences, b.sequences)
    alone = run(model, [PROMPTS[2]], params)
    assert torch.equal(alone.sequences[0], a.sequences[2])
    other_seed = run(model, [PROMPTS[2]], SamplingParams(**{**params.__dict__, "seed": 124}))
    assert not torch.equal(other_seed.sequences[0], a.sequences[2])


# ----------------------------------------------------------------------------- strategies

def test_eb_gamma_zero_commits_one_token_per_step(model):
    out = run(model, PROMPTS, SamplingParams(sampler="eb", gen_length=16, block_length=8, threshold=0.0),
              stop_at_eos=False, return_trajectory=True)
    assert out.nfe.tolist() == [16] * len(PROMPTS)
    for row in out.commit_step:
        assert sorted(row.tolist()) == list(range(16))


def test_eb_huge_gamma_commits_a_block_per_pass(model):
    out = run(model, PROMPTS, SamplingParams(sampler="eb", gen_length=16, block_length=8, threshold=1e9),
              stop_at_eos=False, return_trajectory=True)
    assert out.nfe.tolist() == [2] * len(PROMPTS)
    assert (out.commit_step[:, :8] == 0).all() and (out.commit_step[:, 8:] == 1).all()


def test_confidence_threshold_extremes(model):
    all_at_once = run(model, PROMPTS, SamplingParams(sampler="confidence", gen_length=16, threshold=0.0),
                      stop_at_eos=False)
    assert all_at_once.nfe.tolist() == [1] * len(PROMPTS)
    one_each = run(model, PROMPTS, SamplingParams(sampler="confidence", gen_length=16, threshold=1.01),
                   stop_at_eos=False)
    assert one_each.nfe.tolist() == [16] * len(PROMPTS)


class TwoTokens(torch.nn.Module):
    """A fake denoiser whose every position says token 40 with probability 0.6 and token 41 with 0.4 (the
    mask and everything else negligible), whatever the context."""

    def __init__(self, vocab: int = 104):
        super().__init__()
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids=None):
        logits = torch.full((*input_ids.shape, self.vocab), -30.0)
        logits[..., 40], logits[..., 41] = math.log(0.6), math.log(0.4)
        return type("Out", (), {"logits": logits})()


def test_sampled_confidence_rows_commit_by_the_drawn_tokens_probability():
    """At T > 0 the confidence sampler's confidence is pi of the token drawn, not of the argmax: at threshold
    0.5 a drawn 40 (p = 0.6) commits and a drawn 41 (p = 0.4) does not, unless it is the pass's only commit
    (the at-least-one rule). Reading the argmax's 0.6 everywhere would commit every draw in the first pass."""
    rows = [[5, 6, 7]] * 4
    out = run(TwoTokens(), rows, [SamplingParams("confidence", 8, threshold=0.5, temperature=1.0, seed=s)
                                  for s in range(4)], stop_at_eos=False, return_trajectory=True)
    assert (out.nfe > 1).all(), out.nfe
    low = 0
    for seq, steps in zip(out.sequences.tolist(), out.commit_step.tolist()):
        for token, s in zip(seq, steps):
            assert token in (40, 41)
            if token == 41:  # committed below the threshold: only as the pass's single commit
                assert steps.count(s) == 1, (seq, steps)
                low += 1
    assert low > 0  # the fallback was exercised


def test_select_commits_by_hand():
    conf = torch.tensor([[0.9, 0.2, 0.6, 0.8, 0.1]] * 3)
    ent = torch.tensor([[0.1, 2.0, 0.3, 0.2, 5.0]] * 3)
    cand = torch.tensor([[True, True, True, True, False]] * 3)
    sampler = torch.tensor([0, 1, 2])
    # steps: top-2 confidence; confidence >= 0.7; eb: sorted H 0.1, 0.2, 0.3, 2.0 -> prefix sums
    # excluding the max: 0, 0.1, 0.3, 0.6 -> gamma 0.35 allows three tokens
    sel = select_commits(conf, ent, cand, sampler, torch.tensor([0.0, 0.7, 0.35]), torch.tensor([2, 0, 0]))
    assert sel.tolist() == [[True, False, False, True, False],
                            [True, False, False, True, False],
                            [True, False, True, True, False]]
    # at least one token even when nothing passes the threshold
    sel = select_commits(conf, ent, cand, sampler, torch.tensor([0.0, 0.99, 0.0]), torch.tensor([1, 0, 0]))
    assert sel.sum(-1).tolist() == [1, 1, 1] and sel[:, 0].all()


def test_transfer_counts_follow_llada_schedule():
    n, s = torch.tensor([10] * 4), torch.tensor([4] * 4)
    counts = transfer_counts(n, s, torch.arange(4))
    assert counts.tolist() == [3, 3, 2, 2] and counts.sum() == 10


def test_ties_at_the_threshold_commit():
    """EB commits while the entropy before a token is <= gamma, confidence while it is >= the threshold:
    a tie exactly at the bound commits (all values below are exact in binary)."""
    ent = torch.tensor([[0.5, 0.25, 1.0, 0.25, 0.125]])
    cand = torch.tensor([[True, True, True, True, False]])
    before, rank = entropy_before(ent, cand)
    # ascending 0.25 (pos 1), 0.25 (pos 3), 0.5, 1.0; the sum before each, back in position order
    assert before[0, :4].tolist() == [0.5, 0.0, 1.0, 0.25] and rank[0, :4].tolist() == [2, 0, 3, 1]
    eb = select_commits(torch.zeros_like(ent), ent, cand, torch.tensor([2]), torch.tensor([0.5]), torch.tensor([0]))
    assert eb.tolist() == [[True, True, False, True, False]]
    learned = select_commits(torch.zeros_like(ent), ent, cand, torch.tensor([3]), torch.tensor([0.25]),
                             torch.tensor([0]))
    assert learned.tolist() == [[False, True, False, True, False]]  # `learned` selects like eb
    conf = torch.tensor([[0.25, 0.5, 0.75, 0.5, 1.0]])
    sel = select_commits(conf, ent, cand, torch.tensor([1]), torch.tensor([0.5]), torch.tensor([0]))
    assert sel.tolist() == [[False, True, True, True, False]]


def test_transfer_counts_with_a_remainder_go_to_the_first_steps():
    counts = transfer_counts(torch.tensor([7] * 3), torch.tensor([3] * 3), torch.arange(3))
    assert counts.tolist() == [3, 2, 2]
    assert transfer_counts(torch.tensor([2]), torch.tensor([4]), torch.tensor([3])).tolist() == [1]  # at least one


def test_policy_excludes_the_mask_token():
    logits = torch.tensor([[[0.0, 9.0, math.log(3.0), math.log(4.0)]]])  # token 1 is the mask, and the favourite
    logp = policy_logprobs(logits, mask_id=1)
    torch.testing.assert_close(logp.exp(), torch.tensor([[[1 / 8, 0.0, 3 / 8, 4 / 8]]]))
    logits.requires_grad_()
    policy_logprobs(logits, mask_id=1)[0, 0, 3].backward()  # out of place, and gradients stay finite
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 1] == 0


def test_greedy_tokens_leave_out_the_mask_and_break_ties_to_the_lowest_id():
    logits = torch.tensor([[[0.0, 9.0, 3.0, 4.0],     # the mask (1) is the favourite: the next one, 3
                            [5.0, 2.0, 5.0, 1.0],     # a tie between 0 and 2: the lowest id
                            [1.0, 9.0, 7.0, 7.0],     # the mask first, then a tie: 2
                            [0.0, 1.0, 2.0, 2.5]]])   # no mask involved
    assert greedy_tokens(logits, mask_id=1).tolist() == [[3, 0, 2, 3]]
    assert greedy_tokens(logits.bfloat16(), mask_id=1).tolist() == [[3, 0, 2, 3]]


def test_behaviour_distribution_by_hand():
    """q = softmax(log pi / T) cut to the top-p nucleus; greedy is the point mass on the argmax."""
    logp = torch.log(torch.tensor([[[0.5, 0.25, 0.125, 0.125]]]))
    one, inf = torch.tensor([1.0]), float("inf")
    torch.testing.assert_close(sampling_logprobs(logp, one, one), logp)
    # T = 2: q proportional to sqrt(p)
    sqrt = torch.tensor([0.5, 0.25, 0.125, 0.125]).sqrt()
    torch.testing.assert_close(sampling_logprobs(logp, torch.tensor([2.0]), one).exp()[0, 0], sqrt / sqrt.sum())
    # top_p 0.6: the smallest prefix whose mass reaches 0.6 is {0.5, 0.25}; top_p 0.75 is reached by the
    # same two exactly, so the third token stays out (a tie at the bound closes the nucleus)
    for top_p in (0.6, 0.75):
        q = sampling_logprobs(logp, one, torch.tensor([top_p])).exp()[0, 0]
        torch.testing.assert_close(q, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    q = sampling_logprobs(logp, one, torch.tensor([0.76])).exp()[0, 0]
    torch.testing.assert_close(q, torch.tensor([4 / 7, 2 / 7, 1 / 7, 0.0]))
    # T = 0: a point mass on the argmax, whatever top_p; per row in a batch
    logp3 = torch.cat([logp.flip(-1), logp, logp.flip(-1)])
    q = sampling_logprobs(logp3, torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.9, 1.0]))
    assert q[0, 0].tolist() == [-inf, -inf, -inf, 0.0] and q[1, 0].tolist() == [0.0, -inf, -inf, -inf]
    torch.testing.assert_close(q[2], logp.flip(-1)[0])
    q = sampling_logprobs(logp3, torch.tensor([0.0, 0.0, 1.0]), torch.ones(3))  # no nucleus anywhere
    assert q[0, 0].tolist() == [-inf, -inf, -inf, 0.0] and q[1, 0].tolist() == [0.0, -inf, -inf, -inf]
    q = sampling_logprobs(logp3[:2], torch.zeros(2), torch.ones(2))  # an all-greedy batch
    assert q[0, 0].tolist() == [-inf, -inf, -inf, 0.0] and q[1, 0].tolist() == [0.0, -inf, -inf, -inf]


def test_recorded_logprob_is_the_behaviour_distribution(model):
    """Greedy rows record log q = 0 (a point mass); sampled rows record log q of the token drawn."""
    greedy = run(model, PROMPTS[:2], SamplingParams("eb", 8, threshold=0.5), return_trajectory=True)
    assert (greedy.logprob[greedy.commit_step >= 0] == 0).all()
    hot = run(model, PROMPTS[:2], SamplingParams("eb", 8, threshold=0.5, temperature=1.0, seed=0),
              return_trajectory=True)
    assert (hot.logprob[hot.commit_step >= 0] < 0).all()


# ----------------------------------------------------------------------------- trajectory and stopping

def test_trajectory_logprobs_match_a_replay(model):
    """Rebuild each step's canvas from commit steps; the model must give the recorded log-probs."""
    params = SamplingParams(sampler="eb", gen_length=12, block_length=4, threshold=0.8, temperature=0.8, top_p=0.95,
                            seed=5)
    out = run(model, PROMPTS[:2], params, stop_at_eos=False, return_trajectory=True)
    for i, prompt in enumerate(PROMPTS[:2]):
        steps, seq = out.commit_step[i], out.sequences[i]
        assert (steps >= 0).all() and int(steps.max()) == out.nfe[i] - 1
        for s in range(int(out.nfe[i])):
            canvas = torch.where(steps < s, seq, torch.full_like(seq, MASK))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + canvas.tolist()])).logits[:, len(prompt):]
            logq = sampling_logprobs(logits, torch.tensor([0.8]), torch.tensor([0.95]))[0]
            now = steps == s
            expected = logq[now].gather(-1, seq[now][:, None]).squeeze(-1)
            assert torch.allclose(out.logprob[i][now], expected, atol=1e-5)


class EosAfter(torch.nn.Module):
    """A fake denoiser: confidently predicts token 40 + position until `stop`, EOS from there on."""

    def __init__(self, stop_by_first_token: dict[int, int], vocab: int = 104):
        super().__init__()
        self.stop = stop_by_first_token
        self.vocab = vocab
        self.batch_sizes = []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids=None):
        self.batch_sizes.append(input_ids.shape[0])
        b, l = input_ids.shape
        logits = torch.zeros(b, l, self.vocab)
        for r in range(b):
            first = int(input_ids[r][attention_mask[r]][0])
            plen = [len(p) for p in PROMPTS if p[0] == first][0]
            gen0 = int(attention_mask[r].long().argmax()) + plen
            for j in range(gen0, l):
                k = j - gen0
                logits[r, j, EOS if k >= self.stop[first] else 40 + k] = 10.0
        return type("Out", (), {"logits": logits})()


def test_rows_stop_at_eos_and_leave_the_batch():
    fake = EosAfter({5: 3, 10: 9, 12: 16, 30: 1})
    out = run(fake, PROMPTS, SamplingParams(sampler="steps", gen_length=16, block_length=4, steps=16),
              return_trajectory=True)
    # one token per step, left to right by confidence ties -> a row stops once its EOS is committed
    # with nothing masked before it; the rest is filled with EOS and never scored
    for i, stop in enumerate([3, 9, 16, 1]):
        seq = out.sequences[i].tolist()
        assert seq[:stop] == [40 + k for k in range(stop)]
        assert all(t == EOS for t in seq[stop:])
        assert MASK not in seq
    assert out.nfe.tolist() == [4, 10, 16, 2]
    assert (out.commit_step[0, 4:] == -1).all()
    # forward passes shrink as rows finish: 4 rows, then 3 after step 2, 2 after 4, 1 after 10
    assert fake.batch_sizes == [4, 4, 3, 3, 2, 2, 2, 2, 2, 2] + [1] * 6


@pytest.mark.parametrize("seed", range(4))
def test_no_mask_left_in_output(seed):
    model = tiny_model(seed=seed, init=0.2)
    torch.manual_seed(seed)
    for sampler in ("steps", "confidence", "eb"):
        params = [SamplingParams(sampler=sampler, gen_length=g, block_length=b, temperature=t, seed=seed)
                  for g, b, t in [(16, 4, 1.0), (8, 8, 0.0), (12, 5, 1.5), (5, 2, 0.5)]]
        params = [SamplingParams(**{**p.__dict__, "steps": -(-p.gen_length // p.block_length) * 2})
                  if sampler == "steps" else p for p in params]
        out = run(model, PROMPTS, params)
        assert not (out.sequences == MASK).any()


# ----------------------------------------------------------------------------- state surgery for the server

def test_rows_join_and_leave_between_steps(model):
    """Stepping a concatenated state (rows joining mid-flight) equals decoding each request alone."""
    p1 = SamplingParams(sampler="eb", gen_length=16, block_length=8, threshold=0.5)
    p2 = SamplingParams(sampler="steps", gen_length=8, steps=8)
    state = init_state(PROMPTS[:2], p1, **IDS)
    denoise_step(model, state)
    denoise_step(model, state)
    joined = BatchState.concat([state, init_state(PROMPTS[2:], p2, **IDS)])
    while not joined.finished.all():
        denoise_step(model, joined)
        done = joined.finished.nonzero().squeeze(-1).tolist()
        if 0 in done and joined.batch_size == 4:  # drop a finished row, as the server does
            joined = joined.select([1, 2, 3])
    expected = [run(model, [p], pp) for p, pp in zip(PROMPTS, [p1, p1, p2, p2])]
    for row, exp in zip(range(joined.batch_size), expected[-joined.batch_size:]):
        n = int(joined.gen_length[row])
        assert joined.generated[row, :n].tolist() == exp.sequences[0, :n].tolist()
        assert joined.nfe[row] == exp.nfe[0]


@pytest.mark.parametrize("bad,word", [
    (dict(sampler="fast"), "sampler"), (dict(gen_length=0), "gen_length"), (dict(block_length=-1), "block_length"),
    (dict(gen_length=16, block_length=4, steps=6), "steps"), (dict(threshold=-1.0), "threshold"),
    (dict(threshold=float("nan")), "threshold"), (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
])
def test_invalid_params_are_refused(bad, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**bad).resolved()


def test_saturated_logits_still_make_progress():
    """Probabilities that underflow to 0 must not give NaN entropies (which once stalled `eb`)."""
    model = tiny_model(seed=1, init=3.0)
    for sampler in ("eb", "confidence", "steps"):
        out = run(model, PROMPTS, SamplingParams(sampler=sampler, gen_length=16, block_length=8, threshold=0.001),
                  stop_at_eos=False)
        assert not (out.sequences == MASK).any()
        assert (out.nfe <= 16).all()


# ----------------------------------------------------------------------------- half-precision layout

def test_prompt_layout_left_padded_in_float32_and_aligned_in_half_precision():
    assert prompt_alignment(tiny_model()) == 0
    assert prompt_alignment(tiny_model().to(torch.bfloat16)) == prompt_alignment(tiny_model().half()) == 16
    p = SamplingParams("eb", 4, threshold=0.3)
    tight = init_state([[5, 6, 7], [8] * 18], p, mask_id=MASK, eos_id=EOS, pad_id=PAD)
    assert tight.prompt_width == 18 and tight.canvas[0, 15:18].tolist() == [5, 6, 7]  # left-padded
    aligned = init_state([[5, 6, 7], [8] * 18], p, mask_id=MASK, eos_id=EOS, pad_id=PAD, align=16)
    assert aligned.prompt_width == 32 and aligned.canvas[0, :3].tolist() == [5, 6, 7]  # prompt first
    assert aligned.attention_mask[0].tolist() == [True] * 3 + [False] * 29 + [True] * 4 + [False] * 12
    assert aligned.gen_width == 16  # the generation region is a multiple of 16 wide too
    # positions count real tokens only, so the generation region sits at the same positions either way
    assert aligned.position_ids()[0, 32:36].tolist() == tight.position_ids()[0, 18:].tolist() == [3, 4, 5, 6]
    # dropping the long row trims the prompt region back to one multiple of 16, keeping the layout
    short = aligned.select([0])
    assert short.prompt_width == 16 and short.canvas[0, :3].tolist() == [5, 6, 7]
    assert short.canvas.shape[1] == 16 + 16 and short.generated.tolist() == aligned.generated[:1].tolist()
    # concat pads a narrower region after its prompts, never before
    both = BatchState.concat([short, init_state([[9] * 20], p, mask_id=MASK, eos_id=EOS, pad_id=PAD, align=16)])
    assert both.prompt_width == 32 and both.canvas[0, :3].tolist() == [5, 6, 7]
    assert both.attention_mask[0].tolist() == [True] * 3 + [False] * 29 + [True] * 4 + [False] * 12
    with pytest.raises(ValueError, match="alignments"):
        BatchState.concat([short, tight])


def test_half_precision_greedy_outputs_do_not_depend_on_the_batch():
    """In bfloat16, left padding flips some greedy outputs against the same prompt alone; the aligned
    layout that ``generate`` uses for half-precision models makes every batched row equal its solo decode."""
    model = tiny_model(init=0.1).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(48)]
    p = SamplingParams("eb", 16, threshold=0.3)

    def decode(prompts, align):
        state = init_state(prompts, p, mask_id=MASK, eos_id=EOS, pad_id=PAD, align=align)
        while not bool(state.finished.all()):
            denoise_step(model, state)
        return state.generated[:, :16].tolist(), state.nfe.tolist()

    def dependent(align):
        seqs, nfe = decode(prompts, align)
        return sum(decode([q], align) != ([seqs[i]], [nfe[i]]) for i, q in enumerate(prompts))

    left = dependent(0)
    assert dependent(prompt_alignment(model)) == 0, f"aligned: some rows differ (left-padded: {left} of 48)"
    batched = generate(model, prompts, p, **IDS)
    for i, q in enumerate(prompts):
        assert generate(model, [q], p, **IDS).sequences[0].tolist() == batched.sequences[i].tolist()


# ----------------------------------------------------------------------------- `steps`: LLaDA's own rule

def test_remasking_score_is_the_published_softmax_with_the_mask_in_the_logits_dtype():
    """The `steps` score is LLaDA's: the softmax over every logit, the mask token's too, at the prediction
    (greedy: the largest probability, even the mask's), or at the drawn token; in the logits' own dtype."""
    logits = torch.tensor([[[3.0, 0.0, 2.5], [2.0, 0.0, -10.0], [0.0, 0.0, 5.0]]])  # id 2 is the mask
    exact = torch.softmax(logits.double(), -1)
    greedy = remasking_confidence(logits)
    assert greedy[0].tolist() == pytest.approx([exact[0, 0, 0].item(), exact[0, 1, 0].item(), exact[0, 2, 2].item()], rel=1e-6)
    drawn = remasking_confidence(logits, torch.tensor([[0, 0, 1]]))
    assert drawn[0].tolist() == pytest.approx([exact[0, 0, 0].item(), exact[0, 1, 0].item(), exact[0, 2, 1].item()],
                                              rel=1e-6)
    # with the mask left out (the policy's confidence) position 0 would lead (0.953 > 0.881); LLaDA commits 1
    policy = policy_logprobs(logits, mask_id=2).exp().amax(-1)
    assert policy[0, 0] > policy[0, 1] and greedy[0, 0] < greedy[0, 1]
    one = low_confidence_commits(greedy, torch.tensor([[True, True, False]]), torch.tensor([1]))
    assert one.tolist() == [[False, True, False]]
    # bfloat16 logits: the scores are bfloat16 numbers (8 significant bits), not float32 ones
    half = remasking_confidence(logits.bfloat16())
    assert torch.equal(half, half.bfloat16().double())
    assert half[0].tolist() == pytest.approx(greedy[0].tolist(), rel=2 ** -8)


def test_steps_ties_break_as_topk_over_the_rows_sequence():
    """LLaDA's generate calls torch.topk on a vector as long as the row's sequence (prompt + answer), -inf
    outside the block's masked positions; among equal scores (frequent in bfloat16) topk's choice depends on
    that vector, so the same vector is built. Row 0: prompt of 7, answer of 8, block = answer positions 4-7
    with a three-way tie. Row 1: a narrower block (its last column repeated, not real) beside it."""
    score = torch.tensor([[0.5, 0.25, 0.5, 0.5], [0.1, 0.9, 0.3, 0.7]])
    candidates = torch.tensor([[True, True, True, True], [True, False, True, False]])
    cols = torch.tensor([[4, 5, 6, 7], [0, 1, 2, 2]])
    chosen = low_confidence_commits(score, candidates, torch.tensor([1, 1]), cols, torch.tensor([7, 3]),
                                    torch.tensor([8, 3]))
    vector = torch.full((7 + 8,), float("-inf"))
    vector[7 + 4:] = score[0]
    expected = (torch.topk(vector, 1).indices - 7 - 4).tolist()
    assert chosen[0].nonzero().flatten().tolist() == expected
    # the layout matters here: neither the first tied position nor topk over the block alone
    assert expected != [0] and expected != torch.topk(score[0], 1).indices.tolist()
    # row 1: position 1 (0.9) is no candidate and the repeated column (0.7) is not real: the best real one wins
    assert chosen[1].tolist() == [False, False, True, False]
    # through select_commits with the layout, and two per step
    sel = select_commits(score, torch.zeros_like(score), candidates, torch.tensor([0, 0]), torch.zeros(2),
                         torch.tensor([2, 2]), (cols, torch.tensor([7, 3]), torch.tensor([8, 3])))
    vector_2 = (torch.topk(vector, 2).indices - 7 - 4).sort().values.tolist()
    assert sel[0].nonzero().flatten().tolist() == vector_2 and sel[1].tolist() == [True, False, True, False]


def test_answers_are_infilled_and_a_decode_resumes_from_its_own_state(model):
    """``answers``: given tokens stay, only masked positions are decoded. Masking the tokens a full-step decode
    committed at pass s or later and completing that answer reproduces the decode in exactly the passes it had
    left (leading blocks already full are skipped, not run); a fully given answer takes no pass."""
    sp = SamplingParams("steps", 8, block_length=4)
    full = generate(model, PROMPTS, sp, **IDS, stop_at_eos=False, return_trajectory=True)
    assert full.nfe.tolist() == [8] * len(PROMPTS)
    for s in range(8):
        answers = [[t if c < s else MASK for t, c in zip(seq, steps)]
                   for seq, steps in zip(full.sequences.tolist(), full.commit_step.tolist())]
        out = generate(model, PROMPTS, sp, **IDS, stop_at_eos=False, answers=answers)
        assert torch.equal(out.sequences, full.sequences), s
        assert out.nfe.tolist() == [8 - s] * len(PROMPTS)
    done = generate(model, PROMPTS, sp, **IDS, stop_at_eos=False, answers=full.sequences[:, :8].tolist())
    assert torch.equal(done.sequences, full.sequences) and done.nfe.tolist() == [0] * len(PROMPTS)
    # a token the model would not have chosen stays where it is given
    fixed = [[MASK] * 8 for _ in PROMPTS]
    for row in fixed:
        row[5] = 77
    out = generate(model, PROMPTS, sp, **IDS, stop_at_eos=False, answers=fixed)
    assert out.sequences[:, 5].tolist() == [77] * len(PROMPTS)
    assert not (full.sequences[:, 5] == 77).all()
    with pytest.raises(ValueError, match="gen_length is 8"):
        generate(model, PROMPTS, sp, **IDS, answers=[[MASK] * 7] * len(PROMPTS))
    with pytest.raises(ValueError, match="answers for"):
        generate(model, PROMPTS, sp, **IDS, answers=[[MASK] * 8])


@pytest.mark.parametrize("cache", ["off", "prefix", "dual"])
def test_full_blocks_of_a_given_answer_take_no_pass_wherever_they_stand(model, cache):
    """Blocks of 4 in a 14-token answer (the last block 2 wide), 2 passes per block: a block the answer gives in
    full is skipped after a masked one too, and a row whose masked blocks are done finishes (no pass for the
    given ones after them); the given tokens stay, and rows of different patterns decode together as alone.
    Each row's expected count is 2 passes per block holding a masked position."""
    sp = SamplingParams("steps", 14, block_length=4, steps=8, cache=cache)
    full = generate(model, PROMPTS, SamplingParams("steps", 14, block_length=4, steps=16), **IDS, stop_at_eos=False)
    given = full.sequences[:, :14].tolist()
    blocks = [range(0, 4), range(4, 8), range(8, 12), range(12, 14)]
    patterns = [(0, 2), (1, 3), (0,), (3,)]  # the masked blocks of each row
    answers = [[MASK if any(j in blocks[k] for k in masked) else t for j, t in enumerate(row)]
               for row, masked in zip(given, patterns)]
    out = generate(model, PROMPTS, sp, **IDS, stop_at_eos=False, answers=answers)
    assert out.nfe.tolist() == [2 * len(m) for m in patterns]
    for row, answer in zip(out.sequences.tolist(), answers):
        assert all(t == a for t, a in zip(row, answer) if a != MASK)
        assert MASK not in row[:14]
    for i, answer in enumerate(answers):
        alone = generate(model, [PROMPTS[i]], sp, **IDS, stop_at_eos=False, answers=[answer])
        assert alone.sequences[0, :14].tolist() == out.sequences[i, :14].tolist()


def test_a_pass_that_commits_nothing_raises_instead_of_looping_forever(model, monkeypatch):
    """Every commit rule takes at least one candidate per pass; a rule that takes none (a bug) must stop the
    decode with an error naming the rows, not hang the server's decoder."""
    import diffpo_serve.dllm.sampler.step as sampler_module  # where the step calls it

    real = sampler_module.select_commits
    monkeypatch.setattr(sampler_module, "select_commits", lambda *a, **k: torch.zeros_like(real(*a, **k)))
    with pytest.raises(RuntimeError, match=r"no progress: row\(s\) \[0, 1, 2, 3\]"):
        generate(model, PROMPTS, SamplingParams("confidence", 8, threshold=0.9), **IDS)


def test_first_masked_block_by_hand():
    """The block of each row's first masked position, reading only the row's own answer (row 2's masks past
    its length 5 are padding that happens to hold the mask id), or its number of blocks (a ceiling) when full."""
    M = MASK
    gen = torch.tensor([[11, 12, 13, M, 15, M, 17, 18],   # first mask at 3: block 1 of blocks of 2
                        [11, 12, 13, 14, 15, 16, 17, 18],  # full, 8 long in blocks of 3: 3 blocks
                        [11, 12, 13, 14, 15, M, M, M],     # full within its 5: 2 blocks of 3
                        [M, 12, 13, 14, 15, 16, 17, 18]])  # block 0
    got = first_masked_block(gen, M, torch.tensor([8, 8, 5, 8]), torch.tensor([2, 3, 3, 4]))
    assert got.tolist() == [1, 3, 2, 0]
