"""LLaDA, natively: GSAI-ML's LLaDA-8B-Base / -Instruct and LLaDA-1.5 checkpoints, as published.

LLaDA (Nie et al. 2025, arXiv 2502.09992) is a bidirectional Llama-style transformer trained as a
masked diffusion model. Its checkpoints use an OLMo-derived layout, which this module reproduces so the
published ``model.safetensors`` shards load with their own names and no ``trust_remote_code``:

    model.transformer.wte.weight                         token embedding (embedding_size x d_model)
    model.transformer.blocks.{i}.attn_norm.weight        pre-attention norm
    model.transformer.blocks.{i}.{q,k,v}_proj.weight     projections (k, v: n_kv_heads heads, GQA)
    model.transformer.blocks.{i}.attn_out.weight         attention output projection
    model.transformer.blocks.{i}.ff_norm.weight          pre-MLP norm
    model.transformer.blocks.{i}.ff_proj.weight          MLP gate, through the activation (SiLU)
    model.transformer.blocks.{i}.up_proj.weight          MLP up; act(ff_proj x) * up_proj x
    model.transformer.blocks.{i}.ff_out.weight           MLP down
    model.transformer.ln_f.weight                        final norm
    model.transformer.ff_out.weight                      output projection (absent when weight_tying)

plus ``.bias`` where the config's ``include_bias`` / ``include_qkv_bias`` / ``bias_for_layer_norm`` ask for
them and ``{q,k}_norm`` when ``attention_layer_norm`` is set. The config keeps the published field names
(``d_model``, ``n_heads``, ``n_kv_heads``, ``n_layers``, ``mlp_hidden_size``, ``rope_theta``,
``rms_norm_eps``, ``embedding_size``, ``weight_tying``, ``scale_logits``, ...) and their published
defaults, so a ``config.json`` that omits a field means here what it means to the published code. The
published code supports variants no LLaDA checkpoint uses (ALiBi, learned absolute positions, the
fused "sequential" block, block groups); this module refuses those configs by name instead of
guessing. Logits cover ``embedding_size`` tokens, as published.

Unlike the published forward (which ignores ``attention_mask`` and places every token at its column
index), this one honours the key-padding mask and ``position_ids`` (RoPE at the given positions), so a
left-padded row, or a row whose prompt region is padded after the prompt, computes what it would
alone: bit for bit the published forward's logits on the unpadded row, in float32 and bfloat16, because
attention leaves the padding out of its sums (:func:`~diffpo_serve.dllm.kv_cache.unpadded_attention`)
instead of masking it, which would regroup bfloat16's rounding. Importing this module registers :class:`LLaDAConfig` and :class:`LLaDAModelLM` with transformers'
``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` under ``model_type`` ``"llada"``; with
``trust_remote_code=False`` transformers then builds our classes even though the published config
carries an ``auto_map`` to its own code.

Training: the blocks are :class:`~transformers.modeling_layers.GradientCheckpointingLayer`, so
``model.gradient_checkpointing_enable()`` works; every projection is a named ``nn.Linear`` that peft's
LoRA can target (``q_proj``, ``k_proj``, ``v_proj``, ``attn_out``, ``ff_proj``, ``up_proj``, and the
blocks' ``ff_out``, e.g. ``target_modules=r".*blocks\\.\\d+\\.(q_proj|v_proj|ff_out)"``). The attention
computes each layer's rotated keys and values in one place (:meth:`LLaDALlamaBlock.attention`): where a
KV cache keeps them (:mod:`diffpo_serve.dllm.kv_cache`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from diffpo_serve.dllm import kv_cache as kv

from diffpo_serve.dllm.families import checkpoint_ids

MODEL_TYPE = "llada"
MASK_TOKEN = "<|mdm_mask|>"  # id 126336 in LLaDA's vocabulary, also its config.json's mask_token_id
TURN_END_TOKEN = "<|eot_id|>"  # LLaDA-Instruct's chat template ends each turn with it
# LoRA targets (peft ``target_modules``, a full-name regex): every projection inside the blocks, not the
# embedding or the output layer (``transformer.ff_out``, which shares its name with the blocks' MLP down)
LORA_TARGET_MODULES = r".*\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)"
# decoding defaults (families/__init__.py; the checkpoint's generation_config.json and the server's flags override
# them): LLaDA's published generate decodes semi-autoregressively in blocks of 32 (its examples: 128 tokens,
# 128 steps, blocks of 32), one token per pass (its steps = gen_length, also the sampler's default); 256 answer
# tokens, as d1 evaluates the instruct model. The published generation_config.json states none of them.
GEN_LENGTH = 256
BLOCK_LENGTH = 32

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
_NORMS = ("default", "low_precision", "rms", "gemma_rms")


class LLaDAConfig(PretrainedConfig):
    """LLaDA's hyper-parameters under the published field names, with the published defaults.

    ``hidden_size``, ``num_attention_heads``, ``num_hidden_layers`` and ``max_position_embeddings`` are
    aliases of ``d_model``, ``n_heads``, ``n_layers`` and ``max_sequence_length``.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads",
                     "num_hidden_layers": "n_layers", "max_position_embeddings": "max_sequence_length"}

    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: int | None = None
    n_layers: int = 12
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = None
    activation_type: str = "swiglu"
    block_type: str = "sequential"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float = 8.0
    rope: bool = False
    rope_full_precision: bool = True
    flash_attention: bool = False
    attention_dropout: float = 0.1
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False
    residual_dropout: float = 0.1
    embedding_dropout: float = 0.1
    input_emb_norm: bool = False
    layer_norm_type: str = "default"
    layer_norm_with_affine: bool = True
    rms_norm_eps: float = 1e-05
    attention_layer_norm_with_affine: bool = True
    max_sequence_length: int = 1024
    train_max_sequence_length: int = 1024
    rope_theta: float = 10000.0
    include_qkv_bias: bool | None = False
    include_bias: bool = False
    bias_for_layer_norm: bool | None = None
    scale_logits: bool = False
    vocab_size: int = 50257
    embedding_size: int | None = 50304
    weight_tying: bool = True
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = 50256
    mask_token_id: int | None = 50256
    init_device: str | None = None
    init_fn: str = "normal"
    init_std: float = 0.02
    init_cutoff_factor: float | None = None
    precision: str | None = None
    use_cache: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        # transformers ties the output projection to the embedding by this flag; LLaDA names it weight_tying
        self.tie_word_embeddings = bool(self.weight_tying)
        super().__post_init__(**kwargs)

    @property
    def effective_n_kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or 1 with ``multi_query_attention``, else ``n_heads``."""
        if self.n_kv_heads is None:
            return 1 if self.multi_query_attention else self.n_heads
        if self.multi_query_attention is not None and self.n_kv_heads != (1 if self.multi_query_attention
                                                                           else self.n_heads):
            raise ValueError(f"LLaDA config: n_kv_heads={self.n_kv_heads} contradicts "
                             f"multi_query_attention={self.multi_query_attention}")
        return self.n_kv_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.effective_n_kv_heads

    @property
    def mlp_width(self) -> int:
        """The MLP's inner width: ``mlp_hidden_size``, else ``mlp_ratio * d_model``."""
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def output_size(self) -> int:
        """Rows of the embedding and of the logits: ``embedding_size``, else ``vocab_size``."""
        return self.embedding_size or self.vocab_size

    def check_supported(self) -> None:
        """Refuse, naming the field, the variants of the published code that no LLaDA checkpoint uses."""
        problems = []
        if self.block_type != "llama":
            problems.append(f"block_type={self.block_type!r} (only 'llama', the LLaDA checkpoints' block)")
        if not self.rope or self.alibi:
            problems.append("positions other than RoPE (rope must be true, alibi false)")
        if self.block_group_size != 1:
            problems.append(f"block_group_size={self.block_group_size} (only 1)")
        if self.activation_type not in _ACTIVATIONS:
            problems.append(f"activation_type={self.activation_type!r} (one of {', '.join(_ACTIVATIONS)})")
        if self.layer_norm_type not in _NORMS:
            problems.append(f"layer_norm_type={self.layer_norm_type!r} (one of {', '.join(_NORMS)})")
        if self.d_model % self.n_heads or self.n_heads % self.effective_n_kv_heads:
            problems.append(f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} "
                            "(d_model must divide into n_heads heads, n_heads into the key/value heads)")
        if self.embedding_size is not None and self.embedding_size < self.vocab_size:
            problems.append(f"embedding_size={self.embedding_size} < vocab_size={self.vocab_size}")
        if problems:
            raise ValueError("unsupported LLaDA config: " + "; ".join(problems))


class LLaDANorm(nn.Module):
    """The norms LLaDA configs name: ``rms`` (x / rms(x) in float32, cast back, then * weight [+ bias]),
    ``gemma_rms`` (* (1 + weight)), ``default`` / ``low_precision`` (LayerNorm with eps 1e-5)."""

    def __init__(self, config: LLaDAConfig, size: int, affine: bool):
        super().__init__()
        self.kind, self.size = config.layer_norm_type, size
        self.eps = config.rms_norm_eps if self.kind in ("rms", "gemma_rms") else 1e-05
        use_bias = config.include_bias if config.bias_for_layer_norm is None else config.bias_for_layer_norm
        self.weight = nn.Parameter(torch.ones(size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if affine and use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("default", "low_precision"):
            return F.layer_norm(x, (self.size,), self.weight, self.bias, self.eps)
        dtype = x.dtype
        x = x.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        if self.weight is None:
            return x
        x = x * (1 + self.weight) if self.kind == "gemma_rms" else self.weight * x
        return x + self.bias if self.bias is not None else x


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (Su et al. 2021) sin/cos tables (b, 1, l, head_dim) in float32 for the given positions (b, l):
    angle(p, j) = p * theta^(-2j / head_dim), the half-dimension angles repeated for both halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float)
                                / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # b, l, head_dim / 2
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # b, 1, l, head_dim
    return angles.sin(), angles.cos()


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half(x1, x2) = (-x2, x1), in float32 when
    ``full_precision`` (else in x's dtype); returns x's dtype."""
    t = x.float() if full_precision else x
    sin, cos = sin.to(t.dtype), cos.to(t.dtype)
    x1, x2 = t.chunk(2, dim=-1)
    return ((t * cos) + (torch.cat((-x2, x1), dim=-1) * sin)).to(x.dtype)


class LLaDALlamaBlock(GradientCheckpointingLayer):
    """One pre-norm LLaDA block: bidirectional (GQA) self-attention with RoPE, then a gated MLP."""

    def __init__(self, config: LLaDAConfig, layer_id: int):
        super().__init__()
        d, kv = config.d_model, config.effective_n_kv_heads
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, kv, d // config.n_heads
        self.rope_theta, self.rope_full_precision = config.rope_theta, config.rope_full_precision
        self.attention_dropout = config.attention_dropout
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        self.attn_norm = LLaDANorm(config, d, config.layer_norm_with_affine)
        self.q_norm = self.k_norm = None
        if config.attention_layer_norm:
            self.q_norm = LLaDANorm(config, d, config.attention_layer_norm_with_affine)
            self.k_norm = LLaDANorm(config, kv * self.head_dim, config.attention_layer_norm_with_affine)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv * self.head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)
        self.ff_norm = LLaDANorm(config, d, config.layer_norm_with_affine)
        self.ff_proj = nn.Linear(d, config.mlp_width, bias=config.include_bias)
        self.up_proj = nn.Linear(d, config.mlp_width, bias=config.include_bias)
        self.ff_out = nn.Linear(config.mlp_width, d, bias=config.include_bias)
        self.act = _ACTIVATIONS[config.activation_type]
        self.dropout = nn.Dropout(config.residual_dropout)

    def attention(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                  key_mask: torch.Tensor | None, ctx: kv.ForwardContext | None = None) -> torch.Tensor:
        """Self-attention of the normed input x (b, l, d); ``key_mask`` (b, 1, 1, L) bool, True = attend.
        With ``ctx`` the keys/values go through the shared cache mechanism (:mod:`~diffpo_serve.dllm.kv_cache`)."""
        b, l, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q).to(k.dtype), self.k_norm(k).to(k.dtype)
        q = q.view(b, l, self.n_heads, self.head_dim).transpose(1, 2)  # b, h, l, hd
        k = k.view(b, l, self.n_kv_heads, self.head_dim).transpose(1, 2)  # b, kv, l, hd
        v = v.view(b, l, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, sin, cos, self.rope_full_precision)
        k = apply_rope(k, sin, cos, self.rope_full_precision)
        dropout = self.attention_dropout if self.training else 0.0
        if ctx is not None:
            y = ctx.attend(self.layer_id, q, k, v, key_mask, dropout, unpadded=True)
        else:
            if self.n_kv_heads != self.n_heads:  # grouped-query attention: each kv head serves a group of q heads
                k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            y = kv.unpadded_attention(q, k, v, key_mask, dropout)  # no causal mask; padding as if absent
        return self.attn_out(y.transpose(1, 2).reshape(b, l, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                key_mask: torch.Tensor | None = None, ctx: kv.ForwardContext | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attn_norm(x), sin, cos, key_mask, ctx))
        h = self.ff_norm(x)
        return x + self.dropout(self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h)))


class LLaDAModel(nn.Module):
    """The published module tree under ``transformer``: ``wte``, ``blocks``, ``ln_f`` and ``ff_out``."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.output_size, config.d_model),
            emb_drop=nn.Dropout(config.embedding_dropout),
            ln_f=LLaDANorm(config, config.d_model, config.layer_norm_with_affine),
            blocks=nn.ModuleList(LLaDALlamaBlock(config, i) for i in range(config.n_layers)),
            # tied to wte by transformers when weight_tying (then the checkpoint may hold either name)
            ff_out=nn.Linear(config.d_model, config.output_size,
                             bias=config.include_bias and not config.weight_tying),
        )
        self.transformer = nn.ModuleDict(modules)


class LLaDAModelLM(PreTrainedModel):
    """LLaDA's denoiser: token ids (masked positions hold ``mask_token_id``) -> logits (b, l, embedding_size).

    ``forward(input_ids, attention_mask=None, position_ids=None, output_hidden_states=False)``: with no
    ``position_ids`` they follow the mask (``cumsum(mask) - 1``), or the column index without one.
    """

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]
    supports_gradient_checkpointing = True
    _tied_weights_keys = {"model.transformer.ff_out.weight": "model.transformer.wte.weight"}

    def __init__(self, config: LLaDAConfig):
        config.check_supported()
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, LLaDANorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear):
        self.model.transformer.ff_out = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_index: torch.Tensor | None = None,
        kv_cache: kv.KVCache | None = None,
        query_index: torch.Tensor | None = None,
        return_kv: bool = False,
        **kwargs,
    ) -> kv.DiffusionLMOutput:
        """Logits of every position (or of ``logits_index``'s); ``hidden_states`` (with
        ``output_hidden_states``) holds each block's input and, last, the final normed hidden state.
        ``kv_cache``/``query_index``, ``return_kv``: see :mod:`diffpo_serve.dllm.kv_cache`."""
        config, t = self.config, self.model.transformer
        # key_mask b, 1, 1, L: padded keys are never attended to (a row with no padding attends to all, as published)
        ctx, ids, positions, key_mask = kv.begin(input_ids, attention_mask, position_ids, kv_cache, query_index,
                                                 return_kv)
        cached = ctx if (kv_cache is not None or return_kv) else None
        sin, cos = rope_tables(positions, config.d_model // config.n_heads, config.rope_theta)
        x = t.wte(ids)
        if config.input_emb_norm:
            x = x * config.d_model ** 0.5
        x = t.emb_drop(x)
        hidden = [] if output_hidden_states else None
        for block in t.blocks:
            if hidden is not None:
                hidden.append(x)
            x = block(x, sin, cos, key_mask, cached)
        x = t.ln_f(x)
        if query_index is not None:  # a cached forward: its last hidden state at the logits' columns
            x = kv.logits_rows(x, logits_index, query_index)
        if hidden is not None:
            hidden.append(x)
        logits = t.ff_out(x if query_index is not None else kv.logits_rows(x, logits_index, None))
        if config.scale_logits:
            logits = logits * (1 / math.sqrt(config.d_model))
        return kv.DiffusionLMOutput(logits=logits, hidden_states=tuple(hidden) if hidden is not None else None,
                                    kv_cache=ctx.result())


def special_ids(config, tokenizer, generation_config) -> dict:
    """LLaDA's mask and end-of-sequence ids (the loader's family hook).

    ``mask_id``: the config's ``mask_token_id``, else the tokenizer's ``<|mdm_mask|>``. ``eos_ids``: the
    generation config's ``eos_token_id`` (an id or a list), the config's and the tokenizer's (``<|endoftext|>``
    for LLaDA, the id answers are padded with), then ``<|eot_id|>`` when the tokenizer's chat template ends
    turns with it: LLaDA-Instruct ends a reply there, so a chat reply stops at the turn's end.
    """
    return checkpoint_ids(config, tokenizer, generation_config, mask_token=MASK_TOKEN, turn_end_token=TURN_END_TOKEN)


AutoConfig.register(MODEL_TYPE, LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
AutoModelForMaskedLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
