"""Pins of the serving path that mutation testing found loose: the limits and defaults of a canvas model
(DiffusionGemma: its text config's vocabulary, a context counted in whole canvases, the checkpoint's answer length
and the server's ``--default-steps``), ``--default-steps`` of a masked model as the decode actually uses it, the
second of several EOS ids ending a row (masked sampler and canvas loop) after the same passes as the first would,
and a cancelled queued request giving its queue place back.

Each test pins the value at the edge (the largest accepted and the next refused) or the number the decode takes
(its passes), so that an off-by-one, a default not applied or an EOS list cut to its first id fails here.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch
from tiny_diffusion_gemma import CANVAS, VOCAB, random_model, write_checkpoint

from conftest import EOS
from diffpo_serve.batcher import Batcher, QueueFull, RowRequest, RowUpdate
from diffpo_serve.dllm import canvas as cv
from diffpo_serve.dllm.loading import load_model
from diffpo_serve.dllm.sampler import SamplingParams
from diffpo_serve.paradigms import check_startup
from diffpo_serve.protocol import CompletionRequest
from diffpo_serve.settings import ServerSettings
from test_server_batcher import drain_events, run_engine, settle
from test_server_support import scripted_loaded
from test_server_validation import refused, rows_for

CANVAS_MAX_TOKENS, CANVAS_STEPS = 24, 4  # the tiny checkpoint's generation config


@pytest.fixture(scope="module")
def canvas_loaded(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("pins") / "dg", random_model(seed=3), generation={
        "max_new_tokens": CANVAS_MAX_TOKENS, "max_denoising_steps": CANVAS_STEPS,
        "sampler_config": {"entropy_bound": 0.5, "_cls_name": "EntropyBoundSamplerConfig"}})
    return load_model(path)


def completion(**kw) -> CompletionRequest:
    return CompletionRequest(**{"prompt": "ab|", **kw})


# ----------------------------------------------------------------------------- a canvas model's limits

def test_a_canvas_models_vocabulary_is_its_text_configs(canvas_loaded):
    """DiffusionGemma nests vocab_size in its text config (64 here, the tokenizer 52): id 63 is the model's last."""
    assert len(canvas_loaded.tokenizer) < VOCAB == 64
    assert rows_for(completion(prompt=[5, VOCAB - 1]), loaded=canvas_loaded)[0].prompt == [5, VOCAB - 1]
    e = refused(completion(prompt=[5, VOCAB]), loaded=canvas_loaded)
    assert (e.status, e.param, e.message) == (400, "prompt", f"token ids must be in [0, {VOCAB})")


def test_a_canvas_model_refuses_its_image_token_naming_the_prompt(canvas_loaded):
    image = canvas_loaded.model.config.image_token_id
    e = refused(completion(prompt=[[5, 6], [5, image]]), loaded=canvas_loaded)
    assert (e.status, e.param, e.code) == (400, "prompt", "unsupported_parameter")
    assert e.message == f"the prompt holds the image token ({image}); image inputs are not supported (text only)"


def test_a_canvas_models_context_counts_whole_canvases(canvas_loaded):
    """The answer takes ceil(max_tokens / 8) canvases of 8: with 8 prompt tokens in a 512 context, 504 tokens
    (and 497, rounded up to 504) fit; 505 takes 512 positions and is refused naming max_tokens."""
    limit = canvas_loaded.max_length
    assert (limit, CANVAS) == (512, 8)
    prompt = [5] * 8
    for fits in (504, 497):
        assert rows_for(completion(prompt=prompt, max_tokens=fits), loaded=canvas_loaded)[0].params.gen_length == fits
    e = refused(completion(prompt=prompt, max_tokens=505), loaded=canvas_loaded)
    assert (e.status, e.param, e.code) == (400, "max_tokens", "context_length_exceeded")
    assert e.message == ("This model's maximum context length is 512 tokens. However, you requested 520 tokens "
                         "(8 in the prompt, 512 for the completion). Please reduce the prompt or max_tokens.")
    e = refused(completion(prompt=[5] * 505, max_tokens=1), loaded=canvas_loaded)  # 505 + one canvas of 8 > 512
    assert e.param == "max_tokens" and "requested 513 tokens (505 in the prompt, 8 for the completion)" in e.message
    assert len(rows_for(completion(prompt=[5] * 504, max_tokens=1), loaded=canvas_loaded)[0].prompt) == 504


def test_a_canvas_request_that_sets_nothing_gets_the_checkpoints_length_and_the_servers_steps(canvas_loaded):
    (row,) = rows_for(completion(), loaded=canvas_loaded)
    assert (row.params.gen_length, row.params.steps, row.params.sampler) == (CANVAS_MAX_TOKENS, None, "eb")
    assert cv.CanvasParams(**{**row.params.__dict__}).resolved(
        cv.denoiser_for(canvas_loaded.model).defaults).steps == CANVAS_STEPS  # None: the checkpoint's 4
    flags = ServerSettings(default_steps=7, default_max_tokens=9)
    (row,) = rows_for(completion(), settings=flags, loaded=canvas_loaded)
    assert (row.params.gen_length, row.params.steps) == (9, 7)
    (row,) = rows_for(completion(steps=2, max_tokens=3), settings=flags, loaded=canvas_loaded)
    assert (row.params.gen_length, row.params.steps) == (3, 2)


def test_a_bad_temperature_schedule_names_the_field_the_request_set(canvas_loaded):
    """The checkpoint's schedule is t_min 0.4, t_max 0.8 (transformers' defaults): a request's t_min above that
    t_max names t_min; its t_max below that t_min names t_max; t_min = t_max is a valid (constant) schedule."""
    for extra, param in (({"t_min": 0.9}, "t_min"), ({"t_max": 0.3}, "t_max"), ({"t_min": 0.9, "t_max": 0.5}, "t_min")):
        e = refused(completion(**extra), loaded=canvas_loaded)
        assert (e.status, e.param) == (400, param) and e.message.startswith("the temperature schedule needs")
    (row,) = rows_for(completion(t_min=0.8), loaded=canvas_loaded)
    assert (row.params.t_min, row.params.t_max) == (0.8, None)


def test_a_canvas_server_takes_its_own_block_length_and_no_other(canvas_loaded):
    assert check_startup(canvas_loaded, ServerSettings(default_block_length=CANVAS)) is None
    assert check_startup(canvas_loaded, ServerSettings()) is None
    for other in (CANVAS - 1, CANVAS + 1):
        assert check_startup(canvas_loaded, ServerSettings(default_block_length=other)).startswith(
            f"--default-block-length {other}: a canvas model decodes whole canvases of {CANVAS} tokens")


# ----------------------------------------------------------------------------- a masked model's --default-steps

def test_default_steps_are_the_passes_per_token_of_the_default_answer():
    """--default-steps 8 for --default-max-tokens 16: half a pass per token, for any answer length and block
    length a request names, unless it names steps."""
    settings = ServerSettings(default_max_tokens=16, default_steps=8)
    assert rows_for(completion(), settings=settings)[0].params.steps == 8
    assert rows_for(completion(max_tokens=8), settings=settings)[0].params.steps == 4
    assert rows_for(completion(max_tokens=12, block_length=4), settings=settings)[0].params.steps == 6
    assert rows_for(completion(max_tokens=8, steps=8), settings=settings)[0].params.steps == 8
    blocks = ServerSettings(default_max_tokens=16, default_steps=8, default_block_length=4)
    assert [rows_for(completion(**kw), settings=blocks)[0].params.block_length for kw in ({}, {"block_length": 8})] \
        == [4, 8]
    assert rows_for(completion(max_tokens=12), settings=blocks)[0].params.steps == 6  # 3 blocks of 4, 2 passes each
    assert rows_for(completion(), settings=ServerSettings(default_max_tokens=16))[0].params.steps == 16


def test_default_steps_set_the_passes_the_decode_takes():
    loaded = scripted_loaded(default="x" * 64)
    settings = ServerSettings(default_max_tokens=16, default_steps=8, default_sampler="steps")
    r = run_engine(loaded, CompletionRequest(model="scripted", prompt="ab|", max_tokens=8), settings=settings)
    (choice,) = r.choices
    assert (choice.text, choice.finish_reason, choice.nfe) == ("x" * 8, "length", 4)
    r = run_engine(loaded, CompletionRequest(model="scripted", prompt="ab|"), settings=settings)
    assert (r.choices[0].text, r.choices[0].nfe) == ("x" * 16, 8)
    r = run_engine(loaded, CompletionRequest(model="scripted", prompt="ab|", max_tokens=8),
                   settings=ServerSettings(default_sampler="steps"))
    assert r.choices[0].nfe == 8  # no --default-steps: one token per pass


# ----------------------------------------------------------------------------- several EOS ids

def test_the_second_eos_id_ends_the_row_after_its_own_pass():
    """The sampler, not only the text, stops at the second EOS id: x, y, '#' take 3 passes (ignoring '#' it would
    write zz and the first EOS: 6 passes)."""
    loaded = scripted_loaded({"a": "xy#zz"})
    hash_id = loaded.tokenizer.convert_tokens_to_ids("#")
    for eos_ids, want in (((EOS, hash_id), ("xy", 3, 3)), ((EOS,), ("xy#zz", 6, 6))):
        r = run_engine(replace(loaded, eos_ids=eos_ids),
                       CompletionRequest(model="scripted", prompt="ab|", max_tokens=8, sampler="steps"))
        (c,) = r.choices
        assert (c.text, c.nfe, r.usage.completion_tokens) == want and c.finish_reason == "stop"


class ScriptedCanvas:
    """A canvas denoiser whose decoder is certain of ``script`` (one token per answer position)."""

    canvas_length, vocab_size, hidden_size, image_token_id = 4, 32, 4, None
    device, dtype = torch.device("cpu"), torch.float32
    defaults = {"gen_length": 8, "steps": 3, "threshold": 100.0, "t_min": 0.5, "t_max": 1.0, "stability_threshold": 0,
                "confidence_threshold": 1.0}

    def __init__(self, script: list[int]):
        self.script = script

    def encode(self, ids, start, cache, return_hidden=False):
        return len(ids) if cache is None else cache  # the cache: the prompt's length

    def decode(self, canvas, start, caches, self_conditioning, has_self_conditioning, return_hidden=False):
        b, c = canvas.shape
        logits = torch.zeros(b, c, self.vocab_size)
        for r in range(b):
            first = int(start[r]) - caches[r]  # the block's first answer position
            for j in range(c):
                logits[r, j, self.script[first + j]] = 30.0
        return logits


def test_a_canvas_row_stops_at_the_second_eos_id():
    """Block 0 of the script holds the second EOS id (9) at position 2: the row ends there (one decoder pass,
    pad after it), where with only the first EOS id it would decode its second block."""
    denoiser = ScriptedCanvas([5, 6, 9, 7, 8, 3, 3, 3])
    prompt = [11, 12]
    params = cv.CanvasParams(gen_length=8)
    out = cv.generate(denoiser, [prompt], params, eos_ids=[2, 9], pad_id=0)
    assert out.sequences[0].tolist() == [5, 6, 9, 0, 0, 0, 0, 0]
    assert (int(out.nfe[0]), int(out.encoder_passes[0]), int(out.blocks[0])) == (1, 1, 1)
    out = cv.generate(denoiser, [prompt], params, eos_ids=[2], pad_id=0)
    assert out.sequences[0].tolist() == [5, 6, 9, 7, 8, 3, 3, 3]
    assert (int(out.nfe[0]), int(out.encoder_passes[0])) == (2, 2)


# ----------------------------------------------------------------------------- cancelled queued requests

def test_a_cancelled_queued_request_gives_its_queue_place_back():
    loaded = scripted_loaded(default="x" * 32)
    params = SamplingParams(gen_length=8, steps=8)

    async def main():
        batcher = Batcher(loaded, max_batch_size=1, max_queue=1)
        running = batcher.submit([RowRequest([5], params)])
        batcher.run_once()
        queued = batcher.submit([RowRequest([6], params)])
        with pytest.raises(QueueFull):
            batcher.submit([RowRequest([7], params)])
        queued.cancel()
        assert queued.is_cancelled(0) and not running.is_cancelled(0)
        batcher.run_once()
        assert batcher.stats() == {"active_rows": 1, "waiting_requests": 0, "draining": False}
        late = batcher.submit([RowRequest([7], params)])  # the cancelled request's place
        for _ in range(16):
            batcher.run_once()
        await settle()
        return [[e.ids for e in drain_events(h) if isinstance(e, RowUpdate) and e.finished]
                for h in (running, queued, late)]

    running, queued, late = asyncio.run(main())
    assert (len(running), queued, len(late)) == (1, [], 1)


def test_cancelling_one_choice_of_a_queued_request_leaves_the_others_queued():
    """A free slot goes to the first choice not cancelled (choice 0 never runs, not even for one pass)."""
    loaded = scripted_loaded(default="x" * 32)
    params = SamplingParams(gen_length=4, steps=4)

    async def main():
        batcher = Batcher(loaded, max_batch_size=2, max_queue=4)
        running = batcher.submit([RowRequest([5], params)])
        batcher.run_once()
        queued = batcher.submit([RowRequest([6], params)] * 3)
        queued.cancel(choice=0)
        assert (queued.is_cancelled(0), queued.is_cancelled(1), queued.cancelled) == (True, False, False)
        batcher.run_once()
        assert [(s.handle, s.choice) for s in batcher._slots] == [(running, 0), (queued, 1)]
        assert batcher.stats()["waiting_requests"] == 1  # choice 2 still waits
        for _ in range(12):
            batcher.run_once()
        await settle()
        return [e.choice for e in drain_events(queued) if isinstance(e, RowUpdate) and e.finished]

    assert asyncio.run(main()) == [1, 2]


def test_step_events_name_each_token_on_its_own():
    """The texts of a step event's tokens: one per id, special tokens included; none for no ids."""
    loaded = scripted_loaded()

    async def main():
        from diffpo_serve.engine import Engine
        return Engine(loaded, None, ServerSettings())

    engine = asyncio.run(main())
    ids = loaded.encode("ab") + [EOS]
    assert engine.token_texts(ids) == ["a", "b", loaded.tokenizer.convert_ids_to_tokens(EOS)]
    assert engine.token_texts([]) == []


def test_output_constraints_are_a_400_naming_the_field():
    for extra, field in (({"guided_json": {"type": "object"}}, "guided_json"),
                         ({"response_format": {"type": "json_object"}}, "response_format")):
        e = refused(completion(**extra))
        assert (e.status, e.param, e.code) == (400, field, "unsupported_parameter")
        assert e.message.startswith(f"`{field}` is not supported by this diffusion server: it cannot constrain")


def test_chat_prompts_the_server_cannot_build_are_a_400_on_messages():
    from diffpo_serve.protocol import ChatCompletionRequest
    empty = ChatCompletionRequest(messages=[{"role": "user", "content": ""}])
    e = refused(empty)
    assert (e.status, e.param, e.message) == (400, "messages", "the prompt is empty: the last user message has no "
                                                               "content")
    loaded = scripted_loaded()
    loaded.tokenizer.chat_template = "{{ raise_exception('only user turns') }}"
    e = refused(ChatCompletionRequest(messages=[{"role": "user", "content": "a|"}]), loaded=loaded)
    assert (e.status, e.param) == (400, "messages")
    assert e.message.startswith("the model's chat template rejects these messages: ") and "only user turns" in e.message
