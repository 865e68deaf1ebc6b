"""The decoding defaults a request gets for what it leaves out, and the device: a tiny native LLaDA in the published
file layout (tests/test_family_llada.py) served as ``diffpo-serve --model DIR`` serves it.

Four layers, each pinned: the family's constants (LLaDA: 256 tokens in blocks of 32, one token per pass), the
checkpoint's ``generation_config.json`` over them, the server's flags over that, the request over all. Then, live:
a request that sets only a prompt decodes in blocks of 32 (no token of block 1 is committed before block 0 is
full), and a 64-token stream arrives block by block. ``--device auto`` picks cpu here, cuda when torch sees one.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from diffpo_serve.api import create_app
from diffpo_serve.cli import parse_settings
from diffpo_serve.dllm.families import decoding_defaults
from diffpo_serve.dllm.loading import load_model
from diffpo_serve.dllm.sampler import SamplingParams, default_steps, generate
from diffpo_serve.paradigms import check_startup, paradigm_for
from diffpo_serve.protocol import APIError, CompletionRequest
from diffpo_serve.settings import ServerSettings, resolve_device
from test_family_llada import EOT, write_checkpoint
from test_server_support import live_server, save_tiny_model

PUBLISHED_GENERATION = {"_from_model_config": True, "bos_token_id": 3, "eos_token_id": EOT, "pad_token_id": EOT,
                        "transformers_version": "4.46.3"}  # LLaDA-8B-Instruct's, shrunk: no lengths in it


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    """LLaDA's published layout with its own generation config (which states no lengths); 512 positions, so the
    family's 256-token default fits."""
    directory = tmp_path_factory.mktemp("defaults") / "tiny-llada"
    write_checkpoint(directory, generation=PUBLISHED_GENERATION, max_sequence_length=512)
    return directory


@pytest.fixture(scope="module")
def llada(llada_dir):
    return load_model(llada_dir)


def llada_with(tmp_path, generation: dict):
    directory = tmp_path / "llada"
    write_checkpoint(directory, shards=1, generation={**PUBLISHED_GENERATION, **generation}, max_sequence_length=512)
    return load_model(directory)


def lengths(loaded, settings: ServerSettings, **request) -> tuple[int, int | None, int | None]:
    """(gen_length, block_length, steps) of the params a completion request with ``request`` fields gets."""
    req = CompletionRequest(model="m", prompt="w1", **request)
    paradigm = paradigm_for(loaded)
    gen_length = req.gen_length() or paradigm.default_gen_length(settings)
    params = paradigm.params(req, gen_length, "max_tokens", settings)
    return params.gen_length, params.block_length, params.steps


def card_lengths(loaded, settings: ServerSettings) -> tuple[int, int, int]:
    defaults = paradigm_for(loaded).card(settings)["defaults"]
    return defaults["gen_length"], defaults["block_length"], defaults["steps"]


# ----------------------------------------------------------------------------- the layers

def test_family_constants_give_llada_256_tokens_in_blocks_of_32_one_token_per_pass(llada):
    settings = ServerSettings()
    assert card_lengths(llada, settings) == (256, 32, 256)
    assert lengths(llada, settings) == (256, 32, 256)
    assert paradigm_for(llada).decoding(settings).sources == {
        "gen_length": "family llada", "block_length": "family llada", "steps": "default"}
    assert decoding_defaults("Dream") == {"gen_length": 256, "block_length": 32}  # Fast-dLLM's and d1's blocks
    assert decoding_defaults("diffpo-mdm") == decoding_defaults(None) == {"gen_length": None, "block_length": None}


def test_generation_config_overrides_the_family(tmp_path):
    loaded = llada_with(tmp_path, {"max_new_tokens": 48, "block_length": 16, "steps": 24})
    assert card_lengths(loaded, ServerSettings()) == (48, 16, 24)
    assert lengths(loaded, ServerSettings()) == (48, 16, 24)  # 3 blocks of 16 in 8 passes each
    assert paradigm_for(loaded).decoding(ServerSettings()).sources == {
        "gen_length": "generation_config.json", "block_length": "generation_config.json",
        "steps": "generation_config.json"}


def test_flags_override_the_generation_config(tmp_path):
    loaded = llada_with(tmp_path, {"max_new_tokens": 48, "block_length": 16, "steps": 24})
    settings = ServerSettings(default_max_tokens=64, default_block_length=8, default_steps=32)
    assert card_lengths(loaded, settings) == (64, 8, 32)  # half a pass per token: 4 per block of 8
    assert lengths(loaded, settings) == (64, 8, 32)
    assert paradigm_for(loaded).decoding(settings).sources == {
        "gen_length": "--default-max-tokens", "block_length": "--default-block-length", "steps": "--default-steps"}
    # one flag alone overrides its own layer only
    assert card_lengths(loaded, ServerSettings(default_block_length=12)) == (48, 12, 24)


def test_the_request_overrides_every_layer(tmp_path):
    loaded = llada_with(tmp_path, {"max_new_tokens": 48, "block_length": 16, "steps": 24})
    settings = ServerSettings(default_max_tokens=64, default_block_length=8, default_steps=32)
    assert lengths(loaded, settings, max_tokens=24, block_length=4, steps=12) == (24, 4, 12)
    # a request's own length keeps the default passes per token (here one per two): 3 blocks of 8 in 4 each
    assert lengths(loaded, settings, max_tokens=24) == (24, 8, 12)
    assert lengths(loaded, settings, block_length=32) == (64, 32, 32)  # its own block: 16 passes per block


def test_a_model_without_family_or_generation_lengths_keeps_one_block_of_16(tmp_path):
    loaded = load_model(save_tiny_model(tmp_path / "tiny"))  # the bundled model's family (diffpo-mdm)
    assert card_lengths(loaded, ServerSettings()) == (16, 16, 16)
    assert lengths(loaded, ServerSettings(), sampler="steps") == (16, None, 16)  # None: one block of the answer
    assert lengths(loaded, ServerSettings(default_block_length=4), sampler="steps") == (16, 4, 16)


def test_dreams_published_steps_count_as_one_pass_per_token(tmp_path):
    """Dream's generation_config.json says steps 512 with no length: more passes than tokens commit one token
    per pass all the same, so the default is capped there and /v1/models says what a decode takes."""
    loaded = llada_with(tmp_path, {"steps": 512})
    assert card_lengths(loaded, ServerSettings()) == (256, 32, 256)
    assert lengths(loaded, ServerSettings(), max_tokens=64) == (64, 32, 64)


# ----------------------------------------------------------------------------- lengths the blocks do not divide

def test_short_and_ragged_answers_stay_valid(llada):
    settings = ServerSettings()
    assert lengths(llada, settings, max_tokens=8) == (8, 32, 8)  # shorter than a block: one block of 8
    assert SamplingParams(gen_length=8, block_length=32, steps=8).resolved().block_length == 8
    assert lengths(llada, settings, max_tokens=40) == (40, 32, 64)  # blocks of 32 and 8, each budgeted 32
    assert lengths(llada, ServerSettings(default_steps=128), max_tokens=40) == (40, 32, 32)  # half: 16 per block
    # the sampler's own default for a ragged answer (was a ValueError): one pass per token, NFE = gen_length
    assert SamplingParams(gen_length=40, block_length=32).resolved().steps == 64
    assert [default_steps(g, b) for g, b in ((256, 32), (40, 32), (33, 32), (16, None), (8, 32))] == [
        256, 64, 64, 16, 8]
    assert [default_steps(64, 32, p, t) for p, t in ((1, 2), (3, 4), (2, 1), (1, 1000))] == [32, 48, 64, 2]


def test_ragged_last_block_decodes_after_the_first_one_pass_per_token(llada):
    """40 tokens in blocks of 32: block 0's 32 tokens in passes 0-31, the last block's 8 in passes 32-39."""
    _, block, steps = lengths(llada, ServerSettings(), max_tokens=40)
    out = generate(llada.model, [llada.encode("w1 w2 w3")], SamplingParams(gen_length=40, block_length=block,
                                                                           steps=steps),
                   mask_id=llada.mask_id, eos_id=llada.eos_id, pad_id=llada.pad_id, stop_at_eos=False,
                   return_trajectory=True)
    commit_step = out.commit_step[0].tolist()
    assert out.nfe.tolist() == [40]
    assert sorted(commit_step[:32]) == list(range(32)) and sorted(commit_step[32:40]) == list(range(32, 40))


def test_a_step_count_the_blocks_do_not_divide_is_a_400_naming_steps(llada):
    with pytest.raises(APIError) as e:
        lengths(llada, ServerSettings(), max_tokens=64, steps=3)  # 2 blocks of the default 32
    assert e.value.param == "steps" and "multiple of the number of blocks (2" in e.value.message


def test_a_bad_length_in_the_generation_config_fails_at_startup_naming_file_and_field(tmp_path):
    for value in (0, "many", 2.5):
        loaded = llada_with(tmp_path, {"block_length": value})
        problem = check_startup(loaded, ServerSettings())
        assert problem == (f"{loaded.path}/generation_config.json: `block_length` must be a positive integer; "
                           f"got {value!r}")


def test_the_smallest_lengths_a_generation_config_may_state_are_served(tmp_path):
    """1 is a positive integer: an answer of one token in blocks of one, one pass, starts (0 does not, above)."""
    loaded = llada_with(tmp_path, {"max_new_tokens": 1, "block_length": 1, "steps": 1})
    assert check_startup(loaded, ServerSettings()) is None
    assert card_lengths(loaded, ServerSettings()) == (1, 1, 1)


def test_a_canvas_model_refuses_another_block_length_and_takes_default_steps_per_block(tmp_path):
    from tiny_diffusion_gemma import CANVAS, random_model
    from tiny_diffusion_gemma import write_checkpoint as write_gemma
    loaded = load_model(write_gemma(tmp_path / "dg", random_model(seed=1),
                                    generation={"max_new_tokens": 16, "max_denoising_steps": 4}))
    assert check_startup(loaded, ServerSettings(default_block_length=CANVAS)) is None
    assert "--default-block-length 5: a canvas model decodes whole canvases of 8 tokens" in check_startup(
        loaded, ServerSettings(default_block_length=5))
    paradigm = paradigm_for(loaded)
    assert paradigm.card(ServerSettings())["defaults"]["steps"] == 4
    assert paradigm.card(ServerSettings(default_steps=2))["defaults"]["steps"] == 2
    req = CompletionRequest(model="m", prompt="x")
    assert paradigm.params(req, 16, "max_tokens", ServerSettings(default_steps=2)).steps == 2
    assert paradigm.params(req.model_copy(update={"steps": 3}), 16, "max_tokens",
                           ServerSettings(default_steps=2)).steps == 3


# ----------------------------------------------------------------------------- flags and the device

def test_flags_parse_and_device_defaults_to_auto():
    s = parse_settings(["--default-block-length", "8", "--default-steps", "16"], environ={})
    assert (s.default_block_length, s.default_steps, s.device) == (8, 16, "auto")
    assert parse_settings([], environ={"DIFFPO_DEFAULT_BLOCK_LENGTH": "4"}).default_block_length == 4
    for bad in (["--default-block-length", "0"], ["--default-steps", "0"], ["--device", "gpu"]):
        with pytest.raises(SystemExit):
            parse_settings(bad, environ={})


def test_device_auto_picks_cuda_when_torch_sees_one_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert [resolve_device(d) for d in ("cpu", "cuda:1", "mps")] == ["cpu", "cuda:1", "mps"]  # named: as given
    assert create_app(ServerSettings(decoder_process=False)).state.settings.device == "cuda"  # resolved once


# ----------------------------------------------------------------------------- live: blocks and streaming

@pytest.fixture(scope="module")
def server(llada_dir):
    """``diffpo-serve --model DIR`` with every default but the decoder process (a thread here: faster)."""
    with live_server(model=str(llada_dir), decoder_process=False) as srv:
        yield srv


def sse_events(response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def test_models_show_the_device_and_the_block_defaults(server):
    (card,) = httpx.get(server.url + "/v1/models").json()["data"]
    assert card["device"] == "cpu"
    assert {k: card["defaults"][k] for k in ("sampler", "gen_length", "block_length", "steps")} == {
        "sampler": "steps", "gen_length": 256, "block_length": 32, "steps": 256}


def test_a_request_with_only_a_prompt_decodes_in_blocks_of_32(server):
    """Its step events (``return_steps``) say block 0 spans [0, 32) of 256, and every position of it is
    committed, one per pass, before anything of block 1; the stream is closed in block 1 (the rows are dropped)."""
    committed: list[list[int]] = []
    body = {"model": "tiny-llada", "prompt": "w1 w2 w3", "stream": True, "return_steps": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for event in sse_events(response):
            choice = event["choices"][0]
            if event["object"] != "text_completion.step":
                continue
            assert (choice["gen_length"], choice["block_end"] - choice["block_start"]) == (256, 32)
            committed.append(choice["positions"])
            if choice["block"] == 1:
                break
    assert sorted(p for ps in committed[:32] for p in ps) == list(range(32))  # block 0, one token per pass
    assert all(len(ps) == 1 for ps in committed[:32])
    assert committed[32] and min(committed[32]) >= 32  # then block 1


def test_a_64_token_stream_arrives_block_by_block(server, llada):
    """64 tokens in the default blocks of 32: two content chunks, the first the text of block 0's 32 tokens, sent
    after block 0's last commit and before any pass of block 1, the second the rest; a chat stream that sets only
    messages and max_tokens streams the same two chunks."""
    ids: dict[int, int] = {}
    order: list[tuple] = []  # ("step", block) and ("text", content) as they arrive
    body = {"model": "tiny-llada", "prompt": "w4 w5", "max_tokens": 64, "stream": True, "return_steps": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
        for event in sse_events(response):
            for choice in event["choices"]:
                if event["object"] == "text_completion.step":
                    ids.update(zip(choice["positions"], choice["token_ids"]))
                    order.append(("step", choice["block"]))
                elif choice["text"]:
                    order.append(("text", choice["text"]))
    tokens = [ids[p] for p in range(64)]
    first, everything = llada.decode(tokens[:32])[0], llada.decode(tokens)[0]
    texts = [x for kind, x in order if kind == "text"]
    assert texts == [first, everything[len(first):]] and first and everything[len(first):]
    cut = order.index(("text", first))
    assert order[cut - 1] == ("step", 0) and order[cut + 1] == ("step", 1)
    chat = {"model": "tiny-llada", "messages": [{"role": "user", "content": "w4 w5"}], "max_tokens": 64,
            "stream": True}  # no chat template: the last user message is the prompt
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat, timeout=120) as response:
        contents = [c["delta"]["content"] for e in sse_events(response) for c in e["choices"]
                    if c["delta"].get("content")]
    assert contents == texts
