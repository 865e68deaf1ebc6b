"""One ``load_model(path)`` for every masked dLLM the project can use.

It loads, from a local directory only (nothing is downloaded), in this order:
  (a) a native family (:mod:`diffpo_serve.dllm.families`): the config's ``model_type`` names one of our
      modules (the project's own ``"diffpo-mdm"``, LLaDA's ``"llada"``, Dream's ``"Dream"``), which builds
      the model from its own classes and the checkpoint's own safetensors (one file, or shards with
      ``model.safetensors.index.json``), never with ``trust_remote_code``, even where the published
      ``config.json`` carries an ``auto_map`` (DiffusionGemma, which transformers ships,
      loads with its own class, the family's ``MODEL_CLASS``; it decodes a random-token canvas,
      ``LoadedModel.paradigm == "canvas"``, with :mod:`diffpo_serve.dllm.canvas`);
  (b) any transformers masked LM (``AutoModelForMaskedLM``: BERT, ModernBERT, ...);
  (c) other checkpoints that ship their own modelling code (``trust_remote_code``), which register
      themselves under ``AutoModel`` in their ``auto_map``. Such a model may ignore ``attention_mask``
      or ``position_ids`` (LLaDA's published code does both): the loader probes that once, warns, and
      marks the model so :func:`~diffpo_serve.dllm.forward.model_logits` runs it on unpadded rows only
      (:mod:`diffpo_serve.dllm.forward`).
and returns a :class:`LoadedModel` holding the model, its tokenizer and the special ids the sampler
needs: ``mask_id``, ``pad_id`` and every end-of-sequence id (``eos_ids``; ``eos_id`` is the first, the one
a finished row is filled with). Each comes from the ``load_model`` argument, else the family's
``special_ids`` hook, else the generic sources: the mask from the config's ``mask_token_id`` or the
tokenizer's mask token (a model without one is refused with a clear error); EOS ids from
``generation_config.json``'s ``eos_token_id`` (an id or a list), the config's and the tokenizer's, in that
order; pad from the tokenizer, the config, the generation config, else the first EOS.
``load_model(..., compile=True)`` compiles the model's transformer layers with ``torch.compile``
(:func:`compile_layers`).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import types
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

from diffpo_serve.dllm import model as _own_model  # noqa: F401  (registers our config and model)
from diffpo_serve.dllm.families import FAMILY_MODULES
from diffpo_serve.dllm.forward import check_padding, model_logits, supports_kv_cache
from diffpo_serve.dllm.model_card import CardInfo, ModelCardError, read_card
from diffpo_serve.dllm.step_policy import StepPolicyError, load_policy
from diffpo_serve.dllm.threshold_head import ThresholdHeadError, load_head

log = logging.getLogger(__name__)

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
    card: CardInfo = CardInfo()  # the model card's description and example prompts (model_card.py)
    step_policy: torch.nn.Module | None = None  # the learned per-step commit policy (sampler `policy`), if any
    eos_ids: tuple[int, ...] = ()  # every id that ends a row; eos_id first (empty: just eos_id)
    kv_cache: bool = False  # the model takes the KV-cache arguments (supports_kv_cache): sampler `cache` works
    paradigm: str = "masked"  # how it decodes: "masked" (the sampler) or "canvas" (canvas.py; mask_id is then -1)
    # the checkpoint's generation_config.json as written ({} without one): a masked model has no transformers
    # generation config (it cannot generate), so its decoding defaults are read here (paradigms.masked_defaults)
    generation: dict = field(default_factory=dict)

    def __post_init__(self):
        self.eos_ids = tuple(dict.fromkeys([int(self.eos_id), *(int(i) for i in self.eos_ids)]))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def without_weights(self) -> "LoadedModel":
        """A picklable copy for a process that tokenises but never runs the model (the serving front
        with ``--decoder-process``): ``model`` keeps only ``generation_config`` and, of its config,
        ``vocab_size`` (the text config's, where the config nests one), ``model_type``, and a canvas
        model's ``canvas_length`` and ``image_token_id`` (None otherwise)."""
        config = getattr(self.model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        stand_in = WeightlessModel(config=types.SimpleNamespace(vocab_size=getattr(text, "vocab_size", None),
                                                                model_type=getattr(config, "model_type", None),
                                                                canvas_length=getattr(config, "canvas_length", None),
                                                                image_token_id=getattr(config, "image_token_id", None)),
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

    def eos_index(self, ids) -> int | None:
        """Index of the first end-of-sequence id (any of ``eos_ids``) in ``ids``, or None."""
        return next((k for k, i in enumerate(ids) if int(i) in self.eos_ids), None)

    def decode(self, ids) -> tuple[str, bool]:
        """Text of generated ids up to the first EOS (any of ``eos_ids``), and whether an EOS ended it."""
        ids = [int(i) for i in ids]
        end = self.eos_index(ids)
        if end is not None:
            ids = ids[:end]
        ids = [i for i in ids if i not in (self.pad_id, self.mask_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True), end is not None


def default_model_path() -> str:
    """The bundled model shipped inside the package (override with ``DIFFPO_MODEL``)."""
    return os.environ.get("DIFFPO_MODEL", str(BUNDLED_MODEL_DIR))


def _read_json(file: Path) -> dict | None:
    """A JSON object file, None when absent; a clear error when it is not one."""
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{file}: not a JSON object (got {type(raw).__name__})")
    return raw


def native_family(path: Path) -> types.ModuleType | None:
    """The native family module for the checkpoint at ``path`` (from ``config.json``'s ``model_type``), or
    None. Importing it registers its classes with transformers."""
    raw = _read_json(path / "config.json")
    if raw is None:
        raise ModelLoadError(f"{path}: no config.json; not a model directory")
    name = FAMILY_MODULES.get(str(raw.get("model_type") or ""))
    if name is None:
        return None
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        log.warning("%s: model_type %r has no native module in this installation (%s); loading it the "
                    "generic way", path, raw.get("model_type"), name)
        return None


def _read_config(path: Path, trust_remote_code: bool):
    if _read_json(path / "config.json") is None:
        raise ModelLoadError(f"{path}: no config.json; not a model directory")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:  # ValueError, OSError, TypeError, strict-dataclass validation errors, ...
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ModelLoadError(f"{path}: the model ships its own code; pass trust_remote_code=True "
                                 "(CLI: --trust-remote-code) if you trust it") from e
        raise ModelLoadError(f"{path}: cannot read the config: {type(e).__name__}: {e}") from e


def parse_ids(text: str, name: str = "ids") -> list[int]:
    """Token ids written as ``"126081,126348"``; a ValueError naming ``name`` for anything else."""
    try:
        ids = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise ValueError(f"{name} must be one or more non-negative token ids separated by commas; got {text!r}")
    return ids


def _ids(value) -> list[int]:
    """An id or a list of ids (as configs write ``eos_token_id``) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _first_id(*candidates):
    for c in candidates:
        ids = _ids(c)
        if ids:
            return ids[0]
    return None


def special_ids(path: Path, config, tokenizer, family: types.ModuleType | None, *, mask_id=None, pad_id=None,
                eos_ids=None) -> tuple[int, int, list[int]]:
    """``(mask_id, pad_id, eos_ids)``: each from the argument, else the family's ``special_ids`` hook,
    else the generic sources (module docstring). Raises :class:`ModelLoadError` naming what is missing."""
    raw_generation = _read_json(path / "generation_config.json") or {}
    generation = types.SimpleNamespace(**raw_generation)
    hook = getattr(family, "special_ids", None)
    found = dict(hook(config, tokenizer, generation) or {}) if hook is not None else {}
    eos: list[int] = []
    for source in (raw_generation.get("eos_token_id"), getattr(config, "eos_token_id", None),
                   tokenizer.eos_token_id):
        eos += [i for i in _ids(source) if i not in eos]
    if not eos and tokenizer.sep_token_id is not None:  # BERT-style vocabularies end a text with [SEP]
        eos = [int(tokenizer.sep_token_id)]
    eos = _ids(eos_ids) or _ids(found.get("eos_ids")) or eos
    if not eos:
        raise ModelLoadError(f"{path}: no end-of-sequence token in the generation config, config or tokenizer; "
                             "pass eos_ids explicitly (CLI: --eos-id)")
    mask = _first_id(mask_id, found.get("mask_id"), getattr(config, "mask_token_id", None), tokenizer.mask_token_id)
    if mask is None:
        raise ModelLoadError(f"{path}: no mask token: the config has no mask_token_id and the tokenizer "
                             "no mask token; pass mask_id explicitly (CLI: --mask-id)")
    pad = _first_id(pad_id, found.get("pad_id"), tokenizer.pad_token_id, getattr(config, "pad_token_id", None),
                    raw_generation.get("pad_token_id"), eos)
    return mask, pad, list(dict.fromkeys(eos))


def load_model(
    path: str | os.PathLike | None = None,
    *,
    mask_id: int | None = None,
    pad_id: int | None = None,
    eos_ids: int | list[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    compile: bool = False,
) -> LoadedModel:
    """Load model, tokenizer and special ids from ``path`` (default: the bundled model).

    ``dtype``: a torch dtype or its name (``"bfloat16"``); None keeps the checkpoint's.
    ``mask_id``, ``pad_id``, ``eos_ids`` (an id or a list; the first fills finished rows) override the ids
    found in the checkpoint. ``trust_remote_code`` allows a checkpoint's own code, for architectures
    without a native family only. ``compile``: compile the transformer layers and warm them up for
    inference (:func:`compile_layers`). Raises :class:`ModelLoadError` naming the path for a missing
    directory, unreadable config, missing mask token, unreadable or incomplete weights, or a compilation
    that fails.
    """
    path = Path(path if path is not None else default_model_path()).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: model directory does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a directory; pass the model directory")
    family = native_family(path)
    remote = trust_remote_code and family is None  # a native family never runs a checkpoint's own code
    paradigm = str(getattr(family, "PARADIGM", "masked"))
    if compile and paradigm != "masked":
        raise ModelLoadError(f"{path}: compile is supported for masked models only; this one decodes in the "
                             f"{paradigm!r} paradigm; load it without --compile (compile=False)")
    config = _read_config(path, remote)
    try:
        if family is not None and hasattr(family, "load_tokenizer"):
            tokenizer = family.load_tokenizer(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote, local_files_only=True)
    except Exception as e:  # transformers raises many types here (OSError, ValueError, ...)
        raise ModelLoadError(f"{path}: cannot load the tokenizer: {e}") from e

    model = _load_weights(path, family, config, remote, dtype)
    model.to(device).eval()

    mask_id, pad_id, eos_list = special_ids(path, config, tokenizer, family, mask_id=mask_id, pad_id=pad_id,
                                            eos_ids=eos_ids)
    if family is None:  # native families honour masks and positions by construction (and by their tests)
        check_padding(model, mask_id, path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_length = int(getattr(text_config, "max_position_embeddings", None)
                     or getattr(config, "max_sequence_length", 0) or tokenizer.model_max_length)
    head, card, policy = _load_extras(path, device)
    compiled = None
    if compile:
        try:
            compiled = compile_layers(model, mask_id)
        except Exception as e:  # inductor raises its own types; the first line says what failed
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ModelLoadError(f"{path}: torch.compile failed ({type(e).__name__}: {first}); on a CPU it needs "
                                 "a C++ compiler (g++, or the one named by CXX); without --compile (compile=False) "
                                 "the model runs as it is") from e
    return LoadedModel(model=model, tokenizer=tokenizer, mask_id=mask_id, pad_id=pad_id, eos_id=eos_list[0],
                       eos_ids=tuple(eos_list), path=str(path), name=path.name, max_length=max_length,
                       threshold_head=head, compiled=compiled, card=card, step_policy=policy,
                       kv_cache=supports_kv_cache(model), paradigm=paradigm,
                       generation=_read_json(path / "generation_config.json") or {})


def _load_weights(path: Path, family, config, remote: bool, dtype) -> torch.nn.Module:
    """The model of the checkpoint at ``path`` with every weight read from it: a family's own class, a masked LM,
    or a remote-code denoiser registered under ``AutoModel``. Raises :class:`ModelLoadError` naming the path."""
    auto_map = getattr(config, "auto_map", None) or {}
    kwargs = dict(local_files_only=True, trust_remote_code=remote, output_loading_info=True)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        if getattr(family, "MODEL_CLASS", None) is not None:  # a family transformers ships (DiffusionGemma)
            model, info = family.MODEL_CLASS.from_pretrained(path, **kwargs)
        elif family is not None or "AutoModelForMaskedLM" in auto_map or "AutoModel" not in auto_map:
            model, info = AutoModelForMaskedLM.from_pretrained(path, **kwargs)
        else:  # remote-code dLLMs register their denoiser under AutoModel
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
    return model


def _load_extras(path: Path, device):
    """What a checkpoint may carry beside its weights: ``(threshold head, model card, step policy)``."""
    try:
        return load_head(path, device=device), read_card(path), load_policy(path, device=device)
    except (ThresholdHeadError, ModelCardError, StepPolicyError) as e:
        raise ModelLoadError(str(e)) from e


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
