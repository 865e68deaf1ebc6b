"""Server settings: one typed dataclass, filled from flags, then ``DIFFPO_*`` variables, then defaults.

Every field ``name`` is the flag ``--name-with-dashes`` and the environment variable
``DIFFPO_NAME`` (``max_batch_size`` -> ``--max-batch-size`` / ``DIFFPO_MAX_BATCH_SIZE``). Nothing here
reads argv at import; :func:`diffpo_serve.cli.main` does, and ``create_app`` takes a
:class:`ServerSettings` directly (tests build one in code).
"""

from __future__ import annotations

import json
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

import torch

from diffpo_serve.dllm.loading import parse_ids
from diffpo_serve.dllm.sampler import CACHE_MODES, SAMPLERS

ENV_PREFIX = "DIFFPO_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def option(default: Any, help: str) -> Any:
    """A settings field with its help text (shown by ``diffpo-serve --help``)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``diffpo-serve`` can be told; see ``diffpo-serve --help``."""

    model: str | None = option(None, "model directory (default: the bundled model)")
    served_model_name: str | None = option(None, "name clients pass as `model` (default: the directory name)")
    host: str = option("127.0.0.1", "address to bind (0.0.0.0 to listen on every interface)")
    port: int = option(8000, "TCP port")
    api_key: str | None = option(None, "if set, /v1/* requires `Authorization: Bearer <key>`")
    max_batch_size: int = option(32, "most rows (prompts x n) decoded together in one forward pass")
    max_queue: int = option(256, "most requests waiting for a slot; beyond it: 503 + Retry-After")
    request_timeout: float = option(300.0, "seconds a request may wait and run before it fails (504)")
    drain_timeout: float = option(60.0, "seconds SIGTERM waits for running requests before exiting")
    max_body_bytes: int = option(1 << 20, "largest request body accepted (413 beyond)")
    max_rows_per_request: int = option(128, "most rows one request may ask for (prompts x n)")
    default_max_tokens: int | None = option(
        None, "gen_length when a request sets no max_tokens (default: the model's generation_config.json "
              "max_new_tokens, else its family's (LLaDA, Dream: 256), else 16)")
    default_block_length: int | None = option(
        None, "block_length when a request sets none (default: the model's generation_config.json block_length, "
              "else its family's (LLaDA, Dream: 32), else one block of the whole answer); a canvas model's "
              "is its canvas_length")
    default_steps: int | None = option(
        None, "`steps` sampler: passes for an answer of the default length when a request sets no steps; a request "
              "of another length gets as many passes per token, the same in every block (default: the model's "
              "generation_config.json steps, else one token per pass; at most one pass per token counts). A "
              "canvas model: its most denoising steps per block")
    default_sampler: str | None = option(None, f"sampler when a request names none ({', '.join(SAMPLERS)}; default: "
                                              "policy when the model has a step policy, else learned when it has a threshold head, "
                                              "else steps)")
    cache: str = option("off", f"KV cache when a request names none ({', '.join(CACHE_MODES)}): prefix reuses the "
                               "prompt's and finished blocks' keys/values within a block, dual also the masked "
                               "suffix's (Fast-dLLM); native models only; see docs/benchmarks.md")
    default_temperature: float = option(0.0, "temperature when a request sets none (0: greedy; at most 2, as in OpenAI's API)")
    device: str = option("auto", "torch device for the model: auto (cuda when torch sees a GPU, else cpu), cpu, "
                                 "cuda, cuda:1, ...")
    dtype: str | None = option(None, "model dtype (float32, bfloat16, float16; default: the checkpoint's). bfloat16 "
                                     "cost 0.62-0.82x float32's time per row in batched steps (batch 8-64) on the "
                                     "AVX-512 CPU measured; greedy outputs stay independent of the batch on a CPU "
                                     "(on a GPU they may not)")
    compile: bool = option(False, "compile the model's transformer layers with torch.compile at start-up (1-16 s "
                                  "here; on a CPU it needs a C++ compiler): faster batched steps; greedy outputs "
                                  "stay batch-independent (in float32 the same as without)")
    decoder_process: bool = option(True, "run the batched decoder in its own process, so HTTP work never "
                                         "holds up a forward pass (the front keeps only the tokenizer); "
                                         "--no-decoder-process: a thread of the server process")
    decoder_cpus: str | None = option(None, "CPU cores for the decoder process, e.g. 1 or 2-3,5 (Linux; default: "
                                            "the server's own); needs --decoder-process")
    trust_remote_code: bool = option(False, "allow models that ship their own modelling code")
    mask_id: int | None = option(None, "mask token id (default: from the config or tokenizer)")
    pad_id: int | None = option(None, "padding token id (default: from the tokenizer, config or generation config)")
    eos_id: str | None = option(None, "end-of-sequence token ids that end a completion, comma-separated; the first "
                                      "fills the rest of a finished row (default: every eos_token_id of the "
                                      "generation config, config and tokenizer)")
    log_level: str = option("info", "log level (debug, info, warning, error)")
    allowed_origins: str = option(
        "", "CORS: origins whose browser pages may call the API, comma-separated or a JSON list (vLLM's form), "
            "e.g. http://localhost:3000 or '*' for any origin (vLLM's default). Default: none, so a page from "
            "another origin cannot call a server on your machine; the playground at / is same-origin and needs none")
    allowed_methods: str = option("*", "CORS: methods a cross-origin request may use (comma-separated or a JSON "
                                       "list; * for any)")
    allowed_headers: str = option("*", "CORS: request headers a cross-origin request may send (comma-separated "
                                       "or a JSON list; * for any, Authorization included)")
    allow_credentials: bool = option(False, "CORS: let cross-origin pages send cookies / HTTP auth (the API "
                                            "key is a header and needs none); with '*' origins any site could")

    def validated(self) -> "ServerSettings":
        """Check ranges; raises ValueError naming the setting."""
        checks = [
            (self.max_batch_size >= 1, "max_batch_size must be >= 1"),
            (self.max_queue >= 0, "max_queue must be >= 0"),
            (self.request_timeout > 0, "request_timeout must be > 0"),
            (self.drain_timeout >= 0, "drain_timeout must be >= 0"),
            (self.max_body_bytes >= 1024, "max_body_bytes must be >= 1024"),
            (self.max_rows_per_request >= 1, "max_rows_per_request must be >= 1"),
            (self.default_max_tokens is None or self.default_max_tokens >= 1, "default_max_tokens must be >= 1"),
            (self.default_block_length is None or self.default_block_length >= 1,
             "default_block_length must be >= 1"),
            (self.default_steps is None or self.default_steps >= 1, "default_steps must be >= 1"),
            (self.default_sampler in (None, *SAMPLERS), f"default_sampler must be one of {', '.join(SAMPLERS)}"),
            (self.cache in CACHE_MODES, f"cache must be one of {', '.join(CACHE_MODES)}"),
            (0 <= self.default_temperature <= 2, "default_temperature must be in [0, 2] (as OpenAI's temperature)"),
            (0 < self.port < 65536, "port must be in 1..65535"),
            (self.dtype in (None, "float32", "bfloat16", "float16"), "dtype must be float32, bfloat16 or float16"),
            (self.decoder_cpus is None or self.decoder_process, "decoder_cpus needs decoder_process"),
        ]
        if self.decoder_cpus is not None:
            parse_cpus(self.decoder_cpus)
        if self.eos_id is not None:
            parse_ids(self.eos_id, "eos_id")
        check_device(self.device)
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            parse_list(getattr(self, name), name)
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "ServerSettings":
        """Defaults, then ``DIFFPO_*`` variables, then ``overrides``; raises ValueError on a bad value."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None:
                values[f.name] = parse_value(f.name, field_type(f.name), raw)
        return replace(cls(), **values, **overrides).validated()


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def field_type(name: str) -> type:
    """The base type of a field (``int`` for ``int | None``)."""
    hint = typing.get_type_hints(ServerSettings)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def is_optional(name: str) -> bool:
    hint = typing.get_type_hints(ServerSettings)[name]
    return type(None) in typing.get_args(hint)


def parse_value(name: str, typ: type, raw: str) -> Any:
    """Convert a string from the environment; empty means None for optional settings."""
    if raw == "" and is_optional(name):
        return None
    if typ is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{env_name(name)}: expected a boolean (1/0, true/false), got {raw!r}")
    try:
        return typ(raw)
    except ValueError:
        raise ValueError(f"{env_name(name)}: expected {typ.__name__}, got {raw!r}") from None


def check_device(spec: str) -> None:
    """``auto`` or a torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``); raises ValueError naming the
    setting."""
    if spec == "auto":
        return
    try:
        torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {spec!r}") from None


def resolve_device(spec: str) -> str:
    """The device ``--device`` names: ``auto`` is ``cuda`` when torch sees a GPU, else ``cpu`` (never ``mps``: the
    sampler's float64 scores do not run there; name it to try); any other value is returned as given."""
    if spec != "auto":
        return spec
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_cpus(spec: str) -> set[int]:
    """``"1"``, ``"0,2"``, ``"2-3,5"`` -> a set of core numbers; raises ValueError naming the setting."""
    cores: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            cores.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"decoder_cpus: expected core numbers like 1 or 2-3,5, got {spec!r}") from None
    if not cores or min(cores) < 0:
        raise ValueError(f"decoder_cpus: expected core numbers like 1 or 2-3,5, got {spec!r}")
    return cores


def parse_list(spec: str, name: str) -> list[str]:
    """A CORS list setting: ``""`` -> ``[]``, ``"a, b"`` -> ``["a", "b"]``, or a JSON list of strings as vLLM's
    flags take (``'["a", "b"]'``); raises ValueError naming the setting."""
    text = spec.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise ValueError(f"{name}: not a JSON list of strings: {spec!r}") from None
        if not all(isinstance(i, str) for i in items):
            raise ValueError(f"{name}: not a JSON list of strings: {spec!r}")
    else:
        items = text.split(",")
    return [i.strip() for i in items if i.strip()]
