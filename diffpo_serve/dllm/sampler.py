"""The one batched diffusion sampler: a step function over an explicit batch state.

Every row of a :class:`BatchState` is a left-padded prompt followed by its generation region of
``gen_length`` mask tokens (rows with a shorter ``gen_length`` than the widest are right-padded with
attention off, so they see exactly what they would see alone). Generation is semi-autoregressive in
blocks of ``block_length`` (LLaDA, arXiv 2502.09992, sec. 2.4): each :func:`denoise_step` runs one
forward pass over the unfinished rows and commits, in each row's current block, the masked tokens
chosen by that row's ``sampler``:

``steps``       LLaDA's low-confidence remasking: ``steps`` forward passes in all, split evenly over
                the blocks; at each, the ``k`` most confident predictions are committed, ``k`` following
                LLaDA's schedule (block size // steps-per-block, the remainder going to the first steps).
                Confidence and ties are LLaDA's own (:func:`remasking_confidence`,
                :func:`low_confidence_commits`), so a row decodes as LLaDA's published ``generate``.
``confidence``  Fast-dLLM's parallel decoding (Wu et al. 2025, arXiv 2505.22618): commit every masked
                token whose confidence is >= ``threshold`` (at least the most confident one).
``eb``          The entropy-bounded sampler (Ben-Hamu et al. 2025, arXiv 2505.24857): sort the block's
                masked tokens by entropy H(1) <= H(2) <= ...; commit the largest prefix k with
                sum_{i<=k} H(i) - max_{i<=k} H(i) <= ``threshold`` (gamma), at least one token.
``learned``     ``eb`` with a per-prompt gamma chosen by the model's threshold head (DiFFPO) from the
                prompt's features in the row's first forward pass: its mode, or a draw with the row's
                generator when the state samples thresholds (RL rollouts). A given ``threshold``
                overrides the head.
``policy``      the model's learned per-step commit policy (:mod:`step_policy`): at each pass a small
                network gives every masked token of the block a commit probability p from features
                of that pass; greedy rows commit the tokens with p >= ``threshold`` (default: the
                policy's trained operating point), rows of RL rollouts (``sample_commits``) draw
                each commit from Bernoulli(p) with the row's generator and record its log-prob;
                at least the most confident token. The previous pass's argmax, one of its
                features, is kept per row in the state.

Confidence and entropy are those of the model's policy pi = :func:`policy_logprobs` (softmax of the
logits with the mask token excluded: a committed mask would never be unmasked), except the score ``steps``
ranks by, which is LLaDA's (mask included, in the model's dtype); tokens are drawn from
the behaviour distribution q = :func:`sampling_logprobs` (pi at ``temperature`` cut to ``top_p``; a
point mass on the argmax when the temperature is 0), and log q of each committed token is recorded
with its commit step: the trajectory that RL needs (its importance weight divides the surrogate's
pi_old, computed with the same :func:`policy_logprobs`, by this q; see ``training/loss.py``). Each row
has its own seeded generator, so a row's output does not depend on the rest of the batch.

A step materialises logits for each row's current block only, and of a greedy row's block only at its
still-masked columns (:func:`masked_columns`; its maths runs in those positions; the model's logits stay in
its dtype until the float32 softmax), so its memory grows with the block, not the answer
(``benchmarks/step_memory.py``). A batch of greedy ``steps`` rows reads only the argmax
(:func:`greedy_tokens`) and LLaDA's score from the logits; the policy's log-probs, probabilities and
entropies are built only when some row reads them. Two exceptions: a ``learned`` row's first pass (the head reads the
whole answer's entropies), and rows whose step-policy features a pass computes (``policy`` rows, or every
row with ``trace_features``), which also take the argmax from their block's end to their answer's end:
the policy's ``unchanged`` feature at a block's first pass compares with the previous pass's argmax there.
The policy's features, decisions and draws are computed at the block's columns and handed out in
generation positions (:class:`StepOutput`, :class:`PolicyTrace`).

**KV cache** (``cache``, per row; native models, :mod:`diffpo_serve.dllm.kv_cache`). ``off``: every step
runs the whole canvas. ``prefix`` (Fast-dLLM, Wu et al. 2025, arXiv 2505.22618): at a block's first step
the row runs the whole canvas and stores every layer's keys/values; its later steps in that block run only
the columns from the block's start to the end and read the stored keys/values of the prompt and finished
blocks, which are stale by the tokens committed since (the approximation). ``dual``: later steps run only
the block's columns, reading the stored keys/values of the masked suffix too. The block's first step is
thus exact; a refresh every step (``generate(..., cache_refresh=1)``) makes the whole decode the uncached
one. The state (``BatchState.kv``, ``cache_block``) is per row, so rows join and leave between steps
(:meth:`BatchState.concat` pads the stored keys/values as it pads the canvas) and a row's output does not
depend on its batch. RL rollouts with a cache record the log-probs of the cached sampler: the distribution
actually sampled from. ``policy`` rows (and rows whose policy features are traced) use the cache too. Their
``unchanged`` feature at a block's first pass compares with the argmax the previous pass computed at the
block's columns: with ``prefix`` that pass ran them, with ``dual`` it did not (it ran the block before), so
there it compares with the last pass that did, the previous block's first (part of the approximation). A
policy that reads hidden states (``basic+hidden``) gets those of the cached forward, as approximate as its
logits.

A row finishes when its text is determined: every block is committed, or an EOS (any of the state's
``eos_ids``: chat models end a turn with their own token) is committed with no mask before it (the
positions after it are then filled with ``eos_id``, the first of them; their ``commit_step`` stays -1).
Finished rows take no further forward passes. :func:`generate` loops the step for evaluation and RL
rollouts; the server's batcher calls :func:`denoise_step` itself and adds or drops rows between steps
with :meth:`BatchState.concat` and :meth:`BatchState.select`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from diffpo_serve.dllm.kv_cache import KVCache, gather_columns, locate
from diffpo_serve.dllm.loading import cached_forward, model_logits, supports_kv_cache
from diffpo_serve.dllm.step_policy import decision_logprob, policy_commits, token_features, top2_margin

SAMPLERS = ("steps", "confidence", "eb", "learned", "policy")
CACHE_MODES = ("off", "prefix", "dual")  # the `cache` knob: see the module docstring
# learned: the head's choice; policy: the step policy's operating point
DEFAULT_THRESHOLD = {"steps": 0.0, "confidence": 0.9, "eb": 0.3, "learned": None, "policy": None}
LEARNED = SAMPLERS.index("learned")
POLICY = SAMPLERS.index("policy")


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


@dataclass
class BatchState:
    """Everything the sampler knows about a batch; every per-row field has the batch as dim 0.

    The canvas is ``[left padding | prompt | generation region | right padding]`` with the prompt
    region ``prompt_width`` wide for all rows, so generation position j of any row is canvas column
    ``prompt_width + j``. With ``align`` > 0 (half precision, see :func:`prompt_alignment`) the
    prompt region is ``[prompt | padding]`` instead, and both regions' widths are multiples of ``align``.
    """

    canvas: torch.Tensor  # b, l  token ids; masked positions hold mask_id
    attention_mask: torch.Tensor  # b, l  bool: False for padding
    prompt_width: int
    gen_length: torch.Tensor  # b
    block_length: torch.Tensor  # b
    steps_per_block: torch.Tensor  # b
    sampler: torch.Tensor  # b  index into SAMPLERS
    threshold: torch.Tensor  # b  float; NaN until the head has chosen (sampler `learned`)
    temperature: torch.Tensor  # b  float
    top_p: torch.Tensor  # b  float
    block: torch.Tensor  # b  current block index
    block_step: torch.Tensor  # b  forward passes taken in the current block
    nfe: torch.Tensor  # b  forward passes this row took part in
    finished: torch.Tensor  # b  bool
    commit_step: torch.Tensor  # b, gen_width  step (0-based, the row's own count) of each commit; -1 = none
    logprob: torch.Tensor  # b, gen_width  log-prob of the committed token under the sampling distribution
    threshold_choice: torch.Tensor | None = None  # b  index into the head's grid, -1 = not chosen by the head
    head_features: torch.Tensor | None = None  # b, d  prompt features the head saw (zeros until then)
    generators: list = field(default_factory=list)  # per row: torch.Generator or None (greedy)
    head: torch.nn.Module | None = None  # the model's threshold head, for rows with sampler `learned`
    # --- the step policy (sampler `policy`)
    prev_argmax: torch.Tensor | None = None  # b, gen_width  argmax of the row's previous pass; -1 = none yet
    policy_logprob: torch.Tensor | None = None  # b  summed log-prob of the row's commit decisions (policy rows)
    policy: torch.nn.Module | None = None  # the model's step policy, for rows with sampler `policy`
    sample_commits: bool = False  # policy rows draw their commits (RL) instead of thresholding p
    trace_features: bool = False  # compute the policy's features for every row (training data)
    sample_threshold: bool = False  # draw gamma from the head (RL) instead of taking its mode
    mask_id: int = 0
    eos_id: int = 0  # the id finished rows are filled with
    pad_id: int = 0
    eos_ids: tuple[int, ...] = ()  # every id that ends a row (eos_id among them)
    stop_at_eos: bool = True
    align: int = 0  # 0: prompts left-padded to the longest; else prompts first, region width a multiple of it
    # KV cache (see the module docstring): per-row mode, the block whose start the row's keys/values were
    # computed at (-1: none yet), the keys/values themselves (canvas columns), and an extra refresh period
    cache: torch.Tensor | None = None  # b  index into CACHE_MODES
    cache_block: torch.Tensor | None = None  # b
    kv: KVCache | None = None  # per layer (b, kv_heads, l, head_dim)
    cache_refresh: int = 0  # also refresh every this many steps inside a block (0: at block starts only)

    @property
    def batch_size(self) -> int:
        return self.canvas.shape[0]

    @property
    def gen_width(self) -> int:
        return self.canvas.shape[1] - self.prompt_width

    @property
    def generated(self) -> torch.Tensor:
        """b, gen_width view of the generation region (right padding holds pad_id)."""
        return self.canvas[:, self.prompt_width:]

    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def select(self, rows) -> "BatchState":
        """A new state with only the given rows (index tensor or list), e.g. to drop finished ones."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.canvas.device)
        kept = {k: v[rows] for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        state = replace(self, **kept, generators=[self.generators[i] for i in rows.tolist()],
                        kv=self.kv.select(rows) if self.kv is not None else None)
        return state._trimmed()

    def _trimmed(self) -> "BatchState":
        """Drop padding columns no row needs (prompt columns on the left, or with ``align`` before the
        generation region, and gen columns on the right)."""
        if self.batch_size == 0:
            return self
        pw = self.prompt_width
        prompt_used = self.attention_mask[:, :pw].any(0).nonzero()
        right = int(self.gen_length.max())
        if self.align:
            right = round_up(right, self.align)
            width = round_up(int(prompt_used[-1]) + 1 if len(prompt_used) else 0, self.align)
            cols = torch.cat([torch.arange(width), torch.arange(pw, pw + right)]).to(self.canvas.device)
        else:
            left = int(prompt_used[0]) if len(prompt_used) else pw
            width = pw - left
            cols = torch.arange(left, pw + right, device=self.canvas.device)
        canvas, attention = self.canvas[:, cols], self.attention_mask[:, cols]
        return replace(self, canvas=canvas, attention_mask=attention, prompt_width=width,
                       commit_step=self.commit_step[:, :right], logprob=self.logprob[:, :right],
                       prev_argmax=self.prev_argmax[:, :right],
                       kv=self.kv.columns(cols) if self.kv is not None else None)

    @staticmethod
    def concat(states: list["BatchState"]) -> "BatchState":
        """Stack states into one batch, re-padding prompts (left, or with ``align`` after the prompt
        region) and generation regions (right). All states must share one ``align``."""
        states = [s for s in states if s.batch_size] or states[:1]
        if len({s.align for s in states}) > 1:
            raise ValueError("cannot concat states with different prompt alignments")
        pw = max(s.prompt_width for s in states)
        gw = max(s.gen_width for s in states)
        first = states[0]
        parts: dict[str, list] = {k: [] for k, v in vars(first).items() if isinstance(v, torch.Tensor)}
        kvs: list = []
        for s in states:
            left, right = pw - s.prompt_width, gw - s.gen_width
            b = s.batch_size
            dev = s.canvas.device
            split = s.prompt_width if s.align else 0  # where the prompt region's new padding goes
            parts["canvas"].append(torch.cat([s.canvas[:, :split], s.canvas.new_full((b, left), s.pad_id),
                                              s.canvas[:, split:], s.canvas.new_full((b, right), s.pad_id)], 1))
            parts["attention_mask"].append(torch.cat([s.attention_mask[:, :split],
                                                      torch.zeros(b, left, dtype=torch.bool, device=dev),
                                                      s.attention_mask[:, split:],
                                                      torch.zeros(b, right, dtype=torch.bool, device=dev)], 1))
            parts["commit_step"].append(torch.cat([s.commit_step, s.commit_step.new_full((b, right), -1)], 1))
            parts["logprob"].append(torch.cat([s.logprob, s.logprob.new_zeros((b, right))], 1))
            parts["prev_argmax"].append(torch.cat([s.prev_argmax, s.prev_argmax.new_full((b, right), -1)], 1))
            kvs.append(None if s.kv is None else s.kv.pad_columns(split, left, right))
            for k in parts:
                if k not in ("canvas", "attention_mask", "commit_step", "logprob", "prev_argmax"):
                    parts[k].append(getattr(s, k))
        merged = {k: torch.cat(v, 0) for k, v in parts.items()}
        return replace(first, **merged, prompt_width=pw, generators=[g for s in states for g in s.generators],
                       kv=_concat_kv(kvs, [s.batch_size for s in states]))


def _concat_kv(kvs: list, sizes: list[int]) -> KVCache | None:
    """Stack the states' caches (already padded to the batch's columns); rows without one get zeros (their
    ``cache_block`` is -1, so they refresh before reading it)."""
    template = next((c for c in kvs if c is not None), None)
    if template is None:
        return None
    return KVCache.concat([c if c is not None else template.empty_like(n) for c, n in zip(kvs, sizes)])


def init_state(
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    *,
    mask_id: int,
    eos_id: int,
    pad_id: int,
    eos_ids: list[int] | tuple[int, ...] = (),
    device: str | torch.device = "cpu",
    stop_at_eos: bool = True,
    head: torch.nn.Module | None = None,
    sample_threshold: bool = False,
    align: int = 0,
    policy: torch.nn.Module | None = None,
    sample_commits: bool = False,
    trace_features: bool = False,
    cache_refresh: int = 0,
    answers: list[list[int]] | None = None,
) -> BatchState:
    """Build the state for a list of token-id prompts, each with its own (or one shared) params.

    ``eos_ids``: every id that ends a row besides ``eos_id`` (which fills the rest of a finished row).

    ``head`` is the model's threshold head (needed by rows with sampler ``learned`` and no threshold).
    ``align``: the prompt layout (:class:`BatchState`); :func:`prompt_alignment` gives the model's.
    ``policy``: the model's step policy (needed by rows with sampler ``policy``); ``sample_commits``:
    its rows draw their commits (RL rollouts); ``trace_features``: every step hands out the policy's
    features of every row (:class:`StepOutput`), e.g. to collect training data from other samplers.
    ``answers``: per row, the answer to start from (``gen_length`` ids: a token where one is given, ``mask_id``
    where the sampler decodes); default all masked. Given tokens stay as they are (infilling). A row decodes only
    the blocks that hold a masked position: a block already full is skipped, wherever it stands.
    """
    if not prompts:
        raise ValueError("no prompts")
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
    params = [p.resolved() for p in params]
    if mask_id < 0:  # a model without a mask token (DiffusionGemma's mask_id is -1): not this paradigm
        raise ValueError("this sampler needs a mask token; a model without one decodes a random-token canvas "
                         "with diffpo_serve.dllm.canvas")
    if head is None and any(p.threshold is None and p.sampler == "learned" for p in params):
        raise ValueError("sampler 'learned' needs a model with a threshold head; give a threshold to use eb")
    if policy is None and any(p.sampler == "policy" for p in params):
        raise ValueError("sampler 'policy' needs a model with a step policy")
    params = [replace(p, threshold=policy.threshold) if p.sampler == "policy" and p.threshold is None else p
              for p in params]
    b = len(prompts)
    if answers is not None and len(answers) != b:
        raise ValueError(f"{len(answers)} answers for {b} prompts")
    pw = round_up(max(len(p) for p in prompts), align)
    gw = round_up(max(p.gen_length for p in params), align)
    canvas = torch.full((b, pw + gw), pad_id, dtype=torch.long)
    attention = torch.zeros((b, pw + gw), dtype=torch.bool)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        start = 0 if align else pw - len(prompt)
        if len(prompt):
            canvas[i, start:start + len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
        attention[i, start:start + len(prompt)] = True
        attention[i, pw:pw + p.gen_length] = True
        canvas[i, pw:pw + p.gen_length] = mask_id
        if answers is not None:
            if len(answers[i]) != p.gen_length:
                raise ValueError(f"answer {i} has {len(answers[i])} tokens; its gen_length is {p.gen_length}")
            canvas[i, pw:pw + p.gen_length] = torch.as_tensor(answers[i], dtype=torch.long)
    generators = []
    for p in params:
        # a row draws with its generator: tokens when T > 0, and its gamma when it samples one from the head
        # (so greedy rollouts can still explore thresholds: their outcome then depends on gamma alone)
        if p.temperature > 0 or (sample_threshold and p.sampler == "learned" and p.threshold is None) \
                or (sample_commits and p.sampler == "policy"):
            g = torch.Generator()
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ())))
            generators.append(g)
        else:
            generators.append(None)

    def col(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    num_blocks = [-(-p.gen_length // p.block_length) for p in params]
    # each row starts at its first block with something to decode (block 0 of an all-masked answer)
    first_block = first_masked_block(canvas[:, pw:], mask_id, torch.tensor([p.gen_length for p in params]),
                                     torch.tensor([p.block_length for p in params]))
    return BatchState(
        canvas=canvas.to(device), attention_mask=attention.to(device), prompt_width=pw,
        gen_length=col([p.gen_length for p in params], torch.long),
        block_length=col([p.block_length for p in params], torch.long),
        steps_per_block=col([p.steps // n if p.steps else p.block_length for p, n in zip(params, num_blocks)],
                            torch.long),
        sampler=col([SAMPLERS.index(p.sampler) for p in params], torch.long),
        threshold=col([float("nan") if p.threshold is None else p.threshold for p in params], torch.float),
        threshold_choice=torch.full((b,), -1, dtype=torch.long, device=device),
        head_features=torch.zeros((b, head.feature_size if head is not None else 0), device=device),
        temperature=col([p.temperature for p in params], torch.float),
        top_p=col([p.top_p for p in params], torch.float),
        block=first_block.to(device),
        block_step=torch.zeros(b, dtype=torch.long, device=device),
        nfe=torch.zeros(b, dtype=torch.long, device=device),
        finished=(first_block >= torch.tensor(num_blocks)).to(device),
        commit_step=torch.full((b, gw), -1, dtype=torch.long, device=device),
        logprob=torch.zeros((b, gw), dtype=torch.float, device=device),
        prev_argmax=torch.full((b, gw), -1, dtype=torch.long, device=device),
        policy_logprob=torch.zeros(b, dtype=torch.float, device=device),
        policy=policy, sample_commits=sample_commits, trace_features=trace_features,
        generators=generators, head=head, sample_threshold=sample_threshold, mask_id=mask_id, eos_id=eos_id,
        pad_id=pad_id, eos_ids=tuple(dict.fromkeys([int(eos_id), *(int(i) for i in eos_ids)])),
        stop_at_eos=stop_at_eos, align=align,
        cache=col([CACHE_MODES.index(p.cache) for p in params], torch.long),
        cache_block=torch.full((b,), -1, dtype=torch.long, device=device), cache_refresh=cache_refresh,
    )


def first_masked_block(gen: torch.Tensor, mask_id: int, gen_length: torch.Tensor,
                       block_length: torch.Tensor) -> torch.Tensor:
    """(b,) the block holding each row's first masked answer position (``gen`` (b, gen_width); positions past
    the row's ``gen_length`` are not read), or the row's number of blocks when nothing is masked: where a
    decode starts and, after a block is done, where it goes on, so blocks an answer gives in full take no pass."""
    width = gen.shape[1]
    position = torch.arange(width, device=gen.device)[None, :]
    masked = (gen == mask_id) & (position < gen_length[:, None])
    first = torch.where(masked, position, width).amin(-1)
    return torch.where(first < width, first // block_length, (gen_length + block_length - 1) // block_length)


def round_up(n: int, align: int) -> int:
    """``n`` rounded up to a multiple of ``align`` (0: unchanged)."""
    return -(-n // align) * align if align else n


HALF_PRECISION_ALIGN = 16  # fp32 lanes of an AVX-512 register: whole-lane shifts keep sums' order


def prompt_alignment(model: torch.nn.Module) -> int:
    """The prompt layout that keeps a row's greedy output independent of its batch, for this model.

    A prompt shorter than the batch's longest is padded. Left padding shifts the row's keys inside
    attention's vectorised sums, which reorders their rounding: harmless in float32 (no greedy
    output changed in our measurements), but in bfloat16 a few outputs flip. With the prompt first
    and both the prompt and the generation region multiples of :data:`HALF_PRECISION_ALIGN` wide, a
    row's tokens keep their columns modulo the vector width, no sum ends in a partial vector, and
    padding only adds exact zeros, so batched equals alone (measured by ``python -m
    benchmarks.dtype``). It costs up to ``align - 1`` padded columns per region, so float32 keeps the
    tight left-padded layout (0).
    """
    weight = next(model.parameters(), None)
    return HALF_PRECISION_ALIGN if weight is not None and weight.dtype in (torch.bfloat16, torch.float16) else 0


# ----------------------------------------------------------------------------- the maths, pure functions

def policy_logprobs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log pi(x): the model's distribution over the vocabulary without the mask token, (..., V) float.

    The one definition of the policy a dLLM samples from and RL trains: the sampler reads confidence
    and entropy from it and draws from :func:`sampling_logprobs` of it, and RL's likelihood surrogates
    (``training/likelihood.py``) score completions with it, so that the truncated importance weight
    pi_old / q compares two distributions of one family. The mask token gets log-prob -inf: it is
    never drawn, so it never enters either term. Out of place (autograd-safe).
    """
    column = torch.tensor([mask_id], device=logits.device)
    return torch.log_softmax(logits.float().index_fill(-1, column, float("-inf")), dim=-1)


def sampling_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """log q(x): the behaviour distribution a row actually draws its tokens from.

    ``logits`` (b, n, V) are the policy's log-probs (:func:`policy_logprobs`; logits with the mask
    at -inf give the same q); temperature, top_p (b,). With T > 0, q = softmax(log pi / T) restricted
    to the top-p nucleus (the smallest prefix of the sorted distribution whose mass reaches top_p,
    the first token always) and renormalised; with T = 0 (greedy) q is the point mass on the argmax
    (log q = 0 there, -inf elsewhere), whatever top_p. T = 1 with top_p = 1 is pi itself.
    """
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logq = torch.log_softmax(logits.float() / t[:, None, None], dim=-1)
    if bool((top_p < 1).any()):
        sorted_logq, order = logq.sort(dim=-1, descending=True)
        probs = sorted_logq.exp()
        # keep the smallest prefix whose mass reaches top_p (the first token always)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p[:, None, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logq = torch.log_softmax(logq.masked_fill(drop, float("-inf")), dim=-1)
    if bool((temperature == 0).any()):
        point = torch.full_like(logq, float("-inf")).scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
        logq = torch.where((temperature == 0)[:, None, None], point, logq)
    return logq


def transfer_counts(block_size: torch.Tensor, steps_per_block: torch.Tensor, block_step: torch.Tensor) -> torch.Tensor:
    """LLaDA's schedule: tokens committed at step s of a block of n masks decoded in S steps.

    n // S each, plus one for the first n % S steps; at least one.
    """
    base = block_size // steps_per_block
    extra = (block_step < block_size % steps_per_block).long()
    return (base + extra).clamp(min=1)


def _ranks(scores: torch.Tensor, candidates: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0 = best) of every candidate position by score; non-candidates rank last. Also the order."""
    fill = float("-inf") if descending else float("inf")
    order = scores.masked_fill(~candidates, fill).argsort(dim=-1, descending=descending, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                             .expand_as(order).contiguous())
    return ranks, order


def entropy_before(entropy: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantity the EB rule bounds: for each candidate position (b, n), the summed entropy of the
    candidates ranked before it by ascending entropy (position order; EB commits the prefix where this
    is <= gamma, and always the first). Also each position's rank."""
    rank, order = _ranks(entropy, candidates, descending=False)
    sorted_h = entropy.gather(-1, order).masked_fill(~candidates.gather(-1, order), 0.0)
    exclusive = sorted_h.cumsum(-1) - sorted_h
    return exclusive.gather(-1, rank), rank  # back to position order


def greedy_tokens(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The greedy token at each position (...,): the argmax of the raw logits with the mask token left out
    (the policy never commits it), without copying the logits: the rare positions whose argmax is the mask
    token take the argmax of their logits with that column at -inf. Ties go to the lowest id, as ``argmax``."""
    tokens = logits.argmax(-1)
    hit = tokens == mask_id
    if bool(hit.any()):
        column = torch.tensor([mask_id], device=logits.device)
        tokens[hit] = logits[hit].index_fill(-1, column, float("-inf")).argmax(-1)
    return tokens


def remasking_confidence(logits: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The score LLaDA's low-confidence remasking ranks by (its ``generate``'s ``x0_p``), (b, n) in float64
    (exactly the values it computes): the softmax of the raw logits (b, n, V), the mask token included, taken
    in the logits' own dtype as the published sampler takes it, at the position's prediction: for a greedy
    decode (``tokens`` None) the largest probability (the raw argmax's, even where that is the mask token,
    which the policy never commits), else the probability of each drawn token (``tokens``, b, n).

    It is not the policy's confidence (:func:`policy_logprobs`: float32, the mask excluded): in bfloat16 the
    softmax rounds to 8 significant bits, so many scores tie and the order among ties decides the commits.
    """
    probs = torch.softmax(logits, dim=-1)
    if tokens is None:
        return probs.amax(-1).double()
    return probs.gather(-1, tokens[..., None]).squeeze(-1).double()


def low_confidence_commits(score: torch.Tensor, candidates: torch.Tensor, num_transfer: torch.Tensor,
                           cols: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                           length: torch.Tensor | None = None) -> torch.Tensor:
    """The ``steps`` rule (b, n bool): each row commits its ``num_transfer`` highest-scoring candidates.

    Ties are broken as LLaDA's ``generate`` breaks them: it calls ``torch.topk`` on a vector as long as the
    row's sequence (prompt + answer) holding the scores of the block's masked positions and -inf elsewhere,
    and topk's order among equal values depends on that layout. So the same vector is built here: ``cols``
    (b, n) are the block's generation positions, ``offset`` (b,) the row's prompt length and ``length`` (b,)
    its answer length (default: the block alone, at offset 0).
    """
    b, n = score.shape
    cols = torch.arange(n, device=score.device).expand(b, n) if cols is None else cols
    offset = torch.zeros(b, dtype=torch.long, device=score.device) if offset is None else offset
    length = torch.full((b,), n, dtype=torch.long, device=score.device) if length is None else length
    at = offset[:, None] + cols  # b, n  positions in the row's sequence
    ends = (offset + length).tolist()
    sequence = score.new_full((b, max(ends, default=0)), float("-inf"))
    # a narrower block repeats its last column (not a candidate, so -inf): amax keeps the real score there
    sequence.scatter_reduce_(1, at, score.masked_fill(~candidates, float("-inf")), "amax")
    chosen = torch.zeros(sequence.shape, dtype=torch.bool, device=score.device)
    for i, k in enumerate(num_transfer.tolist()):
        if k > 0 and ends[i] > 0:  # one 1-D topk per row, as LLaDA's generate calls it
            chosen[i, torch.topk(sequence[i, :ends[i]], min(k, ends[i])).indices] = True
    return chosen.gather(1, at) & candidates


def select_commits(
    confidence: torch.Tensor,
    entropy: torch.Tensor,
    candidates: torch.Tensor,
    sampler: torch.Tensor,
    threshold: torch.Tensor,
    num_transfer: torch.Tensor,
    layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Which candidate positions each row commits now (b, n bool); rows with a candidate commit >= 1.

    confidence, entropy, candidates: (b, n); sampler (index into SAMPLERS), threshold, num_transfer: (b,).
    ``steps`` rows select with :func:`low_confidence_commits` (their confidence should be
    :func:`remasking_confidence`; ``layout`` = its ``(cols, offset, length)``). ``learned`` rows select like
    ``eb`` (their threshold is the head's gamma).
    """
    conf_rank, _ = _ranks(confidence, candidates, descending=True)
    top1 = (conf_rank == 0) & candidates
    steps_sel = torch.zeros_like(candidates)
    steps = (sampler == 0).nonzero().squeeze(-1)
    if len(steps):
        cols, offset, length = (None, None, None) if layout is None else (t[steps] for t in layout)
        steps_sel[steps] = low_confidence_commits(confidence[steps], candidates[steps], num_transfer[steps],
                                                  cols, offset, length)
    conf_sel = ((confidence >= threshold[:, None]) & candidates) | top1
    before, ent_rank = entropy_before(entropy, candidates)
    eb_sel = ((before <= threshold[:, None]) & candidates) | ((ent_rank == 0) & candidates)
    code = sampler[:, None]
    return torch.where(code == 0, steps_sel, torch.where(code == 1, conf_sel, eb_sel))


# ----------------------------------------------------------------------------- the step

def _choose_thresholds(state: BatchState, rows: torch.Tensor, hidden: torch.Tensor, attention: torch.Tensor,
                       answer_entropy: torch.Tensor) -> None:
    """Ask the head for gamma of the given rows from their features in their first forward pass."""
    features = state.head.extract(hidden, attention, state.prompt_width, answer_entropy)
    gens = [state.generators[r] for r in rows.tolist()] if state.sample_threshold else None
    choice = state.head.choose(features, gens).to(rows.device)
    state.threshold[rows] = state.head.grid.to(rows.device)[choice]
    state.threshold_choice[rows] = choice
    state.head_features[rows] = features.to(state.head_features.device)


def _policy_step(state: BatchState, rows, policy_rows, probs, confidence, entropy, candidates, argmax, cols,
                 block_size, hidden, commit):
    """The step policy's part of a pass, in block positions (r, K; ``cols`` the generation position of each):
    its features for the running rows, and for ``policy`` rows their commits (greedy or drawn) with the
    decisions' log-prob added to ``state.policy_logprob``. Returns (features, decisions, commit)."""
    before, rank = entropy_before(entropy, candidates)
    unchanged = argmax == state.prev_argmax[rows].gather(1, cols)
    # block positions: column k of the block sits at (k - 0) / block size
    features = token_features(confidence, entropy, top2_margin(probs), before, rank, unchanged, candidates,
                              torch.zeros_like(block_size), block_size, state.block_step[rows])
    if hidden is not None:
        features = torch.cat([features, hidden.float() * candidates[..., None]], -1)
    decisions = commit
    if bool(policy_rows.any()):
        prob = state.policy.probability(features)
        sample = torch.tensor([state.sample_commits and state.generators[r] is not None for r in rows.tolist()],
                              device=prob.device)
        uniform = None
        if bool(sample.any()):
            uniform = torch.ones_like(prob)
            for i, r in enumerate(rows.tolist()):
                if sample[i]:  # draw for the row's whole answer, so neither the batch's width nor the block
                    n = int(state.gen_length[r])  # layout changes the row's stream; read at its block
                    drawn = torch.rand(n, generator=state.generators[r]).to(prob.device)
                    uniform[i] = drawn[cols[i]]
        p_commit, bits = policy_commits(prob, confidence, candidates, state.threshold[rows], uniform, sample)
        commit = torch.where(policy_rows[:, None], p_commit, commit)
        decisions = torch.where(policy_rows[:, None], bits, commit)
        logp = decision_logprob(prob, bits, candidates)
        state.policy_logprob[rows] += torch.where(policy_rows, logp, torch.zeros_like(logp))
    return features, decisions, commit


@dataclass
class StepOutput:
    """What one step did: the rows that ran (indices into the state) and what each committed."""

    rows: torch.Tensor  # r  rows that took part in this forward pass
    committed: torch.Tensor  # r, gen_width  bool: positions committed at this step
    newly_finished: torch.Tensor  # r  bool
    # the step policy's view of this pass (when a row used it, or with ``trace_features``), else None
    features: torch.Tensor | None = None  # r, gen_width, F  its input per position (zeros off candidates)
    decisions: torch.Tensor | None = None  # r, gen_width  bool: policy rows' drawn bits; other rows' commits
    candidates: torch.Tensor | None = None  # r, gen_width  bool: the masked positions of the current block
    argmax: torch.Tensor | None = None  # r, gen_width  the model's argmax at this pass


def block_columns(state: BatchState, rows: torch.Tensor):
    """Each row's current block in generation positions: ``(columns (r, K), real (r, K) bool, start (r,),
    end (r,))`` with K the widest block among the rows; a row with a narrower block repeats its last column
    (marked not real), so no row ever reads or computes a column outside its own block."""
    block_start = state.block[rows] * state.block_length[rows]
    block_end = torch.minimum(block_start + state.block_length[rows], state.gen_length[rows])
    width = int(state.block_length[rows].max())
    j = block_start[:, None] + torch.arange(width, device=block_start.device)
    return torch.minimum(j, block_end[:, None] - 1), j < block_end[:, None], block_start, block_end


def masked_columns(gen: torch.Tensor, cols: torch.Tensor, real: torch.Tensor, mask_id: int,
                   keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns a step computes logits at, ``(columns (r, M), real (r, M) bool)``: for each row of its
    block (``cols``, ``real`` from :func:`block_columns`) the still-masked ones, in order, since a committed
    token is never read again; rows flagged in ``keep`` (r, bool) take the whole block, in order. M is the
    most any row takes, and a row with fewer repeats its last one (not real), as :func:`block_columns` does."""
    masked = (gen.gather(1, cols) == mask_id) & real
    take = torch.where(keep[:, None], real, masked)
    count = take.sum(-1)
    k = cols.shape[1]
    width = max(int(count.max()), 1)
    order = ((~take).long() * k + torch.arange(k, device=cols.device)).argsort(-1)[:, :width]  # taken first
    picked = cols.gather(1, order)
    kept = torch.arange(width, device=cols.device) < count[:, None]
    return torch.where(kept, picked, picked.gather(1, (count - 1).clamp(min=0)[:, None])), kept


def _query_columns(state: BatchState, rows: torch.Tensor, block_index: torch.Tensor) -> torch.Tensor:
    """The canvas columns a cached forward computes for each row (r, q): with ``dual`` its block
    (``block_index``, r x K), with ``prefix`` everything from its block's start to the canvas end; rows with
    fewer columns than the widest repeat their last one."""
    dual = state.cache[rows] == CACHE_MODES.index("dual")
    if bool(dual.all()):
        return block_index
    length, start = state.canvas.shape[1], block_index[:, 0]
    width = max(int(block_index.shape[1]), length - int(start.min()))
    suffix = (start[:, None] + torch.arange(width, device=start.device)).clamp(max=length - 1)
    block = torch.cat([block_index, block_index[:, -1:].expand(-1, width - block_index.shape[1])], 1)
    return torch.where(dual[:, None], block, suffix)


def _refreshes(state: BatchState, rows: torch.Tensor) -> torch.Tensor:
    """(r,) bool: the rows whose step runs a full forward (cache off, or a cached row's refresh: the first
    step of its block, and every ``cache_refresh`` steps)."""
    if state.cache is None:
        return torch.ones_like(rows, dtype=torch.bool)
    refresh = (state.cache[rows] == 0) | (state.cache_block[rows] != state.block[rows])
    if state.cache_refresh:
        refresh |= state.block_step[rows] % state.cache_refresh == 0
    return refresh


def _reads_dual_cache(state: BatchState, rows: torch.Tensor) -> torch.Tensor:
    """(r,) bool: the rows whose step runs only their block's columns (``dual``, not refreshing)."""
    if state.cache is None:
        return torch.zeros_like(rows, dtype=torch.bool)
    return (state.cache[rows] == CACHE_MODES.index("dual")) & ~_refreshes(state, rows)


def _step_logits(model: torch.nn.Module, state: BatchState, rows: torch.Tensor, canvas: torch.Tensor,
                 attention: torch.Tensor, positions: torch.Tensor, index: torch.Tensor,
                 hidden_rows: torch.Tensor | None = None, index_hidden: torch.Tensor | None = None,
                 block_index: torch.Tensor | None = None):
    """Logits (r, k, V) at canvas columns ``index`` (r, k), in the model's dtype, the last hidden state of
    the rows flagged in ``hidden_rows`` (the head's first pass; whole canvas), and with ``index_hidden`` (r,
    bool: the rows that need it) the last hidden state at ``index`` (r, k, d; the step policy's hidden
    features), through the KV cache where rows use one.

    A row with ``cache`` off runs the whole canvas. A cached row refreshes (one full forward that also
    stores its keys/values) at the first step of each block (and every ``cache_refresh`` steps), otherwise
    runs only its query columns (:func:`_query_columns` of ``block_index``, r x K', default ``index``: its
    block's columns, and any later ones it reads; ``index`` must lie within them) against its stored
    keys/values; its hidden state at ``index`` is then the cached forward's."""
    want_hidden = hidden_rows is not None
    want_index_hidden = index_hidden is not None and bool(index_hidden.any())
    if state.cache is None or not bool((state.cache[rows] > 0).any()):
        out = model_logits(model, canvas, attention, positions, hidden=want_hidden or want_index_hidden,
                           logits_index=index)
        if not (want_hidden or want_index_hidden):
            return out, None, None
        logits, h = out
        return (logits, h[hidden_rows] if want_hidden else None,
                gather_columns(h, index) if want_index_hidden else None)
    if not supports_kv_cache(model):
        raise ValueError(f"cache needs a native model ({type(model).__name__} takes no KV cache); use cache 'off'")
    on = state.cache[rows] > 0
    refresh = _refreshes(state, rows)
    logits = hidden = picked = None
    for group, fresh in ((refresh.nonzero().squeeze(-1), True), ((~refresh).nonzero().squeeze(-1), False)):
        if len(group) == 0:
            continue
        args = (canvas[group], attention[group], positions[group])
        if fresh:
            need = want_hidden and bool(hidden_rows[group].any())
            part, h, kv = cached_forward(model, *args, logits_index=index[group], return_kv=bool(on[group].any()),
                                         hidden=need or want_index_hidden)
            at = gather_columns(h, index[group]) if want_index_hidden else None
            stored = group[on[group]]
            if kv is not None and len(stored):
                if state.kv is None:
                    state.kv = kv.empty_like(state.batch_size)
                state.kv.write_rows(rows[stored], kv.select(on[group].nonzero().squeeze(-1)))
                state.cache_block[rows[stored]] = state.block[rows[stored]]
            if need:
                hidden = h[hidden_rows[group]]
        else:
            query = _query_columns(state, rows[group], (index if block_index is None else block_index)[group])
            whole = len(group) == state.batch_size  # then rows[group] is every row in order: no copy of the cache
            part, at, _ = cached_forward(model, *args, logits_index=index[group], query_index=query,
                                         kv_cache=state.kv if whole else state.kv.select(rows[group]),
                                         hidden=want_index_hidden)  # its last hidden state is at `index`
        if at is not None:
            if picked is None:
                picked = at.new_zeros((len(rows), *at.shape[1:]))
            picked[group] = at
        if len(group) == len(rows):  # one group: its rows are all the rows, in order (no copy of the logits)
            logits = part
            continue
        if logits is None:
            logits = part.new_empty((len(rows), *part.shape[1:]))
        logits[group] = part
    return logits, hidden, picked


@torch.no_grad()
def denoise_step(model: torch.nn.Module, state: BatchState) -> StepOutput:
    """One forward pass over the unfinished rows of ``state``; updates the state in place.

    Logits are materialised for each row's current block only (and, in a ``learned`` row's first pass, for
    its whole answer, whose entropies the threshold head reads); the step's maths runs in block positions."""
    rows = (~state.finished).nonzero().squeeze(-1)
    pw, gw = state.prompt_width, state.gen_width
    if len(rows) == 0:
        return StepOutput(rows, state.commit_step.new_zeros((0, gw), dtype=torch.bool),
                          state.finished.new_zeros(0))
    canvas = state.canvas[rows]
    attention = state.attention_mask[rows]
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    pending = state.threshold[rows].isnan()  # `learned` rows in their first pass: the head chooses gamma
    choosing = bool(pending.any())
    policy_rows = state.sampler[rows] == POLICY
    use_policy = bool(policy_rows.any())
    traced = policy_rows | state.trace_features  # rows whose step-policy features this pass computes
    want_hidden = (use_policy or state.trace_features) and state.policy is not None and state.policy.uses_hidden

    gen = canvas[:, pw:]
    block_cols, in_block, block_start, block_end = block_columns(state, rows)  # r, K
    # logits only where they are read: a greedy row's masked block columns, r x M; the step's maths runs in
    # these positions. Traced rows keep their whole block (the policy's features name block positions), and so
    # do sampling rows (their generator draws one token per block position, so a row's random stream, and
    # thus its output, stays what it is alone and in any batch)
    keep = traced | (state.temperature[rows] > 0)
    cols, in_block = masked_columns(gen, block_cols, in_block, state.mask_id, keep=keep)
    r, width = cols.shape
    # traced rows also read the argmax from their block's end to their answer's end: the `unchanged`
    # feature of a block's first pass compares with the previous pass's argmax there (other rows repeat
    # their block's last column, so they compute nothing more). A `dual` row's step that reads its cache
    # runs its block only: those columns keep the argmax of the last pass that ran them, its block's first
    reads_ahead = traced & ~_reads_dual_cache(state, rows)
    ahead_width = int((state.gen_length[rows] - block_end)[reads_ahead].max()) if bool(reads_ahead.any()) else 0
    ahead = block_end[:, None] + torch.arange(ahead_width, device=gen.device)
    ahead_real = reads_ahead[:, None] & (ahead < state.gen_length[rows][:, None])
    ahead = torch.where(ahead_real, ahead, cols[:, -1:])
    wanted = torch.cat([cols, ahead], 1)  # r, K + A  generation positions
    if choosing:  # the head reads the first pass's entropies over the whole answer: all its logits this once
        answer = torch.arange(gw, device=gen.device).expand(r, gw)
        logits, hidden, answer_hidden = _step_logits(model, state, rows, canvas, attention, positions, pw + answer,
                                                     pending, index_hidden=traced if want_hidden else None)
        answer_entropy = torch.special.entr(policy_logprobs(logits[pending], state.mask_id).exp()).sum(-1)
        logits = logits.gather(1, wanted[..., None].expand(-1, -1, logits.shape[-1]))
        index_hidden = gather_columns(answer_hidden, wanted) if want_hidden else None
    else:
        logits, _, index_hidden = _step_logits(model, state, rows, canvas, attention, positions, pw + wanted,
                                               index_hidden=traced if want_hidden else None,
                                               block_index=pw + block_cols)
    if ahead_width:  # only their argmax is needed (the mask excluded, as policy_logprobs does)
        ahead_argmax = greedy_tokens(logits[:, width:], state.mask_id)
        logits = logits[:, :width]
    gen_block = gen.gather(1, cols)
    candidates = (gen_block == state.mask_id) & in_block

    # `steps` rows rank by LLaDA's score, from the logits in their own dtype (remasking_confidence): greedy
    # rows now, rows that draw their tokens once drawn (only their logits are kept)
    steps_rows = (state.sampler[rows] == 0).nonzero().squeeze(-1)
    drawing = state.temperature[rows][steps_rows] > 0
    scored = steps_rows[~drawing]
    steps_score = None if len(scored) == 0 else remasking_confidence(logits if len(scored) == r else logits[scored])
    drawn_logits = logits[steps_rows[drawing]] if bool(drawing.any()) else None
    temperature, top_p = state.temperature[rows], state.top_p[rows]
    greedy = bool((temperature == 0).all())
    tokens = greedy_tokens(logits, state.mask_id)
    argmax = tokens.clone()
    # a batch of greedy `steps` rows with no step-policy features needs nothing else from the vocabulary: its
    # tokens are the argmax and its score LLaDA's; the policy's log-probs, probabilities and entropies (four
    # more passes over r x K x V values) are not built
    lean = greedy and len(steps_rows) == r and not (use_policy or state.trace_features)
    if lean:
        del logits
        logp = probs = logq = None
        confidence = entropy = torch.zeros(tokens.shape, device=tokens.device)  # read by no `steps` row
    else:
        # r, K, V in float32 (the model's dtype may be half); never the mask: a row could stall on it
        logp = policy_logprobs(logits, state.mask_id)
        del logits
        probs = logp.exp()
        entropy = torch.special.entr(probs).sum(-1)  # -sum p log p, with 0 log 0 = 0 (no NaN on saturated rows)
        # the behaviour distribution q; at T = 1 without a nucleus it is the policy itself, computed above
        # greedy rows' q is the point mass on the argmax (log q = 0 at the committed token): an all-greedy batch
        # skips building it over the vocabulary
        logq = None if greedy else sampling_logprobs(logp, temperature, top_p) \
            if bool(((temperature != 1) | (top_p < 1)).any()) else logp
    if choosing:  # before any threshold is read below
        _choose_thresholds(state, rows[pending], hidden, attention[pending], answer_entropy)
    for i, row in enumerate(rows.tolist()):
        g = state.generators[row]
        if g is not None and state.temperature[row] > 0:
            n = int(block_end[i] - block_start[i])  # draw for the row's own block positions only: the batch's
            drawn = torch.multinomial(logq[i, :n].exp().cpu(), 1, generator=g).squeeze(-1)  # width must not matter
            tokens[i, :n] = drawn.to(tokens.device)
    if not lean:
        confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)
    token_logprob = confidence.new_zeros(confidence.shape) if greedy else logq.gather(-1, tokens[..., None]).squeeze(-1)
    score = confidence
    if len(steps_rows):
        score = confidence.double()  # holds every score exactly, whatever the model's dtype
        if steps_score is not None:
            score[scored] = steps_score
        if drawn_logits is not None:
            score[steps_rows[drawing]] = remasking_confidence(drawn_logits, tokens[steps_rows[drawing]])

    num_transfer = transfer_counts(block_end - block_start, state.steps_per_block[rows], state.block_step[rows])
    layout = (cols, attention[:, :pw].sum(-1), state.gen_length[rows])  # the row's sequence, for topk's ties
    commit = select_commits(score, entropy, candidates, state.sampler[rows], state.threshold[rows],
                            num_transfer, layout)  # r, K
    features = decisions = None
    if use_policy or state.trace_features:
        features, decisions, commit = _policy_step(state, rows, policy_rows, probs, confidence, entropy, candidates,
                                                   argmax, cols, block_end - block_start,
                                                   index_hidden[:, :width] if want_hidden else None, commit)

    stuck = candidates.any(-1) & ~(commit & candidates).any(-1)
    if bool(stuck.any()):  # every rule commits >= 1 candidate per pass; without it the decode would never end
        raise RuntimeError(f"sampler made no progress: row(s) {rows[stuck].tolist()} committed nothing this pass "
                           f"(samplers {state.sampler[rows][stuck].tolist()})")
    # back from block positions to generation positions: only committed (in-block, distinct) ones are written
    step_index = state.nfe[rows]
    row_index = torch.arange(r, device=gen.device)[:, None].expand(r, width)
    at = (row_index[commit], cols[commit])
    gen = gen.clone()
    gen[at] = tokens[commit]
    committed = torch.zeros_like(gen, dtype=torch.bool)
    committed[at] = True
    commit_step, logprob = state.commit_step[rows], state.logprob[rows]
    commit_step[at] = step_index[:, None].expand(r, width)[commit]
    logprob[at] = token_logprob[commit].to(logprob.dtype)
    nfe = step_index + 1
    block, block_step = state.block[rows], state.block_step[rows] + 1

    masked = gen == state.mask_id
    block_done = ~(gen.gather(1, cols).eq(state.mask_id) & in_block).any(-1)
    gen_length, block_length = state.gen_length[rows], state.block_length[rows]
    block = torch.where(block_done, first_masked_block(gen, state.mask_id, gen_length, block_length), block)
    block_step = torch.where(block_done, torch.zeros_like(block_step), block_step)
    all_done = block * block_length >= gen_length
    if state.stop_at_eos:
        mask_before = masked.long().cumsum(-1) - masked.long()
        is_eos = torch.isin(gen, torch.tensor(state.eos_ids or (state.eos_id,), device=gen.device))
        eos_done = (is_eos & (mask_before == 0)).any(-1)
        gen = torch.where(eos_done[:, None] & masked, torch.full_like(gen, state.eos_id), gen)
        all_done = all_done | eos_done

    state.canvas[rows, pw:] = gen
    state.commit_step[rows] = commit_step
    state.logprob[rows] = logprob
    state.nfe[rows] = nfe
    state.block[rows] = block
    state.block_step[rows] = block_step
    state.finished[rows] = all_done
    # the argmax of this pass where it was computed (the block; for traced rows also the rest of the answer),
    # in generation positions: the policy's `unchanged` feature and its trace read it there
    full_argmax = torch.full_like(gen, -1)
    real = (row_index[in_block], cols[in_block])
    full_argmax[real] = argmax[in_block]
    if ahead_width:
        later = torch.arange(r, device=gen.device)[:, None].expand(r, ahead_width)
        full_argmax[later[ahead_real], ahead[ahead_real]] = ahead_argmax[ahead_real]
    prev = state.prev_argmax[rows]
    state.prev_argmax[rows] = torch.where(full_argmax >= 0, full_argmax, prev)
    if features is None:
        return StepOutput(rows=rows, committed=committed, newly_finished=all_done)
    return StepOutput(rows=rows, committed=committed, newly_finished=all_done,
                      features=_to_generation(features, row_index, cols, in_block, gw),
                      decisions=_to_generation(decisions, row_index, cols, in_block, gw),
                      candidates=_to_generation(candidates, row_index, cols, in_block, gw),
                      argmax=full_argmax)


def _to_generation(values: torch.Tensor, row_index: torch.Tensor, cols: torch.Tensor, in_block: torch.Tensor,
                   gw: int) -> torch.Tensor:
    """Block-position values (r, K, ...) back to generation positions (r, gw, ...), zero (False) outside
    the block."""
    out = values.new_zeros((values.shape[0], gw, *values.shape[2:]))
    out[row_index[in_block], cols[in_block]] = values[in_block]
    return out


# ----------------------------------------------------------------------------- the loop

@dataclass
class GenerationOutput:
    """Result of :func:`generate`; ``commit_step``/``logprob`` are the RL trajectory."""

    sequences: torch.Tensor  # b, gen_width  generated ids (EOS-filled after a stop; pad past gen_length)
    nfe: torch.Tensor  # b  forward passes each row took part in
    commit_step: torch.Tensor | None = None  # b, gen_width  step at which each token was committed (-1: filled)
    logprob: torch.Tensor | None = None  # b, gen_width  behaviour log-prob of each committed token
    gen_length: torch.Tensor | None = None  # b
    threshold: torch.Tensor | None = None  # b  the threshold each row used (the head's gamma for `learned`)
    threshold_choice: torch.Tensor | None = None  # b  head grid index, -1 where the head did not choose
    head_features: torch.Tensor | None = None  # b, d  what the head saw
    policy_logprob: torch.Tensor | None = None  # b  summed log-prob of the step policy's decisions (policy rows)
    policy_trace: "PolicyTrace | None" = None  # per step: the step policy's view (return_trajectory)


@dataclass
class PolicyTrace:
    """The step policy's view of every pass of :func:`generate` (S = the most passes any row took):
    what RL needs to recompute the decisions' log-prob with gradients, and what a supervised warm
    start labels. Rows that had finished before step s have no candidates at s."""

    features: torch.Tensor  # b, S, gen_width, F
    decisions: torch.Tensor  # b, S, gen_width  bool: policy rows' drawn bits; other rows' commits
    candidates: torch.Tensor  # b, S, gen_width  bool
    argmax: torch.Tensor  # b, S, gen_width  the model's argmax at each pass (-1 where the row did not run)


def _stack_trace(steps: list[StepOutput], batch: int) -> PolicyTrace | None:
    """Scatter each step's running rows back into full-batch tensors and stack the steps."""
    traced = [out for out in steps if out.features is not None]
    if not traced:
        return None
    f = traced[0].features
    features = f.new_zeros((batch, len(steps), *f.shape[1:]))
    decisions = torch.zeros((batch, len(steps), f.shape[1]), dtype=torch.bool, device=f.device)
    candidates = torch.zeros_like(decisions)
    argmax = torch.full(decisions.shape, -1, dtype=torch.long, device=f.device)
    for s, out in enumerate(steps):
        if out.features is None:  # no row of this pass used the policy (its policy rows had finished)
            continue
        features[out.rows, s] = out.features
        decisions[out.rows, s] = out.decisions
        candidates[out.rows, s] = out.candidates
        argmax[out.rows, s] = out.argmax
    return PolicyTrace(features, decisions, candidates, argmax)


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    *,
    mask_id: int,
    eos_id: int,
    pad_id: int,
    eos_ids: list[int] | tuple[int, ...] = (),
    stop_at_eos: bool = True,
    return_trajectory: bool = False,
    on_step=None,
    head: torch.nn.Module | None = None,
    sample_threshold: bool = False,
    align: int | None = None,
    policy: torch.nn.Module | None = None,
    sample_commits: bool = False,
    trace_features: bool = False,
    cache_refresh: int = 0,
    answers: list[list[int]] | None = None,
) -> GenerationOutput:
    """Decode a batch of token-id prompts to completion with :func:`denoise_step`.

    ``on_step(state, step_output)`` is called after every step (progress, streaming, inspection).
    ``head``/``sample_threshold``: the threshold head for ``learned`` rows, and whether it samples.
    ``align``: the prompt layout (:class:`BatchState`); default :func:`prompt_alignment` of the model.
    ``eos_ids``: every id that ends a row besides ``eos_id`` (which fills the rest of a finished row).
    ``policy``/``sample_commits``/``trace_features``: the step policy for ``policy`` rows, whether
    they draw their commits, and whether every row's policy features are computed (:func:`init_state`);
    with ``return_trajectory`` the policy's view of every pass is returned as ``policy_trace``.
    ``cache_refresh``: with a KV cache, also refresh it every this many steps of a block (1: every step,
    which makes the cached decode exact; 0: at block starts only, Fast-dLLM's schedule).
    ``answers``: partly filled answers to complete (:func:`init_state`).
    """
    device = next(model.parameters()).device
    state = init_state(prompts, params, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, eos_ids=eos_ids,
                       device=device, stop_at_eos=stop_at_eos, head=head, sample_threshold=sample_threshold,
                       align=prompt_alignment(model) if align is None else align, policy=policy,
                       sample_commits=sample_commits, trace_features=trace_features, cache_refresh=cache_refresh,
                       answers=answers)
    if bool((state.cache > 0).any()) and not supports_kv_cache(model):
        raise ValueError(f"cache needs a native model ({type(model).__name__} takes no KV cache); use cache 'off'")
    steps = []
    while not bool(state.finished.all()):
        out = denoise_step(model, state)
        if return_trajectory:
            steps.append(out)
        if on_step is not None:
            on_step(state, out)
    result = GenerationOutput(sequences=state.generated.clone(), nfe=state.nfe.clone(), gen_length=state.gen_length,
                              threshold=state.threshold.clone(), threshold_choice=state.threshold_choice.clone(),
                              head_features=state.head_features.clone(), policy_logprob=state.policy_logprob.clone())
    if return_trajectory:
        result.commit_step, result.logprob = state.commit_step.clone(), state.logprob.clone()
        result.policy_trace = _stack_trace(steps, state.batch_size)
    return result
