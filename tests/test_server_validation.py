"""The serving path at its edges, without HTTP: the model's limits (vocabulary, context length), the parameters a
request leaves out, several EOS ids, and cancelling requests that are still queued.

Each test pins the boundary itself (the last value accepted and the first refused), so that an off-by-one, a
default applied over an explicit value, or an EOS list cut to its first id fails here.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from conftest import EOS
from diffpo_serve.batcher import Batcher, Draining, RequestHandle, RowRequest, RowUpdate
from diffpo_serve.dllm.sampler import SamplingParams
from diffpo_serve.engine import Engine
from diffpo_serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from diffpo_serve.settings import ServerSettings
from test_server_batcher import drain_events, run_engine, settle
from test_server_support import scripted_loaded


class Recording:
    """A batcher that records the rows it is given and runs nothing."""

    def __init__(self):
        self.rows: list[RowRequest] = []

    def submit(self, rows, loop=None):
        self.rows = rows
        return RequestHandle(rows, loop or asyncio.get_running_loop(), self)

    def cancelled(self, handle, choice):
        pass


def rows_for(request, settings=None, loaded=None) -> list[RowRequest]:
    """The rows the engine submits for ``request`` (raises the engine's APIError)."""
    loaded = loaded or scripted_loaded(max_length=32)

    async def main():
        batcher = Recording()
        engine = Engine(loaded, batcher, settings or ServerSettings())
        start = engine.start_chat if isinstance(request, ChatCompletionRequest) else engine.start_completion
        start(request)
        return batcher.rows

    return asyncio.run(main())


def refused(request, **kw) -> APIError:
    with pytest.raises(APIError) as e:
        rows_for(request, **kw)
    return e.value


def completion(**kw) -> CompletionRequest:
    return CompletionRequest(**{"prompt": "ab|", **kw})


# ----------------------------------------------------------------------------- vocabulary

def test_token_ids_up_to_the_last_of_the_vocabulary_are_accepted():
    loaded = scripted_loaded()
    vocab = len(loaded.tokenizer)
    assert rows_for(completion(prompt=[0, vocab - 1]), loaded=loaded)[0].prompt == [0, vocab - 1]
    for bad in ([vocab], [3, vocab + 5], [-1]):
        e = refused(completion(prompt=bad), loaded=loaded)
        assert (e.status, e.param, e.message) == (400, "prompt", f"token ids must be in [0, {vocab})")
    e = refused(completion(prompt=[[5], [vocab]]), loaded=loaded)  # any prompt of a list
    assert e.param == "prompt"


def test_the_vocabulary_is_the_model_configs_not_the_tokenizers():
    """A checkpoint's embedding may be larger than its tokenizer (padded vocabularies): ids up to the config's
    vocab_size are the model's to take."""
    loaded = scripted_loaded()
    size = len(loaded.tokenizer)
    loaded.model.config = SimpleNamespace(vocab_size=size + 8)
    assert rows_for(completion(prompt=[size + 7]), loaded=loaded)[0].prompt == [size + 7]
    assert refused(completion(prompt=[size + 8]), loaded=loaded).message == f"token ids must be in [0, {size + 8})"


# ----------------------------------------------------------------------------- context length

def test_context_length_at_its_edge():
    loaded = scripted_loaded(max_length=32)
    p = len(loaded.encode("ab|"))
    assert rows_for(completion(max_tokens=32 - p), loaded=loaded)[0].params.gen_length == 32 - p
    e = refused(completion(max_tokens=33 - p), loaded=loaded)
    assert (e.status, e.param, e.code) == (400, "max_tokens", "context_length_exceeded")
    assert e.message == (f"This model's maximum context length is 32 tokens. However, you requested 33 tokens "
                         f"({p} in the prompt, {33 - p} for the completion). Please reduce the prompt or max_tokens.")


def test_context_length_names_the_prompt_when_it_alone_fills_the_context():
    loaded = scripted_loaded(max_length=32)
    ids = [5] * 31
    assert len(rows_for(completion(prompt=ids, max_tokens=1), loaded=loaded)[0].prompt) == 31
    assert refused(completion(prompt=ids, max_tokens=2), loaded=loaded).param == "max_tokens"
    assert refused(completion(prompt=[5] * 32, max_tokens=1), loaded=loaded).param == "prompt"
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "y" * 40}], max_completion_tokens=1)
    e = refused(chat, loaded=loaded)
    assert e.param == "messages" and e.message.endswith("Please reduce the prompt or max_completion_tokens.")
    content = "y" * (32 - len(loaded.encode("")))  # a chat prompt of exactly the context length
    assert len(loaded.encode(content)) == 32
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": content}], max_completion_tokens=1)
    assert refused(chat, loaded=loaded).param == "messages"
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "y|"}], max_completion_tokens=31)
    assert refused(chat, loaded=loaded).param == "max_completion_tokens"


# ----------------------------------------------------------------------------- defaults

def test_a_request_that_sets_nothing_gets_the_servers_defaults():
    settings = ServerSettings(default_max_tokens=12, default_temperature=0.7, default_block_length=4,
                              default_sampler="eb")
    (row,) = rows_for(completion(), settings=settings)
    p = row.params
    assert (p.gen_length, p.temperature, p.block_length, p.sampler, p.top_p, p.seed) == (12, 0.7, 4, "eb", 1.0,
                                                                                          None)


def test_explicit_values_win_over_defaults_zero_included():
    settings = ServerSettings(default_max_tokens=12, default_temperature=0.7, default_block_length=4)
    (row,) = rows_for(completion(temperature=0.0, max_tokens=6, block_length=2, top_p=0.5), settings=settings)
    assert (row.params.temperature, row.params.gen_length, row.params.block_length, row.params.top_p) == (
        0.0, 6, 2, 0.5)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "a|"}], max_tokens=9,
                                 max_completion_tokens=5)
    assert rows_for(chat, settings=settings)[0].params.gen_length == 5


def test_each_choice_gets_seed_plus_its_index_wrapping_at_2_64():
    rows = rows_for(completion(n=3, seed=2**64 - 2, temperature=1.0))
    assert [r.params.seed for r in rows] == [2**64 - 2, 2**64 - 1, 0]
    assert [r.params.seed for r in rows_for(completion(n=2, prompt=["ab|", "cd|"], seed=-1))] == [
        2**64 - 1, 0, 2**64 - 1, 0]  # prompt-major: each prompt's choices count from the seed
    assert [r.params.seed for r in rows_for(completion(n=2))] == [None, None]


# ----------------------------------------------------------------------------- several EOS ids

def test_a_row_stops_at_the_second_of_several_eos_ids():
    """Models such as LLaDA-Instruct end a turn with an id other than the first EOS; the text, the finish
    reason and the token count must stop there, streamed or not."""
    loaded = scripted_loaded({"a": "xy#zz"})
    hash_id = loaded.tokenizer.convert_tokens_to_ids("#")
    loaded = replace(loaded, eos_ids=(EOS, hash_id))
    assert loaded.eos_ids == (EOS, hash_id) and hash_id != EOS
    r = run_engine(loaded, CompletionRequest(model="scripted", prompt="ab|", max_tokens=8))
    (choice,) = r.choices
    assert (choice.text, choice.finish_reason, r.usage.completion_tokens) == ("xy", "stop", 3)
    lines = run_engine(loaded, CompletionRequest(model="scripted", prompt="ab|", max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}), stream=True)
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "xy"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


# ----------------------------------------------------------------------------- queued requests cancelled

def test_cancelled_queued_requests_leave_the_queue_wherever_they_are():
    loaded = scripted_loaded(default="x" * 32)
    params = SamplingParams(gen_length=8, steps=8)

    async def main():
        batcher = Batcher(loaded, max_batch_size=1, max_queue=8)
        running = batcher.submit([RowRequest([5, 6], params)])
        head = batcher.submit([RowRequest([7], params)])
        middle = batcher.submit([RowRequest([8], params)] * 2)
        tail = batcher.submit([RowRequest([9], params)])
        batcher.run_once()
        assert batcher.stats() == {"active_rows": 1, "waiting_requests": 3, "draining": False}
        middle.cancel()  # behind the head: it leaves at the next step, not when it reaches the head
        batcher.run_once()
        assert [h for h in batcher._waiting] == [head, tail]
        head.cancel()
        for _ in range(8):  # `running` finishes (8 passes); then `tail`, never `head` or `middle`, is admitted
            batcher.run_once()
        assert [s.handle for s in batcher._slots] == [tail] and not batcher._waiting
        for _ in range(8):
            batcher.run_once()
        await settle()
        return [[e for e in drain_events(h) if isinstance(e, RowUpdate) and e.finished]
                for h in (running, head, middle, tail)]

    finished = asyncio.run(main())
    assert [len(f) for f in finished] == [1, 0, 0, 1]


def test_a_cancelled_choice_of_a_queued_request_is_never_admitted():
    loaded = scripted_loaded(default="x" * 32)
    params = SamplingParams(gen_length=4, steps=4)

    async def main():
        batcher = Batcher(loaded, max_batch_size=4)
        blocker = batcher.submit([RowRequest([5], params)] * 4)
        queued = batcher.submit([RowRequest([6], params)] * 3)
        batcher.run_once()
        queued.cancel(choice=1)
        for _ in range(4):
            batcher.run_once()
        assert sorted(s.choice for s in batcher._slots if s.handle is queued) == [0, 2]
        for _ in range(4):
            batcher.run_once()
        await settle()
        return sorted(e.choice for e in drain_events(queued) if isinstance(e, RowUpdate) and e.finished), blocker

    choices, _ = asyncio.run(main())
    assert choices == [0, 2]


def test_draining_still_finishes_queued_requests_then_refuses():
    loaded = scripted_loaded(default="x" * 32)
    params = SamplingParams(gen_length=4, steps=4)

    async def main():
        batcher = Batcher(loaded, max_batch_size=1)
        first = batcher.submit([RowRequest([5], params)])
        queued = batcher.submit([RowRequest([6], params)])
        batcher.begin_drain()
        with pytest.raises(Draining):
            batcher.submit([RowRequest([7], params)])
        for _ in range(8):
            batcher.run_once()
        await settle()
        assert batcher.stats()["active_rows"] == 0 and batcher.stats()["waiting_requests"] == 0
        return [[e for e in drain_events(h) if isinstance(e, RowUpdate) and e.finished] for h in (first, queued)]

    assert [len(f) for f in asyncio.run(main())] == [1, 1]


# ----------------------------------------------------------------------------- the request's own limits

def test_rows_per_request_at_the_servers_limit():
    settings = ServerSettings(max_rows_per_request=6)
    assert len(rows_for(completion(prompt=["ab|", "cd|"], n=3), settings=settings)) == 6
    e = refused(completion(prompt=["ab|", "cd|", "ef|"], n=2, max_tokens=4), settings=ServerSettings(
        max_rows_per_request=5))
    assert (e.status, e.param, e.message) == (400, "n", "3 prompt(s) x n=2 exceeds the server's limit of 5 choices "
                                                        "per request")
    assert len(rows_for(completion(n=5), settings=ServerSettings(max_rows_per_request=5))) == 5


def test_empty_prompts_and_other_models_are_refused():
    e = refused(completion(prompt=""))
    assert (e.status, e.param, e.message) == (400, "prompt", "prompt must not be empty")
    e = refused(completion(model="other"))
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")
    assert rows_for(completion(model="scripted"))[0].prompt == rows_for(completion(model=None))[0].prompt
