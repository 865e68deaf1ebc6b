"""The KV cache in the one sampler (cache off / prefix / dual): exact when refreshed every step, the
block's first step exact and later steps a bounded approximation, batch == alone, rows joining mid-block,
and logits materialised at the current block's masked columns only. Tiny random models; nothing is downloaded."""

from dataclasses import replace

import pytest
import torch

from conftest import EOS, MASK, PAD, tiny_model
from diffpo_serve.dllm.sampler import (BatchState, SamplingParams, block_columns, denoise_step,
                                       generate, init_state, masked_columns, step_logits)
from test_kv_cache import tiny_dream, tiny_llada

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [30]]
IDS = dict(mask_id=MASK, eos_id=EOS, pad_id=PAD)
SAMPLERS = [dict(sampler="steps", steps=8), dict(sampler="confidence", threshold=0.6),
            dict(sampler="eb", threshold=0.5)]


def run(model, prompts, params, **kw):
    return generate(model, prompts, params, **IDS, **kw)


@pytest.mark.parametrize("family", ["own", "llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_no_cache(family, cache):
    """With its keys/values recomputed at every step the cached decode is the uncached one, token for token
    (every strategy, a padded batch, several blocks)."""
    model = {"own": lambda: tiny_model(), "llada": tiny_llada, "dream": tiny_dream}[family]()
    for kind in SAMPLERS:
        params = SamplingParams(gen_length=16, block_length=4, **kind)
        plain = run(model, PROMPTS, params, stop_at_eos=False)
        cached = run(model, PROMPTS, SamplingParams(gen_length=16, block_length=4, cache=cache, **kind),
                     stop_at_eos=False, cache_refresh=1)
        assert cached.sequences.tolist() == plain.sequences.tolist(), kind
        assert cached.nfe.tolist() == plain.nfe.tolist()


@torch.no_grad()
def test_prefix_cache_first_step_exact_later_steps_bounded():
    """The prefix cache is refreshed by a full forward at a block's first step (logits identical to the
    uncached step), then reused: later steps see stale keys/values of the prompt and finished blocks only,
    a small measured logit difference (Fast-dLLM's approximation)."""
    model = tiny_model(init=0.1)
    params = SamplingParams(sampler="steps", gen_length=12, block_length=4, steps=12)  # 4 steps per block
    state = init_state(PROMPTS, SamplingParams(**{**vars(params), "cache": "prefix"}), **IDS)
    first, later = [], []
    while not bool(state.finished.all()):
        rows = (~state.finished).nonzero().squeeze(-1)
        canvas, attention = state.canvas[rows], state.attention_mask[rows]
        positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
        cols, _, _, _ = block_columns(state, rows)
        index = state.prompt_width + cols
        exact = model(canvas, attention_mask=attention, position_ids=positions).logits
        exact = exact.gather(1, index[..., None].expand(-1, -1, exact.shape[-1]))
        step = state.block_step[rows].clone()
        cached = step_logits(model, state, rows, canvas, attention, positions, index)[0]
        difference = (cached - exact).abs().amax((1, 2)) / exact.abs().amax((1, 2))  # relative to the scale
        first += difference[step == 0].tolist()
        later += difference[step > 0].tolist()
        denoise_step(model, state)
    assert len(first) == 4 * 3 and len(later) == 4 * 3 * 3
    assert max(first) == 0.0
    # measured on this random model (logits of scale 1.4-2.3): at most 0.54 of the scale; a random tiny model's
    # attention moves a lot when a token is committed (a trained one's far less: see docs/benchmarks.md)
    assert 0 < max(later) < 0.75, max(later)


@pytest.mark.parametrize("family", ["own", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_greedy_batch_equals_alone_with_the_cache(family, cache):
    model = {"own": lambda: tiny_model(), "dream": tiny_dream}[family]()
    params = [SamplingParams(sampler="steps", gen_length=8, block_length=4, steps=4, cache=cache),
              SamplingParams(sampler="eb", gen_length=16, block_length=4, threshold=0.3, cache=cache),
              SamplingParams(sampler="confidence", gen_length=12, block_length=6, threshold=0.7, cache=cache),
              SamplingParams(sampler="eb", gen_length=16, block_length=8, threshold=1.0, cache="off")]
    batched = run(model, PROMPTS, params)
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        alone = run(model, [prompt], p)
        n = p.gen_length
        assert batched.sequences[i, :n].tolist() == alone.sequences[0, :n].tolist(), i
        assert batched.nfe[i] == alone.nfe[0]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_rows_join_mid_block_and_leave_with_the_cache(model, cache):
    """Rows joining a cached batch mid-block (concat pads the stored keys/values with the canvas) and rows
    leaving (select) decode as each does alone with offline generate."""
    p1 = SamplingParams(sampler="eb", gen_length=16, block_length=8, threshold=0.5, cache=cache)
    p2 = SamplingParams(sampler="steps", gen_length=8, block_length=4, steps=4, cache=cache)
    state = init_state(PROMPTS[:2], p1, **IDS)
    denoise_step(model, state)
    assert state.kv is not None and state.cache_block.tolist() == [0, 0]
    denoise_step(model, state)
    joined = BatchState.concat([state, init_state(PROMPTS[2:], p2, **IDS)])  # longer prompts: more left padding
    assert joined.kv.length == joined.canvas.shape[1]
    while not joined.finished.all():
        denoise_step(model, joined)
        done = joined.finished.nonzero().squeeze(-1).tolist()
        if 0 in done and joined.batch_size == 4:
            joined = joined.select([1, 2, 3])
            assert joined.kv.batch_size == 3 and joined.kv.length == joined.canvas.shape[1]
    expected = [run(model, [p], pp) for p, pp in zip(PROMPTS, [p1, p1, p2, p2])]
    for row, exp in zip(range(joined.batch_size), expected[-joined.batch_size:]):
        n = int(joined.gen_length[row])
        assert joined.generated[row, :n].tolist() == exp.sequences[0, :n].tolist()
        assert joined.nfe[row] == exp.nfe[0]


def test_step_materialises_logits_at_the_blocks_masked_columns_only(model, monkeypatch):
    """The model is asked for the current block's still-masked columns only (gen 16, block 4, 2 tokens per
    pass: 4 then 2 of 16 + prompt in each block); a row whose step-policy features are traced reads its
    whole block (4 every pass) and nothing past it."""
    seen = []
    real = model.forward

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append(out.logits.shape[1])
        return out

    monkeypatch.setattr(model, "forward", spy)
    params = SamplingParams(sampler="steps", gen_length=16, block_length=4, steps=8)
    run(model, PROMPTS[:2], params, stop_at_eos=False)
    assert seen == [4, 2] * 4
    seen.clear()
    run(model, PROMPTS[:2], params, stop_at_eos=False, trace_features=True)
    assert seen == [4] * 8  # the whole block, every pass


def test_masked_columns_by_hand():
    gen = torch.tensor([[MASK, 7, MASK, MASK, 9, 9],
                        [3, 4, MASK, 5, 9, 9],
                        [MASK, MASK, 1, 2, 9, 9]])
    cols = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]])
    real = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]])  # row 2: a block of 3 (col 3 a repeat)
    keep = torch.tensor([False, False, True])
    picked, kept = masked_columns(gen, cols, real, MASK, keep)
    assert picked.tolist() == [[0, 2, 3], [2, 2, 2], [0, 1, 2]]
    assert kept.tolist() == [[True, True, True], [True, False, False], [True, True, True]]


def test_cache_refused_for_a_model_without_one():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="cache"):
        run(Plain(), PROMPTS[:1], SamplingParams(cache="prefix"))
    with pytest.raises(ValueError, match="cache must be one of"):
        SamplingParams(cache="full").resolved()


# ----------------------------------------------------------------------------- the knob in the server

def test_batcher_rows_joining_mid_block_with_the_cache_decode_as_generate():
    """Through the server's batcher: cached requests arriving between steps (mid-block of others) decode
    as offline generate does, with mixed cache modes in one batch."""
    import asyncio

    from diffpo_serve.batcher import Batcher, RowRequest, RowUpdate
    from diffpo_serve.dllm.loading import LoadedModel
    from diffpo_serve.dllm.tokenizer import build_tokenizer

    model = tiny_model()
    loaded = LoadedModel(model=model, tokenizer=build_tokenizer(), mask_id=MASK, pad_id=PAD, eos_id=EOS,
                         path="<memory>", name="tiny", max_length=512, kv_cache=True)
    requests = [
        [RowRequest([5, 6, 7], SamplingParams(sampler="eb", gen_length=16, block_length=8, threshold=0.5,
                                              cache="prefix"))],
        [RowRequest([10, 11, 12, 13, 14, 15], SamplingParams(sampler="steps", gen_length=8, block_length=4, steps=8,
                                                             cache="dual"))],
        [RowRequest([30], SamplingParams(sampler="confidence", gen_length=12, block_length=4, threshold=0.7,
                                         cache="off"))],
    ]

    async def main():
        batcher = Batcher(loaded, max_batch_size=3)
        handles = []
        for step in range(60):
            if step in (0, 2, 3):
                handles.append(batcher.submit(requests[len(handles)]))
            batcher.run_once()
        for _ in range(3):
            await asyncio.sleep(0)
        finals = []
        for h in handles:
            events = []
            while not h.events.empty():
                events.append(h.events.get_nowait())
            finals.append([e for e in events if isinstance(e, RowUpdate) and e.finished][-1])
        return finals

    for (row,), final in zip(requests, asyncio.run(main())):
        alone = generate(model, [row.prompt], row.params, **IDS)
        assert final.ids == alone.sequences[0, :row.params.gen_length].tolist()
        assert final.nfe == int(alone.nfe[0])


def test_engine_takes_the_cache_extra_and_reports_the_default():
    from diffpo_serve.batcher import Batcher
    from diffpo_serve.dllm.loading import LoadedModel
    from diffpo_serve.dllm.tokenizer import build_tokenizer
    from diffpo_serve.engine import Engine
    from diffpo_serve.protocol import APIError, CompletionRequest
    from diffpo_serve.settings import ServerSettings

    def engine(kv_cache, **settings):
        loaded = LoadedModel(model=tiny_model(), tokenizer=build_tokenizer(), mask_id=MASK, pad_id=PAD, eos_id=EOS,
                             path="<memory>", name="tiny", max_length=512, kv_cache=kv_cache)
        return Engine(loaded, Batcher(loaded), ServerSettings(**settings))

    e = engine(True, cache="dual")
    card = e.models().model_dump()["data"][0]
    assert card["cache"] == "dual" and card["cache_modes"] == ["off", "prefix", "dual"]
    request = CompletionRequest(model="tiny", prompt="x", max_tokens=4)
    assert e._sampling_params(request, 4, "max_tokens").cache == "dual"  # the server's default
    request = CompletionRequest(model="tiny", prompt="x", max_tokens=4, cache="prefix")
    assert e._sampling_params(request, 4, "max_tokens").cache == "prefix"  # the request's own
    plain = engine(False)
    assert plain.models().model_dump()["data"][0]["cache_modes"] == ["off"]
    with pytest.raises(APIError, match="native KV cache") as err:
        plain._sampling_params(request, 4, "max_tokens")
    assert err.value.status == 400
    with pytest.raises(ValueError, match="cache must be one of"):
        ServerSettings(cache="full").validated()


def test_cli_flags_carry_the_cache():
    import argparse

    from diffpo_serve.cli import parse_settings
    from training.config import EvalConfig, RLConfig, add_arguments, from_args

    assert parse_settings(["--cache", "prefix"], environ={}).cache == "prefix"
    for cls in (EvalConfig, RLConfig):
        parser = argparse.ArgumentParser()
        add_arguments(parser, cls)
        assert from_args(cls, parser.parse_args(["--cache", "dual"])).cache == "dual"
        assert from_args(cls, parser.parse_args([])).cache == "off"


def test_lora_wrapped_native_model_decodes_with_the_cache():
    """RL rollouts run the peft-wrapped model: it still takes the cache (refreshed every step: exact)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llada()
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    params = dict(sampler="steps", gen_length=8, block_length=4, steps=8)
    plain = run(wrapped, PROMPTS[:2], SamplingParams(**params), stop_at_eos=False)
    cached = run(wrapped, PROMPTS[:2], SamplingParams(**params, cache="dual"), stop_at_eos=False, cache_refresh=1)
    assert cached.sequences.tolist() == plain.sequences.tolist()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_learned_rows_with_the_cache(cache):
    """`learned` rows read the head's features from a full first pass (which also fills their cache), next to
    cached rows already mid-decode: the head's features and choices equal the uncached decode's, and with
    refreshes every step so do the tokens; without, the row still equals itself alone."""
    from diffpo_serve.dllm.threshold_head import ThresholdHead

    model = tiny_model()
    torch.manual_seed(0)
    head = ThresholdHead(model.config.hidden_size, features="prompt+answer+eb")
    params = [SamplingParams(sampler="learned", gen_length=12, block_length=4, cache=cache),
              SamplingParams(sampler="eb", gen_length=16, block_length=4, threshold=0.5, cache=cache)]
    plain = run(model, PROMPTS[:2], [replace(p, cache="off") for p in params], head=head)
    exact = run(model, PROMPTS[:2], params, head=head, cache_refresh=1)
    assert exact.sequences.tolist() == plain.sequences.tolist()
    torch.testing.assert_close(exact.head_features, plain.head_features)
    assert exact.threshold_choice.tolist() == plain.threshold_choice.tolist()
    batched = run(model, PROMPTS[:2], params, head=head)
    alone = run(model, PROMPTS[:1], params[0], head=head)
    assert batched.sequences[0, :12].tolist() == alone.sequences[0, :12].tolist()
    torch.testing.assert_close(batched.head_features[:1], plain.head_features[:1])


def spread_policy(model, features: str, seed: int = 2):
    """A random step policy (``basic`` or ``basic+hidden`` features) whose decisions depend on its inputs."""
    from diffpo_serve.dllm.step_policy import StepPolicy

    torch.manual_seed(seed)
    policy = StepPolicy(model.config.hidden_size, features=features)
    with torch.no_grad():
        for m in policy.net:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(4.0)
    return policy.eval()


@pytest.mark.parametrize("family", ["own", "llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("features", ["basic", "basic+hidden"])
def test_policy_rows_with_the_cache(family, cache, features):
    """Step-policy rows decode with the cache, with basic and with hidden-state features: greedy and sampled
    commits, refreshed every step, equal the uncached decode (tokens, passes, the decisions' log-prob, the
    trace's features, hidden states included); without refreshes a policy row next to an `eb` row in the batch
    equals itself alone. The last row commits one token per pass (knob above 1), so its blocks' later passes
    run from the cache and read the argmax after the block (with `dual` those columns are queried too)."""
    model = {"own": lambda: tiny_model(), "llada": tiny_llada, "dream": tiny_dream}[family]()
    policy = spread_policy(model, features)
    params = [SamplingParams("policy", gen_length=12, block_length=4, threshold=0.5, seed=3, cache=cache),
              SamplingParams("eb", gen_length=16, block_length=4, threshold=0.5, seed=4, cache=cache),
              SamplingParams("policy", gen_length=8, block_length=8, threshold=0.7, seed=5, cache=cache),
              SamplingParams("policy", gen_length=12, block_length=4, threshold=1.01, seed=6, cache=cache)]
    for sample in (False, True):
        kw = dict(policy=policy, sample_commits=sample, return_trajectory=True, stop_at_eos=False)
        plain = run(model, PROMPTS, [replace(p, cache="off") for p in params], **kw)
        exact = run(model, PROMPTS, params, cache_refresh=1, **kw)
        assert exact.sequences.tolist() == plain.sequences.tolist()
        assert exact.nfe.tolist() == plain.nfe.tolist()
        torch.testing.assert_close(exact.policy_logprob, plain.policy_logprob)
        torch.testing.assert_close(exact.policy_trace.features, plain.policy_trace.features, rtol=1e-4, atol=1e-5)
        assert exact.policy_trace.decisions.tolist() == plain.policy_trace.decisions.tolist()
    batched = run(model, PROMPTS, params, policy=policy, stop_at_eos=False)
    assert int(batched.nfe[3]) == 12  # one token per pass: 3 of every 4 passes read the cache
    for i in (0, 2, 3):
        alone = run(model, [PROMPTS[i]], params[i], policy=policy, stop_at_eos=False)
        n = params[i].gen_length
        assert batched.sequences[i, :n].tolist() == alone.sequences[0, :n].tolist()
        assert batched.nfe[i] == alone.nfe[0]
        assert float(batched.policy_logprob[i]) == pytest.approx(float(alone.policy_logprob[0]), rel=1e-5, abs=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_hidden_state_features_of_a_cached_step_are_the_cached_forward_s(cache):
    """A later step of a block reads the hidden states of the cached forward (stale keys/values of the other
    columns), not a full forward's: the traced hidden features equal the model's final hidden state computed
    against the cache stored at the block's first step, and differ from the full forward's."""
    model = tiny_model(init=0.1)
    policy = spread_policy(model, "basic+hidden")
    params = SamplingParams("policy", gen_length=8, block_length=4, threshold=1.01, cache=cache)  # 1 per pass
    state = init_state(PROMPTS[:1], params, **IDS, policy=policy, trace_features=True)
    denoise_step(model, state)  # the block's first step: a refresh
    kv_cache = state.kv.select(torch.tensor([0]))
    canvas, attention = state.canvas.clone(), state.attention_mask.clone()
    out = denoise_step(model, state)  # a later step: from the cache
    pw, d = state.prompt_width, model.config.hidden_size
    cols = out.candidates[0].nonzero().squeeze(-1)  # the block's masked columns at that step
    assert len(cols) == 3
    traced = out.features[0, cols, -d:]
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    width = 8 if cache == "prefix" else 4
    query = (pw + torch.arange(width))[None]
    cached = model(canvas, attention_mask=attention, position_ids=positions, kv_cache=kv_cache, query_index=query,
                   logits_index=(pw + cols)[None], output_hidden_states=True).hidden_states[-1][0]
    full = model(canvas, attention_mask=attention, position_ids=positions, output_hidden_states=True
                 ).hidden_states[-1][0, pw + cols]
    torch.testing.assert_close(traced, cached, rtol=1e-4, atol=1e-5)
    assert float((traced - full).abs().max()) > 1e-3


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_unchanged_feature_with_the_cache_compares_within_the_block(cache):
    """One token per pass, two blocks of 4, with either cache: no pass of block 0 runs block 1's columns (argmax
    -1 in the trace), so at block 1's first pass (pass 4) `unchanged` is 0 on every candidate, and at its second
    it compares with its first."""
    from diffpo_serve.dllm.step_policy import FEATURE_NAMES

    model = tiny_model(init=0.1)
    policy = spread_policy(model, "basic")
    out = run(model, PROMPTS[:1], SamplingParams("policy", gen_length=8, block_length=4, threshold=1.01,
                                                cache=cache), policy=policy, return_trajectory=True,
              stop_at_eos=False)
    trace, unchanged = out.policy_trace, FEATURE_NAMES.index("unchanged")
    assert out.nfe.tolist() == [8]
    assert (trace.argmax[0, :4, 4:] == -1).all() and (trace.argmax[0, 4:, :4] == -1).all()
    assert trace.candidates[0, 4, 4:].all()
    assert trace.features[0, 4, :, unchanged].tolist() == [0.0] * 8
    candidates = trace.candidates[0, 5]
    expected = ((trace.argmax[0, 5] == trace.argmax[0, 4]) & candidates).float()
    assert trace.features[0, 5, :, unchanged].tolist() == expected.tolist()


def test_engine_serves_a_step_policy_with_the_cache():
    """The server takes `cache` with sampler `policy` whatever features the model's policy reads."""
    from diffpo_serve.batcher import Batcher
    from diffpo_serve.dllm.loading import LoadedModel
    from diffpo_serve.dllm.step_policy import StepPolicy
    from diffpo_serve.dllm.tokenizer import build_tokenizer
    from diffpo_serve.engine import Engine
    from diffpo_serve.protocol import CompletionRequest
    from diffpo_serve.settings import ServerSettings

    model = tiny_model()

    def engine(policy):
        loaded = LoadedModel(model=model, tokenizer=build_tokenizer(), mask_id=MASK, pad_id=PAD, eos_id=EOS,
                             path="<memory>", name="tiny", max_length=512, kv_cache=True, step_policy=policy)
        return Engine(loaded, Batcher(loaded), ServerSettings())

    for cache in ("off", "prefix", "dual"):
        request = CompletionRequest(model="tiny", prompt="x", max_tokens=4, sampler="policy", cache=cache)
        for policy in (StepPolicy(), StepPolicy(model.config.hidden_size, features="basic+hidden")):
            params = engine(policy)._sampling_params(request, 4, "max_tokens")
            assert (params.sampler, params.cache) == ("policy", cache)


def test_hidden_state_policy_rows_without_a_cache_batch_with_cached_rows(model):
    """What the server's batcher does: a basic+hidden policy row (cache off) in one batch with cached `eb`
    rows (one still mid-block when the policy row joins) decodes as it does alone, hidden features included."""
    from diffpo_serve.dllm.step_policy import StepPolicy

    torch.manual_seed(0)
    policy = StepPolicy(model.config.hidden_size, features="basic+hidden", threshold=0.5)
    eb = SamplingParams("eb", gen_length=16, block_length=4, threshold=0.5, cache="dual")
    pol = SamplingParams("policy", gen_length=12, block_length=4)
    mixed = run(model, PROMPTS[:2], [eb, pol], policy=policy)
    alone = run(model, PROMPTS[1:2], pol, policy=policy)
    assert mixed.sequences[1, :12].tolist() == alone.sequences[0, :12].tolist()
    assert float(mixed.policy_logprob[1]) == pytest.approx(float(alone.policy_logprob[0]), abs=1e-4)
    state = init_state(PROMPTS[:1], eb, **IDS, policy=policy)
    denoise_step(model, state)  # the eb row's cache is filled; its next step reads it
    state = BatchState.concat([state, init_state(PROMPTS[1:2], pol, **IDS, policy=policy)])
    while not bool(state.finished.all()):
        denoise_step(model, state)
    assert state.generated[1, :12].tolist() == alone.sequences[0, :12].tolist()
    assert float(state.policy_logprob[1]) == pytest.approx(float(alone.policy_logprob[0]), abs=1e-4)


def test_query_columns_by_value():
    """A cached step computes, per row, its block (dual) or its block's start to the canvas end (prefix), the
    batch as wide as its widest row and narrower rows repeating their last column: no more columns than that
    (a wider query would give the same logits at a higher cost, which no output test sees)."""
    from diffpo_serve.dllm.sampler.cache import query_columns
    state = BatchState.concat([init_state(PROMPTS[:1], SamplingParams(gen_length=16, block_length=4, cache=c), **IDS)
                               for c in ("prefix", "prefix", "dual")])
    pw, length = state.prompt_width, state.canvas.shape[1]
    assert (pw, length) == (5, 21)
    state.block[:] = torch.tensor([2, 1, 1])  # generation columns 8-11, 4-7, 4-7
    rows = torch.arange(3)
    cols, _, _, _ = block_columns(state, rows)
    got = query_columns(state, rows, pw + cols)
    # prefix rows from their block's start (canvas 13 and 9) to column 20; the widest, 12 columns, sets the
    # width and the first row repeats column 20; the dual row its block, then its last column repeated
    assert got.tolist() == [list(range(13, 21)) + [20] * 4, list(range(9, 21)), [9, 10, 11, 12] + [12] * 8]
    only_dual = state.select(torch.tensor([2]))
    assert query_columns(only_dual, torch.arange(1), pw + block_columns(only_dual, torch.arange(1))[0]).tolist() \
        == [[9, 10, 11, 12]]


def test_a_row_with_the_cache_off_stores_nothing_beside_cached_rows():
    """In a batch mixing cache off and prefix, only the cached row records the block its keys/values are from;
    the uncached row keeps -1 (it never reads a cache, so storing one would be wasted work and memory)."""
    model = tiny_model()
    state = BatchState.concat([init_state(PROMPTS[i:i + 1], SamplingParams(gen_length=8, block_length=4,
                                                                           sampler="steps", steps=8, cache=c), **IDS)
                               for i, c in enumerate(("off", "prefix"))])
    denoise_step(model, state)
    assert state.cache_block.tolist() == [-1, 0]
