"""What the server adds to each decoding paradigm's decoder: the request's fields as knobs, its defaults, HTTP errors.

The decoding itself, and the interface the batcher steps, is the core's :class:`~diffpo_serve.dllm.decoding.Decoder`
(``init_state`` / ``concat`` / ``step`` / ``determined`` / ``step_updates``, knobs -> validated params).
:func:`paradigm_for` picks the server's class once (a subclass of the model's decoder); the engine and the batcher
hold that object and never branch on the paradigm's name. A :class:`Paradigm` adds:

- **request -> knobs** (the engine, in the serving front, which may hold a weightless model):
  :meth:`~Paradigm.params` maps the OpenAI request and its diffusion extras onto
  :class:`~diffpo_serve.dllm.decoding.Knobs`, filling what it leaves out from the server's flags and the
  decoding defaults (a masked model's answer length, block length and steps: :func:`masked_defaults`, from the
  server's flags, the checkpoint's generation config and the family's constants), which ``/v1/models`` shows;
  the decoder's :class:`~diffpo_serve.dllm.decoding.KnobError` becomes an OpenAI-style 400 naming the parameter;
- **the server's checks**: ``check_prompts``, ``check_settings`` (at startup) and the ``/v1/models`` card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

from diffpo_serve.dllm import canvas as cv
from diffpo_serve.dllm import sampler as masked
from diffpo_serve.dllm.decoding import CANVAS_ONLY, CanvasDecoder, Decoder, KnobError, Knobs, MaskedDecoder
from diffpo_serve.dllm.families import decoding_defaults
from diffpo_serve.dllm.loading import LoadedModel
from diffpo_serve.protocol import APIError
from diffpo_serve.settings import ServerSettings

FALLBACK_GEN_LENGTH = 16  # the answer length of a model whose checkpoint and family state none


# ----------------------------------------------------------------------------- the interface

class Paradigm(Decoder, Protocol):
    """A :class:`~diffpo_serve.dllm.decoding.Decoder` with the server's side (see the module docstring)."""

    def default_sampler(self, settings: ServerSettings) -> str:
        """``--default-sampler``, else the decoder's (the model's learned sampler where it has one)."""

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


def paradigm_for(loaded: LoadedModel) -> Paradigm:
    """The paradigm object of a loaded model (weightless in the serving front; see :meth:`LoadedModel.without_weights`)."""
    kinds = {"masked": MaskedParadigm, "canvas": CanvasParadigm}
    if loaded.paradigm not in kinds:
        raise ValueError(f"{loaded.path}: no server support for the {loaded.paradigm!r} paradigm "
                         f"(known: {', '.join(kinds)})")
    return kinds[loaded.paradigm](loaded)


def _decoded_params(decoder, knobs: Knobs, gen_length: int, length_param: str):
    """The decoder's params for ``knobs``; its :class:`KnobError` as a 400 naming the request's field (the
    answer length's is ``length_param``: ``max_tokens`` or ``max_completion_tokens``)."""
    try:
        return decoder.params_for(knobs, gen_length)
    except KnobError as e:
        param = length_param if e.param == "gen_length" else e.param
        raise APIError(400, str(e), param=param, code=e.code) from None


def _knobs(req, **filled) -> Knobs:
    """The request's decoding fields as :class:`Knobs` (``filled``: those the server's defaults decide)."""
    fields = ("sampler", "threshold", "steps", "block_length", "cache", "temperature", "top_p") + CANVAS_ONLY
    return Knobs(**{**{name: getattr(req, name, None) for name in fields},
                    "logprobs": req.logprob_alternatives() is not None, **filled})


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


class MaskedParadigm(MaskedDecoder):
    """The masked decoder (:class:`~diffpo_serve.dllm.decoding.MaskedDecoder`) with the server's defaults."""

    def __init__(self, loaded: LoadedModel):
        super().__init__(loaded)
        self._defaults: tuple[ServerSettings, MaskedDefaults] | None = None

    def decoding(self, settings: ServerSettings) -> MaskedDefaults:
        """The model's decoding defaults under ``settings`` (:func:`masked_defaults`); raises ValueError for a
        generation config that states a bad value."""
        if self._defaults is None or self._defaults[0] is not settings:
            model_type = getattr(getattr(self.loaded.model, "config", None), "model_type", None)
            self._defaults = settings, masked_defaults(settings, self.loaded.generation, model_type, self.loaded.path)
        return self._defaults[1]

    def default_sampler(self, settings: ServerSettings) -> str:
        return settings.default_sampler or self.fallback_sampler()

    def default_gen_length(self, settings: ServerSettings) -> int:
        """``--default-max-tokens``, else the generation config's ``max_new_tokens``, else the family's, else 16."""
        return self.decoding(settings).gen_length

    def context_tokens(self, gen_length: int) -> int:
        return gen_length

    def params(self, req, gen_length: int, length_param: str, settings: ServerSettings) -> masked.SamplingParams:
        defaults = self.decoding(settings)
        block_length = req.block_length if req.block_length is not None else defaults.block_length
        knobs = _knobs(req, sampler=req.sampler or self.default_sampler(settings), cache=req.cache or settings.cache,
                       block_length=block_length,
                       steps=req.steps if req.steps is not None else defaults.steps_for(gen_length, block_length),
                       temperature=settings.default_temperature if req.temperature is None else req.temperature)
        return _decoded_params(self, knobs, gen_length, length_param)

    def check_prompts(self, prompts: list[list[int]], param: str) -> None:
        return None  # any ids the model's vocabulary holds (the engine checks that)

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


# ----------------------------------------------------------------------------- canvas

class CanvasParadigm(CanvasDecoder):
    """The random-canvas decoder (:class:`~diffpo_serve.dllm.decoding.CanvasDecoder`) with the server's side.

    Request mapping: ``max_tokens`` -> ``gen_length`` (decoded as whole canvases of C tokens, the text cut at
    ``max_tokens``), ``seed`` -> the row's generator (choice i: seed + i), every other decoding field and extra
    -> the knob of its name; ``steps`` unset takes the server's ``--default-steps`` first, then the checkpoint's.
    """

    def __init__(self, loaded: LoadedModel):
        super().__init__(loaded)
        self.image_token_id = getattr(loaded.model.config, "image_token_id", None)

    def default_sampler(self, settings: ServerSettings) -> str:
        return settings.default_sampler or self.fallback_sampler()

    def default_gen_length(self, settings: ServerSettings) -> int:
        """``--default-max-tokens``, else the checkpoint's (its generation config's ``max_new_tokens``)."""
        return settings.default_max_tokens or int(self.defaults["gen_length"])

    def context_tokens(self, gen_length: int) -> int:
        return -(-gen_length // self.canvas_length) * self.canvas_length  # whole canvases

    def params(self, req, gen_length: int, length_param: str, settings: ServerSettings) -> cv.CanvasParams:
        knobs = _knobs(req, sampler=req.sampler or self.default_sampler(settings),
                       steps=req.steps if req.steps is not None else settings.default_steps)  # None: the checkpoint's
        return _decoded_params(self, knobs, gen_length, length_param)

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


def check_startup(loaded: LoadedModel, settings: ServerSettings) -> str | None:
    """Why the server's settings cannot serve this model's paradigm (None: they can)."""
    paradigm = paradigm_for(loaded)
    if settings.default_sampler is not None and settings.default_sampler not in paradigm.samplers:
        return (f"--default-sampler {settings.default_sampler}: this model decodes in the {paradigm.name!r} "
                f"paradigm, whose samplers are {', '.join(paradigm.samplers)}")
    return paradigm.check_settings(settings)
