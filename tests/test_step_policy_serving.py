"""Serving the per-step commit policy: the batcher drives it per step, the API accepts it."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from conftest import EOS, MASK, PAD, tiny_model
from diffpo_serve.batcher import Batcher, RowRequest
from diffpo_serve.dllm.loading import LoadedModel
from diffpo_serve.dllm.sampler import SamplingParams, generate
from diffpo_serve.dllm.tokenizer import build_tokenizer
from diffpo_serve.protocol import APIError, CompletionRequest
from diffpo_serve.settings import ServerSettings
from test_server_batcher import final_updates, run_engine, settle
from test_step_policy import constant_policy, random_policy

IDS = dict(mask_id=MASK, eos_id=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def loaded():
    return LoadedModel(model=tiny_model(), tokenizer=build_tokenizer(), mask_id=MASK, pad_id=PAD, eos_id=EOS,
                       path="<memory>", name="tiny", max_length=512, step_policy=random_policy(5))


def test_policy_rows_joining_and_leaving_the_server_batch_equal_offline_generate(loaded):
    """Policy rows (their previous-argmax state in the batch) and other rows arrive between steps and
    leave when done; every row decodes as offline ``generate`` does alone."""
    requests = [
        [RowRequest([5, 6, 7], SamplingParams("policy", gen_length=16, block_length=4))],
        [RowRequest([10, 11], SamplingParams("eb", gen_length=8, threshold=0.5)),
         RowRequest([12, 13, 14, 15], SamplingParams("policy", gen_length=12, block_length=6, threshold=0.3))],
        [RowRequest([30], SamplingParams("policy", gen_length=24, block_length=8, threshold=0.8))],
        [RowRequest([40, 41, 42], SamplingParams("policy", gen_length=8, temperature=0.8, seed=1))],
    ]

    async def main():
        batcher = Batcher(loaded, max_batch_size=3)
        handles = []
        for step in range(80):
            if step in (0, 1, 3, 4):
                handles.append(batcher.submit(requests[len(handles)]))
            batcher.run_once()
        await settle()
        return final_updates(handles)

    results = asyncio.run(main())
    nfes = []
    for rows, finals in zip(requests, results):
        assert sorted(finals) == list(range(len(rows)))
        for choice, row in enumerate(rows):
            alone = generate(loaded.model, [row.prompt], row.params, **IDS, policy=loaded.step_policy)
            n = row.params.gen_length
            assert finals[choice].ids == alone.sequences[0, :n].tolist()
            assert finals[choice].nfe == int(alone.nfe[0])
            nfes.append(int(alone.nfe[0]))
    assert finals[0].threshold == pytest.approx(loaded.step_policy.threshold)  # the operating point is reported
    assert len(set(nfes)) > 2


def test_policy_is_the_default_sampler_of_a_model_that_has_one(loaded):
    req = CompletionRequest(model=loaded.name, prompt="countdown 1,2,3=6", max_tokens=8)
    policy = constant_policy(1.0)
    policy.threshold = 0.25
    r = run_engine(replace(loaded, step_policy=policy), req)
    assert r.choices[0].threshold == pytest.approx(0.25)
    knob = run_engine(replace(loaded, step_policy=policy),
                      CompletionRequest(model=loaded.name, prompt="countdown 1,2,3=6", max_tokens=8, sampler="policy",
                                        threshold=0.9))
    assert knob.choices[0].threshold == pytest.approx(0.9)
    forced = run_engine(loaded, req, settings=ServerSettings(default_sampler="eb"))
    assert forced.choices[0].threshold == pytest.approx(0.3)  # --default-sampler wins


def test_models_card_lists_the_samplers_this_model_runs(loaded):
    """/v1/models' `samplers`: `policy` only with a step policy, `learned` only with a threshold head; the
    default is the policy, else the head, else full steps."""
    from diffpo_serve.paradigms import paradigm_for
    from diffpo_serve.dllm.threshold_head import ThresholdHead

    head = ThresholdHead(loaded.model.config.hidden_size)
    cards = {name: paradigm_for(m).card(ServerSettings()) for name, m in [
        ("policy", loaded), ("neither", replace(loaded, step_policy=None)),
        ("head", replace(loaded, step_policy=None, threshold_head=head)),
        ("both", replace(loaded, threshold_head=head))]}
    assert cards["policy"]["samplers"] == ["steps", "confidence", "eb", "policy"]
    assert cards["neither"]["samplers"] == ["steps", "confidence", "eb"]
    assert cards["head"]["samplers"] == ["steps", "confidence", "eb", "learned"]
    assert cards["both"]["samplers"] == ["steps", "confidence", "eb", "learned", "policy"]
    assert [cards[k]["defaults"]["sampler"] for k in ("policy", "neither", "head", "both")] == \
        ["policy", "steps", "learned", "policy"]


def test_policy_sampler_needs_a_model_with_a_policy(loaded):
    without = replace(loaded, step_policy=None)
    with pytest.raises(APIError) as e:
        run_engine(without, CompletionRequest(model=without.name, prompt="ab", max_tokens=4, sampler="policy"))
    assert e.value.status == 400 and e.value.param == "sampler" and "step policy" in e.value.message
