"""The sampler's ``logprobs``: each committed token's log-prob under the model at the pass that committed it.

Pinned against an independent replay: before every pass the test runs the model itself on the row alone (its
prompt and its canvas as that pass reads it) and takes ``log_softmax`` of the logits with the mask token removed;
the recorded values of the tokens that pass commits must be those, untouched by the row's temperature or top_p,
and the recorded alternatives that distribution's top tokens in order. A wrong pass (the next or the previous),
a tempered distribution, the mask left in the softmax or a misplaced position all move these values.
"""

import math

import pytest
import torch

from conftest import MASK, EOS, PAD, tiny_model
from diffpo_serve.dllm.decoding import MaskedDecoder
from diffpo_serve.dllm.sampler import BatchState, SamplingParams, denoise_step, init_state
from diffpo_serve.dllm.sampler.params import TOP_LOGPROBS

PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14], [30, 31]]
STEPS = SamplingParams("steps", 12, block_length=4, steps=12, logprobs=True)  # greedy, one token per pass
HOT = SamplingParams("eb", 12, block_length=4, threshold=0.6, temperature=0.7, top_p=0.9, seed=11, logprobs=True)
CONFIDENT = SamplingParams("confidence", 12, block_length=6, threshold=0.3, logprobs=True)


def _state(prompts, params):
    return init_state(prompts, params, mask_id=MASK, eos_id=EOS, pad_id=PAD)


def expected_logprobs(model, prompt: list[int], gen: torch.Tensor) -> torch.Tensor:
    """The replay: log-softmax over the vocabulary without the mask, of the row run alone, (gen_length, V)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + gen.tolist()])).logits[0, len(prompt):].double()
    logits[:, MASK] = float("-inf")
    return torch.log_softmax(logits, -1)


def decode_checking(model, prompts, params) -> tuple[BatchState, int]:
    """Decode ``prompts`` step by step, checking every recording row's commits against the replay; returns the
    final state and how many commits were checked."""
    state = _state(prompts, params)
    checked = 0
    while not bool(state.finished.all()):
        before = state.generated.clone()
        nfe = state.nfe.clone()
        denoise_step(model, state)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not p.logprobs:
                continue
            now = state.commit_step[i] == nfe[i]
            if not bool(now.any()):
                continue
            n = p.gen_length
            logp = expected_logprobs(model, prompt, before[i, :n])
            now = now[:n]
            tokens = state.generated[i, :n][now]
            want = logp[now].gather(-1, tokens[:, None]).squeeze(-1)
            assert torch.allclose(state.model_logprob[i, :n][now].double(), want, atol=2e-5), (i, int(nfe[i]))
            top_values, top_ids = logp[now].topk(TOP_LOGPROBS, -1)
            assert torch.equal(state.top_ids[i, :n][now], top_ids), (i, int(nfe[i]))
            assert torch.allclose(state.top_logprob[i, :n][now].double(), top_values, atol=2e-5)
            checked += int(now.sum())
    return state, checked


def test_greedy_steps_rows_record_the_committing_pass(model):
    """A batch of greedy `steps` rows (the step's lean path, which keeps no distribution of its own)."""
    state, checked = decode_checking(model, PROMPTS, [STEPS] * 3)
    assert checked >= 3 * 4  # every row commits tokens over several passes
    committed = state.commit_step >= 0
    # greedy: the committed token is the most likely one, so its log-prob is the first alternative's
    assert torch.equal(state.model_logprob[committed], state.top_logprob[committed][:, 0])
    assert torch.equal(state.generated[committed], state.top_ids[committed][:, 0])


def test_mixed_rows_record_before_temperature_and_top_p(model):
    """Sampled (T = 0.7, top_p 0.9), thresholded and non-recording rows in one batch; the sampled row's value is
    the model's, not the behaviour distribution's (which the state keeps in ``logprob``)."""
    quiet = SamplingParams("steps", 12, block_length=4, steps=12)
    params = [HOT, CONFIDENT, quiet]
    state, checked = decode_checking(model, PROMPTS, params)
    assert checked > 0
    hot = state.commit_step[0] >= 0
    assert not torch.allclose(state.model_logprob[0][hot], state.logprob[0][hot], atol=1e-3)  # tempered q differs
    assert state.model_logprob[2].isnan().all() and (state.top_ids[2] == -1).all()  # asked for nothing
    assert not (state.top_ids == MASK).any()


def test_recording_changes_no_decode(model):
    """The same tokens, commit steps, behaviour log-probs and passes with and without ``logprobs``."""
    params = [HOT, CONFIDENT, STEPS]
    plain = [SamplingParams(**{**vars(p), "logprobs": False}) for p in params]
    runs = []
    for ps in (params, plain):
        state = _state(PROMPTS, ps)
        while not bool(state.finished.all()):
            denoise_step(model, state)
        runs.append(state)
    a, b = runs
    assert torch.equal(a.canvas, b.canvas) and torch.equal(a.commit_step, b.commit_step)
    assert torch.equal(a.logprob, b.logprob) and torch.equal(a.nfe, b.nfe)


def test_recorded_values_survive_joining_and_leaving_a_batch(model):
    """A recording row decoded beside rows with a wider answer and then alone keeps its values (the columns
    ``concat`` pads and ``select`` trims), equal to decoding it by itself."""
    alone = _state(PROMPTS[:1], [STEPS])
    while not bool(alone.finished.all()):
        denoise_step(model, alone)
    wide = SamplingParams("steps", 20, block_length=4, steps=20)
    state = BatchState.concat([_state(PROMPTS[:1], [STEPS]), _state(PROMPTS[1:], [wide, wide])])
    assert state.gen_width == 20 and state.model_logprob[0, 12:].isnan().all()
    for _ in range(3):
        denoise_step(model, state)
    state = state.select([0])
    while not bool(state.finished.all()):
        denoise_step(model, state)
    assert state.gen_width == 12
    assert torch.allclose(state.model_logprob, alone.model_logprob, atol=1e-5, equal_nan=True)
    assert torch.equal(state.top_ids, alone.top_ids)


def test_a_small_vocabulary_lists_fewer_alternatives_never_the_mask():
    """With 8 tokens (the mask among them) a position has 7 possible tokens: 7 alternatives, then -1 / NaN."""
    small = tiny_model(vocab=8)
    state = _state([[3, 4]], [SamplingParams("steps", 4, steps=4, logprobs=True)])
    while not bool(state.finished.all()):
        denoise_step(small, state)
    committed = state.commit_step[0] >= 0
    ids, values = state.top_ids[0][committed], state.top_logprob[0][committed]
    assert (ids[:, :7] >= 0).all() and (ids[:, 7:] == -1).all() and values[:, 7:].isnan().all()
    assert not (ids == MASK).any()
    # the 7 possible tokens' probabilities sum to one
    assert torch.allclose(values[:, :7].double().exp().sum(-1), torch.ones(len(ids), dtype=torch.double), atol=1e-5)


def test_the_decoder_reports_each_determined_token(model):
    """``MaskedDecoder.token_logprobs``: a TokenLogprob per position of the lengths asked, None for rows that did
    not ask; alternatives without the -1 padding."""
    state = _state(PROMPTS[:2], [STEPS, SamplingParams("steps", 12, block_length=4, steps=12)])
    while not bool(state.finished.all()):
        denoise_step(model, state)
    decoder = MaskedDecoder.__new__(MaskedDecoder)
    got = decoder.token_logprobs(state, torch.tensor([0, 1]), [5, 5])
    assert got[1] is None and len(got[0]) == 5
    for j, entry in enumerate(got[0]):
        assert entry.logprob == pytest.approx(float(state.model_logprob[0, j]))
        assert list(entry.top_ids) == state.top_ids[0, j].tolist()
        assert entry.top_logprobs[0] >= entry.top_logprobs[-1] and math.isfinite(entry.top_logprobs[-1])
