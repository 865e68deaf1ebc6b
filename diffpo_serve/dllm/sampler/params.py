"""What a masked decode is asked to do: the samplers, the cache modes and one prompt's :class:`SamplingParams`.

The samplers (per row; each commits, at every pass, masked tokens of the row's current block):

``steps``       LLaDA's low-confidence remasking: ``steps`` forward passes in all, split evenly over
                the blocks; at each, the ``k`` most confident predictions are committed, ``k`` following
                LLaDA's schedule (block size // steps-per-block, the remainder going to the first steps).
                Confidence and ties are LLaDA's own (:func:`~.rules.remasking_confidence`,
                :func:`~.rules.low_confidence_commits`), so a row decodes as LLaDA's published ``generate``.
``confidence``  Fast-dLLM's parallel decoding (Wu et al. 2025, arXiv 2505.22618): commit every masked
                token whose confidence is >= ``threshold`` (at least the most confident one).
``eb``          The entropy-bounded sampler (Ben-Hamu et al. 2025, arXiv 2505.24857): sort the block's
                masked tokens by entropy H(1) <= H(2) <= ...; commit the largest prefix k with
                sum_{i<=k} H(i) - max_{i<=k} H(i) <= ``threshold`` (gamma), at least one token.
``learned``     ``eb`` with a per-prompt gamma chosen by the model's threshold head (DiFFPO) from the
                prompt's features in the row's first forward pass: its mode, or a draw with the row's
                generator when the state samples thresholds (RL rollouts). A given ``threshold``
                overrides the head.
``policy``      the model's learned per-step commit policy (:mod:`~diffpo_serve.dllm.step_policy`): at each
                pass a small network gives every masked token of the block a commit probability p from
                features of that pass; greedy rows commit the tokens with p >= ``threshold`` (default: the
                policy's trained operating point), rows of RL rollouts (``sample_commits``) draw
                each commit from Bernoulli(p) with the row's generator and record its log-prob;
                at least the most confident token.

The cache modes (``cache``; native models only) are described in :mod:`.cache`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class Sampler(enum.IntEnum):
    """The commit rule of a row (the state holds its value per row; ``SamplingParams.sampler`` its name)."""

    STEPS = 0
    CONFIDENCE = 1
    EB = 2
    LEARNED = 3
    POLICY = 4

    @property
    def label(self) -> str:
        """The name users write (``"steps"``, ...)."""
        return self.name.lower()


class CacheMode(enum.IntEnum):
    """A row's KV-cache mode (:mod:`.cache`); ``SamplingParams.cache`` holds its name."""

    OFF = 0
    PREFIX = 1
    DUAL = 2

    @property
    def label(self) -> str:
        return self.name.lower()


SAMPLERS = tuple(s.label for s in Sampler)
CACHE_MODES = tuple(c.label for c in CacheMode)
# learned: the head's choice; policy: the step policy's operating point
DEFAULT_THRESHOLD = {"steps": 0.0, "confidence": 0.9, "eb": 0.3, "learned": None, "policy": None}
TOP_LOGPROBS = 20  # alternatives kept per committed token of a row with ``logprobs`` (OpenAI's chat maximum)


def default_steps(gen_length: int, block_length: int | None, passes: int = 1, tokens: int = 1) -> int:
    """The `steps` sampler's passes for an answer of ``gen_length`` in blocks of ``block_length`` (None: one
    block) when none are named: ``passes`` passes per ``tokens`` tokens of a full block, rounded up, at least one
    per block and at most one per token (more passes than masks commit one token per pass all the same), the
    same for every block. A shorter last block (``gen_length`` not a multiple of the block length) gets a full
    block's budget and ends when it is committed. The default, one pass per token, is LLaDA's published
    ``steps = gen_length`` whenever the blocks divide the answer (and NFE = ``gen_length`` when they do not)."""
    block = min(block_length or gen_length, gen_length)
    per_block = max(1, min(block, -(-block * passes // tokens)))
    return -(-gen_length // block) * per_block


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt is decoded; the same names are used by the CLI and the HTTP API."""

    sampler: str = "steps"
    gen_length: int = 16
    block_length: int | None = None  # None: one block of gen_length
    steps: int | None = None  # `steps` sampler: total forward passes (None: one token per pass, default_steps)
    threshold: float | None = None  # `confidence`: min confidence; `eb`: gamma; `policy`: min commit probability.
    # None: DEFAULT_THRESHOLD
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    cache: str = "off"  # KV cache: "off", "prefix" or "dual" (CACHE_MODES; native models only)
    logprobs: bool = False  # record each committed token's log-prob under the model and its TOP_LOGPROBS
    # most likely alternatives, at the pass that committed it (BatchState.model_logprob); changes no decode

    def resolved(self) -> "SamplingParams":
        """Fill defaults and validate; raises ValueError with a message fit for an API user."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if self.gen_length < 1:
            raise ValueError(f"gen_length must be >= 1; got {self.gen_length}")
        block = self.block_length or self.gen_length
        if block < 1:
            raise ValueError(f"block_length must be >= 1; got {block}")
        block = min(block, self.gen_length)
        num_blocks = -(-self.gen_length // block)
        steps = self.steps if self.steps is not None else default_steps(self.gen_length, block)
        if self.sampler != "steps":
            steps = None  # only the `steps` sampler has a fixed number of passes
        elif steps < num_blocks or steps % num_blocks:
            raise ValueError(f"steps must be a positive multiple of the number of blocks "
                             f"({num_blocks} = ceil(gen_length / block_length)); got {steps}")
        threshold = DEFAULT_THRESHOLD[self.sampler] if self.threshold is None else float(self.threshold)
        if threshold is not None and (not threshold >= 0 or threshold == float("inf")):
            raise ValueError(f"threshold must be a finite number >= 0; got {self.threshold}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}; got {self.cache!r}")
        return replace(self, block_length=block, steps=steps, threshold=threshold)

