"""The KV-cache schedule of a masked decode: which rows run the whole canvas at a step and which read stored
keys/values, and the step's logits through either (:func:`step_logits`).

``cache`` (per row; native models, :mod:`diffpo_serve.dllm.kv_cache`). ``off``: every step runs the whole canvas.
``prefix`` (Fast-dLLM, Wu et al. 2025, arXiv 2505.22618): at a block's first step the row runs the whole canvas
and stores every layer's keys/values; its later steps in that block run only the columns from the block's start
to the end and read the stored keys/values of the prompt and finished blocks, which are stale by the tokens
committed since (the approximation). ``dual``: later steps run only the block's columns, reading the stored
keys/values of the masked suffix too. The block's first step is thus exact; a refresh every step
(``cache_refresh=1``) makes the whole decode the uncached one. The state (``BatchState.kv``, ``cache_block``) is
per row, so rows join and leave between steps and a row's output does not depend on its batch. RL rollouts with a
cache record the log-probs of the cached sampler: the distribution actually sampled from. ``policy`` rows (and
rows whose policy features are traced) use the cache too; their ``unchanged`` feature compares with the previous
pass in the same block (0 at a block's first pass), with or without a cache. A policy that reads hidden states
(``basic+hidden``) gets those of the cached forward, as approximate as its logits.
"""

from __future__ import annotations

import torch

from diffpo_serve.dllm.forward import cached_forward, model_logits, supports_kv_cache
from diffpo_serve.dllm.kv_cache import gather_columns
from diffpo_serve.dllm.sampler.params import CacheMode
from diffpo_serve.dllm.sampler.state import BatchState


def query_columns(state: BatchState, rows: torch.Tensor, block_index: torch.Tensor) -> torch.Tensor:
    """The canvas columns a cached forward computes for each row (r, q): with ``dual`` its block
    (``block_index``, r x K), with ``prefix`` everything from its block's start to the canvas end; rows with
    fewer columns than the widest repeat their last one."""
    dual = state.cache[rows] == CacheMode.DUAL
    if bool(dual.all()):
        return block_index
    length, start = state.canvas.shape[1], block_index[:, 0]
    width = max(int(block_index.shape[1]), length - int(start.min()))
    suffix = (start[:, None] + torch.arange(width, device=start.device)).clamp(max=length - 1)
    block = torch.cat([block_index, block_index[:, -1:].expand(-1, width - block_index.shape[1])], 1)
    return torch.where(dual[:, None], block, suffix)


def refreshes(state: BatchState, rows: torch.Tensor) -> torch.Tensor:
    """(r,) bool: the rows whose step runs a full forward (cache off, or a cached row's refresh: the first
    step of its block, and every ``cache_refresh`` steps)."""
    if state.cache is None:
        return torch.ones_like(rows, dtype=torch.bool)
    refresh = (state.cache[rows] == CacheMode.OFF) | (state.cache_block[rows] != state.block[rows])
    if state.cache_refresh:
        refresh |= state.block_step[rows] % state.cache_refresh == 0
    return refresh


def step_logits(model: torch.nn.Module, state: BatchState, rows: torch.Tensor, canvas: torch.Tensor,
                 attention: torch.Tensor, positions: torch.Tensor, index: torch.Tensor,
                 hidden_rows: torch.Tensor | None = None, index_hidden: torch.Tensor | None = None,
                 block_index: torch.Tensor | None = None):
    """Logits (r, k, V) at canvas columns ``index`` (r, k), in the model's dtype, the last hidden state of
    the rows flagged in ``hidden_rows`` (the head's first pass; whole canvas), and with ``index_hidden`` (r,
    bool: the rows that need it) the last hidden state at ``index`` (r, k, d; the step policy's hidden
    features), through the KV cache where rows use one.

    A row with ``cache`` off runs the whole canvas. A cached row refreshes (one full forward that also
    stores its keys/values) at the first step of each block (and every ``cache_refresh`` steps), otherwise
    runs only its query columns (:func:`query_columns` of ``block_index``, r x K', default ``index``: its
    block's columns; ``index`` must lie within them) against its stored
    keys/values; its hidden state at ``index`` is then the cached forward's."""
    want_hidden = hidden_rows is not None
    want_index_hidden = index_hidden is not None and bool(index_hidden.any())
    if state.cache is None or not bool((state.cache[rows] != CacheMode.OFF).any()):
        out = model_logits(model, canvas, attention, positions, hidden=want_hidden or want_index_hidden,
                           logits_index=index)
        if not (want_hidden or want_index_hidden):
            return out, None, None
        logits, h = out
        return (logits, h[hidden_rows] if want_hidden else None,
                gather_columns(h, index) if want_index_hidden else None)
    if not supports_kv_cache(model):
        raise ValueError(f"cache needs a native model ({type(model).__name__} takes no KV cache); use cache 'off'")
    on = state.cache[rows] != CacheMode.OFF
    refresh = refreshes(state, rows)
    logits = hidden = picked = None
    for group, fresh in ((refresh.nonzero().squeeze(-1), True), ((~refresh).nonzero().squeeze(-1), False)):
        if len(group) == 0:
            continue
        args = (canvas[group], attention[group], positions[group])
        if fresh:
            need = want_hidden and bool(hidden_rows[group].any())
            part, h, kv = cached_forward(model, *args, logits_index=index[group], return_kv=bool(on[group].any()),
                                         hidden=need or want_index_hidden)
            at = gather_columns(h, index[group]) if want_index_hidden else None
            stored = group[on[group]]
            if kv is not None and len(stored):
                if state.kv is None:
                    state.kv = kv.empty_like(state.batch_size)
                state.kv.write_rows(rows[stored], kv.select(on[group].nonzero().squeeze(-1)))
                state.cache_block[rows[stored]] = state.block[rows[stored]]
            if need:
                hidden = h[hidden_rows[group]]
        else:
            query = query_columns(state, rows[group], (index if block_index is None else block_index)[group])
            whole = len(group) == state.batch_size  # then rows[group] is every row in order: no copy of the cache
            part, at, _ = cached_forward(model, *args, logits_index=index[group], query_index=query,
                                         kv_cache=state.kv if whole else state.kv.select(rows[group]),
                                         hidden=want_index_hidden)  # its last hidden state is at `index`
        if at is not None:
            if picked is None:
                picked = at.new_zeros((len(rows), *at.shape[1:]))
            picked[group] = at
        if len(group) == len(rows):  # one group: its rows are all the rows, in order (no copy of the logits)
            logits = part
            continue
        if logits is None:
            logits = part.new_empty((len(rows), *part.shape[1:]))
        logits[group] = part
    return logits, hidden, picked
