"""Helpers shared by the benchmark scripts: where results go and how tables are written."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import torch

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


def save(name: str, text: str, data) -> Path:
    """Write NAME.md and NAME.json under docs/results/; NAME may start with a topic folder ("server/compile")."""
    (RESULTS / name).parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
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
