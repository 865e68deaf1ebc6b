"""The batch a masked decode runs on: :class:`BatchState`, built by :func:`init_state`, and its layout.

Every row of a :class:`BatchState` is a left-padded prompt followed by its generation region of ``gen_length``
mask tokens (rows with a shorter ``gen_length`` than the widest are right-padded with attention off, so they see
exactly what they would see alone). Each row has its own seeded generator, so a row's output does not depend on
the rest of the batch; rows join and leave between steps (:meth:`BatchState.concat`, :meth:`BatchState.select`),
which pad or trim the canvas and the stored keys/values alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from diffpo_serve.dllm.kv_cache import KVCache
from diffpo_serve.dllm.sampler.params import TOP_LOGPROBS, CacheMode, Sampler, SamplingParams

#: the per-row fields indexed by generation position (dim 1), with the value a padded column holds
GEN_FIELDS = {"commit_step": -1, "logprob": 0.0, "prev_argmax": -1, "model_logprob": float("nan"), "top_ids": -1,
              "top_logprob": float("nan")}


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
    sampler: torch.Tensor  # b  Sampler values
    threshold: torch.Tensor  # b  float; NaN until the head has chosen (sampler `learned`)
    temperature: torch.Tensor  # b  float
    top_p: torch.Tensor  # b  float
    block: torch.Tensor  # b  current block index
    block_step: torch.Tensor  # b  forward passes taken in the current block
    nfe: torch.Tensor  # b  forward passes this row took part in
    finished: torch.Tensor  # b  bool
    commit_step: torch.Tensor  # b, gen_width  step (0-based, the row's own count) of each commit; -1 = none
    logprob: torch.Tensor  # b, gen_width  log-prob of the committed token under the sampling distribution
    # rows with ``logprobs`` (SamplingParams): each committed token's log-prob under the model's distribution
    # (policy_logprobs: the mask excluded, before temperature and top_p) at the pass that committed it, and that
    # pass's TOP_LOGPROBS most likely tokens there; NaN / -1 where nothing is recorded
    record_logprobs: torch.Tensor  # b  bool
    model_logprob: torch.Tensor  # b, gen_width  float
    top_ids: torch.Tensor  # b, gen_width, TOP_LOGPROBS  long, most likely first; -1 = none
    top_logprob: torch.Tensor  # b, gen_width, TOP_LOGPROBS  float
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
    # KV cache (:mod:`.cache`): per-row mode, the block whose start the row's keys/values were
    # computed at (-1: none yet), the keys/values themselves (canvas columns), and an extra refresh period
    cache: torch.Tensor | None = None  # b  CacheMode values
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
                       **{k: getattr(self, k)[:, :right] for k in GEN_FIELDS},
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
            for k, fill in GEN_FIELDS.items():
                v = getattr(s, k)
                parts[k].append(torch.cat([v, v.new_full((b, right, *v.shape[2:]), fill)], 1))
            kvs.append(None if s.kv is None else s.kv.pad_columns(split, left, right))
            for k in parts:
                if k not in ("canvas", "attention_mask", *GEN_FIELDS):
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
    features of every row (:class:`~.step.StepOutput`), e.g. to collect training data from other samplers.
    ``answers``: per row, the answer to start from (``gen_length`` ids: a token where one is given, ``mask_id``
    where the sampler decodes); default all masked. Given tokens stay as they are (infilling). A row decodes only
    the blocks that hold a masked position: a block already full is skipped, wherever it stands.
    """
    params = _row_params(prompts, params, mask_id, head, policy)
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    canvas, attention, pw = _layout(prompts, params, answers, mask_id, pad_id, align)
    b = len(prompts)

    def col(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    num_blocks = [-(-p.gen_length // p.block_length) for p in params]
    # each row starts at its first block with something to decode (block 0 of an all-masked answer)
    first_block = first_masked_block(canvas[:, pw:], mask_id, torch.tensor([p.gen_length for p in params]),
                                     torch.tensor([p.block_length for p in params]))
    gw = canvas.shape[1] - pw
    return BatchState(
        canvas=canvas.to(device), attention_mask=attention.to(device), prompt_width=pw,
        gen_length=col([p.gen_length for p in params], torch.long),
        block_length=col([p.block_length for p in params], torch.long),
        steps_per_block=col([p.steps // n if p.steps else p.block_length for p, n in zip(params, num_blocks)],
                            torch.long),
        sampler=col([Sampler[p.sampler.upper()] for p in params], torch.long),
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
        record_logprobs=col([p.logprobs for p in params], torch.bool),
        model_logprob=torch.full((b, gw), float("nan"), device=device),
        top_ids=torch.full((b, gw, TOP_LOGPROBS), -1, dtype=torch.long, device=device),
        top_logprob=torch.full((b, gw, TOP_LOGPROBS), float("nan"), device=device),
        prev_argmax=torch.full((b, gw), -1, dtype=torch.long, device=device),
        policy_logprob=torch.zeros(b, dtype=torch.float, device=device),
        policy=policy, sample_commits=sample_commits, trace_features=trace_features,
        generators=_generators(params, sample_threshold, sample_commits), head=head,
        sample_threshold=sample_threshold, mask_id=mask_id, eos_id=eos_id,
        pad_id=pad_id, eos_ids=tuple(dict.fromkeys([int(eos_id), *(int(i) for i in eos_ids)])),
        stop_at_eos=stop_at_eos, align=align,
        cache=col([CacheMode[p.cache.upper()] for p in params], torch.long),
        cache_block=torch.full((b,), -1, dtype=torch.long, device=device), cache_refresh=cache_refresh,
    )


def _row_params(prompts: list, params, mask_id: int, head, policy) -> list[SamplingParams]:
    """One resolved :class:`SamplingParams` per prompt (a single one is shared), the policy's operating point
    filled in; raises ValueError for what this batch cannot decode."""
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
    return [replace(p, threshold=policy.threshold) if p.sampler == "policy" and p.threshold is None else p
            for p in params]


def _layout(prompts: list, params: list[SamplingParams], answers, mask_id: int, pad_id: int,
            align: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The batch's canvas and attention mask (b, prompt width + generation width) and the prompt width: each
    prompt left-padded (with ``align``: first, then padding), each answer region masked (or the given answer)."""
    b = len(prompts)
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
    return canvas, attention, pw


def _generators(params: list[SamplingParams], sample_threshold: bool, sample_commits: bool) -> list:
    """Each row's seeded generator, or None for a row that draws nothing: a row draws tokens when T > 0, its gamma
    when it samples one from the head (so greedy rollouts can still explore thresholds: their outcome then depends
    on gamma alone), its commits when it samples the step policy's."""
    generators = []
    for p in params:
        if p.temperature > 0 or (sample_threshold and p.sampler == "learned" and p.threshold is None) \
                or (sample_commits and p.sampler == "policy"):
            g = torch.Generator()
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ())))
            generators.append(g)
        else:
            generators.append(None)
    return generators

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
