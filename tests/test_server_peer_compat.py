"""A subset of two peer servers' OpenAI-compatibility tests, rewritten for diffpo-serve and run against live servers.

Sources (read for behaviour; each test is our own code, its provenance in a comment above it): vLLM's
``tests/entrypoints/openai`` and llama.cpp's ``tools/server/tests/unit``. Where diffpo-serve deliberately
differs (no output constraints, no CORS unless configured, the envelope during a drain) the test pins our
behaviour and says so.
"""

from __future__ import annotations

import json
import logging
import signal
import threading

import httpx
import openai
import pytest

from test_server_support import (COUNTDOWN, MODEL_NAME, SUDOKU, free_port, metric_value, serve_scripted,
                                 wait_healthy, wait_until)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, body, path="/v1/completions"):
    return httpx.post(server.url + path, json=body, timeout=60)


def sse_payloads(response) -> list[dict]:
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


# ----------------------------------------------------------------------------- CORS

# adapted from llama.cpp tools/server/tests/unit/test_security.py::test_cors_options; llama.cpp allows every
# origin by default, diffpo-serve none (a page from another origin cannot use a server on the user's machine
# unless --allowed-origins says so; tests/test_server_cors.py covers the allowed case)
def test_preflight_from_another_origin_is_refused_by_default(server):
    r = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    assert r.json()["error"]["code"] == "cors_not_allowed"


# ----------------------------------------------------------------------------- the model field

# adapted from llama.cpp tools/server/tests/unit/test_completion.py and test_chat_completion.py, whose requests
# carry no `model` (or any name: llama.cpp serves its one model whatever is asked); vLLM likewise serves its one
# model when `model` is omitted. A wrong name stays a 404 here, as in vLLM's test_basic/test_models.
@pytest.mark.parametrize("model", ["omitted", None])
def test_model_omitted_or_null_is_the_served_model(server, model):
    named = post(server, {"model": MODEL_NAME, "prompt": SUDOKU, "max_tokens": 8}).json()
    body = {"prompt": SUDOKU, "max_tokens": 8}
    if model != "omitted":
        body["model"] = model
    r = post(server, body)
    assert r.status_code == 200 and r.json()["model"] == MODEL_NAME
    assert r.json()["choices"][0]["text"] == named["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": COUNTDOWN}], "max_tokens": 8}
    if model != "omitted":
        chat["model"] = model
    r = post(server, chat, "/v1/chat/completions")
    assert r.status_code == 200 and r.json()["model"] == MODEL_NAME


def test_a_wrong_model_name_is_still_404(server):
    r = post(server, {"model": "gpt-3.5-turbo", "prompt": SUDOKU})
    assert r.status_code == 404
    assert r.json()["error"] == {"message": f"The model `gpt-3.5-turbo` does not exist; this server serves "
                                            f"`{MODEL_NAME}`.", "type": "invalid_request_error",
                                 "param": "model", "code": "model_not_found"}


# ----------------------------------------------------------------------------- output constraints

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


# adapted from vLLM tests/entrypoints/openai (completion and chat: test_guided_json_completion,
# test_guided_regex_completion, test_guided_choice_completion, test_guided_grammar, the structured_outputs
# tests) and llama.cpp tools/server/tests/unit/test_chat_completion.py (json_schema / grammar / response_format
# cases): vLLM and llama.cpp constrain the text; diffpo-serve cannot, so it must refuse with a 400 naming the
# field instead of returning unconstrained text with 200
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field,value", [
    ("structured_outputs", {"json": SCHEMA}), ("guided_json", SCHEMA), ("guided_regex", "[0-9]+"),
    ("guided_choice", ["yes", "no"]), ("guided_grammar", 'root ::= "a"'), ("guided_decoding_backend", "xgrammar"),
    ("json_schema", SCHEMA), ("grammar", 'root ::= "a"'), ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}),
])
def test_output_constraints_are_refused_naming_the_field(server, path, field, value):
    body = ({"prompt": SUDOKU} if path == "/v1/completions" else
            {"messages": [{"role": "user", "content": COUNTDOWN}]})
    r = post(server, {"model": MODEL_NAME, **body, "max_tokens": 4, field: value}, path)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {
        "message": f"`{field}` is not supported by this diffusion server: it cannot constrain its output "
                   "(structured outputs / guided decoding)",
        "type": "invalid_request_error", "param": field, "code": "unsupported_parameter"}


def test_null_constraints_and_text_format_are_served_unknown_fields_ignored_and_logged(client, caplog):
    with caplog.at_level(logging.WARNING, logger="diffpo_serve.engine"):
        r = client.completions.create(model=MODEL_NAME, prompt=SUDOKU, max_tokens=4, extra_body={
            "guided_json": None, "response_format": {"type": "text"}, "top_k": 5, "min_p": 0.1})
    assert r.choices[0].finish_reason in ("stop", "length")
    assert "ignoring unknown request fields: min_p, top_k" in caplog.messages


# adapted from vLLM tests/entrypoints/openai (test_guided_json_chat through the openai client's `extra_body`)
def test_openai_client_sees_bad_request_for_structured_outputs(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": COUNTDOWN}],
                                       max_tokens=4, extra_body={"structured_outputs": {"choice": ["a", "b"]}})
    assert e.value.status_code == 400 and e.value.body["param"] == "structured_outputs"


# ----------------------------------------------------------------------------- error objects

# adapted from vLLM tests/entrypoints/openai/chat_completion/test_non_object_body_validation.py and
# completion/test_completion_error.py, and llama.cpp's invalid-request cases: a body that is not an object, or
# an object that breaks the schema, gets a 400 error object (never a plain-text or 500 answer)
@pytest.mark.parametrize("content", [b"[]", b'"hello"', b"42", b"null", b"{", b'{"prompt": {"a": 1}}',
                                     b'{"messages": "hi"}', b'{"prompt": "a", "max_tokens": -1}',
                                     b'{"prompt": "a", "n": "two"}'])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_bodies_get_error_objects(server, path, content):
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------- n > 1 streaming

# adapted from vLLM tests/entrypoints/openai/completion/test_completion.py::test_parallel_streaming and the
# chat test of n > 1 streaming: every index streams, each finishes once, and the streamed texts are the
# non-streamed ones
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_n_greater_than_one_streams_every_choice(server, path):
    kind = {"prompt": SUDOKU} if path == "/v1/completions" else {
        "messages": [{"role": "user", "content": SUDOKU}]}
    body = {"model": MODEL_NAME, **kind, "n": 3, "max_tokens": 16, "temperature": 1.0, "seed": 5,
            "block_length": 4}
    whole = post(server, body, path).json()["choices"]
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
        chunks = sse_payloads(r)
    texts, finishes = ["", "", ""], [[], [], []]
    for chunk in chunks:
        (choice,) = chunk["choices"]
        piece = choice["text"] if path == "/v1/completions" else choice["delta"].get("content") or ""
        texts[choice["index"]] += piece
        if choice["finish_reason"] is not None:
            finishes[choice["index"]].append(choice["finish_reason"])
    expect = [c["text"] if path == "/v1/completions" else c["message"]["content"] for c in whole]
    assert texts == expect and len(set(expect)) > 1
    assert finishes == [[c["finish_reason"]] for c in whole]


# ----------------------------------------------------------------------------- stop strings

# adapted from vLLM tests/entrypoints/openai (the `stop` cases of the completion and chat tests) and llama.cpp
# tools/server/tests/unit/test_completion.py::test_completion_stream_with_openai_library_stops: the text ends
# before the earliest stop string of several, finish_reason "stop", the same streamed and not
def test_stop_strings_earliest_wins_streamed_and_not(client):
    kw = dict(model=MODEL_NAME, prompt=COUNTDOWN, max_tokens=16, extra_body={"block_length": 4})
    text = client.completions.create(**kw).choices[0].text
    assert len(text) >= 8
    first, later = text[5:7], text[9:11]  # stop strings whose first occurrences differ
    cut = text[:min(text.index(first), text.index(later))]
    r = client.completions.create(stop=[later, first], **kw)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[later, first], stream=True, **kw)
                       if c.choices)
    assert streamed == cut


# ----------------------------------------------------------------------------- seeds

# adapted from llama.cpp tools/server/tests/unit/test_completion.py::test_consistent_result_same_seed and
# test_different_result_different_seed (temperature 1, several slots: here other requests batched alongside)
def test_seeded_sampling_repeats_and_different_seeds_differ(client):
    kw = dict(model=MODEL_NAME, prompt=SUDOKU, max_tokens=16, temperature=1.0)
    same = {client.completions.create(seed=42, **kw).choices[0].text for _ in range(3)}
    assert len(same) == 1
    different = {client.completions.create(seed=s, **kw).choices[0].text for s in range(4)}
    assert len(different) > 1


# ----------------------------------------------------------------------------- logprobs

# adapted from vLLM tests/entrypoints/openai/completion/test_completion.py::test_no_logprobs, test_zero_logprobs
# and test_some_logprobs: the openai client parses the legacy shape; logprobs=0 lists the generated token alone,
# logprobs=k lists k or k + 1 entries per token (the generated token always among them); a token's log-prob is
# <= 0 and the tokens make up the text (the values themselves are pinned in tests/test_server_logprobs.py)
@pytest.mark.parametrize("k", [None, 0, 3])
def test_completion_logprobs_parsed_by_the_openai_client(client, k):
    kw = {} if k is None else {"logprobs": k}
    choice = client.completions.create(model=MODEL_NAME, prompt=SUDOKU, max_tokens=8, **kw).choices[0]
    if k is None:
        assert choice.logprobs is None
        return
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == len(lp.tokens) == len(lp.text_offset)
    assert all(v <= 0 for v in lp.token_logprobs)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == value and (len(top) == 1 if k == 0 else k <= len(top) <= k + 1)


# adapted from vLLM tests/entrypoints/openai/completion/test_completion.py::test_completion_streaming (with
# logprobs) and llama.cpp tools/server/tests/unit/test_completion.py's n_probs streaming case: the streamed
# chunks' log-probs, in order, are the non-streamed response's
def test_completion_logprobs_streamed_with_the_openai_client(client):
    kw = dict(model=MODEL_NAME, prompt=COUNTDOWN, max_tokens=16, logprobs=2, extra_body={"block_length": 4})
    whole = client.completions.create(**kw).choices[0].logprobs
    tokens, values = [], []
    for chunk in client.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
    assert tokens == whole.tokens and values == whole.token_logprobs


# adapted from vLLM tests/entrypoints/openai/chat/test_chat.py::test_no_logprobs_chat, test_zero_logprobs_chat,
# test_some_logprobs_chat and test_too_many_chat_logprobs
@pytest.mark.parametrize("logprobs,top", [(False, None), (True, 0), (True, 5)])
def test_chat_logprobs_parsed_by_the_openai_client(client, logprobs, top):
    kw = {"logprobs": logprobs} if top is None else {"logprobs": logprobs, "top_logprobs": top}
    choice = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": SUDOKU}],
                                            max_completion_tokens=8, **kw).choices[0]
    if not logprobs:
        assert choice.logprobs is None
        return
    content = choice.logprobs.content
    assert "".join(c.token for c in content) == choice.message.content
    assert all(len(c.top_logprobs) == top and c.logprob <= 0 for c in content)


def test_too_many_chat_logprobs_are_a_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": SUDOKU}],
                                       max_completion_tokens=8, logprobs=True, top_logprobs=21)


# adapted from vLLM tests/entrypoints/openai/chat/test_chat.py::test_chat_streaming (logprobs on the deltas)
def test_chat_logprobs_streamed_with_the_openai_client(client):
    kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": COUNTDOWN}], max_completion_tokens=16,
              logprobs=True, top_logprobs=2, extra_body={"block_length": 4})
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **kw)
                if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert streamed == whole


# ----------------------------------------------------------------------------- the drain

def _drain(flags: tuple[str, ...]) -> None:
    """A real ``diffpo-serve`` process (slow scripted model: 20 ms a pass) gets SIGTERM with a long whole-response
    request and a short stream in flight; ``--drain-timeout 1.5`` lets the stream finish, not the long one."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_scripted(port, "--drain-timeout", "1.5", *flags)
    try:
        wait_healthy(url, proc)
        results = {}
        long = threading.Thread(target=lambda: results.setdefault("long", httpx.post(
            url + "/v1/completions", json={"prompt": "a|", "max_tokens": 128, "block_length": 8}, timeout=30)))
        long.start()  # 128 passes: 2.6 s
        assert wait_until(lambda: metric_value(httpx.get(url + "/metrics").text, "diffpo_running_rows") >= 1)
        stream = {"prompt": "a|", "max_tokens": 16, "block_length": 8, "stream": True}  # 16 passes
        with httpx.stream("POST", url + "/v1/completions", json=stream, timeout=30) as r:
            lines = r.iter_lines()
            first = json.loads(next(line for line in lines if line)[len("data: "):])
            proc.send_signal(signal.SIGTERM)
            # the listener stays open while draining: new work gets the 503 envelope, and so does /health
            assert wait_until(lambda: httpx.get(url + "/health").status_code == 503, 5)
            refused = httpx.post(url + "/v1/completions", json={"prompt": "a|"}, timeout=10)
            rest = [line for line in lines if line]
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"] == {"message": "the server is shutting down", "type":
                                           "service_unavailable_error", "param": None, "code": "draining"}
        # the running stream finished within the drain
        assert rest[-1] == "data: [DONE]"
        finals = [json.loads(line[len("data: "):])["choices"][0] for line in rest[:-1]]
        assert first["choices"][0]["text"] + "".join(c["text"] for c in finals) == "x" * 16
        assert finals[-1]["finish_reason"] == "length"
        # the long one ran out of drain time: the envelope, not uvicorn's plain-text 500
        long.join(30)
        assert results["long"].status_code == 503
        assert results["long"].json()["error"]["code"] == "draining"
        assert proc.wait(30) == 0  # docker stop / systemd see a clean exit, not -SIGTERM
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()


# adapted from vLLM tests/entrypoints/openai/completion/test_shutdown.py (test_request_rejection_during_shutdown,
# test_wait_timeout_completes_requests, test_abort_timeout_fails_inflight_requests): during the drain new
# requests are refused with 503, in-flight ones complete within the timeout and the rest fail as error objects;
# the process then exits (here: with status 0)
def test_sigterm_drains_a_real_process():
    _drain(("--no-decoder-process",))


@pytest.mark.slow
def test_sigterm_drains_a_real_process_with_its_decoder_process():
    _drain(())
