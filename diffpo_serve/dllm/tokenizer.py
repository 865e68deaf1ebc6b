"""The character-level tokenizer of the project's own tiny model.

Every printable ASCII character and the newline is one token; the task words ``sudoku`` and
``countdown`` and the answer tags ``<answer>``/``</answer>`` are whole tokens; ``<pad>``, ``<mask>``,
``<eos>`` and ``<unk>`` are special. Built with the ``tokenizers`` library and saved as
``tokenizer.json`` so ``AutoTokenizer.from_pretrained(local_dir)`` loads it.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "mask_token": "<mask>", "eos_token": "<eos>", "unk_token": "<unk>"}
WORDS = ["sudoku", "countdown", "<answer>", "</answer>"]
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII, space, newline


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return the tokenizer (deterministic: same vocabulary and ids on every call)."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS.values(), *WORDS, *CHARACTERS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    words = "|".join(w.replace("/", "\\/") for w in WORDS)
    # whole words first, otherwise one character per token
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{words}|[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, padding_side="left",
                                   **SPECIAL_TOKENS)
