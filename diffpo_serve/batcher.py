"""Step-level continuous batching over the shared decoder: the queue, the decoding thread, the rows.

One background thread owns the model and a batch state holding every active row (a row is one prompt
decoded once; a request with ``n`` choices over ``p`` prompts contributes ``n * p`` rows). The state and
the step belong to the model's decoding paradigm (:mod:`diffpo_serve.dllm.decoding`: the masked sampler's
:class:`~diffpo_serve.dllm.sampler.BatchState`, or DiffusionGemma's
:class:`~diffpo_serve.dllm.canvas.CanvasState`), reached through one :class:`~diffpo_serve.paradigms.Paradigm`
object; the loop is the same for both::

    drop rows whose request was cancelled (client gone, stop string matched, timeout)
    admit waiting rows up to max_batch_size     -> paradigm.init_state + paradigm.concat  (rows join)
    paradigm.step(state)                        -> one model pass over every active row
    report rows whose block advanced or that finished, then drop finished rows -> paradigm.select
    (rows that asked for steps: first a per-pass event from paradigm.step_updates, every step)

so requests with different prompts, lengths and sampling parameters share every forward pass, and a
row's output is exactly what it would be alone (each paradigm keeps per-row generators and padding
that the row cannot see). A row's threshold is the request's, the paradigm's default, or, for
``learned`` rows, the model's threshold head's choice, made once per row inside the first forward pass
for it (no extra pass); ``policy`` rows (masked) are decided per step by the model's step
policy, whose per-row state (the previous pass's argmax) lives in the BatchState and so survives rows
joining and leaving; updates report the threshold each row really used.

The asyncio side talks to the thread through :class:`RequestHandle`: :meth:`Batcher.submit` queues a
request's rows (or raises :class:`QueueFull` / :class:`Draining`), and the thread delivers
:class:`RowUpdate` / :class:`BatchFailure` events (and, for rows submitted with ``return_steps``,
one :class:`~diffpo_serve.dllm.decoding.StepUpdate` or :class:`~diffpo_serve.dllm.decoding.CanvasStepUpdate` per
forward pass, before that pass's RowUpdate) into the handle's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``, once per step for all of that step's events (:func:`deliver_all`). The
thread never holds the lock during a forward pass, so the event loop never waits for the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from diffpo_serve.dllm.canvas import CanvasParams
from diffpo_serve.dllm.loading import LoadedModel
from diffpo_serve.dllm.sampler import SamplingParams
from diffpo_serve.metrics import ServerMetrics
from diffpo_serve.dllm.decoding import CanvasStepUpdate, StepUpdate  # noqa: F401  (re-exported)
from diffpo_serve.paradigms import paradigm_for

log = logging.getLogger(__name__)

class QueueFull(Exception):
    """The waiting queue is at ``max_queue``."""


class Draining(Exception):
    """The batcher accepts no new work (shutting down)."""


@dataclass(frozen=True)
class RowRequest:
    """One row to decode: token-id prompt and (validated) parameters of the model's paradigm."""

    prompt: list[int]
    params: SamplingParams | CanvasParams
    return_steps: bool = False  # also deliver a StepUpdate for each forward pass of this row


@dataclass(frozen=True)
class RowUpdate:
    """A row's determined prefix: sent when its current block advances and when it finishes.

    ``ids`` are the generated ids that can no longer change (masked: up to the first still-masked
    position; canvas: the finished blocks), the whole ``gen_length`` once finished (EOS- or pad-filled
    after an EOS). ``threshold`` is the one the row is decoded with.
    """

    choice: int
    ids: list[int]
    finished: bool
    nfe: int
    sampler: str
    threshold: float
    encoder_passes: int | None = None  # canvas rows: prompt-encoder passes so far (None: masked rows)
    logprobs: list | None = None  # rows that asked for them: a TokenLogprob per id of ``ids``


@dataclass(frozen=True)
class BatchFailure:
    """The request's rows were dropped by a failure on the decoding thread, or by shutdown."""

    message: str
    shutting_down: bool = False


class RequestHandle:
    """The asyncio side of one submitted request: its event queue and its cancellation flags."""

    def __init__(self, rows: list[RowRequest], loop: asyncio.AbstractEventLoop | None, batcher,
                 request_id: int = 0):
        self.rows = rows
        self.events: asyncio.Queue = asyncio.Queue()
        self.loop = loop  # the event loop that owns ``events`` (None in the decoder process)
        self.request_id = request_id  # names the request between the front and the decoder process
        self._batcher = batcher  # a Batcher, or the front's ProcessBatcher
        self.cancelled = False
        self.cancelled_choices: set[int] = set()
        self.next_row = 0  # admission cursor; only the decoding thread moves it

    def cancel(self, choice: int | None = None) -> None:
        """Drop every row of this request (or one choice) at the next step boundary."""
        if choice is None:
            self.cancelled = True
        else:
            self.cancelled_choices.add(choice)
        self._batcher.cancelled(self, choice)

    def is_cancelled(self, choice: int) -> bool:
        return self.cancelled or choice in self.cancelled_choices


def deliver_all(events: list[tuple[RequestHandle, object]]) -> None:
    """Deliver a step's events with one wake-up of each event loop (called from the decoding thread).

    Per-event ``call_soon_threadsafe`` would wake the loop once per row per step; at a full batch that
    is hundreds of wake-ups a second competing with the decoder for the GIL.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for handle, event in events:
        by_loop.setdefault(handle.loop, []).append((handle.events, event))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, pairs)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def queued_beyond_capacity(queued_rows: list[int], free: int) -> int:
    """How many of the requests queued in this order (each with its rows still to run) do not all fit
    in ``free`` batch slots at the next step."""
    for i, rows in enumerate(queued_rows):
        free -= rows
        if free < 0:
            return len(queued_rows) - i
    return 0


def check_admission(queued_rows: list[int], new_rows: int, free: int, max_queue: int) -> None:
    """The one admission rule of both batchers: a request that fits in the free slots with everything
    queued before it is always taken; otherwise it waits, behind at most ``max_queue`` - 1 others that
    do not fit either. Raises :class:`QueueFull`."""
    if sum(queued_rows) + new_rows > free and queued_beyond_capacity(queued_rows, free) >= max_queue:
        raise QueueFull(f"the request queue is full ({max_queue} waiting)")


def _put_all(pairs: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in pairs:
        queue.put_nowait(event)


@dataclass
class _Slot:
    handle: RequestHandle
    choice: int
    params: SamplingParams | CanvasParams  # as admitted (resolved)
    reported_block: int = 0
    return_steps: bool = False


class Batcher:
    """The decoding thread and its queue; see the module docstring."""

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 32, max_queue: int = 256,
                 metrics: ServerMetrics | None = None, step_fn=None, deliver=deliver_all):
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self.paradigm = paradigm_for(loaded)
        # step_fn(model, state) replaces the paradigm's step (tests inject failures)
        self._step_state = self.paradigm.step if step_fn is None else (lambda state: step_fn(loaded.model, state))
        self._deliver = deliver  # takes a step's [(handle, event)]; the decoder process sends them on
        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._slots: list[_Slot] = []  # aligned with the rows of self._state
        self._admitting = 0
        self._state = None  # the paradigm's batch state (None: no rows)
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ asyncio side

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="diffpo-batcher", daemon=True)
            self._thread.start()

    def submit(self, rows: list[RowRequest], loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request's rows; raises :class:`Draining` or :class:`QueueFull`.

        A request that fits in the free batch capacity is always taken; otherwise it waits, and at
        most ``max_queue`` requests wait.
        """
        if not rows:
            raise ValueError("no rows")
        handle = RequestHandle(rows, loop or asyncio.get_running_loop(), self)
        self.enqueue(handle)
        return handle

    def enqueue(self, handle: RequestHandle) -> None:
        """Queue a handle made elsewhere (the decoder process's); same checks as :meth:`submit`."""
        rows = handle.rows
        with self._cond:
            if self._draining or self._stopping:
                raise Draining("the server is shutting down")
            running = len(self._slots) + self._admitting
            check_admission([len(h.rows) - h.next_row for h in self._waiting], len(rows),
                            self.max_batch_size - running, self.max_queue)
            self._waiting.append(handle)
            self._publish_queue()
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def cancelled(self, handle: RequestHandle, choice: int | None) -> None:
        """A handle was cancelled: its rows leave at the next step boundary."""
        self.wake()

    def has_work(self) -> bool:
        return bool(self._waiting or self._slots)

    def stats(self) -> dict[str, int | bool]:
        return {"active_rows": len(self._slots) + self._admitting, "waiting_requests": len(self._waiting),
                "draining": self._draining}

    def begin_drain(self) -> None:
        """Refuse new requests from now on; running and waiting ones continue."""
        with self._cond:
            self._draining = True

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests, wait until waiting and running rows are done, stop the thread.

        Returns whether everything finished within ``timeout``; whatever is left then fails with a
        shutdown error. Blocking: from asyncio call it through ``asyncio.to_thread``.
        """
        self.begin_drain()
        with self._cond:
            idle = self._cond.wait_for(lambda: not self._waiting and not self._slots and not self._admitting, timeout)
        self.stop()
        return idle

    def stop(self) -> None:
        """Stop the thread now; rows still queued or running get a :class:`BatchFailure`."""
        with self._cond:
            self._draining = self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._fail_everything("the server is shutting down", shutting_down=True)

    # ------------------------------------------------------------------ decoding thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._waiting or self._slots)
                if self._stopping:
                    break
            self.iterate()

    def iterate(self) -> None:
        """:meth:`run_once`, failing the running rows if it raises (the decoding loop's body)."""
        try:
            self.run_once()
        except Exception:  # a bug here must not leave requests hanging until their timeout
            log.exception("batcher iteration failed; failing the running rows")
            self._fail([s.handle for s in self._slots], "internal error during decoding")
            self._keep([])
            with self._cond:
                self._admitting = 0
                self._cond.notify_all()

    def run_once(self) -> None:
        """One iteration: drop cancelled rows, admit, step (the thread's loop body; tests call it by hand)."""
        with self._cond:
            admitted = self._take_admissible()
            self._admitting = len(admitted)  # neither waiting nor running yet: drain() must not see idle
        self._drop_cancelled()
        if admitted:
            self._admit(admitted)
        with self._cond:
            self._admitting = 0
        if self._state is not None:
            self._step()
        with self._cond:
            self._publish_queue()
            self._cond.notify_all()  # wakes drain()

    def _take_admissible(self) -> list[tuple[RequestHandle, int]]:
        """Pop waiting rows, first come first served, into the free capacity (lock held)."""
        free = self.max_batch_size - len(self._slots)
        taken: list[tuple[RequestHandle, int]] = []
        while self._waiting and free > 0:
            handle = self._waiting[0]
            while handle.next_row < len(handle.rows) and free > 0:
                choice = handle.next_row
                handle.next_row += 1
                if not handle.is_cancelled(choice):
                    taken.append((handle, choice))
                    free -= 1
            if handle.cancelled:
                handle.next_row = len(handle.rows)
            if handle.next_row >= len(handle.rows):
                self._waiting.popleft()
        # cancelled requests further back leave the queue now rather than when they reach its head
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
        return taken

    def _admit(self, admitted: list[tuple[RequestHandle, int]]) -> None:
        prompts = [h.rows[c].prompt for h, c in admitted]
        try:
            params = [self.paradigm.resolve(h.rows[c].params) for h, c in admitted]
            new = self.paradigm.init_state(prompts, params)
        except Exception:
            log.exception("cannot admit %d rows", len(admitted))
            self._fail([h for h, _ in admitted], "internal error while starting the request")
            return
        state = new if self._state is None else self.paradigm.concat([self._state, new])
        with self._cond:  # the rows move from "admitting" to "running" at once
            self._state = state
            self._slots.extend(_Slot(h, c, p, return_steps=h.rows[c].return_steps)
                               for (h, c), p in zip(admitted, params))
            self._admitting = 0
        self._publish_rows()

    def _drop_cancelled(self) -> None:
        keep = [i for i, s in enumerate(self._slots) if not s.handle.is_cancelled(s.choice)]
        dropped = len(self._slots) - len(keep)
        if dropped:
            self._keep(keep)
            if self.metrics:
                self.metrics.cancelled_rows.inc(dropped)

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self._state, self._slots = None, []
        else:
            self._state = self.paradigm.select(self._state, keep)
            self._slots = [self._slots[i] for i in keep]
        self._publish_rows()

    def _step(self) -> None:
        state = self._state
        start = time.perf_counter()
        blocks_before = state.block.clone() if any(s.return_steps for s in self._slots) else None
        try:
            out = self._step_state(state)
        except Exception:
            log.exception("denoising step failed; failing the %d rows in the batch", state.batch_size)
            self._fail([s.handle for s in self._slots], "internal error during decoding")
            self._keep([])
            return
        if self.metrics:
            self.metrics.step_seconds.observe(time.perf_counter() - start)
            self.metrics.row_steps.inc(state.batch_size)
        rows = out.rows.tolist()
        if not rows:
            return
        blocks = state.block[out.rows].tolist()
        finished = state.finished[out.rows].tolist()
        report = [(r, b, f) for r, b, f in zip(rows, blocks, finished) if f or b != self._slots[r].reported_block]
        events: list[tuple[RequestHandle, object]] = []
        if blocks_before is not None:
            picked = [k for k, r in enumerate(rows) if self._slots[r].return_steps]
            if picked:
                slots = [self._slots[rows[k]] for k in picked]
                updates = self.paradigm.step_updates(state, out, picked, blocks_before,
                                                     [(s.choice, s.params.sampler) for s in slots])
                events += [(s.handle, u) for s, u in zip(slots, updates)]
        if report:
            idx = torch.tensor([r for r, _, _ in report], device=state.canvas.device)
            ids = self.paradigm.determined(state, idx)
            logprobs = self.paradigm.token_logprobs(state, idx, [len(i) for i in ids])
            nfe, thresholds = state.nfe[idx].tolist(), state.threshold[idx].tolist()
            encoder = self.paradigm.encoder_passes(state, idx)
            for k, (r, b, f) in enumerate(report):
                slot = self._slots[r]
                slot.reported_block = b
                events.append((slot.handle, RowUpdate(
                    choice=slot.choice, ids=ids[k], finished=bool(f), nfe=int(nfe[k]),
                    sampler=slot.params.sampler, threshold=round(float(thresholds[k]), 6),
                    encoder_passes=encoder[k], logprobs=logprobs[k])))
        if any(finished):  # finished rows leave before their results go out
            done = set(r for r, f in zip(rows, finished) if f)
            self._keep([i for i in range(len(self._slots)) if i not in done])
        self._deliver(events)

    def _fail_everything(self, message: str, shutting_down: bool = False) -> None:
        with self._cond:
            handles = {id(s.handle): s.handle for s in self._slots}
            handles.update({id(h): h for h in self._waiting})
            self._waiting.clear()
            self._slots, self._state = [], None
            self._publish_queue()
            self._publish_rows()
            self._cond.notify_all()
        self._fail(list(handles.values()), message, shutting_down)

    def _fail(self, handles: list[RequestHandle], message: str, shutting_down: bool = False) -> None:
        """One BatchFailure to each distinct handle."""
        unique = {id(h): h for h in handles}.values()
        self._deliver([(h, BatchFailure(message, shutting_down=shutting_down)) for h in unique])

    def _publish_queue(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._waiting))

    def _publish_rows(self) -> None:
        if self.metrics:
            self.metrics.running_rows.set(len(self._slots))
