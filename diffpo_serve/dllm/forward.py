"""The model interface: what the decoders, the likelihoods and the loader ask of a model's forward pass.

Every masked dLLM is reached through :func:`model_logits` (and, for a native model's KV cache, :func:`cached_forward`):
the one place that decides which arguments a model takes. The contract is :class:`MaskedDenoiser` (any loaded
masked LM: ``model(input_ids, attention_mask=..., position_ids=..., output_hidden_states=...)`` returns an output
with ``.logits`` (b, l, V), position i's logits being the distribution of token i, and ``.hidden_states[-1]``),
and :class:`NativeDenoiser` (the native families of :mod:`diffpo_serve.dllm.families` and the bundled model):
also ``logits_index`` (logits of some columns only), ``return_kv``, ``kv_cache`` and ``query_index`` (the KV cache
of :mod:`diffpo_serve.dllm.kv_cache`). Which contract a model meets is read from its ``forward``'s parameters
(:func:`supports_kv_cache`); a generic model gets only the arguments its ``forward`` names.

A model that ignores ``attention_mask`` or ``position_ids`` (LLaDA's published remote code does both) would see
padding; :func:`check_padding` probes that once at load time and marks the model, and :func:`model_logits` then
runs it on unpadded rows only (:func:`ignores_padding`).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from diffpo_serve.dllm.kv_cache import gather_columns

log = logging.getLogger(__name__)


class DenoiserOutput(Protocol):
    """What a forward pass returns: ``logits`` (b, l, V) and, when asked, ``hidden_states`` (the last is (b, l, d))."""

    logits: torch.Tensor
    hidden_states: Any


class MaskedDenoiser(Protocol):
    """Any masked LM the sampler runs (generic transformers masked LMs and remote code meet this; a forward that
    names fewer of these arguments is called with those it names)."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, output_hidden_states: bool = False) -> DenoiserOutput: ...


class NativeDenoiser(Protocol):
    """A native family's model: :class:`MaskedDenoiser` plus the KV-cache arguments (:mod:`kv_cache`'s contract);
    its output then also carries ``kv_cache`` (the keys/values, with ``return_kv``)."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, output_hidden_states: bool = False, *,
                 logits_index: torch.Tensor | None = None, kv_cache=None, query_index: torch.Tensor | None = None,
                 return_kv: bool = False) -> DenoiserOutput: ...


IGNORES_PADDING = "_diffpo_ignores_padding"  # attribute set on a model whose output padding would change


def ignores_padding(model: torch.nn.Module) -> bool:
    """Whether :func:`check_padding` found that padding changes this model's output for a row."""
    return bool(getattr(getattr(model, "module", model), IGNORES_PADDING, False))


@torch.no_grad()
def check_padding(model: torch.nn.Module, mask_id: int, path: Path | str = "model") -> bool:
    """Probe once whether padding changes a row's logits (a forward that ignores ``attention_mask`` or takes
    no ``position_ids``, as LLaDA's published code does); if so, mark the model so :func:`model_logits`
    runs it on unpadded rows only, log a warning, and return True.

    The probe: a row of 6 tokens alone, and the same row left-padded by 3 and right-padded by 2 columns
    (attention off, positions following the mask); its logits must agree to rounding (1e-4 of their
    scale in float32, 2e-2 in half precision).
    """
    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    dtype = next(inner.parameters()).dtype
    vocab = int(getattr(getattr(inner, "config", None), "vocab_size", 0) or mask_id + 1)
    row = torch.tensor([[1, 2, 3, mask_id, mask_id, 4]], device=device) % max(vocab, 5)
    padded = torch.cat([torch.full((1, 3), 5 % vocab, device=device), row,
                        torch.full((1, 2), 6 % vocab, device=device)], 1)
    attention = torch.zeros_like(padded, dtype=torch.bool)
    attention[:, 3:9] = True
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    alone = _forward(inner, row, torch.ones_like(row, dtype=torch.bool),
                     torch.arange(6, device=device)[None]).float()
    inside = _forward(inner, padded, attention, positions)[:, 3:9].float()
    tolerance = (1e-4 if dtype == torch.float32 else 2e-2) * (1.0 + float(alone.abs().max()))
    difference = float((alone - inside).abs().max())
    changed = not difference <= tolerance
    setattr(inner, IGNORES_PADDING, changed)
    if changed:
        log.warning("%s: padding changes this model's output (max logit difference %.3g; its forward ignores "
                    "attention_mask or position_ids): each step runs rows of equal length together, unpadded, "
                    "which costs extra forward passes in mixed batches", path, difference)
    return changed


_FORWARD_ARGS: dict[type, frozenset[str]] = {}


def _accepted(inner: torch.nn.Module) -> frozenset[str]:
    """The keyword arguments ``inner.forward`` accepts (``"*"`` when it takes ``**kwargs``)."""
    accepted = _FORWARD_ARGS.get(type(inner))
    if accepted is None:
        params = inspect.signature(inner.forward).parameters
        accepted = frozenset(params) | ({"*"} if any(p.kind == p.VAR_KEYWORD for p in params.values()) else set())
        _FORWARD_ARGS[type(inner)] = accepted
    return accepted


def supports_kv_cache(model: torch.nn.Module) -> bool:
    """Whether the model takes the KV-cache arguments of :mod:`diffpo_serve.dllm.kv_cache` (the native
    families do; generic masked LMs and remote code do not). Wrappers (DDP's ``module``, peft's base model)
    pass the arguments through and are looked inside."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):  # peft: forward(**kwargs) reaches the base model's forward
        inner = inner.get_base_model()
    return {"kv_cache", "query_index", "return_kv", "logits_index"} <= _accepted(inner)


def _forward(inner: torch.nn.Module, input_ids, attention_mask, position_ids, hidden: bool = False,
             model: torch.nn.Module | None = None, logits_index=None):
    """One forward pass of ``model`` (default ``inner``; ``inner`` is the unwrapped module whose signature
    decides which arguments are passed). ``logits_index`` (b, k): only those columns' logits (asked of the
    model when it takes the argument, else cut from the full logits)."""
    accepted = _accepted(inner)
    kwargs = {"attention_mask": attention_mask}
    if position_ids is not None and "position_ids" in accepted:
        kwargs["position_ids"] = position_ids
    native_index = logits_index is not None and "logits_index" in accepted
    if native_index:
        kwargs["logits_index"] = logits_index
    if hidden:
        kwargs["output_hidden_states"] = True
    out = (model if model is not None else inner)(input_ids=input_ids, **kwargs)
    logits = out.logits
    if logits_index is not None and not native_index:
        logits = gather_columns(logits, logits_index)
    return (logits, out.hidden_states[-1]) if hidden else logits


def cached_forward(model: torch.nn.Module, input_ids, attention_mask, position_ids, *, logits_index,
                   kv_cache=None, query_index=None, return_kv: bool = False, hidden: bool = False):
    """A native model's forward with the KV-cache arguments (:mod:`diffpo_serve.dllm.kv_cache`):
    ``(logits at logits_index, last hidden state or None, the keys/values or None)``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_index=logits_index, kv_cache=kv_cache, query_index=query_index, return_kv=return_kv,
                output_hidden_states=hidden)
    return out.logits, (out.hidden_states[-1] if hidden else None), out.kv_cache


def _unpadded(model, inner, input_ids, attention_mask, hidden: bool):
    """Logits (and hidden states) of a padded batch computed without padding: rows with the same number
    of real tokens run together with those tokens only (what each would see alone); padded columns hold 0."""
    attention = attention_mask.bool()
    lengths = attention.sum(-1)
    out_logits = out_hidden = None
    for n in lengths.unique().tolist():
        rows = (lengths == n).nonzero().squeeze(-1)
        keep = attention[rows]
        ids = input_ids[rows][keep].view(len(rows), n)
        result = _forward(inner, ids, torch.ones_like(ids, dtype=torch.bool),
                          torch.arange(n, device=ids.device).expand(len(rows), n), hidden, model)
        logits, h = result if hidden else (result, None)
        if out_logits is None:
            out_logits = logits.new_zeros(*input_ids.shape, logits.shape[-1])
            out_hidden = h.new_zeros(*input_ids.shape, h.shape[-1]) if hidden else None
        placed = torch.zeros_like(attention)
        placed[rows] = keep
        out_logits = out_logits.index_put((placed,), logits.reshape(-1, logits.shape[-1]))
        if hidden:
            out_hidden = out_hidden.index_put((placed,), h.reshape(-1, h.shape[-1]))
    return (out_logits, out_hidden) if hidden else out_logits


def model_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None, *, hidden: bool = False,
                 logits_index: torch.Tensor | None = None):
    """Logits (b, l, V) of any loaded model; passes only the arguments its ``forward`` accepts.

    With ``hidden=True`` returns ``(logits, last_hidden_state)``, the latter (b, l, d). ``logits_index``
    (b, k): the logits of those columns only, (b, k, V); a native model then never materialises the rest.
    A model that :func:`check_padding` marked runs on unpadded rows (:func:`ignores_padding`); the logits
    of padded positions are then 0.
    """
    inner = getattr(model, "module", model)  # DistributedDataParallel and similar wrappers
    if getattr(inner, IGNORES_PADDING, False) and not bool(attention_mask.bool().all()):
        result = _unpadded(model, inner, input_ids, attention_mask, hidden)
        if logits_index is None:
            return result
        logits, h = result if hidden else (result, None)
        logits = gather_columns(logits, logits_index)
        return (logits, h) if hidden else logits
    return _forward(inner, input_ids, attention_mask, position_ids, hidden, model, logits_index)
