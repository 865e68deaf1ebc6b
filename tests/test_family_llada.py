"""Native LLaDA (diffpo_serve.dllm.families.llada) through load_model: the published checkpoint layout, the
maths, padding, every sampler batch == alone, EOS ids, training hooks, and the padding probe for remote code.

Checkpoints are written here in the published layout (config.json with the published field names and its
auto_map, sharded safetensors under the published parameter names with model.safetensors.index.json, a
tokenizer.json) from tiny random tensors; nothing is downloaded. The expected logits come from
:func:`reference_logits`, LLaDA's forward pass written out in this file from the architecture (pre-norm
RMSNorm, RoPE on rotate-half pairs, GQA, act(ff_proj) * up_proj), independent of the module under test.
"""

import json
import logging
import math
import textwrap
import uuid

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

from diffpo_serve.dllm.families.llada import LLaDAConfig, LLaDAModelLM
from diffpo_serve.dllm.forward import ignores_padding, model_logits
from diffpo_serve.dllm.loading import LoadedModel, ModelLoadError, load_model, transformer_layers
from benchmarks.llada_reference import llada_generate
from diffpo_serve.dllm.sampler import SamplingParams, generate

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>", "<|startoftext|>"]
VOCAB = SPECIAL + WORDS  # ids: endoftext 0, eot 1, mask 2, bos 3, words 4..43
EOT, TURN_END, MASK = 0, 1, 2
VOCAB_SIZE, EMBEDDING_SIZE = 48, 64  # the embedding is padded past the vocabulary, as LLaDA's may be

BASE = dict(  # LLaDA-8B-Instruct's config.json, shrunk
    activation_type="silu", alibi=False, alibi_bias_max=8.0, architectures=["LLaDAModelLM"],
    attention_dropout=0.0, attention_layer_norm=False, attention_layer_norm_with_affine=True,
    auto_map={"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
              "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    bias_for_layer_norm=False, block_group_size=1, block_type="llama", d_model=32, embedding_dropout=0.0,
    embedding_size=EMBEDDING_SIZE, eos_token_id=EOT, flash_attention=False, include_bias=False,
    include_qkv_bias=False, init_cutoff_factor=None, init_device="meta", init_fn="mitchell", init_std=0.02,
    input_emb_norm=False, layer_norm_type="rms", layer_norm_with_affine=True, mask_token_id=MASK,
    max_sequence_length=128, mlp_hidden_size=48, mlp_ratio=4, model_type="llada", multi_query_attention=None,
    n_heads=4, n_kv_heads=4, n_layers=2, pad_token_id=EOT, precision="amp_bf16", residual_dropout=0.0,
    rms_norm_eps=1e-05, rope=True, rope_full_precision=True, rope_theta=500000.0, scale_logits=False,
    torch_dtype="float32", transformers_version="4.46.3", use_cache=False, vocab_size=VOCAB_SIZE,
    weight_tying=False,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def published_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the published parameter names and shapes for ``cfg`` (random norms too, so a
    norm applied in the wrong place shows)."""
    g = torch.Generator().manual_seed(seed)
    d, heads = cfg["d_model"], cfg["n_heads"]
    kv = kv_heads_of(cfg) * (d // heads)
    hidden, emb = mlp_width(cfg), cfg["embedding_size"] or cfg["vocab_size"]
    bias = cfg["include_bias"]
    qkv_bias = bias or cfg["include_qkv_bias"]

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    def norm(name, size, affine=cfg["layer_norm_with_affine"]):
        if affine:
            t[name + ".weight"] = 1 + rand(size)
            if norm_bias(cfg):
                t[name + ".bias"] = rand(size)

    t = {"model.transformer.wte.weight": rand(emb, d, scale=1.0)}
    norm("model.transformer.ln_f", d)
    if not cfg["weight_tying"]:
        t["model.transformer.ff_out.weight"] = rand(emb, d)
        if bias:
            t["model.transformer.ff_out.bias"] = rand(emb)
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shapes = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "attn_out": (d, d),
                  "ff_proj": (hidden, d), "up_proj": (hidden, d), "ff_out": (d, hidden)}
        for name, shape in shapes.items():
            t[p + name + ".weight"] = rand(*shape, scale=1 / math.sqrt(shape[1]))
            if bias or (qkv_bias and name in ("q_proj", "k_proj", "v_proj")):
                t[p + name + ".bias"] = rand(shape[0], scale=0.1)
        norm(p + "attn_norm", d)
        norm(p + "ff_norm", d)
        if cfg["attention_layer_norm"]:
            norm(p + "q_norm", d, cfg["attention_layer_norm_with_affine"])
            norm(p + "k_norm", kv, cfg["attention_layer_norm_with_affine"])
    return t


def kv_heads_of(cfg: dict) -> int:
    """Key/value heads as the published config counts them: n_kv_heads, else 1 with multi_query_attention."""
    if cfg["n_kv_heads"] is not None:
        return cfg["n_kv_heads"]
    return 1 if cfg["multi_query_attention"] else cfg["n_heads"]


def mlp_width(cfg: dict) -> int:
    return cfg["mlp_hidden_size"] if cfg["mlp_hidden_size"] is not None else cfg["mlp_ratio"] * cfg["d_model"]


def norm_bias(cfg: dict) -> bool:
    return cfg["include_bias"] if cfg["bias_for_layer_norm"] is None else cfg["bias_for_layer_norm"]


def reference_logits(t: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward pass for one unpadded row batch (b, l), written out from the architecture."""
    d, heads = cfg["d_model"], cfg["n_heads"]
    kv_heads, hd = kv_heads_of(cfg), d // heads
    b, l = ids.shape

    def lin(x, name):
        return F.linear(x, t[name + ".weight"], t.get(name + ".bias"))

    def rms(x, name):  # the config's layer norm, with its weight and bias where the checkpoint has them
        weight, b_ = t.get(name + ".weight"), t.get(name + ".bias")
        if cfg["layer_norm_type"] in ("default", "low_precision"):
            return F.layer_norm(x, x.shape[-1:], weight, b_, 1e-5)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])
        if weight is not None:
            x = x * (1 + weight) if cfg["layer_norm_type"] == "gemma_rms" else x * weight
        return x if b_ is None else x + b_

    act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[cfg["activation_type"]]

    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(l).float()[:, None] * inv
    ang = torch.cat([ang, ang], -1)

    def rope(x):  # b, h, l, hd: pairs (i, i + hd/2) rotated by the position's angle
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()

    x = t["model.transformer.wte.weight"][ids]
    if cfg["input_emb_norm"]:
        x = x * math.sqrt(d)
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, p + "attn_norm")
        q, k = lin(h, p + "q_proj"), lin(h, p + "k_proj")
        if cfg["attention_layer_norm"]:  # on the whole projections, before the heads are split
            q, k = rms(q, p + "q_norm"), rms(k, p + "k_norm")
        q = rope(q.view(b, l, heads, hd).transpose(1, 2))
        k = rope(k.view(b, l, kv_heads, hd).transpose(1, 2))
        v = lin(h, p + "v_proj").view(b, l, kv_heads, hd).transpose(1, 2)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v  # bidirectional: no causal mask
        x = x + lin(att.transpose(1, 2).reshape(b, l, d), p + "attn_out")
        h = rms(x, p + "ff_norm")
        x = x + lin(act(lin(h, p + "ff_proj")) * lin(h, p + "up_proj"), p + "ff_out")
    x = rms(x, "model.transformer.ln_f")
    head = "model.transformer.wte" if cfg["weight_tying"] else "model.transformer.ff_out"
    logits = lin(x, head)
    return logits / math.sqrt(d) if cfg["scale_logits"] else logits


def write_tokenizer(directory, chat_template: str | None = None) -> None:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|startoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)


def write_checkpoint(directory, shards: int = 3, seed: int = 0, drop=(), generation: dict | None = None,
                     chat_template: str | None = None, **overrides) -> tuple[dict, dict]:
    """A checkpoint in the published layout; returns (config dict, tensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {**BASE, **overrides}
    tensors = {k: v for k, v in published_tensors(cfg, seed).items() if k not in drop}
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": sum(v.numel() * 4 for v in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    write_tokenizer(directory, chat_template)
    return cfg, tensors


def rows(seed=3, b=3, l=11):
    return torch.randint(4, VOCAB_SIZE, (b, l), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the published layout


@pytest.mark.parametrize("variant", [
    {},
    {"n_kv_heads": 2},  # grouped-query attention
    {"include_bias": True},  # biases everywhere
    {"include_qkv_bias": True, "scale_logits": True, "rope_theta": 10000.0, "rms_norm_eps": 0.25},
    {"weight_tying": True},
    # the other variants the published code builds and the native module accepts (no LLaDA checkpoint uses them)
    {"layer_norm_type": "default", "bias_for_layer_norm": True},  # LayerNorm (eps 1e-5) with biases
    {"layer_norm_type": "low_precision", "layer_norm_with_affine": False},  # no norm weights at all
    {"layer_norm_type": "gemma_rms", "bias_for_layer_norm": None, "include_bias": True},  # * (1 + w) + b
    {"attention_layer_norm": True, "n_kv_heads": 2, "bias_for_layer_norm": True},  # q/k norms, GQA-sized k's
    {"input_emb_norm": True, "mlp_hidden_size": None, "mlp_ratio": 2, "activation_type": "gelu"},
    {"activation_type": "relu", "multi_query_attention": True, "n_kv_heads": None,  # one key/value head
     "embedding_size": VOCAB_SIZE},  # an embedding exactly the vocabulary's size
])
def test_published_layout_loads_natively_with_the_reference_logits(tmp_path, variant):
    cfg, tensors = write_checkpoint(tmp_path / "llada", **variant)
    loaded = load_model(tmp_path / "llada")  # trust_remote_code=False, and no modelling code in the directory
    assert type(loaded.model) is LLaDAModelLM and type(loaded.model.config) is LLaDAConfig
    assert loaded.model.dtype == torch.float32
    state = loaded.model.state_dict()
    for name, value in tensors.items():  # every published tensor landed under its own name
        assert torch.equal(state[name], value), name
    ids = rows()
    with torch.no_grad():
        ours = model_logits(loaded.model, ids, torch.ones_like(ids, dtype=torch.bool))
    expected = reference_logits(tensors, cfg, ids)
    assert ours.shape == (3, 11, cfg["embedding_size"] or VOCAB_SIZE)
    assert (ours - expected).abs().max() < 1e-5 * expected.abs().max()


def test_auto_classes_pick_the_native_class_despite_auto_map(tmp_path):
    write_checkpoint(tmp_path / "llada")
    assert type(AutoConfig.from_pretrained(tmp_path / "llada", trust_remote_code=False)) is LLaDAConfig
    model = AutoModel.from_pretrained(tmp_path / "llada", trust_remote_code=False)
    assert type(model) is LLaDAModelLM
    # even when remote code is allowed, a native family never runs the checkpoint's (absent) code
    assert type(load_model(tmp_path / "llada", trust_remote_code=True).model) is LLaDAModelLM


def test_save_pretrained_writes_exactly_the_published_names(tmp_path):
    cfg, tensors = write_checkpoint(tmp_path / "src", n_kv_heads=2)
    model = load_model(tmp_path / "src").model
    model.save_pretrained(tmp_path / "out")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(tensors)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "embedding_size", "rope_theta",
                "weight_tying", "block_type", "mask_token_id"):
        assert saved[key] == cfg[key], key


@pytest.mark.parametrize("kept", ["model.transformer.wte.weight", "model.transformer.ff_out.weight"])
def test_tied_checkpoint_loads_from_either_name(tmp_path, kept):
    cfg = {**BASE, "weight_tying": True}
    tensors = published_tensors(cfg)
    write_checkpoint(tmp_path / "tied", shards=1, weight_tying=True)
    # rewrite it with the tied matrix stored under one name only (which one depends on who saved it)
    (tmp_path / "tied" / "model.safetensors.index.json").unlink()
    for f in (tmp_path / "tied").glob("model-*.safetensors"):
        f.unlink()
    single = {k: v for k, v in tensors.items() if k != "model.transformer.wte.weight"}
    single[kept] = tensors["model.transformer.wte.weight"]
    save_file(single, str(tmp_path / "tied" / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(tmp_path / "tied").model
    t = model.model.transformer
    assert t.ff_out.weight.data_ptr() == t.wte.weight.data_ptr()
    assert torch.equal(t.wte.weight, tensors["model.transformer.wte.weight"])
    ids = rows()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference_logits(tensors, cfg, ids), atol=1e-5)


@pytest.mark.parametrize("overrides,named", [
    ({"block_type": "sequential"}, "block_type"), ({"alibi": True}, "RoPE"), ({"rope": False}, "RoPE"),
    ({"block_group_size": 2}, "block_group_size"), ({"activation_type": "swiglu"}, "activation_type"),
    ({"layer_norm_type": "l2"}, "layer_norm_type='l2'"),
    ({"embedding_size": VOCAB_SIZE - 1}, "embedding_size=47 < vocab_size=48"),
    ({"n_kv_heads": 3}, "n_kv_heads=3"),  # 4 query heads do not divide into 3 key/value heads
    ({"n_kv_heads": 4, "multi_query_attention": True}, "n_kv_heads=4 contradicts multi_query_attention=True"),
    ({"n_kv_heads": 1, "multi_query_attention": False}, "n_kv_heads=1 contradicts multi_query_attention=False"),
])
def test_unsupported_variants_are_refused_by_name(tmp_path, overrides, named):
    write_checkpoint(tmp_path / "odd", **overrides)
    with pytest.raises(ModelLoadError, match=named):
        load_model(tmp_path / "odd")


def test_missing_shard_tensor_is_an_error_naming_it(tmp_path):
    write_checkpoint(tmp_path / "broken", drop=("model.transformer.blocks.1.up_proj.weight",))
    with pytest.raises(ModelLoadError, match="blocks.1.up_proj.weight"):
        load_model(tmp_path / "broken")


# ----------------------------------------------------------------------------- padding and positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_row_sees_what_it_sees_alone(tmp_path, dtype):
    write_checkpoint(tmp_path / "llada")
    model = load_model(tmp_path / "llada", dtype=dtype).model
    row = rows(b=1, l=9)
    # left padding (3) and padding between prompt (4 tokens) and the rest (5), as the bf16 layout has
    canvas = torch.cat([torch.full((1, 3), 7), row[:, :4], torch.full((1, 2), 9), row[:, 4:]], 1)
    attention = torch.ones_like(canvas, dtype=torch.bool)
    attention[:, :3] = attention[:, 7:9] = False
    real = attention[0]
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model_logits(model, row, torch.ones_like(row, dtype=torch.bool)).float()
        inside = model_logits(model, canvas, attention, positions)[:, real].float()
        unpositioned = model(canvas, attention_mask=attention,
                             position_ids=torch.arange(canvas.shape[1])[None]).logits[:, real].float()
    if dtype == torch.bfloat16:  # bit for bit: the padding is left out of attention's sums, not only masked
        assert torch.equal(alone, inside)
    else:  # float32 on several CPU threads rounds products of another row count differently, padding or not
        assert (alone - inside).abs().max() <= 1e-5 * alone.abs().max()
    # the positions matter: the same tokens at their column indices give other logits
    assert (alone - unpositioned).abs().max() > 0.05 * alone.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params", [
    SamplingParams(sampler="steps", gen_length=8, block_length=4, steps=8),
    SamplingParams(sampler="steps", gen_length=8, block_length=8, steps=4),
    SamplingParams(sampler="confidence", gen_length=8, block_length=4, threshold=0.3),
    SamplingParams(sampler="eb", gen_length=8, block_length=8, threshold=0.5),
])
def test_greedy_batch_equals_alone_for_every_sampler(tmp_path_factory, dtype, params):
    directory = tmp_path_factory.getbasetemp() / "llada-batch"
    if not directory.exists():
        write_checkpoint(directory, seed=5)
    loaded = load_model(directory, dtype=dtype)
    prompts = [[4, 5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17], [20]]
    kw = dict(mask_id=loaded.mask_id, eos_id=loaded.eos_id, eos_ids=loaded.eos_ids, pad_id=loaded.pad_id)
    batched = generate(loaded.model, prompts, params, **kw)
    outputs = set()
    for i, prompt in enumerate(prompts):
        alone = generate(loaded.model, [prompt], params, **kw)
        assert batched.sequences[i].tolist() == alone.sequences[0].tolist(), (i, dtype)
        assert batched.nfe[i] == alone.nfe[0]
        outputs.add(tuple(alone.sequences[0].tolist()))
    assert len(outputs) > 1  # the prompts matter (a model that ignored them would pass the rest trivially)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_equals_llada_published_sampler_alone_and_batched(tmp_path_factory, dtype):
    """Greedy ``steps`` on native LLaDA gives LLaDA's published sampler's tokens, token for token
    (``benchmarks/llada_reference.py``: one unpadded row, scores = softmax in the logits' dtype, torch.topk's
    order among ties), alone and in a batch of mixed prompt lengths. In bfloat16 both halves matter: the
    scores tie often at 8 significant bits, and the sampler's half-precision layout pads even a lone row
    (prompts of 3-30 tokens, regions rounded up to 16 columns), which must not change its attention sums."""
    directory = tmp_path_factory.getbasetemp() / "llada-published-sampler"
    if not directory.exists():
        write_checkpoint(directory, seed=11)
    loaded = load_model(directory, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, VOCAB_SIZE, (n,), generator=g).tolist() for n in (3, 5, 9, 12, 17, 30)]
    kw = dict(mask_id=MASK, eos_id=loaded.eos_id, pad_id=loaded.pad_id, stop_at_eos=False)
    for gen_length, block_length, steps in [(16, 16, 16), (32, 8, 16), (24, 8, 24), (32, 32, 8)]:
        params = SamplingParams("steps", gen_length, block_length, steps)
        batched = generate(loaded.model, prompts, params, **kw)
        for i, prompt in enumerate(prompts):
            expected = llada_generate(loaded.model, prompt, gen_length=gen_length, block_length=block_length,
                                      steps=steps, mask_id=MASK).tolist()
            assert MASK not in expected  # the published sampler never picked the mask token here
            alone = generate(loaded.model, [prompt], params, **kw).sequences[0, :gen_length].tolist()
            assert alone == expected, (dtype, gen_length, block_length, steps, len(prompt))
            assert batched.sequences[i, :gen_length].tolist() == expected


# ----------------------------------------------------------------------------- special ids


def test_ids_from_config_and_generation_config(tmp_path):
    write_checkpoint(tmp_path / "ids", generation={"eos_token_id": [TURN_END, EOT], "pad_token_id": EOT})
    loaded = load_model(tmp_path / "ids")
    assert loaded.mask_id == MASK
    assert loaded.eos_ids == (TURN_END, EOT) and loaded.eos_id == TURN_END  # generation config first
    assert loaded.pad_id == EOT
    override = load_model(tmp_path / "ids", mask_id=40, pad_id=41, eos_ids=[42, 43])
    assert (override.mask_id, override.pad_id, override.eos_id, override.eos_ids) == (40, 41, 42, (42, 43))


def test_chat_template_turn_end_is_an_eos(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    write_checkpoint(tmp_path / "chat", chat_template=template, mask_token_id=None)
    loaded = load_model(tmp_path / "chat")
    assert loaded.eos_ids == (EOT, TURN_END) and loaded.eos_id == EOT  # fills with <|endoftext|>
    assert loaded.mask_id == MASK  # the config has none: the tokenizer's <|mdm_mask|>
    assert loaded.decode([5, 6, TURN_END, 7, EOT]) == ("w1 w2", True)
    assert loaded.decode([5, EOT, 6, TURN_END]) == ("w1", True)
    assert loaded.decode([5, 6]) == ("w1 w2", False)


class Scripted(torch.nn.Module):
    """Commits, at generation position j of row r, ``script[r][j]`` (a one-hot logit per position)."""

    def __init__(self, script, prompt_len, vocab=VOCAB_SIZE):
        super().__init__()
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kw):
        b, l = input_ids.shape
        logits = torch.zeros(b, l, self.vocab)
        for r in range(b):
            row = self.script[int(input_ids[r, 0]) - 30]  # the first prompt token names the row's script
            for j, tok in enumerate(row):
                logits[r, self.prompt_len + j, tok] = 10.0 - 0.1 * j  # earlier positions more confident
        return type("Out", (), {"logits": logits})()


def test_every_eos_id_stops_a_row_and_fills_it_with_the_first():
    script = [[5, TURN_END, 6, 7, 8, 9], [5, 6, EOT, 7, 8, 9], [5, 6, 7, 8, 9, 10]]
    model = Scripted(script, prompt_len=2)
    params = SamplingParams(sampler="steps", gen_length=6, steps=6)
    out = generate(model, [[30, 4], [31, 4], [32, 4]], params, mask_id=MASK, eos_id=EOT, eos_ids=[EOT, TURN_END],
                   pad_id=EOT, align=0)
    assert out.sequences.tolist() == [[5, TURN_END, EOT, EOT, EOT, EOT], [5, 6, EOT, EOT, EOT, EOT],
                                      [5, 6, 7, 8, 9, 10]]
    assert out.nfe.tolist() == [2, 3, 6]  # one token per pass: each row stops at its own EOS
    only_first = generate(model, [[30, 4]], params, mask_id=MASK, eos_id=EOT, pad_id=EOT, align=0)
    assert only_first.sequences[0].tolist() == script[0] and only_first.nfe.tolist() == [6]


def test_loaded_model_eos_ids_survive_without_weights(tmp_path):
    write_checkpoint(tmp_path / "p", generation={"eos_token_id": [EOT, TURN_END]})
    import pickle
    front = pickle.loads(pickle.dumps(load_model(tmp_path / "p").without_weights()))
    assert front.eos_ids == (EOT, TURN_END) and front.decode([4, TURN_END, 5]) == ("w0", True)
    assert LoadedModel(None, None, 1, 2, 3, "p", "p", 8).eos_ids == (3,)


# ----------------------------------------------------------------------------- training hooks


def test_gradient_checkpointing_lora_and_layers(tmp_path):
    write_checkpoint(tmp_path / "train")
    model = load_model(tmp_path / "train").model
    assert list(transformer_layers(model)) == ["model.transformer.blocks.0", "model.transformer.blocks.1"]
    ids = rows()

    def grads():
        model.zero_grad()
        model.train()
        model(ids).logits.float().logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(b.gradient_checkpointing for b in model.model.transformer.blocks)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == len(dict(model.named_parameters()))
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name

    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 3 * 2  # A and B for 3 targets in 2 blocks
    assert all("lora_" in n for n in trainable)


# ----------------------------------------------------------------------------- remote code that ignores padding

MODELING_REMOTE = '''
from diffpo_serve.dllm.families.llada import LLaDAConfig, LLaDAModelLM


class RemoteConfig{suffix}(LLaDAConfig):
    model_type = "remote-llada-{suffix}"


class RemoteModel{suffix}(LLaDAModelLM):
    config_class = RemoteConfig{suffix}
'''

BLIND_FORWARD = '''
    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kwargs):
        """As LLaDA's published code runs: attention_mask ignored, positions are the column indices."""
        return super().forward(input_ids, output_hidden_states=output_hidden_states)
'''


def write_remote(directory, blind: bool, seed=5):
    """A checkpoint whose own code (auto_map) is our LLaDA, with (blind) a forward that ignores padding."""
    suffix = uuid.uuid4().hex[:8]
    write_checkpoint(directory, seed=seed, model_type=f"remote-llada-{suffix}",
                     auto_map={"AutoConfig": f"modeling_remote.RemoteConfig{suffix}",
                               "AutoModel": f"modeling_remote.RemoteModel{suffix}"})
    code = MODELING_REMOTE.format(suffix=suffix) + (BLIND_FORWARD if blind else "")
    (directory / "modeling_remote.py").write_text(code)
    return suffix


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remote_model_that_ignores_padding_decodes_unpadded(tmp_path, caplog, dtype):
    suffix = write_remote(tmp_path / "blind", blind=True)
    with caplog.at_level(logging.WARNING, logger="diffpo_serve.dllm.loading"):
        loaded = load_model(tmp_path / "blind", trust_remote_code=True, dtype=dtype)
    assert type(loaded.model).__name__ == f"RemoteModel{suffix}"
    assert ignores_padding(loaded.model)
    assert "padding changes this model's output" in caplog.text
    prompts = [[4, 5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17], [18, 19]]
    params = SamplingParams(sampler="steps", gen_length=8, block_length=4, steps=8)
    kw = dict(mask_id=loaded.mask_id, eos_id=loaded.eos_id, pad_id=loaded.pad_id)
    batched = generate(loaded.model, prompts, params, **kw)
    outputs = set()
    for i, prompt in enumerate(prompts):
        alone = generate(loaded.model, [prompt], params, **kw, align=0)  # one row, no padding at all
        assert batched.sequences[i, :8].tolist() == alone.sequences[0].tolist(), i
        assert batched.nfe[i] == alone.nfe[0]
        outputs.add(tuple(alone.sequences[0].tolist()))
    assert len(outputs) > 1
    # what the unpadded path prevents: the same model run on the padded batch directly decodes otherwise
    setattr(loaded.model, "_diffpo_ignores_padding", False)
    padded = generate(loaded.model, prompts, params, **kw)
    assert padded.sequences.tolist() != batched.sequences.tolist()


def test_honest_remote_model_is_not_marked(tmp_path, caplog):
    write_remote(tmp_path / "honest", blind=False)
    with caplog.at_level(logging.WARNING, logger="diffpo_serve.dllm.loading"):
        loaded = load_model(tmp_path / "honest", trust_remote_code=True)
    assert type(loaded.model).__name__.startswith("RemoteModel") and not ignores_padding(loaded.model)
    assert "padding changes" not in caplog.text
