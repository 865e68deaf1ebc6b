"""Shared fixtures: tiny models built in-process (nothing is downloaded)."""

import sys
from pathlib import Path

import pytest
import torch

from diffpo_serve.dllm.model import DiffpoConfig, DiffpoForMaskedLM
from diffpo_serve.dllm.tokenizer import build_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ holds the LLaDA reference

MASK, PAD, EOS = 1, 0, 2


def varied_reward(text: str, example: dict) -> float:
    """A task reward that differs between a group's rollouts (a random tiny model solves nothing), for
    trainer tests that need non-zero advantages."""
    return float(len(set(text)) % 3) / 2


def tiny_model(seed: int = 0, init: float = 0.5, vocab: int = 104, **kw) -> DiffpoForMaskedLM:
    """A random tiny denoiser; a large init spread gives decisive, well-separated logits."""
    torch.manual_seed(seed)
    cfg = DiffpoConfig(**{**dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, initializer_range=init, mask_token_id=MASK, pad_token_id=PAD,
                                 eos_token_id=EOS), **kw})
    return DiffpoForMaskedLM(cfg).eval()


@pytest.fixture(scope="session")
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def kill_after_checkpoint(monkeypatch):
    """``disarm = arm(module)``: the module's next checkpoint save completes, then the run "is killed"."""

    def arm(module):
        real = module.save_checkpoint

        def save_then_die(*args, **kw):
            real(*args, **kw)
            raise KeyboardInterrupt

        monkeypatch.setattr(module, "save_checkpoint", save_then_die)
        return lambda: monkeypatch.setattr(module, "save_checkpoint", real)

    return arm


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> str:
    """A random tiny model + our tokenizer saved once per session (named like the served model)."""
    from test_server_support import MODEL_NAME, save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("served") / MODEL_NAME)


@pytest.fixture(scope="session")
def server(model_path):
    """One live server on the tiny model, shared by the modules that only need a working endpoint
    (a module that needs other settings defines its own ``server``, which overrides this one)."""
    from test_server_support import live_server
    with live_server(model=model_path, max_batch_size=8, max_queue=64) as srv:
        yield srv


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """A tiny model of ours with small weights (init 0.1), saved with the tokenizer: the RL tests' starting model
    (module scope: each test module gets its own copy)."""
    path = tmp_path_factory.mktemp("base")
    tiny_model(seed=0, init=0.1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
