"""One pass of the masked sampler over a batch: :func:`denoise_step`, in named phases.

Each :func:`denoise_step` runs one forward pass over the unfinished rows and commits, in each row's current block,
the masked tokens chosen by that row's sampler (:mod:`.params`, :mod:`.rules`). Generation is semi-autoregressive
in blocks of ``block_length`` (LLaDA, arXiv 2502.09992, sec. 2.4). The phases: :func:`_plan` (which columns the pass
computes), :func:`_run_model` (the forward, through the KV cache of :mod:`.cache`), :func:`_draw` (the policy's
distributions, the threshold head's choice, each position's token and score), :func:`_decide` (the commit rule, or
the step policy's decisions), :func:`_write_back` (tokens, commit steps, log-probs, blocks, the finish rule) and
:func:`_record_argmax` (what the policy's ``unchanged`` feature reads next pass).

A step materialises logits for each row's current block only, and of a greedy row's block only at its
still-masked columns (:func:`masked_columns`; the model's logits stay in its dtype until the float32 softmax), so
its memory grows with the block, not the answer (``benchmarks/step_memory.py``). The one exception is a
``learned`` row's first pass (the head reads the whole answer's entropies). The policy's features, decisions and
draws are computed at the block's columns and handed out in generation positions (:class:`StepOutput`); its
``unchanged`` feature compares a column's argmax with the previous pass's in the same block (none at a block's
first pass), so a policy row computes nothing beyond its block either (``benchmarks/policy_cost.py``).

A row finishes when its text is determined: every block is committed, or an EOS (any of the state's ``eos_ids``:
chat models end a turn with their own token) is committed with no mask before it (the positions after it are then
filled with ``eos_id``, the first of them; their ``commit_step`` stays -1). Finished rows take no further passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffpo_serve.dllm.kv_cache import gather_columns
from diffpo_serve.dllm.sampler.cache import step_logits
from diffpo_serve.dllm.sampler.params import TOP_LOGPROBS, Sampler
from diffpo_serve.dllm.sampler.rules import (entropy_before, greedy_tokens, policy_logprobs, remasking_confidence,
                                             sampling_logprobs, select_commits, transfer_counts)
from diffpo_serve.dllm.sampler.state import BatchState, first_masked_block
from diffpo_serve.dllm.step_policy import decision_logprob, policy_commits, token_features, top2_margin


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


def _to_generation(values: torch.Tensor, row_index: torch.Tensor, cols: torch.Tensor, in_block: torch.Tensor,
                   gw: int) -> torch.Tensor:
    """Block-position values (r, K, ...) back to generation positions (r, gw, ...), zero (False) outside
    the block."""
    out = values.new_zeros((values.shape[0], gw, *values.shape[2:]))
    out[row_index[in_block], cols[in_block]] = values[in_block]
    return out


# ----------------------------------------------------------------------------- the step, phase by phase

@dataclass
class _Pass:
    """Where one pass works, for its running rows (r of them): their canvas, and in generation positions their
    block's columns whose logits are computed (``cols``, r x K, ``in_block`` marking the real ones)."""

    rows: torch.Tensor
    canvas: torch.Tensor
    attention: torch.Tensor
    positions: torch.Tensor
    gen: torch.Tensor  # r, gen_width  the rows' generation regions (a view of ``canvas``)
    pending: torch.Tensor  # r  `learned` rows in their first pass: the head chooses gamma now
    policy_rows: torch.Tensor  # r  rows with sampler `policy`
    traced: torch.Tensor  # r  rows whose step-policy features this pass computes
    features: bool  # the pass computes step-policy features (a `policy` row, or trace_features)
    want_hidden: bool  # ... and the policy reads hidden states
    block_cols: torch.Tensor
    block_start: torch.Tensor
    block_end: torch.Tensor
    cols: torch.Tensor
    in_block: torch.Tensor


def _plan(state: BatchState, rows: torch.Tensor) -> _Pass:
    """Phase 1: the columns this pass computes. Logits only where they are read: a greedy row's masked block
    columns; traced rows keep their whole block (the policy's features name block positions), and so do sampling
    rows (their generator draws one token per block position, so a row's random stream, and thus its output, stays
    what it is alone and in any batch). Nothing beyond the block: the policy's `unchanged` feature compares with the
    previous pass's argmax in the same block."""
    canvas = state.canvas[rows]
    attention = state.attention_mask[rows]
    policy_rows = state.sampler[rows] == Sampler.POLICY
    features = bool(policy_rows.any()) or state.trace_features
    gen = canvas[:, state.prompt_width:]
    block_cols, in_block, block_start, block_end = block_columns(state, rows)  # r, K
    traced = policy_rows | state.trace_features
    keep = traced | (state.temperature[rows] > 0)
    cols, in_block = masked_columns(gen, block_cols, in_block, state.mask_id, keep=keep)
    return _Pass(rows=rows, canvas=canvas, attention=attention,
                 positions=(attention.long().cumsum(-1) - 1).clamp(min=0), gen=gen,
                 pending=state.threshold[rows].isnan(), policy_rows=policy_rows, traced=traced, features=features,
                 want_hidden=features and state.policy is not None and state.policy.uses_hidden,
                 block_cols=block_cols, block_start=block_start, block_end=block_end, cols=cols, in_block=in_block)


@dataclass
class _Logits:
    """Phase 2's result: the logits at the pass's block columns (r, K, V, the model's dtype), the hidden states the
    policy reads there, and for a head's first pass the prompt's hidden states and the answer's entropies."""

    logits: torch.Tensor
    index_hidden: torch.Tensor | None
    hidden: torch.Tensor | None = None
    answer_entropy: torch.Tensor | None = None


def _run_model(model: torch.nn.Module, state: BatchState, p: _Pass) -> _Logits:
    """Phase 2: the forward pass (through the KV cache where rows use one). A head's first pass reads the
    entropies over the whole answer: all its logits this once."""
    pw, gw = state.prompt_width, state.gen_width
    index_hidden_rows = p.traced if p.want_hidden else None
    hidden = answer_entropy = None
    if bool(p.pending.any()):
        answer = torch.arange(gw, device=p.gen.device).expand(len(p.rows), gw)
        logits, hidden, answer_hidden = step_logits(model, state, p.rows, p.canvas, p.attention, p.positions,
                                                    pw + answer, p.pending, index_hidden=index_hidden_rows)
        answer_entropy = torch.special.entr(policy_logprobs(logits[p.pending], state.mask_id).exp()).sum(-1)
        logits = logits.gather(1, p.cols[..., None].expand(-1, -1, logits.shape[-1]))
        index_hidden = gather_columns(answer_hidden, p.cols) if p.want_hidden else None
    else:
        logits, _, index_hidden = step_logits(model, state, p.rows, p.canvas, p.attention, p.positions, pw + p.cols,
                                              index_hidden=index_hidden_rows, block_index=pw + p.block_cols)
    return _Logits(logits, index_hidden, hidden, answer_entropy)


@dataclass
class _Draws:
    """Phase 3's result, in block positions (r, K): each position's token, the argmax, the score the commit rule
    ranks by, the policy's confidence, entropy and probabilities (None in a lean pass), and log q of the token."""

    tokens: torch.Tensor
    argmax: torch.Tensor
    score: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    probs: torch.Tensor | None
    token_logprob: torch.Tensor
    recorded: tuple | None = None  # rows with ``logprobs``: (model log-prob, top ids, top log-probs), _recorded


def _draw(state: BatchState, p: _Pass, out: _Logits) -> _Draws:
    """Phase 3: the policy's distributions, the head's choice of gamma (first passes), each position's token
    (the argmax, or a draw with the row's generator) and the scores. `steps` rows rank by LLaDA's score, from the
    logits in their own dtype (remasking_confidence): greedy rows now, rows that draw their tokens once drawn. A
    batch of greedy `steps` rows with no step-policy features needs nothing else from the vocabulary (lean): its
    tokens are the argmax and its score LLaDA's; the policy's log-probs, probabilities and entropies (four more
    passes over r x K x V values) are not built."""
    rows, logits = p.rows, out.logits
    r = len(rows)
    steps_rows = (state.sampler[rows] == Sampler.STEPS).nonzero().squeeze(-1)
    drawing = state.temperature[rows][steps_rows] > 0
    scored = steps_rows[~drawing]
    steps_score = None if len(scored) == 0 else remasking_confidence(logits if len(scored) == r else logits[scored])
    drawn_logits = logits[steps_rows[drawing]] if bool(drawing.any()) else None
    temperature, top_p = state.temperature[rows], state.top_p[rows]
    greedy = bool((temperature == 0).all())
    tokens = greedy_tokens(logits, state.mask_id)
    argmax = tokens.clone()
    lean = greedy and len(steps_rows) == r and not p.features
    recording = state.record_logprobs[rows]
    recorded_logp = None  # the policy's log-probs of the rows that record them (n, K, V)
    if lean:
        if bool(recording.any()):
            recorded_logp = policy_logprobs(logits[recording], state.mask_id)
        out.logits = logits = None
        probs = logq = None
        confidence = entropy = torch.zeros(tokens.shape, device=tokens.device)  # read by no `steps` row
    else:
        # r, K, V in float32 (the model's dtype may be half); never the mask: a row could stall on it
        logp = policy_logprobs(logits, state.mask_id)
        out.logits = logits = None
        if bool(recording.any()):
            recorded_logp = logp[recording]
        probs = logp.exp()
        entropy = torch.special.entr(probs).sum(-1)  # -sum p log p, with 0 log 0 = 0 (no NaN on saturated rows)
        # the behaviour distribution q; at T = 1 without a nucleus it is the policy itself, computed above; greedy
        # rows' q is the point mass on the argmax (log q = 0 at the committed token): not built for a greedy batch
        logq = None if greedy else sampling_logprobs(logp, temperature, top_p) \
            if bool(((temperature != 1) | (top_p < 1)).any()) else logp
    if bool(p.pending.any()):  # before any threshold is read below
        _choose_thresholds(state, rows[p.pending], out.hidden, p.attention[p.pending], out.answer_entropy)
    _draw_tokens(state, p, tokens, logq)
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
    recorded = None if recorded_logp is None else _recorded(recorded_logp, tokens, recording)
    return _Draws(tokens, argmax, score, confidence, entropy, probs, token_logprob, recorded)


def _recorded(logp: torch.Tensor, tokens: torch.Tensor, recording: torch.Tensor):
    """What rows with ``logprobs`` record of this pass, for all r rows in block positions (NaN / -1 in rows that
    record nothing): each position's token's log-prob under the model (``logp``, the recording rows' policy
    log-probs, n x K x V) and the :data:`TOP_LOGPROBS` most likely tokens with theirs (fewer in a smaller
    vocabulary; the mask token, never drawn, is never among them)."""
    r, k = tokens.shape
    top = min(TOP_LOGPROBS, logp.shape[-1])
    token_lp = torch.full((r, k), float("nan"), device=logp.device)
    top_lp = torch.full((r, k, TOP_LOGPROBS), float("nan"), device=logp.device)
    top_ids = torch.full((r, k, TOP_LOGPROBS), -1, dtype=torch.long, device=logp.device)
    token_lp[recording] = logp.gather(-1, tokens[recording][..., None]).squeeze(-1)
    values, ids = logp.topk(top, dim=-1)
    possible = values > float("-inf")  # the mask (and nothing else) has probability 0
    top_lp[recording, :, :top] = torch.where(possible, values, float("nan"))
    top_ids[recording, :, :top] = torch.where(possible, ids, -1)
    return token_lp, top_ids, top_lp


def _draw_tokens(state: BatchState, p: _Pass, tokens: torch.Tensor, logq: torch.Tensor | None) -> None:
    """Each sampling row's tokens, drawn from q with its generator (in place of the argmax in ``tokens``), for
    the row's own block positions only: the batch's width must not matter."""
    for i, row in enumerate(p.rows.tolist()):
        g = state.generators[row]
        if g is not None and state.temperature[row] > 0:
            n = int(p.block_end[i] - p.block_start[i])
            drawn = torch.multinomial(logq[i, :n].exp().cpu(), 1, generator=g).squeeze(-1)
            tokens[i, :n] = drawn.to(tokens.device)


def _decide(state: BatchState, p: _Pass, out: _Logits, d: _Draws):
    """Phase 4: which candidates each row commits (its sampler's rule, or the step policy's), and the policy's
    features and decisions; raises when a row would commit nothing (the decode would never end). Returns
    (candidates, commit, features, decisions), r x K."""
    rows = p.rows
    candidates = (p.gen.gather(1, p.cols) == state.mask_id) & p.in_block
    num_transfer = transfer_counts(p.block_end - p.block_start, state.steps_per_block[rows], state.block_step[rows])
    layout = (p.cols, p.attention[:, :state.prompt_width].sum(-1), state.gen_length[rows])  # for topk's ties
    commit = select_commits(d.score, d.entropy, candidates, state.sampler[rows], state.threshold[rows],
                            num_transfer, layout)  # r, K
    features = decisions = None
    if p.features:
        features, decisions, commit = _policy_step(state, rows, p.policy_rows, d.probs, d.confidence, d.entropy,
                                                   candidates, d.argmax, p.cols, p.block_end - p.block_start,
                                                   out.index_hidden if p.want_hidden else None, commit)
    stuck = candidates.any(-1) & ~(commit & candidates).any(-1)
    if bool(stuck.any()):  # every rule commits >= 1 candidate per pass; without it the decode would never end
        raise RuntimeError(f"sampler made no progress: row(s) {rows[stuck].tolist()} committed nothing this pass "
                           f"(samplers {state.sampler[rows][stuck].tolist()})")
    return candidates, commit, features, decisions


def _write_back(state: BatchState, p: _Pass, commit: torch.Tensor, d: _Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 5: the committed tokens, their commit step and log q (and what rows with ``logprobs`` record) into
    the state (from block positions back to generation positions); the rows' counters and blocks advanced; a row
    finished when its last block is done or an EOS is committed with no mask before it (the masks after it then
    become ``eos_id``). Returns (committed (r, gen_width) bool, finished (r,))."""
    rows, cols, in_block = p.rows, p.cols, p.in_block
    r, width = cols.shape
    step_index = state.nfe[rows]
    row_index = torch.arange(r, device=cols.device)[:, None].expand(r, width)
    at = (row_index[commit], cols[commit])
    gen = p.gen.clone()
    gen[at] = d.tokens[commit]
    committed = torch.zeros_like(gen, dtype=torch.bool)
    committed[at] = True
    commit_step, logprob = state.commit_step[rows], state.logprob[rows]
    commit_step[at] = step_index[:, None].expand(r, width)[commit]
    logprob[at] = d.token_logprob[commit].to(logprob.dtype)
    if d.recorded is not None:
        for name, values in zip(("model_logprob", "top_ids", "top_logprob"), d.recorded):
            field = getattr(state, name)
            kept = field[rows]
            kept[at] = values[commit].to(kept.dtype)
            field[rows] = kept
    block, block_step = state.block[rows], state.block_step[rows] + 1
    block_done = ~(gen.gather(1, cols).eq(state.mask_id) & in_block).any(-1)
    gen_length, block_length = state.gen_length[rows], state.block_length[rows]
    block = torch.where(block_done, first_masked_block(gen, state.mask_id, gen_length, block_length), block)
    block_step = torch.where(block_done, torch.zeros_like(block_step), block_step)
    all_done = block * block_length >= gen_length
    if state.stop_at_eos:
        gen, eos_done = _stop_at_eos(state, gen)
        all_done = all_done | eos_done
    state.canvas[rows, state.prompt_width:] = gen
    state.commit_step[rows] = commit_step
    state.logprob[rows] = logprob
    state.nfe[rows] = step_index + 1
    state.block[rows] = block
    state.block_step[rows] = block_step
    state.finished[rows] = all_done
    return committed, all_done


def _stop_at_eos(state: BatchState, gen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (r, gen_width) whose text is determined by an EOS (any of ``eos_ids``) with no mask before it,
    their later masks filled with ``eos_id``; and which rows those are (r,)."""
    masked = gen == state.mask_id
    mask_before = masked.long().cumsum(-1) - masked.long()
    is_eos = torch.isin(gen, torch.tensor(state.eos_ids or (state.eos_id,), device=gen.device))
    eos_done = (is_eos & (mask_before == 0)).any(-1)
    return torch.where(eos_done[:, None] & masked, torch.full_like(gen, state.eos_id), gen), eos_done


def _record_argmax(state: BatchState, p: _Pass, argmax: torch.Tensor):
    """Phase 6: this pass's argmax where it was computed (the block), in generation positions, kept as the rows'
    ``prev_argmax`` (the policy's `unchanged` feature) and returned."""
    rows, cols, in_block = p.rows, p.cols, p.in_block
    r, width = cols.shape
    full_argmax = torch.full_like(p.gen, -1)
    row_index = torch.arange(r, device=cols.device)[:, None].expand(r, width)
    full_argmax[row_index[in_block], cols[in_block]] = argmax[in_block]
    prev = state.prev_argmax[rows]
    state.prev_argmax[rows] = torch.where(full_argmax >= 0, full_argmax, prev)
    return full_argmax


@torch.no_grad()
def denoise_step(model: torch.nn.Module, state: BatchState) -> StepOutput:
    """One forward pass over the unfinished rows of ``state``; updates the state in place.

    Logits are materialised for each row's current block only (and, in a ``learned`` row's first pass, for
    its whole answer, whose entropies the threshold head reads); the step's maths runs in block positions.
    Phases: plan the columns, run the model, draw tokens and scores, decide the commits, write them back,
    record the argmax."""
    rows = (~state.finished).nonzero().squeeze(-1)
    gw = state.gen_width
    if len(rows) == 0:
        return StepOutput(rows, state.commit_step.new_zeros((0, gw), dtype=torch.bool),
                          state.finished.new_zeros(0))
    plan = _plan(state, rows)
    logits = _run_model(model, state, plan)
    draws = _draw(state, plan, logits)
    candidates, commit, features, decisions = _decide(state, plan, logits, draws)
    committed, finished = _write_back(state, plan, commit, draws)
    argmax = _record_argmax(state, plan, draws.argmax)
    if features is None:
        return StepOutput(rows=rows, committed=committed, newly_finished=finished)
    r, width = plan.cols.shape
    row_index = torch.arange(r, device=plan.cols.device)[:, None].expand(r, width)
    return StepOutput(rows=rows, committed=committed, newly_finished=finished,
                      features=_to_generation(features, row_index, plan.cols, plan.in_block, gw),
                      decisions=_to_generation(decisions, row_index, plan.cols, plan.in_block, gw),
                      candidates=_to_generation(candidates, row_index, plan.cols, plan.in_block, gw),
                      argmax=argmax)
