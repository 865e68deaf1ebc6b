"""The batched decoder in its own process (the default; ``diffpo-serve --no-decoder-process`` keeps a thread).

In one process the decoding thread and the event loop share the interpreter lock: every millisecond
the loop spends parsing a request or writing a response is a millisecond in which the decoder
cannot run the Python between its torch calls. vLLM's V1 engine moves its engine core into a
separate process for this reason; this module does the same for the
:class:`~diffpo_serve.batcher.Batcher`, unchanged::

    front (uvicorn)                                          decoder process (spawned)
    Engine -> ProcessBatcher.submit ---("submit", id, rows)--->  Batcher.enqueue
    RequestHandle.cancel ------------("cancel", id, choice)-->  RequestHandle.cancel
    event loop reader on the pipe <---("events", [(id, event)], metric calls, stats)--- one per step

The decoder process loads the model with the server's loader and sends the front the
:class:`~diffpo_serve.dllm.loading.LoadedModel` without its weights (tokenizer, special ids,
threshold head), which is all the front's :class:`~diffpo_serve.engine.Engine` needs. The front
decides admission (queue full, draining) from the rows it has in flight, so a 503 needs no round
trip. The Batcher's metric calls are recorded in the decoder process and replayed on the front's
registry, so ``/metrics`` reads the same in both modes. If the decoder process dies, its requests
fail with a server error and the server stops (``on_exit``), as when the model fails to load.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sys
import threading
import weakref

import torch

from diffpo_serve.batcher import (BatchFailure, Batcher, Draining, QueueFull, RequestHandle, RowRequest,
                                  RowUpdate, check_admission, queued_beyond_capacity)
from diffpo_serve.dllm.loading import LoadedModel, ModelLoadError
from diffpo_serve.metrics import ServerMetrics
from diffpo_serve.settings import ServerSettings, parse_cpus

log = logging.getLogger(__name__)


class DecoderGone(Exception):
    """The decoder process is not running (it exited, or the server stopped it)."""


# ----------------------------------------------------------------------------- the decoder process

class _RecordedMetric:
    __slots__ = ("name", "calls")

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def observe(self, value: float) -> None:
        self.calls.append((self.name, "observe", value))

    def inc(self, value: float = 1) -> None:
        self.calls.append((self.name, "inc", value))

    def set(self, value: float) -> None:
        self.calls.append((self.name, "set", value))


class RecordedMetrics:
    """Stands in for :class:`ServerMetrics` in the decoder process: ``metrics.step_seconds.observe(x)``
    is recorded as ``("step_seconds", "observe", x)`` for the front to replay."""

    def __init__(self):
        self.calls: list[tuple[str, str, float]] = []

    def __getattr__(self, name: str) -> _RecordedMetric:
        return _RecordedMetric(name, self.calls)

    def take(self) -> list[tuple[str, str, float]]:
        calls, self.calls = self.calls, []
        return calls


def replay(metrics: ServerMetrics, calls: list[tuple[str, str, float]]) -> None:
    for name, method, value in calls:
        getattr(getattr(metrics, name), method)(value)


def decoder_main(conn, settings: ServerSettings, loader) -> None:
    """Body of the decoder process: load, then admit / step / report until told to stop."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s [decoder] %(message)s")
    try:
        if settings.decoder_cpus:
            os.sched_setaffinity(0, parse_cpus(settings.decoder_cpus))
        torch.set_grad_enabled(False)
        loaded = loader(settings)
        front_copy = loaded.without_weights()
    except Exception as e:  # ModelLoadError has a clear message; the front reports it
        if type(e).__name__ != "ModelLoadError":
            log.exception("cannot load the model")
        conn.send(("failed", type(e).__name__, str(e)))
        return
    outbox: list[tuple[RequestHandle, object]] = []
    metrics = RecordedMetrics()
    batcher = Batcher(loaded, max_batch_size=settings.max_batch_size, max_queue=sys.maxsize,
                      metrics=metrics, deliver=outbox.extend)
    handles: weakref.WeakValueDictionary[int, RequestHandle] = weakref.WeakValueDictionary()
    conn.send(("ready", front_copy))
    try:
        while True:
            if not batcher.has_work():
                conn.poll(None)  # idle: sleep until the front sends something
            while conn.poll():
                message = conn.recv()
                if message[0] == "submit":
                    _, request_id, rows = message
                    handle = RequestHandle(rows, None, batcher, request_id)
                    handles[request_id] = handle
                    try:
                        batcher.enqueue(handle)
                    except (QueueFull, Draining) as e:  # the front admits; this is only a safety net
                        outbox.append((handle, BatchFailure(str(e))))
                elif message[0] == "cancel":
                    _, request_id, choice = message
                    handle = handles.get(request_id)
                    if handle is not None:
                        handle.cancel(choice)
                elif message[0] == "stop":
                    return
            batcher.iterate()
            if outbox or metrics.calls:
                conn.send(("events", [(h.request_id, e) for h, e in outbox], metrics.take()))
                outbox.clear()
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        return  # the front is gone


# ----------------------------------------------------------------------------- the front's side

class _InFlight:
    __slots__ = ("handle", "open")

    def __init__(self, handle: RequestHandle):
        self.handle = handle
        self.open = set(range(len(handle.rows)))  # choices not yet finished or cancelled


class ProcessBatcher:
    """The front's stand-in for :class:`Batcher`: same ``submit`` / ``begin_drain`` / ``drain`` / ``stop``.

    Lifecycle: :meth:`start` (blocking; spawns the decoder process and returns the weightless
    :class:`LoadedModel` once the model is loaded), then :meth:`attach` on the serving event loop.
    Everything else but :meth:`drain` / :meth:`stop` runs on that loop.
    """

    def __init__(self, settings: ServerSettings, loader, metrics: ServerMetrics | None = None,
                 on_exit=None):
        self.settings = settings
        self.loader = loader
        self.max_batch_size = settings.max_batch_size
        self.max_queue = settings.max_queue
        self.metrics = metrics
        self.on_exit = on_exit  # called (on the loop) with a message if the decoder process dies
        self.loaded: LoadedModel | None = None
        self._inflight: dict[int, _InFlight] = {}  # in submission order
        self._next_id = 0
        self._draining = False
        self._gone: str | None = None  # why the decoder process is not running
        self._idle = threading.Condition()
        self._send_lock = threading.Lock()  # stop() may send from a worker thread
        self._loop: asyncio.AbstractEventLoop | None = None
        context = multiprocessing.get_context("spawn")  # never fork a process with threads and torch
        self._conn, child = context.Pipe()
        self._child_conn = child
        self.process = context.Process(target=decoder_main, args=(child, settings, loader),
                                       name="diffpo-decoder", daemon=True)

    def start(self) -> LoadedModel:
        """Spawn the decoder process and wait until its model is loaded (raises what loading raised)."""
        self.process.start()
        self._child_conn.close()
        try:
            message = self._conn.recv()
        except EOFError:
            self._gone = "the decoder process exited while loading the model"
            self.process.join(10)
            raise RuntimeError(f"{self._gone} (exit code {self.process.exitcode}); see its log") from None
        if message[0] == "failed":
            _, kind, text = message
            self._gone = text
            self.process.join(10)
            raise (ModelLoadError(text) if kind == "ModelLoadError" else RuntimeError(f"{kind}: {text}"))
        self.loaded = message[1]
        return self.loaded

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the decoder's events on ``loop`` (call from that loop)."""
        self._loop = loop
        loop.add_reader(self._conn.fileno(), self._on_readable)

    # ------------------------------------------------------------------ the Batcher's interface

    def submit(self, rows: list[RowRequest], loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        if not rows:
            raise ValueError("no rows")
        if self._gone is not None:
            raise DecoderGone(self._gone)
        if self._draining:
            raise Draining("the server is shutting down")
        check_admission(self._open_rows(), len(rows), self.max_batch_size, self.max_queue)
        self._next_id += 1
        handle = RequestHandle(rows, loop or asyncio.get_running_loop(), self, self._next_id)
        self._send(("submit", handle.request_id, rows))
        self._inflight[handle.request_id] = _InFlight(handle)
        return handle

    def _open_rows(self) -> list[int]:
        """Rows still to finish of each request in flight, in submission order (running ones first, as
        the decoder admits them), so the Batcher's admission rule applies with the whole batch free."""
        return [len(f.open) for f in self._inflight.values()]

    def cancelled(self, handle: RequestHandle, choice: int | None) -> None:
        flight = self._inflight.get(handle.request_id)
        if flight is None:
            return  # finished already
        if choice is None:
            flight.open.clear()
        else:
            flight.open.discard(choice)
        self._send(("cancel", handle.request_id, choice))
        self._forget_if_done(handle.request_id, flight)

    def wake(self) -> None:
        """Nothing to wake in this process (the decoder process wakes on its pipe)."""

    def stats(self) -> dict[str, int | bool]:
        open_rows = self._open_rows()
        return {"active_rows": sum(open_rows),
                "waiting_requests": queued_beyond_capacity(open_rows, self.max_batch_size),
                "draining": self._draining}

    def begin_drain(self) -> None:
        self._draining = True

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests, wait for the ones in flight, stop the decoder process (blocking)."""
        self.begin_drain()
        with self._idle:
            idle = self._idle.wait_for(lambda: not self._inflight or self._gone is not None, timeout)
        self.stop()
        return idle

    def stop(self) -> None:
        """Stop the decoder process now; requests still in flight get a shutdown :class:`BatchFailure`."""
        self._draining = True
        if self._gone is None:
            self._gone = "the server is shutting down"
            try:
                with self._send_lock:
                    self._conn.send(("stop",))
            except (OSError, ValueError):
                pass
        if self.process.pid is not None:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._shut, "the server is shutting down", True)
            except RuntimeError:
                pass

    # ------------------------------------------------------------------ on the event loop

    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as e:
            self._decoder_died(f"the decoder process is gone ({type(e).__name__})")
            raise DecoderGone(self._gone) from None

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                kind, events, calls = self._conn.recv()
                if self.metrics is not None and calls:
                    replay(self.metrics, calls)
                for request_id, event in events:
                    self._dispatch(request_id, event)
        except (EOFError, OSError):
            if self._gone is None:  # not a stop we asked for
                self._decoder_died(f"the decoder process exited (exit code {self.process.exitcode})")
            else:
                self._shut(self._gone, True)

    def _dispatch(self, request_id: int, event) -> None:
        flight = self._inflight.get(request_id)
        if flight is None:
            return  # cancelled in the front meanwhile
        flight.handle.events.put_nowait(event)
        if isinstance(event, BatchFailure):
            flight.open.clear()
        elif isinstance(event, RowUpdate) and event.finished:
            flight.open.discard(event.choice)
        self._forget_if_done(request_id, flight)

    def _forget_if_done(self, request_id: int, flight: _InFlight) -> None:
        if not flight.open:
            del self._inflight[request_id]
            if not self._inflight:
                with self._idle:
                    self._idle.notify_all()

    def _decoder_died(self, why: str) -> None:
        log.error("%s; failing its requests", why)
        self._gone = why
        self._shut("internal error: the decoder process exited", False)
        if self.on_exit is not None:
            self.on_exit(DecoderGone(why))

    def _shut(self, message: str, shutting_down: bool) -> None:
        """Stop reading the pipe and fail every request still in flight."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._conn.fileno())
            except (OSError, ValueError):
                pass
        for flight in list(self._inflight.values()):
            flight.handle.events.put_nowait(BatchFailure(message, shutting_down=shutting_down))
        self._inflight.clear()
        with self._idle:
            self._idle.notify_all()
