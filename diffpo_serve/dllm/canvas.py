"""The random-canvas decoding paradigm (DiffusionGemma's), beside the masked one of :mod:`sampler`.

A masked dLLM fills a region of mask tokens and never revisits a committed token. A canvas model has no mask
state: each block of ``C`` tokens (the model's ``canvas_length``) starts as *uniformly random* tokens, and
every denoising step rewrites the whole canvas. Per block, for a row with prompt (or sequence so far) ``x``:

1. the model's causal encoder appends ``x``'s new tokens to the row's KV cache (once per block: the prompt at
   the first block, the previous block's tokens after it);
2. the canvas ``z`` starts as ``C`` uniform draws from the vocabulary;
3. at denoising step ``n = 1 .. N`` (``steps``; ``m = N - n + 1`` steps remain) the bidirectional decoder reads
   ``z``, the cache and the previous step's logits (self-conditioning; none at the first step) and returns
   logits ``l``; with the linear temperature schedule (:func:`schedule_temperature`)
   ``T = t_min + (t_max - t_min) m / N``, the processed logits are ``l / T``;
4. a proposal ``d`` is drawn from ``softmax(l / T)`` at every position; the *accept* rule
   (:func:`accept_mask`) is the entropy bound of Ben-Hamu et al. 2025 (arXiv 2505.24857), the same rule as
   the masked sampler's ``eb``: sort the positions by the entropy of ``softmax(l / T)``,
   H(1) <= H(2) <= ..., and accept the largest prefix k with sum_{i<=k} H(i) - max_{i<=k} H(i) <= gamma
   (``threshold``; at least one position); accepted positions take ``d``, and every other position is
   re-randomised (:func:`renoise`): the canvas changes everywhere at every step, it does not fill in;
5. the block ends when it is *stable and confident* (:func:`stable_rows`, :func:`confident_rows`: the argmax
   of ``l / T`` equals that of each of the last ``stability_threshold`` steps, and the mean entropy is below
   ``confidence_threshold``) or after ``N`` steps; its tokens are the last step's argmax (not the canvas).
   A block holding an EOS ends the row (positions after the first EOS become ``pad_id``); otherwise the next
   block starts at 1., until ``ceil(gen_length / C)`` blocks.

This is transformers' ``DiffusionGemmaForBlockDiffusion.generate`` (its ``EntropyBoundSampler``,
``LinearTemperatureScheduleLogitsProcessor``, ``StableAndConfidentStoppingCriteria`` and ``_finalize_canvas``),
made a step function over an explicit batch state (:class:`CanvasState`), as :mod:`sampler` is for the masked
paradigm: every per-row quantity is a row of the state (its bound, schedule and stopping thresholds, its own
seeded ``torch.Generator`` (on the model's device), its own encoder cache, its block and step counters), rows join and leave between
steps (:meth:`CanvasState.concat`, :meth:`CanvasState.select`), and a row at its block's first step runs next
to rows in the middle of theirs. **Random numbers**: a row draws, from its own generator and in this order,
its canvas (``C`` integers) at each block start, then at every step its proposal (one multinomial draw per
position, over a ``(C, V)`` matrix) and its renoise canvas (``C`` integers): exactly the draws, shapes and
order of transformers' ``generate`` for a batch of one under ``torch.manual_seed(seed)`` (a CPU generator
seeded with ``seed`` and the global CPU generator after ``torch.manual_seed(seed)`` give the same stream). So
a row decodes token for token as transformers decodes it alone, and the same in any batch (transformers'
batched ``generate`` instead draws the whole batch's canvas from the one global stream, so there a row's
output depends on its batch). **NFE** counts decoder passes only (one per step a row takes part in, as
transformers' ``tokens_per_forward`` does); encoder passes (one per block) are counted apart, in
``encoder_passes``.

The model is reached through :class:`CanvasDenoiser` (a family's ``canvas_denoiser(model)`` hook, e.g.
:class:`diffpo_serve.dllm.families.diffusion_gemma.DiffusionGemmaDenoiser`); :func:`denoiser_for` finds it
from the model's ``model_type`` through the family registry, never by name here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from diffpo_serve.dllm.families import family_module
from diffpo_serve.dllm.sampler.rules import entropy_before

SAMPLERS = ("eb", "learned")  # the canvas accept rule is the entropy bound; `learned`: the head picks the bound


class CanvasDenoiser(Protocol):
    """The model interface of the canvas paradigm (one per family; see the module docstring)."""

    canvas_length: int  # C, the block length
    vocab_size: int  # canvas and proposals are drawn from range(vocab_size)
    defaults: dict  # CanvasParams field -> the checkpoint's default (its generation config)
    image_token_id: int | None  # prompts holding it are refused (text only)
    device: torch.device
    dtype: torch.dtype  # the dtype self-conditioning logits are kept in

    hidden_size: int  # width of the hidden states ``return_hidden`` gives (the threshold head's input)

    def encode(self, ids: torch.Tensor, start: int, cache, return_hidden: bool = False):
        """Append one row's ``ids`` (n,), at positions ``start ..``, to its encoder cache (None: a new one);
        returns the cache, and with ``return_hidden`` also the encoder's final hidden states (1, n, d)."""

    def decode(self, canvas: torch.Tensor, start: torch.Tensor, caches: list, self_conditioning, has_self_conditioning,
               return_hidden: bool = False):
        """Logits (b, C, V) float32 of one decoder pass over ``canvas`` (b, C) at positions ``start + j``; with
        ``return_hidden`` also the decoder's final hidden states (b, C, d)."""


def denoiser_for(model: torch.nn.Module) -> CanvasDenoiser:
    """The canvas interface of a loaded model, from its family's ``canvas_denoiser`` hook."""
    module = family_module(getattr(getattr(model, "config", None), "model_type", None))
    hook = getattr(module, "canvas_denoiser", None)
    if hook is None:
        raise ValueError(f"{type(model).__name__} does not decode in the canvas paradigm (no family with a "
                         "canvas_denoiser hook); use diffpo_serve.dllm.sampler")
    return hook(model)


# ----------------------------------------------------------------------------- params

@dataclass(frozen=True)
class CanvasParams:
    """How one prompt is decoded in the canvas paradigm; None fields take the checkpoint's defaults
    (:attr:`CanvasDenoiser.defaults`, from its generation config). Names follow :class:`sampler.SamplingParams`
    where the concept is shared (``threshold`` is the entropy bound gamma, as for ``eb``) and transformers'
    generation config elsewhere."""

    gen_length: int | None = None  # new tokens; decoded as ceil(gen_length / C) whole blocks
    threshold: float | None = None  # the entropy bound gamma (transformers' sampler_config.entropy_bound)
    steps: int | None = None  # at most this many denoising steps per block (max_denoising_steps)
    t_min: float | None = None  # temperature schedule: t_max at a block's first step, down towards t_min
    t_max: float | None = None
    stability_threshold: int | None = None  # steps the argmax must stay unchanged to stop a block early (0: no need)
    confidence_threshold: float | None = None  # mean entropy below which a stable block stops (0: never early)
    seed: int | None = None  # the row's generator (None: a random seed)
    sampler: str = "eb"  # "eb": the bound is ``threshold``; "learned": the threshold head picks it (unless given)

    def resolved(self, defaults: dict) -> "CanvasParams":
        """Fill unset fields from ``defaults`` and validate; raises ValueError with a message for an API user.
        A ``learned`` row without a ``threshold`` keeps None: the head chooses it at the row's first pass."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)} for a canvas model (its accept rule is "
                             f"the entropy bound); got {self.sampler!r}")
        learned = self.sampler == "learned" and self.threshold is None
        p = replace(self, **{k: defaults[k] for k in ("gen_length", "threshold", "steps", "t_min", "t_max",
                                                        "stability_threshold", "confidence_threshold")
                             if getattr(self, k) is None and not (k == "threshold" and learned)})
        if p.gen_length < 1:
            raise ValueError(f"gen_length must be >= 1; got {p.gen_length}")
        if p.steps < 1:
            raise ValueError(f"steps must be >= 1; got {p.steps}")
        if not learned and not 0 <= p.threshold < math.inf:
            raise ValueError(f"threshold (the entropy bound) must be a finite number >= 0; got {p.threshold}")
        if not (0 <= p.t_min <= p.t_max < math.inf and p.t_max > 0):
            raise ValueError(f"the temperature schedule needs 0 <= t_min <= t_max and t_max > 0; got t_min {p.t_min}, "
                             f"t_max {p.t_max}")
        if p.stability_threshold < 0 or int(p.stability_threshold) != p.stability_threshold:
            raise ValueError(f"stability_threshold must be an integer >= 0; got {p.stability_threshold}")
        if not 0 <= p.confidence_threshold < math.inf:
            raise ValueError(f"confidence_threshold must be a finite number >= 0; got {p.confidence_threshold}")
        return replace(p, threshold=None if learned else float(p.threshold), t_min=float(p.t_min), t_max=float(p.t_max),
                       stability_threshold=int(p.stability_threshold),
                       confidence_threshold=float(p.confidence_threshold))


# ----------------------------------------------------------------------------- the maths, pure functions

def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (...,) of softmax(``logits``) (..., V), computed as ``torch.distributions.Categorical`` does
    (transformers' accept rule and stopping criterion use it), so the bound compares the same numbers."""
    logp = logits - logits.logsumexp(-1, keepdim=True)
    p = torch.softmax(logp, -1)
    return -(logp.clamp(min=torch.finfo(logp.dtype).min) * p).sum(-1)


def schedule_temperature(remaining: torch.Tensor, steps: torch.Tensor, t_min: torch.Tensor,
                         t_span: torch.Tensor) -> torch.Tensor:
    """The linear schedule T = t_min + (t_max - t_min) * m / N, with m (b,) the steps remaining *including*
    this one (N at a block's first step, 1 at its last: T never quite reaches t_min), N = ``steps`` (b,),
    ``t_span`` = t_max - t_min (float32, rounded from the double difference as transformers' scalar is)."""
    return t_min + t_span * (remaining.to(torch.int32) / steps)


def accept_mask(entropy: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The entropy-bounded accept rule over whole canvases (b, C) -> (b, C) bool: the masked sampler's ``eb``
    selection (:func:`sampler.entropy_before`, with every position a candidate), at least one position."""
    before, rank = entropy_before(entropy, torch.ones_like(entropy, dtype=torch.bool))
    return (before <= threshold[:, None]) | (rank == 0)


def renoise(proposal: torch.Tensor, accepted: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The next canvas: the proposal where accepted, fresh uniform ``noise`` everywhere else. The current
    canvas is not an argument: a position not accepted now is re-randomised even if it was accepted before."""
    return torch.where(accepted, proposal, noise)


def stable_rows(history: torch.Tensor, argmax: torch.Tensor, stability: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each row's ``argmax`` (b, C) equals its argmax at each of its last ``stability`` (b,) steps, read
    from ``history`` (b, S, C), the last S argmaxes, oldest first, -1 before any; and the history with
    ``argmax`` appended (the oldest dropped). A row with ``stability`` 0 is always stable."""
    s = history.shape[1]
    recent = torch.arange(s, device=history.device)[None] >= (s - stability)[:, None]  # b, S
    same = (history == argmax[:, None]).all(-1) | ~recent
    updated = torch.cat([history[:, 1:], argmax[:, None]], 1) if s else history
    return same.all(-1), updated


def confident_rows(entropy: torch.Tensor, confidence_threshold: torch.Tensor) -> torch.Tensor:
    """Whether each row's mean token entropy (of the processed logits) is below ``confidence_threshold`` (b,)."""
    return entropy.mean(-1) < confidence_threshold


def finish_block(tokens: torch.Tensor, eos_ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A finished block's tokens (b, C) with every position after the first EOS set to ``pad_id`` (the EOS
    itself kept), and whether the block holds an EOS (b,)."""
    is_eos = torch.isin(tokens, eos_ids)
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return tokens.masked_fill(after, pad_id), is_eos.any(-1)


# ----------------------------------------------------------------------------- the state

@dataclass
class CanvasState:
    """Everything the canvas paradigm knows about a batch; per-row tensors have the batch as dim 0, and the
    per-row lists (``prompts``, ``generators``, ``caches``) follow the same order."""

    canvas: torch.Tensor  # b, C  the current noisy canvas
    argmax: torch.Tensor  # b, C  argmax of the last step's processed logits (the draft); pad before any step
    accepted: torch.Tensor  # b, C  bool: positions the last step accepted
    self_conditioning: torch.Tensor  # b, C, V  the last step's processed logits (zeros where none)
    has_self_conditioning: torch.Tensor  # b  bool: False at a block's first step
    history: torch.Tensor  # b, S, C  the last S argmaxes of the block, oldest first; -1 = none
    generated: torch.Tensor  # b, gen_width  finished blocks (pad elsewhere)
    prompt_length: torch.Tensor  # b
    gen_length: torch.Tensor  # b  tokens asked for
    num_blocks: torch.Tensor  # b  ceil(gen_length / C)
    block: torch.Tensor  # b  current block index
    block_step: torch.Tensor  # b  decoder passes taken in the current block
    needs_encode: torch.Tensor  # b  bool: the row's next step starts a block (encoder pass, fresh canvas)
    nfe: torch.Tensor  # b  decoder passes the row took part in
    encoder_passes: torch.Tensor  # b
    finished: torch.Tensor  # b  bool
    threshold: torch.Tensor  # b  entropy bound gamma
    steps: torch.Tensor  # b  N, max denoising steps per block
    t_min: torch.Tensor  # b  float32
    t_span: torch.Tensor  # b  float32: t_max - t_min
    stability: torch.Tensor  # b  stability_threshold
    confidence: torch.Tensor  # b  confidence_threshold
    threshold_choice: torch.Tensor  # b  the head's grid index for `learned` rows it chose for, else -1
    head_features: torch.Tensor  # b, F  what the head read (zeros where it did not choose; F = 0 without a head)
    prompts: list = field(default_factory=list)  # per row: prompt ids (1-D long tensor)
    generators: list = field(default_factory=list)  # per row: torch.Generator
    caches: list = field(default_factory=list)  # per row: the denoiser's encoder cache (None before the first pass)
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    canvas_length: int = 0
    vocab_size: int = 0
    head: torch.nn.Module | None = None  # the threshold head of `learned` rows (None: no such rows)
    sample_threshold: bool = False  # `learned` rows draw their bound from the head (RL) instead of its mode

    @property
    def batch_size(self) -> int:
        return self.canvas.shape[0]

    def _tensors(self) -> dict:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def select(self, rows) -> "CanvasState":
        """A new state with only the given rows (index tensor or list), e.g. to drop finished ones."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.canvas.device)
        index = rows.tolist()
        state = replace(self, **{k: v[rows] for k, v in self._tensors().items()},
                        prompts=[self.prompts[i] for i in index], generators=[self.generators[i] for i in index],
                        caches=[self.caches[i] for i in index])
        width = int((state.num_blocks.max() if state.batch_size else 0) * self.canvas_length)
        state.generated = state.generated[:, :width]
        return state

    @staticmethod
    def concat(states: list["CanvasState"]) -> "CanvasState":
        """Stack states into one batch (generation regions right-padded with pad, argmax histories padded
        with -1 on their old side). All must come from one model (same canvas length and vocabulary)."""
        states = [s for s in states if s.batch_size] or states[:1]
        first = states[0]
        if len({(s.canvas_length, s.vocab_size) for s in states}) > 1:
            raise ValueError("cannot concat canvas states of different models")
        heads = {id(s.head) for s in states if s.head is not None}
        if len(heads) > 1 or (heads and any(s.head is None for s in states)):
            raise ValueError("cannot concat canvas states built with different threshold heads (or with and "
                             "without one); build every state with the model's head")
        width = max(s.generated.shape[1] for s in states)
        depth = max(s.history.shape[1] for s in states)
        parts: dict[str, list] = {k: [] for k in first._tensors()}
        for s in states:
            for k, v in s._tensors().items():
                if k == "generated":
                    v = torch.cat([v, v.new_full((v.shape[0], width - v.shape[1]), s.pad_id)], 1)
                elif k == "history":
                    v = torch.cat([v.new_full((v.shape[0], depth - v.shape[1], v.shape[2]), -1), v], 1)
                parts[k].append(v)
        return replace(first, **{k: torch.cat(v, 0) for k, v in parts.items()},
                       prompts=[p for s in states for p in s.prompts],
                       generators=[g for s in states for g in s.generators],
                       caches=[c for s in states for c in s.caches])


def init_state(denoiser: CanvasDenoiser, prompts: list[list[int]], params: CanvasParams | list[CanvasParams], *,
               eos_ids: list[int] | tuple[int, ...], pad_id: int, head: torch.nn.Module | None = None,
               sample_threshold: bool = False) -> CanvasState:
    """The state for a list of token-id prompts, each with its own (or one shared) params. No model pass runs
    here: each row's first :func:`denoise_step` runs its encoder pass. ``head``: the threshold head that picks
    the bound of ``learned`` rows without a ``threshold`` (at their first pass; :func:`denoise_step`), its mode,
    or with ``sample_threshold`` a draw from the row's own generator (RL rollouts)."""
    if not prompts:
        raise ValueError("no prompts")
    if isinstance(params, CanvasParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
    params = [p.resolved(denoiser.defaults) for p in params]
    if head is None and any(p.threshold is None for p in params):
        raise ValueError("sampler 'learned' needs a model with a threshold head; give a threshold to use eb")
    if head is not None and head.hidden_size != denoiser.hidden_size:
        raise ValueError(f"the threshold head reads hidden states of width {head.hidden_size}; this model's are "
                         f"{denoiser.hidden_size} wide")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a canvas model needs a prompt of at least one token (its encoder reads it)")
    image = denoiser.image_token_id
    if image is not None and any(int(image) in p for p in prompts):
        raise ValueError(f"prompts hold the image token ({image}); image inputs are not supported (text only)")
    device, c, v = denoiser.device, denoiser.canvas_length, denoiser.vocab_size
    b = len(prompts)
    blocks = [-(-p.gen_length // c) for p in params]
    depth = max(p.stability_threshold for p in params)
    generators = []
    for p in params:
        g = torch.Generator(device=device)  # the stream transformers draws from on this device after manual_seed
        g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ())))
        generators.append(g)

    def col(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    return CanvasState(
        canvas=torch.full((b, c), pad_id, dtype=torch.long, device=device),
        argmax=torch.full((b, c), pad_id, dtype=torch.long, device=device),
        accepted=torch.zeros((b, c), dtype=torch.bool, device=device),
        self_conditioning=torch.zeros((b, c, v), dtype=denoiser.dtype, device=device),
        has_self_conditioning=torch.zeros(b, dtype=torch.bool, device=device),
        history=torch.full((b, depth, c), -1, dtype=torch.long, device=device),
        generated=torch.full((b, max(blocks) * c), pad_id, dtype=torch.long, device=device),
        prompt_length=col([len(p) for p in prompts], torch.long),
        gen_length=col([p.gen_length for p in params], torch.long),
        num_blocks=col(blocks, torch.long),
        block=torch.zeros(b, dtype=torch.long, device=device),
        block_step=torch.zeros(b, dtype=torch.long, device=device),
        needs_encode=torch.ones(b, dtype=torch.bool, device=device),
        nfe=torch.zeros(b, dtype=torch.long, device=device),
        encoder_passes=torch.zeros(b, dtype=torch.long, device=device),
        finished=torch.zeros(b, dtype=torch.bool, device=device),
        threshold=col([math.nan if p.threshold is None else p.threshold for p in params], torch.float),
        steps=col([p.steps for p in params], torch.long),
        t_min=col([p.t_min for p in params], torch.float),
        t_span=col([p.t_max - p.t_min for p in params], torch.float),
        stability=col([p.stability_threshold for p in params], torch.long),
        confidence=col([p.confidence_threshold for p in params], torch.float),
        threshold_choice=torch.full((b,), -1, dtype=torch.long, device=device),
        head_features=torch.zeros((b, head.feature_size if head is not None else 0), device=device),
        prompts=[torch.as_tensor(p, dtype=torch.long) for p in prompts], generators=generators, caches=[None] * b,
        eos_ids=tuple(dict.fromkeys(int(i) for i in eos_ids)), pad_id=int(pad_id), canvas_length=c, vocab_size=v,
        head=head, sample_threshold=sample_threshold,
    )


# ----------------------------------------------------------------------------- the step

@dataclass
class CanvasStepOutput:
    """What one step did, for the rows that ran (indices into the state)."""

    rows: torch.Tensor  # r
    block: torch.Tensor  # r  the block each row denoised
    draft: torch.Tensor  # r, C  this step's argmax: the block as it stands (the final tokens when block_done)
    accepted: torch.Tensor  # r, C  bool: positions accepted (kept) this step; the rest were re-randomised
    block_done: torch.Tensor  # r  bool: the block ended at this step (its tokens are in state.generated)
    newly_finished: torch.Tensor  # r  bool


def _start_blocks(denoiser: CanvasDenoiser, state: CanvasState, rows: list[int], hidden_for: set) -> dict:
    """Block starts: the encoder reads what the row's cache lacks (the prompt, or the last block), then the
    row's canvas is drawn from its generator and its self-conditioning and argmax history are cleared.
    Returns the encoder's final hidden states (1, n, d) of the rows in ``hidden_for`` (the head's input)."""
    c = state.canvas_length
    hidden = {}
    for r in rows:
        k = int(state.block[r])
        if k == 0:
            ids, start = state.prompts[r], 0
        else:
            ids, start = state.generated[r, (k - 1) * c:k * c], int(state.prompt_length[r]) + (k - 1) * c
        if r in hidden_for:
            state.caches[r], hidden[r] = denoiser.encode(ids, start, state.caches[r], return_hidden=True)
        else:
            state.caches[r] = denoiser.encode(ids, start, state.caches[r])
        g = state.generators[r]
        state.canvas[r] = torch.randint(0, state.vocab_size, (1, c), generator=g, device=g.device)[0]
    at = torch.as_tensor(rows, dtype=torch.long, device=state.canvas.device)
    state.encoder_passes[at] += 1
    state.history[at] = -1
    state.has_self_conditioning[at] = False
    state.self_conditioning[at] = 0
    state.block_step[at] = 0
    state.needs_encode[at] = False
    return hidden


def _choose_bounds(state: CanvasState, rows: list[int], positions: list[int], prompt_hidden: dict,
                   canvas_hidden: torch.Tensor, entropy: torch.Tensor) -> None:
    """The threshold head picks the bound of the ``learned`` rows ``rows`` (state indices) at their first pass,
    before that pass's accept rule reads it. Per row it reads, as it does for a masked model
    (:meth:`ThresholdHead.extract`), a first pass over [prompt ; answer]: the encoder's final hidden states of
    the prompt, the decoder's over the random canvas (``canvas_hidden`` (r, C, d), row ``positions[i]`` of this
    step) and, for ``prompt+answer+eb`` heads, the pass's per-position entropies over the canvas (``entropy``,
    of the processed logits: what the accept rule compares with the bound). The mode, or with
    ``sample_threshold`` a draw from the row's generator (after its proposal draw)."""
    head = state.head
    features = []
    for r, i in zip(rows, positions):
        enc = prompt_hidden[r][0].to(canvas_hidden)
        hidden = torch.cat([enc, canvas_hidden[i]], 0)[None]
        attention = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        features.append(head.extract(hidden, attention, enc.shape[0], entropy[i][None]))
    features = torch.cat(features).to(next(head.parameters()).device)
    gens = [state.generators[r] for r in rows] if state.sample_threshold else None
    choice = head.choose(features, gens).to(state.threshold.device)
    at = torch.as_tensor(rows, dtype=torch.long, device=state.threshold.device)
    state.threshold[at] = head.grid.to(state.threshold.device)[choice]
    state.threshold_choice[at] = choice
    state.head_features[at] = features.to(state.head_features.device)


@torch.no_grad()
def denoise_step(denoiser: CanvasDenoiser, state: CanvasState) -> CanvasStepOutput:
    """One decoder pass over the unfinished rows of ``state`` (after the encoder pass of rows starting a
    block); updates the state in place. See the module docstring for what a step does."""
    rows = (~state.finished).nonzero().squeeze(-1)
    c = state.canvas_length
    if len(rows) == 0:
        empty = state.canvas.new_zeros((0, c))
        return CanvasStepOutput(rows, rows, empty, empty.bool(), rows.bool(), rows.bool())
    index = rows.tolist()
    # `learned` rows at their first pass (their bound is still NaN): the head picks it in this step
    choosing = state.threshold[rows].isnan().nonzero().squeeze(-1).tolist() if state.head is not None else []
    starting = [int(r) for r in index if bool(state.needs_encode[r])]
    prompt_hidden = _start_blocks(denoiser, state, starting, {index[i] for i in choosing}) if starting else {}
    canvas = state.canvas[rows]
    block = state.block[rows]
    has_sc = state.has_self_conditioning[rows]
    sc = state.self_conditioning[rows] if bool(has_sc.any()) else None
    start = state.prompt_length[rows] + block * c
    caches = [state.caches[r] for r in index]
    if choosing:
        logits, canvas_hidden = denoiser.decode(canvas, start, caches, sc, has_sc, return_hidden=True)
    else:
        logits = denoiser.decode(canvas, start, caches, sc, has_sc)
    state.nfe[rows] += 1

    remaining = state.steps[rows] - state.block_step[rows]  # N .. 1
    temperature = schedule_temperature(remaining, state.steps[rows], state.t_min[rows], state.t_span[rows])
    processed = logits / temperature[:, None, None].to(logits.device)
    del logits
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    proposal = torch.empty_like(canvas)
    noise = torch.empty_like(canvas)
    for i, r in enumerate(index):  # each row's own stream, in transformers' order: proposal, then renoise
        g = state.generators[r]
        proposal[i] = torch.multinomial(probs[i], 1, generator=g).squeeze(-1)
    del probs
    argmax = processed.argmax(-1)
    entropy = token_entropy(processed)
    if choosing:  # before the accept rule reads the bound
        _choose_bounds(state, [index[i] for i in choosing], choosing, prompt_hidden, canvas_hidden, entropy)
    accepted = accept_mask(entropy, state.threshold[rows].to(entropy.device))
    for i, r in enumerate(index):
        g = state.generators[r]
        noise[i] = torch.randint(0, state.vocab_size, (1, c), generator=g, device=g.device)[0]
    new_canvas = renoise(proposal, accepted, noise)
    stable, history = stable_rows(state.history[rows], argmax, state.stability[rows])
    confident = confident_rows(entropy, state.confidence[rows].to(entropy.device))
    block_step = state.block_step[rows] + 1
    block_done = (stable & confident) | (block_step >= state.steps[rows])

    state.canvas[rows] = new_canvas
    state.argmax[rows] = argmax
    state.accepted[rows] = accepted
    state.self_conditioning[rows] = processed.to(state.self_conditioning.dtype)
    state.has_self_conditioning[rows] = True
    state.history[rows] = history
    state.block_step[rows] = block_step

    finished = torch.zeros_like(block_done)
    done = block_done.nonzero().squeeze(-1)
    if len(done):
        tokens, has_eos = finish_block(argmax[done], torch.tensor(state.eos_ids or (-1,), device=argmax.device),
                                       state.pad_id)
        for j, i in enumerate(done.tolist()):
            r, k = index[i], int(block[i])
            state.generated[r, k * c:(k + 1) * c] = tokens[j]
            finished[i] = bool(has_eos[j]) or k + 1 >= int(state.num_blocks[r])
        moving = rows[done][~finished[done]]
        state.block[moving] += 1
        state.needs_encode[moving] = True
        state.finished[rows] = finished
    return CanvasStepOutput(rows=rows, block=block, draft=argmax, accepted=accepted, block_done=block_done,
                            newly_finished=finished)


# ----------------------------------------------------------------------------- the loop

@dataclass
class CanvasOutput:
    """Result of :func:`generate`."""

    sequences: torch.Tensor  # b, gen_width  whole blocks; pad after the first EOS and past a row's blocks
    nfe: torch.Tensor  # b  decoder passes
    encoder_passes: torch.Tensor  # b  encoder passes (one per block)
    blocks: torch.Tensor  # b  blocks decoded
    threshold: torch.Tensor  # b  the entropy bound each row used (the head's for `learned` rows)
    threshold_choice: torch.Tensor  # b  the head's grid index, -1 where the head did not choose
    head_features: torch.Tensor  # b, F  what the head read
    gen_length: torch.Tensor  # b  tokens asked for (sequences hold whole blocks)


def generate(denoiser: CanvasDenoiser, prompts: list[list[int]], params: CanvasParams | list[CanvasParams], *,
             eos_ids: list[int] | tuple[int, ...], pad_id: int, on_step=None, head: torch.nn.Module | None = None,
             sample_threshold: bool = False) -> CanvasOutput:
    """Decode a batch of token-id prompts to completion with :func:`denoise_step` (``denoiser``: a
    :class:`CanvasDenoiser`, e.g. :func:`denoiser_for` of a loaded model). ``on_step(state, output)`` is
    called after every step; ``head``/``sample_threshold`` as in :func:`init_state`."""
    state = init_state(denoiser, prompts, params, eos_ids=eos_ids, pad_id=pad_id, head=head,
                       sample_threshold=sample_threshold)
    while not bool(state.finished.all()):
        out = denoise_step(denoiser, state)
        if on_step is not None:
            on_step(state, out)
    return CanvasOutput(sequences=state.generated.clone(), nfe=state.nfe.clone(),
                        encoder_passes=state.encoder_passes.clone(), blocks=state.block.clone() + 1,
                        threshold=state.threshold.clone(), threshold_choice=state.threshold_choice.clone(),
                        head_features=state.head_features.clone(), gen_length=state.gen_length.clone())
