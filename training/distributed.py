"""The end of a training run under ``accelerate launch`` (several processes), shared by sft, rl and distill.

Why a rank could die after its run had finished and saved (found with gdb on the core of a rank that aborted
with "terminate called without an active exception", and on a rank that hung; ``tools/ddp_exit_stress.py``
reproduces both). DDP launches its gradient all-reduces inside ``backward``, while torch keeps a Python object
(the autograd context) in the thread's state, and each gloo work keeps a copy of that state. The work is freed
by the gloo worker thread that ran it, and freeing that copy takes the GIL. So, at the end of a run:

- if the process tears its interpreter down while such a worker still waits for the GIL (on a loaded machine
  the worker can stay descheduled past the last barrier), Python 3.11 ends the worker with ``pthread_exit``,
  whose unwinding through gloo's ``noexcept`` work destructor calls ``std::terminate``: SIGABRT;
- if the process group is destroyed (``destroy_process_group``), DDP's reducer still holds it, and when the
  DDP model is freed the group's destructor joins the workers with the GIL held, while a worker waits for the
  GIL: the rank hangs for good.

Neither can be avoided from Python once DDP has run (its reducer keeps the group, so the workers cannot be
joined while the interpreter is safely alive). So a rank ends the way that involves neither: :func:`finish_run`
closes the bars and waits for every rank (no collective is in flight afterwards), without destroying the group;
:func:`exit_status` then flushes the output and leaves with ``os._exit``, without tearing down the interpreter
(nothing else is left to do: every file the run wrote is closed, and the group dies with the process).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

_ran_under_a_process_group = False  # set by finish_run when this process's run used a (multi-process) group


def finish_run(accelerator, *bars) -> None:
    """End a run on this process: close its progress ``bars`` (tqdm), then wait until every rank has got here (the
    main process has finished writing, and no collective is in flight). The process group is left alone (see
    the module docstring); a process that ran under one ends with :func:`exit_status`, as ``diffpo-train`` does."""
    global _ran_under_a_process_group
    for bar in bars:
        bar.close()
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _ran_under_a_process_group = True


def exit_status(code: int) -> int:
    """The exit status of a command that has finished: ``code``, returned, in a process that ran no multi-process
    run; a process whose run :func:`finish_run` ended under a process group exits here with ``code``, after
    flushing the logging handlers, stdout and stderr, and without the interpreter teardown that gloo's worker
    threads can abort (the module docstring)."""
    if not _ran_under_a_process_group:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
