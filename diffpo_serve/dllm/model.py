"""The project's own small masked-diffusion transformer (a "tiny LLaDA").

A bidirectional transformer that predicts the token behind every ``[MASK]`` position, built from
LLaDA's block recipe (Nie et al. 2025, arXiv 2502.09992): pre-norm RMSNorm, rotary position
embeddings, SwiGLU feed-forward, no causal mask. It is a transformers ``PreTrainedModel`` with its
own config class; importing this module registers both with ``AutoConfig`` and
``AutoModelForMaskedLM`` so ``from_pretrained(local_dir)`` loads it, weights in safetensors.

Positions come from ``position_ids`` (the sampler passes ``cumsum(attention_mask) - 1``), so a
left-padded prompt sees the same positions as the same prompt alone. The blocks are
:class:`~transformers.modeling_layers.GradientCheckpointingLayer` (``gradient_checkpointing_enable()``
works) and :data:`LORA_TARGET_MODULES` names the projections RL's LoRA adapts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from diffpo_serve.dllm import kv_cache as kv

MODEL_TYPE = "diffpo-mdm"
LORA_TARGET_MODULES = ["qkv", "out", "gate", "up", "down"]  # peft target_modules: every Linear of the blocks


class DiffpoConfig(PretrainedConfig):
    """Hyper-parameters of :class:`DiffpoForMaskedLM`; ``mask_token_id`` marks masked positions."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 352,
        max_position_embeddings: int = 512,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        mask_token_id: int | None = None,
        pad_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).type_as(x) * self.weight


def rotary_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (b, 1, l, head_dim) for RoPE (Su et al. 2021) at the given positions."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    angles = position_ids.float()[..., None] * inv_freq  # b, l, head_dim/2
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # b, 1, l, head_dim
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by the position angle: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class Block(GradientCheckpointingLayer):
    """One pre-norm transformer block: bidirectional self-attention then SwiGLU."""

    def __init__(self, config: DiffpoConfig):
        super().__init__()
        d, h = config.hidden_size, config.num_attention_heads
        self.num_heads, self.head_dim = h, d // h
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, config.rms_norm_eps)
        self.gate = nn.Linear(d, config.intermediate_size, bias=False)
        self.up = nn.Linear(d, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, x, cos, sin, attn_bias, ctx: kv.ForwardContext | None = None, layer: int = 0):
        b, l, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if ctx is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # no causal mask
        else:  # keys/values through the shared cache mechanism (kv_cache.py)
            y = ctx.attend(layer, q, k, v, attn_bias)
        x = x + self.out(y.transpose(1, 2).reshape(b, l, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class DiffpoForMaskedLM(PreTrainedModel):
    """Masked-diffusion denoiser: token ids (with mask tokens) -> logits over the vocabulary."""

    config_class = DiffpoConfig
    base_model_prefix = "diffpo"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = True

    def __init__(self, config: DiffpoConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_index: torch.Tensor | None = None,
        kv_cache: kv.KVCache | None = None,
        query_index: torch.Tensor | None = None,
        return_kv: bool = False,
        **kwargs,
    ) -> kv.DiffusionLMOutput:
        """``labels`` (-100 = ignore) gives the mean cross-entropy over the labelled positions.
        ``logits_index``, ``kv_cache``/``query_index``, ``return_kv``: see :mod:`diffpo_serve.dllm.kv_cache`."""
        ctx, ids, positions, attn_bias = kv.begin(input_ids, attention_mask, position_ids, kv_cache, query_index,
                                                  return_kv)
        cos, sin = rotary_tables(positions, self.config.hidden_size // self.config.num_attention_heads,
                                 self.config.rope_theta)
        x = self.embed(ids)
        hidden = [x] if output_hidden_states else None
        cached = ctx if (kv_cache is not None or return_kv) else None  # the plain path stays the plain path
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_bias, cached, i)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if query_index is not None:  # a cached forward: its last hidden state at the logits' columns
            x = kv.logits_rows(x, logits_index, query_index)
        if hidden is not None:
            hidden[-1] = x
        logits = self.lm_head(x if query_index is not None else kv.logits_rows(x, logits_index, None))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return kv.DiffusionLMOutput(loss=loss, logits=logits, hidden_states=tuple(hidden) if hidden else None,
                                    kv_cache=ctx.result())


AutoConfig.register(MODEL_TYPE, DiffpoConfig, exist_ok=True)
AutoModelForMaskedLM.register(DiffpoConfig, DiffpoForMaskedLM, exist_ok=True)
