"""``logprobs`` over HTTP: OpenAI's shapes, filled with what the sampler recorded for the same decode.

The sampler's values are pinned against an independent replay of the model in tests/test_logprobs.py; here each
response is compared with the same decode run in-process (the tiny model the server serves, the same params), so a
token shifted by one, alternatives cut at the wrong count or in the wrong order, a missing generated token among
the completion alternatives, a text offset off, or a stream that repeats or drops tokens all fail.
"""

from __future__ import annotations

import json

import httpx
import pytest

from diffpo_serve.dllm.loading import load_model
from diffpo_serve.dllm.sampler import SamplingParams, denoise_step, init_state
from test_server_support import MODEL_NAME, SUDOKU, COUNTDOWN

KNOBS = {"sampler": "steps", "max_tokens": 16, "block_length": 4, "steps": 16}  # four blocks: streams in pieces


@pytest.fixture(scope="module")
def loaded(model_path):
    return load_model(model_path)


def decode(loaded, prompt: str, **params):
    """The in-process decode of one prompt: (ids before any EOS, [(logprob, top ids, top log-probs)] for them)."""
    p = SamplingParams("steps", 16, block_length=4, steps=16, logprobs=True, **params)
    state = init_state([loaded.encode(prompt)], p, mask_id=loaded.mask_id, eos_id=loaded.eos_id,
                       pad_id=loaded.pad_id, eos_ids=loaded.eos_ids)
    while not bool(state.finished.all()):
        denoise_step(loaded.model, state)
    ids = state.generated[0].tolist()
    end = loaded.eos_index(ids)
    ids = ids[:end] if end is not None else ids
    return ids, [(float(state.model_logprob[0, j]), state.top_ids[0, j].tolist(), state.top_logprob[0, j].tolist())
                 for j in range(len(ids))]


def text_of(loaded, i: int) -> str:
    return loaded.tokenizer.decode([i], skip_special_tokens=False)


def post(server, body, path="/v1/completions"):
    return httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, timeout=60)


def stream(server, body, path="/v1/completions") -> list[dict]:
    with httpx.stream("POST", server.url + path, json={"model": MODEL_NAME, "stream": True, **body},
                      timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_completion_logprobs_are_the_decodes(server, loaded):
    ids, want = decode(loaded, COUNTDOWN)
    choice = post(server, {"prompt": COUNTDOWN, "logprobs": 3, **KNOBS}).json()["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"] == [text_of(loaded, i) for i in ids] and "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"] == pytest.approx([w[0] for w in want], abs=1e-6)
    offsets = [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(ids))]
    assert lp["text_offset"] == offsets
    for i, (value, top_ids, top_values), listed in zip(ids, want, lp["top_logprobs"]):
        alternatives = {text_of(loaded, j): v for j, v in zip(top_ids[:3], top_values[:3])}
        alternatives.setdefault(text_of(loaded, i), value)  # the generated token is always listed
        assert listed == pytest.approx(alternatives, abs=1e-6)
        assert list(listed)[:3] == [text_of(loaded, j) for j in top_ids[:3]]  # most likely first


def test_completion_logprobs_zero_lists_the_generated_token_alone(server, loaded):
    ids, want = decode(loaded, SUDOKU)
    lp = post(server, {"prompt": SUDOKU, "logprobs": 0, **KNOBS}).json()["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [pytest.approx({text_of(loaded, i): w[0]}, abs=1e-6) for i, w in zip(ids, want)]


def test_chat_logprobs_sampled_are_the_decodes(server, loaded):
    """A sampled chat request (T = 0.8, seed 7): the model's log-probs, not the tempered ones, with 4 alternatives
    in order and each token's UTF-8 bytes."""
    ids, want = decode(loaded, SUDOKU, temperature=0.8, seed=7)
    body = {"messages": [{"role": "user", "content": SUDOKU}], "logprobs": True, "top_logprobs": 4,
            "temperature": 0.8, "seed": 7, **KNOBS}
    choice = post(server, body, "/v1/chat/completions").json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [text_of(loaded, i) for i in ids]
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    for c, (value, top_ids, top_values) in zip(content, want):
        assert c["logprob"] == pytest.approx(value, abs=1e-6) and c["bytes"] == list(c["token"].encode())
        assert [t["token"] for t in c["top_logprobs"]] == [text_of(loaded, j) for j in top_ids[:4]]
        assert [t["logprob"] for t in c["top_logprobs"]] == pytest.approx(top_values[:4], abs=1e-6)


def test_chat_logprobs_without_top_logprobs_list_no_alternatives(server):
    body = {"messages": [{"role": "user", "content": SUDOKU}], "logprobs": True, **KNOBS}
    content = post(server, body, "/v1/chat/completions").json()["choices"][0]["logprobs"]["content"]
    assert content and all(c["top_logprobs"] == [] for c in content)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_logprobs_are_the_whole_responses_in_order(server, path):
    """The chunks' log-probs, concatenated, equal the non-streamed response's; each chunk carries the tokens of
    its own text (so a client can align them), and offsets continue across chunks."""
    chat = path.endswith("chat/completions")
    body = ({"messages": [{"role": "user", "content": COUNTDOWN}], "logprobs": True, "top_logprobs": 2} if chat
            else {"prompt": COUNTDOWN, "logprobs": 2})
    whole = post(server, {**body, **KNOBS}, path).json()["choices"][0]
    chunks = [c["choices"][0] for c in stream(server, {**body, **KNOBS}, path) if c["choices"]]
    with_logprobs = [c for c in chunks if c.get("logprobs")]
    assert len(with_logprobs) >= 2  # four blocks: the text arrives in pieces
    if chat:
        got = [entry for c in with_logprobs for entry in c["logprobs"]["content"]]
        assert got == whole["logprobs"]["content"]
        for c in with_logprobs:
            assert "".join(e["token"] for e in c["logprobs"]["content"]) == c["delta"].get("content", "")
    else:
        merged = {k: [v for c in with_logprobs for v in c["logprobs"][k]] for k in whole["logprobs"]}
        assert merged == whole["logprobs"]
        for c in with_logprobs:
            assert "".join(c["logprobs"]["tokens"]) == c["text"]


def test_a_stop_string_cuts_the_logprobs_with_the_text(server, loaded):
    ids, _ = decode(loaded, COUNTDOWN)
    text = loaded.decode(ids)[0]
    stop = text[len(text) // 2]  # a character of the answer: the text ends before its first occurrence
    cut = text.index(stop)
    covering, length = [], 0  # the fewest leading tokens whose text holds the returned text (a token may hold
    for i in ids:             # the stop string's start too: the text ends inside it)
        if length >= cut:
            break
        covering.append(text_of(loaded, i))
        length += len(covering[-1])
    for streamed in (False, True):
        body = {"prompt": COUNTDOWN, "logprobs": 1, "stop": [stop], **KNOBS}
        if streamed:
            chunks = [c["choices"][0] for c in stream(server, body) if c["choices"]]
            tokens = [t for c in chunks if c.get("logprobs") for t in c["logprobs"]["tokens"]]
            returned = "".join(c["text"] for c in chunks)
        else:
            choice = post(server, body).json()["choices"][0]
            tokens, returned = choice["logprobs"]["tokens"], choice["text"]
        assert returned == text[:cut] and tokens == covering, streamed


def test_each_choice_carries_its_own_rows_logprobs(server, loaded):
    """n = 2 with a seed: choice i is the decode seeded seed + i."""
    choices = post(server, {"prompt": SUDOKU, "logprobs": 1, "n": 2, "temperature": 1.0, "seed": 40,
                            **KNOBS}).json()["choices"]
    for choice in choices:
        ids, want = decode(loaded, SUDOKU, temperature=1.0, seed=40 + choice["index"])
        assert choice["logprobs"]["tokens"] == [text_of(loaded, i) for i in ids]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx([w[0] for w in want], abs=1e-6)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": SUDOKU, "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": SUDOKU, "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": SUDOKU, "echo": True}, "echo"),
    ("/v1/completions", {"prompt": SUDOKU, "echo": True, "logprobs": 1}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SUDOKU}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SUDOKU}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
])
def test_out_of_range_logprobs_and_echo_are_400_naming_the_field(server, path, body, param):
    r = post(server, body, path)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": SUDOKU, "logprobs": 5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SUDOKU}], "logprobs": True,
                              "top_logprobs": 20}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SUDOKU}], "top_logprobs": 0}),
])
def test_the_largest_counts_are_served(server, path, body):
    r = post(server, {**body, "max_tokens": 4}, path)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if body.get("logprobs") is True:
        assert all(len(c["top_logprobs"]) == 20 for c in choice["logprobs"]["content"])
    elif "logprobs" in body:
        assert all(5 <= len(t) <= 6 for t in choice["logprobs"]["top_logprobs"])
    else:
        assert choice["logprobs"] is None  # top_logprobs 0 without logprobs: nothing asked
