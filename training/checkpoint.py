"""Atomic training checkpoints: model, tokenizer, optimiser, scheduler, RNG state and step.

A checkpoint is a directory written under a temporary name and renamed into place, so a run killed
mid-save leaves the previous checkpoint intact. ``--resume`` loads it and continues at ``step + 1``;
:func:`trim_metrics` first drops the metric lines logged after it, so a resumed run's metrics.jsonl has
each step once; a run that starts from step 0 moves a previous run's file aside (:func:`fresh_metrics`);
:func:`start_metrics` does whichever applies.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
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
                    extra: dict | None = None, head=None, policy=None) -> None:
    """Write a complete checkpoint of a training run to ``directory`` (atomically); ``head``/``policy``:
    the model's threshold head and step policy, saved next to its weights."""

    def write(tmp: Path):
        model.save_pretrained(tmp)
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
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, path)
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
