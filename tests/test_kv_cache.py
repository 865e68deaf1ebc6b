"""The model side of the KV cache (diffpo_serve/dllm/kv_cache.py) for every native family: partial logits,
a cached forward over a fresh cache equals the full forward, padding and positions still honoured, and
KVCache's row/column bookkeeping. Tiny random models built here; nothing is downloaded."""

import pytest
import torch

from conftest import tiny_model
from diffpo_serve.dllm import kv_cache as kv
from diffpo_serve.dllm.families.dream import DreamConfig, DreamModel
from diffpo_serve.dllm.families.llada import LLaDAConfig, LLaDAModelLM


def tiny_llada(seed=0, n_kv_heads=2):
    torch.manual_seed(seed)
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=n_kv_heads, n_layers=2, mlp_hidden_size=48, vocab_size=48,
                      embedding_size=64, block_type="llama", rope=True, layer_norm_type="rms", activation_type="silu",
                      include_bias=False, weight_tying=False, mask_token_id=2, init_std=0.3)
    return LLaDAModelLM(cfg).eval()


def tiny_dream(seed=0):
    torch.manual_seed(seed)
    cfg = DreamConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      mask_token_id=2, pad_token_id=0, initializer_range=0.3)
    return DreamModel(cfg).eval()


FAMILIES = {"own": lambda: tiny_model(), "llada": tiny_llada, "dream": tiny_dream}


def padded_batch(vocab=40):
    """Two rows: one left-padded by 3 and right-padded by 2, one with no padding; ids in [3, vocab)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 14), generator=g)
    attention = torch.ones(2, 14, dtype=torch.bool)
    attention[0, :3] = False
    attention[0, -2:] = False
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    return ids, attention, positions


@pytest.fixture(params=list(FAMILIES), scope="module")
def family(request):
    return FAMILIES[request.param]()


@torch.no_grad()
def test_logits_index_gives_those_columns_logits(family):
    ids, attention, positions = padded_batch()
    full = family(ids, attention_mask=attention, position_ids=positions).logits
    index = torch.tensor([[5, 6, 9], [0, 13, 7]])
    part = family(ids, attention_mask=attention, position_ids=positions, logits_index=index).logits
    assert part.shape == (2, 3, full.shape[-1])
    torch.testing.assert_close(part, kv.gather_columns(full, index), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_return_kv_does_not_change_the_logits_and_covers_every_layer(family):
    ids, attention, positions = padded_batch()
    plain = family(ids, attention_mask=attention, position_ids=positions).logits
    out = family(ids, attention_mask=attention, position_ids=positions, return_kv=True)
    torch.testing.assert_close(out.logits, plain, rtol=1e-5, atol=1e-5)
    cache = out.kv_cache
    assert len(cache.keys) == len(cache.values) == family.config.num_hidden_layers
    assert cache.batch_size == 2 and cache.length == 14


@torch.no_grad()
@pytest.mark.parametrize("query", [[[8, 9, 10, 11], [8, 9, 10, 11]],  # a block, as the dual cache queries
                                   [[6, 7, 8, 9, 10, 11, 12, 13], [4, 5, 6, 7, 8, 9, 10, 11]]])  # a suffix
def test_cached_forward_over_a_fresh_cache_equals_the_full_forward(family, query):
    """Keys/values of the other columns from the cache of the same sequence: the queried columns' logits are
    the full forward's (Dream must also compute the column before each: its logits come from there), and so
    is the last hidden state, given at the same columns as the logits (logits_index's, else the queries';
    the step policy's hidden features read it). The columns asked for are out of order and not the
    queries' first ones, so a hidden state left at the query columns fails."""
    ids, attention, positions = padded_batch()
    full = family(ids, attention_mask=attention, position_ids=positions, return_kv=True, output_hidden_states=True)
    query = torch.tensor(query)
    wanted = query[:, [3, 1, 2]]
    cached = family(ids, attention_mask=attention, position_ids=positions, kv_cache=full.kv_cache,
                    query_index=query, logits_index=wanted, output_hidden_states=True)
    torch.testing.assert_close(cached.logits, kv.gather_columns(full.logits, wanted), rtol=1e-4, atol=1e-5)
    final = full.hidden_states[-1]
    assert final.shape[1] == ids.shape[1]  # a full forward's: every column
    torch.testing.assert_close(cached.hidden_states[-1], kv.gather_columns(final, wanted), rtol=1e-4, atol=1e-5)
    every = family(ids, attention_mask=attention, position_ids=positions, kv_cache=full.kv_cache,
                   query_index=query, output_hidden_states=True)
    real = attention.gather(1, query)  # a padded column's state is no token's: compared at real columns
    torch.testing.assert_close(every.hidden_states[-1][real], kv.gather_columns(final, query)[real], rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(every.logits[real], kv.gather_columns(full.logits, query)[real], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_cached_forward_uses_the_cache_for_the_other_columns(family):
    """A cache from a different sequence changes the queried logits (the cache is really read), and
    changing a token outside the query without refreshing the cache does not (it is not recomputed)."""
    ids, attention, positions = padded_batch()
    cache = family(ids, attention_mask=attention, position_ids=positions, return_kv=True).kv_cache
    query = torch.tensor([[9, 10], [9, 10]])
    base = family(ids, attention_mask=attention, position_ids=positions, kv_cache=cache, query_index=query).logits
    other = ids.clone()
    other[:, 4] = (other[:, 4] + 1 - 3) % 37 + 3  # a different real token at column 4 (outside the query)
    stale = family(other, attention_mask=attention, position_ids=positions, kv_cache=cache, query_index=query).logits
    torch.testing.assert_close(stale, base, rtol=0, atol=0)
    fresh_cache = family(other, attention_mask=attention, position_ids=positions, return_kv=True).kv_cache
    fresh = family(other, attention_mask=attention, position_ids=positions, kv_cache=fresh_cache,
                   query_index=query).logits
    assert (fresh - base).abs().max() > 1e-3


@torch.no_grad()
def test_cached_forward_of_a_padded_row_equals_it_alone(family):
    """Padding and positions are honoured with a cache: row 0 (padded) gives what its 9 real columns give
    alone."""
    ids, attention, positions = padded_batch()
    cache = family(ids, attention_mask=attention, position_ids=positions, return_kv=True).kv_cache
    query = torch.tensor([[7, 8, 9], [7, 8, 9]])
    batched = family(ids, attention_mask=attention, position_ids=positions, kv_cache=cache, query_index=query).logits
    alone_ids = ids[:1, 3:12]
    alone_attention = torch.ones_like(alone_ids, dtype=torch.bool)
    alone_cache = family(alone_ids, attention_mask=alone_attention, return_kv=True).kv_cache
    alone = family(alone_ids, attention_mask=alone_attention, kv_cache=alone_cache,
                   query_index=torch.tensor([[4, 5, 6]])).logits
    torch.testing.assert_close(batched[:1], alone, rtol=1e-4, atol=1e-5)


def test_dream_cached_logit_comes_from_the_real_column_before():
    """Dream's logit at the first queried column comes from the previous *real* column, computed with the
    query even when the column right before is padding (pads between prompt and answer)."""
    model = tiny_dream()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 60, (1, 12), generator=g)
    attention = torch.ones(1, 12, dtype=torch.bool)
    attention[0, 5:8] = False  # prompt 0..4, padding 5..7, answer 8..11
    with torch.no_grad():
        full = model(ids, attention_mask=attention, return_kv=True)
        query = torch.tensor([[8, 9]])
        cached = model(ids, attention_mask=attention, kv_cache=full.kv_cache, query_index=query).logits
        # the logits at column 8 are lm_head of the final hidden state at column 4
        hidden = model(ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(cached, full.logits[:, 8:10], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full.logits[:, 8], model.lm_head(hidden[:, 8]), rtol=1e-5, atol=1e-5)


def test_kv_cache_rows_and_columns():
    keys = tuple(torch.arange(2 * 1 * 4 * 2, dtype=torch.float).view(2, 1, 4, 2) + 100 * i for i in range(2))
    cache = kv.KVCache(keys, tuple(-k for k in keys))
    assert cache.select(torch.tensor([1])).keys[1].tolist() == keys[1][1:].tolist()
    assert cache.columns(torch.tensor([3, 0])).values[0][0, 0].tolist() == [[-6.0, -7.0], [-0.0, -1.0]]
    padded = cache.pad_columns(split=1, left=2, right=1)
    assert padded.length == 7
    assert padded.keys[0][0, 0, :, 0].tolist() == [0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 0.0]
    both = kv.KVCache.concat([cache, cache.select(torch.tensor([0]))])
    assert both.batch_size == 3 and both.keys[0][2].tolist() == keys[0][0].tolist()
    target = cache.empty_like(2)
    target.write_rows(torch.tensor([1]), cache.select(torch.tensor([0])))
    assert target.keys[1][0].abs().sum() == 0 and target.keys[1][1].tolist() == keys[1][0].tolist()
    with pytest.raises(ValueError, match="query_index"):
        kv.locate(torch.tensor([[1, 2]]), torch.tensor([[3]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpadded_attention_computes_each_row_as_if_unpadded(dtype):
    """Each row's real queries over its real keys, exactly as one unmasked SDPA call on that row alone (padding
    left, in the middle, at the end; two rows with as many real keys share a call); zeros at padding queries;
    queries that are not the key columns (a cached step) attend over the real keys too; gradients flow.
    One thread: SDPA itself is batch-invariant in bfloat16, but in float32 on CPU its split over several
    threads can change a short row's rounding with the batch (a property of SDPA, not of the padding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_unpadded_attention(dtype)
    finally:
        torch.set_num_threads(threads)


def _check_unpadded_attention(dtype):
    g = torch.Generator().manual_seed(0)
    b, h, L, d = 4, 2, 11, 8
    q, k, v = (torch.randn(b, h, L, d, generator=g).to(dtype) for _ in range(3))
    real = torch.ones(b, L, dtype=torch.bool)
    real[0, :3] = False  # left padding
    real[1, 4:6] = False  # between a prompt and its answer
    real[2, -2:] = False  # right padding (row 2 has 9 real keys, as row 1)
    out = kv.unpadded_attention(q, k, v, real[:, None, None, :])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for i in range(b):
        cols = real[i].nonzero().squeeze(-1)
        alone = sdpa(q[i:i + 1, :, cols], k[i:i + 1, :, cols], v[i:i + 1, :, cols])[0]
        assert torch.equal(out[i][:, cols], alone), i
        assert not out[i][:, ~real[i]].any()
    # (the masked call the families made before sums the padding's exact zeros in other lanes; whether that
    # changes bfloat16 bits depends on the CPU's SDPA kernel, so it is not asserted here)
    # no padding at all: the plain call
    assert torch.equal(kv.unpadded_attention(q, k, v, torch.ones(b, 1, 1, L, dtype=torch.bool)), sdpa(q, k, v))
    # queries of some columns only (a cached step): over each row's real keys
    part = kv.unpadded_attention(q[:, :, :4], k, v, real[:, None, None, :])
    for i in range(b):
        cols = real[i].nonzero().squeeze(-1)
        assert torch.equal(part[i], sdpa(q[i:i + 1, :, :4], k[i:i + 1, :, cols], v[i:i + 1, :, cols])[0])
    # differentiable: padded keys get no gradient, real ones do
    kg = k.float().requires_grad_()
    kv.unpadded_attention(q.float(), kg, v.float(), real[:, None, None, :]).sum().backward()
    assert not kg.grad[0][:, :3].any() and kg.grad[0][:, 3:].abs().sum() > 0
