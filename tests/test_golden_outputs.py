"""Golden outputs: what the decoders produce today, frozen so that restructuring cannot change it.

One fixture (``tests/fixtures/golden/outputs.json``) holds, on the bundled model and tiny seeded native LLaDA,
Dream and DiffusionGemma checkpoints built here: greedy and seeded decodes of every masked sampler (``steps``,
``confidence``, ``eb``, ``learned``, ``policy``) in every cache mode (``off``, ``prefix``, ``dual``), with the
positions each pass committed, every row's NFE, commit steps, behaviour log-probs, thresholds and the head's
and the policy's choices; a batch whose rows join and leave between steps (as the server's batcher runs it);
the canvas paradigm (``eb`` and ``learned``, seeded), also through ``evaluate``'s flag mapping; and seeded RL
rollouts (``eb``, ``learned``, ``policy``) with their commit steps, behaviour log-probs and the policy's
decisions. Token ids, steps and counts must match exactly; log-probs and thresholds are stored to 5 decimals
and compared within ``TOLERANCE``.

The fixture was written once, before the decoders were restructured, with
``python tests/test_golden_outputs.py --write``, and is never edited: a change of output is a bug in the
change, not in the fixture. The one exception is a change of behaviour made on purpose: it is recorded beside
the fixture, in ``changes.json``, with its reason and its scope (a word every case it changes must name, e.g.
``policy``), as the new outputs of just the cases it changes (``python tests/test_golden_outputs.py
--record-change SCOPE "REASON"``); the test checks each recorded case really differs from the fixture and lies in
its scope, then compares everything else with the fixture as written.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "golden" / "outputs.json"
CHANGES = FIXTURE.parent / "changes.json"  # deliberate changes of behaviour, in order (see the module docstring)
TOLERANCE = 2e-4  # absolute, on log-probs, thresholds and other floats (stored rounded to 5 decimals)
DIGITS = 5

MASKED_SAMPLERS = ("steps", "confidence", "eb", "learned", "policy")
CACHE_MODES = ("off", "prefix", "dual")


def _floats(t: torch.Tensor) -> list:
    return [[round(float(v), DIGITS) for v in row] for row in t.tolist()] if t.dim() == 2 else \
        [round(float(v), DIGITS) for v in t.tolist()]


def _masked_record(state, passes: list) -> dict:
    """What a finished masked state holds, plus the commits of each pass ((row, positions) per running row)."""
    return {"sequences": state.generated.tolist(), "nfe": state.nfe.tolist(),
            "commit_step": state.commit_step.tolist(), "logprob": _floats(state.logprob),
            "threshold": _floats(state.threshold), "threshold_choice": state.threshold_choice.tolist(),
            "policy_logprob": _floats(state.policy_logprob), "passes": passes}


def _run_masked(model, state) -> list:
    from diffpo_serve.dllm.sampler import denoise_step
    passes = []
    while not bool(state.finished.all()):
        out = denoise_step(model, state)
        passes.append([[int(r), out.committed[k].nonzero().squeeze(-1).tolist()] for k, r in enumerate(out.rows)])
    return passes


def masked_decodes(loaded, prompts: list[list[int]], samplers=MASKED_SAMPLERS, caches=CACHE_MODES,
                   gen_length: int = 12, block_length: int = 4) -> dict:
    """Every sampler x cache mode, greedy and seeded (temperature 0.7, seeds 11 + row), on ``prompts``."""
    from diffpo_serve.dllm.sampler import SamplingParams, init_state
    out = {}
    for sampler in samplers:
        for cache in caches:
            for mode in ("greedy", "seeded"):
                base = SamplingParams(sampler=sampler, gen_length=gen_length, block_length=block_length, cache=cache,
                                      temperature=0.0 if mode == "greedy" else 0.7)
                params = [replace(base, seed=None if mode == "greedy" else 11 + i) for i in range(len(prompts))]
                state = init_state(prompts, params, mask_id=loaded.mask_id, eos_id=loaded.eos_id, pad_id=loaded.pad_id,
                                   eos_ids=loaded.eos_ids, head=loaded.threshold_head, policy=loaded.step_policy,
                                   sample_threshold=mode == "seeded", sample_commits=mode == "seeded")
                passes = _run_masked(loaded.model, state)
                out[f"{sampler}/{cache}/{mode}"] = _masked_record(state, passes)
    return out


def joining_batch(loaded, prompts: list[list[int]]) -> dict:
    """The batcher's use of the state: two rows start, a third joins after two passes (concat), finished rows are
    dropped (select); each row's output must be what it is alone (the fixture holds it, and the test checks)."""
    from diffpo_serve.dllm.sampler import BatchState, SamplingParams, denoise_step, init_state

    def state_of(ps, params):
        return init_state(ps, params, mask_id=loaded.mask_id, eos_id=loaded.eos_id, pad_id=loaded.pad_id,
                          eos_ids=loaded.eos_ids, head=loaded.threshold_head, policy=loaded.step_policy)

    params = [SamplingParams("eb", 10, block_length=5, threshold=0.4),
              SamplingParams("steps", 8, block_length=4, steps=4, cache="prefix"),
              SamplingParams("confidence", 12, block_length=6, temperature=0.9, seed=5)]
    state = state_of(prompts[:2], params[:2])
    ids = [0, 1]
    done: dict = {}
    log = []
    for n in range(40):
        if n == 2:
            state = BatchState.concat([state, state_of(prompts[2:3], params[2:3])])
            ids.append(2)
        out = denoise_step(loaded.model, state)
        log.append([[ids[int(r)], out.committed[k].nonzero().squeeze(-1).tolist()] for k, r in enumerate(out.rows)])
        keep = [k for k in range(state.batch_size) if not bool(state.finished[k])]
        for k in range(state.batch_size):
            if bool(state.finished[k]):
                done[ids[k]] = {"sequence": state.generated[k, :int(state.gen_length[k])].tolist(),
                                "nfe": int(state.nfe[k]),
                                "logprob": _floats(state.logprob[k, :int(state.gen_length[k])])}
        if not keep and n >= 2:
            break
        state = state.select(keep)
        ids = [ids[k] for k in keep]
    return {"rows": [done[i] for i in range(3)], "passes": log}


def canvas_decodes(loaded, prompts: list[list[int]]) -> dict:
    """The canvas paradigm, seeded: ``eb`` at two bounds and ``learned`` (the head's mode and its draw)."""
    from diffpo_serve.dllm import canvas
    denoiser = canvas.denoiser_for(loaded.model)
    out = {}
    cases = {"eb/0.5": (canvas.CanvasParams(gen_length=12, threshold=0.5), False),
             "eb/3": (canvas.CanvasParams(gen_length=20, threshold=3.0, steps=4), False),
             "learned/mode": (canvas.CanvasParams(gen_length=12, sampler="learned"), False),
             "learned/drawn": (canvas.CanvasParams(gen_length=12, sampler="learned"), True)}
    for name, (params, sample) in cases.items():
        rows = [replace(params, seed=3 + i) for i in range(len(prompts))]
        state = canvas.init_state(denoiser, prompts, rows, eos_ids=loaded.eos_ids, pad_id=loaded.pad_id,
                                  head=loaded.threshold_head, sample_threshold=sample)
        passes = []
        while not bool(state.finished.all()):
            step = canvas.denoise_step(denoiser, state)
            passes.append([[int(r), int(step.block[k]), step.accepted[k].nonzero().squeeze(-1).tolist()]
                           for k, r in enumerate(step.rows)])
        out[name] = {"sequences": state.generated.tolist(), "nfe": state.nfe.tolist(),
                     "encoder_passes": state.encoder_passes.tolist(), "threshold": _floats(state.threshold),
                     "threshold_choice": state.threshold_choice.tolist(), "passes": passes}
    return out


def evaluate_canvas(loaded) -> dict:
    """``diffpo-train eval``'s flags on a canvas model, mapped to its params, and the decode they give."""
    from training.config import EvalConfig
    from training.evaluate import canvas_params, evaluate
    from training.tasks import get_task
    cfg = EvalConfig(model=loaded.path, task="countdown", sampler="eb", threshold=0.8, steps=3, t_max=0.9, seed=4)
    params = canvas_params(cfg, loaded, 12)
    data = get_task("countdown").make_dataset("test", 3, seed=1)
    result = evaluate(loaded, "countdown", data, params, progress=False, chat_template=False)
    return {"params": {k: getattr(params, k) for k in ("gen_length", "threshold", "steps", "t_min", "t_max",
                                                         "sampler", "seed")},
            "rows": [{"completion": r["completion"], "nfe": r["nfe"], "encoder_passes": r["encoder_passes"],
                      "threshold": round(r["threshold"], DIGITS)} for r in result.rows],
            "mean_nfe": round(result.mean_nfe, DIGITS)}


def rollouts(loaded) -> dict:
    """Seeded RL rollouts (2 prompts x 3 rows): ``eb`` at T = 1, ``learned`` (drawn gammas), ``policy`` (drawn
    commits, with the policy's decisions)."""
    from diffpo_serve.dllm.sampler import SamplingParams
    from training.rollout import rollout
    examples = [{"prompt": "12+7=", "id": 0}, {"prompt": "sudoku 3", "id": 1}]

    def reward(text, example):
        return float(len(text) % 3) / 2

    out = {}
    cases = {"eb": (SamplingParams("eb", 12, block_length=4, threshold=0.5, temperature=1.0), None, None),
             "learned": (SamplingParams("learned", 12, block_length=6, temperature=0.8, top_p=0.9),
                         loaded.threshold_head, None),
             "policy": (SamplingParams("policy", 12, block_length=4, cache="dual"), None, loaded.step_policy)}
    for name, (params, head, policy) in cases.items():
        batch = rollout(loaded.model, loaded, examples, reward, 3, params, seed=21, head=head, policy=policy,
                        chat_template=False)
        record = {"completion": batch.completion.tolist(), "commit_step": batch.commit_step.tolist(),
                  "behaviour_logprob": _floats(batch.behaviour_logprob), "nfe": batch.nfe.tolist(),
                  "rewards": _floats(batch.rewards), "threshold": _floats(batch.threshold),
                  "threshold_choice": batch.threshold_choice.tolist(), "texts": batch.texts}
        if batch.policy_trace is not None:
            trace = batch.policy_trace
            record["policy_decisions"] = trace.decisions.long().sum(-1).tolist()
            record["policy_candidates"] = trace.candidates.long().sum(-1).tolist()
            record["policy_feature_sum"] = _floats(trace.features.sum((-1, -2)))
        out[name] = record
    return out


def golden_outputs(tmp: Path) -> dict:
    """Every frozen output (see the module docstring); checkpoints are written under ``tmp``. Runs on one CPU
    thread (as the fixture was written): tiny models are fastest so, and a reduction's order cannot vary."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _golden_outputs(tmp)
    finally:
        torch.set_num_threads(threads)


def _golden_outputs(tmp: Path) -> dict:
    for folder in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):  # tests/, benchmarks/
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import test_family_dream as dream_t
    import test_family_llada as llada_t
    import tiny_diffusion_gemma as dg_t
    from diffpo_serve.dllm.loading import load_model
    from diffpo_serve.dllm.threshold_head import ThresholdHead

    torch.manual_seed(0)
    bundled = load_model()
    texts = ["12+7=", "sudoku 4 1", "abc"]
    golden = {"bundled": masked_decodes(bundled, [bundled.encode(t) for t in texts]),
              "bundled/joining": joining_batch(bundled, [bundled.encode(t) for t in texts]),
              "bundled/rollouts": rollouts(bundled)}

    llada_t.write_checkpoint(tmp / "llada", seed=5)
    llada = load_model(tmp / "llada")
    llada_prompts = [[5, 9, 14, 30], [7], [40, 22, 11, 8, 4, 19]]
    golden["llada"] = masked_decodes(llada, llada_prompts, samplers=("steps", "confidence", "eb"))

    dream_t.write_checkpoint(tmp / "dream", dream_t.random_model(seed=4, init=0.3), dtype=torch.float32)
    dream = load_model(tmp / "dream")
    golden["dream"] = masked_decodes(dream, [p[:5] for p in dream_t.PROMPTS[:3]], samplers=("steps", "eb"))

    dg_t.write_checkpoint(tmp / "dg", dg_t.random_model(seed=3),
                          generation={"max_new_tokens": 16, "max_denoising_steps": 3,
                                      "sampler_config": {"entropy_bound": 0.5,
                                                         "_cls_name": "EntropyBoundSamplerConfig"}})
    gemma = load_model(tmp / "dg")
    torch.manual_seed(1)
    gemma.threshold_head = ThresholdHead(canvas_hidden_size(gemma), features="prompt+answer+eb").eval()
    golden["diffusion_gemma"] = canvas_decodes(gemma, [[7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18, 19]])
    golden["diffusion_gemma/evaluate"] = evaluate_canvas(gemma)
    return golden


def canvas_hidden_size(loaded) -> int:
    from diffpo_serve.dllm import canvas
    return canvas.denoiser_for(loaded.model).hidden_size


def compare(expected, got, where: str = "") -> list[str]:
    """Every difference between two golden trees: exact for ints, strings and structure, ``TOLERANCE`` for
    floats."""
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(expected) != set(got):
            return [f"{where}: keys {sorted(expected) if isinstance(expected, dict) else expected} != "
                    f"{sorted(got) if isinstance(got, dict) else got}"]
        return [d for k in expected for d in compare(expected[k], got[k], f"{where}/{k}")]
    if isinstance(expected, list):
        if not isinstance(got, list) or len(expected) != len(got):
            return [f"{where}: {expected} != {got}"]
        return [d for i, (e, g) in enumerate(zip(expected, got)) for d in compare(e, g, f"{where}[{i}]")]
    if isinstance(expected, float) or isinstance(got, float):
        same = isinstance(got, (int, float)) and (expected == got or (math.isnan(expected) and math.isnan(got)))
        if not (same or (isinstance(got, (int, float)) and abs(expected - got) <= TOLERANCE)):
            return [f"{where}: {expected} != {got}"]
        return []
    return [] if expected == got else [f"{where}: {expected!r} != {got!r}"]


def expected_outputs(changes: list[dict]) -> dict:
    """The fixture with each deliberate change's cases put in, checking that every recorded case lies in its
    change's scope and differs from what it replaces (a record that changes nothing would hide nothing, but also
    explain nothing)."""
    expected = json.loads(FIXTURE.read_text())
    for change in changes:
        for top, cases in change["cases"].items():
            for case, outputs in cases.items():
                assert change["scope"] in f"{top}/{case}", (change["reason"], top, case)
                assert compare(expected[top][case], outputs), f"{top}/{case}: recorded as changed, but is not"
                expected[top][case] = outputs
    return expected


def recorded_changes() -> list[dict]:
    return json.loads(CHANGES.read_text())["changes"] if CHANGES.exists() else []


def test_golden_outputs_are_unchanged(tmp_path):
    expected = expected_outputs(recorded_changes())
    got = json.loads(json.dumps(golden_outputs(tmp_path)))  # the same JSON round trip the fixture took
    differences = compare(expected, got)
    assert not differences, f"{len(differences)} golden output(s) changed, first ones:\n" + "\n".join(differences[:15])


def test_the_joining_batch_decodes_each_row_as_alone(tmp_path):
    """The batch path's fixture is itself right: each row of the joining batch equals the row decoded alone."""
    expected = json.loads(FIXTURE.read_text())
    joined = expected["bundled/joining"]["rows"]
    alone = {k: v for k, v in expected["bundled"].items()}
    assert alone  # the decodes of every sampler are in the fixture
    from diffpo_serve.dllm.loading import load_model
    from diffpo_serve.dllm.sampler import SamplingParams, init_state
    bundled = load_model()
    texts = ["12+7=", "sudoku 4 1", "abc"]
    params = [SamplingParams("eb", 10, block_length=5, threshold=0.4),
              SamplingParams("steps", 8, block_length=4, steps=4, cache="prefix"),
              SamplingParams("confidence", 12, block_length=6, temperature=0.9, seed=5)]
    for i, (text, p) in enumerate(zip(texts, params)):
        state = init_state([bundled.encode(text)], [p], mask_id=bundled.mask_id, eos_id=bundled.eos_id,
                           pad_id=bundled.pad_id, eos_ids=bundled.eos_ids)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _run_masked(bundled.model, state)
        finally:
            torch.set_num_threads(threads)
        assert state.generated[0, :p.gen_length].tolist() == joined[i]["sequence"]
        assert int(state.nfe[0]) == joined[i]["nfe"]


def test_compare_sees_a_changed_token_and_a_moved_logprob():
    """The comparison itself: tokens exact, floats within the tolerance."""
    tree = {"a": {"sequences": [[4, 5]], "logprob": [-0.12345]}}
    assert compare(tree, {"a": {"sequences": [[4, 5]], "logprob": [-0.12345 + TOLERANCE / 2]}}) == []
    assert compare(tree, {"a": {"sequences": [[4, 6]], "logprob": [-0.12345]}})
    assert compare(tree, {"a": {"sequences": [[4, 5]], "logprob": [-0.12345 + 3 * TOLERANCE]}})
    assert compare(tree, {"a": {"sequences": [[4, 5]]}})


def test_a_recorded_change_must_change_something_in_its_scope():
    """``expected_outputs`` refuses a record outside its scope or one equal to the fixture."""
    fixture = json.loads(FIXTURE.read_text())
    same = {"reason": "nothing", "scope": "policy", "cases": {"bundled": {"policy/off/greedy":
                                                                         fixture["bundled"]["policy/off/greedy"]}}}
    moved = json.loads(json.dumps(fixture["bundled"]["eb/off/greedy"]))
    moved["nfe"][0] += 1
    outside = {"reason": "eb moved", "scope": "policy", "cases": {"bundled": {"eb/off/greedy": moved}}}
    for change in (same, outside):
        try:
            expected_outputs([change])
        except AssertionError:
            continue
        raise AssertionError(f"accepted: {change['reason']}")
    inside = {"reason": "eb moved", "scope": "eb", "cases": {"bundled": {"eb/off/greedy": moved}}}
    assert expected_outputs([inside])["bundled"]["eb/off/greedy"]["nfe"][0] == fixture["bundled"]["eb/off/greedy"][
        "nfe"][0] + 1


if __name__ == "__main__":
    import tempfile
    if sys.argv[1:2] == ["--record-change"] and len(sys.argv) == 4:
        scope, reason = sys.argv[2:]
        changes = recorded_changes()
        expected = expected_outputs(changes)
        with tempfile.TemporaryDirectory() as tmp:
            outputs = json.loads(json.dumps(golden_outputs(Path(tmp))))
        cases = {top: {case: outputs[top][case] for case in expected[top]
                       if compare(expected[top][case], outputs[top][case])} for top in expected}
        cases = {top: found for top, found in cases.items() if found}
        changes.append({"reason": reason, "scope": scope, "cases": cases})
        expected_outputs(changes)  # every case in scope
        CHANGES.write_text(json.dumps({"changes": changes}, separators=(",", ":")) + "\n")
        sys.exit(f"recorded {sum(map(len, cases.values()))} changed case(s) in {CHANGES}: "
                 + ", ".join(f"{t}/{c}" for t, found in cases.items() for c in found))
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_golden_outputs.py --write  (only before the decoders change)\n"
                 "       python tests/test_golden_outputs.py --record-change SCOPE REASON  (a deliberate change)")
    with tempfile.TemporaryDirectory() as tmp:
        outputs = golden_outputs(Path(tmp))
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(outputs, separators=(",", ":")) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
