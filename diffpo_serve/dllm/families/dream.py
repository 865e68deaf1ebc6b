"""Dream (Dream-org's Dream-v0-Base-7B / Dream-v0-Instruct-7B; ``model_type`` "Dream"), run natively.

Dream (Ye et al. 2025, arXiv 2508.15487) is a masked-diffusion LM initialised from the autoregressive
Qwen2.5-7B and keeps its architecture with the causal mask removed: pre-norm RMSNorm, rotary position
embeddings (RoPE, base ``rope_theta``), grouped-query attention with biased q/k/v projections
(``num_key_value_heads``), a SwiGLU MLP, separate or tied output embeddings (``tie_word_embeddings``).
This module owns that architecture for diffpo: the config class (the published ``config.json`` field
names), the model with the published parameter names (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj.*``, ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``,
``model.layers.{i}.{input,post_attention}_layernorm.weight``, ``model.norm.weight``, ``lm_head.weight``),
and the hooks the loader calls for Dream's tokenizer and special ids. Importing it registers the
config and model under "Dream" with ``AutoConfig``, ``AutoModel`` and ``AutoModelForMaskedLM``, so a
published checkpoint loads from its own safetensors without ``trust_remote_code`` (with it off,
transformers uses the registered class and ignores the checkpoint's ``auto_map``).

**The shift.** Because Dream started as an autoregressive model, the network's output at position i
predicts token i + 1 (Dream's own sampler shifts its logits right by one). diffpo's model interface
(:mod:`diffpo_serve.dllm.families`) wants position i's logits to be the distribution of token i, so
the shift happens once, here, in :func:`shift_to_token_positions`: position i takes the final hidden
state of the nearest *real* (attended) position before it, so padding between a prompt and its
answer (the sampler's half-precision layout) is skipped and a padded row gets its unpadded logits. A
row's first real token has no predecessor; it keeps its own output, as Dream's sampler does for
column 0 (it is always a prompt token, never predicted). The shift is applied to the final hidden
state before the output projection, so ``logits == lm_head(hidden_states[-1])`` and every consumer
(sampler, likelihoods, threshold head) sees token-aligned logits and hidden states through the one
interface. The other entries of ``hidden_states`` are the layers' own, unshifted outputs. A cached
forward (:mod:`diffpo_serve.dllm.kv_cache`) that computes only some columns appends, for each logit it
must return, the column that logit comes from (:func:`shift_sources`), so it is computed too.

RoPE tables are computed from the config in every forward (float32, as the published code does,
then cast to the activations' dtype), never stored, so they are right after ``from_pretrained`` in
any dtype: transformers 5 no longer initialises the published code's ``inv_freq`` buffers on load.
Only the plain RoPE Dream uses (``rope_scaling`` null) is supported; a scaled variant is refused.

Attention takes the (b, l) key-padding mask and ``position_ids`` (default ``cumsum(mask) - 1``); padded
keys are left out of the sums, not masked (:func:`~diffpo_serve.dllm.kv_cache.unpadded_attention`), so a
padded row computes bit for bit what it computes alone and unpadded, in float32 and bfloat16. Dream's sliding-window fields are read and kept but unused (the published models
set ``use_sliding_window`` false).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from diffpo_serve.dllm import kv_cache as kv

from diffpo_serve.dllm.families import checkpoint_ids

MODEL_TYPE = "Dream"
MASK_TOKEN, TURN_END_TOKEN = "<|mask|>", "<|im_end|>"
# LoRA targets (peft ``target_modules``): the seven projections of every layer, not ``lm_head``
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# decoding defaults (families/__init__.py; the checkpoint's generation_config.json and the server's flags override
# them): Dream's own diffusion_generate decodes the answer as one block, with steps = max_new_tokens in its
# examples (its published generation_config.json says steps 512 and no length); Fast-dLLM's Dream generate
# (128 tokens, 128 steps, blocks of 32) and d1's evaluation (256 tokens, blocks of 32) decode in blocks of 32,
# which lets a row end at an early EOS and a stream send each block as it is committed.
GEN_LENGTH = 256
BLOCK_LENGTH = 32


class DreamConfig(PretrainedConfig):
    """Dream's hyper-parameters, with the field names and defaults of the published ``config.json``."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 22016,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = False,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = 4096,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        mask_token_id: int | None = 151666,
        pad_token_id: int | None = 151643,
        **kwargs,
    ):
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if hidden_size % num_attention_heads:
            raise ValueError(f"Dream config: hidden_size {hidden_size} is not a multiple of "
                             f"num_attention_heads {num_attention_heads}")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"Dream config: num_attention_heads {num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {num_key_value_heads}")
        # transformers 5 writes RoPE settings as rope_parameters (configs saved by it); Dream's files as
        # rope_theta + rope_scaling. Either is read; only plain RoPE is implemented.
        rope_parameters = kwargs.pop("rope_parameters", None) or {}
        for name, rope in (("rope_scaling", rope_scaling or {}), ("rope_parameters", rope_parameters)):
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ValueError(f"Dream config: {name} {rope!r} is not supported; diffpo's Dream implements plain "
                                 "RoPE (rope_scaling null), as the published Dream models use")
        if rope_theta is not None and rope_parameters.get("rope_theta", rope_theta) != rope_theta:
            raise ValueError(f"Dream config: rope_theta {rope_theta} disagrees with rope_parameters {rope_parameters}")
        rope_theta = rope_theta if rope_theta is not None else rope_parameters.get("rope_theta", 10000.0)
        if hidden_act not in ACT2FN:
            raise ValueError(f"Dream config: unknown hidden_act {hidden_act!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        # rope_scaling / rope_parameters (plain RoPE only) are not stored: transformers 5 reserves those names
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id, **kwargs)


# ----------------------------------------------------------------------------- maths (pure functions)

def rope_inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies (head_dim / 2,), float32: 1 / theta^(2j / head_dim), j = 0 .. head_dim/2 - 1
    (Su et al. 2021, arXiv 2104.09864; the exponent is formed in float32 as transformers' default RoPE does)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponent)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (b, l, head_dim) of angle position * inv_freq, each half repeated (rotate-half layout);
    computed in float32, returned in ``dtype``."""
    inv_freq = rope_inverse_frequencies(head_dim, theta, position_ids.device)
    angles = position_ids.float()[..., None] * inv_freq  # b, l, head_dim/2
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (b, h, l, d) by the position angles: x * cos + rotate_half(x) * sin, where
    rotate_half(x) = (-x[d/2:], x[:d/2]); cos/sin are (b, l, d)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def shift_sources(attention_mask: torch.Tensor | None, b: int, l: int, device=None) -> torch.Tensor:
    """For each column i (b, l): the column whose next-token output is token i's distribution, i.e. the last
    real (attended) column before i; where there is none (a row's first real token, and padding before it)
    i itself. Without a mask every column is real: i - 1, and 0 for column 0."""
    columns = torch.arange(l, device=device).expand(b, l)
    if attention_mask is None:
        real = columns
    else:
        real = torch.where(attention_mask.bool(), columns, -1)
    last_real_up_to = real.cummax(dim=1).values  # b, l: last real column <= i (-1: none)
    before = torch.cat([torch.full_like(columns[:, :1], -1), last_real_up_to[:, :-1]], dim=1)
    return torch.where(before >= 0, before, columns)


def shift_to_token_positions(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Move next-token outputs to the token they predict: (b, l, d), (b, l) -> (b, l, d).

    Output position i holds input position j = :func:`shift_sources` (the last real position before i; a
    row's first real token, and padding before it, keep their own output).
    """
    b, l = hidden.shape[:2]
    source = shift_sources(attention_mask, b, l, hidden.device)
    return hidden.gather(1, source[..., None].expand(-1, -1, hidden.shape[-1]))


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """SDPA mask from the (b, l) real-token mask: (b, 1, 1, l) bool, True = may be attended to. A 4-D
    mask (bool, or additive float) is passed through unchanged."""
    if attention_mask is None or attention_mask.dim() == 4:
        return attention_mask
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, length) or 4-D; got shape {tuple(attention_mask.shape)}")
    return attention_mask.bool()[:, None, None, :]


# ----------------------------------------------------------------------------- layers

class DreamRMSNorm(nn.Module):
    """y = g * (x / sqrt(mean(x^2) + eps)), normalised in float32 and cast back before the gain."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class DreamAttention(nn.Module):
    """Bidirectional grouped-query self-attention with RoPE; q/k/v projections carry a bias."""

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attention_dropout = config.attention_dropout
        d, kv = config.hidden_size, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, kv, bias=True)
        self.v_proj = nn.Linear(d, kv, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                ctx: kv.ForwardContext | None = None):
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, l, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, l, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout = self.attention_dropout if self.training else 0.0
        if ctx is not None:  # keys/values through the shared cache mechanism (kv_cache.py)
            y = ctx.attend(self.layer_idx, q, k, v, mask, dropout, unpadded=True)
        else:
            groups = self.num_heads // self.num_key_value_heads
            if groups > 1:  # each key/value head serves `groups` consecutive query heads
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            y = kv.unpadded_attention(q, k, v, mask, dropout)  # padding as if absent (a 4-D mask as given)
        return self.o_proj(y.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim))


class DreamMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(GradientCheckpointingLayer):
    """One pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Checkpointed when the model's
    gradient checkpointing is on."""

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                ctx: kv.ForwardContext | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamPreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing (config class, weight init, checkpointing, device-map split unit)."""

    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True


class DreamBaseModel(DreamPreTrainedModel):
    """Embeddings, the decoder layers and the final norm: token ids -> final hidden states (unshifted)."""

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool = False, ctx: kv.ForwardContext | None = None
                ) -> tuple[torch.Tensor, tuple | None]:
        """Returns (final normed hidden state (b, l, d), all hidden states or None). With ``ctx`` (from
        :func:`kv_cache.begin`), the inputs are already those of the computed columns, ``position_ids``
        given, and the keys/values go through the context."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, l = x.shape[:2]
        if position_ids is None:
            if attention_mask is None or attention_mask.dim() != 2:
                position_ids = torch.arange(l, device=x.device).expand(b, l)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        config = self.config
        cos, sin = rope_tables(position_ids, config.hidden_size // config.num_attention_heads, config.rope_theta,
                               x.dtype)
        mask = key_padding_mask(attention_mask)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask, ctx)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        return x, tuple(hidden) if hidden is not None else None


class DreamModel(DreamPreTrainedModel):
    """Dream's denoiser: token ids (masked positions hold ``mask_token_id``) -> logits (b, l, V) where
    position i's logits are the distribution of token i (the checkpoint's next-token outputs, shifted
    here by :func:`shift_to_token_positions`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        logits_index: torch.Tensor | None = None,
        kv_cache: kv.KVCache | None = None,
        query_index: torch.Tensor | None = None,
        return_kv: bool = False,
        **kwargs,
    ) -> kv.DiffusionLMOutput:
        """``labels`` (b, l), -100 = ignore, gives the mean cross-entropy of the (token-aligned) logits.
        ``logits_index``, ``kv_cache``/``query_index``, ``return_kv``: see :mod:`diffpo_serve.dllm.kv_cache`;
        a cached forward also computes, after the given query columns, the column each wanted logit comes
        from (the real position before it), so its keys/values are fresh too."""
        mask = attention_mask if attention_mask is None or attention_mask.dim() == 2 else None
        if kv_cache is None and not return_kv:
            final, hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds,
                                       output_hidden_states=bool(output_hidden_states))
            final = shift_to_token_positions(final, mask)
            logits = self.lm_head(final if logits_index is None else kv.gather_columns(final, logits_index))
            past = None
        else:
            if input_ids is None or mask is None and attention_mask is not None:
                raise ValueError("a cached Dream forward takes input_ids and a (batch, length) attention_mask")
            b, l = input_ids.shape
            wanted = logits_index if logits_index is not None else query_index
            sources = None if wanted is None else shift_sources(mask, b, l, input_ids.device).gather(1, wanted)
            if query_index is not None:
                query_index = torch.cat([query_index, sources], 1)
            ctx, ids, positions, key_mask = kv.begin(input_ids, attention_mask, position_ids, kv_cache, query_index,
                                                     return_kv)
            final, hidden = self.model(ids, key_mask, positions, output_hidden_states=bool(output_hidden_states),
                                       ctx=ctx)
            if sources is None:  # a full forward recording keys/values, every column's logits
                final = shift_to_token_positions(final, mask)
                logits = self.lm_head(final)
            elif query_index is None:  # a full forward, some columns' logits
                final = shift_to_token_positions(final, mask)
                logits = self.lm_head(kv.gather_columns(final, logits_index))
            else:  # the source columns were appended after the queries
                final = final[:, query_index.shape[1] - sources.shape[1]:]
                logits = self.lm_head(final)
            past = ctx.result()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        if hidden is not None:
            hidden = hidden[:-1] + (final,)
        return kv.DiffusionLMOutput(loss=loss, logits=logits, hidden_states=hidden, kv_cache=past)


AutoConfig.register(MODEL_TYPE, DreamConfig, exist_ok=True)
AutoModel.register(DreamConfig, DreamModel, exist_ok=True)
AutoModelForMaskedLM.register(DreamConfig, DreamModel, exist_ok=True)


# ----------------------------------------------------------------------------- loader hooks

def load_tokenizer(path: str | Path):
    """Dream's tokenizer without its remote code: the published ``DreamTokenizer`` is Qwen2's byte-level
    BPE (same pre-tokenisation, NFC normalisation) over ``vocab.json`` + ``merges.txt``, so transformers'
    Qwen2 tokenizer is built from those files with the added tokens, special tokens and chat template of
    ``tokenizer_config.json``. A ``tokenizer.json``, where present, is used as is. Picklable."""
    from transformers import Qwen2Tokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        missing = [n for n in ("vocab.json", "merges.txt") if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: Dream tokenizer files missing: {', '.join(missing)}")
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        try:
            json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from e
    # the file's tokenizer_class / auto_map name the remote class; Qwen2Tokenizer reads the rest of it
    return Qwen2Tokenizer.from_pretrained(str(path), local_files_only=True)


def special_ids(config, tokenizer, generation_config) -> dict:
    """Dream's mask, pad and end-of-sequence ids.

    ``mask_id``: the config's ``mask_token_id``, else the tokenizer's ``<|mask|>``. ``pad_id``: the
    config's, the generation config's, then the tokenizer's pad token. ``eos_ids``: the generation
    config's ``eos_token_id`` (int or list), then the config's and the tokenizer's, then the chat turn
    end ``<|im_end|>`` when the tokenizer's chat template ends turns with it (the instruct model ends its
    reply there; without it a chat reply would run on to the first ``<|endoftext|>``). First = primary.
    """
    return checkpoint_ids(config, tokenizer, generation_config, mask_token=MASK_TOKEN, turn_end_token=TURN_END_TOKEN,
                          with_pad=True)
