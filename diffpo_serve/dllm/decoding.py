"""One decoder interface for every decoding paradigm: what the server, the batcher, evaluation and RL ask of a model.

A loaded model decodes in one paradigm (``LoadedModel.paradigm``): ``masked`` (a region of mask tokens filled in,
never revisited: :mod:`diffpo_serve.dllm.sampler`) or ``canvas`` (DiffusionGemma: blocks of random tokens
rewritten at every step: :mod:`diffpo_serve.dllm.canvas`). :func:`decoder_for` picks the class once; callers hold
the :class:`Decoder` and never branch on the paradigm's name. A decoder owns:

- **knobs -> validated params**: :meth:`~Decoder.params_for` turns :class:`Knobs` (what a caller asks for; ``None``
  leaves a knob to the paradigm) into the paradigm's params (:class:`~diffpo_serve.dllm.sampler.SamplingParams`
  or :class:`~diffpo_serve.dllm.canvas.CanvasParams`), refusing what the paradigm cannot do with a
  :class:`KnobError` (a ValueError) naming the knob; the server maps it onto an HTTP 400, the CLIs onto a flag;
- **the batch state** (the batcher): ``init_state`` / ``concat`` / ``select`` / ``step`` (one batched model
  pass; rows join and leave between steps with ``concat`` and ``select``);
- **a whole decode** (evaluation, RL): :meth:`~Decoder.generate` with the model's own learned parts, and
  :meth:`~Decoder.explore` (rollouts: the head's bound and the policy's commits sampled, the trajectory kept),
  both returning a :class:`Decoded`;
- **what a step reports**: :meth:`~Decoder.determined`, the ids of each row that can no longer change (with
  :meth:`~Decoder.token_logprobs`, their :class:`TokenLogprob` for rows that asked for them), and
  :meth:`~Decoder.step_updates`, the per-pass events of rows that asked for them: :class:`StepUpdate` (masked:
  the positions committed at that pass) or :class:`CanvasStepUpdate` (canvas: the current block's draft).

Both states share the fields the batcher reads directly: ``block``, ``finished``, ``nfe`` (model passes: decoder
passes for a canvas model), ``threshold`` (the bound each row decodes with) and ``canvas`` (only for its device).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import torch

from diffpo_serve.dllm import canvas as cv
from diffpo_serve.dllm import sampler as masked
from diffpo_serve.dllm.families import family_module
from diffpo_serve.dllm.loading import LoadedModel

CANVAS_ONLY = ("t_min", "t_max", "stability_threshold", "confidence_threshold")  # knobs of the canvas paradigm only


class KnobError(ValueError):
    """A knob the decoder refuses: ``param`` names it, ``code`` says why (``unsupported_sampler``,
    ``unsupported_parameter``, ``unsupported_cache``, or None for a value out of range)."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class Knobs:
    """What a caller asks of a decode; ``None`` leaves a knob to the paradigm (the model's default sampler, no
    cache, greedy masked decoding, the checkpoint's canvas schedule). The canvas-only knobs are
    :data:`CANVAS_ONLY`."""

    sampler: str | None = None
    threshold: float | None = None
    steps: int | None = None
    block_length: int | None = None
    cache: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    logprobs: bool = False  # record each generated token's log-prob and its alternatives (:class:`TokenLogprob`)


# ----------------------------------------------------------------------------- per-pass events and results

@dataclass(frozen=True)
class PassUpdate:
    """What every step event of a row says about one forward pass, whatever the paradigm: the pass (``step``,
    ``nfe``), the block it worked on (``block``, positions ``[block_start, block_end)``), and the row's state."""

    choice: int
    step: int
    nfe: int
    block: int
    block_start: int
    block_end: int
    gen_length: int
    finished: bool
    sampler: str
    threshold: float


@dataclass(frozen=True)
class StepUpdate(PassUpdate):
    """One forward pass of a masked row that asked for steps, from the step's ``StepOutput.committed``.

    ``positions`` (generation-region offsets) were committed at this pass with ``token_ids``;
    ``filled_positions`` are masks after an EOS that became EOS when the row finished (not commits).
    """

    positions: list[int]
    token_ids: list[int]
    filled_positions: list[int]


@dataclass(frozen=True)
class CanvasStepUpdate(PassUpdate):
    """One decoder pass of a canvas row that asked for steps.

    ``draft_ids`` are the tokens of positions ``[block_start, block_end)`` as this pass reads them (the argmax
    of its processed logits); they may all change at the next pass. ``accepted_positions`` (generation-region
    offsets) are those the entropy bound kept in the canvas; every other position was re-randomised.
    ``block_done``: the block ended at this pass and ``draft_ids`` are its final tokens (pad after an EOS).
    """

    draft_ids: list[int]
    accepted_positions: list[int]
    block_done: bool


class TokenLogprob(NamedTuple):
    """One generated token's log-probability under the model's distribution (softmax of its logits, the mask token
    excluded, before temperature and top_p) at the pass that committed it, and that pass's most likely tokens at
    its position with theirs (most likely first, up to ``TOP_LOGPROBS``)."""

    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass
class Decoded:
    """A whole decode, whatever the paradigm (B rows)."""

    sequences: torch.Tensor  # B, n  generated ids, n = the longest gen_length asked for
    gen_length: torch.Tensor  # B  tokens asked for
    nfe: torch.Tensor  # B  model passes (a canvas model's: decoder passes)
    threshold: torch.Tensor  # B  the bound each row used
    threshold_choice: torch.Tensor  # B  the head's grid index, -1 where the head did not choose
    head_features: torch.Tensor  # B, d  what the head read
    encoder_passes: torch.Tensor | None = None  # B  a canvas model's encoder passes (one per block); None: masked
    commit_step: torch.Tensor | None = None  # B, n  masked rollouts: the step of each commit (-1: EOS fill)
    logprob: torch.Tensor | None = None  # B, n  masked rollouts: behaviour log-prob of each committed token
    policy_trace: masked.PolicyTrace | None = None  # rollouts with a step policy: its view of every pass

    def rows(self) -> list[list[int]]:
        """Each row's ids, cut at its ``gen_length``."""
        return [ids[:n] for ids, n in zip(self.sequences.tolist(), self.gen_length.tolist())]


# ----------------------------------------------------------------------------- the interface

class Decoder(Protocol):
    """See the module docstring. ``masks``: the paradigm has a mask token and a mask state (what DiFFPO's and
    d1's likelihoods need); ``block_length``: the blocks the model fixes (a canvas model's C), None where the
    caller picks them; ``tempered``: the caller's ``temperature`` and ``top_p`` apply (a canvas model samples
    with its own schedule)."""

    name: str
    samplers: tuple[str, ...]
    masks: bool
    block_length: int | None
    tempered: bool

    def fallback_sampler(self) -> str:
        """The sampler of a decode that names none: the model's learned one where it has one."""

    def params_for(self, knobs: Knobs, gen_length: int): ...

    def resolve(self, params): ...

    def reproducible(self, params):
        """``params`` made to decode the same way every time (for evaluation curves)."""

    def max_nfe(self, params) -> int:
        """The most model passes a row of ``params`` can take."""

    def summary(self, params) -> dict:
        """``block_length``, ``steps`` and ``cache`` as the (resolved) ``params`` decode, for reports."""

    def init_state(self, prompts: list[list[int]], params: list): ...

    def concat(self, states: list): ...

    def select(self, state, rows: list[int]):
        """The state of just ``rows`` (in that order): the batch once the other rows have left."""

    def step(self, state): ...

    def generate(self, prompts: list[list[int]], params) -> Decoded: ...

    def explore(self, model: torch.nn.Module, prompts: list[list[int]], params, head, policy) -> Decoded: ...

    def determined(self, state, rows: torch.Tensor) -> list[list[int]]: ...

    def token_logprobs(self, state, rows: torch.Tensor, lengths: list[int]) -> list[list[TokenLogprob] | None]:
        """For each row, a :class:`TokenLogprob` per generated position of its first ``lengths[k]`` (those
        :meth:`determined` returns); None for a row that did not ask for them."""

    def encoder_passes(self, state, rows: torch.Tensor) -> list[int | None]:
        """Prompt-encoder passes of each row so far (reported beside NFE); None where the paradigm has none."""

    def step_updates(self, state, out, picked: list[int], blocks_before: torch.Tensor,
                     slots: list[tuple[int, str]]) -> list: ...


DECODERS: dict[str, type] = {}


def decoder_for(loaded: LoadedModel) -> Decoder:
    """The decoder of a loaded model (weightless in the serving front; see :meth:`LoadedModel.without_weights`)."""
    if loaded.paradigm not in DECODERS:
        raise ValueError(f"{loaded.path}: no decoder for the {loaded.paradigm!r} paradigm "
                         f"(known: {', '.join(DECODERS)})")
    return DECODERS[loaded.paradigm](loaded)


def _named(e: ValueError) -> KnobError:
    """A params check's ValueError (its message starts with the field's name) as a :class:`KnobError`."""
    return KnobError(str(e), param=str(e).split(" ", 1)[0])


# ----------------------------------------------------------------------------- masked

class MaskedDecoder:
    """The masked sampler (:mod:`diffpo_serve.dllm.sampler`): every sampler, the KV cache, the step policy."""

    name = "masked"
    samplers = masked.SAMPLERS
    masks = True
    block_length = None
    tempered = True

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self._align = None  # the prompt layout, from the model's dtype (decoder side only)

    def fallback_sampler(self) -> str:
        return ("policy" if self.loaded.step_policy is not None else
                "learned" if self.loaded.threshold_head is not None else "steps")

    def runs(self, sampler: str) -> bool:
        """Whether this model runs ``sampler`` without a ``threshold``: ``learned`` needs its threshold head,
        ``policy`` its step policy."""
        return not ((sampler == "learned" and self.loaded.threshold_head is None)
                    or (sampler == "policy" and self.loaded.step_policy is None))

    def params_for(self, knobs: Knobs, gen_length: int) -> masked.SamplingParams:
        """Validated :class:`~diffpo_serve.dllm.sampler.SamplingParams`; a greedy decode (temperature 0) draws
        nothing, so it keeps no seed."""
        for name in CANVAS_ONLY:
            if getattr(knobs, name) is not None:
                raise KnobError(f"`{name}` is an extra of canvas models (DiffusionGemma's temperature schedule and "
                                "stopping rule); this model decodes masked tokens", name, "unsupported_parameter")
        sampler = knobs.sampler or self.fallback_sampler()
        if sampler == "learned" and knobs.threshold is None and not self.runs(sampler):
            raise KnobError("sampler `learned` needs a model with a threshold head and this model has none; "
                            "give `threshold` or use `steps`, `confidence` or `eb`", "sampler", "unsupported_sampler")
        if sampler == "policy" and not self.runs(sampler):
            raise KnobError("sampler `policy` needs a model with a step policy and this model has none; "
                            "use `steps`, `confidence`, `eb` or `learned`", "sampler", "unsupported_sampler")
        cache = knobs.cache or "off"
        if cache != "off" and not self.loaded.kv_cache:
            raise KnobError(f"cache `{cache}` needs a model with a native KV cache and this model has none; "
                            "use `off`", "cache", "unsupported_cache")
        temperature = 0.0 if knobs.temperature is None else knobs.temperature
        params = masked.SamplingParams(
            sampler=sampler, gen_length=gen_length, block_length=knobs.block_length, steps=knobs.steps, cache=cache,
            threshold=knobs.threshold, top_p=1.0 if knobs.top_p is None else knobs.top_p, temperature=temperature,
            seed=knobs.seed if temperature > 0 else None, logprobs=knobs.logprobs)
        try:
            params.resolved()
        except ValueError as e:
            raise _named(e) from None
        return params

    def resolve(self, params: masked.SamplingParams) -> masked.SamplingParams:
        return params.resolved()

    def reproducible(self, params: masked.SamplingParams) -> masked.SamplingParams:
        return replace(params, temperature=0.0, seed=None)  # greedy

    def max_nfe(self, params: masked.SamplingParams) -> int:
        return params.gen_length  # one token per pass

    def summary(self, params: masked.SamplingParams) -> dict:
        return {"block_length": params.block_length, "steps": params.steps if params.sampler == "steps" else None,
                "cache": params.cache}

    def init_state(self, prompts, params) -> masked.BatchState:
        loaded = self.loaded
        if self._align is None:
            self._align = masked.prompt_alignment(loaded.model)
        return masked.init_state(prompts, params, mask_id=loaded.mask_id, eos_id=loaded.eos_id, eos_ids=loaded.eos_ids,
                                 pad_id=loaded.pad_id, device=loaded.device, head=loaded.threshold_head,
                                 policy=loaded.step_policy, align=self._align)

    def concat(self, states) -> masked.BatchState:
        return masked.BatchState.concat(states)

    def select(self, state: masked.BatchState, rows: list[int]) -> masked.BatchState:
        return state.select(rows)

    def step(self, state: masked.BatchState) -> masked.StepOutput:
        return masked.denoise_step(self.loaded.model, state)

    def generate(self, prompts, params) -> Decoded:
        """Decode with the model's own threshold head and step policy, greedy in what they choose."""
        loaded = self.loaded
        return self._decoded(masked.generate(
            loaded.model, prompts, params, mask_id=loaded.mask_id, eos_id=loaded.eos_id, eos_ids=loaded.eos_ids,
            pad_id=loaded.pad_id, head=loaded.threshold_head, policy=loaded.step_policy))

    def explore(self, model, prompts, params, head, policy) -> Decoded:
        """Rollouts of ``model``: the head samples each row's bound, ``policy`` (if any) samples the commits; the
        trajectory (commit steps, behaviour log-probs, the policy's trace) is kept."""
        loaded = self.loaded
        out = masked.generate(model, prompts, params, mask_id=loaded.mask_id, eos_id=loaded.eos_id,
                              eos_ids=loaded.eos_ids, pad_id=loaded.pad_id, return_trajectory=True, head=head,
                              sample_threshold=True, policy=policy, sample_commits=policy is not None)
        return replace(self._decoded(out), commit_step=out.commit_step, logprob=out.logprob,
                       policy_trace=out.policy_trace if policy is not None else None)

    @staticmethod
    def _decoded(out: masked.GenerationOutput) -> Decoded:
        return Decoded(sequences=out.sequences, gen_length=out.gen_length, nfe=out.nfe, threshold=out.threshold,
                       threshold_choice=out.threshold_choice, head_features=out.head_features)

    def encoder_passes(self, state: masked.BatchState, rows: torch.Tensor) -> list[None]:
        return [None] * len(rows)  # one forward over prompt and answer: no separate encoder

    def determined(self, state: masked.BatchState, rows: torch.Tensor) -> list[list[int]]:
        """The generated ids up to the first still-masked position (all of ``gen_length`` once finished)."""
        gen = state.generated[rows]
        masked_ = (gen == state.mask_id).long()
        length = torch.minimum((masked_.cumsum(-1) == 0).sum(-1), state.gen_length[rows]).tolist()
        return [ids[:n] for ids, n in zip(gen.tolist(), length)]

    def token_logprobs(self, state: masked.BatchState, rows: torch.Tensor,
                       lengths: list[int]) -> list[list[TokenLogprob] | None]:
        """What rows with ``logprobs`` recorded (``BatchState.model_logprob``, ``top_ids``, ``top_logprob``) for their
        first ``lengths[k]`` generated positions; None for the other rows."""
        recording = state.record_logprobs[rows].tolist()
        out: list[list[TokenLogprob] | None] = [None] * len(recording)
        if not any(recording):
            return out
        for k, (r, n) in enumerate(zip(rows.tolist(), lengths)):
            if not recording[k]:
                continue
            logprob, ids, top = (t[r, :n].tolist() for t in (state.model_logprob, state.top_ids, state.top_logprob))
            out[k] = [TokenLogprob(lp, tuple(i for i in row_ids if i >= 0), tuple(v for i, v in zip(row_ids, row_lp)
                                                                                    if i >= 0))
                      for lp, row_ids, row_lp in zip(logprob, ids, top)]
        return out

    def step_updates(self, state: masked.BatchState, out: masked.StepOutput, picked: list[int],
                     blocks_before: torch.Tensor, slots: list[tuple[int, str]]) -> list[StepUpdate]:
        """A :class:`StepUpdate` for each row ``out.rows[k]``, k in ``picked`` (state already stepped);
        ``slots``: (choice, sampler) of each picked row."""
        device = state.canvas.device
        k_idx = torch.tensor(picked, device=device)
        idx = out.rows[k_idx]
        committed = out.committed[k_idx]
        gen = state.generated[idx]
        gen_length = state.gen_length[idx]
        j = torch.arange(state.gen_width, device=device)
        finished = state.finished[idx]
        # masks that the finishing EOS turned into EOS: never committed, inside the row, not masked
        filled = (finished[:, None] & (state.commit_step[idx] == -1) & (j[None, :] < gen_length[:, None])
                  & (gen != state.mask_id))
        block_length = state.block_length[idx]
        block = blocks_before[idx]
        start = block * block_length
        end = torch.minimum(start + block_length, gen_length)
        committed_at: list[list[int]] = [[] for _ in picked]
        token_at: list[list[int]] = [[] for _ in picked]
        for (k, pos), token in zip(committed.nonzero().tolist(), gen[committed].tolist()):  # both row-major
            committed_at[k].append(pos)
            token_at[k].append(token)
        filled_at: list[list[int]] = [[] for _ in picked]
        for k, pos in filled.nonzero().tolist():
            filled_at[k].append(pos)
        nfe, thresholds = state.nfe[idx].tolist(), state.threshold[idx].tolist()
        block, start, end = block.tolist(), start.tolist(), end.tolist()
        gen_length, finished = gen_length.tolist(), finished.tolist()
        return [StepUpdate(choice=choice, step=int(nfe[k]) - 1, nfe=int(nfe[k]), block=int(block[k]),
                           block_start=int(start[k]), block_end=int(end[k]), gen_length=int(gen_length[k]),
                           positions=committed_at[k], token_ids=token_at[k], filled_positions=filled_at[k],
                           finished=bool(finished[k]), sampler=sampler, threshold=round(float(thresholds[k]), 6))
                for k, (choice, sampler) in enumerate(slots)]


# ----------------------------------------------------------------------------- canvas

class CanvasDecoder:
    """The random-canvas paradigm (:mod:`diffpo_serve.dllm.canvas`, DiffusionGemma).

    Knobs: ``threshold`` the entropy bound, ``steps`` the most denoising steps *per block*, ``seed`` the row's
    generator, ``t_min``/``t_max`` (the temperature schedule), ``stability_threshold``/``confidence_threshold``
    (the early stop); unset ones take the checkpoint's defaults (its generation config). Samplers: ``eb`` (a
    fixed bound) and ``learned`` (the threshold head picks each row's bound at its first decoder pass). Refused
    with a :class:`KnobError` naming the knob: masked-only samplers, ``block_length`` other than C, ``cache``
    other than ``off``, ``temperature`` and ``top_p`` (the schedule replaces them).
    """

    name = "canvas"
    samplers = cv.SAMPLERS
    masks = False
    tempered = False

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        config = loaded.model.config
        family = family_module(getattr(config, "model_type", None))
        self.defaults = family.canvas_defaults(getattr(loaded.model, "generation_config", None))
        self.canvas_length = self.block_length = int(config.canvas_length)
        self._denoiser = None

    @property
    def denoiser(self) -> cv.CanvasDenoiser:
        if self._denoiser is None:  # the decoder's side only: the front's model has no weights
            self._denoiser = cv.denoiser_for(self.loaded.model)
        return self._denoiser

    def fallback_sampler(self) -> str:
        return "learned" if self.loaded.threshold_head is not None else "eb"

    def _refuse(self, knobs: Knobs, sampler: str) -> None:
        """Raise a :class:`KnobError` for the first knob this paradigm cannot honour (see the class docstring)."""
        c = self.canvas_length
        if knobs.logprobs:
            raise KnobError("`logprobs` is not supported by this model: a canvas model redraws every position of "
                            "its block at each pass and keeps those the entropy bound accepts, so a token is not "
                            "committed at one pass whose distribution its log-probability could come from",
                            "logprobs", "unsupported_parameter")
        if sampler not in self.samplers:
            raise KnobError(f"sampler `{sampler}` is a masked-model sampler; this model decodes a random-token "
                            f"canvas whose accept rule is the entropy bound: use `eb` (bound `threshold`) or "
                            "`learned` (the threshold head picks it)", "sampler", "unsupported_sampler")
        if sampler == "learned" and knobs.threshold is None and self.loaded.threshold_head is None:
            raise KnobError("sampler `learned` needs a model with a threshold head and this model has none; "
                            "give `threshold` or use `eb`", "sampler", "unsupported_sampler")
        if knobs.block_length is not None and knobs.block_length != c:
            raise KnobError(f"`block_length` is fixed for this model: it decodes whole canvases of {c} tokens "
                            "(its config's canvas_length)", "block_length", "unsupported_parameter")
        if knobs.cache not in (None, "off"):
            raise KnobError("`cache` is a masked-model feature; a canvas model keeps its own encoder cache "
                            "per row: use `off` or leave it out", "cache", "unsupported_parameter")
        if knobs.temperature is not None:
            raise KnobError("`temperature` is not used by this model: it samples with its temperature schedule "
                            f"(t_max {self.defaults['t_max']} at a block's first step down towards t_min "
                            f"{self.defaults['t_min']}); set the extras `t_max` and `t_min` instead",
                            "temperature", "unsupported_parameter")
        if knobs.top_p is not None and knobs.top_p != 1:
            raise KnobError("`top_p` is not supported by this model: its proposals are drawn from the whole "
                            "(temperature-scheduled) distribution", "top_p", "unsupported_parameter")

    def params_for(self, knobs: Knobs, gen_length: int) -> cv.CanvasParams:
        sampler = knobs.sampler or self.fallback_sampler()
        self._refuse(knobs, sampler)
        params = cv.CanvasParams(gen_length=gen_length, threshold=knobs.threshold, steps=knobs.steps,
                                 t_min=knobs.t_min, t_max=knobs.t_max, stability_threshold=knobs.stability_threshold,
                                 confidence_threshold=knobs.confidence_threshold, sampler=sampler, seed=knobs.seed)
        try:
            params.resolved(self.defaults)
        except ValueError as e:
            if "temperature schedule" in str(e):
                raise KnobError(str(e), "t_min" if knobs.t_min is not None else "t_max") from None
            raise _named(e) from None
        return params

    def resolve(self, params: cv.CanvasParams) -> cv.CanvasParams:
        return params.resolved(self.denoiser.defaults)

    def reproducible(self, params: cv.CanvasParams) -> cv.CanvasParams:
        return replace(params, seed=0)  # it starts from random tokens: fixed seeds (row i: seed i)

    def max_nfe(self, params: cv.CanvasParams) -> int:
        """Decoder passes of every step of every block: ``ceil(gen_length / C) * steps``."""
        return -(-params.gen_length // self.canvas_length) * params.resolved(self.defaults).steps

    def summary(self, params: cv.CanvasParams) -> dict:
        return {"block_length": self.canvas_length, "steps": params.steps, "cache": "off"}

    def init_state(self, prompts, params) -> cv.CanvasState:
        loaded = self.loaded
        return cv.init_state(self.denoiser, prompts, params, eos_ids=loaded.eos_ids, pad_id=loaded.pad_id,
                             head=loaded.threshold_head)

    def concat(self, states) -> cv.CanvasState:
        return cv.CanvasState.concat(states)

    def select(self, state: cv.CanvasState, rows: list[int]) -> cv.CanvasState:
        return state.select(rows)

    def step(self, state: cv.CanvasState) -> cv.CanvasStepOutput:
        return cv.denoise_step(self.denoiser, state)

    def generate(self, prompts, params) -> Decoded:
        """Decode with the model's own threshold head, greedy in the bound it picks."""
        loaded = self.loaded
        return self._decoded(cv.generate(self.denoiser, prompts, params, eos_ids=loaded.eos_ids,
                                         pad_id=loaded.pad_id, head=loaded.threshold_head))

    def explore(self, model, prompts, params, head, policy) -> Decoded:
        """Rollouts of ``model``: the head samples each row's bound; no per-token trajectory (no mask state), and
        no step policy (a canvas has no masked tokens to commit)."""
        return self._decoded(cv.generate(cv.denoiser_for(model), prompts, params, eos_ids=self.loaded.eos_ids,
                                         pad_id=self.loaded.pad_id, head=head, sample_threshold=True))

    @staticmethod
    def _decoded(out: cv.CanvasOutput) -> Decoded:
        """Whole canvases, cut at the longest length asked for."""
        return Decoded(sequences=out.sequences[:, :int(out.gen_length.max())], gen_length=out.gen_length,
                       nfe=out.nfe, threshold=out.threshold, threshold_choice=out.threshold_choice,
                       head_features=out.head_features, encoder_passes=out.encoder_passes)

    def encoder_passes(self, state: cv.CanvasState, rows: torch.Tensor) -> list[int]:
        return state.encoder_passes[rows].tolist()  # one per block started

    def determined(self, state: cv.CanvasState, rows: torch.Tensor) -> list[list[int]]:
        """The finished blocks' ids, cut at ``gen_length`` (all of it once the row is finished)."""
        c = state.canvas_length
        gen_length = state.gen_length[rows]
        done = torch.where(state.finished[rows], gen_length, torch.minimum(state.block[rows] * c, gen_length))
        return [ids[:n] for ids, n in zip(state.generated[rows].tolist(), done.tolist())]

    def token_logprobs(self, state: cv.CanvasState, rows: torch.Tensor, lengths: list[int]) -> list[None]:
        return [None] * len(rows)  # refused in params_for (see _refuse)

    def step_updates(self, state: cv.CanvasState, out: cv.CanvasStepOutput, picked: list[int],
                     blocks_before: torch.Tensor, slots: list[tuple[int, str]]) -> list[CanvasStepUpdate]:
        """A :class:`CanvasStepUpdate` for each row ``out.rows[k]``, k in ``picked`` (state already stepped)."""
        c = state.canvas_length
        updates = []
        for k, (choice, sampler) in zip(picked, slots):
            r, block = int(out.rows[k]), int(out.block[k])
            start = block * c
            end = min(start + c, int(state.gen_length[r]))
            done = bool(out.block_done[k])
            draft = (state.generated[r, start:end] if done else out.draft[k, :end - start]).tolist()
            accepted = (out.accepted[k, :end - start].nonzero().squeeze(-1) + start).tolist()
            nfe = int(state.nfe[r])
            updates.append(CanvasStepUpdate(
                choice=choice, step=nfe - 1, nfe=nfe, block=block, block_start=start, block_end=end,
                gen_length=int(state.gen_length[r]), draft_ids=draft, accepted_positions=accepted, block_done=done,
                finished=bool(state.finished[r]), sampler=sampler, threshold=round(float(state.threshold[r]), 6)))
        return updates


DECODERS.update(masked=MaskedDecoder, canvas=CanvasDecoder)
