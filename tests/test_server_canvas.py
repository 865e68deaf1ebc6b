"""Serving a canvas model (DiffusionGemma) through the same OpenAI API: a live server on a tiny random
DiffusionGemma checkpoint (tests/tiny_diffusion_gemma.py), its answers against the offline decoder
(``canvas.generate``), batching through the batcher equal to decoding alone, streaming (text and the changing
draft of ``return_steps``), the learned bound, errors and metrics."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import openai
import pytest
from tiny_diffusion_gemma import PAD, random_model, write_checkpoint

from diffpo_serve.batcher import Batcher, RowRequest, RowUpdate
from diffpo_serve.dllm import canvas as cv
from diffpo_serve.dllm.loading import load_model
from diffpo_serve.dllm.threshold_head import ThresholdHead
from test_server_support import MODEL_NAME, live_server, metric_value
from test_threshold_head import always

NAME = "tiny-diffusiongemma"
STEPS, BOUND, MAX_TOKENS = 4, 0.5, 16  # the checkpoint's generation config (kept small: fast tests)
GENERATION = {"max_new_tokens": MAX_TOKENS, "max_denoising_steps": STEPS,
              "sampler_config": {"entropy_bound": BOUND, "_cls_name": "EntropyBoundSamplerConfig"}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("dgserve") / NAME, random_model(seed=3), generation=GENERATION)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def canvas_server(checkpoint):
    """The server as ``diffpo-serve --model DIR`` runs it: the model in its decoder process."""
    with live_server(model=str(checkpoint), max_batch_size=16) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(canvas_server):
    return openai.OpenAI(base_url=canvas_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def offline(loaded, prompt_ids, **params):
    """``canvas.generate`` alone on one prompt: (text, finish_reason, nfe, ids cut at gen_length)."""
    p = cv.CanvasParams(**params)
    out = cv.generate(cv.denoiser_for(loaded.model), [prompt_ids], p, eos_ids=loaded.eos_ids, pad_id=loaded.pad_id)
    n = p.gen_length or MAX_TOKENS
    ids = out.sequences[0, :n].tolist()
    text, eos = loaded.decode(ids)
    return text, "stop" if eos else "length", int(out.nfe[0]), ids


def chat_ids(loaded, content):
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    return loaded.encode(text)


# ----------------------------------------------------------------------------- the model card

def test_models_say_the_paradigm_and_its_defaults(client):
    (card,) = client.models.list().data
    assert card.id == NAME
    extra = card.model_extra
    assert extra["paradigm"] == "canvas" and extra["samplers"] == ["eb", "learned"]
    assert extra["defaults"] == {"sampler": "eb", "gen_length": MAX_TOKENS, "steps": STEPS, "threshold": BOUND,
                                 "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1,
                                 "confidence_threshold": 0.005, "canvas_length": 8}
    assert extra["cache_modes"] == ["off"]


# ----------------------------------------------------------------------------- answers == the offline decoder

@pytest.mark.parametrize("extra", [{}, {"threshold": 2.0, "steps": 3, "t_max": 1.2}, {"threshold": 0.05}])
def test_seeded_completion_equals_offline_generate(client, loaded, extra):
    prompt = "abc def 12"
    for seed in (0, 7):
        r = client.completions.create(model=NAME, prompt=prompt, seed=seed, max_tokens=12, extra_body=extra)
        text, finish, nfe, ids = offline(loaded, loaded.encode(prompt), gen_length=12, seed=seed, **extra)
        (choice,) = r.choices
        assert (choice.text, choice.finish_reason, choice.model_extra["nfe"]) == (text, finish, nfe)
        assert choice.model_extra["threshold"] == extra.get("threshold", BOUND)  # the bound used, reported
        end = loaded.eos_index(ids)
        assert r.usage.completion_tokens == (end + 1 if end is not None else 12)
        assert r.usage.model_extra["nfe"] == nfe  # decoder passes


def test_chat_uses_the_chat_template_and_n_gets_seed_plus_i(client, loaded):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi there"}], n=3, seed=4)
    ids = chat_ids(loaded, "hi there")
    for i, choice in enumerate(r.choices):
        text, finish, nfe, _ = offline(loaded, ids, seed=4 + i)
        assert (choice.message.content, choice.finish_reason, choice.model_extra["nfe"]) == (text, finish, nfe)
    assert len({c.message.content for c in r.choices}) == 3  # the seeds differ: the comparison is not vacuous


def test_concurrent_seeded_requests_equal_their_solo_results(client, loaded):
    """Requests of different prompts, lengths, bounds and step limits at once (n > 1, so rows share decoder
    passes); each choice equals its decode alone."""
    requests = [dict(prompt="abc", seed=1, max_tokens=16, n=3, extra_body={"threshold": 0.2}),
                dict(prompt="zz top 99 and more words here", seed=5, max_tokens=9, n=2, extra_body={"steps": 2}),
                dict(prompt="q", seed=11, max_tokens=24, n=2, extra_body={"threshold": 1.5, "t_min": 0.2}),
                dict(prompt="hello world", seed=3, max_tokens=8, n=1, extra_body={})]
    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda kw: client.completions.create(model=NAME, **kw), requests))
    for kw, r in zip(requests, responses):
        for i, choice in enumerate(r.choices):
            text, finish, nfe, _ = offline(loaded, loaded.encode(kw["prompt"]), gen_length=kw["max_tokens"],
                                           seed=kw["seed"] + i, **kw["extra_body"])
            assert (choice.text, choice.finish_reason, choice.model_extra["nfe"]) == (text, finish, nfe)


def test_encoder_passes_are_reported_per_choice_and_summed(client, loaded):
    """Each choice's ``encoder_passes`` is its decode's alone (one per block it started: 24 tokens are 3 blocks
    of 8 unless an EOS ends it sooner), ``usage.encoder_passes`` their sum, and the stream's last chunk says it."""
    r = client.completions.create(model=NAME, prompt="abc", seed=20, max_tokens=24, n=4)
    alone = [cv.generate(cv.denoiser_for(loaded.model), [loaded.encode("abc")],
                         cv.CanvasParams(gen_length=24, seed=20 + i), eos_ids=loaded.eos_ids, pad_id=loaded.pad_id)
             for i in range(4)]
    expected = [int(out.encoder_passes[0]) for out in alone]
    assert [c.model_extra["encoder_passes"] for c in r.choices] == expected
    assert all(1 <= e <= 3 for e in expected) and r.usage.model_extra["encoder_passes"] == sum(expected)
    *content, usage = list(client.completions.create(model=NAME, prompt="abc", seed=20, max_tokens=24, stream=True,
                                                     stream_options={"include_usage": True}))
    assert content[-1].choices[0].model_extra["encoder_passes"] == expected[0]
    assert usage.usage.model_extra["encoder_passes"] == expected[0]


# ----------------------------------------------------------------------------- the batcher, step by step

def test_rows_joining_mid_block_and_leaving_equal_alone(loaded):
    """Through the Batcher itself: a second request joins while the first is mid-block, finished rows leave;
    every row's final ids and NFE are its decode alone."""
    rows_a = [RowRequest(loaded.encode("abc"), cv.CanvasParams(gen_length=16, seed=s, threshold=0.3))
              for s in (1, 2)]
    rows_b = [RowRequest(loaded.encode("a much longer prompt"), cv.CanvasParams(gen_length=8, seed=9, steps=3))]

    async def main():
        batcher = Batcher(loaded)
        first = batcher.submit(rows_a)
        batcher.run_once()
        batcher.run_once()
        second = batcher.submit(rows_b)
        for _ in range(40):
            batcher.run_once()
        await asyncio.sleep(0)
        return first, second

    first, second = asyncio.run(main())
    for handle, rows in ((first, rows_a), (second, rows_b)):
        events = _drain(handle)
        finals = {e.choice: e for e in events if isinstance(e, RowUpdate) and e.finished}
        assert sorted(finals) == list(range(len(rows)))
        for choice, row in enumerate(rows):
            p = row.params
            _, _, nfe, ids = offline(loaded, row.prompt, gen_length=p.gen_length, seed=p.seed, threshold=p.threshold,
                                     steps=p.steps)
            assert finals[choice].ids == ids and finals[choice].nfe == nfe
        # reported after each finished block: determined prefixes that only grow, whole blocks of 8
        updates = [e for e in events if isinstance(e, RowUpdate) and e.choice == 0]
        assert [len(u.ids) for u in updates[:-1]] == [8 * (k + 1) for k in range(len(updates) - 1)]
        assert all(u.ids == updates[-1].ids[:len(u.ids)] for u in updates)


def test_learned_rows_take_the_heads_bound_in_their_first_pass(loaded):
    head = always(ThresholdHead(cv.denoiser_for(loaded.model).hidden_size, features="prompt+answer+eb"), 9)
    gamma = float(head.grid[9])
    with_head = replace(loaded, threshold_head=head)
    prompt = loaded.encode("abc")

    async def main():
        batcher = Batcher(with_head)
        handle = batcher.submit([RowRequest(prompt, cv.CanvasParams(gen_length=16, seed=2, sampler="learned")),
                                 RowRequest(prompt, cv.CanvasParams(gen_length=16, seed=2, threshold=0.05))])
        for _ in range(30):
            batcher.run_once()
        await asyncio.sleep(0)
        return _drain(handle)

    finals = {e.choice: e for e in asyncio.run(main()) if isinstance(e, RowUpdate) and e.finished}
    _, _, nfe, ids = offline(loaded, prompt, gen_length=16, seed=2, threshold=gamma)
    assert finals[0].threshold == pytest.approx(gamma) and finals[0].sampler == "learned"
    assert finals[0].ids == ids and finals[0].nfe == nfe
    assert finals[1].threshold == pytest.approx(0.05)  # a given bound overrides the head


def _drain(handle) -> list:
    out = []
    while not handle.events.empty():
        out.append(handle.events.get_nowait())
    return out


# ----------------------------------------------------------------------------- streaming

def stream_chunks(url: str, **body) -> list[dict]:
    body = {"model": NAME, "stream": True, **body}
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                return chunks
            if line.startswith("data: "):
                chunks.append(json.loads(line[len("data: "):]))
    raise AssertionError("the stream ended without [DONE]")


def test_stream_chunks_concatenate_to_the_final_text(client):
    whole = client.completions.create(model=NAME, prompt="abc", seed=3, max_tokens=24)
    chunks = list(client.completions.create(model=NAME, prompt="abc", seed=3, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}))
    *content, usage = chunks
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert content[-1].choices[0].model_extra["nfe"] == whole.choices[0].model_extra["nfe"]
    assert usage.usage.completion_tokens == whole.usage.completion_tokens
    assert len(content) <= 3  # text only when a block (of 8) is finished: at most one chunk per block
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "yo"}], seed=1)
    streamed = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "yo"}], seed=1,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


def test_step_events_carry_a_draft_that_changes_and_replay_to_the_answer(canvas_server, loaded):
    chunks = stream_chunks(canvas_server.url, prompt="abc", seed=6, max_tokens=20, return_steps=True,
                           threshold=0.3)
    steps = [c["choices"][0] for c in chunks if c["object"] == "text_completion.step"]
    final = [ch for c in chunks if c["object"] == "text_completion" for ch in c["choices"] if ch["finish_reason"]][0]
    text = "".join(ch["text"] for c in chunks if c["object"] == "text_completion" for ch in c["choices"])
    assert len(steps) == final["nfe"] and [s["step"] for s in steps] == list(range(final["nfe"]))
    assert all(s["paradigm"] == "canvas" and s["threshold"] == 0.3 for s in steps)
    # replay: a position shows the draft of the last pass whose block holds it; the final drafts are the answer
    answer = [None] * 20
    for s in steps:
        assert s["block_end"] - s["block_start"] == len(s["draft_ids"]) == len(s["draft_tokens"])
        assert all(s["block_start"] <= p < s["block_end"] for p in s["accepted_positions"])
        # the bound keeps at least one position of the canvas (it may lie past gen_length in a cut last block)
        assert s["accepted_positions"] or s["block_end"] - s["block_start"] < 8
        answer[s["block_start"]:s["block_end"]] = s["draft_ids"]
    _, _, nfe, ids = offline(loaded, loaded.encode("abc"), gen_length=20, seed=6, threshold=0.3)
    assert answer[:len(ids)] == ids and nfe == final["nfe"]
    assert text == loaded.decode(ids)[0]
    done = [s for s in steps if s["block_done"]]
    assert [s["block"] for s in done] == list(range(len(done))) and done[-1]["finished"]
    # the canvas changes, it does not only fill in: some position's draft differs between two passes of a block
    changed = any(a["block"] == b["block"] and a["draft_ids"] != b["draft_ids"] for a, b in zip(steps, steps[1:]))
    assert changed


def test_a_huge_bound_keeps_every_position(canvas_server):
    steps = [c["choices"][0] for c in stream_chunks(canvas_server.url, prompt="abc", seed=1, max_tokens=8,
                                                    return_steps=True, threshold=1000.0)
             if c["object"] == "text_completion.step"]
    assert all(s["accepted_positions"] == list(range(8)) for s in steps)


# ----------------------------------------------------------------------------- errors and metrics

@pytest.mark.parametrize("body, param", [
    ({"sampler": "steps"}, "sampler"), ({"sampler": "confidence"}, "sampler"), ({"sampler": "policy"}, "sampler"),
    ({"sampler": "learned"}, "sampler"),  # no threshold head on this model
    ({"cache": "prefix"}, "cache"), ({"block_length": 4}, "block_length"), ({"temperature": 0.5}, "temperature"),
    ({"top_p": 0.9}, "top_p"), ({"t_min": 0.9, "t_max": 0.5}, "t_min"), ({"max_tokens": 600}, "max_tokens"),
    ({"logprobs": 0}, "logprobs"),
])
def test_bad_input_is_a_400_naming_the_param(canvas_server, body, param):
    r = httpx.post(canvas_server.url + "/v1/completions", json={"model": NAME, "prompt": "abc", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_logprobs_are_refused_with_the_reason(canvas_server):
    """A canvas model commits no token at one pass (it redraws the block and keeps what the bound accepts), so
    there is no committing pass to take a log-probability from: chat's logprobs are a 400 that says so."""
    r = httpx.post(canvas_server.url + "/v1/chat/completions", timeout=30, json={
        "model": NAME, "messages": [{"role": "user", "content": "abc"}], "logprobs": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    assert "redraws every position" in r.json()["error"]["message"]
    plain = httpx.post(canvas_server.url + "/v1/chat/completions", timeout=30, json={
        "model": NAME, "messages": [{"role": "user", "content": "abc"}], "logprobs": False, "max_tokens": 8})
    assert plain.status_code == 200 and plain.json()["choices"][0]["logprobs"] is None


def test_image_token_prompts_are_a_400(canvas_server):
    r = httpx.post(canvas_server.url + "/v1/completions", json={"model": NAME, "prompt": [2, 62, 9]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "image token (62)" in r.json()["error"]["message"]


def test_supported_extras_pass(canvas_server):
    r = httpx.post(canvas_server.url + "/v1/completions", timeout=30, json={
        "model": NAME, "prompt": "abc", "block_length": 8, "cache": "off", "top_p": 1, "sampler": "eb",
        "stability_threshold": 0, "confidence_threshold": 0.0, "max_tokens": 8, "seed": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["nfe"] == STEPS  # never stable-and-confident: every step of its one block


def test_a_masked_model_refuses_the_canvas_extras(server):
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL_NAME, "prompt": "abc", "t_max": 0.9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "t_max"


def test_metrics_count_decoder_passes(canvas_server, client):
    before = httpx.get(canvas_server.url + "/metrics").text
    r = client.completions.create(model=NAME, prompt="abc", seed=2, n=2)
    after = httpx.get(canvas_server.url + "/metrics").text
    nfe = sum(c.model_extra["nfe"] for c in r.choices)
    delta = metric_value(after, "diffpo_nfe_sum", 'sampler="eb"') - metric_value(before, "diffpo_nfe_sum", 'sampler="eb"')
    assert delta == nfe
    count = metric_value(after, "diffpo_nfe_count", 'sampler="eb"') - metric_value(before, "diffpo_nfe_count",
                                                                                    'sampler="eb"')
    assert count == 2


def test_startup_refuses_masked_only_settings(checkpoint):
    from diffpo_serve.api import load_from_settings
    from diffpo_serve.dllm.loading import ModelLoadError
    from diffpo_serve.settings import ServerSettings
    with pytest.raises(ModelLoadError, match="--default-sampler steps.*samplers are eb, learned"):
        load_from_settings(ServerSettings(model=str(checkpoint), default_sampler="steps"))
    with pytest.raises(ModelLoadError, match="--default-temperature"):
        load_from_settings(ServerSettings(model=str(checkpoint), default_temperature=0.7))
    with pytest.raises(ModelLoadError, match="--cache prefix needs a model with a native KV cache"):
        load_from_settings(ServerSettings(model=str(checkpoint), cache="prefix"))
    assert load_from_settings(ServerSettings(model=str(checkpoint), default_sampler="eb")).paradigm == "canvas"


def test_the_front_keeps_what_the_engine_needs_without_weights(loaded):
    import pickle
    front = pickle.loads(pickle.dumps(loaded.without_weights()))
    assert front.model.config.vocab_size == 64 and front.model.config.canvas_length == 8  # the text config's
    from diffpo_serve.paradigms import paradigm_for
    assert paradigm_for(front).defaults == paradigm_for(loaded).defaults
    assert (front.pad_id, front.eos_ids) == (loaded.pad_id, loaded.eos_ids) == (PAD, (1, 4))
