"""Helpers for the server tests: a tiny model on disk, scripted and slow models, a live uvicorn server.

Imported by the other ``test_server_*`` modules; its own tests check the helpers themselves.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import uvicorn

from conftest import EOS, MASK, PAD, tiny_model
from diffpo_serve.api import create_app
from diffpo_serve.cli import DrainingServer
from diffpo_serve.dllm.loading import LoadedModel, load_model
from diffpo_serve.dllm.tokenizer import build_tokenizer
from diffpo_serve.settings import ServerSettings

MODEL_NAME = "tiny-dllm"
SUDOKU = "sudoku 3020213443020243"  # prompts in the bundled tasks' formats
COUNTDOWN = "countdown 32,62,20=114"


def save_tiny_model(directory) -> str:
    """A random tiny denoiser + our tokenizer, saved where ``load_model`` finds them."""
    tiny_model().save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return str(directory)


def save_chat_model(directory, template: str) -> str:
    """:func:`save_tiny_model` whose tokenizer has the chat template ``template``."""
    path = save_tiny_model(directory)
    cfg_file = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = template
    cfg_file.write_text(json.dumps(cfg))
    return path


class Scripted(torch.nn.Module):
    """A fake denoiser that writes a fixed answer per prompt, then EOS, with certainty: a logit of 20 minus a
    thousandth per position, in float64, so that `steps` commits left to right (its score is the softmax in
    the logits' dtype; exact ties would go as torch.topk orders them, which LLaDA's sampler follows).

    ``answers`` maps the text of a prompt's first token (a character, or a whole word like
    ``countdown``) to the text its generation region should hold;
    other prompts get ``default``. Prompts end with ``|``. ``delay`` seconds per forward pass make it slow.
    """

    def __init__(self, tokenizer, answers: dict[str, str] | None = None, default: str = "ok", delay: float = 0.0):
        super().__init__()
        self.tokenizer = tokenizer
        self.answers = {k: tokenizer(v, add_special_tokens=False)["input_ids"] for k, v in (answers or {}).items()}
        self.default = tokenizer(default, add_special_tokens=False)["input_ids"]
        self.delay = delay
        self.vocab = len(tokenizer)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask, position_ids=None):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        b, l = input_ids.shape
        logits = torch.zeros(b, l, self.vocab, dtype=torch.float64)
        for r in range(b):
            real = attention_mask[r].nonzero().squeeze(-1)
            tokens = input_ids[r, real].tolist()
            prompt_len = self._prompt_len(tokens)
            first = self.tokenizer.decode(tokens[:1])
            answer = self.answers.get(first, self.default)
            for k in range(len(tokens) - prompt_len):
                target = answer[k] if k < len(answer) else EOS
                logits[r, real[prompt_len + k], target] = 20.0 - 1e-3 * k
        return type("Out", (), {"logits": logits})()

    def _prompt_len(self, tokens):
        """Scripted prompts end with '|' (answers never contain one); else the first MASK starts the canvas."""
        bar = self.tokenizer.convert_tokens_to_ids("|")
        if bar in tokens:
            return max(k for k, t in enumerate(tokens) if t == bar) + 1
        return tokens.index(MASK) if MASK in tokens else len(tokens)


def scripted_loaded(answers=None, default="ok", delay=0.0, max_length=512) -> LoadedModel:
    tok = build_tokenizer()
    model = Scripted(tok, answers, default, delay)
    return LoadedModel(model=model, tokenizer=tok, mask_id=MASK, pad_id=PAD, eos_id=EOS, path="<scripted>",
                       name="scripted", max_length=max_length)


def slow_scripted_loader(settings) -> LoadedModel:
    """A module-level (so picklable: ``--decoder-process`` spawns with it) loader of a slow scripted
    model that writes 128 x's, 20 ms per forward pass."""
    return scripted_loaded(default="x" * 128, delay=0.02)


def serve_scripted(port: int, *flags: str) -> subprocess.Popen:
    """``diffpo-serve``'s own ``main`` in a new process on ``port``, serving the slow scripted model of
    :func:`slow_scripted_loader` (``scripted``; with the default ``--decoder-process`` the decoder process loads it
    by name), so that requests stay in flight long enough to signal the process meanwhile."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import diffpo_serve.api as api, test_server_support as s; "
            "api.load_from_settings = s.slow_scripted_loader; from diffpo_serve.cli import main; "
            "raise SystemExit(main(sys.argv[2:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), "--port", str(port),
                             "--log-level", "warning", *flags], env=env, cwd=Path(__file__).resolve().parents[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until ``url/health`` answers 200; raises if the process exits or the time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server never became ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on loopback in a background thread."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = DrainingServer(config, app.state.runtime)  # uvicorn.Server + drain on signals
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def runtime(self):
        return self.app.state.runtime

    def start(self, wait_ready: bool = True) -> "LiveServer":
        self.started_at = time.monotonic()  # nothing of this server ran before (its steps' time is bounded by it)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while httpx.get(self.url + "/health").status_code != 200:
            if time.time() > deadline:
                raise RuntimeError("server never became ready")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def live_server(settings: ServerSettings | None = None, loader=None, wait_ready: bool = True, **overrides):
    if loader is not None:  # injected loaders are closures: they cannot be sent to a decoder process
        overrides.setdefault("decoder_process", False)
    settings = settings or ServerSettings(**overrides)
    server = LiveServer(create_app(settings, loader=loader)).start(wait_ready=wait_ready)
    try:
        yield server
    finally:
        server.stop()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    prefix = name + ("{" + labels + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return 0.0


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ----------------------------------------------------------------------------- the helpers' own checks

def test_saved_tiny_model_loads(tmp_path):
    loaded = load_model(save_tiny_model(tmp_path / MODEL_NAME))
    assert loaded.name == MODEL_NAME and loaded.mask_id == MASK and loaded.eos_id == EOS
    assert loaded.max_length == 512


def test_scripted_model_writes_its_answer():
    from diffpo_serve.dllm.sampler import SamplingParams, generate
    loaded = scripted_loaded({"a": "xyz"})
    prompt = loaded.encode("abc|")
    out = generate(loaded.model, [prompt], SamplingParams(gen_length=6, steps=6), mask_id=MASK, eos_id=EOS,
                   pad_id=PAD)
    assert loaded.decode(out.sequences[0].tolist()) == ("xyz", True)
    assert out.nfe.tolist() == [4]  # x, y, z, then EOS ends the row
