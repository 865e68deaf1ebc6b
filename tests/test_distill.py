"""Self-distillation: which answers are kept, that they are the teacher's own, training and resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

import training.distill as distill
import training.sft as sft
from diffpo_serve.dllm.loading import load_model
from diffpo_serve.dllm.sampler import SamplingParams, generate
from training.cli import main as cli_main
from training.config import DistillConfig
from training.distill import DATA_FILE, select_answers, train_distill
from training.data import encode_examples
from training.sft import batch_loss
from training.tasks import DataFileError, get_task


def test_select_answers_by_hand():
    rows = {"countdown": [{"prompt": "a", "completion": "1+2", "reward": 1.0},
                          {"prompt": "b", "completion": "3", "reward": 0.1},
                          {"prompt": "c", "completion": "4*5", "reward": 1.0}],
            "sudoku": [{"prompt": f"s{i}", "completion": "x", "reward": r} for i, r in enumerate([1.0, 0.9, 1.0, 1.0])]}
    got = select_answers(rows, 1.0)
    # two correct countdown answers, so two of the three correct sudoku answers (the first ones)
    assert got == [{"task": "countdown", "prompt": "a", "answer": "1+2", "reward": 1.0},
                   {"task": "countdown", "prompt": "c", "answer": "4*5", "reward": 1.0},
                   {"task": "sudoku", "prompt": "s0", "answer": "x", "reward": 1.0},
                   {"task": "sudoku", "prompt": "s2", "answer": "x", "reward": 1.0}]
    assert [r["prompt"] for r in select_answers(rows, 0.0)] == ["a", "b", "c", "s0", "s1", "s2"]
    assert select_answers({"countdown": rows["countdown"], "sudoku": []}, 0.0) == []


def small_cfg(model_path, out, **kw):
    base = dict(output_dir=str(out), model=model_path, train_examples=24, min_reward=0.0, max_steps=6,
                batch_size=8, save_every=3, log_every=2, teacher_batch_size=16)
    return DistillConfig(**{**base, **kw})


def student_loss(model, loaded, rows, seed=0):
    """The masked-diffusion loss of ``model`` on the distilled rows at fixed masks."""
    encode = lambda s: loaded.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts, completions = encode_examples(encode, [r["prompt"] for r in rows], [r["answer"] for r in rows], 16,
                                           loaded.eos_id)
    with torch.no_grad():
        loss, *_ = batch_loss(model, prompts, torch.tensor(completions), torch.Generator().manual_seed(seed),
                              loaded.mask_id, loaded.pad_id, "masked_mean")
    return loss.item()


def test_distill_trains_on_the_teachers_own_full_step_answers(model_path, tmp_path):
    out = train_distill(small_cfg(model_path, tmp_path / "run", max_steps=30, lr=3e-3, save_every=30))
    rows = [json.loads(x) for x in (out / DATA_FILE).read_text().splitlines()]
    assert [r["task"] for r in rows] == ["sudoku"] * 24 + ["cd3"] * 24  # min_reward 0 keeps all, equal parts
    teacher_summary = json.loads((out / distill.TEACHER_FILE).read_text())

    # every kept answer is what the teacher decodes greedily at one token per pass, and its reward is the task's
    teacher = load_model(model_path)
    for name in ("sudoku", "cd3"):
        task = get_task(name)
        data = task.make_dataset("train", 24, 0)
        mine = [r for r in rows if r["task"] == name]
        assert [r["prompt"] for r in mine] == list(data["prompt"])
        res = generate(teacher.model, [teacher.encode(p) for p in data["prompt"]],
                       SamplingParams(sampler="steps", gen_length=16), mask_id=teacher.mask_id,
                       eos_id=teacher.eos_id, pad_id=teacher.pad_id)
        answers = [teacher.decode(s.tolist())[0] for s in res.sequences]
        assert [r["answer"] for r in mine] == answers
        rewards = [task.reward(a, ex) for a, ex in zip(answers, data)]
        assert [r["reward"] for r in mine] == rewards
        # the teacher's record: its accuracy (mean reward) and exact rate on these prompts, and what was kept
        record = teacher_summary["tasks"][name]
        assert record["prompts"] == 24 and record["kept"] == 24 and record["reward_at_least_min"] == 24
        assert record["accuracy"] == pytest.approx(sum(rewards) / 24)
        assert record["exact"] == pytest.approx(sum(r == 1.0 for r in rewards) / 24)

    # the student fits the teacher's answers better than the teacher did; it has no threshold head
    student = load_model(out)
    assert student.threshold_head is None
    before, after = student_loss(teacher.model, teacher, rows), student_loss(student.model, student, rows)
    assert after < 0.8 * before
    assert json.loads((out / "distill_config.json").read_text())["min_reward"] == 0.0


def test_resume_reads_the_teachers_answers_back(model_path, tmp_path, monkeypatch, kill_after_checkpoint):
    straight = train_distill(small_cfg(model_path, tmp_path / "straight"))
    disarm = kill_after_checkpoint(sft)
    with pytest.raises(KeyboardInterrupt):
        train_distill(small_cfg(model_path, tmp_path / "killed"))
    disarm()

    def no_teacher(cfg):
        raise AssertionError("the teacher ran again on resume")

    monkeypatch.setattr(distill, "teacher_answers", no_teacher)
    resumed = train_distill(small_cfg(model_path, tmp_path / "killed", resume=True))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_corrupt_data_file_is_named_on_resume(model_path, tmp_path):
    out = train_distill(small_cfg(model_path, tmp_path / "run", max_steps=3))
    data = out / DATA_FILE
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:3] + ['{"task": "sudoku", "prompt": 5}'] + lines[4:]) + "\n")
    with pytest.raises(DataFileError, match=r"distill_data.jsonl line 4: field 'prompt' must be str"):
        train_distill(small_cfg(model_path, tmp_path / "run", max_steps=6, resume=True))
    data.unlink()
    with pytest.raises(ValueError, match="distill_data.jsonl does not"):
        train_distill(small_cfg(model_path, tmp_path / "run", max_steps=6, resume=True))


def test_nothing_to_distill_is_a_clear_cli_error(model_path, tmp_path, capsys):
    # a random model solves no countdown prompt: at min_reward 1 nothing is kept
    code = cli_main(["distill", "--model", model_path, "--tasks", "countdown", "--train-examples", "16",
                     "--output-dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "diffpo-train distill: error: no teacher answer has reward >= 1.0" in err
    assert not (tmp_path / "run").exists()


def test_one_task_teacher_record_counts_its_own_kept_answers(model_path, tmp_path):
    """With one task, ``kept`` counts that task's rows (a comparison flipped to != would give 0; with two
    tasks in equal parts it would give the other task's count, the same number)."""
    from training.distill import TEACHER_FILE, teacher_answers
    cfg = small_cfg(model_path, tmp_path / "one", tasks="sudoku", train_examples=10)
    chosen = teacher_answers(cfg)
    record = json.loads((tmp_path / "one" / TEACHER_FILE).read_text())["tasks"]
    assert list(record) == ["sudoku"] and len(chosen) == 10
    assert record["sudoku"]["kept"] == 10 and record["sudoku"]["prompts"] == 10


def test_sft_config_passes_every_shared_option_through():
    """Each option distill shares with sft reaches the SFT run (an option added to both but not passed on
    would silently train with sft's default)."""
    import dataclasses
    from training.config import DistillConfig, SFTConfig
    from training.distill import sft_config
    shared = {f.name for f in dataclasses.fields(DistillConfig)} & {f.name for f in dataclasses.fields(SFTConfig)}
    assert {"targets", "cache_loss", "cache_loss_weight", "lr", "seed"} <= shared
    changed = {"model": "m", "tasks": "cd3", "train_examples": 7, "gen_length": 8, "max_steps": 9, "batch_size": 3,
               "lr": 0.5, "warmup_steps": 4, "weight_decay": 0.25, "max_grad_norm": 2.5, "loss_weighting": "inv_t",
               "seed": 11, "save_every": 5, "log_every": 6, "resume": True, "cache_loss": "dual",
               "cache_loss_weight": 3.0, "cache_block_length": 2, "targets": "model", "output_dir": "o",
               "data": "d.jsonl", "eval_data": "e.jsonl", "eval_every": 12, "eval_examples": 13}
    assert shared <= set(changed)
    cfg = sft_config(DistillConfig(**{k: changed[k] for k in shared}))
    # the pool is the teacher's answers, so train_examples is not the SFT run's to use
    assert {k: getattr(cfg, k) for k in shared - {"train_examples"}} == \
        {k: changed[k] for k in shared - {"train_examples"}}
    assert cfg.min_lr_ratio == 1.0
