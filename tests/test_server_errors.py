"""Bad requests: each gets the right 4xx in the OpenAI error envelope, and the server keeps answering."""

from __future__ import annotations

import httpx
import openai
import pytest

from test_server_support import MODEL_NAME, live_server, save_tiny_model

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OK = {"model": MODEL_NAME, "prompt": "sudoku 3020213443020243", "max_tokens": 8}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "countdown 1,2,3=6"}], "max_tokens": 8}
BODY_LIMIT = 64 * 1024
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("errors") / MODEL_NAME)
    with live_server(model=path, api_key=KEY, max_body_bytes=BODY_LIMIT, max_batch_size=4) as srv:
        yield srv


def completion(**changes):
    body = {**OK, **changes}
    return {k: v for k, v in body.items() if v is not DROP}


def chat(**changes):
    body = {**CHAT, **changes}
    return {k: v for k, v in body.items() if v is not DROP}


DROP = object()

# (id, method, path, request kwargs for httpx, status, param or None when not checked)
CASES = [
    ("model-not-a-string", "POST", "/v1/completions", dict(json=completion(model=123)), 400, "model"),
    ("missing-prompt", "POST", "/v1/completions", dict(json=completion(prompt=DROP)), 400, "prompt"),
    ("prompt-number", "POST", "/v1/completions", dict(json=completion(prompt=123)), 400, "prompt"),
    ("prompt-empty-string", "POST", "/v1/completions", dict(json=completion(prompt="")), 400, "prompt"),
    ("prompt-empty-list", "POST", "/v1/completions", dict(json=completion(prompt=[])), 400, "prompt"),
    ("prompt-mixed-list", "POST", "/v1/completions", dict(json=completion(prompt=["a", 1])), 400, "prompt"),
    ("prompt-token-too-big", "POST", "/v1/completions", dict(json=completion(prompt=[[10**6]])), 400, "prompt"),
    ("prompt-token-negative", "POST", "/v1/completions", dict(json=completion(prompt=[[-1, 5]])), 400, "prompt"),
    ("prompt-empty-ids", "POST", "/v1/completions", dict(json=completion(prompt=[[]])), 400, "prompt"),
    ("prompt-huge", "POST", "/v1/completions", dict(json=completion(prompt="x" * 20000)), 400, "prompt"),
    ("prompt-plus-output-too-long", "POST", "/v1/completions",
     dict(json=completion(prompt="x" * 500, max_tokens=16)), 400, "max_tokens"),
    ("max-tokens-zero", "POST", "/v1/completions", dict(json=completion(max_tokens=0)), 400, "max_tokens"),
    ("max-tokens-negative", "POST", "/v1/completions", dict(json=completion(max_tokens=-5)), 400, "max_tokens"),
    ("max-tokens-huge", "POST", "/v1/completions", dict(json=completion(max_tokens=10**9)), 400, "max_tokens"),
    ("max-tokens-string", "POST", "/v1/completions", dict(json=completion(max_tokens="16")), 400, "max_tokens"),
    ("max-tokens-float", "POST", "/v1/completions", dict(json=completion(max_tokens=1.5)), 400, "max_tokens"),
    ("n-zero", "POST", "/v1/completions", dict(json=completion(n=0)), 400, "n"),
    ("n-too-big", "POST", "/v1/completions", dict(json=completion(n=1000)), 400, "n"),
    ("too-many-rows", "POST", "/v1/completions", dict(json=completion(prompt=["a", "b"], n=100)), 400, "n"),
    ("temperature-negative", "POST", "/v1/completions", dict(json=completion(temperature=-1)), 400, "temperature"),
    ("temperature-string", "POST", "/v1/completions", dict(json=completion(temperature="hot")), 400, "temperature"),
    ("temperature-nan", "POST", "/v1/completions",
     dict(content=b'{"model": "tiny-dllm", "prompt": "a", "temperature": NaN}', headers=JSON), 400, "temperature"),
    ("temperature-above-two", "POST", "/v1/completions", dict(json=completion(temperature=2.01)), 400, "temperature"),
    ("temperature-huge", "POST", "/v1/completions", dict(json=completion(temperature=1e9)), 400, "temperature"),
    ("top-p-two", "POST", "/v1/completions", dict(json=completion(top_p=2)), 400, "top_p"),
    ("top-p-zero", "POST", "/v1/completions", dict(json=completion(top_p=0)), 400, "top_p"),
    ("stream-not-bool", "POST", "/v1/completions", dict(json=completion(stream="yes")), 400, "stream"),
    ("stop-empty-string", "POST", "/v1/completions", dict(json=completion(stop=["a", ""])), 400, "stop"),
    ("stop-too-many", "POST", "/v1/completions", dict(json=completion(stop=[str(i) for i in range(17)])), 400,
     "stop"),
    ("stream-options-without-stream", "POST", "/v1/completions",
     dict(json=completion(stream_options={"include_usage": True})), 400, "stream_options"),
    ("seed-string", "POST", "/v1/completions", dict(json=completion(seed="abc")), 400, "seed"),
    ("logprobs-over-five", "POST", "/v1/completions", dict(json=completion(logprobs=6)), 400, "logprobs"),
    ("echo-unsupported", "POST", "/v1/completions", dict(json=completion(echo=True)), 400, "echo"),
    ("penalty-unsupported", "POST", "/v1/completions", dict(json=completion(frequency_penalty=0.5)), 400,
     "frequency_penalty"),
    ("sampler-unknown", "POST", "/v1/completions", dict(json=completion(sampler="fast")), 400, "sampler"),
    ("sampler-learned-no-head", "POST", "/v1/completions", dict(json=completion(sampler="learned")), 400, "sampler"),
    ("threshold-negative", "POST", "/v1/completions", dict(json=completion(sampler="eb", threshold=-0.5)), 400,
     "threshold"),
    ("steps-not-multiple-of-blocks", "POST", "/v1/completions",
     dict(json=completion(max_tokens=16, block_length=4, steps=6)), 400, "steps"),
    ("steps-astronomical", "POST", "/v1/completions", dict(json=completion(steps=10**30)), 400, "steps"),
    ("block-length-zero", "POST", "/v1/completions", dict(json=completion(block_length=0)), 400, "block_length"),
    ("unknown-model", "POST", "/v1/completions", dict(json=completion(model="gpt-5")), 404, "model"),
    ("bad-json", "POST", "/v1/completions", dict(content=b'{"model": "tiny-dllm", "prompt": ', headers=JSON), 400,
     None),
    ("no-content-type", "POST", "/v1/completions", dict(content=b'{"model": "tiny-dllm", "prompt": "a"}'), 400,
     None),
    ("json-array-body", "POST", "/v1/completions", dict(json=[OK]), 400, None),
    ("empty-body", "POST", "/v1/completions", dict(content=b"", headers=JSON), 400, None),
    ("wrong-content-type", "POST", "/v1/completions",
     dict(content=b'{"model": "tiny-dllm", "prompt": "a"}', headers={"Content-Type": "text/plain"}), 400, None),
    ("form-content-type", "POST", "/v1/completions", dict(data={"model": MODEL_NAME, "prompt": "a"}), 400, None),
    ("oversized-body", "POST", "/v1/completions", dict(json=completion(prompt="x" * (BODY_LIMIT + 1))), 413, None),
    ("no-api-key", "POST", "/v1/completions", dict(json=OK, headers={"Authorization": ""}), 401, None),
    ("wrong-api-key", "POST", "/v1/completions", dict(json=OK, headers={"Authorization": "Bearer nope"}), 401, None),
    ("basic-auth-scheme", "GET", "/v1/models", dict(headers={"Authorization": f"Basic {KEY}"}), 401, None),
    ("unknown-route", "GET", "/v1/nothing-here", {}, 404, None),
    ("unknown-route-outside-v1", "GET", "/admin", {}, 404, None),
    ("wrong-method", "GET", "/v1/completions", {}, 405, None),
    ("unknown-model-card", "GET", "/v1/models/gpt-5", {}, 404, "model"),
    ("chat-missing-messages", "POST", "/v1/chat/completions", dict(json=chat(messages=DROP)), 400, "messages"),
    ("chat-temperature-above-two", "POST", "/v1/chat/completions", dict(json=chat(temperature=3)), 400,
     "temperature"),
    ("chat-empty-messages", "POST", "/v1/chat/completions", dict(json=chat(messages=[])), 400, "messages"),
    ("chat-bad-role", "POST", "/v1/chat/completions",
     dict(json=chat(messages=[{"role": "wizard", "content": "hi"}])), 400, "messages[0].role"),
    ("chat-no-user-message", "POST", "/v1/chat/completions",
     dict(json=chat(messages=[{"role": "system", "content": "be brief"}])), 400, "messages"),
    ("chat-image-part", "POST", "/v1/chat/completions",
     dict(json=chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])),
     400, "messages[0].content"),
    ("chat-tools-unsupported", "POST", "/v1/chat/completions",
     dict(json=chat(tools=[{"type": "function", "function": {"name": "f"}}])), 400, "tools"),
    ("chat-max-completion-tokens-zero", "POST", "/v1/chat/completions", dict(json=chat(max_completion_tokens=0)),
     400, "max_completion_tokens"),
    ("chat-too-long", "POST", "/v1/chat/completions", dict(json=chat(max_completion_tokens=600)), 400,
     "max_completion_tokens"),
    ("chat-unknown-model", "POST", "/v1/chat/completions", dict(json=chat(model="nope")), 404, "model"),
]


def send(server, method, path, kwargs):
    kwargs = dict(kwargs)
    headers = {**AUTH, **kwargs.pop("headers", {})}
    headers = {k: v for k, v in headers.items() if v}
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **kwargs)


def test_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,method,path,kwargs,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_envelope(server, name, method, path, kwargs, status, param):
    r = send(server, method, path, kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert "Traceback" not in r.text
    if param is not None:
        assert error["param"] == param, error
    if status == 401:
        assert error["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    # and the server still answers
    assert send(server, "GET", "/v1/models", {}).status_code == 200


def test_unknown_route_method_and_model_errors_by_value(server):
    """404 and 405 are OpenAI errors of type invalid_request_error with their own codes, not
    FastAPI's {"detail": ...}; a 405 says which methods the route takes."""
    r = send(server, "GET", "/v1/nothing-here", {})
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "no route GET /v1/nothing-here", "type": "invalid_request_error",
                                  "param": None, "code": "not_found"}}
    r = send(server, "DELETE", "/v1/completions", {})
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json() == {"error": {"message": "method DELETE is not allowed on /v1/completions",
                                  "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}}
    r = send(server, "POST", "/v1/completions", dict(json=completion(model="gpt-5")))
    error = r.json()["error"]
    assert r.status_code == 404 and error["type"] == "invalid_request_error" and error["code"] == "model_not_found"


def test_server_still_generates_after_the_table(server):
    for _, method, path, kwargs, _, _ in CASES:
        send(server, method, path, kwargs)
    r = send(server, "POST", "/v1/completions", dict(json=OK))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    stats = server.runtime.batcher.stats()
    assert stats["active_rows"] == 0 and stats["waiting_requests"] == 0, stats


def test_messages_are_specific(server):
    too_long = send(server, "POST", "/v1/completions", dict(json=completion(prompt="x" * 500, max_tokens=16))).json()
    assert "maximum context length is 512" in too_long["error"]["message"]
    assert too_long["error"]["code"] == "context_length_exceeded"
    steps = send(server, "POST", "/v1/completions", dict(json=completion(max_tokens=16, block_length=4, steps=6)))
    assert "multiple of the number of blocks" in steps.json()["error"]["message"]
    learned = send(server, "POST", "/v1/completions", dict(json=completion(sampler="learned"))).json()
    assert "threshold head" in learned["error"]["message"]
    bad_json = send(server, "POST", "/v1/completions", dict(content=b"{oops", headers=JSON)).json()
    assert "JSON" in bad_json["error"]["message"]
    unknown = send(server, "POST", "/v1/completions", dict(json=completion(model="gpt-5"))).json()
    assert unknown["error"]["code"] == "model_not_found"


def test_oversized_chunked_body_is_413(server):
    def chunks():
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b" " * 1024

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={**AUTH, **JSON})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


# ----------------------------------------------------------------------------- auth

def test_auth_with_the_openai_client(server):
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model=MODEL_NAME, prompt="sudoku 1", max_tokens=4).choices
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError):
        good.completions.create(model=MODEL_NAME, prompt="a", extra_body={"threshold": -1})
    with pytest.raises(openai.NotFoundError):
        good.completions.create(model="other", prompt="a")


def test_health_and_metrics_stay_open(server):
    assert httpx.get(server.url + "/health").status_code == 200
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and "diffpo_requests_total" in metrics.text
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200


# ----------------------------------------------------------------------------- field bounds, at the edge

EDGES = [  # (field, the last accepted value, the first refused one) on both endpoints unless noted
    ("n", 1, 0), ("n", 128, 129), ("max_tokens", 1, 0), ("temperature", 0, -1e-9), ("temperature", 2, 2 + 1e-9),
    ("top_p", 1, 1 + 1e-9), ("top_p", 1e-9, 0), ("seed", 2**64 - 1, 2**64), ("seed", -(2**63), -(2**63) - 1),
    ("threshold", 0, -1e-9), ("steps", 1, 0), ("steps", 1 << 20, (1 << 20) + 1), ("block_length", 1, 0),
    ("block_length", 1 << 20, (1 << 20) + 1), ("t_min", 0, -1e-9), ("t_max", 1e-9, 0),
    ("stability_threshold", 0, -1), ("stability_threshold", 1 << 20, (1 << 20) + 1),
    ("confidence_threshold", 0, -1e-9), ("stop", [str(i) for i in range(16)], [str(i) for i in range(17)]),
]
COMPLETION_EDGES = [("logprobs", 0, -1), ("best_of", 1, 0)]
CHAT_EDGES = [("max_completion_tokens", 1, 0), ("top_logprobs", 0, -1)]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_field_bounds_at_the_edge(endpoint):
    """Each bound's strictness (ge vs gt, le vs lt, > vs >= MAX_STOP_STRINGS): the edge value validates, the next
    one is refused naming the field (the server answers that with 400 and param = the field)."""
    from pydantic import ValidationError

    from diffpo_serve.protocol import ChatCompletionRequest, CompletionRequest
    model, base = (CompletionRequest, OK) if endpoint == "completions" else (ChatCompletionRequest, CHAT)
    for field, good, bad in EDGES + (COMPLETION_EDGES if endpoint == "completions" else CHAT_EDGES):
        assert getattr(model.model_validate({**base, field: good}), field) == good, field
        with pytest.raises(ValidationError) as e:
            model.model_validate({**base, field: bad})
        assert [err["loc"][0] for err in e.value.errors()] == [field], (field, bad)


def test_validation_messages_by_value():
    """The 400 message and param for each shape of validation error, and a nested field's dotted name (a union
    member's name such as ``str`` or ``list[int]`` is not part of it)."""
    from fastapi.exceptions import RequestValidationError

    from diffpo_serve.api import _param_of, _validation_message

    def message(*errors):
        return _validation_message(RequestValidationError(list(errors)))

    assert message() == ("invalid request", None)
    assert message({"type": "json_invalid", "loc": ("body", 9), "msg": "JSON decode error",
                    "ctx": {"error": "Expecting value"}}) == ("the body is not valid JSON (Expecting value)", None)
    assert message({"type": "json_invalid", "loc": ("body", 9)}) == ("the body is not valid JSON", None)
    assert message({"type": "missing", "loc": ("body",)}) == ("the request body is missing: send a JSON object", None)
    assert message({"type": "model_attributes_type", "loc": ("body",)}) == ("the request body must be a JSON object",
                                                                            None)
    role = {"type": "literal_error", "loc": ("body", "messages", 0, "role"), "msg": "Input should be 'user'"}
    assert message(role) == ("messages[0].role: Input should be 'user'", "messages[0].role")
    assert message(role, {"type": "missing", "loc": ("body", "model")}, {"type": "missing", "loc": ("body", "x")}) \
        == ("messages[0].role: Input should be 'user' (and 2 more problem(s))", "messages[0].role")
    assert _param_of(("body",)) is None
    assert _param_of(("body", "stream_options", "include_usage")) == "stream_options.include_usage"
    assert _param_of(("body", "prompt", "str")) == "prompt"
    assert _param_of(("body", "prompt", "list[int]", 0)) == "prompt"
    assert _param_of(("body", "messages", 1, "content", 0, "type")) == "messages[1].content[0].type"


def test_other_http_errors_and_crashes_get_the_envelope():
    """Any other HTTP error keeps its status and detail (a 4xx is an invalid_request_error, a 5xx a server_error;
    500 is the first of those); an unhandled exception is a 500 internal_error, never a traceback."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from starlette.exceptions import HTTPException

    from diffpo_serve.api import install_error_handlers
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/status/{code}")
    def status(code: int):
        raise HTTPException(code, detail=f"detail {code}")

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals")

    client = TestClient(app, raise_server_exceptions=False)
    for code, kind in [(418, "invalid_request_error"), (499, "invalid_request_error"), (500, "server_error"),
                       (502, "server_error")]:
        r = client.get(f"/status/{code}")
        assert r.status_code == code
        assert r.json() == {"error": {"message": f"detail {code}", "type": kind, "param": None, "code": None}}
    r = client.get("/boom")
    assert r.status_code == 500 and "secret" not in r.text
    assert r.json() == {"error": {"message": "internal server error", "type": "server_error", "param": None,
                                  "code": "internal_error"}}


def test_a_malformed_content_length_is_a_400_in_the_envelope_before_the_app_runs():
    """The gate answers a Content-Length that is not a number with 400 invalid_request (status and body agree;
    not the 413 of an oversized body), and the app behind it never sees the request."""
    import asyncio
    import json

    from diffpo_serve.api import Gate
    from diffpo_serve.metrics import ServerMetrics
    from diffpo_serve.settings import ServerSettings

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    gate = Gate(app, ServerSettings(max_body_bytes=BODY_LIMIT), ServerMetrics())
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-length", b"12x")]}
    asyncio.run(gate(scope, receive, send))
    assert not reached
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body == {"error": {"message": "invalid Content-Length header", "type": "invalid_request_error",
                              "param": None, "code": "invalid_request"}}
