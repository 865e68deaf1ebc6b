"""Repeat a tiny two-process ``accelerate launch --multi_gpu`` run (gloo on CPU) under CPU load and count the
runs that do not end cleanly: a non-zero exit status, a rank that aborted at exit ("terminate called without
an active exception") or a run that hangs past ``--timeout`` (training/distributed.py says why each happens).

    python tools/ddp_exit_stress.py --runs 30 --busy 2 sft               # diffpo-train sft, as the tests run it
    python tools/ddp_exit_stress.py --runs 30 --busy 2 rl                # diffpo-train rl from a tiny model
    python tools/ddp_exit_stress.py --runs 30 --busy 2 probe:none probe:finish+exit

``probe:ENDING`` is a minimal DDP run (three optimiser steps of a linear layer) that ends in one of four ways:
``none`` (return after the last step), ``barrier`` (a final ``wait_for_everyone``, as the trainers did before
:func:`training.distributed.finish_run`), ``destroy`` (a barrier, then ``destroy_process_group``, the DDP model
then freed) or ``finish+exit`` (``finish_run``, then ``exit_status``, as ``diffpo-train`` does). Several kinds
are interleaved run by run, so they see the same load.
``--busy N`` runs N busy loops (``while True: pass``) meanwhile, so that the ranks' threads are descheduled at
random moments, as on a loaded machine. Prints one line per round and a summary; exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "32", "--num-hidden-layers", "2", "--num-attention-heads", "2", "--intermediate-size", "64"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
ENDINGS = ["none", "barrier", "destroy", "finish+exit"]


def probe(ending: str) -> int:
    """One rank of the minimal DDP run; ends as ``ending`` says."""
    import torch
    from accelerate import Accelerator

    from training.distributed import exit_status, finish_run
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(64, 64), torch.optim.AdamW(torch.nn.Linear(64, 64)
                                                                                        .parameters()))
    for _ in range(3):
        accelerator.backward(model(torch.randn(8, 64)).sum())
        optimizer.step()
        optimizer.zero_grad()
    if ending in ("barrier", "destroy"):
        accelerator.wait_for_everyone()
    if ending == "destroy":
        torch.distributed.destroy_process_group()
        accelerator.free_memory()
        del model, optimizer  # DDP's reducer, the group's last holder, goes: its destructor joins gloo's workers
    if ending == "finish+exit":
        finish_run(accelerator)
        return exit_status(0)
    return 0


def launch_command(kind: str, out: Path, base: Path | None) -> list[str]:
    """The argv of one two-process run of ``kind`` writing into ``out``."""
    if kind == "sft":
        return LAUNCH + ["-m", "training.cli", "sft", "--output-dir", str(out), "--max-steps", "4",
                         "--train-examples", "64", *TINY, "--batch-size", "8", "--log-every", "2", "--save-every", "4"]
    if kind == "rl":
        return LAUNCH + ["-m", "training.cli", "rl", "--model", str(base), "--output-dir", str(out), "--tasks",
                         "sudoku", "--train-examples", "16", "--num-generations", "2", "--prompts-per-step", "1",
                         "--num-iterations", "1", "--max-steps", "2", "--save-every", "2", "--gen-length", "8",
                         "--steps", "4", "--device", "cpu"]
    if kind.startswith("probe:") and kind[6:] in ENDINGS:
        return LAUNCH + [str(Path(__file__).resolve()), "--worker", kind[6:]]
    raise ValueError(f"{kind!r}: sft, rl or probe:ENDING with ENDING one of {ENDINGS}")


def tiny_base(directory: Path) -> Path:
    """A tiny SFT model to start RL from (one process, 2 steps)."""
    subprocess.run([sys.executable, "-m", "training.cli", "sft", "--output-dir", str(directory), "--max-steps", "2",
                    "--train-examples", "32", *TINY, "--batch-size", "4", "--save-every", "2", "--tasks", "sudoku"],
                   check=True, capture_output=True)
    return directory


def run_once(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run one launch in its own session: ``(status, stderr)``, status None if it hung past ``timeout`` (then
    the launcher and its ranks, all in that session, are killed)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err


def failed(status: int | None, stderr: str) -> bool:
    """A hang, a non-zero status (the launcher's is non-zero when any rank's is) or an abort at exit."""
    return status != 0 or "terminate called" in stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kinds", nargs="*", default=["sft"], help="sft, rl, probe:ENDING (interleaved)")
    parser.add_argument("--runs", type=int, default=30, help="runs of each kind")
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes running meanwhile")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--worker", choices=ENDINGS, help=argparse.SUPPRESS)  # a rank of probe:ENDING
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        return probe(args.worker)
    for kind in args.kinds:
        launch_command(kind, Path("."), None)  # refuse a bad kind before starting anything
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    failures = dict.fromkeys(args.kinds, 0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base = tiny_base(Path(tmp) / "base") if "rl" in args.kinds else None
            for i in range(args.runs):
                for kind in args.kinds:
                    t0 = time.time()
                    status, err = run_once(launch_command(kind, Path(tmp) / f"{kind}-{i}", base), args.timeout)
                    if failed(status, err):
                        failures[kind] += 1
                        what = "HUNG" if status is None else f"status {status}"
                        print(f"run {i} {kind}: FAIL ({what}) after {time.time() - t0:.1f}s\n   "
                              + "\n   ".join(err.strip().splitlines()[-6:]), flush=True)
                print(f"after {i + 1} runs: " + ", ".join(f"{k} {n} failed" for k, n in failures.items()), flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    print(f"{args.runs} runs of each with {args.busy} busy loops: "
          + ", ".join(f"{k}: {n} of {args.runs} failed" for k, n in failures.items()), flush=True)
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
