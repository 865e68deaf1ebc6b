"""The random-canvas paradigm (diffpo_serve/dllm/canvas.py): its pure functions against transformers'
DiffusionGemma classes on the same inputs, the whole decode token for token against transformers' own
``generate`` at batch size 1, and batched decoding equal to decoding alone (rows of different lengths,
bounds and schedules, rows joining and leaving between steps)."""

import math

import pytest
import torch
from tiny_diffusion_gemma import BOS, EOS, PAD, TURN_END, random_model
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationMixin, EntropyBoundSampler, EntropyBoundSamplerConfig, LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria)

from diffpo_serve.dllm import canvas as cv
from diffpo_serve.dllm.families.diffusion_gemma import canvas_denoiser
from diffpo_serve.dllm.sampler import SAMPLERS, select_commits

EOS_IDS = [EOS, TURN_END]


@pytest.fixture(scope="module")
def model():
    return random_model(seed=0)


@pytest.fixture(scope="module")
def denoiser(model):
    return canvas_denoiser(model)


def random_logits(seed, shape=(4, 16, 64)):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[0], 1, 1, generator=g) * 8  # from near-uniform rows to peaked ones
    return torch.randn(shape, generator=g) * scale


# ----------------------------------------------------------------------------- the maths vs transformers' classes

def test_entropy_is_transformers_categorical_entropy():
    for seed in range(3):
        logits = random_logits(seed)
        assert torch.equal(cv.token_entropy(logits), torch.distributions.Categorical(logits=logits).entropy())
    # by hand: a uniform distribution over 4 has entropy log 4; a point mass 0
    assert torch.allclose(cv.token_entropy(torch.tensor([[0.0, 0, 0, 0], [0, -1e4, -1e4, -1e4]])),
                          torch.tensor([math.log(4), 0.0]))


def test_accept_rule_by_hand():
    # sorted entropies 0.02 (pos 2), 0.05 (pos 0), 0.3 (pos 1), 1.0 (pos 3); the sum of those before each:
    # 0, 0.02, 0.07, 0.37. Bound 0.1 accepts the first three, 0.01 only the first, 0.5 all.
    h = torch.tensor([[0.05, 0.3, 0.02, 1.0]] * 3)
    got = cv.accept_mask(h, torch.tensor([0.1, 0.01, 0.5]))
    assert got.tolist() == [[True, True, True, False], [False, False, True, False], [True, True, True, True]]
    # the bound is inclusive: a sum before that equals it exactly is accepted (0.25 + 0.5 = 0.75 in binary)
    assert cv.accept_mask(torch.tensor([[0.5, 0.25, 2.0]]), torch.tensor([0.75])).tolist() == [[True, True, True]]
    assert cv.accept_mask(torch.tensor([[0.5, 0.25, 2.0]]), torch.tensor([0.5])).tolist() == [[True, True, False]]
    # at least one position even with a zero bound: the lowest-entropy one
    assert cv.accept_mask(torch.tensor([[0.5, 0.2, 0.9]]), torch.tensor([0.0])).tolist() == [[False, True, False]]


@pytest.mark.parametrize("bound", [0.01, 0.1, 0.7, 3.0, 1000.0])
def test_accept_rule_selects_what_transformers_and_the_masked_eb_select(bound):
    """The issue's claim: DiffusionGemma's EntropyBoundSampler and diffpo's ``eb`` select the same positions on
    the same logits (here: all canvas positions are candidates)."""
    for seed in range(4):
        logits = random_logits(seed)
        ref = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 16, 64, 8)
        current, proposal = torch.zeros(4, 16, dtype=torch.long), torch.ones(4, 16, dtype=torch.long)
        accepted_canvas = ref.accept_canvas(current, proposal, logits, cur_step=3)
        ours = cv.accept_mask(cv.token_entropy(logits), torch.full((4,), bound))
        assert torch.equal(ours, ref.accepted_token_mask)
        assert torch.equal(accepted_canvas, torch.where(ours, proposal, current))
        h = cv.token_entropy(logits)
        eb = select_commits(torch.zeros_like(h), h, torch.ones_like(h, dtype=torch.bool),
                            torch.full((4,), SAMPLERS.index("eb")), torch.full((4,), bound), torch.ones(4, dtype=torch.long))
        assert torch.equal(ours, eb)
        assert 1 <= int(ours.sum(-1).min()) and (bound < 1000 or bool(ours.all()))  # 16 x log 64 < 1000


def test_renoise_is_transformers_renoise_with_the_same_stream():
    ref = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.1), 16, 64, 8)
    accepted = torch.rand(1, 16, generator=torch.Generator().manual_seed(0)) < 0.4
    proposal = torch.arange(16)[None] + 100  # out of the vocabulary: kept positions are recognisable
    ref.accepted_token_mask = accepted
    torch.manual_seed(7)
    expected = ref.renoise_canvas(proposal, cur_step=2)
    noise = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(7))
    got = cv.renoise(proposal, accepted, noise)
    assert torch.equal(got, expected)
    assert torch.equal(got[accepted], proposal[accepted]) and bool((got[~accepted] < 64).all())


def test_temperature_schedule_is_transformers_schedule():
    steps, t_min, t_max = 7, 0.4, 0.8
    ref = LinearTemperatureScheduleLogitsProcessor(t_min=t_min, t_max=t_max, max_denoising_steps=steps)
    logits = random_logits(1, (1, 4, 64))
    for m in range(steps, 0, -1):  # transformers counts the steps remaining, N .. 1
        expected = ref(None, logits, cur_step=torch.tensor(m, dtype=torch.int32))
        t = cv.schedule_temperature(torch.tensor([m]), torch.tensor([steps]), torch.tensor([t_min]),
                                    torch.tensor([t_max - t_min]))
        assert torch.equal(logits / t[:, None, None], expected)
    first = cv.schedule_temperature(torch.tensor([7, 1]), torch.tensor([7, 7]), torch.tensor([0.4, 0.4]),
                                    torch.tensor([0.4, 0.4]))
    assert torch.allclose(first, torch.tensor([0.8, 0.4 + 0.4 / 7]))  # t_max first; never quite t_min


@pytest.mark.parametrize("stability", [0, 1, 2, 3])
def test_stopping_is_transformers_stable_and_confident(stability):
    ref = StableAndConfidentStoppingCriteria(stability_threshold=stability, confidence_threshold=1.5)
    g = torch.Generator().manual_seed(stability)
    history = torch.full((3, max(stability, 1), 8), -1)
    base = torch.randint(0, 64, (3, 8), generator=g)
    for step in range(6):
        argmax = base.clone()
        argmax[0, step % 8] = 63 - step  # row 0 keeps changing; rows 1, 2 stay put
        if step == 3:
            argmax[2, 0] += 1  # row 2 changes once
        logits = random_logits(step, (3, 8, 64))
        expected = ref(argmax, logits)
        stable, history = cv.stable_rows(history, argmax, torch.full((3,), stability))
        confident = cv.confident_rows(cv.token_entropy(logits), torch.full((3,), 1.5))
        assert torch.equal(stable & confident, expected)
    # by hand: with stability 1, row 1 has been stable since its second step
    if stability == 1:
        assert stable.tolist() == [False, True, True]


def test_finish_block_pads_after_the_first_eos_like_transformers():
    tokens = torch.tensor([[5, EOS, 6, TURN_END, 7], [5, 6, 7, 8, 9], [TURN_END, 5, 6, 7, 8]])
    got, ended = cv.finish_block(tokens, torch.tensor(EOS_IDS), PAD)
    assert got.tolist() == [[5, EOS, PAD, PAD, PAD], [5, 6, 7, 8, 9], [TURN_END, PAD, PAD, PAD, PAD]]
    assert ended.tolist() == [True, False, True]


class _Config:
    pad_token_id, eos_token_id = PAD, EOS_IDS


def test_finish_block_matches_transformers_finalize():
    from transformers.generation import EosTokenCriteria, StoppingCriteriaList
    for seed in range(5):
        tokens = torch.randint(0, 8, (3, 6), generator=torch.Generator().manual_seed(seed))
        ids = torch.cat([torch.full((3, 2), 9), tokens], 1)
        expected, finished = DiffusionGemmaGenerationMixin._finalize_canvas(
            ids.clone(), torch.zeros(3, dtype=torch.bool), _Config, StoppingCriteriaList([EosTokenCriteria(EOS_IDS)]),
            6, torch.tensor(EOS_IDS))
        got, ended = cv.finish_block(tokens, torch.tensor(EOS_IDS), PAD)
        assert torch.equal(got, expected[:, 2:]) and torch.equal(ended, finished)


# ----------------------------------------------------------------------------- the decode vs transformers' generate

SETTINGS = [  # (gen_length, CanvasParams fields): early stops, no early stop, several blocks, wide bounds
    (24, dict(steps=4, threshold=0.1, stability_threshold=1, confidence_threshold=0.005)),
    (16, dict(steps=5, threshold=1.0, stability_threshold=1, confidence_threshold=5.0)),
    (24, dict(steps=4, threshold=3.0, stability_threshold=2, confidence_threshold=3.5, t_min=0.2, t_max=1.3)),
    (32, dict(steps=3, threshold=0.5, stability_threshold=0, confidence_threshold=2.0)),
]


def transformers_generate(model, prompt, gen_length, seed, p):
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=gen_length, eos_token_id=EOS_IDS, pad_token_id=PAD,
                         max_denoising_steps=p["steps"], sampler_config=EntropyBoundSamplerConfig(p["threshold"]),
                         t_min=p.get("t_min", 0.4), t_max=p.get("t_max", 0.8),
                         stability_threshold=p["stability_threshold"], confidence_threshold=p["confidence_threshold"])
    return out.sequences[0, len(prompt):], out.tokens_per_forward


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_token_identical_to_transformers_generate(model, denoiser, setting):
    gen_length, p = SETTINGS[setting]
    prompt = [BOS, 9, 10, 11, 12, 13, 14, 15, 16, 17]  # longer than the sliding window (8)
    outcomes = set()
    for seed in range(3):
        expected, tokens_per_forward = transformers_generate(model, prompt, gen_length, seed, p)
        out = cv.generate(denoiser, [prompt], cv.CanvasParams(gen_length=gen_length, seed=seed, **p),
                          eos_ids=EOS_IDS, pad_id=PAD)
        n = len(expected)
        assert torch.equal(out.sequences[0, :n], expected)
        assert bool((out.sequences[0, n:] == PAD).all())  # transformers stops after an EOS block
        # NFE is transformers' count of decoder passes: its tokens_per_forward = non-pad tokens / passes
        assert math.isclose(float(tokens_per_forward), int((expected != PAD).sum()) / int(out.nfe[0]), rel_tol=1e-6)
        assert int(out.encoder_passes[0]) == int(out.blocks[0]) == n // 8
        outcomes.add(tuple(expected.tolist()))
    assert len(outcomes) == 3  # the seeds lead to different decodes: the comparison is not vacuous


def test_settings_exercise_eos_and_length(denoiser):
    """The settings above end rows both ways: by an EOS in a block, and by reaching their length."""
    ended = []
    for gen_length, p in SETTINGS:
        for seed in range(3):
            out = cv.generate(denoiser, [[BOS, 9, 10, 11, 12, 13, 14, 15, 16, 17]],
                              cv.CanvasParams(gen_length=gen_length, seed=seed, **p), eos_ids=EOS_IDS, pad_id=PAD)
            ended.append(bool(torch.isin(out.sequences[0], torch.tensor(EOS_IDS)).any()))
    assert any(ended) and not all(ended)


@pytest.fixture(scope="module")
def blind_model():
    """A decoder blind to its canvas: untied embeddings, the decoder's zeroed, so its argmax depends on the prompt
    and its own previous logits only and settles, and blocks stop early by stability and confidence (a random
    model's argmax follows the re-randomised canvas and never settles)."""
    from tiny_diffusion_gemma import tiny_config
    from transformers import DiffusionGemmaForBlockDiffusion
    torch.manual_seed(0)
    config = tiny_config(init=1.0)
    config.tie_word_embeddings = False
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.zero_()
    return model


@pytest.mark.parametrize("p", [dict(steps=5, threshold=0.5, stability_threshold=1, confidence_threshold=5.0),
                               dict(steps=5, threshold=0.5, stability_threshold=2, confidence_threshold=5.0),
                               dict(steps=6, threshold=0.5, stability_threshold=1, confidence_threshold=0.5)])
def test_early_stops_token_identical_to_transformers(blind_model, p):
    denoiser = canvas_denoiser(blind_model)
    prompt = [BOS, 9, 10, 11, 12, 13, 14]
    stopped_early = 0
    for seed in range(2):
        expected, tokens_per_forward = transformers_generate(blind_model, prompt, 16, seed, p)
        out = cv.generate(denoiser, [prompt], cv.CanvasParams(gen_length=16, seed=seed, **p), eos_ids=EOS_IDS,
                          pad_id=PAD)
        assert torch.equal(out.sequences[0, :len(expected)], expected)
        assert math.isclose(float(tokens_per_forward), int((expected != PAD).sum()) / int(out.nfe[0]), rel_tol=1e-6)
        stopped_early += int(out.nfe[0]) < int(out.blocks[0]) * p["steps"]
    assert stopped_early == 2


# ----------------------------------------------------------------------------- batches

PROMPTS = [[BOS, 9, 10, 11, 12, 13, 14], [BOS, 8], list(range(6, 19))]
PARAMS = [cv.CanvasParams(gen_length=24, steps=5, seed=1, threshold=0.5, confidence_threshold=5.0),
          cv.CanvasParams(gen_length=16, steps=4, seed=2, threshold=0.1),
          cv.CanvasParams(gen_length=20, steps=6, seed=3, threshold=2.0, stability_threshold=2, confidence_threshold=3.0)]


@pytest.fixture(scope="module")
def alone(denoiser):
    return [cv.generate(denoiser, [p], q, eos_ids=EOS_IDS, pad_id=PAD) for p, q in zip(PROMPTS, PARAMS)]


def assert_same(batch_row, alone_row):
    n = alone_row.sequences.shape[1]
    assert torch.equal(batch_row[:n], alone_row.sequences[0]) and bool((batch_row[n:] == PAD).all())


def test_batch_equals_alone(denoiser, alone):
    """Rows with different prompt lengths (one beyond the sliding window), bounds, steps, schedules and
    lengths decode in one batch exactly as each alone; each row's NFE is its own."""
    batch = cv.generate(denoiser, PROMPTS, PARAMS, eos_ids=EOS_IDS, pad_id=PAD)
    for i in range(3):
        assert_same(batch.sequences[i], alone[i])
        assert int(batch.nfe[i]) == int(alone[i].nfe[0]) and int(batch.encoder_passes[i]) == int(alone[i].blocks[0])
    assert len({int(n) for n in batch.nfe}) > 1


def test_rows_join_and_leave_between_steps(denoiser, alone):
    """Row 0 starts alone; row 1 joins after two steps (mid-block for row 0), row 2 after five; finished rows are
    dropped as the server's batcher drops them. Every row's tokens and NFE are its tokens and NFE alone."""
    state = cv.init_state(denoiser, PROMPTS[:1], PARAMS[:1], eos_ids=EOS_IDS, pad_id=PAD)
    joins = {2: 1, 5: 2}  # after step -> row
    ids, done = [0], {}
    for step in range(1, 100):
        cv.denoise_step(denoiser, state)
        for k in range(state.batch_size):
            if bool(state.finished[k]):
                done[ids[k]] = (state.generated[k].clone(), int(state.nfe[k]))
        keep = [k for k in range(state.batch_size) if not bool(state.finished[k])]
        state, ids = state.select(keep), [ids[k] for k in keep]
        if step in joins:
            assert ids  # the newcomer joins a running batch (row 0 is mid-block at step 2)
            i = joins[step]
            state = cv.CanvasState.concat([state, cv.init_state(denoiser, [PROMPTS[i]], [PARAMS[i]],
                                                                 eos_ids=EOS_IDS, pad_id=PAD)])
            ids.append(i)
        if not ids:
            break
    assert sorted(done) == [0, 1, 2]
    for i in range(3):
        assert_same(done[i][0], alone[i])
        assert done[i][1] == int(alone[i].nfe[0])


def test_nfe_counts_decoder_passes(denoiser):
    calls = {"encode": 0, "decode": 0}

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def encode(self, *a):
            calls["encode"] += 1
            return self.inner.encode(*a)

        def decode(self, *a):
            calls["decode"] += 1
            return self.inner.decode(*a)

    out = cv.generate(Counting(denoiser), [PROMPTS[1]], [PARAMS[1]], eos_ids=EOS_IDS, pad_id=PAD)
    assert calls == {"encode": int(out.encoder_passes[0]), "decode": int(out.nfe[0])}


def test_params_validation_and_defaults(denoiser):
    resolved = cv.CanvasParams(threshold=0.3).resolved(denoiser.defaults)
    assert (resolved.gen_length, resolved.steps, resolved.threshold, resolved.t_min, resolved.t_max) == \
        (256, 48, 0.3, 0.4, 0.8)
    for bad, message in [(dict(threshold=-0.1), "entropy bound"), (dict(steps=0), "steps"),
                         (dict(t_min=0.9, t_max=0.5), "temperature"), (dict(t_min=0.0, t_max=0.0), "temperature"),
                         (dict(stability_threshold=-1), "stability"), (dict(confidence_threshold=math.nan), "confidence"),
                         (dict(gen_length=0), "gen_length")]:
        with pytest.raises(ValueError, match=message):
            cv.CanvasParams(**bad).resolved(denoiser.defaults)
    # the smallest valid values are accepted: one token, one step
    edge = cv.CanvasParams(gen_length=1, steps=1).resolved(denoiser.defaults)
    assert (edge.gen_length, edge.steps) == (1, 1)


def test_masked_models_have_no_canvas_interface():
    from conftest import tiny_model
    with pytest.raises(ValueError, match="does not decode in the canvas paradigm"):
        cv.denoiser_for(tiny_model())


# ----------------------------------------------------------------------------- the learned bound (threshold head)

def canvas_head(denoiser, k=None, features="prompt+answer+eb", seed=0):
    from diffpo_serve.dllm.threshold_head import ThresholdHead
    torch.manual_seed(seed)
    head = ThresholdHead(denoiser.hidden_size, features=features).eval()
    if k is not None:
        from test_threshold_head import always
        always(head, k)
    return head


@pytest.mark.parametrize("k", [0, 6, 12])
def test_learned_with_a_fixed_head_equals_eb(denoiser, k):
    """A head that always picks grid index k decodes every row token for token as ``eb`` at that bound (same
    seeds), reports it, and the head's pick costs no decoder pass."""
    head = canvas_head(denoiser, k)
    gamma = float(head.grid[k])
    learned = cv.generate(denoiser, PROMPTS, [cv.CanvasParams(gen_length=16, steps=4, seed=s, sampler="learned")
                                              for s in range(3)], eos_ids=EOS_IDS, pad_id=PAD, head=head)
    eb = cv.generate(denoiser, PROMPTS, [cv.CanvasParams(gen_length=16, steps=4, seed=s, threshold=gamma)
                                         for s in range(3)], eos_ids=EOS_IDS, pad_id=PAD)
    assert torch.equal(learned.sequences, eb.sequences) and torch.equal(learned.nfe, eb.nfe)
    assert learned.threshold_choice.tolist() == [k] * 3 and eb.threshold_choice.tolist() == [-1] * 3
    assert torch.allclose(learned.threshold, torch.full((3,), gamma))


def test_the_heads_bound_changes_the_decode(denoiser):
    """Not vacuous: the smallest and the largest bound of the grid decode differently (NFE or tokens)."""
    outs = [cv.generate(denoiser, PROMPTS, [cv.CanvasParams(gen_length=16, steps=4, seed=s, sampler="learned")
                                            for s in range(3)], eos_ids=EOS_IDS, pad_id=PAD,
                        head=canvas_head(denoiser, k)) for k in (0, 12)]
    assert not torch.equal(outs[0].sequences, outs[1].sequences)


def test_head_reads_the_first_pass_prompt_canvas_and_entropies(denoiser):
    """By hand: a `prompt+answer+eb` head reads the mean of the encoder's final hidden states over the prompt,
    the mean of the decoder's over the first (random) canvas, and the eb commit fractions and mean entropy of
    that pass's entropies of the processed logits (T = t_max at a block's first step): what the accept rule
    compares with the bound."""
    from diffpo_serve.dllm.threshold_head import eb_commit_fractions
    head = canvas_head(denoiser)
    prompt, seed, t_max = PROMPTS[0], 5, 0.9
    out = cv.generate(denoiser, [prompt], cv.CanvasParams(gen_length=8, steps=3, seed=seed, sampler="learned",
                                                          t_max=t_max), eos_ids=EOS_IDS, pad_id=PAD, head=head)
    cache, enc = denoiser.encode(torch.tensor(prompt), 0, None, return_hidden=True)
    z = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(seed))  # the row's first draw
    logits, dec = denoiser.decode(z, torch.tensor([len(prompt)]), [cache], None, return_hidden=True)
    entropy = cv.token_entropy(logits / t_max)
    expected = torch.cat([enc[0].mean(0), dec[0].mean(0),
                          eb_commit_fractions(entropy, torch.ones_like(entropy, dtype=torch.bool), head.grid)[0]])
    torch.testing.assert_close(out.head_features[0], expected, rtol=0, atol=1e-5)
    assert int(out.threshold_choice[0]) == int(head(expected[None]).argmax())


def test_sampled_bounds_are_seeded_per_row_and_batch_invariant(denoiser):
    """With ``sample_threshold`` each row draws its bound from its own generator: the same draws in any order
    of the batch, and different seeds draw different bounds."""
    head = canvas_head(denoiser, features="prompt")
    params = [cv.CanvasParams(gen_length=8, steps=3, seed=s, sampler="learned") for s in range(6)]
    prompts = [PROMPTS[s % 3] for s in range(6)]
    a = cv.generate(denoiser, prompts, params, eos_ids=EOS_IDS, pad_id=PAD, head=head, sample_threshold=True)
    b = cv.generate(denoiser, prompts[::-1], params[::-1], eos_ids=EOS_IDS, pad_id=PAD, head=head,
                    sample_threshold=True)
    assert a.threshold_choice.tolist() == b.threshold_choice.flip(0).tolist()
    assert torch.equal(a.sequences, b.sequences.flip(0))
    assert len(set(a.threshold_choice.tolist())) > 1


def test_learned_needs_a_head_and_a_canvas_sampler(denoiser):
    with pytest.raises(ValueError, match="threshold head"):
        cv.init_state(denoiser, PROMPTS[:1], cv.CanvasParams(sampler="learned"), eos_ids=EOS_IDS, pad_id=PAD)
    with pytest.raises(ValueError, match="sampler must be one of eb, learned"):
        cv.CanvasParams(sampler="steps").resolved(denoiser.defaults)
    from diffpo_serve.dllm.threshold_head import ThresholdHead
    with pytest.raises(ValueError, match="hidden states of width 32"):
        cv.init_state(denoiser, PROMPTS[:1], cv.CanvasParams(sampler="learned"), eos_ids=EOS_IDS, pad_id=PAD,
                      head=ThresholdHead(32))
    # a given threshold overrides the head, as for masked models
    given = cv.CanvasParams(sampler="learned", threshold=0.5).resolved(denoiser.defaults)
    assert given.threshold == 0.5


def test_select_keeps_the_widest_selected_rows_generation_region(denoiser):
    """Selecting rows trims the generation region to the most blocks any selected row needs, never fewer."""
    c = denoiser.canvas_length
    params = [cv.CanvasParams(gen_length=c, threshold=0.1), cv.CanvasParams(gen_length=2 * c, threshold=0.1)]
    state = cv.init_state(denoiser, PROMPTS[:2], params, eos_ids=EOS_IDS, pad_id=PAD)
    assert state.num_blocks.tolist() == [1, 2] and state.generated.shape[1] == 2 * c
    assert state.select([0, 1]).generated.shape[1] == 2 * c
    assert state.select([1]).generated.shape[1] == 2 * c
    assert state.select([0]).generated.shape[1] == c


def test_confidence_stop_is_strict_as_transformers():
    """A row stops early when its mean token entropy is below the threshold; equal is not below (transformers'
    DiffusionGemma stopping criterion compares with <)."""
    entropy = torch.tensor([[0.25, 0.75], [0.25, 0.25], [1.0, 0.0]])  # means 0.5, 0.25, 0.5 (exact in binary)
    assert cv.confident_rows(entropy, torch.tensor([0.5, 0.5, 0.75])).tolist() == [False, True, True]


def test_each_blocks_first_step_sees_an_empty_argmax_history(denoiser):
    """The stability rule compares a block's argmaxes with its own earlier ones only: the history is empty (-1)
    at the start, and emptied when a row's next block begins, so after a block's first step it holds that one
    argmax and -1 before it."""
    c = denoiser.canvas_length
    params = cv.CanvasParams(gen_length=2 * c, steps=3, seed=4, threshold=0.1, stability_threshold=3)
    state = cv.init_state(denoiser, PROMPTS[:1], params, eos_ids=(), pad_id=PAD)
    assert state.history.shape == (1, 3, c) and (state.history == -1).all()
    seen = []
    while not bool(state.finished[0]):
        cv.denoise_step(denoiser, state)
        if int(state.block_step[0]) == 1:
            seen.append(int(state.block[0]))
            assert (state.history[0, :-1] == -1).all() and torch.equal(state.history[0, -1], state.argmax[0])
    assert seen == [0, 1]


def test_a_learned_row_joining_a_running_batch_gets_its_own_bound(denoiser):
    """The head picks a joining row's bound from that row's own first pass, also when the batch's other rows
    are mid-block or finished and still held (the head then runs for some rows only, whose step positions
    differ from their state rows): each row's choice and decode are its own alone."""
    head = canvas_head(denoiser, seed=4)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(20)  # a random head with sharp preferences (at init it picks one bound for every prompt)
    params = [cv.CanvasParams(gen_length=16, steps=4, seed=s, sampler="learned") for s in range(3)]
    alone = [cv.generate(denoiser, [PROMPTS[i]], [params[i]], eos_ids=EOS_IDS, pad_id=PAD, head=head)
             for i in range(3)]
    assert len({int(a.threshold_choice[0]) for a in alone}) > 1  # the head tells the prompts apart
    state = cv.init_state(denoiser, PROMPTS[:1], params[:1], eos_ids=EOS_IDS, pad_id=PAD, head=head)
    for step in range(1, 100):  # finished rows stay in the state (not selected away)
        cv.denoise_step(denoiser, state)
        if step in (1, int(alone[0].nfe[0])):  # row 1 while row 0 runs, row 2 once row 0 has finished
            i = state.batch_size
            state = cv.CanvasState.concat([state, cv.init_state(denoiser, [PROMPTS[i]], [params[i]], eos_ids=EOS_IDS,
                                                                 pad_id=PAD, head=head)])
        if state.batch_size == 3 and bool(state.finished.all()):
            break
    assert int(alone[0].nfe[0]) > 1
    done = {i: (state.generated[i], int(state.threshold_choice[i])) for i in range(3)}
    for i in range(3):
        assert_same(done[i][0], alone[i])
        assert done[i][1] == int(alone[i].threshold_choice[0])


def test_concat_pads_a_shallower_argmax_history_with_empty_entries(denoiser):
    """Rows with different stability thresholds share one history depth: a shallower row's history gains empty
    (-1) entries on its old side, never a token id, so its stability check is unchanged."""
    shallow = cv.init_state(denoiser, PROMPTS[:1], cv.CanvasParams(gen_length=16, threshold=0.1,
                                                                   stability_threshold=1), eos_ids=EOS_IDS, pad_id=PAD)
    cv.denoise_step(denoiser, shallow)
    deep = cv.init_state(denoiser, PROMPTS[1:2], cv.CanvasParams(gen_length=16, threshold=0.1, stability_threshold=3),
                         eos_ids=EOS_IDS, pad_id=PAD)
    both = cv.CanvasState.concat([shallow, deep])
    assert both.history.shape[1] == 3
    assert (both.history[0, :2] == -1).all() and torch.equal(both.history[0, 2], shallow.history[0, 0])
    assert (both.history[1] == -1).all()


def test_on_step_sees_the_state_then_the_steps_output(denoiser):
    """``generate``'s hook gets (state, step output) after every step: as many calls as the longest row's passes."""
    seen = []
    out = cv.generate(denoiser, PROMPTS, PARAMS, eos_ids=EOS_IDS, pad_id=PAD,
                      on_step=lambda state, step: seen.append((type(state), type(step))))
    assert seen == [(cv.CanvasState, cv.CanvasStepOutput)] * int(out.nfe.max())
