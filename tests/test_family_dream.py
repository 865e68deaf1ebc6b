"""The native Dream family (diffpo_serve/dllm/families/dream.py) on tiny checkpoints written here in the
published layout (config.json field names, sharded safetensors with an index, Dream's tokenizer files);
nothing is downloaded. The expected logits come from :func:`reference_logits`, Dream's forward written out
in this file from the architecture, independent of the module under test."""

import json
import math
import pickle

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, GenerationConfig

from diffpo_serve.dllm import loading
from diffpo_serve.dllm.families import dream
from diffpo_serve.dllm.families.dream import (DreamConfig, DreamModel, apply_rope, rope_inverse_frequencies,
                                              rope_tables, shift_to_token_positions)
from diffpo_serve.dllm.sampler import SamplingParams, generate

# ----------------------------------------------------------------------------- a tiny published checkpoint

# byte-level BPE as Qwen2/Dream ship it: the 256 byte symbols, a few merges, then the added special tokens
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
ENDOFTEXT, IM_START, IM_END, BEGIN, MASK = range(265, 270)
VOCAB = 272  # the embedding is wider than the tokenizer, as Qwen's is
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable-character map (the base alphabet of byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tokenizer(path, chat_template=True):
    vocab = {s: i for i, s in enumerate(byte_symbols())}
    for merge in MERGES:
        vocab["".join(merge.split())] = len(vocab)
    assert len(vocab) == ENDOFTEXT
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    added = {str(ENDOFTEXT + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True} for i, t in enumerate(SPECIALS)}
    settings = {"added_tokens_decoder": added, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
                "bos_token": "<|beginoftext|>", "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
                "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
                "split_special_tokens": False, "tokenizer_class": "DreamTokenizer", "unk_token": None}
    if chat_template:
        settings["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


PUBLISHED_CONFIG = {  # Dream-v0's config.json fields, at a tiny size
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": ENDOFTEXT, "eos_token_id": ENDOFTEXT, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 96, "mask_token_id": MASK, "max_position_embeddings": 512,
    "max_window_layers": 2, "model_type": "Dream", "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "pad_token_id": ENDOFTEXT, "rms_norm_eps": 1e-6, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False, "vocab_size": VOCAB,
}
PUBLISHED_GENERATION_CONFIG = {"_from_model_config": True, "alg": "origin", "alg_temp": None,
                               "bos_token_id": ENDOFTEXT, "eos_token_id": ENDOFTEXT, "eps": 0.001,
                               "mask_token_id": None, "output_history": False, "pad_token_id": ENDOFTEXT,
                               "steps": 512, "temperature": 0.0, "top_k": None, "top_p": None,
                               "transformers_version": "4.46.2"}
PUBLISHED_NAMES = (["model.embed_tokens.weight"]
                   + [f"model.layers.{i}.{name}" for i in range(2) for name in (
                       "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                       "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                       "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                       "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")]
                   + ["model.norm.weight", "lm_head.weight"])


def config_dict(**overrides) -> dict:
    return {**PUBLISHED_CONFIG, **overrides}


def random_model(seed=0, init=0.2, **overrides) -> DreamModel:
    """A random Dream with random norms and biases too (a fresh init leaves them at 1 and 0)."""
    fields = {k: v for k, v in config_dict(**overrides).items()
              if k not in ("architectures", "auto_map", "model_type", "torch_dtype", "transformers_version")}
    torch.manual_seed(seed)
    model = DreamModel(DreamConfig(**{**fields, "initializer_range": init})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model


def write_checkpoint(path, model: DreamModel, *, dtype=torch.bfloat16, shards=3, tokenizer=True, **config_overrides):
    """``model`` in Dream's published file layout: config.json, generation_config.json, safetensors shards
    named model-0000i-of-0000n with model.safetensors.index.json, and the tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    config = config_dict(**{**{k: getattr(model.config, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "rope_theta", "tie_word_embeddings", "vocab_size", "mask_token_id", "pad_token_id")}, **config_overrides})
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if config["tie_word_embeddings"]:
        del state["lm_head.weight"]
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(PUBLISHED_GENERATION_CONFIG, indent=2))
    if tokenizer:
        write_tokenizer(path)
    return path


PROMPTS = [[17, 40, 99, 3, 250, 8, 71], [5, 9], [120, 33, 64, 200, 11], [77]]


# ----------------------------------------------------------------------------- layout and loading

def test_published_parameter_names(tmp_path):
    model = random_model()
    assert sorted(model.state_dict()) == sorted(PUBLISHED_NAMES)
    assert set(model._no_split_modules) == {"DreamDecoderLayer"}
    assert [type(m).__name__ for m in loading.transformer_layers(model).values()] == ["DreamDecoderLayer"] * 2


@pytest.mark.parametrize("auto", [AutoModel, AutoModelForMaskedLM])
def test_round_trip_through_the_published_layout(tmp_path, auto):
    model = random_model()
    path = write_checkpoint(tmp_path / "dream", model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    assert type(config) is DreamConfig
    assert (config.num_key_value_heads, config.rope_theta, config.mask_token_id) == (2, 1e6, MASK)
    ids = torch.tensor([[ENDOFTEXT, 17, 40, 99, MASK, MASK, MASK, 3]])
    with torch.no_grad():
        # as published (bfloat16 weights, the config's torch_dtype) and upcast to float32 on load
        for dtype in (torch.bfloat16, torch.float32):
            loaded = auto.from_pretrained(path, trust_remote_code=False, local_files_only=True, dtype=dtype).eval()
            assert type(loaded) is DreamModel and loaded.lm_head.weight.dtype == dtype
            expected = random_model().to(torch.bfloat16).to(dtype)  # same weights, never saved
            assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_tied_embeddings_load_without_an_lm_head_tensor(tmp_path):
    model = random_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = write_checkpoint(tmp_path / "tied", model, dtype=torch.float32)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    loaded, info = AutoModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"]
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)
    ids = torch.tensor([[3, 4, MASK, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_config_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="rope_scaling"):
        DreamConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        DreamConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="rope_parameters"):
        DreamConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    with pytest.raises(ValueError, match="disagrees"):
        DreamConfig(rope_theta=1e4, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert DreamConfig(rope_scaling={"type": "default"}).rope_theta == 10000.0
    # the RoPE fields as transformers 5 writes them (e.g. the published config class saved under it)
    assert DreamConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e6}).rope_theta == 1e6


# ----------------------------------------------------------------------------- RoPE

def test_rope_tables_equal_a_hand_computation():
    theta, d = 1e6, 8
    expected = [theta ** (-2 * j / d) for j in range(d // 2)]
    assert torch.allclose(rope_inverse_frequencies(d, theta).double(), torch.tensor(expected, dtype=torch.float64),
                          rtol=1e-6, atol=0)
    positions = torch.tensor([[0, 1, 7, 300]])
    cos, sin = rope_tables(positions, d, theta, torch.float32)
    for i, p in enumerate(positions[0].tolist()):
        for j in range(d):
            angle = p * expected[j % (d // 2)]  # each half repeats the frequencies (rotate-half layout)
            assert cos[0, i, j].item() == pytest.approx(math.cos(angle), abs=1e-5)
            assert sin[0, i, j].item() == pytest.approx(math.sin(angle), abs=1e-5)


def test_apply_rope_rotates_each_pair_by_its_angle():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)  # b, h, l, d
    cos, sin = rope_tables(torch.tensor([[5]]), 4, 100.0, torch.float32)
    a0, a1 = 5.0, 5.0 / 10  # angles of the pairs (x0, x2) and (x1, x3)
    expected = [1 * math.cos(a0) - 3 * math.sin(a0), 2 * math.cos(a1) - 4 * math.sin(a1),
                3 * math.cos(a0) + 1 * math.sin(a0), 4 * math.cos(a1) + 2 * math.sin(a1)]
    assert apply_rope(x, cos, sin).flatten().tolist() == pytest.approx(expected, abs=1e-5)


def test_rope_after_loading_in_every_dtype(tmp_path):
    """Loading leaves no RoPE state behind: the loaded model equals a fresh one with the same weights, theta
    is read from config.json, and attention sees only relative positions (a shift of all positions is
    invisible), which a wrong rotation would break."""
    model = random_model(seed=3)
    path = write_checkpoint(tmp_path / "dream", model, dtype=torch.float32)
    ids = torch.tensor([[11, 12, 13, MASK, MASK, 14, MASK, 15]])
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            loaded = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype).eval()
            fresh = DreamModel(model.config).to(dtype).eval()
            fresh.load_state_dict(model.state_dict())
            assert torch.equal(loaded(ids).logits, fresh(ids).logits)
        loaded = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        positions = torch.arange(8)[None]
        base = loaded(ids, position_ids=positions).logits
        assert torch.allclose(loaded(ids, position_ids=positions + 37).logits, base, atol=1e-4)
        assert not torch.allclose(loaded(ids, position_ids=positions.flip(-1)).logits, base, atol=1e-2)
        other = write_checkpoint(tmp_path / "theta", model, dtype=torch.float32, rope_theta=10.0)
        assert AutoConfig.from_pretrained(other).rope_theta == 10.0
        assert not torch.allclose(AutoModel.from_pretrained(other).eval()(ids).logits, base, atol=1e-2)


# ----------------------------------------------------------------------------- the shift

def test_shift_takes_the_previous_real_position():
    h = torch.arange(6.0).view(1, 6, 1)
    assert shift_to_token_positions(h, None).flatten().tolist() == [0, 0, 1, 2, 3, 4]
    # left padding (0, 1), a padded gap (4) between prompt and answer: the first real token (2) keeps its own,
    # the token after the gap (5) takes the last real one before it (3)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1]], dtype=torch.bool)
    assert shift_to_token_positions(h, mask).flatten().tolist() == [0, 1, 2, 2, 3, 3]


def test_model_output_is_the_checkpoint_output_shifted():
    """Position i's logits are the network's output at the real position before i (the output at i
    predicts token i + 1 in Dream's checkpoint); its last hidden state goes with the logits."""
    model = random_model(seed=1)
    ids = torch.tensor([[3, 8, 21, MASK, MASK, 40]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        raw, _ = model.model(ids)
        unshifted = model.lm_head(raw)
    assert torch.allclose(out.logits[:, 1:], unshifted[:, :-1], atol=1e-5)
    assert torch.allclose(out.logits[:, 0], unshifted[:, 0], atol=1e-5)
    assert not torch.allclose(out.logits[:, 1:], unshifted[:, 1:], atol=0.1)
    assert torch.allclose(model.lm_head(out.hidden_states[-1]), out.logits, atol=1e-5)
    assert len(out.hidden_states) == 3  # embeddings, layer 1, final (normed, shifted)


def reference_logits(t: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """Dream's forward for unpadded rows (b, l), written out from the architecture from the published tensors:
    Qwen2's decoder without its causal mask (pre-norm RMSNorm, biased q/k/v, RoPE on rotate-half pairs, GQA,
    silu(gate) * up), then Dream's shift: the logits at position i are the network's at i - 1 (i = 0 keeps its own)."""
    d, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, (b, l) = d // heads, ids.shape

    def lin(x, name):
        return torch.nn.functional.linear(x, t[name + ".weight"], t.get(name + ".bias"))

    def rms(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * t[name + ".weight"]

    ang = torch.arange(l).float()[:, None] / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.cat([ang, ang], -1)

    def rope(x):
        return x * ang.cos() + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * ang.sin()

    x = t["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, p + "input_layernorm")
        q = rope(lin(h, p + "self_attn.q_proj").view(b, l, heads, hd).transpose(1, 2))
        k = rope(lin(h, p + "self_attn.k_proj").view(b, l, kv_heads, hd).transpose(1, 2))
        v = lin(h, p + "self_attn.v_proj").view(b, l, kv_heads, hd).transpose(1, 2)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v  # every position sees every other
        x = x + lin(att.transpose(1, 2).reshape(b, l, d), p + "self_attn.o_proj")
        h = rms(x, p + "post_attention_layernorm")
        x = x + lin(torch.nn.functional.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"),
                    p + "mlp.down_proj")
    logits = lin(rms(x, "model.norm"), "model.embed_tokens" if cfg["tie_word_embeddings"] else "lm_head")
    return torch.cat([logits[:, :1], logits[:, :-1]], 1)


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 4}, {"num_key_value_heads": 1,
                                       "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 0.1}])
def test_published_checkpoint_gives_the_reference_logits(tmp_path, overrides):
    """Loaded from the published layout, the native module computes the architecture written out above."""
    path = write_checkpoint(tmp_path / "dream", random_model(seed=4, **overrides), dtype=torch.float32)
    cfg = json.loads((path / "config.json").read_text())
    from safetensors.torch import load_file
    tensors = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    ids = torch.randint(0, ENDOFTEXT, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids).logits
    expected = reference_logits(tensors, cfg, ids)
    assert ours.shape == expected.shape == (3, 9, VOCAB)
    assert (ours - expected).abs().max() < 1e-5 * expected.abs().max()


def successor_model(chain: list[int]) -> DreamModel:
    """A hand-built Dream whose output at a position holding chain[k] puts almost all mass on chain[k + 1]
    (next-token prediction, as Dream's checkpoint does) and is uniform at any other token (the mask)."""
    config = DreamConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, mask_token_id=MASK, pad_token_id=ENDOFTEXT)
    model = DreamModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the layer adds nothing to the residual stream
        model.model.norm.weight.fill_(1.0)
        for k, (token, successor) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token, k] = 1.0  # one-hot, normed to sqrt(32)
            model.lm_head.weight[successor, k] = 4.0  # logit 4 * sqrt(32) ~ 22.6
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_shift_decodes_a_known_string(tmp_path, dtype):
    """Through the published layout, the loader classes, diffpo's sampler and the tokenizer: a model that
    predicts the next token decodes the chain left to right; unshifted it would see only masks. In
    bfloat16 the sampler lays rows out as [prompt | padding | answer]: the shift must skip the padding."""
    path = tmp_path / "dream"
    write_tokenizer(path.mkdir() or path)
    tokenizer = dream.load_tokenizer(path)
    chain = tokenizer.encode("dream!", add_special_tokens=False) + [ENDOFTEXT]
    assert len(set(chain)) == len(chain) == 7
    write_checkpoint(path, successor_model(chain), dtype=torch.float32, tokenizer=False)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype).eval()
    for sampler in ("steps", "confidence"):  # (eb may commit one uniform guess beside a certain token)
        params = SamplingParams(sampler=sampler, gen_length=8, block_length=4)
        out = generate(model, [chain[:1], [IM_START] + chain[:3]], params, mask_id=MASK, eos_id=ENDOFTEXT,
                       pad_id=ENDOFTEXT)  # the default layout for the dtype
        texts = [tokenizer.decode([t for t in row.tolist() if t != ENDOFTEXT]) for row in out.sequences]
        assert texts == ["ream!", "am!"]
        assert out.sequences[0, :8].tolist() == chain[1:] + [ENDOFTEXT] * 2


def test_likelihoods_see_the_shifted_logits():
    """training.likelihood goes through the same interface: a token is certain exactly where the token
    before it is known, and uniform where that one is masked."""
    from training.likelihood import two_stage_logprobs

    chain = [100, 101, 102, 103, 104, 105]
    model = successor_model(chain)
    prompt, completion = torch.tensor([[7, chain[0]]]), torch.tensor([chain[1:]])
    commit_step = torch.arange(5)[None]  # committed left to right, one per pass
    with torch.no_grad():
        logp = two_stage_logprobs(model, prompt, torch.ones_like(prompt, dtype=torch.bool), completion, commit_step,
                                  torch.tensor([3]), torch.zeros_like(prompt, dtype=torch.bool), MASK)[0]
    uniform = -math.log(VOCAB - 1)  # the policy never puts mass on the mask token (sampler.policy_logprobs)
    # pass A (all masks) scores steps 0-2: only the first follows a known token; pass B (z_3 = the first
    # three) scores steps 3-4: the fourth follows a known token, the fifth a mask
    assert logp[[0, 3]].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert logp[[1, 2, 4]].tolist() == pytest.approx([uniform] * 3, abs=1e-5)


# ----------------------------------------------------------------------------- padding and batching

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padded_row_sees_what_it_sees_alone(dtype):
    """Padding (left, or between prompt and answer as the half-precision layout puts it) is left out of the
    attention sums (kv_cache.unpadded_attention), not merely masked: in bfloat16 a padded row's logits are the
    unpadded row's bit for bit. (float32 on several CPU threads: its matrix products round differently for
    another number of rows, padding or not, so there to float32 precision.)"""
    model = random_model(seed=2).to(dtype)
    ids = torch.tensor([[ENDOFTEXT, ENDOFTEXT, 5, 6, 7, MASK, MASK, ENDOFTEXT], [1, 2, 3, 4, 5, MASK, MASK, MASK],
                        [5, 6, ENDOFTEXT, 8, 7, MASK, MASK, ENDOFTEXT]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [1] * 8, [1, 1, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        batched = model(ids, attention_mask=attention).logits  # default positions: cumsum(mask) - 1
        for row in (0, 2):  # no padding, no mask: as Dream's published forward runs a row
            alone = model(ids[row:row + 1, attention[row]]).logits
            if dtype == torch.bfloat16:
                assert torch.equal(batched[row, attention[row]], alone[0]), row
            else:
                assert torch.allclose(batched[row, attention[row]], alone[0], atol=1e-5, rtol=0), row
    assert not torch.allclose(batched[0, 2:7].float(), batched[1, 2:7].float(), atol=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sampler", ["steps", "confidence", "eb"])
def test_greedy_batch_equals_alone(dtype, sampler):
    model = random_model(seed=4, init=0.3).to(dtype)
    params = SamplingParams(sampler=sampler, gen_length=12, block_length=4, steps=6 if sampler == "steps" else None,
                            threshold={"steps": None, "confidence": 0.5, "eb": 0.5}[sampler])
    kw = dict(mask_id=MASK, eos_id=ENDOFTEXT, pad_id=ENDOFTEXT, stop_at_eos=False)
    batched = generate(model, PROMPTS, params, **kw)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], params, **kw)
        assert batched.sequences[i].tolist() == alone.sequences[0].tolist()
        assert batched.nfe[i] == alone.nfe[0]
    assert len({tuple(s) for s in batched.sequences.tolist()}) > 1  # the rows really differ


# ----------------------------------------------------------------------------- training plumbing

def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.tensor([[3, 4, MASK, MASK, 9]])
    grads = []
    for checkpointing in (False, True):
        model = random_model(seed=5).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(ids).logits.float().logsumexp(-1).sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lora_adapters_train_and_the_base_stays():
    import peft  # the train extra: missing, the test fails rather than skips
    model = random_model(seed=6)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    optimiser = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    ids = torch.tensor([[3, 4, MASK, MASK, 9]])
    for _ in range(2):
        loss = lora(input_ids=ids, labels=torch.tensor([[-100, -100, 7, 8, -100]])).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert len(trained) == 2 * 7 * 2 and all("lora_" in n for n in trained)  # A and B, 7 Linears, 2 layers
    for name, value in lora.base_model.model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    merged, q = lora.merge_and_unload().state_dict(), "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])  # the trained adapters moved the merged weights


# ----------------------------------------------------------------------------- tokenizer and special ids

def test_tokenizer_without_remote_code(tmp_path):
    write_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="custom code"):  # why the family needs its own hook
        AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=False, local_files_only=True)
    tokenizer = dream.load_tokenizer(tmp_path)
    ids = tokenizer.encode("hello world<|im_end|><|mask|>", add_special_tokens=False)
    assert ids == [259, 264, IM_END, MASK]  # "hello", " world" (merged), then the added tokens whole
    assert tokenizer.decode(ids[:2]) == "hello world"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) == (ENDOFTEXT, ENDOFTEXT, BEGIN)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                    "<|im_start|>assistant\n")
    copy = pickle.loads(pickle.dumps(tokenizer))  # the server's decoder process receives it pickled
    assert copy.encode("hello world<|mask|>", add_special_tokens=False) == [259, 264, MASK]
    assert copy.chat_template == CHAT_TEMPLATE


def test_tokenizer_from_a_tokenizer_json(tmp_path):
    """A checkpoint that ships tokenizer.json (as a save_pretrained of the loaded tokenizer writes) instead of
    vocab.json + merges.txt loads the same tokenizer."""
    (tmp_path / "slow").mkdir()
    write_tokenizer(tmp_path / "slow")
    dream.load_tokenizer(tmp_path / "slow").save_pretrained(tmp_path / "fast")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "fast" / name).unlink(missing_ok=True)
    tokenizer = dream.load_tokenizer(tmp_path / "fast")
    assert tokenizer.encode("hello world<|im_end|><|mask|>", add_special_tokens=False) == [259, 264, IM_END, MASK]
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_tokenizer_missing_files_are_named(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        dream.load_tokenizer(tmp_path)
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        dream.load_tokenizer(tmp_path)


def test_special_ids(tmp_path):
    write_tokenizer(tmp_path)
    tokenizer = dream.load_tokenizer(tmp_path)
    config = DreamConfig(**{k: v for k, v in PUBLISHED_CONFIG.items() if k not in ("architectures", "auto_map")})
    generation = GenerationConfig(eos_token_id=ENDOFTEXT, pad_token_id=ENDOFTEXT)
    # the instruct model's turn end stops a row too: its chat template ends every turn with <|im_end|>
    assert dream.special_ids(config, tokenizer, generation) == {"mask_id": MASK, "pad_id": ENDOFTEXT,
                                                                 "eos_ids": [ENDOFTEXT, IM_END]}
    # every EOS of the generation config, first one primary; the mask found by name when the config has none
    config.mask_token_id = None
    ids = dream.special_ids(config, tokenizer, GenerationConfig(eos_token_id=[IM_START, ENDOFTEXT]))
    assert ids["eos_ids"] == [IM_START, ENDOFTEXT, IM_END] and ids["mask_id"] == MASK
    plain = tmp_path / "base"
    write_tokenizer(plain.mkdir() or plain, chat_template=False)
    assert dream.special_ids(config, dream.load_tokenizer(plain), None)["eos_ids"] == [ENDOFTEXT]


# ----------------------------------------------------------------------------- load_model

def test_load_model_end_to_end(tmp_path):
    """load_model on the published layout, no trust_remote_code: our class, our tokenizer hook, Dream's ids,
    and the shift through the sampler."""
    path = tmp_path / "Dream-v0-Instruct-7B"
    write_tokenizer(path.mkdir() or path)
    chain = dream.load_tokenizer(path).encode("dream!", add_special_tokens=False) + [IM_END]
    write_checkpoint(path, successor_model(chain), dtype=torch.bfloat16, tokenizer=False)
    loaded = loading.load_model(path)
    assert type(loaded.model) is DreamModel and loaded.model.lm_head.weight.dtype == torch.bfloat16
    assert (loaded.mask_id, loaded.pad_id) == (MASK, ENDOFTEXT)
    assert list(loaded.eos_ids) == [ENDOFTEXT, IM_END]
    out = generate(loaded.model, [chain[:1]], SamplingParams(gen_length=8, block_length=8), mask_id=loaded.mask_id,
                   eos_id=loaded.eos_id, pad_id=loaded.pad_id, stop_at_eos=False)
    assert out.sequences[0, :6].tolist() == chain[1:]
    assert loaded.decode(out.sequences[0, :5].tolist())[0] == "ream!"
    assert pickle.loads(pickle.dumps(loaded.without_weights())).encode("hello") == [259]
