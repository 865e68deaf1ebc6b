"""Helpers shared by the benchmark scripts: where results go, how tables are written, and the provenance every
result file records (commit, date, command, machine, and a checksum of every model the run loaded)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from diffpo_serve.dllm import loading
from diffpo_serve.dllm.sampler import SamplingParams, generate

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def cpu_name() -> str:
    """The CPU's model name and clock (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = re.search(r"^model name\s*:\s*(.+)$", info, re.M).group(1).strip()
        mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
        return name + (f" at {float(mhz.group(1)) / 1000:.1f} GHz" if mhz else "")
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the hardware and software a benchmark ran on (same-named cloud machines still
    differ in speed from one session to the next: compare ratios measured in one run)."""
    gpu = f"{torch.cuda.get_device_name(0)}; " if torch.cuda.is_available() else ""
    return (f"{gpu}{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {len(os.sched_getaffinity(0))} of "
            f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


LOADED_MODELS: dict[str, str] = {}  # model directory -> checksum, for every model this process loaded


def model_checksum(path) -> str:
    """The first 16 hex digits of SHA-256 over a model directory's weight files (``*.safetensors``, ``*.bin``,
    sorted by name; a step policy's or threshold head's files included), or ``"no weights"``."""
    digest, found = hashlib.sha256(), False
    for file in sorted(Path(path).iterdir()):
        if file.suffix in (".safetensors", ".bin") and file.is_file():
            found = True
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16] if found else "no weights"


def load_model(path=None, **kwargs):
    """:func:`diffpo_serve.dllm.loading.load_model`, recording the model's checksum for :func:`provenance`."""
    loaded = loading.load_model(path, **kwargs)
    LOADED_MODELS[str(loaded.path)] = model_checksum(loaded.path)
    return loaded


def record_model(path) -> None:
    """Record a model a run used without loading it here (e.g. the starting model of a training subprocess)."""
    path = path or loading.default_model_path()
    LOADED_MODELS[str(path)] = model_checksum(path)


def git_commit() -> str:
    """HEAD's short hash, with ``+uncommitted`` when tracked files differ from it; ``unknown`` outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted" if dirty else "")


COMMIT_AT_START = git_commit()  # the checkout whose code this process imported (HEAD may move during a long run)


def command() -> str:
    """The command line that is running, as ``python -m benchmarks.NAME ARGS`` when run as a module."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def provenance() -> dict:
    """What a result file records about how it was made: commit, UTC date, command, machine, the machine's load
    averages at the save (whether other work shared the cores: a timing needs an idle machine), model checksums;
    ``commit_at_start`` too when the checkout changed between this process's start and the save."""
    load = "load average {:.2f} / {:.2f} / {:.2f} over 1 / 5 / 15 min at the save".format(*os.getloadavg())
    info = {"commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command(), "machine": machine(), "load": load, "models": dict(LOADED_MODELS)}
    if COMMIT_AT_START != info["commit"]:
        info["commit_at_start"] = COMMIT_AT_START
    return info


def provenance_text(info: dict) -> str:
    models = ", ".join(f"`{p}` ({c})" for p, c in info["models"].items()) or "none loaded"
    started = f" (the run started at {info['commit_at_start']})" if "commit_at_start" in info else ""
    load = f", {info['load']}" if "load" in info else ""  # files written before loads were recorded have none
    return (f"\n\n---\nProvenance: commit {info['commit']}, {info['date']}{started}; `{info['command']}`; "
            f"{info['machine']}{load}; models (SHA-256 of the weight files, first 16 hex digits): {models}.\n")


def load_saved(name: str):
    """The data :func:`save` wrote as NAME.json, without its provenance (files written before it recorded
    provenance read the same)."""
    saved = json.loads((RESULTS / f"{name}.json").read_text())
    if isinstance(saved, dict) and "provenance" in saved:
        saved = {k: v for k, v in saved.items() if k != "provenance"}
        if set(saved) == {"rows"}:
            return saved["rows"]
    return saved


def save(name: str, text: str, data) -> Path:
    """Write NAME.md and NAME.json under docs/results/; NAME may start with a topic folder ("server/compile").
    Both record :func:`provenance`: a footer of the Markdown, and the JSON's ``provenance`` key (a JSON list is
    wrapped as ``{"rows": [...], "provenance": ...}``)."""
    info = provenance()
    (RESULTS / name).parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text.rstrip("\n") + provenance_text(info))
    payload = {**data, "provenance": info} if isinstance(data, dict) else {"rows": data, "provenance": info}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    return RESULTS / f"{name}.md"


def batch_dependent(loaded, prompts: list[list[int]], params: SamplingParams, batch: int = 64,
                    align: int | None = None) -> int:
    """How many of ``prompts`` decode to other tokens or another NFE in batches of ``batch`` than alone
    (greedy: 0 means a request's output does not depend on what else is in its batch). ``align``: the
    sampler's prompt layout (default: the model's)."""
    kw = dict(mask_id=loaded.mask_id, eos_id=loaded.eos_id, eos_ids=loaded.eos_ids, pad_id=loaded.pad_id,
              head=loaded.threshold_head,
              align=align)
    differ = 0
    for i in range(0, len(prompts), batch):
        out = generate(loaded.model, prompts[i:i + batch], params, **kw)
        for k, prompt in enumerate(prompts[i:i + batch]):
            alone = generate(loaded.model, [prompt], params, **kw)
            differ += (alone.sequences[0].tolist() != out.sequences[k].tolist()
                       or int(alone.nfe[0]) != int(out.nfe[k]))
    return differ
