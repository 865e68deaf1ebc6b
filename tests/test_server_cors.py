"""CORS: real preflights from another origin against live servers, and the ``--allowed-*`` settings."""

from __future__ import annotations

import httpx
import pytest

from diffpo_serve.cli import parse_settings
from diffpo_serve.settings import ServerSettings, parse_list
from test_server_support import live_server, scripted_loaded

GOOD, BAD = "http://good.example:3000", "http://evil.example"
KEY = "sk-cors-test"


def loader(settings):
    return scripted_loaded()


def preflight(server, origin, method="POST", headers="authorization, content-type", path="/v1/completions"):
    h = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        h["Access-Control-Request-Headers"] = headers
    return httpx.options(server.url + path, headers=h)


@pytest.fixture(scope="module")
def cors_server():
    """Allows one origin, GET and POST; an API key guards /v1 (preflights carry none)."""
    with live_server(loader=loader, allowed_origins=GOOD, allowed_methods="GET,POST", api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def default_server():
    with live_server(loader=loader) as srv:
        yield srv


# adapted from llama.cpp tools/server/tests/unit/test_security.py::test_cors_options (rewritten: an explicit
# allow-list instead of llama.cpp's allow-all, and an API key that the preflight must not need)
def test_allowed_preflight_succeeds_without_the_api_key(cors_server):
    r = preflight(cors_server, GOOD)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["access-control-allow-origin"] == GOOD
    assert r.headers["access-control-allow-methods"] == "GET, POST"
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"  # '*' echoes the request
    assert "access-control-allow-credentials" not in r.headers


def test_preflight_from_a_disallowed_origin_fails_with_the_envelope(cors_server):
    r = preflight(cors_server, BAD)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    error = r.json()["error"]
    assert error["code"] == "cors_not_allowed" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("cross-origin request refused (origin not allowed): origin "
                                       "'http://evil.example'")


def test_preflight_for_a_disallowed_method_fails(cors_server):
    r = preflight(cors_server, GOOD, method="DELETE")
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(
        "cross-origin request refused (method not allowed)")


def test_actual_cross_origin_requests_carry_the_headers_errors_included(cors_server):
    auth = {"Authorization": f"Bearer {KEY}", "Origin": GOOD}
    ok = httpx.post(cors_server.url + "/v1/completions", json={"prompt": "a|"}, headers=auth, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ok"
    assert ok.headers["access-control-allow-origin"] == GOOD
    # a page must be able to read the 401 to tell its user about the key
    unauthorized = httpx.post(cors_server.url + "/v1/completions", json={"prompt": "a|"}, headers={"Origin": GOOD})
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == GOOD
    other = httpx.post(cors_server.url + "/v1/completions", json={"prompt": "a|"},
                       headers={**auth, "Origin": BAD}, timeout=30)
    assert "access-control-allow-origin" not in other.headers  # served, but the browser will not show it


def test_default_refuses_every_cross_origin_preflight(default_server):
    r = preflight(default_server, "http://localhost:3000")
    assert r.status_code == 400 and r.json()["error"]["code"] == "cors_not_allowed"
    assert "access-control-allow-origin" not in r.headers
    # an OPTIONS that is not a preflight is still an ordinary 405 envelope
    plain = httpx.options(default_server.url + "/v1/completions")
    assert plain.status_code == 405 and plain.json()["error"]["code"] == "method_not_allowed"
    # same-origin use (the playground) needs no CORS
    assert httpx.get(default_server.url + "/health").status_code == 200


def test_wildcard_origins_as_vllm_and_credentials():
    with live_server(loader=loader, allowed_origins='["*"]', allow_credentials=True) as srv:
        r = preflight(srv, BAD, headers=None)
        assert r.status_code == 200
        # with credentials a browser refuses '*': the origin is echoed instead
        assert r.headers["access-control-allow-origin"] == BAD
        assert r.headers["access-control-allow-credentials"] == "true"
        simple = httpx.get(srv.url + "/v1/models", headers={"Origin": BAD})
        assert simple.headers["access-control-allow-origin"] == BAD
    with live_server(loader=loader, allowed_origins="*") as srv:
        r = preflight(srv, BAD, headers=None)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("spec,expected", [
    ("", []), ("*", ["*"]), ("http://a, http://b", ["http://a", "http://b"]), ('["http://a", "http://b"]',
                                                                              ["http://a", "http://b"]),
    ("GET,,POST,", ["GET", "POST"]), ("[]", []),
])
def test_parse_list(spec, expected):
    assert parse_list(spec, "allowed_origins") == expected


@pytest.mark.parametrize("spec", ['["http://a"', "[1, 2]", '["a", null]'])
def test_parse_list_refuses_bad_json_naming_the_setting(spec):
    with pytest.raises(ValueError, match="^allowed_headers: not a JSON list of strings"):
        parse_list(spec, "allowed_headers")


def test_cors_flags_and_variables():
    s = parse_settings(["--allowed-origins", '["http://a"]', "--allow-credentials"], environ={})
    assert (s.allowed_origins, s.allow_credentials, s.allowed_methods, s.allowed_headers) == (
        '["http://a"]', True, "*", "*")
    s = parse_settings([], environ={"DIFFPO_ALLOWED_ORIGINS": "http://b", "DIFFPO_ALLOWED_METHODS": "POST"})
    assert (s.allowed_origins, s.allowed_methods, s.allow_credentials) == ("http://b", "POST", False)
    assert ServerSettings().allowed_origins == ""  # the documented default: no cross-origin access
    with pytest.raises(ValueError, match="allowed_methods"):
        ServerSettings(allowed_methods="[GET]").validated()
