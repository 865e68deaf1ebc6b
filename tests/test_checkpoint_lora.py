"""LoRA checkpoints and the plain-model export (training/checkpoint.py, ``diffpo-train export``).

A LoRA run's checkpoint holds the adapters and the trainer state, never the base weights; the merged model is
written once, at the end of the run, and ``diffpo-train export`` writes it for any checkpoint. On a tiny native
LLaDA checkpoint (tests/test_family_llada.py's published layout, random weights): the checkpoint's files and
size, the export against base + B A alpha / r computed here, the export command against the run's own export at
the same step, and ``--resume`` of a LoRA run against an uninterrupted one.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffpo_serve.dllm.families.llada import LLaDAModelLM
from diffpo_serve.dllm.loading import load_model
from training import checkpoint, cli, rl, sft
from training.config import RLConfig, SFTConfig

import test_family_llada as llada_files
from test_rl_real_models import text_reward

R, ALPHA = 2, 8  # scaling alpha / r = 4
ADAPTED = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]  # LLaDA's, in each block


@pytest.fixture(autouse=True)
def _offline_and_reward(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(rl, "_reward", text_reward)  # spread within each group: the adapters get gradients


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny LLaDA wide enough (d = 64, MLP 128) that rank-2 adapters are a small part of it."""
    path = tmp_path_factory.mktemp("llada") / "base"
    llada_files.write_checkpoint(path, shards=2, d_model=64, mlp_hidden_size=128)
    return path


def cfg_for(base, out, **kw) -> RLConfig:
    return RLConfig(**{**dict(model=str(base), output_dir=str(out), tasks="sudoku", train_examples=8,
                              num_generations=4, prompts_per_step=2, num_iterations=1, max_steps=1, save_every=1,
                              lr=1e-2, gen_length=8, steps=4, lora_r=R, lora_alpha=ALPHA, beta=0.04,
                              temperature=1.0, seed=0, device="cpu", train="joint"), **kw})


def tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's safetensors files (sharded or not), adapters excluded."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        if file.name not in ("adapter_model.safetensors", "threshold_head.safetensors", "step_policy.safetensors"):
            out.update(load_file(file))
    return out


def assert_same_files(a, b, names):
    for name in names:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys(), name
        assert all(torch.equal(x[k], y[k]) for k in x), name


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """Four joint (model + threshold head) LoRA runs: ``one`` ends after step 1, ``two`` after step 2 (saving
    at both), ``killed`` is killed right after its first checkpoint (2 steps planned), ``resumed`` is that run
    resumed to its end. Each records the steps (1-based) of its saves and exports."""
    root = tmp_path_factory.mktemp("runs")
    events = []
    real_save, real_export = rl.save_checkpoint, rl.export_model
    mp = pytest.MonkeyPatch()
    mp.setattr(rl, "_reward", text_reward)
    mp.setattr(rl, "save_checkpoint", lambda *a, **kw: (events.append(("save", kw["step"] + 1)),
                                                        real_save(*a, **kw))[1])
    mp.setattr(rl, "export_model", lambda *a, **kw: (events.append(("export", None)), real_export(*a, **kw))[1])
    try:
        result = {}
        for name, kw in [("one", dict(max_steps=1)), ("two", dict(max_steps=2))]:
            events.clear()
            result[name] = rl.train_rl(cfg_for(base, root / name, **kw))
            result[name + "_events"] = list(events)

        def save_then_die(*a, **kw):
            real_save(*a, **kw)
            raise KeyboardInterrupt

        mp.setattr(rl, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            rl.train_rl(cfg_for(base, root / "killed", max_steps=2))
        shutil.copytree(root / "killed", root / "killed_copy")  # the checkpoint of step 1, before resuming
        mp.setattr(rl, "save_checkpoint", real_save)
        result["resumed"] = rl.train_rl(cfg_for(base, root / "killed", max_steps=2, resume=True))
        result["root"] = root
        return result
    finally:
        mp.undo()


def test_a_lora_checkpoint_holds_adapters_and_trainer_state_only(runs, base):
    """Saved at steps 1 and 2, exported once after the last save; the checkpoint has no base weights and is a
    few percent of the model."""
    assert runs["two_events"] == [("save", 1), ("save", 2), ("export", None)]
    ckpt = runs["root"] / "two" / "checkpoint"
    files = {p.name for p in ckpt.iterdir()}
    assert {p.name for p in ckpt.glob("*.safetensors")} == {"adapter_model.safetensors", "threshold_head.safetensors"}
    assert {"adapter_config.json", "lora_base.json", "trainer_state.pt", "step.json"} <= files
    assert not any(name.startswith("model") for name in files)  # no model.safetensors / shards / index
    adapters = load_file(ckpt / "adapter_model.safetensors")
    assert len(adapters) == 2 * len(ADAPTED) * 2 and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert json.loads((ckpt / "lora_base.json").read_text()) == {"model": str(base.resolve()), "dtype": None}
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))  # 91k float32
    # the adapters: 2 layers x (4 x 2 (64 + 64) + 3 x 2 (64 + 128)) = 4,352 float32, 6% of the model
    assert (ckpt / "adapter_model.safetensors").stat().st_size < 0.07 * model_bytes
    # everything, with the adapters' AdamW moments and the threshold head (as big as this tiny model's adapters)
    # and its optimiser: under half the model, where a merged copy alone would be all of it
    assert sum(p.stat().st_size for p in ckpt.iterdir()) < 0.5 * model_bytes
    assert checkpoint.is_lora_checkpoint(ckpt) and not checkpoint.is_lora_checkpoint(base)


def test_the_final_export_is_base_plus_merged_adapters_by_hand(runs, base, monkeypatch):
    """W + B A alpha / r for each of the 14 adapted projections, every other tensor the base's, under the
    published names; it loads natively (peft unimportable) with its threshold head."""
    out, ckpt = runs["root"] / "two", runs["root"] / "two" / "checkpoint"
    adapters, before, after = load_file(ckpt / "adapter_model.safetensors"), tensors(base), tensors(out)
    assert after.keys() == before.keys()
    adapted = 0
    for name, w in before.items():
        module = "base_model.model." + name.removesuffix(".weight")
        if module + ".lora_A.weight" not in adapters:
            assert torch.equal(after[name], w), name
            continue
        a, b = adapters[module + ".lora_A.weight"], adapters[module + ".lora_B.weight"]
        assert a.shape[0] == b.shape[1] == R and b.abs().sum() > 0  # trained: B moved from 0
        torch.testing.assert_close(after[name], w + b @ a * (ALPHA / R), rtol=0, atol=1e-6)
        assert not torch.equal(after[name], w)
        adapted += 1
    assert adapted == 2 * len(ADAPTED)
    assert not (out / "adapter_config.json").exists()
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # `import peft` now fails
    loaded = load_model(out)
    assert type(loaded.model) is LLaDAModelLM and loaded.threshold_head is not None
    assert_same_files(out, ckpt, ["threshold_head.safetensors"])


def test_the_export_command_on_an_intermediate_checkpoint_is_that_steps_export(runs, tmp_path, capsys):
    """`diffpo-train export` on the checkpoint of step 1 of a 2-step run (killed after it) writes exactly what a
    1-step run exported at its end: merged weights, threshold head, tokenizer."""
    ckpt = runs["root"] / "killed_copy" / "checkpoint"
    assert json.loads((ckpt / "step.json").read_text()) == {"step": 0}
    assert cli.main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "exported")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "exported")
    exported, in_run = tensors(tmp_path / "exported"), tensors(runs["root"] / "one")
    assert exported.keys() == in_run.keys() and all(torch.equal(exported[k], in_run[k]) for k in exported)
    assert_same_files(tmp_path / "exported", runs["root"] / "one", ["threshold_head.safetensors"])
    tokenizer = (runs["root"] / "one" / "tokenizer.json").read_text()
    assert (tmp_path / "exported" / "tokenizer.json").read_text() == tokenizer
    two = tensors(runs["root"] / "two")
    assert not all(torch.equal(exported[k], two[k]) for k in exported)  # step 1's model, not the last one


def test_a_resumed_lora_run_ends_where_an_uninterrupted_one_does(runs):
    """Killed after its step-1 checkpoint (adapters + AdamW state) and resumed: the adapters, the merged export
    and the head equal those of the run that was never stopped."""
    resumed, straight = runs["resumed"].model, runs["two"].model
    a = {n: p for n, p in resumed.named_parameters() if "lora_" in n}
    b = {n: p for n, p in straight.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and len(a) == 4 * len(ADAPTED)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    x, y = tensors(runs["root"] / "killed"), tensors(runs["root"] / "two")
    for name in x:
        torch.testing.assert_close(x[name], y[name], rtol=1e-5, atol=1e-6)
    head_a = load_file(runs["root"] / "killed" / "threshold_head.safetensors")
    head_b = load_file(runs["root"] / "two" / "threshold_head.safetensors")
    for name in head_a:
        torch.testing.assert_close(head_a[name], head_b[name], rtol=1e-5, atol=1e-6)


def test_export_of_a_moved_base_needs_base_model(runs, base, tmp_path, capsys):
    """The base named in lora_base.json is gone: the error names it and --base-model; given its new place,
    the export is the same."""
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(runs["root"] / "two" / "checkpoint", ckpt)
    (ckpt / "lora_base.json").write_text(json.dumps({"model": str(tmp_path / "gone"), "dtype": None}))
    assert cli.main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt}: the base model of its adapters: {tmp_path / 'gone'}: model directory does not exist" in err
    assert "--base-model" in err
    assert cli.main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "x"),
                     "--base-model", str(base)]) == 0
    x, two = tensors(tmp_path / "x"), tensors(runs["root"] / "two")
    assert all(torch.equal(x[k], two[k]) for k in two)


@pytest.mark.parametrize("args, message", [
    (["--output", "somewhere"], "--checkpoint and --output are both required"),
    (["--checkpoint", "CKPT", "--output", "CKPT"], "the output would overwrite the checkpoint"),
    (["--checkpoint", "NOWHERE", "--output", "OUT"], "NOWHERE: no checkpoint directory"),
])
def test_export_refuses_bad_arguments_by_name(tmp_path, capsys, args, message):
    (tmp_path / "CKPT").mkdir()
    args = [str(tmp_path / a) if a in ("CKPT", "NOWHERE", "OUT") else a for a in args]
    assert cli.main(["export", *args]) == 2
    assert message.replace("NOWHERE", str(tmp_path / "NOWHERE")) in capsys.readouterr().err


def test_lora_base_file_errors_name_the_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match=r"lora_base.json: missing.*--base-model"):
        checkpoint.read_lora_base(tmp_path)
    (tmp_path / "lora_base.json").write_text('{"dtype": "bfloat16"}')
    with pytest.raises(checkpoint.CheckpointError, match=r"lora_base.json: expected"):
        checkpoint.read_lora_base(tmp_path)


def test_export_of_a_full_checkpoint_is_the_runs_model(tmp_path):
    """Without LoRA (here sft) the checkpoint holds the weights: the export command writes them unchanged, equal
    to the model the run wrote at its end; --base-model is refused for it."""
    cfg = SFTConfig(output_dir=str(tmp_path / "sft"), tasks="sudoku", train_examples=32, max_steps=2, batch_size=4,
                    save_every=2, log_every=1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    out = sft.train_sft(cfg)
    assert checkpoint.export_checkpoint(out / "checkpoint", tmp_path / "x") == tmp_path / "x"
    assert_same_files(tmp_path / "x", out, ["model.safetensors"])
    with pytest.raises(checkpoint.CheckpointError, match="holds full weights, not LoRA adapters"):
        checkpoint.export_checkpoint(out / "checkpoint", tmp_path / "y", base_model=str(tmp_path))


def test_a_bf16_lora_checkpoint_exports_in_the_dtype_it_trained_in(base, tmp_path):
    """--dtype bfloat16: lora_base.json records it, and the export command merges into a bf16 base as the run
    did: the same bf16 tensors (a float32 base would give float32 ones, rounded differently)."""
    rl.train_rl(cfg_for(base, tmp_path / "run", dtype="bfloat16", train="model"))
    ckpt = tmp_path / "run" / "checkpoint"
    assert json.loads((ckpt / "lora_base.json").read_text())["dtype"] == "bfloat16"
    checkpoint.export_checkpoint(ckpt, tmp_path / "x")
    in_run, exported = tensors(tmp_path / "run"), tensors(tmp_path / "x")
    assert {v.dtype for v in in_run.values()} == {torch.bfloat16}
    assert exported.keys() == in_run.keys() and all(torch.equal(exported[k], in_run[k]) for k in in_run)
