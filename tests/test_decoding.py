"""The core's decoder interface (diffpo_serve/dllm/decoding.py): knobs -> validated params with a ValueError naming
the knob, the paradigm-specific rules callers no longer branch on (seeds, reproducible decodes, NFE_max, reports),
and ``generate`` / ``explore`` returning one result type. The server's mapping of these errors onto 400s is
pinned by the server tests; the decoded tokens by tests/test_golden_outputs.py."""

from __future__ import annotations

import pytest
import torch
from tiny_diffusion_gemma import random_model, write_checkpoint

from diffpo_serve.dllm import canvas, sampler
from diffpo_serve.dllm.decoding import CanvasDecoder, KnobError, Knobs, MaskedDecoder, decoder_for
from diffpo_serve.dllm.loading import load_model

GENERATION = {"max_new_tokens": 16, "max_denoising_steps": 3}


@pytest.fixture(scope="module")
def masked_model(model_path):
    return load_model(model_path)


@pytest.fixture(scope="module")
def canvas_model(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("dec") / "tiny-dg", random_model(seed=3), generation=GENERATION)
    return load_model(path)


@pytest.mark.parametrize("knobs, param, code", [
    (Knobs(t_max=0.5), "t_max", "unsupported_parameter"),  # a canvas-only knob
    (Knobs(sampler="policy"), "sampler", "unsupported_sampler"),  # no step policy in this model
    (Knobs(block_length=-1), "block_length", None),
    (Knobs(sampler="steps", steps=3, block_length=2), "steps", None),  # 3 passes over 4 blocks
    (Knobs(top_p=0), "top_p", None),
])
def test_masked_knobs_are_refused_naming_the_knob(masked_model, knobs, param, code):
    with pytest.raises(KnobError) as e:
        decoder_for(masked_model).params_for(knobs, 8)
    assert isinstance(e.value, ValueError) and (e.value.param, e.value.code) == (param, code)


def test_masked_params_defaults_seed_and_nfe(masked_model):
    decoder = decoder_for(masked_model)
    assert isinstance(decoder, MaskedDecoder) and decoder.masks and decoder.tempered and decoder.block_length is None
    greedy = decoder.params_for(Knobs(seed=5), 8)
    assert (greedy.sampler, greedy.temperature, greedy.top_p, greedy.cache, greedy.seed) == ("steps", 0.0, 1.0,
                                                                                            "off", None)
    sampled = decoder.params_for(Knobs(temperature=0.7, seed=5), 8)
    assert (sampled.temperature, sampled.seed) == (0.7, 5)  # only a decode that draws keeps its seed
    assert decoder.reproducible(sampled) == greedy
    assert decoder.max_nfe(sampled) == 8
    steps = decoder.resolve(decoder.params_for(Knobs(sampler="steps", steps=4, block_length=4), 8))
    assert decoder.summary(steps) == {"block_length": 4, "steps": 4, "cache": "off"}
    eb = decoder.resolve(decoder.params_for(Knobs(sampler="eb", steps=4), 8))
    assert decoder.summary(eb) == {"block_length": 8, "steps": None, "cache": "off"}


def test_masked_generate_is_the_samplers(masked_model):
    decoder = decoder_for(masked_model)
    params = decoder.params_for(Knobs(sampler="confidence", threshold=0.5), 6)
    out = decoder.generate([[5, 6, 7], [8]], params)
    m = masked_model
    ref = sampler.generate(m.model, [[5, 6, 7], [8]], params, mask_id=m.mask_id, eos_id=m.eos_id, eos_ids=m.eos_ids,
                           pad_id=m.pad_id)
    assert out.rows() == ref.sequences.tolist() and out.nfe.tolist() == ref.nfe.tolist()
    assert out.encoder_passes is None and out.commit_step is None
    explored = decoder.explore(m.model, [[5, 6, 7]], [params], None, None)
    assert explored.commit_step is not None and explored.logprob is not None and explored.policy_trace is None


@pytest.mark.parametrize("knobs, param", [
    (Knobs(sampler="steps"), "sampler"), (Knobs(sampler="learned"), "sampler"), (Knobs(block_length=4), "block_length"),
    (Knobs(cache="prefix"), "cache"), (Knobs(temperature=0.5), "temperature"), (Knobs(top_p=0.9), "top_p"),
    (Knobs(t_min=0.9, t_max=0.5), "t_min"), (Knobs(t_max=-1.0), "t_max"), (Knobs(steps=0), "steps"),
])
def test_canvas_knobs_are_refused_naming_the_knob(canvas_model, knobs, param):
    with pytest.raises(KnobError) as e:
        decoder_for(canvas_model).params_for(knobs, 8)
    assert e.value.param == param


def test_canvas_params_seed_nfe_and_results(canvas_model):
    decoder = decoder_for(canvas_model)
    assert isinstance(decoder, CanvasDecoder) and not decoder.masks and not decoder.tempered
    assert decoder.block_length == 8 and decoder.fallback_sampler() == "eb"
    params = decoder.params_for(Knobs(block_length=8, cache="off", top_p=1, seed=7), 20)
    assert (params.sampler, params.seed, params.steps) == ("eb", 7, None)
    assert decoder.reproducible(params).seed == 0
    assert decoder.max_nfe(params) == 3 * 3  # ceil(20 / 8) blocks of the checkpoint's 3 steps
    assert decoder.max_nfe(decoder.params_for(Knobs(steps=5), 20)) == 3 * 5
    resolved = decoder.resolve(params)
    assert decoder.summary(resolved) == {"block_length": 8, "steps": 3, "cache": "off"}
    out = decoder.generate([[5, 6, 7], [8]], [params, canvas.CanvasParams(gen_length=5, seed=1)])
    assert out.sequences.shape[1] == 20 and [len(r) for r in out.rows()] == [20, 5]  # cut at each length asked for
    assert out.encoder_passes.tolist() == [3, 1] and out.commit_step is None


@pytest.mark.parametrize("which", ["masked", "canvas"])
def test_select_keeps_just_those_rows_and_their_decode(which, masked_model, canvas_model):
    """Rows leave a batch through ``decoder.select`` (as the batcher drops finished and cancelled rows): the rows
    kept, in the order asked, decode to exactly what they decode to alone; a wrong index or order would not."""
    loaded = masked_model if which == "masked" else canvas_model
    decoder = decoder_for(loaded)
    knobs = Knobs(sampler="confidence", threshold=0.5) if which == "masked" else Knobs(block_length=8, top_p=1, seed=3)
    params = decoder.params_for(knobs, 8)
    prompts = [[5, 6, 7], [8], [9, 10]]
    state = decoder.init_state(prompts, [params] * 3)
    decoder.step(state)
    state = decoder.select(state, [2, 0])
    assert state.batch_size == 2
    while not bool(state.finished.all()):
        decoder.step(state)
    alone = decoder.generate([prompts[2], prompts[0]], [params, params])
    assert decoder.determined(state, torch.arange(2)) == alone.rows()
