"""DiffusionGemma (``google/diffusiongemma-*``), run with transformers' own classes.

DiffusionGemma is transformers' native block-diffusion LM (``transformers/models/diffusion_gemma``): a
causal encoder (Gemma 4's mixture-of-experts text stack) reads the prompt once into a KV cache, and a
bidirectional decoder that shares its weights denoises a *canvas* of ``config.canvas_length`` tokens that
starts as uniformly random tokens; longer answers continue block by block, the encoder appending each
finished canvas to the cache. It has no mask token and no mask state: it decodes in the random-canvas
paradigm of :mod:`diffpo_serve.dllm.canvas`, not in the masked one of :mod:`diffpo_serve.dllm.sampler`
(``PARADIGM``).

Unlike LLaDA and Dream, diffpo does not re-implement this architecture: transformers ships it, with no
remote code, so ``MODEL_CLASS`` (transformers' ``DiffusionGemmaForBlockDiffusion``) loads the published
checkpoint as it is, and this module only adapts it:

- loader hooks (see :mod:`diffpo_serve.dllm.families`): ``MODEL_CLASS``, ``PARADIGM``, ``special_ids``
  (every EOS: the generation config's, the text config's, the tokenizer's and Gemma 4's turn end
  ``<turn|>`` when the chat template uses it; the pad id; ``mask_id`` is :data:`NO_MASK`);
- :class:`DiffusionGemmaDenoiser`, the model interface the canvas paradigm needs
  (:class:`diffpo_serve.dllm.canvas.CanvasDenoiser`): one encoder pass of one row into that row's own
  cache, and one batched decoder pass over rows whose caches have different lengths (left-padded into one
  cache, the padding masked), with per-row positions and per-row self-conditioning;
- :func:`canvas_defaults`: the decoding settings the checkpoint's ``generation_config.json`` states
  (entropy bound, denoising steps, temperature schedule, stopping thresholds), else transformers' defaults.

Not supported, and why: image inputs (the vision tower loads with the checkpoint but prompts are text only:
a prompt holding the image token is refused by the canvas state); attention implementations other than
those transformers' mask interface builds padding masks for (``sdpa``, ``eager``; flash attention is not
supported by the model itself); ``torch.compile`` (``--compile``) and the masked sampler's KV-cache modes,
which belong to the masked paradigm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, bidirectional_mask_function

from diffpo_serve.dllm.families import checkpoint_ids

MODEL_TYPE = "diffusion_gemma"
MODEL_CLASS = DiffusionGemmaForBlockDiffusion  # the loader builds this instead of AutoModelForMaskedLM
PARADIGM = "canvas"  # decoded by diffpo_serve.dllm.canvas
TURN_END_TOKEN = "<turn|>"  # Gemma 4's chat template closes every turn with it
NO_MASK = -1  # LoadedModel.mask_id of a model without a mask token (never a token id)

# transformers' own defaults for DiffusionGemma's generate (DiffusionGemmaGenerationConfig's
# _get_default_generation_params), used where the checkpoint's generation config leaves a field unset
TRANSFORMERS_DEFAULTS = {"gen_length": 256, "steps": 48, "threshold": 0.1, "t_min": 0.4, "t_max": 0.8,
                         "stability_threshold": 1, "confidence_threshold": 0.005}


def special_ids(config, tokenizer, generation_config) -> dict:
    """``eos_ids``, ``pad_id`` (from the text config first: the top-level config has neither) and
    ``mask_id`` = :data:`NO_MASK`."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = checkpoint_ids(text, tokenizer, generation_config, mask_token="", turn_end_token=TURN_END_TOKEN,
                           with_pad=True)
    found["mask_id"] = NO_MASK
    return found


def canvas_defaults(generation_config) -> dict:
    """The canvas sampler's defaults (:class:`diffpo_serve.dllm.canvas.CanvasParams` names) from the model's
    ``DiffusionGemmaGenerationConfig`` (read by transformers from ``generation_config.json``), each unset
    field falling back to :data:`TRANSFORMERS_DEFAULTS`."""
    sampler = getattr(generation_config, "sampler_config", None)
    if isinstance(sampler, dict):  # as serialised, before transformers resolves it
        sampler = sampler.get("entropy_bound")
    else:
        sampler = getattr(sampler, "entropy_bound", None)
    stated = {"gen_length": getattr(generation_config, "max_new_tokens", None),
              "steps": getattr(generation_config, "max_denoising_steps", None), "threshold": sampler,
              "t_min": getattr(generation_config, "t_min", None), "t_max": getattr(generation_config, "t_max", None),
              "stability_threshold": getattr(generation_config, "stability_threshold", None),
              "confidence_threshold": getattr(generation_config, "confidence_threshold", None)}
    return {k: (TRANSFORMERS_DEFAULTS[k] if v is None else v) for k, v in stated.items()}


def canvas_denoiser(model: DiffusionGemmaForBlockDiffusion) -> "DiffusionGemmaDenoiser":
    """The canvas paradigm's model interface for a loaded DiffusionGemma (the family hook canvas.py calls)."""
    return DiffusionGemmaDenoiser(model)


class DiffusionGemmaDenoiser:
    """transformers' ``DiffusionGemmaForBlockDiffusion`` behind :class:`diffpo_serve.dllm.canvas.CanvasDenoiser`.

    Each row owns a transformers ``DynamicCache`` of batch size 1, written only by :meth:`encode` (what
    transformers' ``generate`` does for a batch of one: the same mask builder, ``int32`` positions that
    continue the row's sequence). :meth:`decode` runs the decoder once over several rows: their caches are
    left-padded to the longest per layer (sliding-window layers keep at most ``sliding_window - 1`` entries,
    full layers all of them) into one cache, and the padded keys are masked through transformers' own mask
    interface, so a row attends to exactly what it would alone. A single row (or rows with equal cache
    lengths) passes no mask, as ``generate`` does without padding.
    """

    def __init__(self, model: DiffusionGemmaForBlockDiffusion):
        self.model = model
        self.config = model.config
        self.text_config = model.config.get_text_config()
        self.canvas_length = int(model.config.canvas_length)
        self.vocab_size = int(self.text_config.vocab_size)
        self.hidden_size = int(self.text_config.hidden_size)
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.defaults = canvas_defaults(getattr(model, "generation_config", None))
        attn = self.text_config._attn_implementation or "sdpa"
        if attn not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            raise ValueError(f"DiffusionGemma with attention implementation {attn!r}: batching rows of different "
                             f"lengths needs a padding mask, which transformers builds for "
                             f"{', '.join(sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping))} only")
        self._attn = attn

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype self-conditioning logits are kept in (the embeddings', as transformers casts them)."""
        return self.model.model.decoder.embed_tokens.weight.dtype

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.text_config)

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, start: int, cache: DynamicCache | None, return_hidden: bool = False):
        """Append ``ids`` (n,) of one row, at positions ``start ..``, to its cache (a new one when None); returns
        the cache, and with ``return_hidden`` also the encoder's final (normed) hidden states (1, n, d)."""
        cache = self.new_cache() if cache is None else cache
        ids = ids.reshape(1, -1).to(self.device)
        n = ids.shape[1]
        positions = torch.arange(start, start + n, dtype=torch.int32, device=ids.device)[None]
        attention = torch.ones((1, start + n), dtype=torch.bool, device=ids.device)
        dummy = torch.empty((1, n, 0), dtype=self.model.dtype, device=ids.device)  # shape and dtype only
        encoder = self.model.model.encoder
        masks = encoder.create_masks_for_generate(config=self.config, inputs_embeds=dummy, attention_mask=attention,
                                                  cache=cache, position_ids=positions)
        out = encoder(input_ids=ids, attention_mask=masks, cache=cache, position_ids=positions)
        return (out.cache, out.last_hidden_state) if return_hidden else out.cache

    @torch.no_grad()
    def decode(self, canvas: torch.Tensor, start: torch.Tensor, caches: list, self_conditioning: torch.Tensor | None,
               has_self_conditioning: torch.Tensor | None = None, return_hidden: bool = False):
        """Logits (b, C, V) float32 (softcapped, as the model returns them) of one decoder pass.

        ``canvas`` (b, C) token ids; ``start`` (b,) each row's first canvas position (its sequence length so
        far); ``caches`` the rows' encoder caches; ``self_conditioning`` (b, C, V) the previous step's
        processed logits or None; ``has_self_conditioning`` (b,) bool: rows whose previous logits are real
        (the others, at a block's first step, get the zero signal, as with no logits at all). With
        ``return_hidden``, also the decoder's final hidden states (b, C, d): the LM head's input, read with a
        forward hook (transformers' output does not carry them)."""
        b, length = canvas.shape
        device = self.device
        positions = (start.to(device)[:, None] + torch.arange(length, device=device)).to(torch.int32)
        cache, masks = (caches[0], {"full_attention": None, "sliding_attention": None}) if b == 1 \
            else self._merged(caches, length)
        kwargs = {}
        if self_conditioning is not None:
            kwargs["self_conditioning_logits"] = self_conditioning.to(device=device, dtype=self.dtype)
            if has_self_conditioning is not None and not bool(has_self_conditioning.all()):
                kwargs["self_conditioning_mask"] = has_self_conditioning.to(device)
        seen = []
        hook = self.model.lm_head.register_forward_hook(lambda _m, args, _o: seen.append(args[0])) \
            if return_hidden else None
        try:
            out = self.model(decoder_input_ids=canvas.to(device), cache=cache, decoder_attention_mask=masks,
                             decoder_position_ids=positions, **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        return (out.logits, seen[0]) if return_hidden else out.logits

    def _merged(self, caches: list, query_length: int):
        """One cache holding the rows' caches left-padded per layer, and the decoder's masks per layer type."""
        merged = self.new_cache()
        lengths = torch.tensor([[layer.keys.shape[-2] for layer in c.layers] for c in caches])  # b, layers (stored)
        first_of_type: dict[str, int] = {}
        for i, layer in enumerate(merged.layers):
            width = int(lengths[:, i].max())
            keys = torch.cat([F.pad(c.layers[i].keys, (0, 0, width - int(n), 0)) for c, n in zip(caches, lengths[:, i])])
            values = torch.cat([F.pad(c.layers[i].values, (0, 0, width - int(n), 0))
                                for c, n in zip(caches, lengths[:, i])])
            layer.update(keys, values)
            first_of_type.setdefault(self.text_config.layer_types[i], i)
        masks = {}
        mask_interface = ALL_MASK_ATTENTION_FUNCTIONS[self._attn]
        for layer_type, i in first_of_type.items():
            width = int(lengths[:, i].max())
            real = torch.arange(width)[None] >= (width - lengths[:, i])[:, None]  # b, width: not padding
            if bool(real.all()):
                masks[layer_type] = None
                continue
            real = torch.cat([real, torch.ones((len(caches), query_length), dtype=torch.bool)], 1).to(self.device)
            masks[layer_type] = mask_interface(
                batch_size=len(caches), q_length=query_length, kv_length=width + query_length, q_offset=width,
                kv_offset=0, mask_function=bidirectional_mask_function, attention_mask=real,
                allow_is_causal_skip=False, allow_is_bidirectional_skip=True, dtype=self.model.dtype,
                config=self.text_config, use_vmap=False, device=self.device)
        return merged, masks
