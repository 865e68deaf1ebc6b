"""One ``load_model(path)`` for every masked dLLM the project can use.

It loads, from a local directory only (nothing is downloaded):
  (a) the project's own model (``model_type == "diffpo-mdm"``, registered by importing ``model``);
  (b) any transformers masked LM (``AutoModelForMaskedLM``: BERT, ModernBERT, ...);
  (c) LLaDA/Dream-style checkpoints that ship their own modelling code (``trust_remote_code``),
      which register themselves under ``AutoModel`` in their ``auto_map``.
and returns a :class:`LoadedModel` holding the model, its tokenizer and the special ids the sampler
needs. The mask id comes from the argument, else the config's ``mask_token_id``, else the tokenizer's
mask token; a model without one is refused with a clear error. ``load_model(..., compile=True)``
compiles the model's transformer layers with ``torch.compile`` (:func:`compile_layers`).
"""

from __future__ import annotations

import inspect
import json
import os
import types
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

from diffpo_serve.dllm import model as _own_model  # noqa: F401  (registers our config and model)
from diffpo_serve.dllm.step_policy import StepPolicyError, load_policy
from diffpo_serve.dllm.threshold_head import ThresholdHeadError, load_head

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "bundled_model"


class ModelLoadError(RuntimeError):
    """A model directory that cannot be loaded; the message names the path and the problem."""


@dataclass
class WeightlessModel:
    """What :meth:`LoadedModel.without_weights` leaves of a model."""

    config: types.SimpleNamespace
    generation_config: object | None


@dataclass
class LoadedModel:
    """A model ready for the sampler: ``model(input_ids, attention_mask, ...)`` returns ``.logits``."""

    model: torch.nn.Module
    tokenizer: object
    mask_id: int
    pad_id: int
    eos_id: int
    path: str
    name: str
    max_length: int
    threshold_head: torch.nn.Module | None = None  # DiFFPO's learned per-prompt threshold, if the model has one
    compiled: str | None = None  # what torch.compile compiled (compile=True), e.g. "4 Block layers"
    step_policy: torch.nn.Module | None = None  # the learned per-step commit policy (sampler `policy`), if any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def without_weights(self) -> "LoadedModel":
        """A picklable copy for a process that tokenises but never runs the model (the serving front
        with ``--decoder-process``): ``model`` keeps only ``config.vocab_size`` and ``generation_config``."""
        config = getattr(self.model, "config", None)
        stand_in = WeightlessModel(config=types.SimpleNamespace(vocab_size=getattr(config, "vocab_size", None)),
                                   generation_config=getattr(self.model, "generation_config", None))
        return replace(self, model=stand_in)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt or completion, without special tokens (chat templates add them).

        Fast (Rust) tokenizers are called directly: the same ids, without transformers' batch wrapper,
        which also releases and re-takes the GIL (costly while the server's decoding thread runs).
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> tuple[str, bool]:
        """Text of generated ids up to the first EOS, and whether an EOS ended it."""
        ids = [int(i) for i in ids]
        stopped = self.eos_id in ids
        if stopped:
            ids = ids[:ids.index(self.eos_id)]
        ids = [i for i in ids if i not in (self.pad_id, self.mask_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True), stopped


def default_model_path() -> str:
    """The bundled model shipped inside the package (override with ``DIFFPO_MODEL``)."""
    return os.environ.get("DIFFPO_MODEL", str(BUNDLED_MODEL_DIR))


def _read_config(path: Path, trust_remote_code: bool):
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json; not a model directory")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path / 'config.json'}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path / 'config.json'}: not a JSON object (got {type(raw).__name__})")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:  # ValueError, OSError, TypeError, strict-dataclass validation errors, ...
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ModelLoadError(f"{path}: the model ships its own code; pass trust_remote_code=True "
                                 "(CLI: --trust-remote-code) if you trust it") from e
        raise ModelLoadError(f"{path}: cannot read the config: {type(e).__name__}: {e}") from e


def _first_id(*candidates):
    for c in candidates:
        if isinstance(c, (list, tuple)):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return None


def load_model(
    path: str | os.PathLike | None = None,
    *,
    mask_id: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    compile: bool = False,
) -> LoadedModel:
    """Load model, tokenizer and special ids from ``path`` (default: the bundled model).

    ``dtype``: a torch dtype or its name (``"bfloat16"``); None keeps the checkpoint's.
    ``mask_id`` overrides the mask token id found in the config or tokenizer. ``compile``: compile the
    transformer layers and warm them up for inference (:func:`compile_layers`). Raises
    :class:`ModelLoadError` naming the path for a missing directory, unreadable config, missing
    mask token, unreadable or incomplete weights, or a compilation that fails.
    """
    path = Path(path if path is not None else default_model_path()).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: model directory does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a directory; pass the model directory")
    config = _read_config(path, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:  # transformers raises many types here (OSError, ValueError, ...)
        raise ModelLoadError(f"{path}: cannot load the tokenizer: {e}") from e

    auto_map = getattr(config, "auto_map", None) or {}
    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code, output_loading_info=True)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        if "AutoModelForMaskedLM" in auto_map or "AutoModel" not in auto_map:
            model, info = AutoModelForMaskedLM.from_pretrained(path, **kwargs)
        else:  # LLaDA and Dream register their denoiser under AutoModel
            model, info = AutoModel.from_pretrained(path, **kwargs)
    except Exception as e:  # corrupt or missing weights, shape mismatch, unknown architecture
        raise ModelLoadError(f"{path}: cannot load the model weights: {type(e).__name__}: {e}") from e
    # transformers fills weights absent from the checkpoint with random values and only logs it;
    # a denoiser with random layers (or a random MLM head on a base-model checkpoint) is useless
    missing = sorted((info or {}).get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ModelLoadError(f"{path}: cannot load the model weights: {len(missing)} tensor(s) missing "
                             f"from the checkpoint: {shown}")
    model.to(device).eval()

    mask_id = _first_id(mask_id, getattr(config, "mask_token_id", None), tokenizer.mask_token_id)
    if mask_id is None:
        raise ModelLoadError(f"{path}: no mask token: the config has no mask_token_id and the tokenizer "
                             "no mask token; pass mask_id explicitly (CLI: --mask-id)")
    eos_id = _first_id(tokenizer.eos_token_id, getattr(config, "eos_token_id", None), tokenizer.sep_token_id)
    if eos_id is None:
        raise ModelLoadError(f"{path}: no end-of-sequence token in the tokenizer or config")
    pad_id = _first_id(tokenizer.pad_token_id, getattr(config, "pad_token_id", None), eos_id)
    max_length = int(getattr(config, "max_position_embeddings", None) or getattr(config, "max_sequence_length", 0)
                     or tokenizer.model_max_length)
    try:
        head = load_head(path, device=device)
        policy = load_policy(path, device=device)
    except (ThresholdHeadError, StepPolicyError) as e:
        raise ModelLoadError(str(e)) from e
    compiled = None
    if compile:
        try:
            compiled = compile_layers(model, mask_id)
        except Exception as e:  # inductor raises its own types; the first line says what failed
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ModelLoadError(f"{path}: torch.compile failed ({type(e).__name__}: {first}); on a CPU it needs "
                                 "a C++ compiler (g++, or the one named by CXX); without --compile (compile=False) "
                                 "the model runs as it is") from e
    return LoadedModel(model=model, tokenizer=tokenizer, mask_id=mask_id, pad_id=pad_id, eos_id=eos_id,
                       path=str(path), name=path.name, max_length=max_length, threshold_head=head,
                       compiled=compiled, step_policy=policy)


def transformer_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's repeated layers by name: the outermost modules whose class the model lists in
    ``_no_split_modules`` (a listed norm inside a listed block is part of the block)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if type(module).__name__ in names and not any(name.startswith(outer + ".") for outer in layers):
            layers[name] = module
    return layers


def compile_layers(model: torch.nn.Module, mask_id: int, width: int = 16) -> str:
    """Compile the model's repeated transformer layers with ``torch.compile`` (dynamic shapes) and warm
    them up for inference; returns what was compiled, e.g. ``"4 Block layers"``.

    The layers are :func:`transformer_layers`: the modules whose class the model names in
    ``_no_split_modules`` (transformers' record of its layer classes: our ``Block``, LLaDA's
    ``LLaDALlamaBlock``, Dream's ``DreamDecoderLayer``); a model that names none is compiled whole.
    Compiling layer by layer keeps what runs between them (embedding, rotary tables, final norm,
    output projection) as it is, and all layers share one compiled graph per shape class. The warm-up
    runs one pass of two rows and one of a single row (dynamic shapes still specialise batch size 1)
    under ``no_grad``, as the sampler calls the model, so the first requests do not wait for
    compilation.
    """
    layers = transformer_layers(model)
    for module in layers.values() or [model]:
        module.compile(dynamic=True)
    device = next(model.parameters()).device
    with torch.no_grad():
        for rows in (2, 1):
            ids = torch.full((rows, width), mask_id, dtype=torch.long, device=device)
            attention = torch.ones_like(ids, dtype=torch.bool)
            model_logits(model, ids, attention, torch.arange(width, device=device).expand(rows, width))
    counts = Counter(type(m).__name__ for m in layers.values())
    return " + ".join(f"{n} {cls}" for cls, n in counts.items()) + " layers" if layers else "the whole model"


_FORWARD_ARGS: dict[type, frozenset[str]] = {}


def model_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None, *, hidden: bool = False):
    """Logits (b, l, V) of any loaded model; passes only the arguments its ``forward`` accepts.

    With ``hidden=True`` returns ``(logits, last_hidden_state)``, the latter (b, l, d).
    """
    inner = getattr(model, "module", model)  # DistributedDataParallel and similar wrappers
    accepted = _FORWARD_ARGS.get(type(inner))
    if accepted is None:
        params = inspect.signature(inner.forward).parameters
        accepted = frozenset(params) | ({"*"} if any(p.kind == p.VAR_KEYWORD for p in params.values()) else set())
        _FORWARD_ARGS[type(inner)] = accepted
    kwargs = {"attention_mask": attention_mask}
    if position_ids is not None and "position_ids" in accepted:
        kwargs["position_ids"] = position_ids
    if hidden:
        kwargs["output_hidden_states"] = True
    out = model(input_ids=input_ids, **kwargs)
    return (out.logits, out.hidden_states[-1]) if hidden else out.logits
