"""Speculative decoding inside continuous batching: the scheduler's verify step.

A model loaded with `draft="prompt_lookup"` asks, each round, every running row
for drafts: up to `num_draft_tokens` tokens that followed the latest earlier
occurrence of the row's last n-gram in its own prompt and output
(`amlx.speculative.prompt_lookup`). When some row drafts, the round is a verify
step instead of a decode step: per shard one forward of K + 1 tokens per row
(the row's last token and its drafts, padded to the shard's widest row) at
per-row positions through the block tables (`ShardKV.verify_tables`,
`PagedLayer.update_verify`), then `amlx.speculative.verify` decides per row how
many drafts the target accepts and which token follows (greedy rows: exactly
what plain steps would emit; sampling rows: rejection sampling). Rows that
drafted nothing take a plain step inside the same pass (bit-identical to one).

The accepted tokens go out one by one through the scheduler's own emit path, so
EOS, stop strings, max_tokens and cancellation cut a row's stream exactly where
a plain run would; the row's position then moves on by the tokens emitted.
Rollback of rejected drafts is a position: their slots lie past the row's
position, unseen by every mask, and the next pass writes over them; blocks that
held only drafts go back to the pool (`ShardKV.trim`).

A draft model (`draft=PATH`, amlx/engine/draft_model.py) drafts on the device
instead, k chained steps per round. Each row's draft length adapts to its
acceptance (`AdaptiveLength`, at most `num_draft_tokens`; the cost model's
constants below are not measured yet).

Constrained rows (amlx.constrain) speculate with prompt lookup: their drafts
are walked through their matchers for per-position masks and cut at the first
one the grammar forbids (`speculative.constrained.draft_masks`); with a draft
model they draft nothing (the drafts stay on the device) but share the pass.

A speculative model's plain steps are pipelined only while no row drafts (every
adaptive length at 0: `chain_plain`); otherwise each is read before the next
round, whose drafts follow its tokens. See docs/speculative.md.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from amlx._mlx import Array, array, ops, transforms
from amlx._mlx import int32 as _INT32
from amlx.engine.draft_model import DraftModel
from amlx.engine.placement import padded_batch
from amlx.engine.pools import extend_arrays
from amlx.engine.request import Request
from amlx.kv import NULL_BLOCK, PADDING_ROW, Tables, written
from amlx.speculative.adaptive import AdaptiveLength, CostModel
from amlx.speculative.constrained import draft_masks
from amlx.speculative.draft import DraftSpec
from amlx.speculative.prompt_lookup import PromptLookup
from amlx.speculative.stats import SpeculativeStats
from amlx.speculative.verify import CompiledVerify, Drafts, Verified, VerifyParams, verify

__all__ = ["Speculator", "make_speculator"]


# Cost model of the adaptive draft length (amlx.speculative.adaptive), in plain decode steps,
# where it is not measured (EngineOptions.measure_draft_costs off: the CPU by default): a
# verify step costs 1 + VERIFY_SLOPE per drafted token (decoding is memory-bound on a GPU:
# k + 1 tokens per row cost little more than one), a draft model's step DRAFT_MODEL_COST.
# Assumptions, not measurements. Where it is measured, `Speculator._measure` times the passes.
VERIFY_SLOPE = 0.05
DRAFT_MODEL_COST = 0.1
TIMING_REPEATS = 3  # timed runs of each pass (best kept), after one untimed (trace, compile)

# A verify pass's width (K + 1 tokens per row) is rounded up to one of these (at most
# num_draft_tokens + 1), so its compiled forward is traced for a few widths, not for
# every K the rows' adaptive lengths make; the padding positions write the null block
# and their logits are never read.
VERIFY_WIDTHS = (2, 3, 5, 9, 17)


def _reproducible_draws(req: Request) -> bool:
    """A seeded sampling row keeps the fixed cost model (the constants above). Its draft
    lengths decide which verify steps its draws fall in, and a measured cost model follows
    timings and the batch's size: the same seed gave other tokens from one run to the next.
    (Greedy rows emit the same tokens whatever their lengths; unseeded ones promise nothing.)"""
    options = req.options
    return options.seed is not None and options.temperature > 0


def verify_width(drafted: int, num_draft_tokens: int) -> int:
    """The width of a verify pass whose widest row drafts `drafted` tokens (1 when none
    does: a shard whose rows' drafts were all cut takes a plain step inside the pass)."""
    if drafted == 0:
        return 1
    cap = num_draft_tokens + 1
    return min(cap, next((w for w in VERIFY_WIDTHS if w >= drafted + 1), cap))


class _Lookup:
    """A row's n-gram index and how many of its tokens (prompt, then output) it holds."""

    def __init__(self, prompt: list[int]):
        self.index = PromptLookup(prompt)
        self.seen = 0  # tokens of the request's output indexed

    def propose(self, req: Request, k: int) -> list[int]:
        if self.seen < len(req.generated):
            self.index.extend(req.generated[self.seen:])
            self.seen = len(req.generated)
        return self.index.propose(k)


@dataclass(eq=False)
class _NullRow:
    """A row at a real position whose blocks are all the null block: a timing pass over
    such rows reads and writes as much as one over real rows there, and changes nothing."""

    pos: int
    blocks: list[int] = field(default_factory=list)
    created: float = 0.0


def _best_seconds(run: Callable[[], list[Array]]) -> float:
    """The best of TIMING_REPEATS evaluations of what `run` builds (after an untimed one)."""
    ops.eval(*run())
    best = float("inf")
    for _ in range(TIMING_REPEATS):
        t0 = time.perf_counter()
        ops.eval(*run())
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass(eq=False)
class _Pass:
    """One shard's verify pass, launched and not yet read."""

    shard: Any  # the scheduler's shard (index, kv, rows, sampling)
    rows: list[Request]
    lengths: list[int]
    result: Verified
    params: VerifyParams


class Speculator:
    """Drafting and verify steps for one scheduler (worker thread), and their counters.

    `views(batch, tabs, arrays)`: each layer's view of pool arrays for a compiled
    pass (`ShardPools.pass_views`); `on(index)`: a block running on a shard's stream;
    `emit(req, token, logprob, top)`: hands one token to its request."""

    def __init__(self, spec: DraftSpec, model, views: Callable, on: Callable,
                 emit: Callable[[Request, int, float, list | None], None], draft: DraftModel | None = None,
                 compile_forward: bool = True, pad_batches: bool = False,
                 plain_pass: Callable[[Any, list], list[Array]] | None = None, adaptive: bool = True):
        if spec.kind == "model" and draft is None:
            raise ValueError(f"draft={spec.path}: the draft model was not loaded")
        self.spec = spec
        self.model = model
        self.draft = draft
        self._views, self._on, self._emit = views, on, emit
        self.grammar = None  # what makes constrained rows' matchers (its `vocab`), set by the engine
        self.stats = SpeculativeStats()
        self._compiled = CompiledVerify()
        # the verify forward, compiled as the decode step is: traced once per (padded) batch
        # size, width bucket, span (rounded as a decode pass's), pool size and stream
        self._compile_forward = compile_forward
        self._forward_fn = transforms.compile(self._forward) if compile_forward else None
        self._pad = pad_batches
        # measured cost models, per padded batch size (None: the constants above throughout);
        # plain_pass(shard, rows) builds the scheduler's decode step over rows (Scheduler._timing_pass)
        self._plain_pass = plain_pass
        self._measured: dict[int, CostModel] | None = {} if plain_pass is not None else None
        self.cost_seconds: dict[int, dict] = {}  # what was measured, per batch size (stats, tests)
        self._timing_rows: list[_NullRow] = []
        self._lookups: weakref.WeakKeyDictionary[Request, _Lookup] = weakref.WeakKeyDictionary()
        self._cost = CostModel.linear(spec.num_draft_tokens, VERIFY_SLOPE, 0.0 if draft is None else DRAFT_MODEL_COST)
        if not adaptive:  # (EngineOptions.adaptive_draft_length off) costs at which every draft pays: the full length
            self._cost = CostModel.linear(spec.num_draft_tokens, 0.0, 0.0)
        self._adaptive: weakref.WeakKeyDictionary[Request, AdaptiveLength] = weakref.WeakKeyDictionary()

    def _length(self, req: Request) -> AdaptiveLength:
        """The row's adaptive draft length (from its acceptance so far)."""
        adaptive = self._adaptive.get(req)
        if adaptive is None:
            adaptive = self._adaptive[req] = AdaptiveLength(self._cost, self.spec.num_draft_tokens)
        return adaptive

    def draft_length(self, req: Request) -> int:
        """How many tokens a row may draft now: its adaptive length (at most the option's),
        less than its consumer's buffer holds (a step emits up to k + 1) and than the
        tokens it may still make."""
        if req.matcher is not None and self.draft is not None:
            return 0  # (a draft model's drafts stay on the device: no masks for them)
        # The buffer's size, not its free room now: the room follows how fast the consumer
        # reads, and the draft lengths decide which verify steps a seeded sampling row draws
        # in, so a slow reader got other tokens than a fast one (README: a paused request
        # continues as an unpaused run, seeded sampling included). A step may then put up
        # to k tokens past max_buffer; the row pauses after it as any full row does.
        return max(0, min(self._length(req).length, req.options.max_buffer - 1, req.assembler.remaining - 1))

    def _lookup(self, req: Request, k: int) -> list[int]:
        """A row's drafts by prompt lookup (host work)."""
        lookup = self._lookups.get(req)
        if lookup is None:
            lookup = self._lookups[req] = _Lookup(req.prompt)
        return lookup.propose(req, k) if k else []

    def chain_plain(self, rows: Sequence[Request]) -> bool:
        """Whether this round may be a plain step chained on the one in flight (launched
        before that one is read, as without speculation): no row drafts now, whatever
        the tokens in flight (every adaptive length is 0, or a constrained row beside a
        draft model). Such a round ages the rows' estimates as `plan` does (once per
        round: only when it returns True), so they still probe again now and then."""
        if any(self._length(r).length > 0 and not (r.matcher is not None and self.draft is not None) for r in rows):
            return False
        self._age_idle(rows)
        return True

    def _age_idle(self, rows: Iterable[Request]) -> None:
        """A row at length 0 takes a plain step this round: its estimate drifts back to the
        prior (so it probes again now and then); a length it reaches is the next round's."""
        for r in rows:
            adaptive = self._length(r)
            if adaptive.length == 0:
                adaptive.observe(0, 0)

    def plan(self, shards: Sequence) -> list[tuple[list[int], list[list[int]] | None]] | None:
        """Per shard, its rows' draft lengths and (prompt lookup) their drafts; None when
        this round should be a plain decode step: no row drafts (or a constrained row's
        grammar vocabulary is not there to mask its drafts)."""
        if self.draft is not None:
            self.draft.sweep()
        try:
            return self._plan(shards)
        finally:
            # After the lengths are read, as in `chain_plain`. Aged before, a probe came a round
            # earlier here than in a chained round, and which rounds are chained follows the
            # consumer's pace and the batch: a seeded sampling row's draws (the verify steps
            # they fall in) followed them too.
            self._age_idle(r for s in shards for r in s.rows)

    def _plan(self, shards: Sequence) -> list[tuple[list[int], list[list[int]] | None]] | None:
        if self._vocab() is None and any(r.matcher is not None for s in shards for r in s.rows):
            return None
        if self._measured is not None:
            self._use_measured(shards)
        plan: list[tuple[list[int], list[list[int]] | None]] = []
        for shard in shards:
            lengths = [self.draft_length(r) for r in shard.rows]
            if self.draft is None:
                drafts = [self._lookup(r, k) for r, k in zip(shard.rows, lengths)]
                plan.append(([len(d) for d in drafts], drafts))
            else:
                plan.append((lengths, None))
        return plan if any(n for lengths, _ in plan for n in lengths) else None

    @property
    def cost_models(self) -> dict[int, CostModel]:
        """The measured cost models, per (padded) batch size; empty when not measured."""
        return dict(self._measured or {})

    def _use_measured(self, shards: Sequence) -> None:
        """Every row's adaptive length takes the cost model measured at the batch size of
        the widest shard, measured now if it is that size's first round."""
        shard = max(shards, key=lambda s: len(s.rows))
        b = len(shard.rows)
        size = padded_batch(b) if self._pad else b
        cost = self._measured.get(size)
        if cost is None:
            if self.draft is not None and not self.draft.has_pool(shard.index):
                return  # (its first round makes the draft's pool: measured the round after)
            cost = self._measured[size] = self._measure(shard)
        for req in (r for s in shards for r in s.rows):
            if _reproducible_draws(req):
                continue
            adaptive = self._length(req)
            if adaptive.cost is not cost:
                adaptive.use(cost)

    def _measure(self, shard) -> CostModel:
        """The cost model of a shard's batch as it stands: a plain decode step, a verify
        pass of each width bucket and (with a draft model) a draft step, each timed over
        as many rows at the rows' positions holding only the null block (the same shapes
        and traces as the real passes; nothing written but the null block). The acceptance
        rule and sampling are left out of both sides (small beside a forward)."""
        n, kv = self.spec.num_draft_tokens, shard.kv
        pos = max(r.pos for r in shard.rows)

        def rows(width: int) -> list[_NullRow]:
            blocks = [NULL_BLOCK] * -(-(pos + width) // kv.block_size)
            made = [_NullRow(pos, blocks) for _ in shard.rows]
            # kept alive: a decode table cached for them is keyed by their ids, which a
            # later object must not take over
            self._timing_rows.extend(made)
            return made

        one = rows(1)

        def draft_step() -> list[Array]:
            with self._on(shard.index):
                return self.draft.timing_step(shard.index, one)

        plain = _best_seconds(lambda: self._plain_pass(shard, one))
        verify_s = {}
        for w in sorted({verify_width(k, n) for k in range(1, n + 1)}):
            wide = rows(w)
            verify_s[w] = _best_seconds(lambda: self._timing_verify(shard, wide, w))
        draft = _best_seconds(draft_step) if self.draft is not None else 0.0
        self.cost_seconds[len(shard.rows)] = {"plain": plain, "verify": verify_s, "draft": draft}
        return CostModel.measured(n, plain, lambda k: verify_s[verify_width(k, n)], draft)

    def _timing_verify(self, shard, rows: list[_NullRow], width: int) -> list[Array]:
        """A verify forward of `width` tokens per row over null rows (built, not evaluated)."""
        kv, b = shard.kv, len(rows)
        pad = padded_batch(b) - b if self._pad else 0
        padded = [*rows, *[PADDING_ROW] * pad]
        tables = kv.verify_tables(padded, width, [width - 1] * b + [0] * pad)
        with self._on(shard.index):
            tokens = ops.zeros((b + pad, width), _INT32)
            positions = array(np.asarray([r.pos for r in padded], dtype=np.int32))
            logits, arrays = self._run_forward(tokens, positions, tables, kv)
        return [logits, *arrays]

    def step(self, shards: Sequence, plan: list[tuple[list[int], list[list[int]] | None]]) -> None:
        """One verify step over the shards (their rows all take part), launched,
        evaluated and read: tokens emitted, positions moved on, draft blocks trimmed.
        Raises MLXError if the device work fails (nothing is emitted then)."""
        passes: list[_Pass] = []
        try:
            for shard, (lengths, drafts) in zip(shards, plan):
                passes.append(self._launch(shard, lengths, drafts))
            ops.eval(*[a for p in passes for a in (*p.result.arrays(), *p.shard.sampling.state(),
                                                   *p.shard.kv.state())])
            results = [p.result.read() for p in passes]
        finally:
            for p in passes:
                p.params.close()
        for p, rows in zip(passes, results):
            self._accept(p, rows)

    def _vocab(self):
        return None if self.grammar is None else self.grammar.vocab

    def _inputs(self, shard, rows: list[Request], lengths: list[int],
                drafts: list[list[int]] | None) -> tuple[Array, Drafts, np.ndarray | None, list[int]]:
        """The verify pass's tokens (B, K + 1) (each row's last token, then its drafts),
        the `Drafts` (from the host, prompt lookup, or from the draft model), constrained
        rows' masks per position (None without) and the lengths (cut where a grammar
        forbids a draft)."""
        width = verify_width(max(lengths), self.spec.num_draft_tokens)
        host = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            host[i, 0] = r.last
            if drafts is not None:
                host[i, 1:1 + lengths[i]] = drafts[i][:lengths[i]]
        masks = None
        if any(r.matcher is not None for r in rows):
            masks, lengths = draft_masks(self._vocab(), [r.matcher for r in rows], host[:, 1:], lengths)
        if self.draft is not None and width > 1:
            with self._on(shard.index):
                tokens, probs = self.draft.propose(shard.index, rows, lengths, shard.sampling)
                pad = width - 1 - tokens.shape[1]
                if pad:  # up to the width bucket: padding drafts, never accepted (lengths)
                    tokens = ops.concatenate([tokens, ops.zeros((len(rows), pad), tokens.dtype)], axis=1)
                    if probs is not None:  # (None: greedy rows only, judged without q)
                        probs = ops.concatenate([probs, ops.zeros((len(rows), pad, probs.shape[2]), probs.dtype)],
                                                axis=1)
                last = array(np.asarray([[r.last] for r in rows], dtype=np.int32))
                return (ops.concatenate([last, tokens], axis=1), Drafts(tokens, _int32s(lengths), probs), masks,
                        lengths)
        return array(host), Drafts(array(np.ascontiguousarray(host[:, 1:])), _int32s(lengths)), masks, lengths

    def _launch(self, shard, lengths: list[int], drafts: list[list[int]] | None) -> _Pass:
        """Builds a shard's verify forward on its stream and the acceptance on the
        home stream; the shard's pool and sampling state become the pass's results."""
        rows, kv = list(shard.rows), shard.kv
        # blocks for the drafts' positions; a row the pools cannot hold drafts fewer
        lengths = [min(n, kv.extend_to(r, r.pos + n + 1) - r.pos - 1) for r, n in zip(rows, lengths)]
        if self.draft is not None:
            lengths = [self.draft.room(r, n) if n else 0 for r, n in zip(rows, lengths)]
        tokens, dr, masks, lengths = self._inputs(shard, rows, lengths, drafts)
        b, width = tokens.shape
        # padding rows (as a decode step's: the null block, position 0), so the compiled
        # forward is traced per batch bucket; their logits are cut off before `verify`
        pad = padded_batch(b) - b if self._pad else 0
        tables = kv.verify_tables([*rows, *[PADDING_ROW] * pad], width, [*lengths, *[0] * pad])
        with self._on(shard.index):
            if pad:
                tokens = ops.concatenate([tokens, ops.zeros((pad, width), tokens.dtype)], axis=0)
            positions = array(np.asarray([r.pos for r in rows] + [0] * pad, dtype=np.int32))
            logits, _ = self._run_forward(tokens, positions, tables, kv)
            if pad:
                logits = ops.slice(logits, (0, 0, 0), (b, width, logits.shape[2]))
        return _Pass(shard, rows, lengths, *self._accept_graph(shard, logits, dr, masks))

    def _run_forward(self, tokens: Array, positions: Array, tables: Tables, kv) -> tuple[Array, list[Array]]:
        """The verify forward (compiled where it is) over a shard's pool `kv`, which takes
        the written arrays: (logits (B, W, V), those arrays)."""
        forward = self._forward_fn if self._forward_fn is not None else self._forward
        logits, arrays = forward(tokens, positions, extend_arrays(tables), kv.arrays)
        # the old arrays' only holder is now the graph, so MLX may write them in place
        kv.arrays = arrays
        return logits, arrays

    def _forward(self, tokens: Array, positions: Array, tabs: list[Array],
                 arrays: list[Array]) -> tuple[Array, list[Array]]:
        """A verify forward as a pure function of arrays (what gets compiled): tokens
        (B, W), positions (B,), the tables' gather pieces and write slots
        (`ShardKV.verify_tables`, as `extend_arrays` lists them), each layer's pool
        array -> (logits (B, W, V), the pool arrays written)."""
        views = self._views(tokens.shape[0], tabs, arrays)
        return self.model(tokens, views, positions), written(views)

    def weights_changed(self) -> None:
        """The model's weights were replaced: the compiled forward traced the old ones."""
        if self._forward_fn is not None:
            self._forward_fn.close()
            self._forward_fn = transforms.compile(self._forward)

    def _accept_graph(self, shard, logits: Array, drafts: Drafts, masks: np.ndarray | None):
        """`verify` of a shard's pass (the graph, not evaluated); the shard's sampling
        state takes its results."""
        sampling = shard.sampling
        params = VerifyParams.build(sampling.params, logits.shape[1])
        history, counts = sampling.penalty_state(logits.shape[2])
        result = verify(logits, drafts, params, sampling.keys, history, counts, masks, compiled=self._compiled)
        sampling.adopt(result.keys, result.history, result.counts)
        return result, params

    def _accept(self, p: _Pass, results) -> None:
        """Emits each row's tokens one by one (a row that ends stops taking them) and
        moves its position on by the tokens emitted: its last token and the accepted
        drafts are in the cache, the rest is rolled back."""
        for req, n_drafts, res in zip(p.rows, p.lengths, results):
            emitted = 0
            for i, tok in enumerate(res.tokens):
                if not req.active:
                    break
                self._emit(req, tok, float(res.logprobs[i]), None if res.top is None else res.top[i])
                emitted += 1
            if self.draft is not None:
                self.draft.settle(req, req.pos, n_drafts, res.accepted)
            req.pos += emitted
            req.steps += 1
            p.shard.kv.trim(req)
            self.stats.record(n_drafts, res.accepted)
            if n_drafts:
                self._length(req).observe(n_drafts, res.accepted)

    def recover(self) -> None:
        """After a failed verify step: the draft model's pools are checked (DraftModel.recover)."""
        if self.draft is not None:
            self.draft.recover()

    def release(self, req: Request) -> None:
        """A request has ended: what the speculation kept for it goes."""
        self._lookups.pop(req, None)
        self._adaptive.pop(req, None)
        if self.draft is not None:
            self.draft.release(req)

    def close(self) -> None:
        self._compiled.close()
        if self._forward_fn is not None:
            self._forward_fn.close()
        if self.draft is not None:
            self.draft.close()


def make_speculator(options, model, views: Callable, placement, emit: Callable, draft_model=None,
                    vocab_size: int | None = None, compile_forward: bool = True,
                    plain_pass: Callable | None = None) -> Speculator | None:
    """The scheduler's speculator for resolved EngineOptions (None without `draft`):
    with a draft model, its pools (one per shard) are made here."""
    spec = DraftSpec.from_options(options.draft, options.num_draft_tokens)
    if spec is None:
        return None
    draft = None
    if draft_model is not None:
        if vocab_size is None:
            raise ValueError("a draft model needs the target's vocab_size")
        draft = DraftModel(draft_model, options, options.shards, vocab_size, compile_step=compile_forward)
    adaptive = options.adaptive_draft_length is not False
    measure = plain_pass if options.measure_draft_costs and adaptive else None
    return Speculator(spec, model, views, placement.on, emit, draft, compile_forward=compile_forward,
                      pad_batches=bool(options.pad_batches), plain_pass=measure, adaptive=adaptive)


def _int32s(values: list[int]) -> Array:
    return array(np.asarray(values, dtype=np.int32))
