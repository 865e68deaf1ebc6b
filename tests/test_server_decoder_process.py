"""``--decoder-process``: the batched decoder in a spawned process behind the same API.

Live servers on the bundled model (it has a threshold head, so the front's weightless copy of the
model carries one across the pipe) compared with the in-process decoder; the front's admission
bookkeeping by hand; the decoder process dying or failing to load.
"""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from diffpo_serve.batcher import BatchFailure, QueueFull, RowRequest, RowUpdate
from diffpo_serve.decoder_process import DecoderGone, ProcessBatcher, RecordedMetrics, replay
from diffpo_serve.dllm.sampler import SamplingParams
from diffpo_serve.metrics import ServerMetrics
from diffpo_serve.settings import ServerSettings, parse_cpus
from test_server_support import COUNTDOWN, SUDOKU, live_server, metric_value, slow_scripted_loader, wait_until

MODEL = "bundled_model"
REQUESTS = [  # (prompt, extras): greedy, so each output is fixed whatever shares its batch
    (SUDOKU, {}),
    (COUNTDOWN, {}),
    ("countdown 5,7,11=46", {"sampler": "eb", "threshold": 0.3, "block_length": 4}),
    ("sudoku 1000000000000000", {"sampler": "steps", "steps": 8}),
    (COUNTDOWN, {"sampler": "confidence", "threshold": 0.9}),
    ("countdown 98,3,2=196", {"sampler": "learned"}),
]


def run_all(url: str) -> list[tuple]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def one(item):
        prompt, extras = item
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, n=2, extra_body=extras)
        return [(c.text, c.finish_reason, c.nfe, c.threshold) for c in r.choices], r.usage.completion_tokens

    with ThreadPoolExecutor(len(REQUESTS) * 2) as pool:
        return list(pool.map(one, REQUESTS * 2))


@pytest.fixture(scope="module")
def process_server():
    with live_server(decoder_process=True, max_batch_size=8) as srv:
        yield srv


def test_same_outputs_as_the_in_process_decoder(process_server):
    with live_server(max_batch_size=8, decoder_process=False) as in_process:
        expected = run_all(in_process.url)
    assert run_all(process_server.url) == expected
    assert any(t is not None for choices, _ in expected for *_, t in choices)  # thresholds came back


def test_the_front_holds_no_weights_and_the_decoder_is_another_process(process_server):
    runtime = process_server.runtime
    assert runtime.engine.loaded.model.config.vocab_size == 104  # the weightless stand-in
    assert not hasattr(runtime.engine.loaded.model, "parameters")
    assert runtime.engine.loaded.threshold_head is not None
    assert runtime.batcher.process.is_alive() and runtime.batcher.process.pid != os.getpid()


def test_streaming_chat_and_steps(process_server):
    client = openai.OpenAI(base_url=process_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    whole = client.completions.create(model=MODEL, prompt=COUNTDOWN, max_tokens=16)
    chunks = list(client.completions.create(model=MODEL, prompt=COUNTDOWN, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SUDOKU}])
    assert reply.choices[0].message.content
    with httpx.stream("POST", process_server.url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": COUNTDOWN, "max_tokens": 16, "stream": True, "return_steps": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert sum('"text_completion.step"' in line for line in lines) == whole.choices[0].nfe
    assert lines[-1] == "data: [DONE]"


def test_metrics_of_the_decoder_process_reach_the_front(process_server):
    before = httpx.get(process_server.url + "/metrics").text
    httpx.post(process_server.url + "/v1/completions", timeout=60,
               json={"model": MODEL, "prompt": SUDOKU, "max_tokens": 16, "n": 3})
    after = httpx.get(process_server.url + "/metrics").text
    steps = metric_value(after, "diffpo_batch_step_seconds_count") - metric_value(before, "diffpo_batch_step_seconds_count")
    rows = metric_value(after, "diffpo_batch_row_steps_total") - metric_value(before, "diffpo_batch_row_steps_total")
    assert steps >= 1 and rows >= 3 * steps - 2  # three rows per step until they finish
    assert metric_value(after, "diffpo_running_rows") == 0


@pytest.fixture(scope="module")
def slow_process_server():
    with live_server(loader=slow_scripted_loader, decoder_process=True, max_batch_size=4) as srv:
        yield srv


SLOW = {"model": "scripted", "prompt": "a|", "max_tokens": 128, "block_length": 8}  # 128 passes x 20 ms


def test_a_disconnected_stream_frees_its_rows(slow_process_server):
    srv = slow_process_server
    before = metric_value(httpx.get(srv.url + "/metrics").text, "diffpo_cancelled_rows_total")
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=60, json={**SLOW, "stream": True, "n": 2}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert '"text":"xxxxxxxx"' in first
    assert wait_until(lambda: srv.runtime.batcher.stats()["active_rows"] == 0, 2)
    assert wait_until(lambda: metric_value(httpx.get(srv.url + "/metrics").text,
                                           "diffpo_cancelled_rows_total") >= before + 2, 2)
    assert httpx.post(srv.url + "/v1/completions", json={**SLOW, "max_tokens": 4}, timeout=10).status_code == 200


def test_a_dead_decoder_fails_its_requests_and_the_server_reports_it():
    with live_server(loader=slow_scripted_loader, decoder_process=True) as srv:
        process = srv.runtime.batcher.process
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, srv.url + "/v1/completions", json=SLOW, timeout=60)
            assert wait_until(lambda: srv.runtime.batcher.stats()["active_rows"] == 1)
            os.kill(process.pid, signal.SIGKILL)
            failed = pending.result()
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        after = httpx.post(srv.url + "/v1/completions", json=SLOW, timeout=10)
        assert after.status_code == 503 and after.json()["error"]["code"] == "decoder_failed"
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and "decoder process exited" in health.json()["error"]["message"]


def test_a_model_the_decoder_cannot_load_is_reported_with_its_path(tmp_path):
    with live_server(decoder_process=True, model=str(tmp_path / "missing"), wait_ready=False) as srv:
        assert wait_until(lambda: srv.runtime.status == "failed", timeout=60)
        health = httpx.get(srv.url + "/health").json()["error"]
        assert health["code"] == "model_load_failed" and "missing: model directory does not exist" in health["message"]


def test_stopping_the_server_stops_the_decoder_process():
    with live_server(decoder_process=True) as srv:
        process = srv.runtime.batcher.process
        assert process.is_alive()
    assert wait_until(lambda: not process.is_alive(), timeout=15) and process.exitcode == 0


# ----------------------------------------------------------------------------- the front's bookkeeping

def test_admission_in_the_front_counts_rows_in_flight():
    """max_batch_size 2, max_queue 1: what fits is taken, one request may wait, the next is refused;
    finished rows (and cancelled ones) make room again. No process: the pipe is replaced by a list."""
    async def scenario():
        batcher = ProcessBatcher(ServerSettings(max_batch_size=2, max_queue=1), loader=None)
        sent = []
        batcher._send = sent.append
        row = RowRequest([1, 2], SamplingParams("steps", 4))
        a = batcher.submit([row, row])  # fills the batch
        b = batcher.submit([row])  # waits (1 of max_queue 1)
        with pytest.raises(QueueFull):
            batcher.submit([row])
        assert [m[0] for m in sent] == ["submit", "submit"] and sent[0][1:] == (a.request_id, [row, row])
        batcher._dispatch(a.request_id, RowUpdate(0, [5], True, 4, "steps", 0.0))
        assert a.events.get_nowait().finished and batcher.stats()["active_rows"] == 2
        a.cancel(1)  # frees a's last row: the front forgets a and tells the decoder
        assert sent[-1] == ("cancel", a.request_id, 1) and batcher.stats()["active_rows"] == 1
        c = batcher.submit([row])
        batcher._dispatch(c.request_id, BatchFailure("boom"))
        assert isinstance(c.events.get_nowait(), BatchFailure) and batcher.stats()["active_rows"] == 1
        b.cancel()
        assert batcher.stats()["active_rows"] == 0
        batcher.begin_drain()
        with pytest.raises(Exception, match="shutting down"):
            batcher.submit([row])
        batcher._gone = "the decoder process exited"
        with pytest.raises(DecoderGone):
            batcher.submit([row])

    asyncio.run(scenario())


def test_recorded_metric_calls_replay_on_the_front_registry():
    recorded, metrics = RecordedMetrics(), ServerMetrics()
    recorded.step_seconds.observe(0.5)
    recorded.row_steps.inc(3)
    recorded.running_rows.set(7)
    replay(metrics, recorded.take())
    assert recorded.calls == []
    assert metrics.row_steps._value.get() == 3 and metrics.running_rows._value.get() == 7
    assert metrics.step_seconds._sum.get() == 0.5


def test_decoder_cpus_setting():
    assert parse_cpus("1") == {1} and parse_cpus("0,2-3") == {0, 2, 3}
    with pytest.raises(ValueError, match="decoder_cpus"):
        ServerSettings(decoder_process=True, decoder_cpus="a-b").validated()
    with pytest.raises(ValueError, match="decoder_cpus needs decoder_process"):
        ServerSettings(decoder_process=False, decoder_cpus="1").validated()
