"""DiffusionGemma through load_model (diffpo_serve/dllm/families/diffusion_gemma.py): a tiny random checkpoint
saved by transformers itself (tests/tiny_diffusion_gemma.py) loads with transformers' own class, its tokenizer,
chat template and special ids; its denoiser batches rows whose caches differ in length."""

import json

import pytest
import torch
from tiny_diffusion_gemma import BOS, EOS, IMAGE, PAD, TURN_END, random_model, write_checkpoint
from transformers import DiffusionGemmaForBlockDiffusion

from diffpo_serve.dllm import canvas
from diffpo_serve.dllm.families import diffusion_gemma as dg
from diffpo_serve.dllm.loading import ModelLoadError, load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("dgemma") / "tiny-diffusiongemma", random_model(seed=3))


def test_load_model_reads_the_published_layout(checkpoint):
    loaded = load_model(checkpoint)
    assert type(loaded.model) is DiffusionGemmaForBlockDiffusion  # transformers' own class, no remote code
    assert loaded.paradigm == "canvas" and loaded.mask_id == dg.NO_MASK
    # every EOS: the text config's <eos>, then the chat template's turn end; pad from the text config
    assert loaded.eos_ids == (EOS, TURN_END) and loaded.pad_id == PAD
    assert loaded.max_length == 512  # the text config's max_position_embeddings
    assert not loaded.model.training
    # the weights round-trip exactly, and the loaded model's decoder logits are the saved model's (to rounding:
    # the loaded tensors' memory layout may differ, which changes the matmuls' summation order)
    saved = random_model(seed=3)
    loaded_state = loaded.model.state_dict()
    assert all(torch.equal(v, loaded_state[k]) for k, v in saved.state_dict().items())
    original = dg.canvas_denoiser(saved)
    ours = canvas.denoiser_for(loaded.model)
    prompt = torch.tensor([BOS, 9, 10, 11, 12])
    z = torch.tensor([[7, 8, 9, 10, 11, 12, 13, 14]])
    a = original.decode(z, torch.tensor([5]), [original.encode(prompt, 0, None)], None)
    b = ours.decode(z, torch.tensor([5]), [ours.encode(prompt, 0, None)], None)
    assert a.shape == (1, 8, 64)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_tokenizer_and_chat_template(checkpoint):
    loaded = load_model(checkpoint)
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi 12"}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
    assert loaded.tokenizer.decode(ids) == "<bos><|turn>user\nhi 12<turn|>\n<|turn>model\n"
    text, ended = loaded.decode(loaded.encode("ab c") + [TURN_END, 7, 8])
    assert (text, ended) == ("ab c", True)  # Gemma 4's turn end stops a reply like <eos>


def test_without_chat_template_only_the_eos(tmp_path):
    loaded = load_model(write_checkpoint(tmp_path / "plain", random_model(), chat_template=False))
    assert loaded.eos_ids == (EOS,)


def test_generation_config_sets_the_canvas_defaults(tmp_path):
    path = write_checkpoint(tmp_path / "gen", random_model(), generation={
        "max_new_tokens": 32, "max_denoising_steps": 12, "t_min": 0.3, "t_max": 0.9, "stability_threshold": 2,
        "confidence_threshold": 0.01, "sampler_config": {"entropy_bound": 0.25, "_cls_name": "EntropyBoundSamplerConfig"},
        "eos_token_id": [EOS, 33]})
    loaded = load_model(path)
    assert canvas.denoiser_for(loaded.model).defaults == {
        "gen_length": 32, "steps": 12, "threshold": 0.25, "t_min": 0.3, "t_max": 0.9, "stability_threshold": 2,
        "confidence_threshold": 0.01}
    assert loaded.eos_ids == (EOS, 33, TURN_END)  # the generation config's EOS list comes first


def test_transformers_defaults_without_a_generation_config():
    assert dg.canvas_defaults(random_model().generation_config) == {
        "gen_length": 256, "steps": 48, "threshold": 0.1, "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1,
        "confidence_threshold": 0.005}


def test_compile_is_refused_before_loading(checkpoint):
    with pytest.raises(ModelLoadError, match="compile is supported for masked models only"):
        load_model(checkpoint, compile=True)


def test_missing_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    path = write_checkpoint(tmp_path / "broken", random_model())
    state = load_file(str(path / "model.safetensors"))
    name = next(k for k in state if "self_conditioning" in k)  # not tied to anything: truly missing
    del state[name]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing from the checkpoint"):
        load_model(path)


def test_image_prompts_and_empty_prompts_are_refused():
    denoiser = dg.canvas_denoiser(random_model())
    with pytest.raises(ValueError, match="image inputs are not supported"):
        canvas.init_state(denoiser, [[BOS, IMAGE, 7]], canvas.CanvasParams(gen_length=8), eos_ids=[EOS], pad_id=PAD)
    with pytest.raises(ValueError, match="at least one token"):
        canvas.init_state(denoiser, [[]], canvas.CanvasParams(gen_length=8), eos_ids=[EOS], pad_id=PAD)


def test_batched_decode_masks_the_padded_cache():
    """Rows whose caches differ in length (one prompt longer than the sliding window: its sliding layer keeps 7
    entries, its full layer all 13) decode in one pass to the logits each gets alone."""
    denoiser = dg.canvas_denoiser(random_model(seed=1))
    prompts = [torch.tensor([BOS, 9]), torch.arange(6, 19), torch.tensor([BOS, 9, 10, 11, 12])]
    caches = [denoiser.encode(p, 0, None) for p in prompts]
    assert [c.layers[0].keys.shape[-2] for c in caches] == [2, 7, 5]  # sliding_window 8 keeps 7
    assert [c.layers[1].keys.shape[-2] for c in caches] == [2, 13, 5]
    z = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    start = torch.tensor([len(p) for p in prompts])
    sc = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(1))
    has = torch.tensor([True, False, True])
    together = denoiser.decode(z, start, caches, sc, has)
    for i in range(3):
        alone = denoiser.decode(z[i:i + 1], start[i:i + 1], [caches[i]], sc[i:i + 1] if has[i] else None)
        torch.testing.assert_close(together[i], alone[0], rtol=0, atol=1e-5)
    # the padding is really masked: unmasked zero keys would change the short row's logits
    masked = denoiser._merged(caches, 8)[1]
    assert all(m is not None and m.dtype == torch.bool for m in masked.values())
    # and self-conditioning matters: the same row without it decodes differently
    without = denoiser.decode(z[:1], start[:1], caches[:1], None)
    assert (without[0] - together[0]).abs().max() > 1e-3


def test_the_masked_sampler_refuses_it_clearly(checkpoint):
    """The masked sampler (eval, RL rollouts of masked models) refuses its mask-less ids, naming what to use
    instead. (The server serves it through the canvas paradigm: tests/test_server_canvas.py.)"""
    from diffpo_serve.dllm.sampler import SamplingParams, init_state
    loaded = load_model(checkpoint)
    with pytest.raises(ValueError, match="needs a mask token.*dllm.canvas"):
        init_state([[BOS, 9]], SamplingParams(), mask_id=loaded.mask_id, eos_id=loaded.eos_id, pad_id=loaded.pad_id)
