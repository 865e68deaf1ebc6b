"""The serving layer: OpenAI requests -> batcher rows -> OpenAI responses and SSE chunks. No FastAPI.

:class:`Engine` owns what needs the model but not HTTP: the served model name, prompt rendering and
tokenisation (the tokenizer's chat template when it has one, else the last user message), the checks
that need the model (length, token ids, sampler availability, unsupported OpenAI features), and the
sampling parameters of each row (choice ``i`` of a request with ``seed`` gets ``seed + i``).
:class:`Generation` is one request in flight: it turns the batcher's row updates into text with stop
strings, finish reasons and usage, as a whole response or as a stream of chunks.

Streaming sends text when it is determined: the batcher reports a row when its current block
advances (every earlier position is then committed) and when it finishes; the text of the committed
prefix is sent minus any tail that could still become a stop string (and any incomplete UTF-8
character), so nothing sent is ever taken back.

Log-probs (``logprobs``; OpenAI's shapes, :class:`~diffpo_serve.protocol.CompletionLogprobs` and
:class:`~diffpo_serve.protocol.ChatLogprobs`) are the sampler's record of each token at the pass that committed it
(:class:`~diffpo_serve.dllm.decoding.TokenLogprob`). They cover the tokens whose text makes up the choice's text;
a stream sends each token's entry with the chunk whose text completes it (:meth:`ChoiceText.take_logprobs`).

What differs between decoding paradigms (masked, canvas) is asked of the model's
:class:`~diffpo_serve.paradigms.Paradigm`: the request's params and the 400s for what the paradigm
cannot do, the defaults, and the answer's positions for the context-length check.

Step events (``return_steps``, streamed completions only): the batcher also reports each forward pass
of such rows (a :class:`~diffpo_serve.dllm.decoding.StepUpdate` or, for a canvas model, a
:class:`~diffpo_serve.dllm.decoding.CanvasStepUpdate`, before that pass's row update), and the stream turns
each into a ``text_completion.step`` chunk: the committed positions, their ids and texts (masked), or the
current block's whole draft and the positions the bound kept (canvas). They come from the same batched
decoder as every other row; nothing is decoded twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator

from diffpo_serve.batcher import (BatchFailure, Batcher, Draining, QueueFull, RequestHandle, RowRequest,
                                  RowUpdate)
from diffpo_serve.decoder_process import DecoderGone
from diffpo_serve.dllm.loading import LoadedModel
from diffpo_serve.dllm.sampler import CACHE_MODES
from diffpo_serve.metrics import ServerMetrics
from diffpo_serve.dllm.decoding import CanvasStepUpdate, PassUpdate
from diffpo_serve.paradigms import paradigm_for
from diffpo_serve.protocol import (APIError, AssistantMessage, ChatChoice, ChatCompletionChunk,
                                   ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage,
                                   ChatStreamChoice, CompletionCanvasStepChoice, CompletionChoice, CompletionLogprobs,
                                   CompletionRequest, CompletionResponse, CompletionStepChoice, CompletionStepChunk,
                                   CompletionStreamChoice, CompletionStreamResponse, TokenLogprobEntry, TopLogprob,
                                   DeltaMessage, ModelCard, ModelList, Usage, error_body, unavailable)
from diffpo_serve.settings import ServerSettings

log = logging.getLogger(__name__)


class Engine:
    """Maps requests onto the batcher; one per loaded model."""

    def __init__(self, loaded: LoadedModel, batcher: Batcher, settings: ServerSettings,
                 metrics: ServerMetrics | None = None):
        self.loaded = loaded
        self.batcher = batcher
        self.settings = settings
        self.metrics = metrics
        self.model_name = settings.served_model_name or loaded.name
        self.paradigm = paradigm_for(loaded)
        self.default_gen_length = self.paradigm.default_gen_length(settings)
        self.created = int(time.time())
        config = getattr(loaded.model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config  # DiffusionGemma nests it
        self.vocab_size = int(getattr(text, "vocab_size", 0) or len(loaded.tokenizer))
        log.info("on %s; a request that sets none gets %s", settings.device,
                 ", ".join(f"{k} {v}" for k, v in self.paradigm.card(settings)["defaults"].items()))

    # ------------------------------------------------------------------ models

    def models(self) -> ModelList:
        return ModelList(data=[self.model_card()])

    def model_card(self, name: str | None = None) -> ModelCard:
        if name is not None:
            self.check_model(name)
        card = self.loaded.card
        return ModelCard(id=self.model_name, created=self.created, root=self.loaded.path,
                         max_model_len=self.loaded.max_length, device=self.settings.device,
                         description=card.description,
                         examples=list(card.examples), cache=self.settings.cache,
                         cache_modes=list(CACHE_MODES) if self.loaded.kv_cache else ["off"],
                         **self.paradigm.card(self.settings))

    def check_model(self, name: str | None) -> None:
        """404 for a name other than the served model's; ``None`` (omitted or null) is the served model."""
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------ requests

    def start_completion(self, req: CompletionRequest, endpoint: str = "/v1/completions") -> "Generation":
        self.check_model(req.model)
        _log_ignored(req)
        if req.echo:
            raise APIError(400, "`echo` is not supported by this diffusion server: it decodes the answer alone and "
                                "never scores the prompt's tokens, so it has no prompt log-probs to return with it",
                           param="echo", code="unsupported_parameter")
        unsupported = [("suffix", bool(req.suffix)), ("best_of", req.best_of not in (None, req.n))]
        self._refuse(unsupported, req)
        if req.return_steps and not req.stream:
            raise APIError(400, "return_steps is only allowed when stream is true", param="return_steps")
        return self._start("completion", req, self._completion_prompts(req.prompt), endpoint)

    def start_chat(self, req: ChatCompletionRequest, endpoint: str = "/v1/chat/completions") -> "Generation":
        self.check_model(req.model)
        _log_ignored(req)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "`top_logprobs` needs `logprobs` set to true", param="top_logprobs")
        unsupported = [("tools", bool(req.tools)), ("tool_choice", req.tool_choice not in (None, "none", "auto"))]
        self._refuse(unsupported, req)
        return self._start("chat", req, [self._chat_prompt(req.messages)], endpoint)

    def _refuse(self, unsupported: list[tuple[str, bool]], req) -> None:
        for name in req.constraints():  # structured outputs: refused, never silently unconstrained
            raise APIError(400, f"`{name}` is not supported by this diffusion server: it cannot constrain its "
                                "output (structured outputs / guided decoding)", param=name,
                           code="unsupported_parameter")
        unsupported += [("frequency_penalty", bool(req.frequency_penalty)),
                        ("presence_penalty", bool(req.presence_penalty)), ("logit_bias", bool(req.logit_bias))]
        for name, used in unsupported:
            if used:
                raise APIError(400, f"`{name}` is not supported by this diffusion server", param=name,
                               code="unsupported_parameter")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def _completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = []
        for p in prompt:
            ids = self.loaded.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if isinstance(p, list) and not all(0 <= i < self.vocab_size for i in ids):
                raise APIError(400, f"token ids must be in [0, {self.vocab_size})", param="prompt")
            prompts.append(ids)
        return prompts

    def _chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """The chat template's rendering, else (no template) the content of the last user message."""
        tokenizer = self.loaded.tokenizer
        if getattr(tokenizer, "chat_template", None):
            try:
                text = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                     tokenize=False, add_generation_prompt=True)
            except Exception as e:  # jinja errors: the template rejects these messages
                raise APIError(400, f"the model's chat template rejects these messages: {e}",
                               param="messages") from None
        else:
            users = [m for m in messages if m.role == "user"]
            if not users:
                raise APIError(400, "messages must contain a user message", param="messages")
            text = users[-1].text()
        ids = self.loaded.encode(text)
        if not ids:
            raise APIError(400, "the prompt is empty: the last user message has no content", param="messages")
        return ids

    def _sampling_params(self, req, gen_length: int, length_param: str):
        """The request's row params in the model's paradigm (raises :class:`APIError`)."""
        return self.paradigm.params(req, gen_length, length_param, self.settings)

    def _start(self, kind: str, req, prompts: list[list[int]], endpoint: str) -> "Generation":
        length_param = ("max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None
                        else "max_tokens")
        gen_length = req.gen_length() or self.default_gen_length
        if len(prompts) * req.n > self.settings.max_rows_per_request:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} exceeds the server's limit of "
                                f"{self.settings.max_rows_per_request} choices per request", param="n")
        limit = self.loaded.max_length
        self.paradigm.check_prompts(prompts, "prompt" if kind == "completion" else "messages")
        answer = self.paradigm.context_tokens(gen_length)  # a canvas model decodes whole canvases
        for p in prompts:
            if len(p) + answer > limit:
                param = "prompt" if len(p) >= limit and kind == "completion" else length_param
                param = "messages" if len(p) >= limit and kind == "chat" else param
                raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                    f"requested {len(p) + answer} tokens ({len(p)} in the prompt, "
                                    f"{answer} for the completion). Please reduce the prompt or "
                                    f"{length_param}.", param=param, code="context_length_exceeded")
        base = self._sampling_params(req, gen_length, length_param)
        return_steps = kind == "completion" and bool(req.return_steps)
        rows = [RowRequest(p, replace(base, seed=None if req.seed is None else (req.seed + i) % 2**64),
                           return_steps=return_steps)
                for p in prompts for i in range(req.n)]
        try:
            handle = self.batcher.submit(rows)
        except QueueFull as e:
            raise unavailable(f"{e}; retry later", code="queue_full") from None
        except Draining:
            raise unavailable("the server is shutting down", code="draining", retry_after=5) from None
        except DecoderGone as e:
            raise APIError(503, f"the decoder is not running: {e}", type="service_unavailable_error",
                           code="decoder_failed") from None
        return Generation(self, kind, req, prompts, handle, endpoint)

    def token_texts(self, ids: list[int]) -> list[str]:
        """The text of each token on its own, special tokens included (for step events)."""
        if not ids:
            return []
        return self.loaded.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                                  clean_up_tokenization_spaces=False)


def _log_ignored(req) -> None:
    extra = req.ignored_fields()
    if extra:
        log.warning("ignoring unknown request fields: %s", ", ".join(extra))


# ----------------------------------------------------------------------------- text of one choice

def find_stop(text: str, stops: list[str]) -> tuple[int, int] | None:
    """Earliest occurrence of any stop string: (position, length), or None."""
    hits = [(i, len(s)) for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` not to send yet: a possible stop-string start, a partial char."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    while hold < len(text) and text[len(text) - hold - 1] == "\ufffd":
        hold += 1
    return hold


class ChoiceText:
    """Text, finish reason and token count of one choice, fed with its row's updates."""

    def __init__(self, index: int, loaded: LoadedModel, stops: list[str], logprobs: bool = False):
        self.index = index
        self._loaded = loaded
        self._stops = stops
        self._logprobs = logprobs  # the request asked for log-probs: track which tokens the text covers
        self.ids: list[int] = []  # the row's determined ids (latest update)
        self.token_logprobs: list = []  # a TokenLogprob per id of ``ids`` (rows with logprobs)
        self.tokens_ready = 0  # leading tokens whose text is all in ``text`` (all of the text's once done)
        self.tokens_sent = 0  # leading tokens whose log-probs have gone out (streaming)
        self.text_offset = 0  # completions' text_offset of the next token whose log-probs go out
        self.text = ""  # text so far that is safe to send (all of it once done)
        self.sent = ""
        self.done = False
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.nfe = 0
        self.encoder_passes: int | None = None  # canvas models only
        self.sampler = ""
        self.threshold: float | None = None

    def update(self, event: RowUpdate) -> str:
        """Take a row update; return the text that can be sent now (may be empty)."""
        self.nfe, self.sampler, self.encoder_passes = event.nfe, event.sampler, event.encoder_passes
        self.threshold = None if event.sampler == "steps" else event.threshold
        text, eos = self._loaded.decode(event.ids)
        hit = find_stop(text, self._stops)
        if hit is not None:
            pos, length = hit
            self.text, self.done, self.finish_reason = text[:pos], True, "stop"
            self.completion_tokens = self._tokens_through(event.ids, pos + length)
        elif event.finished:
            self.text, self.done = text, True
            self.finish_reason = "stop" if eos else "length"
            self.completion_tokens = self._loaded.eos_index(event.ids) + 1 if eos else len(event.ids)
        else:
            self.text = text[:len(text) - held_back(text, self._stops)]
        delta = self.text[len(self.sent):]
        if len(self.text) > len(self.sent):
            self.sent = self.text
        if self._logprobs:
            self.ids, self.token_logprobs = event.ids, event.logprobs or []
            # once done, every token the text ends in; before, only those whose text is all sent
            self.tokens_ready = (self._tokens_through(event.ids, len(self.text)) if self.done and self.text
                                 else self._first_reaching(event.ids, len(self.text) + 1) - 1)
        return delta

    def take_logprobs(self) -> tuple[list[int], list]:
        """The tokens ready whose log-probs have not gone out: (ids, TokenLogprobs)."""
        start, self.tokens_sent = self.tokens_sent, max(self.tokens_sent, self.tokens_ready)
        return self.ids[start:self.tokens_sent], self.token_logprobs[start:self.tokens_sent]

    def _first_reaching(self, ids: list[int], chars: int) -> int:
        """Fewest leading tokens whose text has ``chars`` characters or more (binary search over the tokens before
        any EOS); one more than those tokens when none does."""
        end = self._loaded.eos_index(ids)
        lo, hi = 0, (len(ids) if end is None else end) + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._loaded.decode(ids[:mid])[0]) >= chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _tokens_through(self, ids: list[int], chars: int) -> int:
        """Fewest leading tokens whose text reaches ``chars`` (>= 1) characters (all of them, before any EOS, when
        none does)."""
        end = self._loaded.eos_index(ids)
        return min(self._first_reaching(ids, chars), len(ids) if end is None else end)


# ----------------------------------------------------------------------------- one request in flight

def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class Generation:
    """A submitted request: consume it with :meth:`result` (one response) or :meth:`stream` (SSE)."""

    def __init__(self, engine: Engine, kind: str, req, prompts: list[list[int]], handle: RequestHandle,
                 endpoint: str):
        self.engine = engine
        self.kind = kind
        self.endpoint = endpoint
        self.prompts = prompts
        self.handle = handle
        self.include_usage = req.include_usage()
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = engine.model_name
        stops = req.stop_strings()
        self.alternatives = req.logprob_alternatives()  # None: no log-probs
        self.choices = [ChoiceText(i, engine.loaded, stops, self.alternatives is not None)
                        for i in range(len(handle.rows))]
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._deadline = self._started + engine.settings.request_timeout
        self._first_text_seen = False
        self._recorded = False

    def cancel(self) -> None:
        self.handle.cancel()

    async def _updates(self) -> AsyncIterator[tuple[ChoiceText, str | PassUpdate]]:
        """Yield (choice, new text) as rows report, until every choice is done.

        For rows that asked for steps, also (choice, StepUpdate) for each of their forward passes.
        """
        metrics = self.engine.metrics
        while not all(c.done for c in self.choices):
            remaining = self._deadline - self._loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                event = await asyncio.wait_for(self.handle.events.get(), remaining)
            except asyncio.TimeoutError:
                self.handle.cancel()
                raise APIError(504, f"the request did not finish within {self.engine.settings.request_timeout:g} "
                                    "seconds", type="timeout_error", code="request_timeout") from None
            if isinstance(event, BatchFailure):
                if event.shutting_down:
                    raise unavailable(event.message, code="draining", retry_after=5)
                raise APIError(500, event.message, type="server_error", code="internal_error")
            choice = self.choices[event.choice]
            if choice.done:
                continue
            if isinstance(event, PassUpdate):
                yield choice, event
                continue
            delta = choice.update(event)
            if choice.done and not event.finished:
                self.handle.cancel(event.choice)  # a stop string ended it: free the row now
            if not self._first_text_seen and (delta or choice.done):
                self._first_text_seen = True
                if metrics:
                    metrics.ttft.labels(self.endpoint).observe(self._loop.time() - self._started)
            yield choice, delta
        self._record()

    def _record(self) -> None:
        metrics = self.engine.metrics
        if self._recorded or metrics is None:
            return
        self._recorded = True
        usage = self.usage()
        metrics.prompt_tokens.inc(usage.prompt_tokens)
        metrics.completion_tokens.inc(usage.completion_tokens)
        for c in self.choices:
            metrics.nfe.labels(c.sampler).observe(c.nfe)
            if c.threshold is not None:
                metrics.threshold.labels(c.sampler).observe(c.threshold)

    def usage(self) -> Usage:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.completion_tokens for c in self.choices)
        encoder = [c.encoder_passes for c in self.choices if c.encoder_passes is not None]
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     nfe=sum(c.nfe for c in self.choices), encoder_passes=sum(encoder) if encoder else None)

    async def result(self) -> CompletionResponse | ChatCompletionResponse:
        """Wait for every choice and build the response (raises :class:`APIError`)."""
        try:
            async for _ in self._updates():  # no step events: return_steps needs a stream
                pass
        finally:
            self.handle.cancel()
        common = dict(id=self.id, created=self.created, model=self.model, usage=self.usage())
        if self.kind == "chat":
            return ChatCompletionResponse(**common, choices=[
                ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                           nfe=c.nfe, threshold=c.threshold, encoder_passes=c.encoder_passes,
                           logprobs=self._logprobs(c)) for c in self.choices])
        return CompletionResponse(**common, choices=[
            CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason, nfe=c.nfe,
                             threshold=c.threshold, encoder_passes=c.encoder_passes, logprobs=self._logprobs(c))
            for c in self.choices])

    def _logprobs(self, c: ChoiceText) -> CompletionLogprobs | ChatLogprobs | None:
        """The log-probs of the choice's tokens not yet sent, in the endpoint's shape; None without log-probs.
        Each token's alternatives are the ``alternatives`` most likely at its pass, most likely first."""
        if self.alternatives is None:
            return None
        ids, entries = c.take_logprobs()
        k = self.alternatives
        tops = [list(zip(e.top_ids[:k], e.top_logprobs[:k])) for e in entries]
        known = sorted({i for top in tops for i, _ in top} | set(ids))
        text_of = dict(zip(known, self.engine.token_texts(known)))
        if self.kind == "chat":
            return ChatLogprobs(content=[
                TokenLogprobEntry(token=text_of[i], logprob=e.logprob, bytes=list(text_of[i].encode()),
                                  top_logprobs=[TopLogprob(token=text_of[j], logprob=v, bytes=list(text_of[j].encode()))
                                                for j, v in top])
                for i, e, top in zip(ids, entries, tops)])
        offsets, alternatives = [], []
        for i, e, top in zip(ids, entries, tops):
            offsets.append(c.text_offset)
            c.text_offset += len(text_of[i])
            listed: dict[str, float] = {}
            for j, v in top:  # two ids with one text: the likelier keeps it
                listed.setdefault(text_of[j], v)
            listed.setdefault(text_of[i], e.logprob)  # the generated token, always (OpenAI: up to logprobs + 1)
            alternatives.append(listed)
        return CompletionLogprobs(tokens=[text_of[i] for i in ids], token_logprobs=[e.logprob for e in entries],
                                  top_logprobs=alternatives, text_offset=offsets)

    async def stream(self) -> AsyncIterator[str]:
        """SSE lines: (chat: a role delta per choice,) text chunks, the usage chunk, ``[DONE]``.

        An error after the first chunk becomes ``data: {"error": {...}}`` followed by ``[DONE]``.
        """
        tail = ""  # the events after the last choice finished go out in one write, with [DONE]
        try:
            if self.kind == "chat":
                for c in self.choices:
                    yield self._chunk(c, "", role=True)
            async for choice, delta in self._updates():
                if isinstance(delta, PassUpdate):
                    piece = self._step_chunk(choice, delta)
                elif delta or choice.done:
                    piece = self._chunk(choice, delta)
                else:
                    continue
                if all(c.done for c in self.choices):
                    tail += piece
                else:
                    yield piece
            if self.include_usage:
                tail += self._usage_chunk()
        except APIError as e:
            tail += sse(e.body())
        except Exception:
            log.exception("stream %s failed", self.id)
            tail += sse(error_body("internal server error", type="server_error", code="internal_error"))
        finally:
            self.handle.cancel()
        yield tail + "data: [DONE]\n\n"

    def _chunk(self, c: ChoiceText, delta: str, role: bool = False) -> str:
        final = dict(finish_reason=c.finish_reason, nfe=c.nfe, threshold=c.threshold,
                     encoder_passes=c.encoder_passes) if c.done else {}
        logprobs = None if role else self._logprobs(c)
        if self.kind == "chat":
            message = DeltaMessage(role="assistant", content="") if role else DeltaMessage(content=delta or None)
            chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
                ChatStreamChoice(index=c.index, delta=message, logprobs=logprobs, **final)])
        else:
            chunk = CompletionStreamResponse(id=self.id, created=self.created, model=self.model, choices=[
                CompletionStreamChoice(index=c.index, text=delta, logprobs=logprobs, **final)])
        return self._dump(chunk)

    def _step_chunk(self, c: ChoiceText, step: PassUpdate) -> str:
        if isinstance(step, CanvasStepUpdate):
            choice = CompletionCanvasStepChoice(
                index=c.index, step=step.step, nfe=step.nfe, block=step.block, block_start=step.block_start,
                block_end=step.block_end, gen_length=step.gen_length, draft_ids=step.draft_ids,
                draft_tokens=self.engine.token_texts(step.draft_ids), accepted_positions=step.accepted_positions,
                block_done=step.block_done, eos_token_id=self.engine.loaded.eos_id, finished=step.finished,
                threshold=step.threshold)
            return sse(CompletionStepChunk(id=self.id, created=self.created, model=self.model,
                                           choices=[choice]).model_dump())
        chunk = CompletionStepChunk(id=self.id, created=self.created, model=self.model, choices=[
            CompletionStepChoice(
                index=c.index, step=step.step, nfe=step.nfe, block=step.block, block_start=step.block_start,
                block_end=step.block_end, gen_length=step.gen_length, positions=step.positions,
                token_ids=step.token_ids, tokens=self.engine.token_texts(step.token_ids),
                filled_positions=step.filled_positions, eos_token_id=self.engine.loaded.eos_id,
                finished=step.finished, threshold=None if step.sampler == "steps" else step.threshold)])
        return sse(chunk.model_dump())

    def _usage_chunk(self) -> str:
        cls = ChatCompletionChunk if self.kind == "chat" else CompletionStreamResponse
        return self._dump(cls(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage()))

    def _dump(self, chunk) -> str:
        payload = chunk.model_dump()
        if not self.include_usage:
            payload.pop("usage", None)
        if self.kind == "chat":
            for choice in payload["choices"]:
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return sse(payload)

