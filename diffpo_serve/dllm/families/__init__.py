"""Native model families: which module of ours runs which published checkpoint.

diffpo owns the architectures it serves (as vLLM and SGLang do): a checkpoint whose ``config.json``
names a known ``model_type`` is built from one of our modules and loaded from its own safetensors
files, with no ``trust_remote_code``. Each family is one module (transformers' single-file habit:
config class, layers, model and the family's quirks in one place) that, when imported, registers its
config and model classes with transformers' ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM``
under the checkpoint's ``model_type``, so ``from_pretrained(dir)`` reads the published layout
(single file or sharded with ``model.safetensors.index.json``) with the published parameter names.

The model interface the sampler, the likelihoods and the threshold head see (``loading.model_logits``):
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
"""

from __future__ import annotations

import importlib
from types import ModuleType

# config.json "model_type" -> the module that owns it (imported on first use; importing registers it)
FAMILY_MODULES: dict[str, str] = {
    "diffpo-mdm": "diffpo_serve.dllm.model",
    "llada": "diffpo_serve.dllm.families.llada",
    "Dream": "diffpo_serve.dllm.families.dream",
}


def family_module(model_type: str | None) -> ModuleType | None:
    """The native module for a config's ``model_type`` (registered with transformers), or None."""
    name = FAMILY_MODULES.get(model_type or "")
    return importlib.import_module(name) if name else None
