"""``diffpo-train rl`` on native LLaDA and Dream checkpoints (training/rl.py): LoRA on the family's declared
projections, gradient checkpointing, bf16 weights, the adapters-off KL reference, the merged export, the
chat-template rollout lengths, and DDP over two CPU processes.

The checkpoints are the tiny published-layout ones of tests/test_family_llada.py and tests/test_family_dream.py
(random weights, nothing downloaded). Their rollouts decode gibberish, so the task reward would be 0 for every
row and every advantage 0; the trainer's reward is replaced by a deterministic function of the text
(:func:`text_reward`) so that groups have spread and the adapters receive gradients.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffpo_serve.dllm.families.dream import DreamModel
from diffpo_serve.dllm.families.llada import LLaDAModelLM
from diffpo_serve.dllm.forward import model_logits
from diffpo_serve.dllm.loading import load_model, transformer_layers
from training import rl
from training.config import RLConfig
from training.prompting import CHAT_BLOCK_LENGTH, CHAT_GEN_LENGTH
from training.tasks import get_task

import test_family_dream as dream_files
import test_family_llada as llada_files

import peft  # noqa: E402,F401  (the train extra; a missing install must fail these tests, not skip them)


def text_reward(text: str, example: dict) -> float:
    """A reward with spread inside a group: the text's code points summed, mod 3, in {0, 0.5, 1}."""
    return float(sum(map(ord, text)) % 3) / 2


@pytest.fixture(autouse=True)
def _offline_and_reward(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(rl, "_reward", text_reward)


def llada_checkpoint(path: Path) -> Path:
    llada_files.write_checkpoint(path, shards=2)
    return path


def dream_checkpoint(path: Path, dtype=torch.float32) -> Path:
    return dream_files.write_checkpoint(path, dream_files.random_model(seed=1, init=0.1), dtype=dtype, shards=2)


CHECKPOINTS = {"llada": llada_checkpoint, "dream": dream_checkpoint}
NATIVE_CLASS = {"llada": LLaDAModelLM, "dream": DreamModel}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    return {name: make(root / name) for name, make in CHECKPOINTS.items()}


def cfg_for(model: Path, out: Path, **kw) -> RLConfig:
    base = dict(model=str(model), output_dir=str(out), tasks="sudoku", train_examples=8, num_generations=4,
                prompts_per_step=2, num_iterations=2, max_steps=1, save_every=1, lr=1e-2, gen_length=8, steps=4,
                lora_r=4, lora_alpha=8, gradient_checkpointing=True, beta=0.04, temperature=1.0, seed=0,
                device="cpu")
    return RLConfig(**{**base, **kw})


def padded_batch(vocab: int, mask_id: int):
    """Two rows, the second left-padded by 3: (ids, attention)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, vocab, (2, 9), generator=g)
    ids[:, -3:] = mask_id
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[1, :3] = False
    return ids, attention


def count_checkpointed_calls(monkeypatch) -> list[int]:
    """Spy on rl.enable_gradient_checkpointing: counts every recomputation-wrapped layer call."""
    calls, original = [0], rl.enable_gradient_checkpointing

    def spy(model, path):
        original(model, path)
        for layer in transformer_layers(model).values():
            func = layer._gradient_checkpointing_func

            def counted(*args, _func=func, **kw):
                calls[0] += 1
                return _func(*args, **kw)
            layer._gradient_checkpointing_func = counted
    monkeypatch.setattr(rl, "enable_gradient_checkpointing", spy)
    return calls


# ----------------------------------------------------------------------------- LoRA + gradient checkpointing


@pytest.mark.parametrize("algo", ["d1", "diffpo"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_lora_checkpointed_step_changes_only_the_adapters(checkpoints, tmp_path, monkeypatch, family, algo):
    calls = count_checkpointed_calls(monkeypatch)
    original = load_model(checkpoints[family])
    run = rl.train_rl(cfg_for(checkpoints[family], tmp_path / "out", algo=algo))
    peft_model = run.model
    inner = peft_model.base_model.model
    assert type(inner) is NATIVE_CLASS[family]
    layers = transformer_layers(inner)
    assert len(layers) == 2 and all(layer.gradient_checkpointing for layer in layers.values())
    # one checkpointed call per layer per forward with gradients (2 inner steps x 2 layers); the no-grad
    # passes (rollouts, old and reference log-probs) run the layers as they are
    assert calls[0] == 2 * 2

    base_state = original.model.state_dict()
    trained = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    for name, value in inner.state_dict().items():  # every base tensor bit-identical
        if "lora_" not in name:
            assert torch.equal(value, base_state[name.replace(".base_layer", "")]), name
    # adapters start as B = 0 (and A random); after two AdamW steps on a non-zero loss both have moved
    assert all(float(p.abs().sum()) > 0 for n, p in trained.items() if ".lora_B." in n)
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["grad_norm"] > 0 and records[-1]["reward"] > 0

    # the KL reference is the same model with adapters off: exactly the original weights' logits
    ids, attention = padded_batch(60, original.mask_id)
    with torch.no_grad():
        ref = model_logits(rl.AdaptersOff(peft_model), ids, attention)
        base = model_logits(original.model, ids, attention)
        adapted = model_logits(peft_model, ids, attention)
    assert torch.equal(ref[attention], base[attention])
    assert not torch.allclose(adapted[attention], base[attention])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_lora_adapts_exactly_the_family_projections(checkpoints, family):
    loaded = load_model(checkpoints[family])
    wrapped = rl._wrap_lora(loaded.model, RLConfig(lora_r=2))
    adapted = sorted({n.split(".lora_A.")[0].removeprefix("base_model.model.")
                      for n, _ in wrapped.named_parameters() if ".lora_A." in n})
    if family == "llada":
        names = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
        expected = [f"model.transformer.blocks.{i}.{m}" for i in range(2) for m in names]
    else:
        names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]
        expected = [f"model.layers.{i}.{m}" for i in range(2) for m in names]
    assert adapted == sorted(expected)  # neither the embedding nor the output layer


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_lora_step_trains_float32_adapters(checkpoints, tmp_path, family):
    run = rl.train_rl(cfg_for(checkpoints[family], tmp_path / "out", dtype="bfloat16", algo="diffpo"))
    inner = run.model.base_model.model
    original = load_model(checkpoints[family], dtype="bfloat16").model.state_dict()
    dtypes = {("lora_" in n, p.dtype) for n, p in run.model.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    for name, value in inner.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, original[name.replace(".base_layer", "")]), name
    lora_b = [p for n, p in run.model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(float(p.abs().sum()) > 0 for p in lora_b)
    state = torch.load(tmp_path / "out" / "checkpoint" / "trainer_state.pt", weights_only=False)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert len(moments) == len(list(run.model.parameters())) - len(original)  # one per adapter tensor
    assert all(m.dtype == torch.float32 for m in moments)  # AdamW's state follows the float32 adapters


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_export_merges_lora_into_a_natively_loadable_checkpoint(checkpoints, tmp_path, family):
    out = tmp_path / "out"
    run = rl.train_rl(cfg_for(checkpoints[family], out, algo="d1"))
    merged = copy.deepcopy(run.model).merge_and_unload().eval()
    exported = load_model(out)  # native again: no peft, no remote code
    assert type(exported.model) is NATIVE_CLASS[family]
    original = load_model(checkpoints[family]).model.state_dict()
    assert set(exported.model.state_dict()) == set(original)  # the published names, no lora_ tensors
    ids, attention = padded_batch(60, exported.mask_id)
    with torch.no_grad():
        from_disk = model_logits(exported.model, ids, attention)
        in_memory = model_logits(merged, ids, attention)
        before = model_logits(load_model(checkpoints[family]).model, ids, attention)
    assert torch.equal(from_disk[attention], in_memory[attention])
    assert not torch.allclose(from_disk[attention], before[attention])  # the adapters were merged in


# ----------------------------------------------------------------------------- rollout lengths


def test_rollout_lengths_follow_eval_for_chat_models(checkpoints):
    chat, plain = load_model(checkpoints["dream"]), load_model(checkpoints["llada"])
    assert chat.tokenizer.chat_template and not getattr(plain.tokenizer, "chat_template", None)
    sudoku = get_task("sudoku").GEN_LENGTH
    assert rl.rollout_lengths(RLConfig(tasks="sudoku"), chat) == (CHAT_GEN_LENGTH, CHAT_BLOCK_LENGTH) == (256, 32)
    assert rl.rollout_lengths(RLConfig(tasks="sudoku", gen_length=8), chat) == (8, 8)
    assert rl.rollout_lengths(RLConfig(tasks="sudoku", gen_length=64, block_length=16), chat) == (64, 16)
    assert rl.rollout_lengths(RLConfig(tasks="sudoku", chat_template=False), chat) == (sudoku, None)
    assert rl.rollout_lengths(RLConfig(tasks="sudoku"), plain) == (sudoku, None)
    countdown = get_task("countdown").GEN_LENGTH
    assert rl.rollout_lengths(RLConfig(tasks="sudoku,countdown"), plain) == (max(sudoku, countdown), None)


@pytest.mark.parametrize("family,steps,expected", [("dream", None, 4), ("dream", 8, 8), ("llada", None, 8)])
def test_rollout_steps_are_half_the_length_through_a_chat_template(checkpoints, tmp_path, monkeypatch, family,
                                                                   steps, expected):
    """d1's rollouts decode 256 tokens in 128 passes: a chat model's steps sampler defaults to half the length
    (the Dream checkpoint has a chat template, the LLaDA one not); --steps overrides it."""
    seen = []
    real = rl.rollout

    def spy(model, loaded, examples, reward_fn, g, params, *args, **kw):
        seen.append(params)
        return real(model, loaded, examples, reward_fn, g, params, *args, **kw)
    monkeypatch.setattr(rl, "rollout", spy)
    rl.train_rl(cfg_for(checkpoints[family], tmp_path / "out", steps=steps, block_length=8, lora_r=0,
                        gradient_checkpointing=False, num_iterations=1))
    assert [(p.gen_length, p.steps) for p in seen] == [(8, expected)]
    assert rl.default_steps(True, 256) == 128 and rl.default_steps(True, 256, 64) == 64
    assert rl.default_steps(False, 16) is None and rl.default_steps(True, 1) == 1


@pytest.mark.parametrize("family,extra,expected", [("dream", [], 4), ("dream", ["--steps", "8"], 8),
                                                    ("dream", ["--no-chat-template"], 8), ("llada", [], 8)])
def test_eval_steps_are_half_the_length_through_a_chat_template(checkpoints, capsys, family, extra, expected):
    """d1's evaluation setting: a chat model's steps sampler decodes in half the length's passes."""
    import json
    from training.cli import main
    assert main(["eval", "--model", str(checkpoints[family]), "--task", "sudoku", "--limit", "2", "--gen-length", "8",
                 "--block-length", "8", "--device", "cpu", *extra]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["steps"], summary["mean_nfe"]) == (expected, expected)


def test_gradient_checkpointing_refused_by_name_for_a_model_without_it(tmp_path):
    class Plain(torch.nn.Module):
        supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match="/some/model: Plain does not support gradient checkpointing"):
        rl.enable_gradient_checkpointing(Plain(), "/some/model")


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow  # about 40 s on two shared CPU cores (two processes each importing torch and transformers)
def test_two_processes_train_the_same_adapters(checkpoints, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) with LoRA and gradient checkpointing on
    native LLaDA: each rank decodes its own rollouts, and both end with identical adapters."""
    script = Path(__file__).with_name("ddp_worker.py")
    overrides = dict(lora_r=4, lora_alpha=8, gradient_checkpointing=True, gen_length=8, steps=4, max_steps=1,
                     save_every=1, num_iterations=2, temperature=1.0)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           str(checkpoints["llada"]), str(tmp_path / "ddp"), json.dumps(overrides), "text-reward"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["adapters"] == ranks[1]["adapters"]
    assert ranks[0]["checksums"] == ranks[1]["checksums"]
    lora_b = {n: v for n, v in ranks[0]["adapters"].items() if ".lora_B." in n}
    assert len(lora_b) == 14 and all(v != 0 for v in lora_b.values())
    assert ranks[0]["rollout_texts"] != ranks[1]["rollout_texts"]  # the ranks did see different rollouts


def test_fsdp_config_parses_and_wraps_each_family_by_its_layer_classes():
    """docs/accelerate_fsdp.yaml (documented, not run: accelerate's FSDP needs a GPU) is a valid accelerate
    config that names no layer class, so accelerate wraps each model's ``_no_split_modules``."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    config = load_config_from_file(str(Path(__file__).parents[1] / "docs" / "accelerate_fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    assert fsdp["fsdp_use_orig_params"] is True and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert LLaDAModelLM._no_split_modules == ["LLaDALlamaBlock"]
    assert DreamModel._no_split_modules == ["DreamDecoderLayer"]
