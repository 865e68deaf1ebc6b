"""The model side of a key/value cache and of partial logits, shared by every native family.

A native model's ``forward`` accepts, besides ``input_ids`` / ``attention_mask`` / ``position_ids`` (always
those of the whole sequence, (b, L)):

``logits_index`` (b, k) long   the columns whose logits are returned: ``logits`` is (b, k, V) instead of
                               (b, L, V), so a sampler step materialises logits for the current block only.
``return_kv=True``             ``output.kv_cache`` is a :class:`KVCache` holding every layer's
                               (rotated) keys and values of all L columns.
``kv_cache`` + ``query_index`` (b, q) long: only the listed columns are run through the layers; their
                               queries attend to their own fresh keys/values and to the cached ones of every
                               other column (the key-padding mask of the whole sequence still applies, and
                               position ids are those of the whole sequence, gathered at the columns). Logits
                               and the last of ``hidden_states`` then cover the same columns: ``logits_index``'s,
                               which must be among the queries, or else the query columns (a family whose
                               logit at i comes from another column, as Dream's does, adds that column to the
                               query itself and gives the hidden state the logit at i was computed from).

With a cache computed from the same sequence, the cached forward gives the full forward's logits at the
query columns up to rounding (tested per family): that is what makes a cache exact when refreshed, and
Fast-dLLM's approximation (arXiv 2505.22618) when reused while the sequence changes. This module owns the
mechanism (:class:`KVCache`, :class:`ForwardContext`: the one place that merges fresh keys into cached ones
and runs attention) so the three families call it instead of each keeping a copy, and
:func:`unpadded_attention`, the attention LLaDA and Dream run with or without a cache: padding left out of
the sums, so a padded row computes what the published (unpadded, unmasked) forward computes for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import MaskedLMOutput


@dataclass
class KVCache:
    """Per-layer keys and values of whole sequences: each (b, kv_heads, L, head_dim), RoPE applied."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def map(self, fn) -> "KVCache":
        """A cache with ``fn`` applied to every tensor."""
        return KVCache(tuple(fn(k) for k in self.keys), tuple(fn(v) for v in self.values))

    def select(self, rows: torch.Tensor) -> "KVCache":
        return self.map(lambda t: t[rows])

    def columns(self, cols: torch.Tensor) -> "KVCache":
        return self.map(lambda t: t[:, :, cols])

    def pad_columns(self, split: int, left: int, right: int) -> "KVCache":
        """Insert ``left`` zero columns before column ``split`` and ``right`` at the end (a row's padding
        grows as the batch's canvas does; padded keys are never attended to, so their values are moot)."""
        def pad(t):
            b, h, _, d = t.shape
            return torch.cat([t[:, :, :split], t.new_zeros(b, h, left, d), t[:, :, split:],
                              t.new_zeros(b, h, right, d)], 2)
        return self.map(pad) if left or right else self

    def write_rows(self, rows: torch.Tensor, other: "KVCache") -> None:
        """Overwrite the given rows in place with ``other``'s (same length)."""
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine[rows] = theirs.to(mine.dtype)

    def empty_like(self, batch_size: int) -> "KVCache":
        """A zero cache of ``batch_size`` rows shaped like this one."""
        return self.map(lambda t: t.new_zeros((batch_size, *t.shape[1:])))

    @staticmethod
    def concat(caches: list["KVCache"]) -> "KVCache":
        return KVCache(tuple(torch.cat(ks, 0) for ks in zip(*(c.keys for c in caches))),
                       tuple(torch.cat(vs, 0) for vs in zip(*(c.values for c in caches))))


@dataclass
class DiffusionLMOutput(MaskedLMOutput):
    """A masked LM output with the keys and values of the forward (``return_kv=True``)."""

    kv_cache: KVCache | None = None


def gather_columns(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (b, L, ...) at columns index (b, k) -> (b, k, ...)."""
    shape = index.shape + x.shape[2:]
    return x.gather(1, index.reshape(*index.shape, *[1] * (x.dim() - 2)).expand(shape))


def locate(query_index: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Where each of ``columns`` (b, k) sits in ``query_index`` (b, q): (b, k) positions; a ValueError when a
    column is not among the queries."""
    hits = query_index[:, None, :] == columns[:, :, None]  # b, k, q
    if not bool(hits.any(-1).all()):
        raise ValueError("logits_index asks for columns that are not in query_index")
    return hits.int().argmax(-1)


@dataclass
class ForwardContext:
    """What a forward pass does with keys and values; built by :func:`begin`, handed to every layer."""

    cache: KVCache | None = None
    query_index: torch.Tensor | None = None  # b, q  columns computed (None: all)
    record: bool = False
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
               dropout_p: float = 0.0, unpadded: bool = False) -> torch.Tensor:
        """Bidirectional attention of queries q (b, h, q, d) over the whole sequence's keys: the fresh k, v
        (b, kv_heads, q, d) of the query columns merged into the cached ones of the others; grouped-query
        heads are expanded here. ``key_mask`` (b, 1, 1, L) bool, True = may be attended to. ``unpadded``: run
        it as :func:`unpadded_attention` (else one masked SDPA call)."""
        if self.cache is not None:
            idx = self.query_index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            k = self.cache.keys[layer].to(k.dtype).scatter(2, idx, k)
            v = self.cache.values[layer].to(v.dtype).scatter(2, idx, v)
        if self.record:
            self.keys.append(k)
            self.values.append(v)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` consecutive query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if unpadded:
            return unpadded_attention(q, k, v, key_mask, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)

    def result(self) -> KVCache | None:
        return KVCache(tuple(self.keys), tuple(self.values)) if self.record else None


def unpadded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """Bidirectional attention of q (b, h, q, d) over k, v (b, h, L, d) as if each row's padding were absent.

    ``key_mask`` (b, 1, 1, L) bool, True = a real key. SDPA's kernels sum a query's scores in vector lanes
    and blocks whose grouping depends on where the keys sit, so masked keys change how a row's real ones
    are rounded: in bfloat16 enough to flip greedy decodes against the same row unpadded (which is how
    LLaDA's and Dream's published forwards run a prompt: no padding, no mask). Here each row's real keys
    (and, when q covers all L columns, its real queries) are gathered into contiguous columns and
    attended with no mask, rows with as many real keys in one call: a padded row computes bit for bit what
    SDPA computes for it unpadded. Alone and in a batch agree wherever SDPA is itself batch-invariant: in
    bfloat16 at every shape measured; in float32 on CPU with several threads, short rows (under ~20 tokens)
    can round differently in a batch (SDPA's thread split, padding or not; float32 matrix products do the
    same). Padding query columns get zeros. Without padding this is one plain SDPA call; any other mask (additive, per query) goes to SDPA
    as is.
    """
    if key_mask is None or key_mask.dtype != torch.bool or tuple(key_mask.shape[1:3]) != (1, 1) \
            or bool(key_mask.all()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if key_mask is None or bool(key_mask.all())
                                              else key_mask, dropout_p=dropout_p)
    real = key_mask[:, 0, 0, :].expand(q.shape[0], k.shape[2])  # b, L
    whole = q.shape[2] == k.shape[2]  # queries are the same columns as the keys: gather the real ones too
    counts = real.sum(-1)
    out = q.new_zeros(q.shape)
    for n in counts.unique().tolist():
        if n == 0:
            continue
        rows = (counts == n).nonzero().squeeze(-1)
        cols = real[rows].nonzero()[:, 1].view(len(rows), 1, n, 1)  # each row's real columns, in order

        def at(t):
            return t[rows].gather(2, cols.expand(-1, t.shape[1], -1, t.shape[3]))
        if whole:
            y = F.scaled_dot_product_attention(at(q), at(k), at(v), dropout_p=dropout_p)
            y = q.new_zeros((len(rows), *q.shape[1:])).scatter(2, cols.expand(-1, q.shape[1], -1, q.shape[3]), y)
        else:
            y = F.scaled_dot_product_attention(q[rows], at(k), at(v), dropout_p=dropout_p)
        out = out.index_put((rows,), y)
    return out


def begin(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
          kv_cache: KVCache | None = None, query_index: torch.Tensor | None = None, return_kv: bool = False):
    """Common start of a native forward: ``(context, ids, positions, key_mask)`` where ``ids`` and
    ``positions`` are those of the computed columns (all, or ``query_index``'s) and ``key_mask`` (b, 1, 1, L)
    is the whole sequence's key-padding mask (None without ``attention_mask``). Positions default to
    ``cumsum(mask) - 1`` (or the column index without a mask)."""
    b, l = input_ids.shape
    if position_ids is None:
        if attention_mask is None:
            position_ids = torch.arange(l, device=input_ids.device).expand(b, l)
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if (kv_cache is None) != (query_index is None):
        raise ValueError("kv_cache and query_index go together: the cache supplies the columns not queried")
    if kv_cache is not None:
        if kv_cache.length != l or kv_cache.batch_size != b:
            raise ValueError(f"kv_cache covers {kv_cache.batch_size} x {kv_cache.length} columns; the input is "
                             f"{b} x {l}")
        input_ids, position_ids = input_ids.gather(1, query_index), position_ids.gather(1, query_index)
    key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    return ForwardContext(kv_cache, query_index, return_kv), input_ids, position_ids, key_mask


def logits_rows(final: torch.Tensor, logits_index: torch.Tensor | None, query_index: torch.Tensor | None
                ) -> torch.Tensor:
    """The final hidden states (b, q or L, d) at the columns logits are wanted for."""
    if logits_index is None:
        return final
    return gather_columns(final, logits_index if query_index is None else locate(query_index, logits_index))
