"""The browser playground (``GET /``), driven in a real headless Chromium against a live server.

The server is a real uvicorn on loopback serving the tiny random model of ``conftest`` (the
screenshot for the docs uses the bundled model, whose sudoku answers are worth looking at). The
page is checked against the API itself: the NFE it shows is the NFE of the same request sent with
httpx, and an invalid value shows the API's own error message.

These tests need Chromium (Debian: ``apt-get install chromium``; ``.ci/run`` installs it) and the
``playwright`` package (the ``test`` extra). Without them they FAIL with a message saying so: they
are never skipped. ``DIFFPO_CHROMIUM`` points them at another Chromium binary.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from test_server_support import MODEL_NAME, SUDOKU, live_server

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 900}
# set DIFFPO_UPDATE_SCREENSHOT=1 to refresh the README's picture; otherwise the test writes to tmp_path
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "playground.png"
KEY = "s3cret-key"
TIMEOUT_MS = 20_000


def chromium_executable() -> str:
    path = os.environ.get("DIFFPO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail(f"Chromium is needed for the playground tests and was not found ({path}). Install it: "
                    "`apt-get install -y chromium chromium-driver` (as .ci/run does), or set DIFFPO_CHROMIUM "
                    "to a Chromium binary.", pytrace=False)
    return path


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the `playwright` package is needed for the playground tests: "
                    "pip install -e '.[test]' (or pip install playwright)", pytrace=False)
    executable = chromium_executable()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A fresh tab (own sessionStorage) that fails the test on any uncaught JavaScript error."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_playground(page, url: str, path: str = "/"):
    page.goto(url + path)
    page.wait_for_selector("#run:enabled")  # connected: the page found the served model


def set_field(page, name: str, value: str):
    page.fill(f"#{name}", value)


def wait_finished(page, panels: int = 1):
    """Wait until every panel is done (or one failed); return their states."""
    page.wait_for_function(
        """n => {
             const ps = [...document.querySelectorAll('#panels .panel')];
             return ps.some(p => p.dataset.state === 'error')
                    || (ps.length === n && ps.every(p => p.dataset.state === 'done'));
           }""", arg=panels)
    states = page.eval_on_selector_all("#panels .panel", "ps => ps.map(p => p.dataset.state)")
    assert states == ["done"] * panels, f"panels {states}; error shown: {page.text_content('#error')!r}"


def panel_request(page, index: int) -> dict:
    """The request a panel sent, made plain (no stream, no steps) for httpx."""
    body = json.loads(page.locator("#panels .panel .request").nth(index).text_content())
    assert body["stream"] is True and body["return_steps"] is True
    for key in ("stream", "return_steps", "stream_options"):
        body.pop(key)
    return body


def stat(page, index: int, name: str) -> str:
    return page.locator(f"#panels .panel [data-stat={name}]").nth(index).text_content()


def api_completion(url: str, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)


# ----------------------------------------------------------------------------- tests

def test_page_is_served_open_and_same_origin(model_path):
    with live_server(model=model_path, api_key=KEY) as srv:
        for path in ("/", "/playground"):
            r = httpx.get(srv.url + path)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert "diffpo playground" in r.text and "return_steps" in r.text
        assert httpx.get(srv.url + "/v1/models").status_code == 401  # the API behind it is not open


def enabled_samplers(page) -> list[str]:
    return page.eval_on_selector_all("#sampler option", "os => os.filter(o => !o.disabled).map(o => o.value)")


def test_preset_runs_to_the_end_with_the_apis_nfe(page, server):
    open_playground(page, server.url)
    # a model with neither threshold head nor step policy: those samplers are off, the server's default is on
    assert enabled_samplers(page) == ["steps", "confidence", "eb"] and page.input_value("#sampler") == "steps"
    page.select_option("#sampler", "eb")
    set_field(page, "block_length", "4")
    page.select_option("#speed", "40")  # animated, but quick
    page.click(f".preset[data-prompt='{SUDOKU}']")
    assert page.input_value("#prompt") == SUDOKU
    wait_finished(page)

    assert page.locator("#panels .cell").count() == 16
    assert page.locator("#panels .cell.masked").count() == 0
    body = panel_request(page, 0)
    assert body == {"model": MODEL_NAME, "prompt": SUDOKU, "sampler": "eb", "max_tokens": 16, "block_length": 4}
    reply = api_completion(server.url, body).json()
    (choice,) = reply["choices"]
    assert stat(page, 0, "nfe") == str(choice["nfe"])
    assert stat(page, 0, "finish") == choice["finish_reason"]
    assert stat(page, 0, "tokens") == str(reply["usage"]["completion_tokens"])
    assert float(stat(page, 0, "threshold")) == pytest.approx(choice["threshold"], abs=1e-4)
    assert float(stat(page, 0, "tps")) > 0
    assert page.text_content("#panels .output") == choice["text"]
    assert page.is_hidden("#error")

    # the step slider replays the trajectory: 0 = all masked, the last step = the final canvas
    slider = page.locator("#panels .step-slider")
    assert slider.get_attribute("max") == str(choice["nfe"])

    def show_step(k: int):
        slider.evaluate("(el, k) => { el.value = String(k); el.dispatchEvent(new Event('input')); }", k)

    show_step(0)
    assert page.locator("#panels .cell.masked").count() == 16
    show_step(1)
    first = page.locator("#panels .cell.fresh").count()
    assert first >= 1 and page.locator("#panels .cell.masked").count() == 16 - first
    assert page.locator("#panels .cell.in-block").count() == 4  # block 0 of length 4 is marked
    show_step(choice["nfe"])
    assert page.locator("#panels .cell.masked").count() == 0


def test_invalid_threshold_shows_the_apis_message(page, server):
    open_playground(page, server.url, "/playground")
    page.select_option("#sampler", "confidence")
    set_field(page, "threshold", "-1")
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])")
    body = panel_request(page, 0)
    assert body["threshold"] == -1
    r = api_completion(server.url, {**body, "stream": True})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "threshold" in message
    assert page.text_content("#error") == message
    assert page.get_attribute("#panels .panel", "data-state") == "error"

    # a value that is not a number at all is sent as typed, so the API names the problem too
    set_field(page, "threshold", "")
    set_field(page, "steps", "abc")
    page.select_option("#sampler", "steps")
    page.click("#run")
    page.wait_for_function("() => document.querySelector('#error').textContent.startsWith('steps')")
    r = api_completion(server.url, {**panel_request(page, 0), "stream": True})
    assert page.text_content("#error") == r.json()["error"]["message"]


def test_compare_mode_runs_full_steps_beside_the_chosen_sampler(page, server):
    open_playground(page, server.url)
    page.select_option("#speed", "0")
    page.select_option("#sampler", "confidence")
    set_field(page, "threshold", "0")  # commits the whole block at once: NFE 1 (the tiny model is random)
    page.check("#compare")
    page.click("#run")
    wait_finished(page, panels=2)
    assert page.locator("#panels .cell.masked").count() == 0
    assert page.locator("#panels .cell").count() == 32
    full, chosen = panel_request(page, 0), panel_request(page, 1)
    assert full["sampler"] == "steps" and "threshold" not in full and "steps" not in full
    assert chosen["sampler"] == "confidence" and chosen["threshold"] == 0
    for i, body in enumerate((full, chosen)):
        assert stat(page, i, "nfe") == str(api_completion(server.url, body).json()["choices"][0]["nfe"])
    assert stat(page, 1, "nfe") == "1"
    assert page.text_content("#summary").startswith("confidence (threshold 0): 1 forward pass vs ")


def test_api_key_is_asked_for_and_used(page, model_path):
    with live_server(model=model_path, api_key=KEY) as srv:
        page.goto(srv.url + "/")
        page.wait_for_selector("#auth:not([hidden])")
        assert page.is_disabled("#run")
        page.fill("#api-key", "wrong")
        page.click("#auth-save")
        page.wait_for_function("() => document.querySelector('#auth-message').textContent.includes('refused')")
        assert page.is_visible("#auth") and page.is_disabled("#run")

        page.fill("#api-key", KEY)
        page.click("#auth-save")
        page.wait_for_selector("#run:enabled")
        assert page.is_hidden("#auth")
        assert page.evaluate("() => sessionStorage.getItem('diffpo.apiKey')") == KEY
        page.select_option("#speed", "0")
        page.click(f".preset[data-prompt='{SUDOKU}']")
        wait_finished(page)
        assert page.locator("#panels .cell.masked").count() == 0
        nfe = api_completion(srv.url, panel_request(page, 0), key=KEY).json()["choices"][0]["nfe"]
        assert stat(page, 0, "nfe") == str(nfe)

        page.reload()  # the key is kept for the session
        page.wait_for_selector("#run:enabled")
        assert page.is_hidden("#auth")


def test_screenshot_of_compare_mode_with_the_bundled_model(page, tmp_path):
    """docs/playground.png (shown in the README): the step policy (the bundled model's default) beside full steps
    on a countdown."""
    screenshot = DOCS_SCREENSHOT if os.environ.get("DIFFPO_UPDATE_SCREENSHOT") else tmp_path / "playground.png"
    with live_server() as srv:
        open_playground(page, srv.url)
        page.select_option("#speed", "0")
        assert enabled_samplers(page) == ["steps", "confidence", "eb", "learned", "policy"]
        assert page.input_value("#sampler") == "policy"  # the bundled model's default: its step policy
        page.select_option("#sampler", "policy")
        page.check("#compare")
        page.click(".preset[data-prompt='countdown 11,54,29=94']")
        wait_finished(page, panels=2)
        assert page.locator("#panels .cell.masked").count() == 0
        assert int(stat(page, 1, "nfe")) < int(stat(page, 0, "nfe")) == 16
        # full steps halfway through beside the finished policy canvas
        page.locator("#panels .step-slider").nth(0).evaluate(
            "el => { el.value = String(Math.round(el.max / 2)); el.dispatchEvent(new Event('input')); }")
        page.wait_for_timeout(600)  # let the cells' colour transitions finish
        screenshot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_a_canvas_model_shows_its_changing_draft(page, tmp_path):
    """DiffusionGemma (a tiny random checkpoint): the page offers its samplers only, runs pass by pass with
    the API's NFE, and the replay shows blocks of random tokens becoming drafts that change between passes
    and end final; the text is the API's."""
    from tiny_diffusion_gemma import random_model, write_checkpoint
    generation = {"max_new_tokens": 16, "max_denoising_steps": 4,
                  "sampler_config": {"entropy_bound": 0.3, "_cls_name": "EntropyBoundSamplerConfig"}}
    path = write_checkpoint(tmp_path / "tiny-dg", random_model(seed=3), generation=generation)
    with live_server(model=str(path), decoder_process=False) as srv:
        open_playground(page, srv.url)
        enabled = enabled_samplers(page)
        assert enabled == ["eb", "learned"] and page.input_value("#sampler") == "eb"
        assert page.is_disabled("#block_length") and page.is_disabled("#temperature")
        page.fill("#prompt", "abc")
        set_field(page, "seed", "4")
        page.select_option("#speed", "0")
        page.click("#run")
        wait_finished(page)
        body = panel_request(page, 0)
        assert body == {"model": "tiny-dg", "prompt": "abc", "sampler": "eb", "max_tokens": 16, "seed": 4}
        reply = api_completion(srv.url, body).json()
        (choice,) = reply["choices"]
        assert stat(page, 0, "nfe") == str(choice["nfe"]) and page.text_content("#panels .output") == choice["text"]
        assert float(stat(page, 0, "threshold")) == pytest.approx(0.3)
        assert page.is_hidden("#panels .masked-legend") and page.is_visible("#panels .canvas-legend")

        slider = page.locator("#panels .step-slider")

        def show_step(k: int) -> list[str]:
            slider.evaluate("(el, k) => { el.value = String(k); el.dispatchEvent(new Event('input')); }", k)
            return page.eval_on_selector_all("#panels .cell .tok", "ts => ts.map(t => t.textContent)")

        assert page.locator("#panels .cell").count() == 16
        show_step(0)
        assert page.locator("#panels .cell.masked").count() == 16  # random tokens, nothing denoised yet
        first = show_step(1)
        assert page.locator("#panels .cell.draft").count() == 8 and page.locator("#panels .cell.masked").count() == 8
        assert page.locator("#panels .cell.in-block").count() == 8 and page.locator("#panels .cell.fresh").count() >= 1
        second = show_step(2)
        assert first[:8] != second[:8]  # the draft changes between passes: it does not only fill in
        show_step(choice["nfe"])
        assert page.locator("#panels .cell.draft").count() == 0 and page.locator("#panels .cell.masked").count() == 0
