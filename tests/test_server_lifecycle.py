"""Loading, overload, disconnects, timeouts and draining, on live servers with injected (slow) models."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from diffpo_serve.api import ServerRuntime
from diffpo_serve.dllm.loading import ModelLoadError
from diffpo_serve.metrics import ServerMetrics
from diffpo_serve.settings import ServerSettings
from test_server_support import (MODEL_NAME, free_port, live_server, metric_value, save_tiny_model, scripted_loaded,
                                 wait_until)

LONG = "x" * 64


def post(server, body, path="/v1/completions", **kw):
    return httpx.post(server.url + path, json={"model": "scripted", **body}, timeout=kw.pop("timeout", 30), **kw)


def metrics(server) -> str:
    return httpx.get(server.url + "/metrics").text


# ----------------------------------------------------------------------------- loading

def test_health_is_503_while_loading_then_200():
    release = threading.Event()

    def blocked_loader(settings):
        assert release.wait(20)
        return scripted_loaded()

    with live_server(loader=blocked_loader, wait_ready=False) as srv:
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "model_loading"
        assert health.headers["retry-after"]
        models = httpx.get(srv.url + "/v1/models")
        assert models.status_code == 503 and models.headers["retry-after"]
        assert post(srv, {"prompt": "a|"}).status_code == 503
        assert metric_value(metrics(srv), "diffpo_model_ready") == 0
        release.set()
        srv.wait_ready(10)
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "model": "scripted"}
        assert post(srv, {"prompt": "a|"}).json()["choices"][0]["text"] == "ok"
        assert metric_value(metrics(srv), "diffpo_model_ready") == 1


def test_load_failure_is_reported_and_fatal():
    from diffpo_serve.api import create_app
    from diffpo_serve.settings import ServerSettings
    from test_server_support import LiveServer

    fatal = []

    def broken_loader(settings):
        raise ModelLoadError("/nowhere: model directory does not exist")

    app = create_app(ServerSettings(decoder_process=False), loader=broken_loader, on_fatal=fatal.append)
    srv = LiveServer(app).start(wait_ready=False)
    try:
        assert wait_until(lambda: fatal, 10)
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "model_load_failed"
        assert "does not exist" in health.json()["error"]["message"]
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- overload

def test_queue_full_gives_503_with_retry_after():
    loader = lambda settings: scripted_loaded(default=LONG, delay=0.02)  # noqa: E731
    with live_server(loader=loader, max_batch_size=1, max_queue=1) as srv:
        body = {"prompt": "a|", "max_tokens": 32, "block_length": 8}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, srv, body)
            assert wait_until(lambda: srv.runtime.batcher.stats()["active_rows"] == 1)
            queued = pool.submit(post, srv, body)
            assert wait_until(lambda: srv.runtime.batcher.stats()["waiting_requests"] == 1)
            refused = post(srv, body)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "queue_full"
            assert int(refused.headers["retry-after"]) >= 1
            assert running.result().status_code == 200 and queued.result().status_code == 200
        assert queued.result().json()["choices"][0]["text"] == LONG[:32]
        assert metric_value(metrics(srv), "diffpo_requests_total", 'endpoint="/v1/completions",status="503"') == 1


# ----------------------------------------------------------------------------- disconnects and timeouts

@pytest.fixture(scope="module")
def slow_server():
    loader = lambda settings: scripted_loaded(default=LONG * 2, delay=0.02)  # noqa: E731
    with live_server(loader=loader, max_batch_size=4, request_timeout=5) as srv:
        yield srv


def test_client_disconnect_mid_stream_frees_its_rows(slow_server):
    srv = slow_server
    before = metric_value(metrics(srv), "diffpo_cancelled_rows_total")
    body = {"model": "scripted", "prompt": "a|", "max_tokens": 128, "block_length": 8, "stream": True, "n": 2}
    started = time.time()
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] == "x" * 8
    # the whole request would take 128 steps x 20 ms; the rows must leave long before
    assert wait_until(lambda: srv.runtime.batcher.stats()["active_rows"] == 0, 5)
    assert time.time() - started < 2.0
    assert metric_value(metrics(srv), "diffpo_cancelled_rows_total") >= before + 2
    assert metric_value(metrics(srv), "diffpo_running_rows") == 0
    assert post(srv, {"prompt": "a|", "max_tokens": 4}).status_code == 200


def test_client_disconnect_while_waiting_for_a_whole_response(slow_server):
    srv = slow_server
    before = metric_value(metrics(srv), "diffpo_cancelled_rows_total")
    with pytest.raises(httpx.ReadTimeout):
        post(srv, {"prompt": "a|", "max_tokens": 64}, timeout=0.3)
    assert wait_until(lambda: srv.runtime.batcher.stats()["active_rows"] == 0, 3)
    assert metric_value(metrics(srv), "diffpo_cancelled_rows_total") == before + 1


def test_request_timeout_is_an_error():
    loader = lambda settings: scripted_loaded(default=LONG, delay=0.02)  # noqa: E731
    with live_server(loader=loader, request_timeout=0.3) as srv:
        r = post(srv, {"prompt": "a|", "max_tokens": 64})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                          json={"model": "scripted", "prompt": "a|", "max_tokens": 64, "stream": True}) as s:
            assert s.status_code == 200
            lines = [line for line in s.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_timeout"
        assert wait_until(lambda: srv.runtime.batcher.stats()["active_rows"] == 0, 3)


# ----------------------------------------------------------------------------- draining

def test_drain_finishes_running_work_and_refuses_new():
    loader = lambda settings: scripted_loaded(default=LONG, delay=0.02)  # noqa: E731
    with live_server(loader=loader) as srv:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(post, srv, {"prompt": "a|", "max_tokens": 32})
            assert wait_until(lambda: srv.runtime.batcher.stats()["active_rows"] == 1)
            srv.runtime.begin_drain()  # what SIGTERM does first
            refused = post(srv, {"prompt": "a|"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert refused.headers["retry-after"]
            assert httpx.get(srv.url + "/health").status_code == 503
            assert srv.runtime.batcher.drain(timeout=10) is True
            done = running.result()
        assert done.status_code == 200 and done.json()["choices"][0]["text"] == LONG[:32]
        assert srv.runtime.batcher.stats()["active_rows"] == 0


def test_shutdown_waits_for_a_running_stream():
    loader = lambda settings: scripted_loaded(default=LONG, delay=0.02)  # noqa: E731
    with live_server(loader=loader) as srv:
        body = {"model": "scripted", "prompt": "a|", "max_tokens": 32, "block_length": 8, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            srv.server.handle_exit(signal.SIGTERM, None)  # what the signal handler does
            assert srv.runtime.status == "draining"
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        text = "x" * 8 + "".join(json.loads(line[6:])["choices"][0]["text"] for line in rest[:-1])
        assert text == LONG[:32]
        srv.thread.join(10)
        assert not srv.thread.is_alive()


def test_drain_timeout_fails_what_is_left_with_the_envelope():
    """Past --drain-timeout, a running stream ends with an error event and [DONE], a whole response is a 503
    envelope (never uvicorn's plain-text 500), and the server stops without waiting for them."""
    loader = lambda settings: scripted_loaded(default=LONG * 2, delay=0.02)  # noqa: E731  (128 passes: 2.6 s)
    with live_server(loader=loader, drain_timeout=0.3) as srv:
        body = {"model": "scripted", "prompt": "a|", "max_tokens": 128, "block_length": 8}
        with ThreadPoolExecutor(1) as pool:
            whole = pool.submit(post, srv, body)
            with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                assert wait_until(lambda: srv.runtime.batcher.stats()["active_rows"] == 2)
                started = time.monotonic()
                srv.server.handle_exit(signal.SIGTERM, None)  # what the signal handler does
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2][6:])["error"]["code"] == "draining"
            failed = whole.result()
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "draining"
        assert failed.headers["retry-after"] == "5"
        srv.thread.join(10)
        assert not srv.thread.is_alive() and time.monotonic() - started < 2.0


def test_a_second_signal_ends_the_drain_and_cut_requests_still_get_the_envelope():
    """A second signal stops the drain's wait: uvicorn gives open responses its short grace, then cancels them;
    the Gate answers a cancelled request with the 503 envelope instead of uvicorn's plain-text 500."""
    loader = lambda settings: scripted_loaded(default=LONG * 2, delay=0.02)  # noqa: E731  (128 passes: 2.6 s)
    with live_server(loader=loader, drain_timeout=60) as srv:
        srv.server.config.timeout_graceful_shutdown = 0.3
        with ThreadPoolExecutor(1) as pool:
            whole = pool.submit(post, srv, {"prompt": "a|", "max_tokens": 128, "block_length": 8})
            assert wait_until(lambda: srv.runtime.batcher.stats()["active_rows"] == 1)
            srv.server.handle_exit(signal.SIGTERM, None)
            assert wait_until(lambda: srv.runtime.status == "draining") and not srv.server.should_exit
            started = time.monotonic()
            srv.server.handle_exit(signal.SIGTERM, None)
            assert srv.server.should_exit
            cut = whole.result()
        assert time.monotonic() - started < 2.0
        assert cut.status_code == 503 and cut.headers["content-type"] == "application/json"
        assert cut.json()["error"]["code"] == "draining"


@pytest.mark.slow
def test_cli_process_serves_and_exits_on_sigterm(tmp_path):
    path = save_tiny_model(tmp_path / MODEL_NAME)
    port = free_port()
    env = {**os.environ, "DIFFPO_PORT": str(port), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffpo_serve", "--model", path, "--log-level", "warning"],
                            env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(ready, 60, 0.2)
        r = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "sudoku 1", "max_tokens": 8})
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------- ServerRuntime.shutdown, no HTTP

class _Batcher:
    """Records what shutdown asks of the batcher; its drain reports a timeout."""

    def __init__(self):
        self.calls = []

    def begin_drain(self):
        self.calls.append("begin_drain")

    def drain(self, timeout):
        self.calls.append(("drain", timeout))
        return False


def test_shutdown_cancels_a_load_in_progress():
    release = threading.Event()

    def loader(settings):
        release.wait(10)
        raise ModelLoadError("released")

    async def main():
        runtime = ServerRuntime(ServerSettings(decoder_process=False), ServerMetrics(), loader)
        await runtime.start()
        await asyncio.sleep(0.05)  # the load is running in its thread
        await runtime.shutdown()
        await asyncio.sleep(0.05)  # let the cancellation land
        cancelled = runtime._task.cancelled()  # (asyncio.run would cancel it too, on the way out)
        release.set()  # asyncio.run waits for the loader's thread
        return cancelled, runtime.status

    assert asyncio.run(main()) == (True, "draining")


def test_shutdown_drains_the_batcher_with_the_timeout_and_logs_when_it_runs_out(caplog):
    runtime = ServerRuntime(ServerSettings(drain_timeout=7.5), ServerMetrics(), loader=None)
    runtime.status, runtime.batcher = "ready", _Batcher()
    with caplog.at_level("WARNING", logger="diffpo_serve.api"):
        asyncio.run(runtime.shutdown())
    assert runtime.batcher.calls == ["begin_drain", ("drain", 7.5)] and runtime.status == "draining"
    assert [r.getMessage() for r in caplog.records] == [
        "drain timed out after 7.5s; remaining requests were failed"]
