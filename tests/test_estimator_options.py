"""DiFFPO's open estimator choices as options, pinned by value: which passes tau is drawn among
(``--tau-over all|answer``: :func:`training.likelihood.answer_passes`, :func:`~training.likelihood.draw_tau`) and
which prompt the importance weight's numerator sees (``--is-numerator masked|unmasked``, in
``training.rl._model_update``); and that both, with ``--p-mask``, reach the trainer from ``diffpo-train rl`` and
from ``benchmarks/rl_curves.py``.

The weights are recomputed here from forward passes on unpadded inputs (``test_rl_wiring``'s brute force), with
the prompt mask and tau replayed from the trainer's generator.
"""

import math

import pytest
import torch
from accelerate import Accelerator

import training.rl as rl
from conftest import EOS, MASK, tiny_model
from test_rl_wiring import EB, PROMPTS, cfg, make_batch, policy_logp, spy, z  # noqa: F401 (spy: a fixture)
from training.cli import main as cli_main
from training.likelihood import answer_passes, draw_tau, prompt_mask, scored

# one hand-made row: 6 positions, K = 6 passes; the answer is "7 8" and its EOS (position 2), then an EOS tail.
# pass s commits the tokens with commit_step s - 1: the answer at passes 5, 3 and 1, the tail at 2, 4 and 6
COMPLETION = torch.tensor([[7, 8, EOS, EOS, EOS, EOS]])
COMMIT_STEP = torch.tensor([[4, 2, 0, 1, 3, 5]])
ANSWER_PASSES = [1, 3, 5]


def test_answer_passes_are_the_passes_that_commit_scored_tokens():
    """Row 0: scored positions 0-2 were committed at steps 4, 2, 0, i.e. passes 5, 3, 1. Row 1: an EOS fill
    (commit_step -1) and a token after the first EOS mark no pass; K = 4, so 4 columns."""
    completion = torch.cat([COMPLETION, torch.tensor([[9, EOS, 9, EOS, EOS, EOS]])])
    commit_step = torch.cat([COMMIT_STEP, torch.tensor([[3, 1, 0, 2, -1, -1]])])
    nfe = torch.tensor([6, 4])
    passes = answer_passes(commit_step, scored(completion, commit_step, [EOS]), nfe)
    assert passes.tolist() == [[True, False, True, False, True, False],
                               [False, True, False, True, False, False]]


def test_tau_over_answer_draws_the_pinned_answer_pass_and_only_those():
    """With the generator's uniform u per row, tau is the floor(u * n)-th of the row's n answer passes (1, 3, 5);
    over 3,000 draws its support is exactly {1, 3, 5}, each a third of the time. ``--tau-over all`` from the same
    u is floor(u * K) + 1, the formula tau always had; a passes mask marking every pass draws the same."""
    rows = 3000
    nfe = torch.full((rows,), 6)
    passes = answer_passes(COMMIT_STEP, scored(COMPLETION, COMMIT_STEP, [EOS]), nfe[:1]).expand(rows, -1)
    u = torch.rand(rows, generator=torch.Generator().manual_seed(7))
    tau = draw_tau(nfe, torch.Generator().manual_seed(7), passes)
    want = torch.tensor(ANSWER_PASSES)[(u * 3).floor().long()]
    assert torch.equal(tau, want)
    counts = torch.bincount(tau, minlength=8).float() / rows
    assert counts[[0, 2, 4, 6, 7]].sum() == 0
    assert torch.allclose(counts[ANSWER_PASSES], torch.full((3,), 1 / 3), atol=0.03), counts
    every = draw_tau(nfe, torch.Generator().manual_seed(7))
    assert torch.equal(every, (u * 6).floor().long() + 1)
    assert torch.equal(draw_tau(nfe, torch.Generator().manual_seed(7), torch.ones(rows, 6, dtype=torch.bool)), every)


def test_tau_over_answer_single_pass_and_fallback_by_hand():
    """A row whose answer is committed by one pass (pass 4 of 5) always draws 4; a row with no scored token
    draws from all of 1..K as ``all`` would (its tau changes nothing); a mask narrower than K is an error."""
    nfe = torch.tensor([5, 3])
    passes = torch.tensor([[False, False, False, True, False], [False] * 5])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(2, generator=torch.Generator().manual_seed(seed))
        tau = draw_tau(nfe, g, passes)
        assert tau[0] == 4 and tau[1] == int(u[1] * 3) + 1
    with pytest.raises(ValueError, match="fewer than"):
        draw_tau(nfe, None, passes[:, :4])


def test_trainer_draws_tau_among_answer_passes_only(spy):
    """``tau_over="answer"``: every tau the trainer drew (two inner steps) is a pass that committed a scored token
    of its row, and across the rows some tau differs from what ``all`` drew from the same generator."""
    model = tiny_model(seed=3, init=0.3)
    batch = make_batch(model, PROMPTS, 2, [1, 0, 0, 1, 1, 0], temperature=1.0, **EB)
    batch.eos_ids = (EOS, 93)  # a token these rollouts hold early: each row's answer ends there, a tail follows
    mask = scored(batch.completion, batch.commit_step, batch.eos_ids)
    rl._model_update(cfg(algo="diffpo", tau_over="answer", num_iterations=2), model, model, None,
                     torch.optim.SGD(model.parameters(), lr=0.0), Accelerator(cpu=True), batch, batch.rewards,
                     torch.Generator().manual_seed(0), MASK)
    assert len(spy.tau) == 2
    allowed = [{int(s) + 1 for s, m in zip(steps, row) if m} for steps, row in zip(batch.commit_step, mask)]
    for _, tau in spy.tau:
        assert all(int(t) in allowed[i] for i, t in enumerate(tau)), (tau, allowed)
    g = torch.Generator().manual_seed(0)
    prompt_mask(batch.prompt_attention, 0.0, g)
    assert not torch.equal(spy.tau[0][1], draw_tau(batch.nfe, g))  # the option changed the draw
    assert any(len(a) < int(k) for a, k in zip(allowed, batch.nfe))  # some passes committed only the tail


# ----------------------------------------------------------------------------- the weight's numerator

def replay(batch, p_mask, seed=0):
    """The trainer's first inner step's draws from its generator: the prompt mask, then tau."""
    g = torch.Generator().manual_seed(seed)
    masked = prompt_mask(batch.prompt_attention, p_mask, g)
    return masked, draw_tau(batch.nfe, g)


def hand_weights(model, batch, masked, tau, cap, unmasked_numerator):
    """w_j = min(C, pi_old(y_j | the numerator's prompt, the surrogate's canvas) / q_j), q_j the sampler's recorded
    behaviour probability; the numerator's prompt is the row's prompt with the trainer's masked tokens replaced by
    the mask token, or the whole prompt. Also the ratio's pi_old (masked prompt) by hand."""
    w, old = torch.zeros(batch.completion.shape), torch.zeros(batch.completion.shape)
    for i in range(batch.completion.shape[0]):
        real = batch.prompt_attention[i]
        prompt = batch.prompt_ids[i][real].tolist()
        noisy = [MASK if m else t for t, m in zip(prompt, masked[i][real].tolist())]
        seq, steps, t = batch.completion[i].tolist(), batch.commit_step[i].tolist(), int(tau[i])
        for_prompt = {}
        for p in {tuple(noisy), tuple(prompt)}:  # (pass A on all masks, pass B on z_tau) under that prompt
            for_prompt[p] = tuple(policy_logp(model, list(p), z(seq, steps, s)) for s in (0, t))
        numerator = tuple(prompt) if unmasked_numerator else tuple(noisy)
        for j, (token, s) in enumerate(zip(seq, steps)):
            if s < 0:
                continue
            late = int(s >= t)
            old[i, j] = for_prompt[tuple(noisy)][late][j, token]
            w[i, j] = min(cap, math.exp(for_prompt[numerator][late][j, token] - float(batch.behaviour_logprob[i, j])))
    return w, old


@pytest.mark.parametrize("numerator", ["masked", "unmasked"])
def test_is_weight_numerator_sees_the_prompt_the_option_names(spy, numerator):
    """p_mask 0.5: the clipped ratio's pi_old always scores under the masked prompt; the weight's numerator under
    the masked prompt (``masked``) or the whole prompt (``unmasked``), both by hand from the model before the
    update. The two prompts really differ in what they give the weight."""
    model = tiny_model(seed=3, init=0.3)
    batch = make_batch(model, PROMPTS, 2, [1, 0, 0, 1, 1, 0], temperature=1.0, **EB)
    masked, tau = replay(batch, 0.5)
    assert masked.any() and (batch.prompt_attention & ~masked).any()
    rl._model_update(cfg(algo="diffpo", p_mask=0.5, is_numerator=numerator, C=3.0), model, model, None,
                     torch.optim.SGD(model.parameters(), lr=0.5), Accelerator(cpu=True), batch, batch.rewards,
                     torch.Generator().manual_seed(0), MASK)
    before = tiny_model(seed=3, init=0.3)
    sampled = batch.commit_step >= 0
    (_, got_tau), ((_, old, _, _), kw) = spy.tau[0], spy.loss[0]
    assert torch.equal(got_tau, tau)
    want_w, want_old = hand_weights(before, batch, masked, tau, 3.0, numerator == "unmasked")
    other_w, _ = hand_weights(before, batch, masked, tau, 3.0, numerator != "unmasked")
    torch.testing.assert_close(old * sampled, want_old, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kw["is_weight"] * sampled, want_w, atol=1e-5, rtol=1e-5)
    assert (want_w - other_w)[sampled].abs().max() > 1e-2


def test_unmasked_numerator_at_p_mask_0_is_the_masked_one(spy, monkeypatch):
    """Nothing masked: both numerators are the ratio's pi_old, so the weights are equal (and the option costs no
    extra pass: the trainer reuses pi_old)."""
    model = tiny_model(seed=3, init=0.3)
    batch = make_batch(model, PROMPTS, 2, [1, 0, 0, 1, 1, 0], temperature=1.0, **EB)
    calls, weights, real = [], [], rl.surrogate_logprobs
    monkeypatch.setattr(rl, "surrogate_logprobs", lambda *args: calls.append(1) or real(*args))
    for numerator in ("masked", "unmasked"):
        calls.clear()
        rl._model_update(cfg(algo="diffpo", p_mask=0.0, is_numerator=numerator), model, model, None,
                         torch.optim.SGD(model.parameters(), lr=0.0), Accelerator(cpu=True), batch,
                         batch.rewards, torch.Generator().manual_seed(0), MASK)
        weights.append(spy.loss[-1][1]["is_weight"])
        assert len(calls) == 2  # pi_old, then the current model's surrogate
    assert torch.equal(weights[0], weights[1])


# ----------------------------------------------------------------------------- from the command lines

@pytest.mark.parametrize("flags, want", [
    ([], dict(is_numerator="masked", tau_over="all", p_mask=0.15)),
    (["--is-numerator", "unmasked", "--tau-over", "answer", "--p-mask", "0.3"],
     dict(is_numerator="unmasked", tau_over="answer", p_mask=0.3)),
])
def test_diffpo_train_rl_flags_reach_the_model_update(base_dir, tmp_path, monkeypatch, flags, want):
    """``diffpo-train rl`` parses the options into the config ``train_rl`` hands ``_model_update`` every step."""
    seen = []
    monkeypatch.setattr(rl, "_model_update", lambda config, *rest: seen.append(config) or {})
    argv = ["rl", "--model", str(base_dir), "--output-dir", str(tmp_path / "run"), "--tasks", "sudoku",
            "--train-examples", "4", "--num-generations", "2", "--prompts-per-step", "1", "--max-steps", "1",
            "--gen-length", "8", "--steps", "2", *flags]
    assert cli_main(argv) == 0
    assert len(seen) == 1
    assert {k: getattr(seen[0], k) for k in want} == want


def test_rl_curves_passes_its_knobs_to_every_run(monkeypatch, tmp_path):
    """``benchmarks/rl_curves.py``: --p-mask, --is-numerator, --tau-over, --lr and --num-generations reach each
    run's RLConfig (both algorithms), which lives under runs/bench_rl/TAG/TASK-ALGO-sSEED."""
    import benchmarks.rl_curves as rc
    configs = []

    class Stop(Exception):
        pass

    def fake_train(config):
        configs.append(config)
        raise Stop

    monkeypatch.setattr(rc, "train_rl", fake_train)
    monkeypatch.setattr(rc, "RUNS", tmp_path)
    for algo in ("d1", "diffpo"):
        with pytest.raises(Stop):
            rc.main(["--tasks", "countdown", "--seeds", "3", "--algos", algo, "--tag", "t", "--p-mask", "0",
                     "--is-numerator", "unmasked", "--tau-over", "answer", "--lr", "1e-4", "--num-generations", "16"])
    for config, algo in zip(configs, ("d1", "diffpo")):
        assert (config.algo, config.p_mask, config.is_numerator, config.tau_over, config.lr,
                config.num_generations, config.seed) == (algo, 0.0, "unmasked", "answer", 1e-4, 16, 3)
        assert config.output_dir == str(tmp_path / "t" / f"countdown-{algo}-s3")


def test_a_config_built_in_code_refuses_an_unknown_option_value():
    """argparse checks the flags' choices; a config built in code (benchmarks, tests) is checked too, naming the
    flag, so a typo cannot silently fall back to the default estimator."""
    from training.config import RLConfig
    with pytest.raises(ValueError, match=r"--tau-over 'answers': expected one of all, answer"):
        RLConfig(tau_over="answers")
    with pytest.raises(ValueError, match="--is-numerator"):
        RLConfig(is_numerator="none")
    assert RLConfig(dtype=None, tau_over="answer").tau_over == "answer"


def test_every_trainer_config_built_in_code_refuses_an_unknown_option_value():
    """sft, distill and eval check their choices as rl does (``--targets modle`` would otherwise train on the
    tokens), and every config's defaults are among its own choices."""
    import dataclasses

    from training.config import DistillConfig, EvalConfig, ExportConfig, SFTConfig
    with pytest.raises(ValueError, match=r"--targets 'modle': expected one of tokens, model"):
        SFTConfig(targets="modle")
    with pytest.raises(ValueError, match=r"--cache-loss 'all'"):
        DistillConfig(cache_loss="all")
    with pytest.raises(ValueError, match=r"--sampler 'fast'"):
        EvalConfig(sampler="fast")
    from training.config import RLConfig
    for cls in (SFTConfig, RLConfig, DistillConfig, EvalConfig, ExportConfig):
        cfg = cls()
        for f in dataclasses.fields(cls):
            if "choices" in f.metadata and f.default is not None:
                assert getattr(cfg, f.name) in f.metadata["choices"], (cls.__name__, f.name)
    assert SFTConfig().targets == "tokens" and DistillConfig().cache_loss == "off"


def test_a_config_names_an_unknown_task_before_anything_runs():
    from training.config import DistillConfig, EvalConfig, RLConfig, SFTConfig
    for make in (lambda: RLConfig(tasks="cd3,sudkou"), lambda: SFTConfig(tasks="sudkou"),
                 lambda: DistillConfig(tasks="cd3,sudkou"), lambda: EvalConfig(task="sudkou")):
        with pytest.raises(ValueError, match=r"unknown task 'sudkou'; valid tasks: sudoku, countdown, cd3"):
            make()
    assert RLConfig(tasks="sudoku_hard,cd3").tasks == "sudoku_hard,cd3"


@pytest.mark.parametrize("command,flag,default", [
    ("sft", "output_dir", "runs/sft"), ("sft", "tasks", "sudoku,cd3"), ("rl", "output_dir", "runs/rl"),
    ("rl", "tasks", "cd3"), ("distill", "output_dir", "runs/distill"), ("distill", "tasks", "sudoku,cd3"),
    ("eval", "task", "cd3"), ("distill", "device", "cpu"), ("eval", "device", "cpu")])
def test_each_command_s_documented_defaults(command, flag, default):
    """What a bare ``diffpo-train COMMAND`` writes to and trains on, as README's examples and --help state."""
    from training.cli import build_parser
    args = build_parser().parse_args([command])
    assert getattr(args, flag) == default


@pytest.mark.parametrize("command,unset", [
    ("sft", {"model", "data", "eval_data"}),
    ("rl", {"model", "data", "eval_data", "threshold", "gen_length", "block_length", "steps", "dtype", "device"}),
    ("distill", {"model", "data", "eval_data", "teacher_steps", "gen_length"}),
    ("eval", {"data", "model", "sampler", "threshold", "gen_length", "block_length", "steps", "t_min", "t_max",
              "stability_threshold", "confidence_threshold", "limit", "mask_id", "pad_id", "eos_id", "dtype",
              "output"}),
    ("export", {"checkpoint", "output", "base_model"})])
def test_options_a_bare_command_leaves_unset(command, unset):
    """The options that default to "not given" (the bundled model, the generated data, the model's own generation
    settings, ...) are exactly these: a bare command reads no file and overrides nothing it was not asked to."""
    from training.cli import build_parser
    args = vars(build_parser().parse_args([command]))
    assert {k for k, v in args.items() if v is None} == unset
