"""RL post-training: the estimators against brute force, the loss by hand, and the trainer."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.rl as rl
from conftest import EOS, MASK, PAD, tiny_model, varied_reward
from diffpo_serve.dllm.sampler import SamplingParams, generate
from training.config import RLConfig
from training.likelihood import draw_tau, mean_field_logprobs, prompt_mask, scored, two_stage_logprobs
from training.loss import group_advantages, policy_loss, truncated_is_weight
from training.rl import train_rl

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def trajectory():
    """Rollouts of a tiny model with EOS stops, so some positions are fills (commit_step -1)."""
    model = tiny_model(seed=3, init=0.3)
    prompts = [p for p in PROMPTS for _ in range(2)]
    out = generate(model, prompts, [SamplingParams("eb", 10, block_length=5, threshold=0.5, temperature=1.0, seed=s)
                                    for s in range(len(prompts))], mask_id=MASK, eos_id=EOS, pad_id=PAD,
                   return_trajectory=True)
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attention = ids != PAD
    return model, prompts, ids, attention, out


def test_two_stage_with_tau_at_last_step_is_d1(trajectory):
    model, _, ids, attention, out = trajectory
    masked = prompt_mask(attention, 0.3, torch.Generator().manual_seed(0))
    one_pass = mean_field_logprobs(model, ids, attention, out.sequences, masked, MASK)
    two_stage = two_stage_logprobs(model, ids, attention, out.sequences, out.commit_step, out.nfe, masked, MASK)
    mask = scored(out.sequences, out.commit_step, (EOS,))
    assert torch.equal(one_pass[mask], two_stage[mask])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, -0.2])
    old = one_pass.detach() - 0.1
    d1, _ = policy_loss(one_pass, old, adv, mask, epsilon=0.2, beta=0.04, logp_ref=old + 0.05)
    diffpo, _ = policy_loss(two_stage, old, adv, mask, epsilon=0.2, beta=0.04, logp_ref=old + 0.05,
                            is_weight=torch.ones_like(old), is_cap=2.0)
    assert d1.item() == diffpo.item()


def brute_force_logprob(model, prompt, prompt_masked, canvas, position, token):
    """log pi(token at `position` | [prompt with masks ; canvas]) from one unpadded forward pass, pi being
    the model's distribution over the vocabulary without the mask token (the policy the sampler draws from)."""
    p = [MASK if m else t for t, m in zip(prompt, prompt_masked)]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + canvas])).logits[0, len(prompt) + position].float()
    keep = [v for v in range(logits.shape[-1]) if v != MASK]
    return (logits[token] - torch.logsumexp(logits[keep], -1)).item()


def test_estimators_match_brute_force(trajectory):
    model, prompts, ids, attention, out = trajectory
    masked = prompt_mask(attention, 0.3, torch.Generator().manual_seed(1))
    tau = draw_tau(out.nfe, torch.Generator().manual_seed(2))
    assert ((tau >= 1) & (tau <= out.nfe)).all()
    one_pass = mean_field_logprobs(model, ids, attention, out.sequences, masked, MASK)
    two_stage = two_stage_logprobs(model, ids, attention, out.sequences, out.commit_step, tau, masked, MASK)
    checked_late = 0
    for i, prompt in enumerate(prompts):
        pm = masked[i, ids.shape[1] - len(prompt):].tolist()
        seq, steps = out.sequences[i].tolist(), out.commit_step[i].tolist()
        z_tau = [t if 0 <= s < tau[i] else MASK for t, s in zip(seq, steps)]
        for j, (token, s) in enumerate(zip(seq, steps)):
            if s < 0:
                continue
            all_mask = brute_force_logprob(model, prompt, pm, [MASK] * len(seq), j, token)
            assert one_pass[i, j].item() == pytest.approx(all_mask, abs=1e-5)
            expected = all_mask if s < tau[i] else brute_force_logprob(model, prompt, pm, z_tau, j, token)
            checked_late += s >= tau[i]
            assert two_stage[i, j].item() == pytest.approx(expected, abs=1e-5)
    assert checked_late > 0  # pass B was exercised


def test_prompt_mask_only_masks_real_prompt_tokens():
    attention = torch.tensor([[False, True, True, True]] * 2000)
    m = prompt_mask(attention, 0.25, torch.Generator().manual_seed(0))
    assert not m[:, 0].any()
    assert abs(m[:, 1:].float().mean().item() - 0.25) < 0.02


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv, zero = group_advantages(rewards, 4)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert zero == 1
    scaled, _ = group_advantages(rewards, 4, scale_std=True)
    assert scaled[:4].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-3)


def test_truncated_is_weight():
    old = torch.log(torch.tensor([0.5, 0.5, 0.1]))
    behaviour = torch.log(torch.tensor([0.5, 0.1, 0.5]))
    assert truncated_is_weight(old, behaviour, 2.0).tolist() == pytest.approx([1.0, 2.0, 0.2])


def test_policy_loss_and_clip_fractions_by_hand():
    # four tokens of one sequence, advantage +1, eps = 0.2: ratios 1.0, 1.5 (clipped), 0.5, 1.1
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]])).requires_grad_()
    w = torch.tensor([[1.0, 2.0, 0.5, 2.0]])
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 4, dtype=torch.bool), epsilon=0.2,
                              is_weight=w, is_cap=2.0)
    # -mean(w * min(r, clip(r))) = -(1*1 + 2*1.2 + 0.5*0.5 + 2*1.1) / 4
    assert loss.item() == pytest.approx(-(1 + 2.4 + 0.25 + 2.2) / 4)
    assert stats.ratio_clip_fraction == pytest.approx(0.25)
    assert stats.is_clip_fraction == pytest.approx(0.5)
    loss.backward()
    assert logp.grad[0, 1] == 0  # the clipped token gets no gradient
    # negative advantage: the low ratio 0.5 is clipped to 0.8 and is the active (smaller) term
    _, stats = policy_loss(logp.detach(), old, torch.tensor([-1.0]), torch.ones(1, 4, dtype=torch.bool),
                           epsilon=0.2)
    assert stats.ratio_clip_fraction == pytest.approx(0.25)


def test_ratio_clip_fraction_counts_the_active_side_of_the_clip_only():
    """A token counts as clipped where the clipped term is the one min() keeps: with A > 0 a ratio above
    1 + eps, with A < 0 one below 1 - eps. Two tokens clipped on the active side and one on the other side
    (asymmetric, unlike the by-hand test above) tell ``clipped < unclipped`` from the reversed comparison
    and from ``!=``; the loss pins the surrogate at the same time."""
    logp = torch.log(torch.tensor([[1.5, 1.3, 0.5, 1.0]]))
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = policy_loss(logp, torch.zeros(1, 4), torch.tensor([1.0]), mask, epsilon=0.2)
    assert stats.ratio_clip_fraction == pytest.approx(2 / 4)  # 1.5 and 1.3 (0.5 is clipped up, not kept)
    assert loss.item() == pytest.approx(-(1.2 + 1.2 + 0.5 + 1.0) / 4)
    loss, stats = policy_loss(logp, torch.zeros(1, 4), torch.tensor([-1.0]), mask, epsilon=0.2)
    assert stats.ratio_clip_fraction == pytest.approx(1 / 4)  # 0.5 only, clipped up to 0.8
    assert loss.item() == pytest.approx((1.5 + 1.3 + 0.8 + 1.0) / 4)


def test_policy_loss_is_the_token_mean_over_the_batchs_scored_tokens():
    """d1's normaliser: the scored tokens' losses summed over the batch, divided by their number (not averaged
    per sequence first). Three sequences with partial masks, where the two means differ; unscored positions
    hold values (inf, nan, huge weights) that would change everything, or poison the gradient, if they leaked in."""
    ratios = torch.tensor([[1.1, 0.9, 5.0, 5.0], [1.0, 1.5, 0.5, 5.0], [1.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    w = torch.tensor([[2.0, 0.5, 9.0, 9.0], [1.0, 1.0, 1.0, 9.0], [1.0, 9.0, 9.0, float("nan")]])
    logp = ratios.log().masked_fill(torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool),
                                    float("inf")).requires_grad_()
    ref = torch.zeros(3, 4).masked_fill(~mask, float("-inf"))
    loss, stats = policy_loss(logp, torch.zeros(3, 4), torch.tensor([1.0, -2.0, 0.5]), mask, epsilon=0.2,
                              is_weight=w, is_cap=2.0, beta=1e-6, logp_ref=ref)
    # row 0 (A = 1): -(2 * 1.1 + 0.5 * 0.9); row 1 (A = -2): min(-2, -2), min(-3, -2.4), min(-1, -1.6)
    # -> 2 + 3 + 1.6; row 2 (A = 0.5): -0.5; six tokens. Per sequence first would be (-1.325 + 2.2 - 0.5) / 3.
    tokens = [-2.2, -0.45, 2.0, 3.0, 1.6, -0.5]
    assert loss.item() == pytest.approx(sum(tokens) / 6, abs=1e-5)  # beta's KL term is below 1e-5
    assert stats.mean_is_weight == pytest.approx(6.5 / 6)
    assert stats.is_clip_fraction == pytest.approx(1 / 6)
    assert stats.ratio_clip_fraction == pytest.approx(1 / 6)  # row 1's 0.5, clipped up to 0.8
    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[~mask] == 0).all()
    # d loss / d logp_j = -w_j * A * r_j / 6 on unclipped tokens (plus beta's KL): row 0's first token
    assert logp.grad[0, 0].item() == pytest.approx(-2.0 * 1.0 * 1.1 / 6, abs=1e-5)
    assert abs(logp.grad[1, 2].item()) < 1e-5  # clipped: no gradient but the KL's


def test_kl_is_averaged_like_the_objective():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.9], [0.5, 0.1]]))
    mask = torch.tensor([[True, False], [True, True]])
    loss, stats = policy_loss(logp, logp, torch.zeros(2), mask, epsilon=0.2, beta=0.5, logp_ref=ref)
    k3 = lambda a, b: math.exp(math.log(b) - math.log(a)) - (math.log(b) - math.log(a)) - 1  # noqa: E731
    tokens = [k3(0.5, 0.25), k3(0.5, 0.5), k3(0.9, 0.1)]
    assert loss.item() == pytest.approx(0.5 * sum(tokens) / 3)  # over the batch's scored tokens, as d1
    assert stats.kl == pytest.approx((k3(0.5, 0.25) + k3(0.5, 0.5) + k3(0.9, 0.1)) / 3)


def test_group_advantages_centre_each_group_on_its_own_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5])  # group means 1/3, 2/3, 5/6
    adv, zero = group_advantages(rewards, 3)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3, 1 / 6, 1 / 6,
                                                  -1 / 3]))
    assert zero == 0
    scaled, _ = group_advantages(rewards, 3, scale_std=True)
    std = torch.tensor([math.sqrt(2) / 3, math.sqrt(2) / 3, math.sqrt(2) / 6]).repeat_interleave(3)
    torch.testing.assert_close(scaled, adv / (std + 1e-4))


def test_kl_k3_by_hand():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, stats = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1, dtype=torch.bool), epsilon=0.2,
                              beta=1.0, logp_ref=ref)
    r = torch.log(torch.tensor(0.5))  # ref - theta = log 0.5
    assert stats.kl == pytest.approx(float(torch.exp(r) - r - 1))
    assert loss.item() == pytest.approx(stats.kl)


# ----------------------------------------------------------------------------- the trainer

def rl_cfg(base, out, **kw):
    base_kw = dict(model=str(base), output_dir=str(out), tasks="sudoku", train_examples=64, num_generations=4,
                   prompts_per_step=2, num_iterations=2, max_steps=4, save_every=2, lr=1e-2, gen_length=16,
                   steps=8, seed=0)
    return RLConfig(**{**base_kw, **kw})


@pytest.mark.parametrize("algo", ["d1", "diffpo"])
def test_training_changes_every_parameter(base_dir, tmp_path, algo, monkeypatch):
    # a reward that differs within a group (the tiny model's sudoku rewards may all be 0: no gradient at all)
    monkeypatch.setattr(rl, "_reward", varied_reward)
    out = train_rl(rl_cfg(base_dir, tmp_path / algo, algo=algo, max_steps=3, save_every=3, scale_std=True)).output_dir
    before, after = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("reward", "accuracy", "mean_nfe", "kl", "ratio_clip_fraction", "is_clip_fraction",
                "zero_variance_groups", "grad_norm", "rollouts_per_second"):
        assert key in records[-1]


def test_resume_after_a_kill_replays_the_same_run(base_dir, tmp_path, kill_after_checkpoint):
    straight = train_rl(rl_cfg(base_dir, tmp_path / "straight")).output_dir
    disarm = kill_after_checkpoint(rl)
    with pytest.raises(KeyboardInterrupt):
        train_rl(rl_cfg(base_dir, tmp_path / "killed"))
    disarm()
    resumed = train_rl(rl_cfg(base_dir, tmp_path / "killed", resume=True)).output_dir
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_drops_the_metric_lines_logged_after_the_checkpoint(base_dir, tmp_path, kill_after_checkpoint):
    """A real kill lands between checkpoints: the lines of the steps after the checkpoint (and a line cut
    mid-write) are dropped, and the resumed run logs those steps once."""
    disarm = kill_after_checkpoint(rl)
    with pytest.raises(KeyboardInterrupt):
        train_rl(rl_cfg(base_dir, tmp_path / "killed"))
    disarm()
    metrics = tmp_path / "killed" / "metrics.jsonl"
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2]
    with metrics.open("a") as f:
        f.write('{"step": 3, "reward": -1.0}\n{"step": 4, "reward": -1.0}\n{"step": 5, "rew')
    resumed = train_rl(rl_cfg(base_dir, tmp_path / "killed", resume=True)).output_dir
    records = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["reward"] >= 0 for r in records)  # the stale lines' rewards (-1) are gone


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_from_step_0_moves_old_metrics_aside(base_dir, tmp_path, resume):
    """A fresh run into a directory with a previous run's metrics.jsonl (or ``--resume`` before any checkpoint
    was saved) logs its steps once, from its own first, and keeps the old lines in metrics.jsonl.prev."""
    out = tmp_path / "run"
    out.mkdir()
    old = '{"step": 0, "eval_sudoku_accuracy": -1.0}\n{"step": 1, "reward": -1.0}\n'
    (out / "metrics.jsonl").write_text(old)
    train_rl(rl_cfg(base_dir, out, max_steps=2, resume=resume))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["reward"] >= 0 for r in records)
    assert (out / "metrics.jsonl.prev").read_text() == old


def test_lora_trains_adapters_and_exports_a_plain_model(base_dir, tmp_path, monkeypatch):
    from diffpo_serve.dllm.loading import load_model
    import training.rl as rl_module
    # a reward that differs within a group (the tiny model's sudoku rewards may all tie: no gradient at all)
    monkeypatch.setattr(rl_module, "_reward", varied_reward)
    out = train_rl(rl_cfg(base_dir, tmp_path / "lora", lora_r=4, max_steps=2, save_every=2, beta=0.0)).output_dir
    loaded = load_model(out)  # merged: loads like any model
    before, after = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert not torch.equal(before["blocks.0.qkv.weight"], after["blocks.0.qkv.weight"])
    assert torch.equal(before["embed.weight"], after["embed.weight"])  # not a LoRA target
    assert loaded.mask_id == MASK


def test_two_processes_train_in_sync(base_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (DDP over gloo): both ranks end in sync, having
    drawn different prompts and rollouts (each step's draws are seeded by the rank too: ranks that drew the
    same batch would just repeat each other's gradient)."""
    script = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(base_dir),
           str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sums[0]["world"] == 2
    assert sums[0]["checksums"] == sums[1]["checksums"]
    assert sums[0]["checksums"] != sums[0]["initial"]
    assert len(sums[0]["rollout_prompts"]) == 2  # one batch per step
    assert sums[0]["rollout_prompts"] != sums[1]["rollout_prompts"]
    assert sums[0]["rollout_texts"] != sums[1]["rollout_texts"]
    records = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["rollouts"] == 2 * 2 * 4 * 2  # steps x prompts x G x processes


@pytest.mark.parametrize("features", ["prompt", "prompt+answer+eb"])
def test_sampler_training_moves_only_the_head(base_dir, tmp_path, features):
    from diffpo_serve.dllm.loading import load_model
    out = train_rl(rl_cfg(base_dir, tmp_path / "sampler", train="sampler", max_steps=3, save_every=3,
                          eval_every=3, eval_examples=8, head_features=features)).output_dir
    before, after = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is frozen
    loaded = load_model(out)
    assert loaded.threshold_head is not None and loaded.threshold_head.features == features
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval_sudoku_accuracy" in records[0]
    assert {"sampler_reward", "head_loss", "head_entropy", "mean_threshold"} <= set(records[-1])
    assert "kl" not in records[-1]


def test_joint_training_moves_model_and_head_and_resumes(base_dir, tmp_path, kill_after_checkpoint, monkeypatch):
    from diffpo_serve.dllm.threshold_head import load_head
    monkeypatch.setattr(rl, "_reward", varied_reward)  # the tiny model's sudoku rewards may all be 0: no gradient
    straight = train_rl(rl_cfg(base_dir, tmp_path / "joint", train="joint")).output_dir
    before, after = load_file(base_dir / "model.safetensors"), load_file(straight / "model.safetensors")
    assert not any(torch.equal(before[k], after[k]) for k in before)
    assert load_head(straight) is not None

    disarm = kill_after_checkpoint(rl)
    with pytest.raises(KeyboardInterrupt):
        train_rl(rl_cfg(base_dir, tmp_path / "killed", train="joint"))
    disarm()
    resumed = train_rl(rl_cfg(base_dir, tmp_path / "killed", train="joint", resume=True)).output_dir
    for name in ("model.safetensors", "threshold_head.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_reward", ["task", "sampler"])
def test_model_reward_is_the_task_or_the_nfe_penalised_reward(base_dir, tmp_path, monkeypatch, model_reward):
    from training.loss import sampler_reward
    seen = []
    real = rl._model_update

    def spy(cfg, model, unwrapped, ref_model, optimizer, accelerator, batch, rewards, *rest):
        seen.append((batch.rewards.clone(), batch.nfe.clone(), rewards.clone()))
        return real(cfg, model, unwrapped, ref_model, optimizer, accelerator, batch, rewards, *rest)

    monkeypatch.setattr(rl, "_model_update", spy)
    # a task reward that is not 0 everywhere (the tiny model's sudoku rewards may all be), so the sampler
    # reward's NFE penalty shows
    monkeypatch.setattr(rl, "_reward", lambda text, example: varied_reward(text, example) + 0.5)
    train_rl(rl_cfg(base_dir, tmp_path / model_reward, train="joint", model_reward=model_reward, lam=0.8,
                    max_steps=2))
    assert len(seen) == 2
    for task_reward, nfe, used in seen:
        want = task_reward if model_reward == "task" else sampler_reward(task_reward, nfe, 16, 0.8)
        assert torch.allclose(used, want)
    if model_reward == "sampler":  # the rollouts' NFEs differ, so the two rewards really differ somewhere
        assert any(not torch.allclose(t, u) for t, _, u in seen)
