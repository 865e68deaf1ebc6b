"""Per-step events (``"return_steps": true`` on streamed completions), end to end on a live server.

Replaying a choice's step events onto an all-mask canvas must give exactly its final completion
(ids and text), with one event per forward pass (count = NFE); requests without the flag never see
a step event; the flag needs ``stream``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import EOS, MASK, PAD
from diffpo_serve.dllm.loading import load_model
from diffpo_serve.dllm.sampler import SamplingParams, generate
from test_server_support import COUNTDOWN, MODEL_NAME, SUDOKU, live_server, scripted_loaded

STEP = "text_completion.step"


@pytest.fixture(scope="module")
def loaded(model_path):
    return load_model(model_path)


def stream_chunks(url: str, **body) -> list[dict]:
    """Every ``data:`` payload of a streamed completion, up to ``[DONE]``."""
    body = {"model": MODEL_NAME, "stream": True, **body}
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return chunks
            chunks.append(json.loads(line[len("data: "):]))
    raise AssertionError("the stream ended without [DONE]")


def steps_of(chunks: list[dict], index: int = 0) -> list[dict]:
    return [c["choices"][0] for c in chunks if c["object"] == STEP and c["choices"][0]["index"] == index]


def final_of(chunks: list[dict], index: int = 0) -> dict:
    (final,) = [ch for c in chunks if c["object"] == "text_completion" for ch in c["choices"]
                if ch["index"] == index and ch["finish_reason"] is not None]
    return final


def text_of(chunks: list[dict], index: int = 0) -> str:
    return "".join(ch["text"] for c in chunks if c["object"] == "text_completion" for ch in c["choices"]
                   if ch["index"] == index)


def replay(steps: list[dict]) -> list[int]:
    """Apply the steps, in order, to an all-mask canvas; every position is written exactly once."""
    canvas = [MASK] * steps[0]["gen_length"]
    for k, s in enumerate(steps):
        assert s["step"] == k and s["nfe"] == k + 1
        assert len(s["positions"]) == len(s["token_ids"]) == len(s["tokens"])
        for p, t in zip(s["positions"], s["token_ids"]):
            assert canvas[p] == MASK and s["block_start"] <= p < s["block_end"]
            canvas[p] = t
        for p in s["filled_positions"]:
            assert canvas[p] == MASK
            canvas[p] = s["eos_token_id"]
    return canvas


@pytest.mark.parametrize("extras", [
    {"sampler": "steps"},
    {"sampler": "steps", "block_length": 4, "steps": 8},
    {"sampler": "confidence", "threshold": 0.2, "block_length": 8},
    {"sampler": "eb", "block_length": 4},
    {"sampler": "learned", "threshold": 4.0},  # no head on the tiny model: a given gamma
    {"sampler": "eb", "threshold": 2.0, "temperature": 1.0, "seed": 3},  # seeded sampling replays too
], ids=lambda e: "-".join(str(v) for v in e.values()))
def test_steps_replay_to_the_completion(server, loaded, extras):
    chunks = stream_chunks(server.url, prompt=SUDOKU, max_tokens=16, return_steps=True,
                           stream_options={"include_usage": True}, **extras)
    steps, final = steps_of(chunks), final_of(chunks)
    assert steps and all(s["gen_length"] == 16 for s in steps)
    assert len(steps) == final["nfe"] == chunks[-1]["usage"]["nfe"]  # one event per forward pass
    assert steps[-1]["finished"] and not any(s["finished"] for s in steps[:-1])

    ids = replay(steps)
    assert MASK not in ids
    text, _ = loaded.decode(ids)
    assert text == text_of(chunks)
    # the same ids as the sampler alone, and the same text as the plain (non-streamed) API
    params = SamplingParams(gen_length=16, **extras)
    alone = generate(loaded.model, [loaded.encode(SUDOKU)], params, mask_id=MASK, eos_id=EOS, pad_id=PAD)
    assert ids == alone.sequences[0].tolist() and len(steps) == int(alone.nfe[0])
    plain = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": MODEL_NAME, "prompt": SUDOKU, "max_tokens": 16, **extras}).json()
    assert plain["choices"][0]["text"] == text and plain["choices"][0]["nfe"] == len(steps)

    # per-token texts and the blocks the steps worked on
    for s in steps:
        assert s["tokens"] == [loaded.tokenizer.decode([t]) for t in s["token_ids"]]
        block = extras.get("block_length", 16)
        assert (s["block_start"], s["block_end"]) == (s["block"] * block, min((s["block"] + 1) * block, 16))
        expected = None if extras["sampler"] == "steps" else pytest.approx(extras.get("threshold", 0.3))
        assert s["threshold"] == expected
    assert [s["block"] for s in steps] == sorted(s["block"] for s in steps)


def test_steps_arrive_before_the_text_they_determine(server, loaded):
    """Each text chunk's text so far is the decoded prefix of the canvas replayed up to that point."""
    chunks = stream_chunks(server.url, prompt=COUNTDOWN, max_tokens=12, sampler="eb", block_length=4,
                           return_steps=True)
    seen, text = [], ""
    for c in chunks:
        if c["object"] == STEP:
            seen.append(c["choices"][0])
        elif c["choices"]:
            text += c["choices"][0]["text"]
            canvas = replay(seen)
            prefix = canvas[:canvas.index(MASK)] if MASK in canvas else canvas
            assert loaded.decode(prefix)[0].startswith(text)


def test_eos_fill_is_reported(tmp_path):
    """A row ended by an EOS: the masks after it become EOS without a commit (filled_positions)."""
    with live_server(loader=lambda settings: scripted_loaded({"a": "xyz"})) as srv:
        chunks = stream_chunks(srv.url, model="scripted", prompt="abc|", max_tokens=8, sampler="steps",
                               return_steps=True)
    steps = steps_of(chunks)
    assert [s["positions"] for s in steps] == [[0], [1], [2], [3]]
    assert [s["tokens"] for s in steps][:3] == [["x"], ["y"], ["z"]]
    assert steps[-1]["token_ids"] == [EOS] and steps[-1]["filled_positions"] == [4, 5, 6, 7]
    assert steps[-1]["eos_token_id"] == EOS and steps[-1]["finished"]
    assert replay(steps)[3:] == [EOS] * 5
    assert final_of(chunks)["nfe"] == len(steps) == 4 and text_of(chunks) == "xyz"


def test_each_choice_gets_its_own_steps(server, loaded):
    chunks = stream_chunks(server.url, prompt=[SUDOKU, COUNTDOWN], max_tokens=8, sampler="eb",
                           return_steps=True, stream_options={"include_usage": True})
    total = 0
    for index, prompt in enumerate((SUDOKU, COUNTDOWN)):
        steps = steps_of(chunks, index)
        assert len(steps) == final_of(chunks, index)["nfe"]
        assert loaded.decode(replay(steps))[0] == text_of(chunks, index)
        total += len(steps)
    assert total == chunks[-1]["usage"]["nfe"]


def test_steps_are_unchanged_by_other_rows_in_the_batch(server, loaded):
    """Requests with and without steps, different lengths, decoded together: each replays as alone."""
    jobs = [dict(prompt=SUDOKU, max_tokens=12, sampler="eb", block_length=4, return_steps=True),
            dict(prompt=COUNTDOWN, max_tokens=16, sampler="steps", steps=8),
            dict(prompt=COUNTDOWN, max_tokens=8, sampler="confidence", threshold=0.2, return_steps=True),
            dict(prompt="sudoku 0132201400001003", max_tokens=16, sampler="eb", n=2, return_steps=True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: stream_chunks(server.url, **job), jobs))
    for job, chunks in zip(jobs, results):
        extras = {k: v for k, v in job.items() if k in ("sampler", "block_length", "steps", "threshold")}
        params = SamplingParams(gen_length=job["max_tokens"], **extras)
        alone = generate(loaded.model, [loaded.encode(job["prompt"])], params, mask_id=MASK, eos_id=EOS,
                         pad_id=PAD)
        for index in range(job.get("n", 1)):
            steps = steps_of(chunks, index)
            if not job.get("return_steps"):
                assert steps == []
                continue
            assert replay(steps) == alone.sequences[0].tolist() and len(steps) == int(alone.nfe[0])


def test_no_step_events_without_the_flag(server):
    for flag in ({}, {"return_steps": False}):
        chunks = stream_chunks(server.url, prompt=SUDOKU, max_tokens=16, sampler="eb", **flag)
        assert chunks and all(c["object"] == "text_completion" for c in chunks)
        assert all("positions" not in ch for c in chunks for ch in c["choices"])


def test_return_steps_needs_stream(server):
    for stream in ({}, {"stream": False}):
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": MODEL_NAME, "prompt": SUDOKU, "return_steps": True, **stream})
        assert r.status_code == 400
        assert r.json()["error"] == {"message": "return_steps is only allowed when stream is true",
                                     "type": "invalid_request_error", "param": "return_steps", "code": None}
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"model": MODEL_NAME, "prompt": SUDOKU, "stream": True, "return_steps": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_steps"


def test_openai_client_text_is_unchanged_by_step_chunks(server):
    """A plain openai client that asks for steps still reads the same text (step chunks carry "")."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    kwargs = dict(model=MODEL_NAME, prompt=SUDOKU, max_tokens=16, stream=True)
    with_steps = list(client.completions.create(**kwargs, extra_body={"sampler": "eb", "return_steps": True}))
    without = list(client.completions.create(**kwargs, extra_body={"sampler": "eb"}))
    assert {c.object for c in with_steps} == {"text_completion", STEP}
    assert {c.object for c in without} == {"text_completion"}
    text = "".join(c.choices[0].text for c in with_steps if c.choices)
    assert text == "".join(c.choices[0].text for c in without if c.choices)
