"""Atomic training checkpoints: model, tokenizer, optimiser, scheduler, RNG state and step.

A checkpoint is a directory written under a temporary name and renamed into place, so a run killed
mid-save leaves the previous checkpoint intact. ``--resume`` loads it and continues at ``step + 1``;
:func:`trim_metrics` first drops the metric lines logged after it, so a resumed run's metrics.jsonl has
each step once; a run that starts from step 0 moves a previous run's file aside (:func:`fresh_metrics`);
:func:`start_metrics` does whichever applies.

A LoRA run's checkpoint holds the adapters (peft's ``adapter_model.safetensors`` and ``adapter_config.json``),
never the base weights, plus ``lora_base.json`` naming the base model (directory and dtype) the adapters apply
to. The plain, natively loadable model (adapters merged into the base) is written by :func:`export_model`, once
at the end of a run, and for any checkpoint by :func:`export_checkpoint` (``diffpo-train export``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
LORA_BASE_FILE = "lora_base.json"  # a LoRA checkpoint's base model: {"model": directory, "dtype": name or null}
ADAPTER_CONFIG = "adapter_config.json"  # peft's; its presence makes a checkpoint a LoRA one
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file and the problem."""


def atomic_dir(target: Path, write) -> None:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``target``, replacing it atomically-ish.

    The old directory is renamed aside before the new one is renamed in, and removed after; at every
    moment either the old or the new complete directory exists under a known name.
    """
    target = Path(target)
    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(directory: Path, *, model, tokenizer, step: int, optimizer=None, scheduler=None,
                    extra: dict | None = None, head=None, policy=None, lora_base: dict | None = None) -> None:
    """Write a complete checkpoint of a training run to ``directory`` (atomically); ``head``/``policy``:
    the model's threshold head and step policy, saved next to its weights. A peft ``model`` writes its adapters
    only; ``lora_base`` (``{"model": directory, "dtype": name or None}``) then records the base they apply to."""

    def write(tmp: Path):
        model.save_pretrained(tmp)
        if lora_base is not None:
            (tmp / LORA_BASE_FILE).write_text(json.dumps(lora_base, indent=2))
        tokenizer.save_pretrained(tmp)
        if head is not None:
            head.save(tmp)
        if policy is not None:
            policy.save(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict() if optimizer else None,
                    "scheduler": scheduler.state_dict() if scheduler else None, "rng": rng_state(),
                    "extra": extra or {}}, tmp / STATE_FILE)
        (tmp / "step.json").write_text(json.dumps({"step": step}))

    atomic_dir(Path(directory), write)


def recover_interrupted(directory: Path) -> None:
    """If a save was interrupted between its two renames, put the previous checkpoint back."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and old.exists():
        os.replace(old, directory)


def load_trainer_state(directory: Path) -> dict:
    """The optimiser/scheduler/RNG/step dict of a checkpoint, with a clear error when unreadable."""
    recover_interrupted(directory)
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no trainer state to resume from (was the run ever checkpointed?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"{path}: corrupt trainer state: {type(e).__name__}: {e}") from e


def write_file_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes the file under a temporary name beside ``path``, which is then renamed into place:
    a kill leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_file_atomic` for a text file."""
    write_file_atomic(path, lambda tmp: tmp.write_text(text))


def trim_metrics(path: Path, last_step: int) -> int:
    """Drop the lines of a metrics JSONL file whose ``step`` is above ``last_step`` (logged after the
    checkpoint a run resumes from; the resumed run logs those steps again). Rewritten atomically; returns
    how many lines were dropped. A line that is not JSON (a write cut off by a kill) is dropped too."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(x + "\n" for x in kept))
    return dropped


def fresh_metrics(path: Path) -> Path | None:
    """A run starting from step 0 into a directory that already holds a metrics file (a fresh run over an old
    one, or ``--resume`` before any checkpoint was written): the old lines would precede the new run's and
    repeat its steps, so the file is moved aside to ``<name>.prev`` (replacing an older one), not appended to
    or deleted. Returns the new path of the old file, or None when there was none (or it was empty)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    previous = path.with_name(path.name + ".prev")
    os.replace(path, previous)
    return previous


def start_metrics(path: Path, checkpoint_step: int | None) -> None:
    """Ready a run's metrics file before it logs (main process only): resuming from the checkpoint of
    ``checkpoint_step``, drop the lines logged after it (metric lines are numbered step + 1); starting at step 0
    (``None``), move an old file aside, with a warning."""
    if checkpoint_step is not None:
        trim_metrics(path, checkpoint_step + 1)
    elif previous := fresh_metrics(path):
        log.warning("starting at step 0: the metrics already in %s were moved to %s", path, previous)


# ----------------------------------------------------------------------------- the plain model (export)


def is_lora_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds LoRA adapters (peft's adapter config) rather than full weights."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def read_lora_base(directory: Path) -> dict:
    """The ``{"model", "dtype"}`` of a LoRA checkpoint's base model, with a clear error when missing or bad."""
    path = Path(directory) / LORA_BASE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing: this LoRA checkpoint does not name its base model; "
                              "give it with --base-model")
    try:
        base = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not JSON: {e}") from e
    if not isinstance(base, dict) or not isinstance(base.get("model"), str):
        raise CheckpointError(f'{path}: expected {{"model": "<base model directory>", "dtype": ...}}, got {base!r}')
    return {"model": base["model"], "dtype": base.get("dtype")}


def export_model(model, tokenizer, out: Path, head=None, policy=None) -> None:
    """Write ``model`` as a plain model directory that ``load_model(out)`` loads natively (no peft): a peft model
    is merged (base + B A scaling) on a copy, the trained one is left as it is; the tokenizer, threshold head and
    step policy are written beside it. Other files in ``out`` (metrics, the checkpoint) are left alone."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plain = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if head is not None:
        head.save(out)
    if policy is not None:
        policy.save(out)


def export_checkpoint(checkpoint: Path, output: Path, base_model: str | None = None) -> Path:
    """Write the plain model of a training checkpoint to ``output`` (``diffpo-train export``): a LoRA checkpoint's
    adapters merged into its base (``base_model``, default the one its ``lora_base.json`` names, loaded in the
    dtype it trained in), a full one's weights as they are; with the threshold head and step policy saved beside
    them. Equals the run's own export had it ended at that checkpoint's step. Returns ``output``."""
    from diffpo_serve.dllm.loading import load_model
    from diffpo_serve.dllm.step_policy import load_policy
    from diffpo_serve.dllm.threshold_head import load_head

    checkpoint, output = Path(checkpoint), Path(output)
    recover_interrupted(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no checkpoint directory")
    if output.resolve() == checkpoint.resolve():
        raise CheckpointError(f"{output}: the output would overwrite the checkpoint; choose another directory")
    if is_lora_checkpoint(checkpoint):
        from peft import PeftModel
        from diffpo_serve.dllm.loading import ModelLoadError
        base = read_lora_base(checkpoint)
        try:
            loaded = load_model(base_model or base["model"], dtype=base["dtype"])
        except ModelLoadError as e:
            raise CheckpointError(f"{checkpoint}: the base model of its adapters: {e}"
                                  + ("" if base_model else " (give its new place with --base-model)")) from e
        model = PeftModel.from_pretrained(loaded.model, checkpoint).merge_and_unload()  # a throwaway copy: in place
        tokenizer = loaded.tokenizer
    else:
        if base_model:
            raise CheckpointError(f"{checkpoint}: holds full weights, not LoRA adapters; --base-model does not apply")
        loaded = load_model(checkpoint)
        model, tokenizer = loaded.model, loaded.tokenizer
    export_model(model, tokenizer, output, load_head(checkpoint), load_policy(checkpoint))
    return output
