"""Native model families: which module of ours runs which published checkpoint.

diffpo owns the architectures it serves (as vLLM and SGLang do): a checkpoint whose ``config.json``
names a known ``model_type`` is built from one of our modules and loaded from its own safetensors
files, with no ``trust_remote_code``. Each family is one module (transformers' single-file habit:
config class, layers, model and the family's quirks in one place) that, when imported, registers its
config and model classes with transformers' ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM``
under the checkpoint's ``model_type``, so ``from_pretrained(dir)`` reads the published layout
(single file or sharded with ``model.safetensors.index.json``) with the published parameter names.

The model interface the sampler, the likelihoods and the threshold head see (:mod:`diffpo_serve.dllm.forward`):
``model(input_ids, attention_mask=..., position_ids=..., output_hidden_states=...)`` returns an output
with ``.logits`` (b, l, V), where **position i's logits are the distribution of token i** (a family
whose checkpoint predicts the next token, as Dream does, shifts inside its own module), and
``.hidden_states[-1]`` the final hidden state (b, l, d). ``attention_mask`` (b, l) marks real tokens:
padded keys are never attended to; ``position_ids`` (b, l) are the tokens' positions, so a padded row
sees exactly what it would see alone. A native model also takes ``logits_index`` (logits of some columns
only), ``return_kv`` (the keys/values of every layer, ``output.kv_cache``) and ``kv_cache`` + ``query_index``
(compute some columns, attending to the cached keys/values of the others): the shared mechanism and its
contract are in :mod:`diffpo_serve.dllm.kv_cache`; a family passes a ``ForwardContext`` to its attention.

A family module may also define hooks the loader calls (all optional):
    ``load_tokenizer(path) -> tokenizer``       when transformers cannot load it without remote code
    ``special_ids(config, tokenizer, generation_config) -> dict``  defaults for ``mask_id``,
                                                ``pad_id``, ``eos_ids`` (list) not found the generic way
    ``MODEL_CLASS``                             the class to load the checkpoint with, instead of
                                                ``AutoModelForMaskedLM`` (a family transformers ships itself)
    ``PARADIGM``                                how the model decodes: ``"masked"`` (default; the sampler in
                                                :mod:`diffpo_serve.dllm.sampler`) or ``"canvas"`` (random-token
                                                canvas, :mod:`diffpo_serve.dllm.canvas`, whose model interface
                                                the family's ``canvas_denoiser(model)`` hook returns)
and decoding defaults, for a request that sets none (:func:`decoding_defaults`; the checkpoint's
``generation_config.json`` and the server's flags override them):
    ``GEN_LENGTH``                              answer tokens (the server's ``max_tokens``)
    ``BLOCK_LENGTH``                            semi-autoregressive block length (absent: one block)
and, for training, ``LORA_TARGET_MODULES``: peft's ``target_modules`` (a list of module-name suffixes or
a full-name regex) for the family's LoRA adapters (RL's ``--lora-r``; without it, peft's "all-linear").
Every native model's layers support ``gradient_checkpointing_enable()``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# config.json "model_type" -> the module that owns it (imported on first use; importing registers it)
FAMILY_MODULES: dict[str, str] = {
    "diffpo-mdm": "diffpo_serve.dllm.model",
    "llada": "diffpo_serve.dllm.families.llada",
    "Dream": "diffpo_serve.dllm.families.dream",
    "diffusion_gemma": "diffpo_serve.dllm.families.diffusion_gemma",
}


def family_module(model_type: str | None) -> ModuleType | None:
    """The native module for a config's ``model_type`` (registered with transformers), or None."""
    name = FAMILY_MODULES.get(model_type or "")
    return importlib.import_module(name) if name else None


def decoding_defaults(model_type: str | None) -> dict[str, int | None]:
    """``{"gen_length": ..., "block_length": ...}`` as the family of ``model_type`` states them (its ``GEN_LENGTH``
    and ``BLOCK_LENGTH``); None where it states none or the model type has no native family."""
    module = family_module(model_type)
    return {"gen_length": getattr(module, "GEN_LENGTH", None), "block_length": getattr(module, "BLOCK_LENGTH", None)}


def _ids(value) -> list[int]:
    """An id, a list of ids or None (as configs write them) -> a list of ids."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def checkpoint_ids(config, tokenizer, generation_config, *, mask_token: str, turn_end_token: str,
                   with_pad: bool = False) -> dict:
    """Special ids as a chat dLLM's checkpoint states them (the shared body of the families'
    ``special_ids`` hooks).

    ``mask_id``: the config's ``mask_token_id``, else the tokenizer's ``mask_token``. ``eos_ids``: the
    generation config's ``eos_token_id`` (an id or a list), then the config's and the tokenizer's, then
    ``turn_end_token`` when the tokenizer's chat template ends turns with it (an instruct model ends
    its reply there; without it a chat reply would run on to the end-of-text id). The first is primary.
    ``with_pad``: also ``pad_id``, from the config, the generation config, then the tokenizer.
    """
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    found: dict = {}
    mask = _ids(getattr(config, "mask_token_id", None)) or ([vocab[mask_token]] if mask_token in vocab else [])
    if mask:
        found["mask_id"] = mask[0]
    if with_pad:
        pad = (_ids(getattr(config, "pad_token_id", None)) or _ids(getattr(generation_config, "pad_token_id", None))
               or _ids(getattr(tokenizer, "pad_token_id", None)))
        if pad:
            found["pad_id"] = pad[0]
    eos: list[int] = []
    for source in (getattr(generation_config, "eos_token_id", None), getattr(config, "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        eos += [i for i in _ids(source) if i not in eos]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and turn_end_token in template and turn_end_token in vocab:
        eos += [vocab[turn_end_token]] if vocab[turn_end_token] not in eos else []
    if eos:
        found["eos_ids"] = eos
    return found
