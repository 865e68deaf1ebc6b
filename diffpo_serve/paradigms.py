"""What the server does differently for each decoding paradigm: one class per paradigm, one interface.

A loaded model decodes in one paradigm (``LoadedModel.paradigm``): ``masked`` (a region of mask tokens filled
in, never revisited: :mod:`diffpo_serve.dllm.sampler`) or ``canvas`` (DiffusionGemma: blocks of random tokens
rewritten at every step: :mod:`diffpo_serve.dllm.canvas`). :func:`paradigm_for` picks the class once; the
engine and the batcher hold that object and never branch on the paradigm's name. A :class:`Paradigm` owns:

- **request -> row params** (the engine, in the serving front, which may hold a weightless model):
  :meth:`~Paradigm.params` maps the OpenAI request and its diffusion extras onto the paradigm's params
  (:class:`~diffpo_serve.dllm.sampler.SamplingParams` or :class:`~diffpo_serve.dllm.canvas.CanvasParams`) and
  refuses what the paradigm cannot do with an OpenAI-style 400 naming the parameter; the default sampler and
  the decoding defaults a request gets for what it leaves out (a masked model's answer length, block length
  and steps: :func:`masked_defaults`, from the server's flags, the checkpoint's generation config and the
  family's constants), which ``/v1/models`` shows;
- **the batch state** (the batcher, next to the model): ``init_state`` / ``concat`` / ``step`` (one batched
  model pass; rows join and leave between steps with ``concat`` and ``state.select``);
- **what a step reports**: :meth:`~Paradigm.determined`, the ids of each row that can no longer change (the
  text the ordinary stream sends), and :meth:`~Paradigm.step_updates`, the per-pass events of rows that asked
  for them (``return_steps``): :class:`StepUpdate` (masked: the positions committed at that pass) or
  :class:`CanvasStepUpdate` (canvas: the current block's whole draft, which changes from pass to pass).

Both states share the fields the batcher reads directly: ``block`` (a row is reported when it advances),
``finished``, ``nfe`` (model passes: decoder passes for a canvas model), ``threshold`` (the bound each row
decodes with; for ``learned`` rows the head's choice, made inside the row's first pass) and ``canvas`` (only
for its device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import torch

from diffpo_serve.dllm import canvas as cv
from diffpo_serve.dllm import sampler as masked
from diffpo_serve.dllm.families import decoding_defaults, family_module
from diffpo_serve.dllm.loading import LoadedModel
from diffpo_serve.protocol import APIError
from diffpo_serve.settings import ServerSettings

FALLBACK_GEN_LENGTH = 16  # the answer length of a model whose checkpoint and family state none
CANVAS_ONLY = ("t_min", "t_max", "stability_threshold", "confidence_threshold")  # extras of the canvas paradigm


# ----------------------------------------------------------------------------- per-pass events

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


# ----------------------------------------------------------------------------- the interface

class Paradigm(Protocol):
    """See the module docstring."""

    name: str
    samplers: tuple[str, ...]

    def default_sampler(self, settings: ServerSettings) -> str: ...

    def default_gen_length(self, settings: ServerSettings) -> int: ...

    def context_tokens(self, gen_length: int) -> int:
        """Positions a row's answer takes (the context-length check)."""

    def params(self, req, gen_length: int, length_param: str, settings: ServerSettings): ...

    def check_prompts(self, prompts: list[list[int]], param: str) -> None:
        """Raise a 400 naming ``param`` for prompts the paradigm cannot decode."""

    def card(self, settings: ServerSettings) -> dict:
        """``/v1/models`` fields: ``paradigm``, ``samplers``, ``defaults``."""

    def check_settings(self, settings: ServerSettings) -> str | None:
        """Why the server's settings cannot serve this paradigm (None: they can); checked at startup."""

    def resolve(self, params): ...

    def init_state(self, prompts: list[list[int]], params: list): ...

    def concat(self, states: list): ...

    def step(self, state): ...

    def determined(self, state, rows: torch.Tensor) -> list[list[int]]: ...

    def encoder_passes(self, state, rows: torch.Tensor) -> list[int | None]:
        """Prompt-encoder passes of each row so far (reported beside NFE); None where the paradigm has none."""

    def step_updates(self, state, out, picked: list[int], blocks_before: torch.Tensor,
                     slots: list[tuple[int, str]]) -> list: ...


def paradigm_for(loaded: LoadedModel) -> Paradigm:
    """The paradigm object of a loaded model (weightless in the serving front; see :meth:`LoadedModel.without_weights`)."""
    kinds = {"masked": MaskedParadigm, "canvas": CanvasParadigm}
    if loaded.paradigm not in kinds:
        raise ValueError(f"{loaded.path}: no server support for the {loaded.paradigm!r} paradigm "
                         f"(known: {', '.join(kinds)})")
    return kinds[loaded.paradigm](loaded)


def _refuse_extras(req, names, why: str) -> None:
    for name in names:
        if getattr(req, name, None) is not None:
            raise APIError(400, f"`{name}` {why}", param=name, code="unsupported_parameter")


def _invalid(e: ValueError, length_param: str) -> APIError:
    field = str(e).split(" ", 1)[0]
    return APIError(400, str(e), param=length_param if field == "gen_length" else field)


# ----------------------------------------------------------------------------- masked

@dataclass(frozen=True)
class MaskedDefaults:
    """The lengths a masked request gets for those it leaves out (:func:`masked_defaults`), and where each came
    from (``sources``: the flag, ``generation_config.json``, ``family <model_type>`` or ``default``)."""

    gen_length: int
    block_length: int | None  # None: one block of the whole answer
    steps: int | None  # `steps` sampler: passes for an answer of gen_length; None: one token per pass
    sources: dict[str, str]

    def steps_for(self, gen_length: int, block_length: int | None) -> int | None:
        """The `steps` of a request of ``gen_length`` in blocks of ``block_length`` that names none: as many
        passes per token of a block as the default (:func:`~diffpo_serve.dllm.sampler.default_steps`); None for
        lengths the sampler refuses (its own check then names them)."""
        if gen_length < 1 or (block_length is not None and block_length < 1):
            return None
        if self.steps is None:
            return masked.default_steps(gen_length, block_length)
        return masked.default_steps(gen_length, block_length, self.steps, self.gen_length)

    def card(self) -> dict:
        """``/v1/models``' view: the answer length, its block length and its `steps` passes, as decoded."""
        gen = self.gen_length
        return {"gen_length": gen, "block_length": min(self.block_length or gen, gen),
                "steps": self.steps_for(gen, self.block_length)}


def _stated(generation: Mapping, key: str, where: str) -> int | None:
    """A positive integer of the checkpoint's generation config, or None; raises ValueError naming the file."""
    value = generation.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}/generation_config.json: `{key}` must be a positive integer; got {value!r}")
    return value


def masked_defaults(settings: ServerSettings, generation: Mapping, model_type: str | None,
                    where: str) -> MaskedDefaults:
    """A masked model's decoding defaults, each from the first layer that states it: the server's flag
    (``--default-max-tokens``, ``--default-block-length``, ``--default-steps``), the checkpoint's
    ``generation_config.json`` (``generation``, read from ``where``: ``max_new_tokens``, ``block_length``,
    ``steps``), the family's constants (:func:`~diffpo_serve.dllm.families.decoding_defaults`), else 16 tokens
    in one block, one token per pass. A request's own fields override all of them (:meth:`MaskedParadigm.params`)."""
    family = decoding_defaults(model_type)
    layers = {"gen_length": (settings.default_max_tokens, "max_new_tokens", FALLBACK_GEN_LENGTH),
              "block_length": (settings.default_block_length, "block_length", None),
              "steps": (settings.default_steps, "steps", None)}
    values: dict = {}
    sources: dict[str, str] = {}
    for name, (flag, key, fallback) in layers.items():
        candidates = ((flag, "--default-" + {"gen_length": "max-tokens"}.get(name, name.replace("_", "-"))),
                      (_stated(generation, key, where), "generation_config.json"),
                      (family.get(name), f"family {model_type}"), (fallback, "default"))
        values[name], sources[name] = next(((v, src) for v, src in candidates if v is not None), (None, "default"))
    return MaskedDefaults(**values, sources=sources)


class MaskedParadigm:
    """The masked sampler (:mod:`diffpo_serve.dllm.sampler`): every sampler, the KV cache, the step policy."""

    name = "masked"
    samplers = masked.SAMPLERS

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self._align = None  # the prompt layout, from the model's dtype (decoder side only)
        self._defaults: tuple[ServerSettings, MaskedDefaults] | None = None

    def decoding(self, settings: ServerSettings) -> MaskedDefaults:
        """The model's decoding defaults under ``settings`` (:func:`masked_defaults`); raises ValueError for a
        generation config that states a bad value."""
        if self._defaults is None or self._defaults[0] is not settings:
            model_type = getattr(getattr(self.loaded.model, "config", None), "model_type", None)
            self._defaults = settings, masked_defaults(settings, self.loaded.generation, model_type, self.loaded.path)
        return self._defaults[1]

    # ---- the engine's side

    def default_sampler(self, settings: ServerSettings) -> str:
        return settings.default_sampler or ("policy" if self.loaded.step_policy is not None else
                                            "learned" if self.loaded.threshold_head is not None else "steps")

    def default_gen_length(self, settings: ServerSettings) -> int:
        """``--default-max-tokens``, else the generation config's ``max_new_tokens``, else the family's, else 16."""
        return self.decoding(settings).gen_length

    def context_tokens(self, gen_length: int) -> int:
        return gen_length

    def params(self, req, gen_length: int, length_param: str, settings: ServerSettings) -> masked.SamplingParams:
        _refuse_extras(req, CANVAS_ONLY, "is an extra of canvas models (DiffusionGemma's temperature schedule and "
                                         "stopping rule); this model decodes masked tokens")
        loaded = self.loaded
        sampler = req.sampler or self.default_sampler(settings)
        if sampler == "learned" and req.threshold is None and not self.runs(sampler):
            raise APIError(400, "sampler `learned` needs a model with a threshold head and this model has none; "
                                "give `threshold` or use `steps`, `confidence` or `eb`",
                           param="sampler", code="unsupported_sampler")
        if sampler == "policy" and not self.runs(sampler):
            raise APIError(400, "sampler `policy` needs a model with a step policy and this model has none; "
                                "use `steps`, `confidence`, `eb` or `learned`",
                           param="sampler", code="unsupported_sampler")
        cache = req.cache or settings.cache
        if cache != "off" and not loaded.kv_cache:
            raise APIError(400, f"cache `{cache}` needs a model with a native KV cache and this model has none; "
                                "use `off`", param="cache", code="unsupported_cache")
        defaults = self.decoding(settings)
        block_length = req.block_length if req.block_length is not None else defaults.block_length
        steps = req.steps if req.steps is not None else defaults.steps_for(gen_length, block_length)
        params = masked.SamplingParams(
            sampler=sampler, gen_length=gen_length, block_length=block_length, steps=steps, cache=cache,
            threshold=req.threshold, top_p=1.0 if req.top_p is None else req.top_p,
            temperature=settings.default_temperature if req.temperature is None else req.temperature)
        try:
            params.resolved()
        except ValueError as e:
            raise _invalid(e, length_param) from None
        return params

    def check_prompts(self, prompts: list[list[int]], param: str) -> None:
        return None  # any ids the model's vocabulary holds (the engine checks that)

    def runs(self, sampler: str) -> bool:
        """Whether this model runs ``sampler`` without a ``threshold``: ``learned`` needs its threshold head,
        ``policy`` its step policy."""
        return not ((sampler == "learned" and self.loaded.threshold_head is None)
                    or (sampler == "policy" and self.loaded.step_policy is None))

    def card(self, settings: ServerSettings) -> dict:
        """``samplers``: those this model runs without a ``threshold`` (``learned`` needs its threshold head,
        ``policy`` its step policy); ``defaults``: what a request that sets nothing gets (``block_length`` and
        ``steps``, the `steps` sampler's passes, as its answer of ``gen_length`` is decoded)."""
        sampler = self.default_sampler(settings)
        return {"paradigm": self.name, "samplers": [s for s in self.samplers if self.runs(s)],
                "defaults": {"sampler": sampler, **self.decoding(settings).card(),
                             "threshold": masked.DEFAULT_THRESHOLD[sampler], "temperature": settings.default_temperature,
                             "cache": settings.cache}}

    def check_settings(self, settings: ServerSettings) -> str | None:
        try:
            self.decoding(settings)  # a generation config stating a bad length fails at startup, naming the file
        except ValueError as e:
            return str(e)
        return None

    # ---- the batcher's side

    def resolve(self, params: masked.SamplingParams) -> masked.SamplingParams:
        return params.resolved()

    def init_state(self, prompts, params) -> masked.BatchState:
        loaded = self.loaded
        if self._align is None:
            self._align = masked.prompt_alignment(loaded.model)
        return masked.init_state(prompts, params, mask_id=loaded.mask_id, eos_id=loaded.eos_id, eos_ids=loaded.eos_ids,
                                 pad_id=loaded.pad_id, device=loaded.device, head=loaded.threshold_head,
                                 policy=loaded.step_policy, align=self._align)

    def concat(self, states) -> masked.BatchState:
        return masked.BatchState.concat(states)

    def step(self, state: masked.BatchState) -> masked.StepOutput:
        return masked.denoise_step(self.loaded.model, state)

    def encoder_passes(self, state: masked.BatchState, rows: torch.Tensor) -> list[None]:
        return [None] * len(rows)  # one forward over prompt and answer: no separate encoder

    def determined(self, state: masked.BatchState, rows: torch.Tensor) -> list[list[int]]:
        """The generated ids up to the first still-masked position (all of ``gen_length`` once finished)."""
        gen = state.generated[rows]
        masked_ = (gen == state.mask_id).long()
        length = torch.minimum((masked_.cumsum(-1) == 0).sum(-1), state.gen_length[rows]).tolist()
        return [ids[:n] for ids, n in zip(gen.tolist(), length)]

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

class CanvasParadigm:
    """The random-canvas paradigm (:mod:`diffpo_serve.dllm.canvas`, DiffusionGemma).

    Request mapping: ``max_tokens`` -> ``gen_length`` (decoded as whole canvases of C tokens, the text cut at
    ``max_tokens``), ``threshold`` -> the entropy bound, ``steps`` -> the most denoising steps *per block*,
    ``seed`` -> the row's generator (choice i: seed + i), the extras ``t_min``/``t_max`` (the temperature
    schedule), ``stability_threshold``/``confidence_threshold`` (the early stop); unset ones take the
    checkpoint's defaults (its generation config), ``steps`` the server's ``--default-steps`` first. Samplers:
    ``eb`` (a fixed bound) and ``learned`` (the threshold head picks each row's bound at its first decoder pass).
    Refused with a 400 naming the parameter: masked-only samplers, ``block_length`` other than C, ``cache`` other
    than ``off``, ``temperature`` and ``top_p`` (the schedule replaces them).
    """

    name = "canvas"
    samplers = cv.SAMPLERS

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        config = loaded.model.config
        family = family_module(getattr(config, "model_type", None))
        self.defaults = family.canvas_defaults(getattr(loaded.model, "generation_config", None))
        self.canvas_length = int(config.canvas_length)
        self.image_token_id = getattr(config, "image_token_id", None)
        self._denoiser = None

    @property
    def denoiser(self) -> cv.CanvasDenoiser:
        if self._denoiser is None:  # the decoder's side only: the front's model has no weights
            self._denoiser = cv.denoiser_for(self.loaded.model)
        return self._denoiser

    # ---- the engine's side

    def default_sampler(self, settings: ServerSettings) -> str:
        return settings.default_sampler or ("learned" if self.loaded.threshold_head is not None else "eb")

    def default_gen_length(self, settings: ServerSettings) -> int:
        """``--default-max-tokens``, else the checkpoint's (its generation config's ``max_new_tokens``)."""
        return settings.default_max_tokens or int(self.defaults["gen_length"])

    def context_tokens(self, gen_length: int) -> int:
        return -(-gen_length // self.canvas_length) * self.canvas_length  # whole canvases

    def params(self, req, gen_length: int, length_param: str, settings: ServerSettings) -> cv.CanvasParams:
        c = self.canvas_length
        sampler = req.sampler or self.default_sampler(settings)
        if sampler not in self.samplers:
            raise APIError(400, f"sampler `{sampler}` is a masked-model sampler; this model decodes a random-token "
                                f"canvas whose accept rule is the entropy bound: use `eb` (bound `threshold`) or "
                                "`learned` (the threshold head picks it)", param="sampler", code="unsupported_sampler")
        if sampler == "learned" and req.threshold is None and self.loaded.threshold_head is None:
            raise APIError(400, "sampler `learned` needs a model with a threshold head and this model has none; "
                                "give `threshold` or use `eb`", param="sampler", code="unsupported_sampler")
        if req.block_length is not None and req.block_length != c:
            raise APIError(400, f"`block_length` is fixed for this model: it decodes whole canvases of {c} tokens "
                                "(its config's canvas_length)", param="block_length", code="unsupported_parameter")
        if req.cache not in (None, "off"):
            raise APIError(400, "`cache` is a masked-model feature; a canvas model keeps its own encoder cache "
                                "per row: use `off` or leave it out", param="cache", code="unsupported_parameter")
        if req.temperature is not None:
            raise APIError(400, "`temperature` is not used by this model: it samples with its temperature schedule "
                                f"(t_max {self.defaults['t_max']} at a block's first step down towards t_min "
                                f"{self.defaults['t_min']}); set the extras `t_max` and `t_min` instead",
                           param="temperature", code="unsupported_parameter")
        if req.top_p is not None and req.top_p != 1:
            raise APIError(400, "`top_p` is not supported by this model: its proposals are drawn from the whole "
                                "(temperature-scheduled) distribution", param="top_p", code="unsupported_parameter")
        steps = req.steps if req.steps is not None else settings.default_steps  # None: the checkpoint's
        params = cv.CanvasParams(gen_length=gen_length, threshold=req.threshold, steps=steps, t_min=req.t_min,
                                 t_max=req.t_max, stability_threshold=req.stability_threshold,
                                 confidence_threshold=req.confidence_threshold, sampler=sampler)
        try:
            params.resolved(self.defaults)
        except ValueError as e:
            if "temperature schedule" in str(e):
                raise APIError(400, str(e), param="t_min" if req.t_min is not None else "t_max") from None
            raise _invalid(e, length_param) from None
        return params

    def check_prompts(self, prompts: list[list[int]], param: str) -> None:
        image = self.image_token_id
        if image is not None and any(int(image) in p for p in prompts):
            raise APIError(400, f"the prompt holds the image token ({image}); image inputs are not supported "
                                "(text only)", param=param, code="unsupported_parameter")

    def card(self, settings: ServerSettings) -> dict:
        defaults = {"sampler": self.default_sampler(settings), **self.defaults,
                    "gen_length": self.default_gen_length(settings), "canvas_length": self.canvas_length}
        if settings.default_steps is not None:
            defaults["steps"] = settings.default_steps
        return {"paradigm": self.name, "samplers": list(self.samplers), "defaults": defaults}

    def check_settings(self, settings: ServerSettings) -> str | None:
        if settings.default_temperature != 0:
            return ("--default-temperature: a canvas model samples with its own temperature schedule (the request "
                    "extras t_min / t_max); leave it at 0")
        if settings.default_block_length not in (None, self.canvas_length):
            return (f"--default-block-length {settings.default_block_length}: a canvas model decodes whole canvases "
                    f"of {self.canvas_length} tokens (its config's canvas_length); leave it out")
        return None

    # ---- the batcher's side

    def resolve(self, params: cv.CanvasParams) -> cv.CanvasParams:
        return params.resolved(self.denoiser.defaults)

    def init_state(self, prompts, params) -> cv.CanvasState:
        loaded = self.loaded
        return cv.init_state(self.denoiser, prompts, params, eos_ids=loaded.eos_ids, pad_id=loaded.pad_id,
                             head=loaded.threshold_head)

    def concat(self, states) -> cv.CanvasState:
        return cv.CanvasState.concat(states)

    def step(self, state: cv.CanvasState) -> cv.CanvasStepOutput:
        return cv.denoise_step(self.denoiser, state)

    def encoder_passes(self, state: cv.CanvasState, rows: torch.Tensor) -> list[int]:
        return state.encoder_passes[rows].tolist()  # one per block started

    def determined(self, state: cv.CanvasState, rows: torch.Tensor) -> list[list[int]]:
        """The finished blocks' ids, cut at ``gen_length`` (all of it once the row is finished)."""
        c = state.canvas_length
        gen_length = state.gen_length[rows]
        done = torch.where(state.finished[rows], gen_length, torch.minimum(state.block[rows] * c, gen_length))
        return [ids[:n] for ids, n in zip(state.generated[rows].tolist(), done.tolist())]

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


def check_startup(loaded: LoadedModel, settings: ServerSettings) -> str | None:
    """Why the server's settings cannot serve this model's paradigm (None: they can)."""
    paradigm = paradigm_for(loaded)
    if settings.default_sampler is not None and settings.default_sampler not in paradigm.samplers:
        return (f"--default-sampler {settings.default_sampler}: this model decodes in the {paradigm.name!r} "
                f"paradigm, whose samplers are {', '.join(paradigm.samplers)}")
    return paradigm.check_settings(settings)
