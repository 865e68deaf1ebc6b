"""A tiny random DiffusionGemma checkpoint in the published layout, built in-process (nothing is downloaded):
transformers' own config classes with the smallest sub-configs that construct (a 2-layer mixture-of-experts
text stack, one sliding-window and one full-attention layer; a 1-layer Gemma 4 vision tower), saved with
``save_pretrained``, plus a character-level Gemma tokenizer with a Gemma 4-style chat template."""

import json

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<unk>"]
PAD, EOS, BOS, TURN_START, TURN_END, UNK = range(6)
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789▁\n+-*=,.?")  # ▁: Gemma's space
VOCAB = 64  # the embedding is wider than the tokenizer; 60-62 are the image tokens
BOI, EOI, IMAGE = 60, 61, 62
CANVAS = 8
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|turn>' + m['role'] + '\n' + m['content'] + '<turn|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}")


def tiny_config(canvas_length: int = CANVAS, sliding_window: int = 8, init: float = 0.3, **text) -> DiffusionGemmaConfig:
    text_config = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, global_head_dim=8, num_experts=2,
                       top_k_experts=1, moe_intermediate_size=8, sliding_window=sliding_window,
                       layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                       pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, initializer_range=init)
    text_config.update(text)
    vision_config = dict(model_type="gemma4_vision", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=8, patch_size=2,
                         position_embedding_size=16, pooling_kernel_size=1)
    return DiffusionGemmaConfig(text_config=text_config, vision_config=vision_config, canvas_length=canvas_length,
                                boi_token_id=BOI, eoi_token_id=EOI, image_token_id=IMAGE, initializer_range=init)


def random_model(seed: int = 0, **kw) -> DiffusionGemmaForBlockDiffusion:
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(tiny_config(**kw)).eval()


def write_tokenizer(path, chat_template: bool = True) -> None:
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIAL)
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    settings_file = path / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    settings["tokenizer_class"] = "GemmaTokenizer"  # as the published checkpoint names it
    settings_file.write_text(json.dumps(settings, indent=2))


def write_checkpoint(path, model: DiffusionGemmaForBlockDiffusion | None = None, *, tokenizer: bool = True,
                     generation: dict | None = None, chat_template: bool = True):
    """``model`` (default: :func:`random_model`) saved as transformers saves it (config.json with the text and
    vision sub-configs, model.safetensors, generation_config.json) plus the tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else random_model()
    model.save_pretrained(str(path))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer:
        write_tokenizer(path, chat_template)
    return path
