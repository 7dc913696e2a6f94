"""Continuous batching for one model, run by the worker thread.

Requests arrive in `incoming` (any thread), wait in arrival order, are
prefilled one chunk per step on a cache of their own, then join the running
batch: one batched decode step per round for every running request whose
consumer has room. Finished and cancelled requests leave the batch at once and
their cache rows are freed. While the batch is busy, waiting requests may wait a few
steps for others, to join together (amlx/engine/admission.py).

Backpressure: a request whose consumer has `max_buffer` unread tokens is paused.
It leaves the decode batch before the next step (its cache row moves out to a
cache of its own: it costs the step nothing) and is "parked"; it keeps its batch
slot for `slot_idle_limit` seconds, after which waiting requests may take the
slot. When its consumer reads again it rejoins the batch (at once while it holds
its slot, else when a slot is free, ahead of new requests) with its cache and
sampling state as they were, so its tokens are those of an unpaused run.

Device state of the batch: each shard's KV block pool (amlx/kv/): per layer
one array of fixed-size blocks; each request holds a block table, and a step
stacks the tables of its rows. Per-row positions go in as an int32 array each
step, so rows of any length decode together. A row joining or leaving copies
no other row's cache: only the tables stacked change. A parked request keeps
its blocks, until its slot has lapsed and a waiting request needs them: it then
gives them back and is recomputed once read again. Full prompt blocks are
cached by their tokens' chained hash, and a new request reuses the longest
cached prefix (prefix caching). When a shard's
pool has no room for its rows' next blocks, the youngest row is preempted: its
blocks go back (its full blocks stay cached) and it is queued again, to be
recomputed from its prompt and the tokens it has produced; its stream goes on
without a gap. New requests wait while the pool cannot hold their prompt.

The running batch may be split into shards (EngineOptions.shards, default 1):
each shard has its own rows, caches and sampling state, and its prefill and
decode steps run on an MLX stream of its own, so on the CPU the shards compute
on different cores at once. A round launches every shard's step together. One
shard is the default on the CPU too: amlx's CPU kernels spread a decode step's
products over every core and read each weight once for all rows. A pass that one
shard alone runs (prompts that all go to one shard; a lone request's decode step
where amlx's CPU kernels run on one thread, see Placement.split_decode) has its
matmuls split over the CPU's streams (nn.split_layers; MLX's BLAS computes a
call on one core). On a GPU there is one stream.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from amlx._mlx import Array, array, ops, transforms
from amlx._mlx import device as mxdevice
from amlx._mlx import int32 as _int32
from amlx._mlx.pinned import HostBuffers
from amlx.constrain import MaskJob, step_masks
from amlx.engine.admission import JoinPolicy
from amlx.engine.placement import GPU_PREFILL_CHUNK, EngineOptions, Placement, padded_batch
from amlx.engine.pacing import pacer_for, segment_layers, segment_setting
from amlx.engine.prefill_budget import pass_budget
from amlx.engine.pools import ShardPools, extend_arrays, table_arrays
from amlx.kv import PADDING_ROW, ShardKV, Tables, preemption_order, read_views, written
from amlx.engine.notify import flush_wakeups
from amlx.engine.rate import RateMeter
from amlx.engine.timing import StepTiming, step_timing_enabled
from amlx.engine.speculate import make_speculator
from amlx.engine.request import Request
from amlx.sample import BatchSampling, CompiledSteps, StepSample, upload_masks
from amlx.models.nn import split_layers
from amlx.env import env_choice
from amlx.errors import AmlxError, ClosedError, ConstraintError, ContextLengthError, MLXError
from amlx.types import Token

PREFILL_CHUNK = GPU_PREFILL_CHUNK  # the largest default prefill chunk (EngineOptions.prefill_chunk)
# Prefill passes of at most this many tokens behind a cached prefix run as a compiled
# "extend" pass where the options say so (EngineOptions.extend_pass; Scheduler._extend_pass).
EXTEND_MAX = 256
EXTEND_MIN = 16  # the smallest padded length of an extend pass (lengths go up in powers of two)
# A read of step t that waited longer than this (seconds) for the device finds it the bottleneck:
# constrained shards then launch their forwards before reading (Scheduler._step_constrained).
DEVICE_BOUND_WAIT = 0.001
# With AMLX_STEP_TIMING, a step that waited longer than this (seconds) for its masks is counted
# apart ("slow_masks"), to tell a few long waits (a cold grammar state) from a short one every step.
SLOW_MASKS = 0.002


def _extend_tokens(length: int) -> int:
    """An extend pass's token width for `length` new tokens: a power of two, at least
    EXTEND_MIN (few widths, so the pass is traced for few shapes)."""
    width = EXTEND_MIN
    while width < length:
        width *= 2
    return width


def _masks_uploaded_on_thread() -> bool:
    """Where the mask thread fills a step's masks, it also makes their device arrays
    (`sample.upload_masks`), so the copy is off the worker's path (on the H200 the worker's
    build of the masked sampling step went from 0.83 to 0.22 ms a step with 64 constrained
    rows; benchmarks/README.md). AMLX_MASK_UPLOAD=worker has the worker upload them as it
    builds the sampling step instead (benchmarks/run_gpu.sh structured-ab compares). Read once."""
    return env_choice("AMLX_MASK_UPLOAD", ("thread", "worker"), "thread") == "thread"


def _mask_copy() -> str:
    """How the mask thread uploads a step's masks (AMLX_MASK_COPY): `pinned` (the default),
    the CUDA driver's copy from a page-locked array llguidance filled (`_mlx.pinned.HostBuffers`;
    elsewhere, where there is no driver, an ordinary array and MLX's copy); `mlx`, MLX's copy
    of a fresh array; `driver`, the driver's copy from a fresh (pageable) array. On an H100 the
    2 MB upload took 0.17-0.20 ms pinned against 0.90-1.06 with MLX's copy, without slowing
    the worker's launch meanwhile, which the driver's copy from pageable memory did by as
    much as it saved (2026-12-06, benchmarks/README.md). Read once."""
    return env_choice("AMLX_MASK_COPY", ("mlx", "driver", "pinned"), "pinned")


def _build_before_read() -> bool:
    """Whether constrained shards stepping after step t's read build their forwards before
    it (the default) or after it, as before 2026-12-05 (AMLX_MASK_BUILD=after, for
    benchmarks/run_gpu.sh structured-ab to compare). Read once."""
    return env_choice("AMLX_MASK_BUILD", ("before", "after"), "before") == "before"


def _masks_start() -> str:
    """When a step's masks start (AMLX_MASK_START; read once):
    - `advance` (the default): as soon as this thread's matchers took step t's tokens, before
      the tokens go to their requests;
    - `thread`: at once after the read, the mask thread's matchers taking the tokens first,
      and the tokens go to their requests once the masked sampling is launched (this thread
      then goes straight from the read to launching the forward, where it lets the GIL go);
    - `emit`: once the tokens went to their requests (as before 2026-12-06)."""
    return env_choice("AMLX_MASK_START", ("advance", "thread", "emit"), "advance")


def _pinned_mask_order() -> bool | None:
    """AMLX_MASK_ORDER=forward or =read pins the constrained shards' order (benchmarks compare
    the two; `_step_constrained`); unset or "auto", the scheduler picks it by what it measures."""
    order = os.environ.get("AMLX_MASK_ORDER", "auto").strip().lower()
    return {"forward": True, "read": False}.get(order)


@dataclass(eq=False)
class _Shard:
    """Rows of the running batch that decode together, on one MLX stream."""

    index: int  # which of the scheduler's streams
    kv: ShardKV  # the shard's KV block pool and its rows' blocks
    rows: list[Request] = field(default_factory=list)
    sampling: BatchSampling | None = None  # device sampling state of `rows`


def _unwound(exc: MLXError) -> MLXError:
    """A step's failure kept to report it later (`Scheduler._batch_failed`), without its
    traceback: held in a local of a frame that traceback holds, it made a cycle that kept
    the failed step's frames and MLX arrays alive until the next garbage collection."""
    return exc.with_traceback(None)


def _token_failure(token_id: int, exc: Exception) -> AmlxError:
    """A request's own failure while taking its token `token_id` (its sampling history,
    matcher or detokenizer raised `exc`)."""
    error = AmlxError(f"the request failed at its token {token_id}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc  # (its traceback stays, as text: Channel.close)
    return error


def _constraint_failure(req: Request, token_id: int, before: bool, taken: int) -> AmlxError:
    """The error a constrained request fails with once its matcher failed at `token_id`
    (`before`: already while computing that token's mask; `taken`: the tokens it generated
    before that one): ConstraintError (a ValueError: the request's grammar, not the engine; a
    400 when served) where llguidance failed on the grammar itself, else a refused token's
    AmlxError."""
    matcher = req.matcher
    assert matcher is not None
    first = matcher.error.split("\n", 1)[0]
    if before or matcher.gave_up:
        kind = req.options.constraint.kind if req.options.constraint is not None else "request's"
        return ConstraintError(f"the {kind} constraint cannot be followed: the grammar engine failed on it after "
                               f"{taken} tokens ({first})")
    return AmlxError(f"constrained decoding: token {token_id} refused: {matcher.error}")


def _consume(req: Request, token_id: int, taken: int) -> bool | AmlxError:
    """A constrained request's matcher takes its next token (any thread: it touches the
    matcher alone): whether the constraint is then complete (nothing but EOS may follow), or
    the error to fail the request with, where the constraint refused the token or the
    matcher raised (the request's own failure). `taken`: see `_constraint_failure`."""
    assert req.matcher is not None
    try:
        # (a matcher that failed while computing this token's mask allowed EOS alone, and would
        # take it as a proper end: that is the constraint failing, not the text ending)
        before = req.matcher.failed
        if before or not req.matcher.consume(token_id):
            return _constraint_failure(req, token_id, before, taken)
        return req.matcher.finished
    except Exception as exc:  # noqa: BLE001 - this request's own failure (as in `_emit`)
        return _token_failure(token_id, exc)


def _consume_part(part: "_Part", ids: list[int]) -> list[bool | AmlxError | None]:
    """The matchers of a part's selected rows take their read tokens (`_consume`, any thread):
    per selected row, what `_consume` gave, None for a row without a matcher or no longer active."""
    out = []
    for i in part.selected:
        req = part.rows[i]
        out.append(_consume(req, int(ids[i]), len(req.generated)) if req.active and req.matcher is not None else None)
    return out


def _consume_reads(reads: list) -> list[list[bool | AmlxError | None]]:
    """On the mask thread (AMLX_MASK_START=thread): `_consume_part` for each part read (`_read_parts`)."""
    return [_consume_part(part, ids) for part, ids, _, _ in reads]


class Scheduler:
    def __init__(self, model, max_batch_size: int, wake: callable, prefill_chunk: int | None = None,
                 compile_step: bool = True, shards: int | None = None, options: EngineOptions | None = None,
                 placement: Placement | None = None, draft_model=None, vocab_size: int | None = None, mirror=None):
        """`options` (resolved here if not yet) fix the device, shards, decode
        kernel, KV growth block and prefill chunk once; `shards` and
        `prefill_chunk` override the options' (tests, benchmarks). `placement`:
        the engine's streams if already made (the weights were loaded on them);
        else made here, on the calling thread. `draft_model`: the draft of a model
        loaded with `draft=PATH` (its pools are made here; `vocab_size`: the target's).
        `mirror`: rank 0's amlx.tp.leader.Leader of a tensor-parallel model (told of
        each forward pass and each request that ends; never with speculation)."""
        options = options or EngineOptions(shards=shards)
        if shards is not None:
            options = replace(options, shards=shards)
        if prefill_chunk is not None:
            options = replace(options, prefill_chunk=prefill_chunk)
        self.options = options.resolved()
        self.placement = placement if placement is not None else Placement(self.options)
        self.model = model
        self.mirror = mirror
        self.max_batch_size = max_batch_size
        self.prefill_chunk = self.options.prefill_chunk
        # a group of prompts admitted together is split into passes whose temporaries stay
        # under a bound (amlx.engine.prefill_budget; a lone prompt's chunk is not capped)
        self.pass_budget = pass_budget(model, vocab_size=vocab_size)
        # a GPU keeps a launched pass's activations until it completes (engine/pacing.py); the CPU frees them as it goes
        self.segment_bytes = segment_setting() if self.options.device == "gpu" else 0
        self._wake = wake
        self._lock = threading.Lock()
        self._incoming: deque[Request] = deque()
        # every request not yet ended, whatever its state (incoming, waiting, taken for
        # prefill, prefilling, running, in flight): the failure path ends them all
        self._held: dict[Request, None] = {}
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        # paused requests out of the batch, their KV in a cache of their own (see the docstring)
        self.parked: list[Request] = []
        self.slot_idle_limit = 1.0  # seconds a parked request keeps its batch slot
        self.closed = False
        self.timing = StepTiming(step_timing_enabled())  # host time per phase (AMLX_STEP_TIMING=1)
        self.reset_counters()
        self._step_fn = transforms.compile(self._forward) if compile_step else None
        # the same step traced with the split twin's layers (a cache of its own)
        self._split_step_fn = transforms.compile(self._forward_split) if compile_step else None
        self._twin = None  # the model with its matmuls split over the streams (see _split_model)
        # short prefills behind a cached prefix, compiled like the decode step (see _extend_pass)
        self._extend_fn = transforms.compile(self._extend) if compile_step else None
        self._split_extend_fn = transforms.compile(self._extend_split) if compile_step else None
        # the longest prefill (tokens) that runs as an extend pass; 0: none (benchmarks set it)
        self.extend_max = EXTEND_MAX if self.options.extend_pass else 0
        self._sample_steps = CompiledSteps()  # traced on this engine's streams; closed with it
        self._inflight: _Step | None = None  # a decode step launched and not yet read
        self._batch_failures = 0  # decode steps in a row that failed with no row failing alone
        self._mask_thread: ThreadPoolExecutor | None = None  # computes constrained rows' masks (made on first use)
        # constrained shards launch their forwards before the read (_step_constrained); the order
        # is measured unless the environment pins it (read once, here)
        self._pinned_order = _pinned_mask_order()
        self._upload_on_thread = _masks_uploaded_on_thread()
        copy = _mask_copy()
        self._upload = upload_masks if copy == "mlx" else functools.partial(upload_masks, by_driver=True)
        # page-locked arrays the masks are filled in, for the driver's copy (None: fresh arrays)
        self._mask_buffers = HostBuffers() if copy == "pinned" else None
        self._build_early = _build_before_read()
        self._masks_start = _masks_start()
        self.forward_first = bool(self._pinned_order)
        self._prepared = False  # the model's derived arrays are evaluated (see Module.prepare)
        model.use_decode_kernel(self.options.decode_kernel)
        # attention span step: small where decode attention reads the whole span (EngineOptions.kv_block)
        self.block = self.options.kv_block
        self.pools = ShardPools(model, self.options, self.options.shards, split_windows=mirror is None)
        self.shards = [_Shard(i, kv) for i, kv in enumerate(self.pools.kv)]
        self.block_size = self.pools.block_size
        # Fault injection for tests, None otherwise: called as fault(rows, chained) while a
        # decode step's graph is built (chained: the step takes the previous step's tokens
        # on the device), and as fault([row], False) when a row runs alone to isolate a
        # failure, and as fault(requests, False) when their prompts are prefilled. It may
        # raise, or return an array (added to the logits) whose evaluation fails.
        self.fault = None
        # speculative decoding (load option `draft`), None without
        self.speculator = make_speculator(self.options, model, self.pools.pass_views, self.placement, self._emit,
                                          draft_model, vocab_size, compile_forward=compile_step,
                                          plain_pass=self._timing_pass)
        # verify steps run while this holds (off for good once a verify pass fails alone: _verify_step)
        self.speculating = self.speculator is not None
        # joins coalesced while the batch is busy (amlx/engine/admission.py)
        self.joins = JoinPolicy(self.options.join_wait, max_batch_size)
        # rows leave between chained steps without a drain (`_compact`); a speculative or
        # tensor-parallel model's steps do not chain on the device that way
        self.chain_changes = self.options.chain_changes and self.speculator is None and mirror is None

    @property
    def rows(self) -> list[Request]:
        """The running requests, shard by shard."""
        return [r for s in self.shards for r in s.rows]

    def kv_capacity(self) -> list[int]:
        """Positions each shard's decode step attends over per row (0 without
        rows): for stats and tests (worker thread, or between rounds)."""
        return [s.kv.span(s.rows) for s in self.shards]

    def kv_counters(self) -> dict[str, int]:
        """The block pools' counters, summed over the shards (stats; any thread)."""
        return self.pools.counters()

    def pool_tokens(self) -> int:
        return self.pools.pool_tokens()

    def block_bytes(self) -> int:
        return self.pools.block_bytes()

    def _on(self, shard: _Shard):
        """The block's MLX work runs on the shard's stream."""
        return self.placement.on(shard.index)

    def _prepare(self) -> None:
        """Evaluates the model's derived arrays (see Module.prepare) and makes its
        split twin from them: before the first step, and after weights changed."""
        if not self._prepared:
            self.model.prepare()
            split = self.placement.split
            self._twin = split_layers(self.model, split) if split is not None else None
            self._prepared = True

    def _split_model(self, split: bool = True):
        """The model to run work that only one shard has: the twin whose matmuls
        are split over every stream (an explicit layer choice, see
        nn.split_layers), or the model itself where there is no split."""
        if not split or self.placement.split is None:
            return self.model
        self._prepare()
        return self._twin

    # -- any thread ------------------------------------------------------------
    def add(self, request: Request) -> None:
        with self._lock:
            if self.closed:
                raise ClosedError("the model is closed")
            self._incoming.append(request)
            self._held[request] = None
        self._wake()

    def has_work(self) -> bool:
        """Whether a round would do something (the worker sleeps otherwise): not
        while every request left is parked or waits for a slot, or KV blocks,
        that parked ones hold."""
        if self._inflight is not None or self._incoming or self.prefilling is not None or self.rows:
            return True
        free = self._slots_held() < self.max_batch_size
        # `fits` must be `_admit`'s own test (`ShardPools.place`; no row runs here, so it asks
        # no headroom): a looser one has the worker spin on a request that cannot start
        if any(not r.active for r in self.waiting) or (self.waiting and free and self.pools.fits(self.waiting[0])):
            return True
        if self.waiting and free and self._unread_holding():
            return True  # (`_admit` takes their blocks for the waiting request: `_set_aside_unread`)
        return any(not r.active or (r.channel.has_room() and (free or self._holds_slot(r))) for r in self.parked)

    def wake_at(self) -> float | None:
        """When (time.monotonic) a parked request's slot frees up for a waiting
        request, or for a parked one read again whose own slot lapsed; None if no
        one waits for it. The worker wakes up then."""
        # (a parked request read again waits for a slot as a waiting one does: without it here
        # the worker slept with no time to wake up, and that stream waited for good)
        # (any one read again, holding its slot or not: the worker asks this before `has_work`,
        # and a slot held now may lapse before that, leaving its request waiting for another)
        if not self.waiting and not any(r.active and r.channel.has_room() for r in self.parked):
            return None
        times = [r.parked_at + self.slot_idle_limit for r in self.parked if self._holds_slot(r)]
        return min(times, default=None)

    def reset_counters(self) -> None:
        """Zeroes the counters `Engine.stats` reports (tokens, decode steps, preemptions,
        the recent rate, step timing): at construction, and after the load-time warm-up
        (amlx.engine.warm), so a model's stats count its users' requests only. Worker thread."""
        self.tokens_generated = 0
        self.decode_steps = 0
        self.preemptions = 0  # rows taken out of the batch for want of KV blocks (recomputed later)
        self.rate = RateMeter()  # recent tokens per second of work (stats)
        self.timing = StepTiming(self.timing.enabled)

    def counts(self) -> dict:
        return {"active": len(self.rows) + len(self.parked) + (self.prefilling is not None),
                "waiting": len(self.waiting) + len(self._incoming)}

    def _holds_slot(self, req: Request) -> bool:
        return time.monotonic() - req.parked_at < self.slot_idle_limit

    def _slots_held(self) -> int:
        """Batch slots in use: running rows, and parked requests within their idle limit."""
        return len(self.rows) + sum(1 for r in self.parked if self._holds_slot(r))

    # -- worker thread ------------------------------------------------------------
    def step(self) -> None:
        start, made = time.perf_counter(), self.tokens_generated
        try:
            with self.placement.on():  # the engine's home stream; shards switch to their own
                self._round()
        except BaseException as exc:
            if self.mirror is None:
                raise
            # the ranks may be out of step now: the model cannot go on (the engine closes it)
            raise self.mirror.fatal(exc) from exc
        finally:
            self.rate.add(self.tokens_generated - made, time.perf_counter() - start)

    def _round(self) -> None:
        self.timing.begin()
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
        joins = self._joins_due()
        if self._inflight is not None and self._batch_will_change(joins):
            self.timing.lap("other")
            self.timing.count("drains")
            self._read(self._drain())
            joins = self._joins_due()  # (rows may have finished in that step)
        self._drop_inactive()
        self._unpark()
        self.timing.lap("leave")  # rows leaving (and parked ones coming back): the batch rebuilt
        if joins:
            self._admit()
        # new requests taken (their prefill passes and first tokens are the prefill_* phases)
        self.timing.lap("admit")
        if self.prefilling is not None:
            self._prefill_chunk(self.prefilling)
            self.timing.lap("prefill")
        flush_wakeups()  # first tokens of this round's prefills go out now, not after its decode step
        self._decode()
        self.timing.lap("other")

    def _joins_due(self) -> bool:
        """Whether waiting requests join the batch this round (`JoinPolicy`: while the
        batch is busy, joins wait a few steps for others, to join together)."""
        if self.prefilling is not None:
            return False  # (`_admit` waits for it)
        running = sum(1 for r in self.rows if r.active)
        free = self.max_batch_size - running - sum(1 for r in self.parked if self._holds_slot(r))
        return self.joins.due(waiting=len(self.waiting), free=free, running=running,
                              chained=self._inflight is not None, step=self.decode_steps)

    def _admit(self) -> None:
        """Starts prompt processing in arrival order. The head of the queue takes
        its blocks (`ShardPools.place`); one the pools cannot hold yet waits, and so do
        those behind it. Prompts that start at the same position (no cached
        prefix, or one as long) are taken together as one right-padded batch of
        about one chunk of tokens; a longer one, or a preempted request being
        recomputed, is processed alone, one chunk per round. A group also stops where
        its pass's estimated temporaries would pass `pass_budget`'s bound; the rest
        wait for the next round's pass."""
        if self.prefilling is not None:
            return
        if any(r.channel.has_room() for r in self.parked):
            return  # a parked request that is read again goes first, once a slot is free
        group: list[Request] = []
        free = self.max_batch_size - self._slots_held()
        load = [len(s.rows) for s in self.shards]
        while self.waiting and len(group) < free:
            req = self.waiting[0]
            if not req.active:
                self._finish(self.waiting.popleft())
                continue
            index = self.pools.place(req, load, [bool(s.rows) for s in self.shards])
            if index is None and not group and self._set_aside_unread():
                continue  # (blocks came back: it tries again)
            if index is None:
                break  # no room in the pools yet: it waits for blocks to come back
            rest = len(req.fill) - req.prefilled
            alone = req.recompute is not None or rest > self.prefill_chunk
            longest = max([rest] + [len(r.fill) - r.prefilled for r in group])
            tokens = longest * (len(group) + 1)  # (right-padded to the longest)
            if group and (alone or req.prefilled != group[0].prefilled or tokens > self.prefill_chunk
                          or not self.pass_budget.fits(tokens, len(group) + 1)):
                self.pools.unplace(req)  # it goes first next round (and counts its prefix hits then)
                break
            self.waiting.popleft()
            load[index] += 1
            if alone:
                self.prefilling = req
                break
            group.append(req)
        self.joins.joined(len(self.waiting))
        if group:
            self._prefill_group(group)

    def _prefill_pass(self, shard: _Shard, reqs: list[Request], start: int, length: int, model,
                      logits_read: bool = True) -> Array:
        """One prefill forward writing positions [start, start + length) of each
        request's `fill` (right-padded) into the shard's pool; logits (B, V) at
        each request's last position in it. `logits_read`: whether the caller
        evaluates them (a tensor-parallel model's other ranks evaluate the same)."""
        ends = [min(len(r.fill), start + length) for r in reqs]
        if self._extends(start, length, len(reqs)):
            return self._extend_pass(shard, reqs, start, ends, model)
        ids = np.zeros((len(reqs), length), dtype=np.int32)
        for i, r in enumerate(reqs):
            ids[i, :ends[i] - start] = r.fill[start:ends[i]]
        tables = shard.kv.prefill_tables(reqs, start, length, ends)
        if self.mirror is not None:
            self.mirror.prefill(reqs, start, length, ends, logits_read, shard.kv.pool.capacity)
        views = self.pools.views(shard.index, tables)
        # (apart from the forward's build: the blocks taken, the pool grown, the views made)
        self.timing.lap("prefill_tables")
        self.timing.count("prefill_rows", len(reqs))
        self.timing.count("prefill_tokens", int(ids.size))
        last = array(np.asarray(ends, dtype=np.int32) - start - 1)
        # (a launched segment's writes must find the old arrays held by the graph alone)
        pace = (None if self.mirror is not None else
                pacer_for(len(views), ids.size, self.pass_budget.token_bytes, self.segment_bytes,
                          lambda: setattr(shard.kv, "arrays", written(views))))
        logits = model(array(ids), views, start, last=last, pace=pace)
        if pace is not None:  # (the part of the pass's build spent waiting for the device)
            self.timing.add("segment_wait", pace.waited)
        # the old arrays' only holder is now the graph, so MLX may write them in place
        shard.kv.arrays = written(views)
        return ops.reshape(logits, (len(reqs), logits.shape[2]))

    def _extends(self, start: int, length: int, rows: int) -> bool:
        """Whether a prefill pass of `length` tokens from `start` over `rows` rows is the
        compiled extend pass. Not where the plain pass would be paced (many rows behind
        cached prefixes, as when a batch of chats comes back): one compiled call cannot
        be launched in segments, and its gathered keys and values of every layer would
        all be alive at once on a GPU (engine/pacing.py)."""
        if not ((start or self.options.extend_fresh) and length <= self.extend_max
                and self._extend_fn is not None and self.mirror is None):
            return False
        return segment_layers(len(getattr(self.model, "layers", ())), rows * length, self.pass_budget.token_bytes,
                              self.segment_bytes) is None

    def _extend_pass(self, shard: _Shard, reqs: list[Request], start: int, ends: list[int], model) -> Array:
        """`_prefill_pass` for a short prefill behind a cached prefix, compiled as the
        decode step is: its host work is a graph replay instead of building the
        forward op by op, and compile fuses its elementwise ops. Tokens are
        padded to a power of two (at least EXTEND_MIN), the batch to its bucket
        (with `pad_batches`) and the gathered span to `ShardKV.extend_width`, so
        the pass is traced for few shapes; padding is written to the null block and
        read by no real position (attention as in a verify pass: `verify_mask`).
        A tensor-parallel model keeps the plain pass (its ranks run the same)."""
        b = len(reqs)
        pad = padded_batch(b) - b if self.options.pad_batches else 0
        lengths = [e - start for e in ends] + [0] * pad
        width = _extend_tokens(max(lengths))
        ids = np.zeros((b + pad, width), dtype=np.int32)
        for i, r in enumerate(reqs):
            ids[i, :lengths[i]] = r.fill[start:ends[i]]
        rows = [*reqs, *[PADDING_ROW] * pad]
        starts = [start] * b + [0] * pad
        tables = shard.kv.extend_tables(rows, starts, width, ends + [0] * pad, shard.kv.extend_width(max(ends)))
        fn = self._extend_fn if model is self.model else self._split_extend_fn
        logits, state = fn(array(ids), array(np.asarray(starts, dtype=np.int32)),
                           array(np.asarray([max(n - 1, 0) for n in lengths], dtype=np.int32)),
                           extend_arrays(tables), shard.kv.arrays)
        # the old arrays' only holder is now the graph, so MLX may write them in place
        shard.kv.arrays = state
        return ops.slice(logits, (0, 0), (b, logits.shape[1])) if pad else logits

    def _extend(self, tokens: Array, positions: Array, last: Array, tabs: list[Array],
                pools: list[Array]) -> tuple[Array, list[Array]]:
        """The extend pass as a pure function of arrays (what gets compiled)."""
        return self.pools.extend_pass(self.model, tokens, positions, last, tabs, pools)

    def _extend_split(self, tokens: Array, positions: Array, last: Array, tabs: list[Array],
                      pools: list[Array]) -> tuple[Array, list[Array]]:
        """`_extend` by the split twin (work only one shard has)."""
        return self.pools.extend_pass(self._split_model(), tokens, positions, last, tabs, pools)

    def extend_widths(self) -> list[int]:
        """The token widths an extend pass of up to `extend_max` new tokens is padded to."""
        return sorted({_extend_tokens(n) for n in range(1, self.extend_max + 1)})

    def warm_extend(self, batches: tuple[int, ...] = (1, 2), budget_s: float | None = None) -> int:
        """Runs the compiled extend pass once per token width (and padded batch size
        in `batches`) over rows that hold only the null block, so that the kernels
        MLX compiles at a shape's first use (on CUDA: NVRTC, seconds per fused kernel;
        MLX keeps them on disk, MLX_PTX_CACHE_DIR) are compiled while the model loads,
        not under a user's first prompt behind a cached prefix. Later shapes (other
        spans, a grown pool) are traced again on the host but reuse those kernels.

        Widths go smallest first. With `budget_s`, once that many seconds have passed
        after a width is done, the rest are left cold and `extend_max` drops to the
        widths done: longer prompts behind a cached prefix take the plain pass, which
        compiles nothing, in this process (on a fresh machine the whole warm-up of a
        4-bit Gemma-3-4B ran past 90 s; with the kernels on disk it takes about two).
        Returns the passes run (0 where the extend pass is off). Worker thread."""
        if self._extend_fn is None or not self.extend_max or self.mirror is not None:
            return 0
        shard, runs = self.shards[0], 0
        deadline = None if budget_s is None else time.monotonic() + budget_s
        with self.placement.on():
            for pool in (shard.kv.pool, shard.kv.local):
                if pool is not None and pool.capacity == 0:
                    pool.grow_to(pool.initial_blocks)  # (what the first request takes anyway)
            self._prepare()
            model = self._split_model()  # (a lone prompt's pass: the split twin where there is one)
            fn = self._extend_fn if model is self.model else self._split_extend_fn
            sizes = sorted({padded_batch(b) if self.options.pad_batches else b for b in batches})
            # (per batch size, made once: its padding rows and its zero starts and ends)
            inputs = {b: ([PADDING_ROW] * b, array(np.zeros(b, dtype=np.int32))) for b in sizes}
            widths = self.extend_widths()
            try:
                for k, width in enumerate(widths):
                    for b in sizes:
                        rows, zeros = inputs[b]
                        with self._on(shard):
                            tables = shard.kv.extend_tables(rows, [0] * b, width, [0] * b,
                                                            shard.kv.extend_width(width))
                            logits, state = fn(array(np.zeros((b, width), dtype=np.int32)), zeros, zeros,
                                               extend_arrays(tables), shard.kv.arrays)
                            shard.kv.arrays = state
                            ops.eval(logits, *shard.kv.state())
                        runs += 1
                    if deadline is not None and k + 1 < len(widths) and time.monotonic() > deadline:
                        self.extend_max = width
                        break
            except BaseException:
                shard.kv.reset()  # (its arrays may be a graph that cannot be computed; no row holds blocks)
                raise
        return runs

    def _prefill_group(self, group: list[Request]) -> None:
        """Prefills several prompts that start at the same position: one batched
        forward per shard they joined, on that shard's stream, so the shards'
        forwards run in parallel. Right padding keeps it exact: causal attention
        never lets a real position see a padded one, and padded positions are
        written to the null block."""
        self.timing.lap("admit")
        start = group[0].prefilled
        self.timing.count("prefill_groups")
        by_shard: dict[int, list[Request]] = {}
        for r in group:
            by_shard.setdefault(r.shard, []).append(r)
        parts = [(self.shards[i], reqs) for i, reqs in sorted(by_shard.items())]
        firsts: list[StepSample] = []
        samplers: list[BatchSampling] = []
        masks = step_masks([[r.matcher for r in reqs] for _, reqs in parts])
        if any(m is not None for m in masks):  # (the first tokens' masks apart from the pass)
            self.timing.lap("prefill_masks")
        length = max(len(r.fill) for r in group) - start
        try:
            for (shard, reqs), mask in zip(parts, masks):
                with self._on(shard):
                    logits = self._prefill_pass(shard, reqs, start, length, self._split_model(len(parts) == 1))
                    if self.fault is not None:
                        logits = self._inject(logits, reqs, False)
                self.timing.lap("prefill_build")
                # (sampling stays on the worker's stream: see _build)
                samplers.append(BatchSampling([r.sampling for r in reqs], self._sample_steps))
                firsts.append(samplers[-1](logits, masks=mask))
                self.timing.lap("prefill_sample")
            # One evaluation for every shard, so their forwards run at the same time.
            ops.eval(*[a for first in firsts for a in first.arrays()], *[a for bs in samplers for a in bs.state()],
                     *[a for shard, _ in parts for a in shard.kv.state()])
            self._settle([shard for shard, _ in parts])
            # (apart, so that a peak shows which kind of pass set it; each shard chose by its own rows)
            extended = any(self._extends(start, length, len(reqs)) for _, reqs in parts)
            self.timing.lap("extend_wait" if extended else "prefill_wait")
            for bs in samplers:
                bs.sync_back()  # the requests' keys move on
        except MLXError as exc:
            if self.mirror is not None:
                raise  # the ranks ran this pass: step() fails the model
            self._check_pools()
            # (a request its consumer left during the pass fails too: it holds blocks, and
            # skipped it kept them, and its place in the scheduler, for good)
            if len(group) == 1:
                self._fail(group[0], exc)
                return
            for r in group:  # find the culprit: each prompt on its own (blocks kept)
                if r.active:
                    self._prefill_group([r])
                else:
                    self._fail(r, exc)
            return
        finally:
            for bs in samplers:
                bs.close()
        for (shard, reqs), first in zip(parts, firsts):
            ids_out, lps, tops = first.read()
            for i, r in enumerate(reqs):
                r.pos = r.prefilled = len(r.prompt)
                self.pools.cache_filled(r)
                self._emit(r, int(ids_out[i]), float(lps[i]), None if tops is None else tops[i])
            self._join(shard, reqs)
        self.timing.lap("prefill_emit")

    def _prefill_chunk(self, req: Request) -> None:
        """One chunk of a long prompt (or of a preempted request's recompute); on the
        last chunk, the first token (none when recomputing) and joining the batch."""
        shard = self.shards[req.shard]
        first = None
        try:
            start = req.prefilled
            length = min(self.prefill_chunk, len(req.fill) - start)
            middle = start + length < len(req.fill) or req.recompute is not None  # no logits read
            logits = self._prefill_pass(shard, [req], start, length, self._split_model(), not middle)
            req.prefilled += length
            if middle:
                ops.eval(*shard.kv.state())
            else:
                first = self._first_tokens(logits, [req])
                ops.eval(*first.arrays(), *shard.kv.state())
            self._settle([shard])
        except MLXError as exc:
            self.prefilling = None
            if self.mirror is not None:
                raise
            self._check_pools()
            self._fail(req, exc)  # (also one its consumer left meanwhile: it gives its blocks back)
            return
        self.pools.cache_filled(req)
        if req.prefilled < len(req.fill):
            return
        self.prefilling = None
        req.pos = len(req.fill)
        req.recompute = None  # (a recomputed request goes on from its last token, already sent)
        if first is not None:
            ids_out, lps, tops = first.read()
            self._emit(req, int(ids_out[0]), float(lps[0]), None if tops is None else tops[0])
        self._join(shard, [req])

    def _settle(self, shards: list[_Shard]) -> None:
        """After a prefill pass's evaluation, on a GPU: waits until its command buffers
        have let go of their kernels' inputs. The evaluation returns once the outputs
        are computed, but the encoder releases the inputs (among them the pool arrays
        each layer's attention read) in its completion handlers, a moment later; a
        decode step launched before that finds the pool held, and its write copies
        the whole pool instead of writing in place. Nothing is left to run here, so
        this costs a hand-over to the encoder's thread."""
        if self.options.device != "gpu":
            return
        for shard in shards:
            with self._on(shard):
                mxdevice.synchronize()

    def _join(self, shard: _Shard, reqs: list[Request]) -> None:
        """Adds requests whose blocks are in the shard's pool to its rows; those
        that already finished (EOS or max_tokens at their first token) don't join."""
        # `active` asked once per request: a consumer may cancel at any moment (another
        # thread), and one asked twice could be kept and finished both, a dead row in the
        # batch whose fresh blocks were later cached under its prompt's keys, unwritten
        keep = []
        for r in reqs:
            if r.active:
                keep.append(r)
            else:
                self._finish(r)
        if not keep:
            return
        part = None if self._inflight is None else next((p for p in self._inflight.parts if p.shard is shard), None)
        if part is None:  # (no step in flight holds the shard's state)
            self._set_rows(shard, shard.rows + keep)
            return
        # A step is in flight (`chain_changes`; `_batch_will_change` let the join through):
        # the new rows' sampling state joins the shard's on the device, and the next step
        # takes the old rows' tokens from the step in flight, theirs from the host (`_build`).
        self.timing.count("chained_joins")
        if part.carry is None:
            part.carry = list(range(len(part.rows)))
        part.carry += [None] * len(keep)
        old = shard.sampling
        if old is None:  # (every row of the shard left since that step)
            shard.sampling = BatchSampling([r.sampling for r in keep], self._sample_steps)
        else:
            shard.sampling = old.extend([r.sampling for r in keep])
            old.close()
        shard.rows = shard.rows + keep

    def _first_tokens(self, logits: Array, reqs: list[Request]) -> StepSample:
        """Samples the first token of freshly prefilled requests; their keys move on."""
        bs = BatchSampling([r.sampling for r in reqs], self._sample_steps)
        try:
            first = bs(logits, masks=step_masks([[r.matcher for r in reqs]])[0])
            ops.eval(*first.arrays(), *bs.state())
            bs.sync_back()
        finally:
            bs.close()
        return first

    def _set_rows(self, shard: _Shard, rows: list[Request]) -> None:
        """Changes a shard's rows (its cache is already arranged to match) and
        rebuilds its device sampling state from the rows' own."""
        if shard.sampling is not None:
            shard.sampling.sync_back()
            shard.sampling.close()
            shard.sampling = None
        shard.rows = rows
        if rows:
            shard.sampling = BatchSampling([r.sampling for r in rows], self._sample_steps)
        else:
            shard.kv.forget_table()  # (a device array: nothing is held while the shard is idle)

    def _batch_will_change(self, joins: bool) -> bool:
        """Whether this round changes the batch in a way that needs the step in flight
        drained first: a row pausing (parked), a parked one rejoining, a prompt being
        prefilled, or, unless `chain_changes`, new requests joining (`joins`) or a row
        leaving. A row that finished or was cancelled leaves without a drain where
        `chain_changes` holds (`_compact`), unless none stays or the shards would be left
        unbalanced."""
        rows = self.rows
        if any(r.active and not r.channel.has_room() for r in rows):
            return True  # a row pauses: parked
        if any(not r.active for r in rows) and (not self.chain_changes or all(not r.active for r in rows)
                                                or self._unbalanced_after_leaves()):
            return True  # a row leaves (finished or cancelled); the last ones drain: nothing to overlap
        if any(r.active and r.channel.has_room() for r in self.parked):
            return True  # may rejoin
        if self.prefilling is not None and self._slots_held() < self.max_batch_size:
            return True
        # joins go in beside the step in flight (`_join`) unless a joining request needs token
        # histories or counts on the device (penalties): its shard's may not exist yet, and the
        # other rows' host histories lack the step in flight
        return joins and (not self.chain_changes or any(r.sampling.params.any_history for r in self.waiting))

    def _unbalanced_after_leaves(self) -> bool:
        """Whether the rows that stay would leave the shards so unequal that they should
        be rebalanced (which moves rows, after a drain: `_rebalance`). A round takes as
        long as its largest shard, but joins go to the emptiest shard and even it out, so
        a small difference is left to them."""
        if len(self.shards) < 2:
            return False
        sizes = [sum(1 for r in s.rows if r.active) for s in self.shards]
        return max(sizes) - min(sizes) > max(2, sum(sizes) // 8)

    # -- paused requests: parked out of the batch -------------------------------
    def _park_paused(self) -> None:
        """Moves every paused row (its consumer's buffer full) out of the batch; it
        keeps its blocks in its shard's pool (no step in flight)."""
        changed = False
        for shard in self.shards:
            paused = [i for i, r in enumerate(shard.rows) if r.active and not r.channel.has_room()]
            if not paused:
                continue
            changed = True
            reqs = [shard.rows[i] for i in paused]
            self._keep_rows(shard, [i for i in range(len(shard.rows)) if i not in paused])
            now = time.monotonic()
            for req in reqs:
                req.parked_at = now
            self.parked.extend(reqs)
        if changed:
            self._rebalance()

    def _unpark(self) -> None:
        """Parked requests read again rejoin the batch, oldest first: at once while
        they hold their slot, else when one is free."""
        for req in [r for r in self.parked if r.active and r.channel.has_room()]:
            if not self._holds_slot(req) and self._slots_held() >= self.max_batch_size:
                continue
            if self._inflight is not None and req.sampling.params.any_history:
                # its consumer read since `_batch_will_change` looked (another thread), so the
                # step in flight was not drained for it; it cannot join beside that step (as
                # for waiting requests there): the next round drains first, then it rejoins
                continue
            self.parked.remove(req)
            if not req.blocks:  # set aside while unread (`_set_aside_unread`): recomputed first
                self.waiting.appendleft(req)
                continue
            self._join(self.shards[req.shard], [req])

    def _unread_holding(self) -> list[Request]:
        """Parked requests whose batch slot lapsed (nobody read them for `slot_idle_limit`)
        that still hold KV blocks, youngest first."""
        return preemption_order([r for r in self.parked if r.blocks and not self._holds_slot(r)])

    def _set_aside_unread(self) -> bool:
        """The head of the queue needs KV blocks that parked requests nobody reads hold:
        the youngest of those whose slot lapsed gives its blocks back (its full ones stay
        cached) and stays parked without them, to be recomputed once it is read again
        (`_unpark`), as a preempted row is. Kept, they starved every new request for as long
        as their consumers held the streams unread. False if there is none."""
        unread = self._unread_holding()
        if not unread:
            return False
        self._set_aside(unread[0])
        return True

    def _decode(self) -> None:
        """Launches one decode step for the batch (every shard) and reads the previous one.

        While the batch stays the same, step t+1 takes step t's sampled tokens
        straight from the device and is scheduled before step t's tokens are
        read back, so the host's work overlaps the device's. A row pausing or
        joining first drains the step in flight; a row finishing or cancelled
        leaves without a drain where `chain_changes` holds (`_compact`). Either
        way a row that finished at step t has computed step t+1 in vain.

        The order is: build step t+1's graph (Python), launch it, then hand
        step t's tokens to their consumers. Launching before reading keeps the
        device busy: reading step t waits for its end, and a step launched only
        after that left the device idle while the host issued its kernels (on
        the GPU, about as long as the step's host time). Shards holding
        constrained rows step after the read, their masks computed meanwhile:
        see `_step_constrained`."""
        prev = self._inflight
        # (a speculative model reads each step before the next, drafts following the tokens,
        # unless no row drafts now: every adaptive length at 0, Speculator.chain_plain)
        if prev is not None and not (self._can_chain(prev) and self._blocks_fit() and (
                not self.speculating or self.speculator.chain_plain(self.rows))):
            self.timing.lap("other")
            self._read(self._drain())
            self._drop_inactive()
            prev = None
        if prev is None:
            self._park_paused()  # (a chained step's rows all have room)
            self._preempt_for_blocks()
        for shard in self.shards:
            self.pools.cache_decoded(shard.rows)  # (before the windowed layers give blocks back)
            shard.kv.extend(shard.rows)  # a block for each row whose next position starts one
        plan = []
        for shard in self.shards:
            sel = [i for i, r in enumerate(shard.rows) if r.active and r.channel.has_room()]
            if sel:
                plan.append((shard, sel))
        if not plan:
            return
        self._prepare()
        if self.speculating and prev is None and self._verify_step():
            return
        self._inflight = None
        chained = {p.shard: p for p in prev.parts} if prev is not None else {}
        saved = [(shard, shard.sampling.snapshot()) for shard, _ in plan]
        # A lone row leaves the other cores idle: its matmuls are split over every stream,
        # unless the CPU kernels already use them (Placement.split_decode).
        split = len(plan) == 1 and len(plan[0][0].rows) == 1 and self.placement.split_decode()
        self.timing.lap("plan")
        # a part per planned shard, in shard order (None: the shard takes no step this round)
        parts: list[_Part | None] = [None] * len(plan)
        constrained = [i for i, (shard, _) in enumerate(plan) if any(r.matcher is not None for r in shard.rows)]
        # Constrained shards step after step t's read, or, where the device is the bottleneck
        # (see `_step_constrained`), launch their forwards first, as the other shards do.
        # Stepping after the read, their forwards are still built before it (chained on step t's
        # tokens on the device) and launched after it: the build fills the host's wait for
        # step t's end, and the masks overlap the launch (`_step_constrained`).
        first = self.forward_first and prev is not None
        early = prev is not None and not first and self._build_early
        try:
            for i, (shard, sel) in enumerate(plan):
                if i not in constrained or first or early:
                    parts[i] = self._build(shard, sel, chained.get(shard), split)
            self.timing.lap("build")
            failure = self._launch([p for i, p in enumerate(parts) if p is not None and (i not in constrained or first)])
        except MLXError as exc:
            failure = _unwound(exc)
        self.timing.lap("launch")
        # With the forwards built, the masks start as soon as the matchers took step t's tokens,
        # so that handing the tokens out overlaps computing them too, not only the launch.
        started: list[_Masks] = []

        def start_masks() -> None:
            started.append(self._start_masks(plan, constrained, parts, False))

        masks_at = self._masks_start if failure is None and constrained and early and prev is not None else "emit"
        if masks_at == "thread":
            # (the read's tokens go out at the end of `_step_constrained`: `_emit_reads`)
            reads, waited = self._read_parts(prev)
            started.append(self._start_masks(plan, constrained, parts, False, reads))
            self.timing.lap("masks_start")
        else:
            reads = None
            advanced = start_masks if masks_at == "advance" else None
            try:
                waited = self._read(prev, advanced) if prev is not None else 0.0
            except BaseException:
                for masks in started:  # (the matchers must be this thread's again)
                    if masks.pending is not None:
                        wait_for([masks.pending])
                raise
        if constrained and prev is not None and not first and self._pinned_order is None:
            # step t still ran when it was read: the device, not the host, sets the pace
            self.forward_first = waited > DEVICE_BOUND_WAIT
        if failure is None and constrained:
            try:
                failure = self._step_constrained(plan, constrained, parts, chained, split, launched=first,
                                                 started=started[0] if started else None)
            finally:
                if reads is not None:
                    job, pending = started[0].job, started[0].pending
                    if pending is not None:  # (waited for already, but where the step raised first)
                        wait_for([pending])
                    self._emit_reads(reads, None if job is None else job.advanced)
        if failure is not None:
            for shard, snapshot in saved:
                shard.sampling.rewind(snapshot)
            self._check_pools()
            if not self._isolate_failure():
                self._batch_failed(failure)
            return
        self._commit(_Step([p for p in parts if p is not None]))

    def _verify_step(self) -> bool:
        """A speculative verify step for the whole batch when some row drafts
        (amlx/engine/speculate.py); False if this round takes a plain step."""
        shards = [s for s in self.shards if s.rows]
        drafts = self.speculator.plan(shards)
        if drafts is None:
            return False
        saved = [(shard, shard.sampling.snapshot()) for shard in shards]
        try:
            self.speculator.step(shards, drafts)
        except MLXError:
            for shard, snapshot in saved:
                shard.sampling.rewind(snapshot)
            self._check_pools()
            self.speculator.recover()
            if not self._isolate_failure() and self.speculating:
                # every row decodes alone: what fails is the verify pass itself, not a row's
                # input, so the engine goes on decoding plainly instead of retrying it forever
                self.speculating = False
                warnings.warn("amlx: speculative decoding is off for this model: its verify pass failed "
                              "while every row decodes alone", RuntimeWarning, stacklevel=1)
            return True
        self.decode_steps += 1
        self._batch_failures = 0
        return True

    def _can_chain(self, prev: "_Step") -> bool:
        live = [s for s in self.shards if s.rows]
        parts = {p.shard: p for p in prev.parts}
        if not live or not any(s in parts for s in live):
            return False
        for shard in live:
            part = parts.get(shard)
            if part is None:
                continue  # (all its rows joined since: their tokens come from the host)
            carried = part.carried()
            if len(part.selected) != len(part.rows) or len(carried) != len(shard.rows) or any(
                    c is not None and c is not r for c, r in zip(carried, shard.rows)):
                return False
        # One token of every row is still in flight: room for it, and one more.
        return all(r.active and r.channel.has_room(extra=1) for r in self.rows)

    def weights_changed(self) -> None:
        """The model's parameters or modules were replaced (e.g. an adapter
        trained a step): the compiled step traced the old ones as constants, so
        it is traced again, and the prefix cache is emptied: its blocks were
        computed with the old weights (worker thread). Blocks of requests still
        running are not cached when they end (`ShardPools.epoch`)."""
        with self.placement.on():
            if self._inflight is not None:
                self._read(self._drain())
        self.pools.weights_changed()
        self._prepared = False
        self._twin = None
        if self._step_fn is not None:
            for fn in (self._step_fn, self._split_step_fn, self._extend_fn, self._split_extend_fn):
                fn.close()
            self._step_fn = transforms.compile(self._forward)
            self._split_step_fn = transforms.compile(self._forward_split)
            self._extend_fn = transforms.compile(self._extend)
            self._split_extend_fn = transforms.compile(self._extend_split)
        if self.speculator is not None:
            self.speculator.weights_changed()

    def _build(self, shard: _Shard, sel: list[int], prev: "_Part | None", split: bool = False) -> "_Part":
        """The graph of a shard's next decode step (not yet launched), on its stream.

        With `split` it is built on the home stream whatever the shard, by the
        split twin (matmuls over every stream). Each compiled trace keeps a few bytes
        of constants for as long as the model lives, and is made per batch size,
        capacity and stream: one home stream keeps the split traces as few as the
        batch sizes that use them (a lone row)."""
        with self.placement.on(0 if split else shard.index):
            b = len(shard.rows)
            pad = padded_batch(b) - b if self.options.pad_batches else 0
            if prev is not None:
                tokens = self._chained_tokens(shard, prev)
            else:
                tokens = array(np.asarray([[r.last] for r in shard.rows], dtype=np.int32))
            if pad:
                tokens = ops.concatenate([tokens, ops.zeros((pad, 1), _int32)], axis=0)
            positions = array(np.asarray([r.pos for r in shard.rows] + [0] * pad, dtype=np.int32))
            padded = [*shard.rows, *[PADDING_ROW] * pad]
            tables = shard.kv.decode_tables(padded)
            if self.mirror is not None:
                self.mirror.decode(padded, shard.kv.pool.capacity)
            logits, state = self._batched_logits(tokens, positions, tables, shard.kv.arrays, split)
            if pad:  # the padding rows' logits are never sampled
                logits = ops.slice(logits, (0, 0), (b, logits.shape[1]))
            # the old arrays' only holder is now the graph, so MLX may write them in place
            shard.kv.arrays = state
            if self.fault is not None:
                logits = self._inject(logits, list(shard.rows), prev is not None)
        if any(r.matcher is not None for r in shard.rows):
            # sampled once the step's masks are ready (`_step_constrained`)
            return _Part(shard, list(shard.rows), sel, None, [logits, *state], state, logits)
        # Sampling (a few small ops) stays on the home stream: its compiled
        # steps are cached process-wide per shape and stream, each keeping a few
        # bytes of constants, so one stream keeps that cache as small as with one shard.
        step = shard.sampling(logits, sel)
        outputs = [*step.arrays(), *shard.sampling.state(), *state]
        return _Part(shard, list(shard.rows), sel, step, outputs, state)

    def _chained_tokens(self, shard: _Shard, prev: "_Part") -> Array:
        """The input tokens (B, 1) of a shard's step chained on `prev`: its sampled tokens on
        the device, taken for the rows that stayed, then the tokens of rows that joined
        since from the host (`_compact`, `_join`; joined rows come last)."""
        tokens = ops.reshape(prev.sample.tokens, (-1, 1))
        if prev.carry is None:
            return tokens
        old = [c for c in prev.carry if c is not None]
        new = [[r.last] for r, c in zip(shard.rows, prev.carry) if c is None]
        if old != list(range(len(prev.rows))):
            tokens = ops.take(tokens, array(np.asarray(old, dtype=np.int32)), axis=0) if old else None
        if not new:
            return tokens
        new = array(np.asarray(new, dtype=np.int32))
        return new if tokens is None else ops.concatenate([tokens, new], axis=0)

    def _launch(self, parts: list["_Part"]) -> MLXError | None:
        """Launches what the parts have built so far (whole steps; the forwards of parts
        whose sampling waits for masks), so the device runs them while the host goes
        on; the error if that fails. Arrays launched before are not computed again."""
        try:
            ops.async_eval(*[a for p in parts for a in p.outputs])
        except MLXError as exc:
            return _unwound(exc)
        return None

    def _start_masks(self, plan: list, indices: list[int], parts: list["_Part | None"],
                     launched: bool, reads: list | None = None) -> "_Masks":
        """Sets up the masks of the constrained shards' next step (their matchers have taken
        step t's tokens, or with `reads`, step t's parts as read, take them first on the
        thread that computes the masks: `_consume_reads`) and, where forwards are still to
        build or launch, hands them to the mask thread (see `_step_constrained`)."""
        indices = [i for i in indices if parts[i] is not None or all(r.blocks for r in plan[i][0].rows)]
        todo = [i for i in indices if parts[i] is None]  # to build, then launch
        unlaunched = [] if launched else [i for i in indices if parts[i] is not None]
        advance = None if reads is None else functools.partial(_consume_reads, reads)
        job = MaskJob([[r.matcher for r in plan[i][0].rows] for i in indices],
                      self._upload if (todo or unlaunched) and self._upload_on_thread else None,
                      self._mask_buffers, advance) if indices else None
        pending = None
        if indices and (todo or unlaunched):  # forwards to build or launch meanwhile: the masks go to the mask thread
            if self._mask_thread is None:
                self._mask_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="amlx-masks")
            pending = self._mask_thread.submit(job.run)
        return _Masks(indices, todo, unlaunched, job, pending)

    def _step_constrained(self, plan: list, indices: list[int], parts: list["_Part | None"],
                          chained: dict, split: bool, launched: bool = False,
                          started: "_Masks | None" = None) -> MLXError | None:
        """Steps the shards holding constrained rows (`plan[i]` for i in `indices`; their
        parts go into `parts[i]`, where their forwards may already be: built, and with
        `launched` launched too), now that step t's tokens have advanced the matchers.
        The error if building or launching fails, else None.

        A constrained row's mask for step t+1 needs step t's token on the host, so such a
        shard cannot sample before step t is read. Once it is, every mask of the step is
        set up here (`MaskJob`) and computed in one parallel llguidance call (the GIL
        released): on the mask thread while this thread builds (where `_decode` did not
        before the read) and launches the shards' forwards not yet launched (their input
        tokens are step t's, chained on the device), or here where every forward went
        first; then each shard's sampling takes
        its masks, packed, in one upload, and applies them inside the compiled sampling
        step. So the masks cost the step only the time they take beyond issuing the
        forward (or, where the forward went first, beyond computing it). A shard not yet
        built where a row failed during the read (its blocks are gone) takes no step this
        round: the next round drains the batch and steps it without that row.

        Which order: where the host sets the pace (a small model on a GPU), the device has
        finished step t by the time it is read, and issuing the forward after the read
        hides the masks behind it. Where the device does (a large model, the CPU), reading
        first would leave it idle from the end of step t until the forward is issued: the
        forwards go first (`_decode`), and the masks hide behind computing them instead.
        The scheduler switches to forward-first when a read waited for the device longer
        than DEVICE_BOUND_WAIT, and back when, forward first, the forward was computed
        before its sampling was launched (the device waited for the masks); unless
        AMLX_MASK_ORDER pins the order (`_pinned_mask_order`).

        `started`: the masks set up and handed to the mask thread already (`_start_masks`, by
        `_read` once the matchers took their tokens, before they went to their requests)."""
        masks_of = started if started is not None else self._start_masks(plan, indices, parts, launched)
        indices, todo, unlaunched, job, pending = masks_of
        if not indices:
            return None
        try:
            for i in todo:
                shard, sel = plan[i]
                parts[i] = self._build(shard, sel, chained.get(shard), split)
            self.timing.lap("build_constrained")
            failure = self._launch([parts[i] for i in unlaunched + todo])
        except MLXError as exc:
            failure = _unwound(exc)
        finally:
            self.timing.lap("launch_constrained")
            # (always waited for: the matchers are this thread's again.) With nothing to build
            # (the forwards went first), this thread computes them itself: a hand-over to the
            # mask thread and back would only add the GIL's and the threads' wake-up latencies.
            try:
                masks = pending.result() if pending is not None else job.run()
            except MLXError as exc:  # (the masks' upload on the mask thread: as a failed build)
                masks, failure = [], _unwound(exc)
            self.timing.add_over("slow_masks", self.timing.lap("masks"), SLOW_MASKS)
            self.timing.add("mask_fill", job.seconds)
            self.timing.add_over("slow_fills", job.seconds, SLOW_MASKS)
            if job.upload_seconds:
                self.timing.add("mask_upload", job.upload_seconds)
            if pending is not None:  # from the hand-over to the mask thread until it began
                self.timing.add("mask_start", job.start_delay)
        if failure is not None:
            return failure
        if launched and self._pinned_order is None:
            # forward first: if it is computed already, the device waits for the masks
            self.forward_first = not all(parts[i].logits.is_ready() for i in indices)
        try:
            for i, mask in zip(indices, masks):
                part = parts[i]
                part.sample = part.shard.sampling(part.logits, part.selected, masks=mask)
                part.outputs += [*part.sample.arrays(), *part.shard.sampling.state()]
                part.logits = None
        except MLXError as exc:
            return _unwound(exc)
        self.timing.lap("build_sample")
        failure = self._launch([parts[i] for i in indices])
        self.timing.lap("launch_sample")
        return failure

    def _commit(self, step: "_Step") -> None:
        """A launched step becomes the batch's state: the rows' positions (the
        shards' pools took the step's arrays when it was built). Paused rows
        computed this step too (the batch shape stays fixed), but their position
        does not advance: the next step rewrites the same slot with the same
        token, so their state is as if they had been left out."""
        self._inflight = step
        self._batch_failures = 0
        for part in step.parts:
            # launched: the pools alone hold the written arrays now, so the next
            # step's scatter may write them in place instead of copying them
            part.outputs, part.state = [], []
            for i in part.selected:
                part.rows[i].pos += 1
                part.rows[i].steps += 1
        self.decode_steps += 1

    def _drain(self) -> "_Step":
        step, self._inflight = self._inflight, None
        return step

    def _read(self, step: "_Step", advanced: Callable[[], None] | None = None) -> float:
        """Hands a launched step's tokens to their requests (waits for the device);
        returns the seconds it waited.

        `advanced`: called once every part is read and every constrained row's matcher has
        taken its token, before the tokens go to their requests: the next step's masks can
        be computed (on the mask thread) while this thread hands the tokens out."""
        if advanced is None:
            return self._read_parts(step, emit=True)[1]
        reads, waited = self._read_parts(step)
        # (the matchers are the mask thread's from `advanced` on: what handing the tokens out
        # needs of them, whether each request is complete, is read here)
        complete = [self._advance_part(part, ids) for part, ids, _, _ in reads]
        self.timing.lap("advance")
        advanced()
        self.timing.lap("masks_start")
        for (part, ids, lps, tops), done in zip(reads, complete):
            self._emit_part(part, ids, lps, tops, done)
        return waited

    def _read_parts(self, step: "_Step", emit: bool = False) -> tuple[list, float]:
        """A launched step's parts read (waits for the device): ([(part, ids, logprobs, top
        logprobs)], the seconds it waited). With `emit`, each part's tokens go to their
        requests as soon as it is read instead (none are returned)."""
        waited, reads = 0.0, []
        for part in step.parts:
            start = time.perf_counter()
            ids, lps, tops = part.sample.read()
            waited += time.perf_counter() - start
            self.timing.lap("wait")
            if emit:
                self._emit_part(part, ids, lps, tops)
            else:
                reads.append((part, ids, lps, tops))
        return reads, waited

    def _emit_reads(self, reads: list, consumed: list | None) -> None:
        """Hands out the tokens of parts read (`_read_parts`) whose matchers took them on the
        mask thread (`_consume_reads`: per part, per selected row, what `_consume` gave; None
        where the job never ran, and nothing was taken)."""
        for k, (part, ids, lps, tops) in enumerate(reads):
            done = None if consumed is None else self._took_part(part, consumed[k])
            self._emit_part(part, ids, lps, tops, done)

    def _advance_part(self, part: "_Part", ids: list[int]) -> list[bool | None]:
        """The matchers of a part's selected rows take their read tokens, on this thread: for
        each selected row, whether its constraint is complete; None for a row without a
        matcher, inactive, or failed now."""
        return self._took_part(part, _consume_part(part, ids))

    def _took_part(self, part: "_Part", consumed: list[bool | AmlxError | None]) -> list[bool | None]:
        """`_took` for each selected row of a part (`consumed`: what `_consume_part` gave)."""
        return [self._took(part.rows[i], c) for i, c in zip(part.selected, consumed)]

    def _emit_part(self, part: "_Part", ids: list[int], lps: list[float], tops: list | None,
                   complete: list[bool | None] | None = None) -> None:
        """Hands a part's read tokens to its rows (`complete`: for each selected row whose
        matcher took its token already, whether it is complete; see `_emit`)."""
        for k, i in enumerate(part.selected):
            req = part.rows[i]
            if req.active:  # a row that finished or was cancelled meanwhile: its token is dropped
                self._emit(req, int(ids[i]), float(lps[i]), None if tops is None else tops[i],
                           None if complete is None else complete[k])
        self.timing.lap("emit")

    def _timing_pass(self, shard: _Shard, rows: list) -> list[Array]:
        """A decode step's forward over `rows` that hold only the null block (the
        speculator's cost measurement, amlx/engine/speculate.py): built as `_build`
        builds one (padding, the split twin for a lone row), not evaluated; the
        shard's pool takes its arrays (only the null block was written)."""
        with self.placement.on(shard.index):
            b = len(rows)
            pad = padded_batch(b) - b if self.options.pad_batches else 0
            padded = [*rows, *[PADDING_ROW] * pad]
            tokens = ops.zeros((b + pad, 1), _int32)
            positions = array(np.asarray([r.pos for r in padded], dtype=np.int32))
            split = b == 1 and sum(1 for s in self.shards if s.rows) == 1 and self.placement.split_decode()
            logits, state = self._batched_logits(tokens, positions, shard.kv.decode_tables(padded),
                                                 shard.kv.arrays, split)
            shard.kv.arrays = state
        return [logits, *state]

    def _forward(self, tokens: Array, positions: Array, tabs: list[Array],
                 pools: list[Array], reads: list[Array] | None = None) -> tuple[Array, list[Array]]:
        """One decode step as a pure function of arrays (what gets compiled):
        (tokens (B,1), positions (B,), the tables' arrays (`_table_arrays`), each
        layer's pool array, and for the decode kernel `read_views` of them (or the
        arrays again where there are none; no argument without the kernel)) ->
        (logits (B,V), the pool arrays written)."""
        return self._forward_with(self.model, tokens, positions, tabs, pools, reads)

    def _forward_split(self, tokens: Array, positions: Array, tabs: list[Array],
                       pools: list[Array], reads: list[Array] | None = None) -> tuple[Array, list[Array]]:
        """`_forward` by the split twin (a lone row's step)."""
        return self._forward_with(self._split_model(), tokens, positions, tabs, pools, reads)

    def _forward_with(self, model, tokens: Array, positions: Array, tabs: list[Array], pools: list[Array],
                      reads: list[Array] | None):
        return self.pools.decode_pass(model, tokens, positions, tabs, pools, reads)

    def _batched_logits(self, tokens: Array, positions: Array, tables: Tables, pools: list[Array],
                        split: bool = False) -> tuple[Array, list[Array]]:
        """Runs the decode step (compiled once per batch size, table width, pool
        size and stream): logits and each layer's written pool array. `split`:
        the step is the split twin's (a trace keeps the split, so it has a
        compiled function of its own)."""
        if split:
            fn = self._split_step_fn or self._forward_split
        else:
            fn = self._step_fn or self._forward
        # the decode kernel reads the pool through handles that leave it free to be
        # written in place (amlx.kv.paged.read_views); they order by stream alone,
        # so only where every step of this pool runs on one stream. Where there are
        # none (a pool array not launched yet, views off) it reads the arrays
        # themselves: the compiled step keeps one argument structure either way. Not on
        # the CPU: there they measured no faster (Qwen3-0.6B 8-bit, one shard), and a
        # tensor-parallel engine whose rank died closes while a step may still read
        # its pools, which a handle (holding nothing) would then read freed.
        if self.options.decode_kernel and len(self.shards) == 1:
            views = read_views(pools) if self.options.device == "gpu" else []
            if not views and self.options.device == "gpu":
                self.timing.count("pool_read_whole")  # (the step's write then copies the pool)
            return fn(tokens, positions, table_arrays(tables), pools, views or list(pools))
        return fn(tokens, positions, table_arrays(tables), pools)  # (one structure per engine, as compile needs)

    def _emit(self, req: Request, token_id: int, logprob: float, top: list | None = None,
              complete: bool | None = None) -> None:
        """Hands a request its next sampled token. `complete`: its matcher took the token
        already (`_advance`), and this is whether the constraint is complete; None: the
        matcher (if any) takes it here."""
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        req.last = token_id
        req.generated.append(token_id)
        try:
            tok = self._token(req, token_id, logprob, top, complete)
        except Exception as exc:  # noqa: BLE001 - this request's own failure
            # (its sampling history, matcher or detokenizer failed: raised out of the round, it
            # ended every request of the engine, each with an MLXError that was no MLX failure)
            self._fail(req, _token_failure(token_id, exc))
            return
        if tok is None:
            return  # (its constraint failed it)
        self.tokens_generated += 1
        req.channel.put(tok)
        if req.assembler.finished:
            req.done_at = time.perf_counter()
            req.channel.close()

    def _token(self, req: Request, token_id: int, logprob: float, top: list | None,
               complete: bool | None = None) -> Token | None:
        """The Token of a request's next sampled id, its sampling and constraint state moved
        on (`complete`: see `_emit`); None where its constraint failed (the request is failed then)."""
        req.sampling.observe(token_id)
        if req.matcher is not None and complete is None:
            complete = self._advance(req, token_id, len(req.generated) - 1)
            if complete is None:
                return None
        # a constraint that admits nothing more (but EOS) ends the request here
        complete = bool(complete)
        tok = req.assembler.push(token_id, logprob if req.options.logprobs else None, complete=complete)
        if top is not None and req.options.top_logprobs:  # (id, logprob) pairs, best first
            tok = replace(tok, top_logprobs=top[:req.options.top_logprobs])
        return tok

    def _advance(self, req: Request, token_id: int, taken: int) -> bool | None:
        """A constrained request's matcher takes its next token (`_consume`): whether the
        constraint is then complete, or None, the request failed (and is failed now)."""
        return self._took(req, _consume(req, token_id, taken))

    def _took(self, req: Request, consumed: bool | AmlxError | None) -> bool | None:
        """What `_consume` gave for a request, on this thread: a failure fails the request
        (None then); else whether its constraint is complete (None: no matcher took a token)."""
        if isinstance(consumed, AmlxError):
            self._fail(req, consumed)
            return None
        return consumed

    def _drop_inactive(self) -> None:
        for req in [r for r in self.waiting if not r.active]:
            self.waiting.remove(req)
            self._finish(req)
        for req in [r for r in self.parked if not r.active]:
            self.parked.remove(req)
            self._finish(req)
        if self.prefilling is not None and not self.prefilling.active:
            req, self.prefilling = self.prefilling, None
            self._finish(req)
        changed = False
        for shard in self.shards:
            keep = [i for i, r in enumerate(shard.rows) if r.active]
            if len(keep) == len(shard.rows):
                continue
            changed = True
            for i, r in enumerate(shard.rows):
                if i not in keep:
                    self._finish(r)
            if self._inflight is not None:
                self._compact(shard, keep)
            else:
                self._keep_rows(shard, keep)
        if changed and self._inflight is None:
            self._rebalance()

    def _compact(self, shard: _Shard, keep: list[int]) -> None:
        """Keeps only the given rows of a shard while a step is in flight (`chain_changes`),
        without draining it: the shard's sampling state is taken for them on the device,
        and the step in flight records which of its rows stay (`_Part.carry`), so the next
        step takes their tokens from it on the device (`_build`). The rows that left
        already gave their blocks back: the step in flight still writes them, but every
        later user of those blocks reads the pool arrays that step returns, so it sees
        them after that write (MLX orders work by the arrays it reads)."""
        part = next((p for p in self._inflight.parts if p.shard is shard), None)
        if part is None:  # (the shard took no part in that step: its state is not in flight)
            self._keep_rows(shard, keep)
            return
        self.timing.count("chained_leaves")
        part.carry = [part.carry[i] if part.carry is not None else i for i in keep]  # (None: a row joined since)
        old, shard.sampling = shard.sampling, None
        shard.rows = [shard.rows[i] for i in keep]
        if shard.rows:
            shard.sampling = old.take(keep)
        else:
            shard.kv.forget_table()
        old.close()

    def _keep_rows(self, shard: _Shard, keep: list[int]) -> None:
        """Keeps only the given rows of a shard (in that order). No cache moves:
        the rows that left gave their blocks back (or, parked, keep them)."""
        self._set_rows(shard, [shard.rows[i] for i in keep])

    def _rebalance(self) -> None:
        """After rows left: moves rows from the fullest shard to the emptiest until
        no two differ by more than one (a round takes as long as its largest shard).
        A moved row's blocks are copied into the other shard's pool (only its own)."""
        while len(self.shards) > 1:
            src = max(self.shards, key=lambda s: len(s.rows))
            dst = min(self.shards, key=lambda s: len(s.rows))
            n = (len(src.rows) - len(dst.rows)) // 2
            reqs = src.rows[len(src.rows) - n:]
            if n < 1 or not dst.kv.room_for(reqs):
                return
            with self._on(dst):
                moved = [dst.kv.copy_in(src.kv, r) for r in reqs]
                ops.eval(*dst.kv.state())
            self._keep_rows(src, list(range(len(src.rows) - n)))
            for r, (blocks, local) in zip(reqs, moved):
                self.pools.release(r)
                dst.kv.adopt(r, blocks, local)
                r.shard = dst.index
            self._join(dst, reqs)

    def _blocks_fit(self) -> bool:
        """Whether every shard's pool has room for its rows' next blocks."""
        return all(s.kv.short_of_blocks(s.rows) <= s.kv.pool.available() for s in self.shards)

    def _preempt_for_blocks(self) -> None:
        """Where a shard's pool cannot hold its rows' next blocks: preempts the
        youngest request holding blocks there (a running row, but never the last
        one, the prompt being prefilled, or a parked request) until it can."""
        for shard in self.shards:
            while shard.kv.short_of_blocks(shard.rows) > shard.kv.pool.available():
                held = preemption_order(shard.rows)[:-1] + [
                    r for r in [self.prefilling, *self.parked] if r is not None and r.shard == shard.index and r.blocks]
                if not held:  # (the context is capped to a pool: a lone row always fits)
                    self._fail(shard.rows[0], ContextLengthError("the KV cache pool is too small for this request"))
                    self._drop_inactive()
                    break
                self._preempt(shard, preemption_order(held)[0])

    def _preempt(self, shard: _Shard, req: Request) -> None:
        """Takes a request out of the batch (or out of prefill, or out of the parked
        ones) and frees its blocks (its full ones stay cached); it waits at the head
        of the queue to be recomputed from its prompt and the tokens it produced,
        then goes on from its last token, which its consumer already has."""
        if req is self.prefilling:
            self.prefilling = None  # (its fill is unchanged: it starts again)
        elif req in self.parked:
            self.parked.remove(req)
        else:
            self._set_rows(shard, [r for r in shard.rows if r is not req])
        self._set_aside(req)
        self.waiting.appendleft(req)

    def _set_aside(self, req: Request) -> None:
        """Frees a preempted request's blocks (its full ones stay cached); it will be
        recomputed from its prompt and the tokens it produced, but the last."""
        self.pools.release(req)
        if req.pos:  # it was decoding: what it recomputes is its prompt and its tokens but the last
            req.recompute = (req.prompt + req.generated)[:req.pos]
        req.prefilled = req.pos = 0
        self.preemptions += 1

    def _release(self, req: Request) -> None:
        """The request leaves the scheduler: its own cache is freed (and the other
        ranks' rows of it, for a tensor-parallel model)."""
        self._held.pop(req, None)
        if self.mirror is not None:
            self.mirror.free(req)

    def _finish(self, req: Request) -> None:
        self._release(req)
        self.pools.release(req)
        if self.speculator is not None:
            self.speculator.release(req)
        req.channel.close()

    def _fail(self, req: Request, exc: BaseException) -> None:
        self._release(req)
        self.pools.release(req, cache=False)
        if self.speculator is not None:
            self.speculator.release(req)
        req.assembler.finished = True
        req.channel.close(exc)

    def _isolate_failure(self) -> int:
        """A batched step failed: run each row alone to find the culprit(s), fail
        only those, and keep the others (their rows are rebuilt from the single runs);
        returns how many failed. A tensor-parallel model cannot: its ranks ran the
        step (step() fails the model)."""
        if self.mirror is not None:
            raise MLXError("decode", "a batched decode step failed")
        failed = 0
        for shard in self.shards:
            for req in list(shard.rows):
                try:
                    tables = shard.kv.decode_tables([req])
                    logits = self.model(array(np.asarray([[req.last]], np.int32)), self.pools.views(shard.index, tables),
                                        array(np.asarray([req.pos], np.int32)))
                    if self.fault is not None:
                        logits = self._inject(logits, [req], False)
                    ops.eval(logits)
                except MLXError as exc:
                    self._fail(req, exc)
                    failed += 1
        # Rows that failed are inactive now; the next round continues with the rest.
        self._drop_inactive()
        return failed

    def _batch_failed(self, failure: MLXError) -> None:
        """A batched decode step failed although each of its rows ran alone (`_isolate_failure`
        found no culprit). Once, it is retried (a passing failure, as a mask upload that ran
        out of memory). Failing again, the batch as a whole fails (its memory, say): retried
        as it is, it failed every round for good, the worker spinning and no stream moving.
        So the youngest row ends with the step's error and the batch shrinks (to one row at
        worst, which ran); the others go on."""
        self._batch_failures += 1
        rows = [r for r in self.rows if r.active]
        if self._batch_failures < 2 or not rows:
            return
        why = (f"a batched decode step of {len(rows)} rows failed although each row alone ran; "
               f"the youngest request ends so that the batch shrinks")
        self._fail(preemption_order(rows)[0], MLXError(failure.op, f"{failure.mlx_message} ({why})", failure.hint))
        self._drop_inactive()

    def _check_pools(self) -> None:
        """After a failed evaluation: a shard whose pool arrays cannot be evaluated
        (the failure was in writing them, e.g. out of memory) has lost its cache.
        Every request holding blocks there ends with the error; the pool starts
        again empty; the other shards and the engine go on. (A tensor-parallel
        model cannot: its other ranks ran the pass; step() fails the model.)"""
        if self.mirror is not None:
            raise MLXError("decode", "a tensor-parallel step failed")
        for shard in self.shards:
            try:
                ops.eval(*shard.kv.state())
            except MLXError as exc:
                with self._lock:
                    held = {r: None for r in self._held if r.shard == shard.index and r.blocks}
                for req in held:
                    self._fail(req, exc)
                # (those failed here leave: asked `active`, a request of another shard that its
                # consumer had just left left too, unfinished, keeping its blocks for good)
                if self.prefilling in held:
                    self.prefilling = None
                self.parked = [r for r in self.parked if r not in held]
                self._set_rows(shard, [r for r in shard.rows if r not in held])
                shard.kv.reset()

    def _inject(self, logits: Array, rows: list[Request], chained: bool) -> Array:
        """The test fault hook's say on a step (see `fault`)."""
        extra = self.fault(rows, chained)
        return logits if extra is None else ops.add(logits, extra)

    def abandon(self, exc: BaseException) -> None:
        """Ends every request's stream with `exc` at once, from any thread, without
        touching MLX (a tensor-parallel rank died: the worker may be stuck in a
        collective until the watchdog's kill ends it); the worker's later
        `fail_all` frees the rest."""
        with self._lock:
            self.closed = True
            held = list(self._held)
        for req in held:
            req.channel.close(exc)

    def fail_all(self, exc: BaseException) -> None:
        with self.placement.on():
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, AmlxError) else MLXError("engine", f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._incoming.clear()
            held = list(self._held)
        for req in held:
            self._fail(req, err)
        self.waiting.clear()
        self.parked.clear()
        self.prefilling = None
        self._inflight = None
        for shard in self.shards:
            self._set_rows(shard, [])

    def shutdown(self) -> None:
        """Ends every request with ClosedError and frees the batch (worker thread)."""
        with self._lock:
            self.closed = True
            self.waiting.extend(self._incoming)
            self._incoming.clear()
        self.fail_all(ClosedError("the model was closed"))
        self.pools.close()
        if self._step_fn is not None:
            # MLX's compile cache holds the traced graphs and their constants
            for fn in (self._step_fn, self._split_step_fn, self._extend_fn, self._split_extend_fn):
                fn.close()
            self._step_fn = self._split_step_fn = self._extend_fn = self._split_extend_fn = None
        self._sample_steps.close()
        if self._mask_thread is not None:
            self._mask_thread.shutdown(wait=False)
            self._mask_thread = None
        if self._mask_buffers is not None:
            self._mask_buffers.clear()
        if self.speculator is not None:
            self.speculator.close()


@dataclass(eq=False)
class _Part:
    """One shard's share of a launched decode step: the shard's rows then, which
    of them ran, and the (not yet read) sampled tokens and log-probabilities, one per row."""

    shard: _Shard
    rows: list[Request]
    selected: list[int]
    sample: StepSample | None  # the sampled tokens, their logprobs (and top logprobs)
    outputs: list[Array]  # everything the part computes (what async_eval launches)
    state: list[Array]  # the shard's pool arrays after the step (until it is launched)
    logits: Array | None = None  # until a part with constrained rows is sampled
    # rows left or joined the batch after this step was launched (`Scheduler._compact`,
    # `Scheduler._join`): for each of the shard's rows now, its index in `rows`, or None
    # for a row that joined since (last); None: the rows are `rows`
    carry: list[int | None] | None = None

    def carried(self) -> list[Request | None]:
        """The shard's rows now as this step knows them: its rows that stay, in their
        order now, and None for each row that joined since."""
        return self.rows if self.carry is None else [None if i is None else self.rows[i] for i in self.carry]


class _Masks(NamedTuple):
    """A step's masks set up for the constrained shards (`Scheduler._start_masks`)."""

    indices: list[int]  # the shards (into the plan) that sample with masks this step
    todo: list[int]  # of those, the ones whose forwards are still to build
    unlaunched: list[int]  # the ones whose forwards are built, not launched
    job: MaskJob | None
    pending: Future | None  # the job on the mask thread


@dataclass(eq=False)
class _Step:
    """A launched decode step: one part per shard that had rows running."""

    parts: list[_Part]
