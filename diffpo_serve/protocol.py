"""The wire format: OpenAI-compatible request and response models, and the one error envelope.

Request models list OpenAI's fields in OpenAI's order (``/v1/completions``, ``/v1/chat/completions``);
the server's own diffusion extras are fenced off at the end of each request under "diffusion
extras" and carry the sampler's own names (``sampler``, ``threshold``, ``block_length``, ``steps``;
see :class:`diffpo_serve.dllm.sampler.SamplingParams`). With the ``openai`` client they are passed
through ``extra_body``. Unknown fields are accepted and ignored (the server logs their names), as
vLLM does, except the output constraints of peer servers (:data:`CONSTRAINT_FIELDS`: vLLM's
``structured_outputs`` and ``guided_*``, llama.cpp's ``json_schema`` and ``grammar``) and a non-text
``response_format``: the server cannot constrain its text, so these get a 400 naming the field. ``model``
may be omitted or null: the server's one model. Typed fields are strict: ``"16"`` is not an integer and ``true`` is not a number.

Responses are OpenAI's objects plus documented extension fields:

* every choice carries ``nfe`` (forward passes the choice took) and ``threshold`` (the confidence
  threshold or EB gamma its row was decoded with; ``null`` for the ``steps`` sampler, which has none);
* ``usage.nfe`` is the sum of the choices' ``nfe``;
* a canvas model's choices also carry ``encoder_passes`` (its prompt-encoder passes, one per block; NFE counts
  decoder passes only) and ``usage.encoder_passes`` their sum; ``null`` for masked models.

Step events (``/v1/completions`` only, fenced): a streamed request with the diffusion extra
``"return_steps": true`` also gets one :class:`CompletionStepChunk` (``object:
"text_completion.step"``) per forward pass of each choice. For a masked model
(:class:`CompletionStepChoice`, ``"paradigm": "masked"``) it carries the positions the sampler
committed at that pass, their token ids and texts, and the block it worked on. For a canvas model
(DiffusionGemma; :class:`CompletionCanvasStepChoice`, ``"paradigm": "canvas"``) it carries the current
block's whole *draft* (every position's token as that decoder pass reads it, which the next pass may
change) and the positions the entropy bound kept. Requests without the flag never see them;
``return_steps`` without ``stream`` is a 400.

Streaming text is the same for both paradigms: an ordinary chunk carries text only once it is
determined (masked: every earlier position committed; canvas: a finished block), so the ordinary
chunks of a stream concatenate to the final text and nothing sent is ever taken back.

Canvas models (``paradigm`` ``canvas`` in ``/v1/models``) take their own extras ``t_min``, ``t_max``
(the temperature schedule), ``stability_threshold`` and ``confidence_threshold`` (the early stop); a
masked model refuses them, and a canvas model refuses the masked-only ones (400 naming the parameter).

``usage.completion_tokens`` counts real tokens: up to and including the EOS or the token that
completed a stop string, never the rest of the fixed-size canvas.

Every error, whatever its origin, is the envelope ``{"error": {"message", "type", "param", "code"}}``
built from :class:`APIError`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error with its HTTP status, raised anywhere in the server and rendered as the envelope."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def unavailable(message: str, code: str, retry_after: int = 1) -> APIError:
    """503 with ``Retry-After``: queue full, model loading, or server draining."""
    return APIError(503, message, type="service_unavailable_error", code=code,
                    headers={"Retry-After": str(retry_after)})


# ----------------------------------------------------------------------------- requests

# output constraints of peer servers (vLLM: structured_outputs and the older guided_*; llama.cpp: json_schema,
# grammar): refused with a 400 naming the field rather than ignored, since the text would not follow them
CONSTRAINT_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structural_tag", "guided_decoding_backend", "guided_whitespace_pattern", "json_schema",
                     "grammar")

STRICT_INT = dict(strict=True)
FINITE = dict(strict=True, allow_inf_nan=False)
MAX_STOP_STRINGS = 16
MAX_EXTRA_INT = 1 << 20  # steps / block_length beyond any model's length are refused before reaching torch


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = Field(None, strict=True)


class _GenerationFields(BaseModel):
    """Fields shared by both endpoints; subclasses re-declare them in OpenAI's order."""

    model_config = ConfigDict(extra="allow")

    @field_validator("stop", check_fields=False)
    @classmethod
    def _check_stop(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings; got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def constraints(self) -> list[str]:
        """The output constraints this request asks for, which a diffusion server cannot honour (each a 400):
        the structured-output / guided-decoding fields of :data:`CONSTRAINT_FIELDS` that are set (not null),
        and a ``response_format`` other than ``text``."""
        extra = self.model_extra or {}
        names = [name for name in CONSTRAINT_FIELDS if extra.get(name) is not None]
        fmt = getattr(self, "response_format", None)
        if fmt is not None and fmt.type != "text":
            names.append("response_format")
        return names

    def ignored_fields(self) -> list[str]:
        """The request's unknown fields, which the server ignores (constraint fields are refused, not ignored)."""
        return sorted(set(self.model_extra or {}) - set(CONSTRAINT_FIELDS))

    def stop_strings(self) -> list[str]:
        return list(getattr(self, "stop", None) or [])

    def include_usage(self) -> bool:
        opts = getattr(self, "stream_options", None)
        return bool(opts and opts.include_usage)


_SAMPLER_HELP = ("diffusion extra: decoding strategy. `steps` (LLaDA low-confidence remasking, NFE = steps), "
                 "`confidence` (Fast-dLLM: commit tokens with confidence >= threshold), `eb` (entropy-bounded: "
                 "commit while the summed entropy stays <= threshold), `learned` (threshold from the model's "
                 "threshold head; only for models that have one), `policy` (the model's learned per-step commit "
                 "policy: each pass commits the masked tokens whose commit probability >= threshold; only for "
                 "models that have one). Canvas models take `eb` and `learned` only. Default: the server's "
                 "--default-sampler.")
_THRESHOLD_HELP = ("diffusion extra: `confidence` minimum confidence, `eb` gamma, or `policy` minimum commit "
                   "probability (0: the whole block at once; above 1: one token per pass); overrides the sampler "
                   "default (confidence 0.9, eb 0.3, policy: its trained operating point; a canvas model: its "
                   "checkpoint's entropy bound) and a learned head. Ignored by `steps`.")
_BLOCK_HELP = ("diffusion extra: semi-autoregressive block length in tokens (default: the server's, "
               "`defaults.block_length` in /v1/models: LLaDA and Dream 32, a model without one a single block of "
               "max_tokens; a canvas model's is fixed: its canvas_length).")
_CANVAS_HELP = "diffusion extra, canvas models only (default: the checkpoint's generation config): "
_T_MIN_HELP = _CANVAS_HELP + "the temperature schedule's floor (T = t_min + (t_max - t_min) * steps left / steps)."
_T_MAX_HELP = _CANVAS_HELP + "the temperature at a block's first denoising step."
_STABILITY_HELP = _CANVAS_HELP + "steps the draft must stay unchanged before a block may stop early."
_CONFIDENCE_HELP = _CANVAS_HELP + "mean entropy below which a stable block stops early (0: never early)."
_CACHE_HELP = ("diffusion extra: KV cache. `off` (every step runs the whole sequence), `prefix` (keys/values of the "
               "prompt and finished blocks reused within a block; Fast-dLLM) or `dual` (also those of the masked "
               "suffix); default: the server's (`cache` in /v1/models). Native models only.")
_STEPS_HELP = ("diffusion extra: `steps` sampler only: total forward passes, a multiple of the number of "
               "blocks (default: the server's passes per token, `defaults.steps` for `defaults.gen_length` in "
               "/v1/models; unless configured one token per pass). A canvas model: the most denoising steps "
               "per block (default: the server's, else its checkpoint's).")

_RETURN_STEPS_HELP = ("diffusion extra, /v1/completions with stream=true only: also stream one "
                      "`text_completion.step` chunk per forward pass of each choice (positions committed at "
                      "that pass, their token ids and texts, the current block).")

class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(strict=True)


MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits: completions' `logprobs`, chat's `top_logprobs`
MAX_TOP_LOGPROBS = 20  # = the sampler's TOP_LOGPROBS (what a decode records)

Sampler = Literal["steps", "confidence", "eb", "learned", "policy"]
Cache = Literal["off", "prefix", "dual"]


class CompletionRequest(_GenerationFields):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, token ids, or lists of ids."""

    model: str | None = Field(None, strict=True)  # omitted or null: the one served model
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1, **STRICT_INT)
    echo: bool | None = Field(False, strict=True)
    frequency_penalty: float | None = Field(0.0, **FINITE)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS, **STRICT_INT)
    max_tokens: int | None = Field(None, ge=1, **STRICT_INT)
    n: int = Field(1, ge=1, le=128, **STRICT_INT)
    presence_penalty: float | None = Field(0.0, **FINITE)
    response_format: ResponseFormat | None = None  # vLLM's extension on completions; only `text` is served
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, **STRICT_INT)
    stop: str | list[str] | None = None
    stream: bool | None = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    suffix: str | None = Field(None, strict=True)
    temperature: float | None = Field(None, ge=0, le=2, **FINITE)
    top_p: float | None = Field(None, gt=0, le=1, **FINITE)
    user: str | None = Field(None, strict=True)

    # --- diffusion extras (not in OpenAI's API; the sampler's own names) ---------------------------
    sampler: Sampler | None = Field(None, description=_SAMPLER_HELP)
    threshold: float | None = Field(None, ge=0, description=_THRESHOLD_HELP, **FINITE)
    block_length: int | None = Field(None, ge=1, le=MAX_EXTRA_INT, description=_BLOCK_HELP, **STRICT_INT)
    steps: int | None = Field(None, ge=1, le=MAX_EXTRA_INT, description=_STEPS_HELP, **STRICT_INT)
    cache: Cache | None = Field(None, description=_CACHE_HELP)
    return_steps: bool | None = Field(None, strict=True, description=_RETURN_STEPS_HELP)
    t_min: float | None = Field(None, ge=0, description=_T_MIN_HELP, **FINITE)
    t_max: float | None = Field(None, gt=0, description=_T_MAX_HELP, **FINITE)
    stability_threshold: int | None = Field(None, ge=0, le=MAX_EXTRA_INT, description=_STABILITY_HELP, **STRICT_INT)
    confidence_threshold: float | None = Field(None, ge=0, description=_CONFIDENCE_HELP, **FINITE)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("token-id prompts must not be empty")
        return v

    def gen_length(self) -> int | None:
        return self.max_tokens

    def logprob_alternatives(self) -> int | None:
        """Alternatives per token the response lists (``logprobs``); None: no log-probs asked for."""
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str = Field(strict=True)


class ChatMessage(BaseModel):
    """One input message; ``content`` is a string or a list of text parts (other parts are refused)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, strict=True)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationFields):
    """``POST /v1/chat/completions``.

    Messages are rendered with the tokenizer's chat template when it has one; otherwise (our tiny
    character-level model) the prompt is the content of the last ``user`` message.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = Field(None, strict=True)  # omitted or null: the one served model
    frequency_penalty: float | None = Field(0.0, **FINITE)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = Field(False, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, **STRICT_INT)
    max_tokens: int | None = Field(None, ge=1, **STRICT_INT)
    n: int = Field(1, ge=1, le=128, **STRICT_INT)
    presence_penalty: float | None = Field(0.0, **FINITE)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, **STRICT_INT)
    stop: str | list[str] | None = None
    stream: bool | None = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, **FINITE)
    tool_choice: Any = None
    tools: list[Any] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, **STRICT_INT)
    top_p: float | None = Field(None, gt=0, le=1, **FINITE)
    user: str | None = Field(None, strict=True)

    # --- diffusion extras (not in OpenAI's API; the sampler's own names) ---------------------------
    sampler: Sampler | None = Field(None, description=_SAMPLER_HELP)
    threshold: float | None = Field(None, ge=0, description=_THRESHOLD_HELP, **FINITE)
    block_length: int | None = Field(None, ge=1, le=MAX_EXTRA_INT, description=_BLOCK_HELP, **STRICT_INT)
    steps: int | None = Field(None, ge=1, le=MAX_EXTRA_INT, description=_STEPS_HELP, **STRICT_INT)
    cache: Cache | None = Field(None, description=_CACHE_HELP)
    t_min: float | None = Field(None, ge=0, description=_T_MIN_HELP, **FINITE)
    t_max: float | None = Field(None, gt=0, description=_T_MAX_HELP, **FINITE)
    stability_threshold: int | None = Field(None, ge=0, le=MAX_EXTRA_INT, description=_STABILITY_HELP, **STRICT_INT)
    confidence_threshold: float | None = Field(None, ge=0, description=_CONFIDENCE_HELP, **FINITE)

    def gen_length(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_alternatives(self) -> int | None:
        """Alternatives per token the response lists (``top_logprobs``, 0 when not given); None: ``logprobs``
        is not true."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ----------------------------------------------------------------------------- responses

FinishReason = Literal["stop", "length"]


def now() -> int:
    return int(time.time())


_ENCODER_HELP = ("extension, canvas models: prompt-encoder passes this choice took (one per block; `nfe` counts "
                 "decoder passes); null for masked models")
_ENCODER_SUM_HELP = "extension, canvas models: encoder passes, summed over the choices; null for masked models"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    nfe: int = Field(description="extension: forward passes, summed over the choices")
    encoder_passes: int | None = Field(None, description=_ENCODER_SUM_HELP)


class CompletionLogprobs(BaseModel):
    """Completions' ``logprobs`` (OpenAI's legacy shape), one entry per generated token of ``text``: the token's
    text, its log-probability under the model at the pass that committed it, a dict of the ``logprobs`` most likely
    tokens there (the committed one always included, so up to ``logprobs`` + 1) and its character offset in the
    choice's text (counted from the first token of the whole choice, also in a stream)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """Chat's ``logprobs``: per generated token its text, log-probability, UTF-8 bytes and the ``top_logprobs``
    most likely tokens at the pass that committed it."""

    content: list[TokenLogprobEntry] | None
    refusal: list[TokenLogprobEntry] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    nfe: int = Field(description="extension: forward passes this choice took")
    threshold: float | None = Field(description="extension: threshold / gamma used; null for `steps`")
    encoder_passes: int | None = Field(None, description=_ENCODER_HELP)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None  # the tokens whose text this chunk completes
    finish_reason: FinishReason | None = None
    nfe: int | None = None  # extension, on the choice's last chunk
    threshold: float | None = None  # extension, on the choice's last chunk
    encoder_passes: int | None = None  # extension (canvas models), on the choice's last chunk


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None


class CompletionStepChoice(BaseModel):
    """One forward pass of one choice (extension; only streamed with ``return_steps``).

    ``positions`` are 0-based offsets in the choice's generation region (``gen_length`` long) that
    the sampler committed at this pass, with their ``token_ids`` and per-token ``tokens`` (texts,
    special tokens included). When an EOS ends the choice with masks after it, those masks become
    EOS without being committed: they are listed in ``filled_positions`` (token ``eos_token_id``).
    Replaying every step of a choice onto an all-mask canvas gives its final ids; there is one step
    per forward pass, so a choice's step count equals its ``nfe``.
    """

    index: int
    text: str = ""  # always empty: the text arrives in the ordinary chunks
    logprobs: None = None
    finish_reason: None = None
    paradigm: Literal["masked"] = "masked"
    step: int = Field(description="0-based index of this forward pass of the choice (= nfe - 1)")
    nfe: int = Field(description="forward passes of the choice so far, this one included")
    block: int = Field(description="index of the block this pass worked on")
    block_start: int = Field(description="first position of that block")
    block_end: int = Field(description="end (exclusive) of that block")
    gen_length: int
    positions: list[int]
    token_ids: list[int]
    tokens: list[str]
    filled_positions: list[int]
    eos_token_id: int
    finished: bool = Field(description="the choice's text is determined after this pass")
    threshold: float | None = Field(description="threshold / gamma the choice is decoded with; null for `steps`")


class CompletionCanvasStepChoice(BaseModel):
    """One decoder pass of one choice of a canvas model (DiffusionGemma; extension, only with ``return_steps``).

    A canvas model rewrites its whole current block at every pass: ``draft_ids`` / ``draft_tokens`` are the
    tokens of positions ``[block_start, block_end)`` (0-based in the choice's generation region) as this pass
    reads them (the argmax of its processed logits), and the next pass may change any of them.
    ``accepted_positions`` are the positions the entropy bound (``threshold``) kept in the canvas at this pass;
    every other position was re-randomised. When ``block_done`` is true the block ended at this pass and its
    draft is final (pad after an EOS). Replaying: a position shows the draft of the last pass whose block holds
    it; the final drafts of the blocks, cut at the first EOS, are the choice's final ids. One event per decoder
    pass: a choice's step count equals its ``nfe``.
    """

    index: int
    text: str = ""  # always empty: the text arrives in the ordinary chunks
    logprobs: None = None
    finish_reason: None = None
    paradigm: Literal["canvas"] = "canvas"
    step: int = Field(description="0-based index of this decoder pass of the choice (= nfe - 1)")
    nfe: int = Field(description="decoder passes of the choice so far, this one included")
    block: int = Field(description="index of the block (canvas) this pass denoised")
    block_start: int = Field(description="first position of that block")
    block_end: int = Field(description="end (exclusive) of that block, cut at gen_length")
    gen_length: int
    draft_ids: list[int]
    draft_tokens: list[str]
    accepted_positions: list[int]
    block_done: bool = Field(description="the block ended at this pass: its draft is final")
    eos_token_id: int
    finished: bool = Field(description="the choice's text is determined after this pass")
    threshold: float = Field(description="the entropy bound the choice is decoded with")


class CompletionStepChunk(BaseModel):
    id: str
    object: Literal["text_completion.step"] = "text_completion.step"
    created: int
    model: str
    choices: list[CompletionStepChoice | CompletionCanvasStepChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None
    nfe: int = Field(description="extension: forward passes this choice took")
    threshold: float | None = Field(description="extension: threshold / gamma used; null for `steps`")
    encoder_passes: int | None = Field(None, description=_ENCODER_HELP)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None  # the tokens whose text this chunk completes
    finish_reason: FinishReason | None = None
    nfe: int | None = None  # extension, on the choice's last chunk
    threshold: float | None = None  # extension, on the choice's last chunk
    encoder_passes: int | None = None  # extension (canvas models), on the choice's last chunk


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "diffpo"
    root: str | None = None
    max_model_len: int | None = Field(None, description="extension: prompt + completion tokens the model fits")
    device: str | None = Field(None, description="extension: the torch device the model runs on (`--device`; "
                               "`auto` resolved: cuda when torch sees a GPU, else cpu)")
    description: str | None = Field(None, description="extension: what the model does and which prompts it "
                                    "understands (its model card's `description`)")
    examples: list[str] = Field(default_factory=list, description="extension: example prompts from its model card "
                                "(the card's `widget` entries)")
    cache: str | None = Field(None, description="extension: the KV cache requests use unless they name one (`off`, "
                              "`prefix`, `dual`)")
    cache_modes: list[str] = Field(default_factory=list, description="extension: the `cache` values this model "
                                   "accepts (`off` only for a model without a native KV cache)")
    paradigm: str = Field("masked", description="extension: how the model decodes: `masked` (mask tokens filled "
                          "in) or `canvas` (DiffusionGemma: blocks of random tokens rewritten at every step)")
    samplers: list[str] = Field(default_factory=list, description="extension: the `sampler` values this model "
                                "accepts")
    defaults: dict[str, Any] = Field(default_factory=dict, description="extension: what a request gets for the "
                                     "diffusion extras it leaves out (sampler, gen_length, threshold, ...; a masked "
                                     "model also the block_length and `steps` passes of that answer; a canvas "
                                     "model its steps per block, temperature schedule, stopping thresholds "
                                     "and canvas_length)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
