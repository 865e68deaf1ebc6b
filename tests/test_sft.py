"""Masked-diffusion SFT: the loss against hand computations, training, checkpoints and resume."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import training.sft as sft
from training.checkpoint import CheckpointError, load_trainer_state
from training.config import SFTConfig
from training.sft import batch_loss, forward_mask, lr_at, masked_diffusion_loss, train_sft


def test_loss_by_hand():
    # two rows, three completion positions, vocabulary of 2 with uniform logits: CE = ln 2 everywhere
    logits = torch.zeros(2, 3, 2)
    targets = torch.tensor([[0, 1, 0], [1, 1, 1]])
    masked = torch.tensor([[True, False, True], [False, False, True]])
    t = torch.tensor([0.5, 0.25])
    ln2 = math.log(2)
    # inv_t: (2 ln2 / 0.5 + 1 ln2 / 0.25) / 6 completion tokens
    assert masked_diffusion_loss(logits, targets, masked, t, "inv_t").item() == pytest.approx((4 + 4) * ln2 / 6)
    assert masked_diffusion_loss(logits, targets, masked, t, "masked_mean").item() == pytest.approx(ln2)
    # a perfect prediction costs nothing
    sure = torch.nn.functional.one_hot(targets, 2).float() * 100
    assert masked_diffusion_loss(sure, targets, masked, t).item() == pytest.approx(0.0, abs=1e-6)


def test_forward_mask_rate_follows_t():
    g = torch.Generator().manual_seed(0)
    completion = torch.ones(4000, 64, dtype=torch.bool)
    completion[:, 48:] = False  # positions outside the completion are never masked
    t, masked = forward_mask(completion, g)
    assert not masked[:, 48:].any()
    assert 0 < t.min() and t.max() <= 1
    rate = masked[:, :48].float().mean(1)
    assert torch.corrcoef(torch.stack([rate, t]))[0, 1] > 0.95
    assert abs(rate.mean() - 0.5) < 0.02


class SpyDenoiser(torch.nn.Module):
    """Records its inputs and returns fixed random logits."""

    def __init__(self, vocab=20, salt=0):
        super().__init__()
        self.vocab, self.salt, self.seen = vocab, salt, []

    def forward(self, input_ids, attention_mask):
        self.seen.append((input_ids.clone(), attention_mask.clone()))
        g = torch.Generator().manual_seed(int(input_ids.sum()) + self.salt)
        return type("Out", (), {"logits": torch.randn(*input_ids.shape, self.vocab, generator=g)})()


@pytest.mark.parametrize("weighting", ["inv_t", "masked_mean"])
def test_batch_loss_masks_the_completion_only_and_scores_what_it_masked(weighting):
    spy = SpyDenoiser()
    targets = torch.tensor([[10, 11, 12, 13, 14, 15], [16, 17, 18, 19, 2, 2]])
    loss, logits, _, masked = batch_loss(spy, [[5, 6, 7], [8]], targets, torch.Generator().manual_seed(0),
                                         mask_id=1, pad_id=0, weighting=weighting)
    t, want = forward_mask(torch.ones_like(targets, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert torch.equal(masked, want) and masked.any() and (~masked).any()
    ids, attention = spy.seen[0]
    assert ids[:, :3].tolist() == [[5, 6, 7], [0, 0, 8]]  # prompts left-padded, never masked
    assert attention.tolist() == [[True] * 9, [False, False] + [True] * 7]
    assert torch.equal(ids[:, 3:], torch.where(masked, torch.ones_like(targets), targets))
    assert loss.item() == pytest.approx(masked_diffusion_loss(logits, targets, masked, t, weighting).item())
    assert torch.equal(logits, spy(ids, attention).logits[:, 3:])


def test_encode_examples_pads_with_eos_and_cuts_long_answers():
    from training.data import encode_examples, left_pad
    encode = lambda text: [ord(c) - 90 for c in text]  # noqa: E731
    prompts, completions = encode_examples(encode, ["p", "qq"], ["ab", "abcdef"], gen_length=4, eos_id=2)
    assert prompts == [[22], [23, 23]]
    assert completions == [[7, 8, 2, 2], [7, 8, 9, 10]]
    ids, attention = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert attention.tolist() == [[True] * 3, [False, False, True], [False] * 3]


def test_lr_schedule():
    cfg = SFTConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    # warm-up ends at step 10 exactly (peak, cosine progress 0), then the cosine over the 90 steps left:
    # halfway (step 55) the multiplier is 0.1 + 0.9 * 0.5 * (1 + cos(pi / 2)) = 0.55, a third of the way
    # (step 40) 0.1 + 0.45 * (1 + cos(pi / 3)) = 0.775; past max_steps it stays at the floor
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(40, cfg) == pytest.approx(0.775)
    assert lr_at(150, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def small_cfg(out, **kw):
    base = dict(output_dir=str(out), train_examples=64, max_steps=6, batch_size=8, lr=3e-3, warmup_steps=2,
                save_every=3, log_every=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, loss_weighting="masked_mean")
    return SFTConfig(**{**base, **kw})


def test_sft_trains_and_output_dir_is_a_model(tmp_path):
    from diffpo_serve.dllm.loading import load_model
    out = train_sft(small_cfg(tmp_path / "run", max_steps=40, save_every=20, log_every=10))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30, 40]
    assert lines[-1]["loss"] < lines[0]["loss"]
    loaded = load_model(out)
    assert loaded.mask_id == loaded.tokenizer.mask_token_id
    assert load_trainer_state(out / "checkpoint")["step"] == 39


def test_resume_after_a_kill_continues_the_same_run(tmp_path, monkeypatch):
    straight = train_sft(small_cfg(tmp_path / "straight"))

    real_save = sft.save_checkpoint
    calls = []

    def save_then_die(*args, **kw):
        real_save(*args, **kw)
        calls.append(kw["step"])
        raise KeyboardInterrupt  # the process is killed right after its first checkpoint

    monkeypatch.setattr(sft, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_sft(small_cfg(tmp_path / "killed"))
    assert calls == [2]
    monkeypatch.setattr(sft, "save_checkpoint", real_save)
    resumed = train_sft(small_cfg(tmp_path / "killed", resume=True))

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # no step logged twice, none lost


def test_trim_metrics_keeps_the_lines_up_to_the_checkpoint(tmp_path):
    from training.checkpoint import trim_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1}\n{"step": 4, "loss": 0.5}\n{"step": 5}\n{"step": 6}\n{"st')
    assert trim_metrics(path, 4) == 3  # steps 5 and 6, and the line cut mid-write
    assert path.read_text() == '{"step": 2, "loss": 1}\n{"step": 4, "loss": 0.5}\n'
    assert trim_metrics(path, 4) == 0 and trim_metrics(tmp_path / "none.jsonl", 4) == 0


def test_a_fresh_sft_run_moves_old_metrics_aside(tmp_path):
    """A run from step 0 over a directory with old metrics logs its own steps only and keeps the old lines in
    metrics.jsonl.prev (replacing an older .prev); an empty file is not kept."""
    from training.checkpoint import fresh_metrics
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 2, "loss": 99}\n')
    (out / "metrics.jsonl.prev").write_text("older\n")
    train_sft(small_cfg(out))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    assert (out / "metrics.jsonl.prev").read_text() == '{"step": 2, "loss": 99}\n'
    (tmp_path / "empty.jsonl").write_text("")
    assert fresh_metrics(tmp_path / "empty.jsonl") is None and fresh_metrics(tmp_path / "none.jsonl") is None


def test_corrupt_trainer_state_is_named(tmp_path):
    out = train_sft(small_cfg(tmp_path / "run", max_steps=3, save_every=3))
    state = out / "checkpoint" / "trainer_state.pt"
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="trainer_state.pt.*corrupt"):
        train_sft(small_cfg(tmp_path / "run", max_steps=6, resume=True))


def test_two_processes_share_one_run(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: one DDP run (rank 0 alone logs and saves)."""
    import subprocess
    import sys
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.cli", "sft",
           "--output-dir", str(out), "--max-steps", "4", "--train-examples", "64", "--hidden-size", "32",
           "--num-hidden-layers", "2", "--num-attention-heads", "2", "--intermediate-size", "64",
           "--batch-size", "8", "--log-every", "2", "--save-every", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the launcher's status is non-zero if any rank's was
    assert "terminate called" not in proc.stderr and "exitcode" not in proc.stderr
    # each rank ended through training.distributed (os._exit) and still printed its result, flushed
    assert proc.stdout.split() == [str(out), str(out)]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # two processes that each believed they were rank 0 would log every line twice
    assert load_trainer_state(out / "checkpoint")["step"] == 3


def test_eval_every_logs_the_saved_models_greedy_accuracy(tmp_path):
    """--eval-every: eval lines at steps 20 and 30 (the last), with the accuracy and NFE that evaluating the
    final saved model independently gives on the same test prompts (greedy full steps: one token per pass)."""
    from diffpo_serve.dllm.loading import load_model
    from diffpo_serve.dllm.sampler import SamplingParams
    from training.evaluate import evaluate
    from training.tasks import get_task
    out = train_sft(small_cfg(tmp_path / "run", max_steps=30, save_every=30, log_every=10, eval_every=20,
                              eval_examples=12))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval_sudoku_accuracy" in r]
    assert [r["step"] for r in evals] == [20, 30]
    assert [r["step"] for r in lines if "loss" in r] == [10, 20, 30]  # eval lines are separate records
    loaded = load_model(out)
    data = get_task("sudoku").make_dataset("test", 12, seed=0)
    r = evaluate(loaded, "sudoku", data, SamplingParams("steps", 16, steps=16), progress=False)
    assert evals[-1]["eval_sudoku_accuracy"] == round(r.accuracy, 4)
    assert evals[-1]["eval_sudoku_exact"] == round(r.exact, 4)
    assert evals[-1]["eval_sudoku_mean_nfe"] == 16.0
    # evaluating puts the model in eval mode and back: training goes on in train mode
    model = loaded.model.train()
    sft.evaluate_model(model, loaded.tokenizer, {"sudoku": data.select(range(2))}, 16)
    assert model.training


def test_metrics_lines_average_each_window_by_hand(tmp_path, monkeypatch):
    """Each metrics line is the mean over its window of steps of the batch loss and of the masked-token accuracy
    (correct argmax at masked positions / masked positions), recomputed here from what batch_loss returned."""
    seen = []

    def recording(*args, **kw):
        out = batch_loss(*args, **kw)
        loss, logits, targets, masked = out
        seen.append((loss.item(), (((logits.argmax(-1) == targets) & masked).sum() / masked.sum()).item()))
        return out

    monkeypatch.setattr(sft, "batch_loss", recording)
    out = train_sft(small_cfg(tmp_path / "run", max_steps=5, log_every=2, save_every=5))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 5] and len(seen) == 5
    for line, window in zip(lines, [seen[0:2], seen[2:4], seen[4:5]]):
        assert line["loss"] == pytest.approx(sum(x for x, _ in window) / len(window), abs=1e-5)
        assert line["masked_token_acc"] == pytest.approx(sum(a for _, a in window) / len(window), abs=1e-4)
    assert len({x for x, _ in seen}) == 5 and any(a > 0 for _, a in seen)


# ----------------------------------------------------------------------------- --cache-loss

def test_cached_view_states_by_value():
    from training.sft import cached_view
    targets = torch.arange(10, 10 + 3 * 8).view(3, 8)
    seen = set()
    for seed in range(40):
        k, t, refresh, current, masked = cached_view(targets, 4, torch.Generator().manual_seed(seed), mask_id=99)
        seen.add(k)
        lo, hi = 4 * k, 4 * k + 4
        assert torch.equal(refresh[:, :lo], targets[:, :lo]) and bool((refresh[:, lo:] == 99).all())
        assert torch.equal(current[:, :lo], targets[:, :lo]) and bool((current[:, hi:] == 99).all())
        block = current[:, lo:hi]
        assert torch.equal(block, torch.where(masked[:, lo:hi], torch.full_like(block, 99), targets[:, lo:hi]))
        assert not masked[:, :lo].any() and not masked[:, hi:].any() and bool(masked[:, lo:hi].any(1).all())
        assert t.shape == (3,) and bool(((t > 0) & (t <= 1)).all())
    assert seen == {0, 1}
    with pytest.raises(ValueError, match="does not divide"):
        cached_view(targets, 3, torch.Generator(), 99)


def test_cached_view_draws_blocks_uniformly_and_masks_at_rate_t():
    from training.sft import cached_view
    targets = torch.zeros(64, 16, dtype=torch.long)
    counts, pairs = [0] * 4, []
    for seed in range(400):
        k, t, _, _, masked = cached_view(targets, 4, torch.Generator().manual_seed(seed), mask_id=1)
        counts[k] += 1
        pairs.append((t, masked[:, 4 * k:4 * k + 4].float().mean(1)))
    assert all(70 <= c <= 130 for c in counts), counts  # 100 expected each
    t = torch.cat([p[0] for p in pairs])
    rate = torch.cat([p[1] for p in pairs])
    # one token of the block is always masked, each of the other three with probability t
    assert rate.mean().item() == pytest.approx(((1 + 3 * t) / 4).mean().item(), abs=0.01)
    # t ~ U(eps, 1] per row, eps = 1e-3: its range and its quartiles (25,600 draws)
    assert t.min().item() >= 1e-3 and t.max().item() <= 1.0
    q = torch.quantile(t.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.double))
    assert q.tolist() == pytest.approx([0.25075, 0.5005, 0.75025], abs=0.01)


def _plain_block_loss(model, prompts, targets, view, block_length, pad_id):
    """The uncached loss of the same block in the same current state: one full forward."""
    from training.data import left_pad
    k, t, _, current, masked = view
    p_ids, p_attn = left_pad(prompts, pad_id)
    lo, hi = k * block_length, (k + 1) * block_length
    ids = torch.cat([p_ids, current], 1)
    attention = torch.cat([p_attn, torch.ones_like(current, dtype=torch.bool)], 1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, p_ids.shape[1] + lo:p_ids.shape[1] + hi]
    return masked_diffusion_loss(logits, targets[:, lo:hi], masked[:, lo:hi], t, "masked_mean")


def test_cached_view_loss_reads_the_stale_keys_of_the_refresh():
    """One layer: a column's keys/values depend on its own token only, and the prompt, the finished blocks and
    (masked) later blocks are the same in the refresh and now, so the cached loss is the plain one; unless the
    cached later blocks differ, which dual reads from the cache and prefix recomputes. Two layers: the stale
    keys/values differ from fresh ones (the approximation trained for), unless the refresh is the current state."""
    from conftest import MASK, PAD, tiny_model
    from training.sft import cached_view, cached_view_loss
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    targets = torch.randint(20, 60, (3, 8), generator=torch.Generator().manual_seed(1))
    one, two = tiny_model(num_hidden_layers=1), tiny_model()
    view = cached_view(targets, 4, torch.Generator().manual_seed(6), MASK)
    k, t, refresh, current, masked = view
    assert k == 0 and int((current[:, :4] != MASK).sum()) == 6  # seed 6: block 0, 6 of its 12 tokens committed
    garbage = refresh.clone()
    garbage[:, 4:] = 42  # the later block's cached keys/values wrong
    with torch.no_grad():
        for mode in ("prefix", "dual"):
            cached = cached_view_loss(one, prompts, targets, 4, mode, view, PAD, "masked_mean")[0]
            assert cached.item() == pytest.approx(_plain_block_loss(one, prompts, targets, view, 4, PAD).item(),
                                                  abs=1e-5)
        bad = (k, t, garbage, current, masked)
        plain = _plain_block_loss(one, prompts, targets, view, 4, PAD).item()
        assert cached_view_loss(one, prompts, targets, 4, "prefix", bad, PAD, "masked_mean")[0].item() == \
            pytest.approx(plain, abs=1e-5)
        assert abs(cached_view_loss(one, prompts, targets, 4, "dual", bad, PAD, "masked_mean")[0].item() - plain) > 1e-3
        plain2 = _plain_block_loss(two, prompts, targets, view, 4, PAD).item()
        fresh = (k, t, current, current, masked)
        for mode in ("prefix", "dual"):
            assert cached_view_loss(two, prompts, targets, 4, mode, fresh, PAD, "masked_mean")[0].item() == \
                pytest.approx(plain2, abs=1e-5)
            assert abs(cached_view_loss(two, prompts, targets, 4, mode, view, PAD, "masked_mean")[0].item()
                       - plain2) > 1e-3


def test_cached_view_loss_trains_both_forwards():
    from conftest import MASK, PAD, tiny_model
    from training.sft import cached_view, cached_view_loss
    model = tiny_model().train()
    targets = torch.randint(20, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    view = cached_view(targets, 4, torch.Generator().manual_seed(3), MASK)
    loss, logits, block_targets, block_masked = cached_view_loss(model, [[5, 6], [7]], targets, 4, "dual", view, PAD)
    assert logits.shape[:2] == (2, 4) and torch.equal(block_targets, targets[:, :4])
    loss.backward()
    # the first layer's key/value weights of a cached column get gradient only through the refresh forward
    assert model.blocks[0].qkv.weight.grad.abs().sum() > 0


def test_sft_with_the_cache_loss_logs_it(tmp_path):
    out = train_sft(small_cfg(tmp_path / "run", max_steps=4, log_every=2, save_every=4, cache_loss="both",
                              cache_block_length=4))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4] and all(r["cache_loss"] > 0 for r in lines)
    assert json.loads((out / "train_config.json").read_text())["cache_loss"] == "both"


def test_a_cache_block_length_that_does_not_divide_the_completion_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--cache-block-length 5 must divide --gen-length 16"):
        train_sft(small_cfg(tmp_path / "run", cache_loss="prefix", cache_block_length=5))
    assert not (tmp_path / "run").exists()


def test_the_cache_loss_is_added_to_the_sft_loss_times_its_weight_and_trained(tmp_path):
    """First step, same batch and masks in every run: loss = SFT loss + weight x cached-view loss; and the update
    differs (the cached-view loss reaches the gradient)."""
    def first(name, **kw):
        out = train_sft(small_cfg(tmp_path / name, max_steps=1, log_every=1, save_every=1, **kw))
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0]), load_file(out / "model.safetensors")

    off, w_off = first("off")
    one, w_one = first("one", cache_loss="prefix")
    three, _ = first("three", cache_loss="prefix", cache_loss_weight=3.0)
    assert one["cache_loss"] == three["cache_loss"] > 0
    assert one["loss"] == pytest.approx(off["loss"] + one["cache_loss"], abs=3e-5)
    assert three["loss"] == pytest.approx(off["loss"] + 3 * three["cache_loss"], abs=5e-5)
    assert any(not torch.equal(w_off[k], w_one[k]) for k in w_off)


def test_loss_against_a_teachers_logits_is_kl_teacher_to_model_by_hand():
    """--targets model: each masked position scores KL(teacher || model), weighted as the token loss is."""
    # teacher (1/4, 3/4), model (1/2, 1/2): KL(t || m) = 1/4 ln(1/2) + 3/4 ln(3/2); the reverse direction,
    # KL(m || t) = 1/2 ln 2 + 1/2 ln(2/3), differs
    teacher = torch.tensor([0.0, math.log(3)]).expand(2, 3, 2)
    model = torch.zeros(2, 3, 2)
    masked = torch.tensor([[True, False, True], [False, False, True]])
    t = torch.tensor([0.5, 0.25])
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert masked_diffusion_loss(model, teacher, masked, t, "masked_mean").item() == pytest.approx(kl)
    assert masked_diffusion_loss(model, teacher, masked, t, "inv_t").item() == pytest.approx((4 + 4) * kl / 6)
    assert masked_diffusion_loss(teacher, model, masked, t, "masked_mean").item() == \
        pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    # a shift of the logits is the same distribution: nothing to learn
    assert masked_diffusion_loss(teacher + 7.0, teacher, masked, t).item() == pytest.approx(0.0, abs=1e-6)


def test_batch_loss_with_a_teacher_scores_the_teachers_logits_on_the_same_noisy_input():
    spy, other = SpyDenoiser(), SpyDenoiser(salt=1)
    targets = torch.tensor([[10, 11, 12, 13, 14, 15], [16, 17, 18, 19, 2, 2]])
    args = ([[5, 6, 7], [8]], targets, torch.Generator().manual_seed(0))
    loss, logits, got_targets, masked = batch_loss(spy, *args, mask_id=1, pad_id=0, teacher=other)
    ids, attention = spy.seen[0]
    t_ids, t_attention = other.seen[0]
    assert torch.equal(t_ids, ids) and torch.equal(t_attention, attention)  # the masked input, not the answer
    assert torch.equal(got_targets, targets)  # the metrics still compare with the tokens
    t, _ = forward_mask(torch.ones_like(targets, dtype=torch.bool), torch.Generator().manual_seed(0))
    want = masked_diffusion_loss(logits, other(ids, attention).logits[:, 3:], masked, t)
    assert loss.item() == pytest.approx(want.item()) and loss.item() > 0
    # the model as its own teacher: zero
    same = SpyDenoiser()
    assert batch_loss(same, *args, mask_id=1, pad_id=0, teacher=same)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_cached_view_loss_with_the_model_as_teacher_is_the_caches_own_error():
    """The teacher's logits are block k's, uncached, on the current state: a model that is its own teacher
    scores 0 where the cache is exact (nothing committed since the refresh) and the KL between its uncached and
    cached predictions otherwise; a wrong teacher column window (block k-1 or k+1) would not be 0."""
    from conftest import MASK, PAD, tiny_model
    from training.data import left_pad
    from training.sft import cached_view, cached_view_loss
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    targets = torch.randint(20, 60, (3, 12), generator=torch.Generator().manual_seed(1))
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    view = next(v for v in (cached_view(targets, 4, gen, MASK) for _ in range(50)) if v[0] == 1)
    k, t, refresh, current, masked = view
    p_ids, p_attn = left_pad(prompts, PAD)
    with torch.no_grad():
        fresh = (k, t, current, current, masked)
        for mode in ("prefix", "dual"):
            assert cached_view_loss(model, prompts, targets, 4, mode, fresh, PAD, "masked_mean",
                                    teacher=model)[0].item() == pytest.approx(0.0, abs=1e-5)
            loss, logits, _, block_masked = cached_view_loss(model, prompts, targets, 4, mode, view, PAD, "masked_mean",
                                                             teacher=model)
            full = model(input_ids=torch.cat([p_ids, current], 1),
                         attention_mask=torch.cat([p_attn, torch.ones_like(current, dtype=torch.bool)], 1)).logits
            uncached = full[:, 4 + 4:4 + 8]  # prompt width 4, block 1
            assert loss.item() == pytest.approx(masked_diffusion_loss(logits, uncached, block_masked, t,
                                                                      "masked_mean").item(), rel=1e-5)
            assert loss.item() > 1e-6


def test_targets_model_needs_a_starting_model(tmp_path):
    with pytest.raises(ValueError, match="--targets model .* --model"):
        train_sft(small_cfg(tmp_path / "run", targets="model"))


def test_targets_model_holds_the_teacher_at_the_starting_model_across_a_resume(tmp_path, kill_after_checkpoint):
    """After a kill and --resume the teacher is still --model (not the checkpoint, which would score the later
    steps against moved weights), so the resumed run ends where a straight run does."""
    start = train_sft(small_cfg(tmp_path / "start", max_steps=40, save_every=40))
    kw = dict(model=str(start), targets="model", cache_loss="prefix", lr=3e-3, max_steps=4, save_every=2,
              log_every=1, warmup_steps=0)
    straight = train_sft(small_cfg(tmp_path / "straight", **kw))
    disarm = kill_after_checkpoint(sft)
    with pytest.raises(KeyboardInterrupt):
        train_sft(small_cfg(tmp_path / "killed", **kw))
    disarm()
    resumed = train_sft(small_cfg(tmp_path / "killed", resume=True, **kw))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    s = load_file(start / "model.safetensors")
    assert any((a[name] - s[name]).abs().max() > 1e-3 for name in a)  # the steps moved the weights
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
