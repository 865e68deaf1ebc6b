"""A new step policy's warm start, round by round, and the state on disk that lets ``--resume`` continue one.

Round 0 decodes the training prompts with the behaviour sampler (EB at ``--warm-start-gamma``), every later
round with the policy fitted so far (DAgger); each round adds its features and labels
(:func:`training.commit_policy.warm_start_data`) to the data and fits a new, identically seeded policy to all
of it (:func:`training.commit_policy.fit_warm_start`).

A warm start on tens of thousands of prompts takes hours, so :class:`WarmStartStore` keeps it in
``OUTPUT_DIR/warm_start`` while it runs: each round's data a part of :data:`PART_PROMPTS` prompts at a time and
each round's fitted policy, every file written under a temporary name and renamed into place. ``--resume``
reads back what is there and decodes only what is not; a run without ``--resume`` discards it. The settings the
data depends on are recorded in ``run.json`` and a resume under other ones is refused, naming them (the number
of rounds is not among them: a finished round does not depend on how many follow). ``diffpo-train rl`` removes
the directory when the run has exported its model.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffpo_serve.dllm.loading import LoadedModel
from diffpo_serve.dllm.sampler import SamplingParams
from diffpo_serve.dllm.step_policy import StepPolicy, StepPolicyError, load_policy
from training import commit_policy
from training.checkpoint import CheckpointError, atomic_dir, write_file_atomic, write_text_atomic

log = logging.getLogger(__name__)

WARM_START_DIR = "warm_start"  # under OUTPUT_DIR, while a warm start runs
PART_PROMPTS = 8192  # prompts per saved part of a round's data: a multiple of warm_start_data's batch of 256


class WarmStartStore:
    """``directory``'s rounds: ``round{r}/part{start}.safetensors`` (features and labels of prompts
    ``start .. start + PART_PROMPTS``), ``round{r}/policy`` (the policy fitted after round r, operating point
    folded in) and ``round{r}/fit.json`` (its final BCE). ``settings``: what the data depends on (JSON values)."""

    def __init__(self, directory: str | Path, settings: dict, resume: bool):
        self.dir = Path(directory)
        run = self.dir / "run.json"
        if resume and run.exists():
            try:
                saved = json.loads(run.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{run}: unreadable record of the warm start's settings: {e}") from e
            differ = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
            if differ:
                what = "; ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
                raise ValueError(f"--resume: the unfinished warm start in {self.dir} has other settings ({what}); "
                                 "run with those, or without --resume to discard it")
            log.info("--resume: continuing the warm start in %s", self.dir)
            return
        if self.dir.exists():
            log.warning("discarding the unfinished warm start in %s (no --resume)", self.dir)
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        write_text_atomic(run, json.dumps(settings, indent=1))

    def _part_file(self, r: int, start: int) -> Path:
        return self.dir / f"round{r}" / f"part{start:09d}.safetensors"

    def part(self, r: int, start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Round r's features and labels of the part starting at prompt ``start``, or None if not saved."""
        f = self._part_file(r, start)
        if not f.exists():
            return None
        try:
            t = load_file(str(f))
            return t["features"], t["labels"]
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"{f}: cannot read this part of the warm start's data ({e}); delete it and "
                                  "--resume decodes its prompts again") from e

    def save_part(self, r: int, start: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        f = self._part_file(r, start)
        f.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": features.contiguous(), "labels": labels.contiguous()}
        write_file_atomic(f, lambda tmp: save_file(tensors, str(tmp)))

    def policy(self, r: int) -> tuple[StepPolicy, float] | None:
        """The policy fitted after round r and its final BCE, or None if that fit has not finished."""
        d = self.dir / f"round{r}"
        if not (d / "fit.json").exists():
            return None
        try:
            loss = float(json.loads((d / "fit.json").read_text())["bce"])
            policy = load_policy(d / "policy")
        except (OSError, ValueError, KeyError, TypeError, StepPolicyError) as e:
            raise CheckpointError(f"{d}: cannot read round {r}'s fitted policy ({e}); delete {d / 'fit.json'} "
                                  "and --resume fits it again") from e
        if policy is None:
            raise CheckpointError(f"{d / 'policy'}: round {r}'s fitted policy is missing; delete "
                                  f"{d / 'fit.json'} and --resume fits it again")
        return policy, loss

    def save_policy(self, r: int, policy: StepPolicy, loss: float) -> None:
        d = self.dir / f"round{r}"
        d.mkdir(parents=True, exist_ok=True)
        atomic_dir(d / "policy", policy.save)
        write_text_atomic(d / "fit.json", json.dumps({"bce": loss}))  # last: it marks the round's fit as done


def run_warm_start(loaded: LoadedModel, prompts: list[list[int]], gen_length: int, behaviour: SamplingParams,
                   new_policy: Callable[[], StepPolicy], *, rounds: int, label: str, epochs: int, seed: int,
                   point: float | None, store: WarmStartStore | None = None,
                   progress: bool = False) -> tuple[StepPolicy, int, float]:
    """The warm-started policy, the number of labelled tokens it was fitted to and the fit's final BCE.

    ``behaviour``: round 0's sampler; ``new_policy()``: a fresh, seeded policy (its feature set also decides
    whether round 0 traces hidden states); ``point``: the operating point folded in after each fit (None or 0:
    keep 0.5). With a ``store``, saved parts and fits are read back instead of recomputed, new ones saved."""
    policy, loss = new_policy(), math.nan
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for r in range(rounds):
        bar = tqdm(total=len(prompts), desc=f"warm start round {r + 1}/{rounds} ({behaviour.sampler}, {label} labels)",
                   disable=not progress)
        for start in range(0, len(prompts), PART_PROMPTS):
            chunk = prompts[start:start + PART_PROMPTS]
            got = store.part(r, start) if store is not None else None
            if got is None:
                got = commit_policy.warm_start_data(loaded, chunk, gen_length, behaviour, policy=policy, label=label,
                                                    bar=bar)
                if store is not None:
                    store.save_part(r, start, *got)
            else:
                bar.update(len(chunk))
            features.append(got[0])
            labels.append(got[1])
        bar.close()
        fitted = store.policy(r) if store is not None else None
        if fitted is None:
            x, y = torch.cat(features), torch.cat(labels)
            features, labels = [x], [y]
            policy = new_policy()
            loss = commit_policy.fit_warm_start(policy, x, y, epochs=epochs, seed=seed)
            if point:
                policy.set_operating_point(point)
            if store is not None:
                store.save_policy(r, policy, loss)
        else:
            policy, loss = fitted
        behaviour = SamplingParams("policy", gen_length, block_length=behaviour.block_length,
                                   threshold=policy.threshold)
    return policy, sum(len(y) for y in labels), loss
