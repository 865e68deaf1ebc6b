"""Tests for diffpo_serve.dllm.loading: our model, any transformers masked LM, remote-code models, errors.

Everything is built locally in ``tmp_path`` from tiny randomly initialised models; nothing is downloaded.
"""

import json
import textwrap
import uuid

import pytest
import torch
from transformers import (AutoConfig, AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM,
                          BertTokenizerFast)

from diffpo_serve.dllm.forward import model_logits
from diffpo_serve.dllm.loading import LoadedModel, ModelLoadError, load_model
from diffpo_serve.dllm.model import DiffpoConfig, DiffpoForMaskedLM
from diffpo_serve.dllm.tokenizer import build_tokenizer


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # belt and braces: the loader passes local_files_only, but never let a test reach a hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _tiny_config(tok, **overrides):
    kwargs = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=128, mask_token_id=tok.mask_token_id,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    kwargs.update(overrides)
    return DiffpoConfig(**kwargs)


def _save_own_model(directory, tok=None, **config_overrides):
    tok = tok if tok is not None else build_tokenizer()
    torch.manual_seed(0)
    model = DiffpoForMaskedLM(_tiny_config(build_tokenizer(), **config_overrides)).eval()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model, tok


def _batch(vocab_size, b=2, l=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (b, l), generator=g)
    attention = torch.ones(b, l, dtype=torch.long)
    attention[0, :2] = 0  # a left-padded row
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return ids, attention, positions


# ---------------------------------------------------------------- (a) the project's own model

@pytest.fixture(scope="module")
def own_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("own") / "diffpo-tiny"
    model, tok = _save_own_model(directory)
    return directory, model, tok


def test_own_model_saved_as_safetensors_and_auto_classes(own_model_dir):
    directory, _, tok = own_model_dir
    assert (directory / "model.safetensors").is_file()
    assert (directory / "config.json").is_file()
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    assert type(config) is DiffpoConfig
    assert config.mask_token_id == tok.mask_token_id
    model = AutoModelForMaskedLM.from_pretrained(directory, local_files_only=True)
    assert type(model) is DiffpoForMaskedLM
    loaded_tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert loaded_tok.mask_token_id == tok.mask_token_id
    assert loaded_tok("sudoku 12")["input_ids"] == tok("sudoku 12")["input_ids"]


def test_own_model_load_model_weights_ids_and_logits(own_model_dir):
    directory, model, tok = own_model_dir
    lm = load_model(directory)
    assert isinstance(lm, LoadedModel)
    assert type(lm.model) is DiffpoForMaskedLM and not lm.model.training
    assert (lm.mask_id, lm.pad_id, lm.eos_id) == (tok.mask_token_id, tok.pad_token_id, tok.eos_token_id)
    assert lm.path == str(directory) and lm.name == "diffpo-tiny"
    assert lm.max_length == 128
    assert lm.device == torch.device("cpu")

    before, after = model.state_dict(), lm.model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key

    ids, attention, positions = _batch(len(tok))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        got = model_logits(lm.model, ids, attention, positions)
        got_default_positions = model_logits(lm.model, ids, attention)
    assert got.shape == (2, 7, len(tok))
    assert torch.equal(expected, got)
    # the model derives the same positions from the attention mask when none are passed
    torch.testing.assert_close(got_default_positions, got)


def test_own_model_dtype_argument(own_model_dir):
    directory, _, _ = own_model_dir
    lm = load_model(directory, dtype=torch.bfloat16)
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_server_loads_half_precision_on_cpu_without_a_batch_warning(own_model_dir, caplog):
    """On a CPU the sampler's aligned layout keeps half-precision rows batch-independent (test_sampler),
    so the server only warns about that on other devices."""
    from diffpo_serve.api import load_from_settings
    from diffpo_serve.settings import ServerSettings
    directory, _, _ = own_model_dir
    with caplog.at_level("WARNING", logger="diffpo_serve.api"):
        loaded = load_from_settings(ServerSettings(model=str(directory), dtype="bfloat16"))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert not [r for r in caplog.records if "batch" in r.getMessage()]


def test_server_loader_passes_the_eos_ids_setting(own_model_dir):
    from diffpo_serve.api import load_from_settings
    from diffpo_serve.settings import ServerSettings
    directory, _, _ = own_model_dir
    loaded = load_from_settings(ServerSettings(model=str(directory), eos_id="5,7"))
    assert (loaded.eos_id, list(loaded.eos_ids)) == (5, [5, 7])


def test_compiled_layers_decode_as_eager_and_as_alone():
    """compile=True compiles the bundled model's four Blocks (one graph for batch 1, one for more rows,
    both made at load time); greedy decoding then gives the eager model's tokens and passes, with the
    learned sampler (the head reads the first pass's hidden states), in a batch and alone."""
    from torch._dynamo.utils import counters

    from diffpo_serve.dllm.sampler import SamplingParams, generate
    from training.tasks import get_task
    eager = load_model()
    compiled = load_model(compile=True)
    assert compiled.compiled == "4 Block layers" and eager.compiled is None
    graphs = counters["stats"]["unique_graphs"]
    prompts = [compiled.encode(ex["prompt"]) for task in ("sudoku", "countdown")
               for ex in get_task(task).make_dataset("test", 8)]
    kw = dict(mask_id=eager.mask_id, eos_id=eager.eos_id, pad_id=eager.pad_id, head=eager.threshold_head)
    params = SamplingParams("learned", 16)
    want = generate(eager.model, prompts, params, **kw)
    got = generate(compiled.model, prompts, params, **kw)
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.nfe, want.nfe)
    for i in (0, 9):
        alone = generate(compiled.model, [prompts[i]], params, **kw)
        assert alone.sequences[0].tolist() == got.sequences[i, :alone.sequences.shape[1]].tolist()
        assert int(alone.nfe[0]) == int(got.nfe[i])
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up compiled every graph decoding needs


def test_transformer_layers_are_the_outermost_listed_modules():
    from torch import nn

    from diffpo_serve.dllm.loading import transformer_layers

    class Norm(nn.Module):
        pass

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.mlp = Norm(), nn.Linear(2, 2)

    class Net(nn.Module):
        _no_split_modules = ["Layer", "Norm"]

        def __init__(self):
            super().__init__()
            self.layers, self.final_norm = nn.ModuleList([Layer(), Layer()]), Norm()

    net = Net()
    assert transformer_layers(net) == {"layers.0": net.layers[0], "layers.1": net.layers[1],
                                       "final_norm": net.final_norm}
    Net._no_split_modules = None
    assert transformer_layers(net) == {}  # compile_layers then compiles the whole model
    assert list(transformer_layers(load_model().model)) == [f"blocks.{i}" for i in range(4)]


def test_compile_failure_names_the_model_and_the_cause(tmp_path):
    """Without a working C++ compiler, inductor cannot build CPU kernels: load_model says so, naming the
    model directory, instead of failing at the first request."""
    import subprocess
    import sys
    code = ("from diffpo_serve.dllm.loading import load_model, ModelLoadError\n"
            "try:\n    load_model(compile=True)\nexcept ModelLoadError as e:\n    print('ERROR', e)\n")
    env = {**__import__("os").environ, "CXX": str(tmp_path / "no-such-g++"),
           "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    line = next(x for x in out.stdout.splitlines() if x.startswith("ERROR"))
    assert "bundled_model: torch.compile failed" in line and "C++ compiler" in line and "--compile" in line


def test_encode_decode_round_trip(own_model_dir):
    directory, _, tok = own_model_dir
    lm = load_model(directory)
    ids = lm.encode("sudoku 1234")
    assert ids[0] == tok.convert_tokens_to_ids("sudoku")
    assert len(ids) == 1 + 5  # the word is one token, then " 1234" one per character
    assert lm.eos_id not in ids and lm.mask_id not in ids
    text, stopped = lm.decode(ids)
    assert (text, stopped) == ("sudoku 1234", False)

    # generation output: EOS ends it, whatever follows is dropped; pad/mask never show up
    generated = ids + [lm.eos_id] + lm.encode(" tail") + [lm.mask_id]
    assert lm.decode(generated) == ("sudoku 1234", True)
    assert lm.decode(torch.tensor([lm.pad_id, *ids, lm.mask_id, lm.eos_id, lm.pad_id])) == ("sudoku 1234", True)
    assert lm.decode([lm.eos_id]) == ("", True)
    assert lm.decode([]) == ("", False)


# ---------------------------------------------------------------- (b) any transformers masked LM

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "on", "mat", "a",
              "sudoku", "countdown", "1", "2", "3", "4", "5", "6", "7", "8", "9", "0", ".", ",", "+", "-", "="]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    # transformers 5 builds the WordPiece tokenizer from a vocab dict (a vocab_file argument is ignored)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(BERT_VOCAB)}, do_lower_case=True)
    assert len(tok) == len(BERT_VOCAB)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    model = BertForMaskedLM(config).eval()
    directory = root / "tiny-bert"
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory, model, tok


def test_bert_masked_lm(bert_dir):
    directory, model, tok = bert_dir
    assert (directory / "model.safetensors").is_file()
    lm = load_model(directory)
    assert isinstance(lm.model, BertForMaskedLM)
    assert tok.mask_token_id == BERT_VOCAB.index("[MASK]")
    assert lm.mask_id == BERT_VOCAB.index("[MASK]")
    assert lm.pad_id == BERT_VOCAB.index("[PAD]")
    assert lm.eos_id == BERT_VOCAB.index("[SEP]")  # BERT has no EOS: the loader falls back to [SEP]
    assert lm.max_length == 64
    assert lm.name == "tiny-bert"

    for key, value in model.state_dict().items():
        assert torch.equal(value, lm.model.state_dict()[key]), key

    ids, attention, positions = _batch(len(BERT_VOCAB))
    with torch.no_grad():
        logits = model_logits(lm.model, ids, attention, positions)
        expected = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    assert logits.shape == (2, 7, len(BERT_VOCAB))
    torch.testing.assert_close(logits, expected)

    ids = lm.encode("the cat sat")
    assert ids == [BERT_VOCAB.index(w) for w in ("the", "cat", "sat")]
    assert lm.decode(ids + [lm.eos_id, BERT_VOCAB.index("dog")]) == ("the cat sat", True)


def test_mask_id_override_wins(bert_dir, own_model_dir):
    assert load_model(bert_dir[0], mask_id=7).mask_id == 7
    assert load_model(own_model_dir[0], mask_id=0).mask_id == 0  # 0 is a valid id, not "unset"


# ---------------------------------------------------------------- (c) LLaDA/Dream-style remote code

CONFIGURATION_TOY = '''
from transformers import PretrainedConfig


class ToyConfig{suffix}(PretrainedConfig):
    model_type = "toy-llada"

    def __init__(self, vocab_size=16, hidden_size=8, mask_token_id=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)
'''

MODELING_TOY = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_toy import ToyConfig{suffix}


class ToyModel{suffix}(PreTrainedModel):
    config_class = ToyConfig{suffix}
    base_model_prefix = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.5)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask=None):  # like LLaDA: no position_ids argument
        x = self.embed(input_ids)
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        return CausalLMOutput(logits=self.head(x))
'''


def _write_toy_remote_model(directory, suffix):
    """A checkpoint whose config maps AutoConfig/AutoModel to code files shipped in the directory."""
    directory.mkdir(parents=True)
    (directory / "configuration_toy.py").write_text(textwrap.dedent(CONFIGURATION_TOY.format(suffix=suffix)))
    (directory / "modeling_toy.py").write_text(textwrap.dedent(MODELING_TOY.format(suffix=suffix)))
    tok = build_tokenizer()
    mask_id = tok.convert_tokens_to_ids("#")  # deliberately not the tokenizer's <mask>
    config_json = {
        "architectures": [f"ToyModel{suffix}"],
        "auto_map": {"AutoConfig": f"configuration_toy.ToyConfig{suffix}",
                     "AutoModel": f"modeling_toy.ToyModel{suffix}"},
        "model_type": "toy-llada",
        "vocab_size": len(tok),
        "hidden_size": 8,
        "mask_token_id": mask_id,
    }
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    # instantiate the shipped class and save its weights through save_pretrained
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True, local_files_only=True)
    from transformers import AutoModel
    torch.manual_seed(0)
    model = AutoModel.from_config(config, trust_remote_code=True).eval()
    model.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))  # keep the auto_map exactly
    tok.save_pretrained(directory)
    return model, tok, mask_id


def test_remote_code_model(tmp_path):
    suffix = uuid.uuid4().hex[:12]  # unique classes: transformers caches dynamic modules by name
    directory = tmp_path / f"toy_llada_{suffix}"
    model, tok, mask_id = _write_toy_remote_model(directory, suffix)
    assert (directory / "model.safetensors").is_file()

    # shipped code is never run unless the caller says so
    with pytest.raises(ModelLoadError, match="trust_remote_code") as info:
        load_model(directory)
    assert str(directory) in str(info.value)

    lm = load_model(directory, trust_remote_code=True)
    assert type(lm.model).__name__ == f"ToyModel{suffix}"  # loaded through AutoModel (auto_map)
    assert lm.mask_id == mask_id != tok.mask_token_id  # the config's mask id wins over the tokenizer's
    assert lm.eos_id == tok.eos_token_id and lm.pad_id == tok.pad_token_id
    for key, value in model.state_dict().items():
        assert torch.equal(value, lm.model.state_dict()[key]), key

    ids, attention, positions = _batch(len(tok))
    with torch.no_grad():
        logits = model_logits(lm.model, ids, attention, positions)  # forward takes no position_ids
        expected = model(input_ids=ids, attention_mask=attention).logits
    assert logits.shape == (2, 7, len(tok))
    torch.testing.assert_close(logits, expected)

    # having loaded it once with trust does not make a later untrusted load run the code
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(directory)


# ---------------------------------------------------------------- errors

def _assert_load_error(path, *fragments, **kwargs):
    with pytest.raises(ModelLoadError) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message.lower(), message
    return message


def test_missing_directory(tmp_path):
    _assert_load_error(tmp_path / "nowhere", "does not exist")


def test_directory_without_config(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    _assert_load_error(tmp_path, "config.json")


def test_config_not_json(tmp_path):
    directory = tmp_path / "broken"
    _save_own_model(directory)
    (directory / "config.json").write_text("{ this is not json")
    _assert_load_error(directory, "json")


@pytest.mark.parametrize("content", ["null", "[1, 2]", '"a string"'])
def test_config_not_an_object(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    _assert_load_error(tmp_path, "json object")


def test_config_with_invalid_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "num_attention_heads": "two"}))
    build_tokenizer().save_pretrained(tmp_path)
    _assert_load_error(tmp_path, "config")


def test_path_is_a_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    _assert_load_error(path, "not a directory")


def test_config_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model-type-xyz"}))
    build_tokenizer().save_pretrained(tmp_path)
    _assert_load_error(tmp_path, "config")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_weights(tmp_path, damage):
    directory = tmp_path / "corrupt"
    _save_own_model(directory)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    if damage == "garbage":
        weights.write_bytes(b"\x00\xffnot a safetensors file" * 64)
    elif damage == "truncated":
        weights.write_bytes(data[:len(data) // 2])
    else:
        weights.write_bytes(b"")
    _assert_load_error(directory, "weights")


def test_missing_weights(tmp_path):
    directory = tmp_path / "noweights"
    _save_own_model(directory)
    (directory / "model.safetensors").unlink()
    _assert_load_error(directory, "weights")


def test_weights_missing_a_tensor(tmp_path):
    """transformers would silently fill a missing tensor with random values; the loader refuses."""
    from safetensors.torch import load_file, save_file
    directory = tmp_path / "partial"
    _save_own_model(directory)
    tensors = load_file(directory / "model.safetensors")
    del tensors["blocks.0.qkv.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    message = _assert_load_error(directory, "weights", "missing")
    assert "blocks.0.qkv.weight" in message


def test_base_model_checkpoint_has_no_mlm_head(tmp_path, bert_dir):
    """A BertModel checkpoint has no masked-LM head: refused rather than served with a random head."""
    from transformers import BertModel
    directory = tmp_path / "bert-base-only"
    config = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    bert_dir[2].save_pretrained(directory)
    _assert_load_error(directory, "missing", "cls.predictions")


def test_missing_tokenizer(tmp_path):
    directory = tmp_path / "notok"
    torch.manual_seed(0)
    DiffpoForMaskedLM(_tiny_config(build_tokenizer())).save_pretrained(directory)
    _assert_load_error(directory, "tokenizer")


def test_no_mask_token_anywhere(tmp_path):
    directory = tmp_path / "nomask"
    tok = build_tokenizer()
    tok.mask_token = None
    assert tok.mask_token_id is None
    _save_own_model(directory, tok=tok, mask_token_id=None)
    assert json.loads((directory / "config.json").read_text()).get("mask_token_id") is None
    _assert_load_error(directory, "mask")
    # an explicit mask id rescues it
    assert load_model(directory, mask_id=1).mask_id == 1


@pytest.mark.parametrize("which", ["own", "bert"])
def test_encode_matches_the_tokenizers_own_call(which, own_model_dir, bert_dir):
    """encode() calls a fast tokenizer's Rust backend directly: the ids must be what tokenizer(...) gives."""
    lm = load_model((own_model_dir if which == "own" else bert_dir)[0])
    assert getattr(lm.tokenizer, "backend_tokenizer", None) is not None  # the fast path is what is tested
    texts = ["sudoku 0204310000000000", "countdown 32,62,20=114", "The Cat  sat\n<answer>4</answer>",
             "[MASK] <mask> <eos> [SEP] x", "", "  ", "héllo wörld ☃", "the cat sat " * 20]
    for text in texts:
        assert lm.encode(text) == lm.tokenizer(text, add_special_tokens=False)["input_ids"], text
