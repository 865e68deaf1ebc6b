"""The batcher and the serving layer without HTTP: joining, leaving, cancelling, draining, text and settings."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest
import torch

from conftest import EOS, MASK, PAD, tiny_model
from diffpo_serve.batcher import BatchFailure, Batcher, Draining, QueueFull, RowRequest, RowUpdate
from diffpo_serve.cli import build_parser, parse_settings
from diffpo_serve.dllm.loading import LoadedModel
from diffpo_serve.dllm.sampler import SamplingParams, generate
from diffpo_serve.dllm.tokenizer import build_tokenizer
from diffpo_serve.dllm.threshold_head import ThresholdHead
from diffpo_serve.engine import ChoiceText, Engine, find_stop, held_back
from diffpo_serve.metrics import ServerMetrics
from diffpo_serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from diffpo_serve.settings import ServerSettings
from test_server_support import scripted_loaded
from test_threshold_head import always

IDS = dict(mask_id=MASK, eos_id=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def loaded():
    return LoadedModel(model=tiny_model(), tokenizer=build_tokenizer(), mask_id=MASK, pad_id=PAD, eos_id=EOS,
                       path="<memory>", name="tiny", max_length=512)


def drain_events(handle) -> list:
    out = []
    while not handle.events.empty():
        out.append(handle.events.get_nowait())
    return out


def final_updates(handles) -> dict:
    """choice -> last RowUpdate of each handle (events already delivered to the loop)."""
    return [{e.choice: e for e in drain_events(h) if isinstance(e, RowUpdate) and e.finished} for h in handles]


async def settle():
    for _ in range(3):
        await asyncio.sleep(0)


# ----------------------------------------------------------------------------- batching invariance

def test_rows_joining_and_leaving_mid_flight_equal_alone(loaded):
    """Requests arrive between steps with different params; every row equals its solo decode."""
    requests = [
        [RowRequest([5, 6, 7], SamplingParams(sampler="eb", gen_length=16, block_length=4, threshold=0.5))],
        [RowRequest([10, 11], SamplingParams(sampler="steps", gen_length=8, steps=4)),
         RowRequest([12, 13, 14, 15], SamplingParams(sampler="confidence", gen_length=12, block_length=6,
                                                     threshold=0.7))],
        [RowRequest([30], SamplingParams(sampler="eb", gen_length=24, block_length=8, temperature=1.0, seed=7))],
        [RowRequest([40, 41, 42], SamplingParams(sampler="eb", gen_length=4, temperature=0.8, seed=1))],
    ]

    async def main():
        batcher = Batcher(loaded, max_batch_size=3)
        handles = []
        for step in range(60):
            if step in (0, 2, 3, 5):
                handles.append(batcher.submit(requests[len(handles)]))
            batcher.run_once()
            assert batcher.stats()["active_rows"] <= 3
        await settle()
        return final_updates(handles)

    results = asyncio.run(main())
    for rows, finals in zip(requests, results):
        assert sorted(finals) == list(range(len(rows)))
        for choice, row in enumerate(rows):
            alone = generate(loaded.model, [row.prompt], row.params, **IDS)
            n = row.params.gen_length
            assert finals[choice].ids == alone.sequences[0, :n].tolist()
            assert finals[choice].nfe == int(alone.nfe[0])


def test_half_precision_rows_joining_and_leaving_equal_alone():
    """bfloat16: long and short prompts join and leave (the prompt region grows past 16 columns and is
    trimmed back); every row still equals its solo decode, as in float32."""
    model = tiny_model(init=0.1).to(torch.bfloat16)
    half = LoadedModel(model=model, tokenizer=build_tokenizer(), mask_id=MASK, pad_id=PAD, eos_id=EOS,
                       path="<memory>", name="tiny", max_length=512)
    g = torch.Generator().manual_seed(1)
    lengths = [3, 20, 2, 17, 5, 33, 9, 1]
    requests = [[RowRequest(torch.randint(3, 100, (n,), generator=g).tolist(),
                            SamplingParams("eb", 8 + 4 * (i % 3), block_length=4, threshold=0.3))]
                for i, n in enumerate(lengths)]

    async def main():
        batcher = Batcher(half, max_batch_size=3)
        handles = []
        for step in range(80):
            if step % 2 == 0 and len(handles) < len(requests):
                handles.append(batcher.submit(requests[len(handles)]))
            batcher.run_once()
        await settle()
        return final_updates(handles)

    for rows, finals in zip(requests, asyncio.run(main())):
        row = rows[0]
        alone = generate(model, [row.prompt], row.params, **IDS)
        assert finals[0].ids == alone.sequences[0, :row.params.gen_length].tolist()
        assert finals[0].nfe == int(alone.nfe[0])


def test_seeded_row_is_batch_independent_next_to_wider_rows(loaded):
    """Regression: a sampled row's draws must not depend on the batch's generation width."""
    p = SamplingParams(sampler="eb", gen_length=8, temperature=1.0, seed=3)
    wide = SamplingParams(sampler="eb", gen_length=32, temperature=1.0, seed=4)
    alone = generate(loaded.model, [[5, 6, 7]], p, **IDS)
    batched = generate(loaded.model, [[5, 6, 7], [9, 9]], [p, wide], **IDS)
    assert batched.sequences[0, :8].tolist() == alone.sequences[0].tolist()


def test_updates_come_per_block_with_determined_prefixes(loaded):
    params = SamplingParams(sampler="eb", gen_length=16, block_length=4, threshold=0.0)

    async def main():
        batcher = Batcher(loaded)
        handle = batcher.submit([RowRequest([5, 6], params)])
        for _ in range(16):
            batcher.run_once()
        await settle()
        return drain_events(handle)

    events = asyncio.run(main())
    lengths = [len(e.ids) for e in events]
    assert lengths == sorted(lengths) and all(n % 4 == 0 or e.finished for n, e in zip(lengths, events))
    assert events[-1].finished and all(not e.finished for e in events[:-1])
    assert all(MASK not in e.ids for e in events)
    for earlier, later in zip(events, events[1:]):
        assert later.ids[:len(earlier.ids)] == earlier.ids  # nothing sent is ever revised

def test_metrics_count_rows_per_step_and_one_wakeup_delivers_a_steps_events(loaded):
    """batch_row_steps_total grows by the batch size at each step; a step's events reach the loop in order
    through a single call_soon_threadsafe."""
    params = SamplingParams(sampler="steps", gen_length=4, steps=4, block_length=1)  # a block a step: an update a step

    async def main():
        loop = asyncio.get_running_loop()
        metrics = ServerMetrics()
        batcher = Batcher(loaded, metrics=metrics)
        handles = [batcher.submit([RowRequest([5 + i, 6], params)]) for i in range(3)]
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakeups.append(a), real(*a))[1]
        batcher.run_once()  # admits the three rows and steps them once
        assert len(wakeups) == 1
        assert metrics.row_steps._value.get() == 3 and metrics.step_seconds._sum.get() > 0
        await settle()
        assert [len(drain_events(h)) for h in handles] == [1, 1, 1]
        for _ in range(3):
            batcher.run_once()
        await settle()
        assert metrics.row_steps._value.get() == 3 * 4
        return [drain_events(h) for h in handles]

    for events in asyncio.run(main()):
        assert [len(e.ids) for e in events] == [2, 3, 4] and events[-1].finished, events


# ----------------------------------------------------------------------------- admission, cancellation, failure

def test_queue_limits_and_draining(loaded):
    params = SamplingParams(gen_length=4)

    async def main():
        batcher = Batcher(loaded, max_batch_size=2, max_queue=1)
        a = batcher.submit([RowRequest([5], params)] * 2)  # fills the batch
        b = batcher.submit([RowRequest([6], params)])  # waits
        with pytest.raises(QueueFull):
            batcher.submit([RowRequest([7], params)])
        batcher.begin_drain()
        with pytest.raises(Draining):
            batcher.submit([RowRequest([8], params)])
        for _ in range(10):
            batcher.run_once()
        await settle()
        return final_updates([a, b])

    a, b = asyncio.run(main())
    assert sorted(a) == [0, 1] and sorted(b) == [0]


def test_cancelled_rows_leave_at_the_next_step(loaded):
    params = SamplingParams(gen_length=16, steps=16)
    metrics = ServerMetrics()

    async def main():
        batcher = Batcher(loaded, metrics=metrics)
        keep = batcher.submit([RowRequest([5, 6], params)])
        gone = batcher.submit([RowRequest([7, 8], params)] * 3)
        batcher.run_once()
        assert batcher.stats()["active_rows"] == 4
        gone.cancel(choice=1)
        batcher.run_once()
        assert batcher.stats()["active_rows"] == 3
        gone.cancel()
        batcher.run_once()
        assert batcher.stats()["active_rows"] == 1
        waiting = batcher.submit([RowRequest([9], params)])
        waiting.cancel()  # never admitted
        batcher.run_once()
        assert batcher.stats() == {"active_rows": 1, "waiting_requests": 0, "draining": False}
        for _ in range(16):
            batcher.run_once()
        await settle()
        return final_updates([keep])[0]

    finals = asyncio.run(main())
    assert list(finals) == [0]
    assert metrics.cancelled_rows._value.get() == 3


def test_a_failing_step_fails_its_requests_and_the_batcher_goes_on(loaded):
    calls = []

    def flaky_step(model, state):
        from diffpo_serve.dllm.sampler import denoise_step
        calls.append(state.batch_size)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return denoise_step(model, state)

    async def main():
        batcher = Batcher(loaded, step_fn=flaky_step)
        first = batcher.submit([RowRequest([5], SamplingParams(gen_length=4))])
        batcher.run_once()
        second = batcher.submit([RowRequest([5], SamplingParams(gen_length=4))])
        for _ in range(5):
            batcher.run_once()
        await settle()
        return drain_events(first), drain_events(second)

    first, second = asyncio.run(main())
    assert len(first) == 1 and isinstance(first[0], BatchFailure) and "boom" not in first[0].message
    assert second[-1].finished


def test_learned_rows_take_the_heads_threshold_and_match_eb(loaded):
    """`learned` rows get gamma from the model's head (in their first pass) and report it."""
    head = always(ThresholdHead(loaded.model.config.hidden_size), 4)
    gamma = float(head.grid[4])
    with_head = replace(loaded, threshold_head=head)

    async def main():
        batcher = Batcher(with_head)
        handle = batcher.submit([RowRequest([5, 6], SamplingParams(sampler="learned", gen_length=8)),
                                 RowRequest([5, 6, 7, 8], SamplingParams(sampler="eb", gen_length=8, threshold=0.7))])
        for _ in range(20):
            batcher.run_once()
        await settle()
        return final_updates([handle])[0]

    finals = asyncio.run(main())
    assert finals[0].threshold == pytest.approx(gamma) and finals[1].threshold == pytest.approx(0.7)
    alone = generate(loaded.model, [[5, 6]], SamplingParams(sampler="eb", gen_length=8, threshold=gamma),
                     mask_id=loaded.mask_id, eos_id=loaded.eos_id, pad_id=loaded.pad_id)
    assert finals[0].ids == alone.sequences[0].tolist()
    assert finals[0].nfe == int(alone.nfe[0])


def test_drain_with_the_thread_waits_then_stops(loaded):
    async def main():
        batcher = Batcher(loaded)
        batcher.start()
        handle = batcher.submit([RowRequest([5, 6], SamplingParams(gen_length=16, steps=16))])
        finished = await asyncio.to_thread(batcher.drain, 10)
        await settle()
        return finished, drain_events(handle), batcher

    finished, events, batcher = asyncio.run(main())
    assert finished and events[-1].finished
    assert not batcher._thread.is_alive()


def test_stop_fails_what_is_left(loaded):
    async def main():
        batcher = Batcher(loaded)
        handle = batcher.submit([RowRequest([5], SamplingParams(gen_length=8))])
        batcher.stop()
        await settle()
        return drain_events(handle)

    (event,) = asyncio.run(main())
    assert isinstance(event, BatchFailure) and event.shutting_down


# ----------------------------------------------------------------------------- text: stop strings, holdback

def test_find_stop_and_holdback():
    assert find_stop("a+b=c", ["=", "+"]) == (1, 1)
    assert find_stop("abc", ["x"]) is None
    assert held_back("20+3", ["+32"]) == 2  # "+3" may still become "+32"
    assert held_back("20+", ["+32", "0+5"]) == 2
    assert held_back("abc", ["x"]) == 0
    assert held_back("ab\ufffd", []) == 1  # an incomplete character waits


def choice_events(loaded, text, finished=True):
    ids = loaded.encode(text) + ([EOS] if finished else [])
    return RowUpdate(choice=0, ids=ids, finished=finished, nfe=3, sampler="eb", threshold=0.3)


def test_choice_text_counts_real_tokens():
    loaded = scripted_loaded()
    c = ChoiceText(0, loaded, ["+6"])
    assert c.update(choice_events(loaded, "20+", finished=False)) == "20"  # "+" may start the stop string
    assert c.update(choice_events(loaded, "20+3", finished=False)) == "+3"
    assert c.update(choice_events(loaded, "20+32+62")) == "2"
    assert (c.text, c.finish_reason, c.completion_tokens) == ("20+32", "stop", 7)  # through "+6"
    plain = ChoiceText(0, loaded, [])
    plain.update(choice_events(loaded, "20+32+62"))
    assert (plain.text, plain.finish_reason, plain.completion_tokens) == ("20+32+62", "stop", 9)  # + EOS
    full = ChoiceText(0, loaded, [])
    full.update(RowUpdate(choice=0, ids=loaded.encode("1234"), finished=True, nfe=4, sampler="steps", threshold=0))
    assert (full.finish_reason, full.completion_tokens, full.threshold) == ("length", 4, None)


# ----------------------------------------------------------------------------- the engine without HTTP

def run_engine(loaded, request, settings=None, stream=False):
    async def main():
        batcher = Batcher(loaded)
        batcher.start()
        engine = Engine(loaded, batcher, settings or ServerSettings())
        try:
            start = engine.start_chat if isinstance(request, ChatCompletionRequest) else engine.start_completion
            generation = start(request)
            if stream:  # the SSE events, one per item (a write may carry several, e.g. the last ones)
                return [event + "\n\n" for piece in [p async for p in generation.stream()]
                        for event in piece.split("\n\n") if event]
            return await generation.result()
        finally:
            batcher.stop()

    return asyncio.run(main())


def test_engine_completion_with_scripted_answers():
    loaded = scripted_loaded({"countdown": "20+32+62"})
    req = CompletionRequest(model="scripted", prompt=["countdown 32,62,20=114|", "sudoku 1|"], max_tokens=16)
    r = run_engine(loaded, req)
    assert [c.text for c in r.choices] == ["20+32+62", "ok"]
    assert [c.finish_reason for c in r.choices] == ["stop", "stop"]
    assert r.usage.completion_tokens == 9 + 3
    assert [c.nfe for c in r.choices] == [9, 3]  # steps sampler: one token per pass, EOS ends the row


def test_engine_row_limit_counts_prompts_times_n_and_admits_the_limit_itself():
    """max_rows_per_request bounds prompts x n: exactly the limit is served (every choice answered), one more
    is a 400 on ``n`` that names the limit."""
    loaded = scripted_loaded({"countdown": "20+32+62"})
    limit = ServerSettings(max_rows_per_request=6)
    r = run_engine(loaded, CompletionRequest(model="scripted", prompt=["countdown 1|", "sudoku 1|"], n=3,
                                             max_tokens=16), settings=limit)
    assert [c.text for c in r.choices] == ["20+32+62"] * 3 + ["ok"] * 3
    for prompts, n in ((["countdown 1|"] * 7, 1), (["countdown 1|"], 7), (["countdown 1|", "sudoku 1|"], 4)):
        with pytest.raises(APIError) as e:
            run_engine(loaded, CompletionRequest(model="scripted", prompt=prompts, n=n, max_tokens=16), settings=limit)
        assert (e.value.status, e.value.param) == (400, "n") and "limit of 6 choices" in e.value.message


def test_engine_stream_holds_back_stop_prefixes():
    loaded = scripted_loaded({"countdown": "20+32+62"})
    req = CompletionRequest(model="scripted", prompt="countdown 1|", max_tokens=16, block_length=2, stop=["+6"],
                            stream=True, stream_options={"include_usage": True})
    lines = run_engine(loaded, req, stream=True)
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == "20+32" and all("+" not in t[-1:] for t in texts[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == 7 and chunks[-1]["choices"] == []
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_engine_chat_stream_and_default_max_tokens():
    loaded = scripted_loaded({"h": "hello"})
    req = ChatCompletionRequest(model="scripted", messages=[{"role": "user", "content": "hi|"}], stream=True)
    chunks = [json.loads(line[6:]) for line in run_engine(loaded, req, stream=True)[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:]) == "hello"
    assert "usage" not in chunks[-1]
    short = ServerSettings(default_max_tokens=3)
    r = run_engine(loaded, ChatCompletionRequest(model="scripted", messages=[{"role": "user", "content": "hi|"}]),
                   settings=short)
    assert r.choices[0].message.content == "hel" and r.choices[0].finish_reason == "length"


def test_engine_validation_errors_name_the_param():
    loaded = scripted_loaded(max_length=32)

    def error(**kw):
        with pytest.raises(APIError) as e:
            run_engine(loaded, CompletionRequest(**{"model": "scripted", "prompt": "ab|", **kw}))
        return e.value

    assert error(model="other").status == 404
    assert error(max_tokens=30).param == "max_tokens"
    assert error(prompt="y" * 40).param == "prompt"
    assert error(sampler="steps", max_tokens=8, block_length=4, steps=3).param == "steps"
    assert error(sampler="learned").param == "sampler"
    assert error(prompt=[[1000]]).param == "prompt"


def test_chat_template_is_used_when_the_tokenizer_has_one():
    loaded = scripted_loaded({"<": "templated"})
    loaded.tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                      "{% if add_generation_prompt %}|{% endif %}")
    r = run_engine(loaded, ChatCompletionRequest(model="scripted", max_tokens=12,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert r.choices[0].message.content == "templated"
    assert r.usage.prompt_tokens == len(loaded.encode("<user>hi|"))


# ----------------------------------------------------------------------------- settings and flags

def test_settings_from_env_and_flags():
    env = {"DIFFPO_PORT": "9001", "DIFFPO_API_KEY": "secret", "DIFFPO_TRUST_REMOTE_CODE": "yes",
           "DIFFPO_MASK_ID": "", "DIFFPO_MAX_QUEUE": "3"}
    s = ServerSettings.from_env(env)
    assert (s.port, s.api_key, s.trust_remote_code, s.mask_id, s.max_queue) == (9001, "secret", True, None, 3)
    flags = parse_settings(["--port", "9002", "--no-trust-remote-code", "--max-batch-size", "4"], environ=env)
    assert (flags.port, flags.trust_remote_code, flags.max_batch_size, flags.api_key) == (9002, False, 4, "secret")
    with pytest.raises(ValueError, match="DIFFPO_PORT"):
        ServerSettings.from_env({"DIFFPO_PORT": "http"})
    with pytest.raises(ValueError, match="max_batch_size"):
        ServerSettings(max_batch_size=0).validated()
    with pytest.raises(SystemExit):
        parse_settings(["--default-sampler", "fast"], environ={})
    assert "secret" not in build_parser(s).format_help()


def test_compile_setting_reaches_the_loader(monkeypatch):
    """--compile / DIFFPO_COMPILE go to load_model (whose compile=True tests/test_loading.py checks)."""
    import diffpo_serve.api as api
    seen = {}

    def fake_load_model(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")
    monkeypatch.setattr(api, "load_model", fake_load_model)
    for settings, want in [(ServerSettings.from_env({"DIFFPO_COMPILE": "1"}), True),
                           (parse_settings(["--compile"], environ={}), True), (ServerSettings(), False)]:
        with pytest.raises(RuntimeError, match="stop here"):
            api.load_from_settings(settings)
        assert seen["compile"] is want


def test_importing_the_server_never_imports_training():
    import subprocess
    import sys
    code = ("import sys, diffpo_serve.api, diffpo_serve.cli, diffpo_serve.engine; "
            "assert not [m for m in sys.modules if m == 'training' or m.startswith('training.')]")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert torch.get_num_threads() >= 1


def test_requests_without_a_sampler_use_the_head_when_the_model_has_one(loaded):
    head = always(ThresholdHead(loaded.model.config.hidden_size), 6)
    req = CompletionRequest(model=loaded.name, prompt="countdown 1,2,3=6", max_tokens=8)
    with_head = run_engine(replace(loaded, threshold_head=head), req)
    assert with_head.choices[0].threshold == pytest.approx(float(head.grid[6]))  # the head's gamma: learned
    assert run_engine(loaded, req).choices[0].threshold is None  # no head: the steps sampler
    forced = run_engine(replace(loaded, threshold_head=head), req, settings=ServerSettings(default_sampler="eb"))
    assert forced.choices[0].threshold == pytest.approx(0.3)  # --default-sampler wins over the head


def test_engine_stream_sends_the_events_after_the_last_finish_in_one_write():
    loaded = scripted_loaded({"countdown": "20+32+62"})
    req = CompletionRequest(model="scripted", prompt="countdown 1|", max_tokens=16, block_length=2, stream=True,
                            stream_options={"include_usage": True})

    async def main():
        batcher = Batcher(loaded)
        batcher.start()
        try:
            return [p async for p in Engine(loaded, batcher, ServerSettings()).start_completion(req).stream()]
        finally:
            batcher.stop()

    writes = asyncio.run(main())
    assert all(w.count("\n\n") == 1 for w in writes[:-1])  # text chunks go out as they come
    last = [json.loads(e.removeprefix("data: ")) for e in writes[-1].split("\n\n")[:-2]]
    assert writes[-1].endswith("data: [DONE]\n\n")
    assert last[0]["choices"][0]["finish_reason"] == "stop" and last[-1]["usage"]["completion_tokens"] > 0


def test_the_admission_rule_by_hand():
    from diffpo_serve.batcher import check_admission, queued_beyond_capacity
    # 4 free slots; requests of 3, 1, 2, 1 rows: the first two fit, the last two do not
    assert queued_beyond_capacity([3, 1, 2, 1], 4) == 2
    assert queued_beyond_capacity([3, 1], 4) == 0 and queued_beyond_capacity([], 0) == 0
    check_admission([3], 1, 4, max_queue=0)  # fits with what is queued: always taken
    check_admission([3, 1, 2], 1, 4, max_queue=2)  # waits behind one that does not fit
    with pytest.raises(QueueFull):
        check_admission([3, 1, 2, 1], 1, 4, max_queue=2)


def test_enqueue_counts_rows_running_admitting_and_still_waiting(loaded):
    """The batcher's inputs to the rule: free = max_batch_size - (rows in slots + rows being admitted), and a
    partly admitted request queues only its rows after the admission cursor."""
    from diffpo_serve.batcher import RequestHandle
    params = SamplingParams(gen_length=4)
    batcher = Batcher(loaded, max_batch_size=4, max_queue=0)  # never started: the state is set by hand
    batcher._slots = [object()]  # one row decoding
    batcher._admitting = 1  # one row on its way in: 2 slots free
    partly = RequestHandle([RowRequest([5], params)] * 3, None, batcher)
    partly.next_row = 2  # two of its three rows already admitted: one still waits
    batcher._waiting.append(partly)
    batcher.enqueue(RequestHandle([RowRequest([6], params)], None, batcher))  # 1 waiting + 1 <= 2 free: taken
    with pytest.raises(QueueFull):  # 1 + 1 waiting + 1 > 2 free, and max_queue 0 lets nothing wait
        batcher.enqueue(RequestHandle([RowRequest([7], params)], None, batcher))
    assert len(batcher._waiting) == 2
    assert batcher.stats()["active_rows"] == 2  # running + admitting


def test_admission_fills_the_batch_to_its_size_and_no_further(loaded):
    """A 3-row request into a 2-row batch: two rows decode, the third waits for a slot (admission's
    capacity check at its edge: free > 0, not >= 0)."""
    params = SamplingParams(gen_length=4)

    async def main():
        batcher = Batcher(loaded, max_batch_size=2, max_queue=4)
        handle = batcher.submit([RowRequest([5], params)] * 3)
        batcher.run_once()
        assert len(batcher._slots) == 2 and handle.next_row == 2 and list(batcher._waiting) == [handle]
        for _ in range(20):
            batcher.run_once()
        await settle()
        return final_updates([handle])

    (done,) = asyncio.run(main())
    assert sorted(done) == [0, 1, 2]  # every row finished, the third after a slot freed


def test_a_failing_admission_fails_only_the_admitted_requests(loaded, monkeypatch):
    """The paradigm cannot start the new rows: each admitted request gets one BatchFailure naming the stage;
    rows already decoding go on."""
    params = SamplingParams(gen_length=4)

    async def main():
        batcher = Batcher(loaded, max_batch_size=4)
        running = batcher.submit([RowRequest([5], params)])
        batcher.run_once()
        original = batcher.paradigm.init_state
        monkeypatch.setattr(batcher.paradigm, "init_state", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
        doomed = batcher.submit([RowRequest([6], params)] * 2)
        batcher.run_once()
        monkeypatch.setattr(batcher.paradigm, "init_state", original)
        for _ in range(10):
            batcher.run_once()
        await settle()
        return drain_events(running), drain_events(doomed)

    running, doomed = asyncio.run(main())
    assert len(doomed) == 1 and isinstance(doomed[0], BatchFailure)
    assert doomed[0].message == "internal error while starting the request"
    assert running[-1].finished and not any(isinstance(e, BatchFailure) for e in running)


def test_an_iteration_that_raises_fails_the_running_rows(loaded, monkeypatch):
    """A bug outside the model's step (here: dropping cancelled rows raises) fails the running requests
    with one BatchFailure each instead of leaving them waiting; the batcher then serves new requests."""
    params = SamplingParams(gen_length=4)

    async def main():
        batcher = Batcher(loaded, max_batch_size=4)
        a = batcher.submit([RowRequest([5], params)] * 2)
        batcher.run_once()
        monkeypatch.setattr(batcher, "_drop_cancelled", lambda: (_ for _ in ()).throw(RuntimeError("bug")))
        batcher.iterate()
        monkeypatch.undo()
        b = batcher.submit([RowRequest([6], params)])
        for _ in range(10):
            batcher.iterate()
        await settle()
        return drain_events(a), drain_events(b), batcher.stats()

    a, b, stats = asyncio.run(main())
    assert [type(e) for e in a if isinstance(e, BatchFailure)] == [BatchFailure]
    assert next(e for e in a if isinstance(e, BatchFailure)).message == "internal error during decoding"
    assert b[-1].finished and stats["active_rows"] == 0
