"""End to end: a real uvicorn server on loopback serving a tiny random model, driven by the ``openai`` client."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from test_server_support import COUNTDOWN, MODEL_NAME, SUDOKU, metric_value



@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(client, prompt=SUDOKU, **kw):
    return client.completions.create(model=MODEL_NAME, prompt=prompt, **kw)


def chat(client, content=COUNTDOWN, **kw):
    return client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": content}], **kw)


def stream_text(chunks):
    return "".join(c.choices[0].text for c in chunks if c.choices)


# ----------------------------------------------------------------------------- basics

def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert models.data[0].max_model_len == 512
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_shape_and_usage(client, server):
    r = complete(client, max_tokens=16)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL_NAME
    (choice,) = r.choices
    assert choice.index == 0 and isinstance(choice.text, str) and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    prompt_tokens = len(server.runtime.engine.loaded.encode(SUDOKU))
    assert r.usage.prompt_tokens == prompt_tokens
    assert 1 <= r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens
    # default sampler `steps` with steps = max_tokens: one token per forward pass
    assert choice.nfe == r.usage.nfe and choice.threshold is None
    assert choice.encoder_passes is None and r.usage.encoder_passes is None  # canvas models only
    if choice.finish_reason == "length":
        assert choice.nfe == 16 and r.usage.completion_tokens == 16


def test_default_max_tokens_is_16(client):
    r = complete(client, extra_body={"sampler": "confidence", "threshold": 0.0})
    assert r.choices[0].nfe == 1  # threshold 0 commits the whole (16-token) block at once
    assert r.usage.completion_tokens <= 16


def test_chat_uses_last_user_message_as_prompt(client):
    r = client.chat.completions.create(model=MODEL_NAME, max_tokens=12, messages=[
        {"role": "system", "content": "ignored without a chat template"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": COUNTDOWN}]}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == complete(client, COUNTDOWN, max_tokens=12).choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = chat(client, max_tokens=16, max_completion_tokens=8, extra_body={"sampler": "eb", "threshold": 0.0})
    assert r.usage.completion_tokens <= 8
    if r.choices[0].finish_reason == "length":
        assert r.choices[0].nfe == 8


# ----------------------------------------------------------------------------- streaming

def test_completion_stream_with_usage(client):
    whole = complete(client, max_tokens=16, extra_body={"block_length": 4})
    chunks = list(complete(client, max_tokens=16, stream=True, stream_options={"include_usage": True},
                           extra_body={"block_length": 4}))
    assert stream_text(chunks) == whole.choices[0].text
    *content, usage_chunk, = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.nfe == whole.usage.nfe
    assert all(c.usage is None for c in content)
    assert [c.choices[0].finish_reason for c in content][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert content[-1].choices[0].nfe == whole.choices[0].nfe
    # text arrives block by block: 16 tokens in blocks of 4 -> up to 4 content chunks
    assert 1 <= len(content) <= 4


def test_chat_stream_role_first_then_content(client):
    whole = chat(client, max_tokens=16, extra_body={"block_length": 8})
    chunks = list(chat(client, max_tokens=16, stream=True, extra_body={"block_length": 8}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_stream_raw_sse_ends_with_done(server):
    body = {"model": MODEL_NAME, "prompt": SUDOKU, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


# ----------------------------------------------------------------------------- n, lists, seeds

def test_n_with_seed_is_reproducible_and_per_choice(client):
    kw = dict(max_tokens=16, temperature=1.0, seed=11, extra_body={"sampler": "eb", "block_length": 8})
    r = complete(client, n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = complete(client, n=3, **kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    # choice i is the same request with seed + i
    for i in range(3):
        alone = complete(client, n=1, **{**kw, "seed": 11 + i})
        assert alone.choices[0].text == r.choices[i].text
    assert len({c.text for c in r.choices}) > 1  # different seeds, different samples
    assert r.usage.nfe == sum(c.nfe for c in r.choices)


def test_different_seeds_differ(client):
    kw = dict(max_tokens=16, temperature=1.5)
    texts = {complete(client, seed=s, **kw).choices[0].text for s in range(4)}
    assert len(texts) > 1


def test_prompt_list_and_token_ids(client, server):
    r = complete(client, prompt=[SUDOKU, COUNTDOWN], n=2, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    singles = [complete(client, prompt=p, max_tokens=8).choices[0].text for p in (SUDOKU, COUNTDOWN)]
    assert [c.text for c in r.choices] == [singles[0], singles[0], singles[1], singles[1]]
    encode = server.runtime.engine.loaded.encode
    assert r.usage.prompt_tokens == len(encode(SUDOKU)) + len(encode(COUNTDOWN))
    by_ids = complete(client, prompt=[encode(SUDOKU)], max_tokens=8)
    assert by_ids.choices[0].text == singles[0]


# ----------------------------------------------------------------------------- stop strings

def test_stop_string_truncates(client):
    kw = dict(max_tokens=16, extra_body={"block_length": 2})
    text = complete(client, **kw).choices[0].text
    # a two-character stop string first seen at position >= 3, away from the multi-character tokens
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1)
                if text.index(text[i:i + 2]) == i and "<" not in text[i - 1:i + 3] and ">" not in text[i - 1:i + 3])
    cut = text[:text.index(stop)]
    r = complete(client, stop=[stop, "never-appears"], **kw)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert 0 < r.usage.completion_tokens < 16
    streamed = list(complete(client, stop=stop, stream=True, **kw))
    assert stream_text(streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert all(stop not in c.choices[0].text for c in streamed)


# ----------------------------------------------------------------------------- diffusion extras

def test_extras_change_nfe(client):
    def run(**extra):
        r = complete(client, max_tokens=16, extra_body=extra)
        return r.choices[0]

    eb_fast = run(sampler="eb", threshold=1e9, block_length=4)
    assert eb_fast.nfe <= 4 and eb_fast.threshold == 1e9
    if eb_fast.finish_reason == "length":
        assert eb_fast.nfe == 4  # a huge gamma commits a whole block per pass
    one_per_step = run(sampler="eb", threshold=0.0, block_length=16)
    if one_per_step.finish_reason == "length":
        assert one_per_step.nfe == 16
    steps = run(sampler="steps", steps=8, block_length=8)
    assert steps.nfe <= 8 and steps.threshold is None
    if steps.finish_reason == "length":
        assert steps.nfe == 8
    conf = run(sampler="confidence")
    assert conf.threshold == pytest.approx(0.9)  # the sampler default is reported
    assert run(sampler="eb").threshold == pytest.approx(0.3)


def test_unknown_fields_are_ignored(client):
    r = complete(client, max_tokens=4, extra_body={"definitely_not_a_field": [1, 2], "top_k": 5})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_bad_extra_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, extra_body={"sampler": "learned"})
    assert e.value.body["param"] == "sampler" and "threshold head" in e.value.body["message"]


# ----------------------------------------------------------------------------- batching

def _mixed_requests():
    samplers = [dict(sampler="steps", block_length=4), dict(sampler="eb", block_length=8),
                dict(sampler="confidence", threshold=0.5), dict(sampler="eb", threshold=2.0, block_length=4)]
    prompts = [SUDOKU, COUNTDOWN, "sudoku 1200340021000040", "countdown 5,7,9=26"]
    out = []
    for i in range(32):
        max_tokens = [8, 12, 16, 24][i % 4]
        extra = dict(samplers[(i // 4) % 4])
        if extra["sampler"] == "steps":
            extra["steps"] = max_tokens // 2  # two passes per block of 4
        kw = dict(max_tokens=max_tokens, extra_body=extra)
        if i % 3 == 0:
            kw.update(temperature=1.0, seed=100 + i)
        out.append(("chat" if i % 5 == 0 else "completion", prompts[(i * 7) % 4], kw))
    return out


def _run(client, kind, prompt, kw):
    r = chat(client, prompt, **kw) if kind == "chat" else complete(client, prompt, **kw)
    c = r.choices[0]
    return (c.message.content if kind == "chat" else c.text), c.nfe, c.finish_reason


def test_32_concurrent_requests_equal_alone(client, server):
    requests = _mixed_requests()
    alone = [_run(client, *req) for req in requests]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda req: _run(client, *req), requests))
    assert together == alone
    assert server.runtime.batcher.stats()["active_rows"] == 0


def test_every_metric_is_exported_under_its_name_and_type():
    """The registry's own exposition: each series by its ``# TYPE`` line (a name and help text swapped would
    still put the name somewhere in the text; prometheus_client accepts a name with spaces)."""
    from prometheus_client import generate_latest

    from diffpo_serve.metrics import ServerMetrics
    text = generate_latest(ServerMetrics().registry).decode()
    types = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}
    expected = {"diffpo_requests_total": "counter", "diffpo_request_latency_seconds": "histogram",
                "diffpo_time_to_first_token_seconds": "histogram", "diffpo_queue_depth": "gauge",
                "diffpo_running_rows": "gauge", "diffpo_batch_step_seconds": "histogram",
                "diffpo_batch_row_steps_total": "counter", "diffpo_prompt_tokens_total": "counter",
                "diffpo_completion_tokens_total": "counter", "diffpo_nfe": "histogram", "diffpo_threshold": "histogram",
                "diffpo_cancelled_rows_total": "counter", "diffpo_model_ready": "gauge"}
    assert {k: types.get(k) for k in expected} == expected
    assert all(name.startswith("diffpo_") and " " not in name for name in types)


def test_metrics_lists_the_expected_series(server, client):
    chunks = list(complete(client, max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None  # the stream was read to its end: the request is over
    complete(client, max_tokens=4, extra_body={"sampler": "eb", "threshold": 0.5})  # a threshold to observe
    text = httpx.get(server.url + "/metrics").text
    for name in ["diffpo_requests_total", "diffpo_request_latency_seconds_bucket", "diffpo_queue_depth",
                 "diffpo_running_rows", "diffpo_time_to_first_token_seconds_bucket", "diffpo_prompt_tokens_total",
                 "diffpo_completion_tokens_total", "diffpo_nfe_bucket", "diffpo_threshold_bucket",
                 "diffpo_batch_step_seconds_bucket", "diffpo_cancelled_rows_total", "diffpo_model_ready"]:
        assert name in text, name
    assert metric_value(text, "diffpo_requests_total", 'endpoint="/v1/completions",status="200"') >= 1
    assert metric_value(text, "diffpo_model_ready") == 1
    assert metric_value(text, "diffpo_running_rows") == 0
    # step durations are durations in seconds: positive, and (one decoding loop, steps one after another)
    # together no longer than the server has existed; milliseconds recorded as seconds would exceed that
    assert 0 < metric_value(text, "diffpo_batch_step_seconds_sum") <= time.monotonic() - server.started_at
