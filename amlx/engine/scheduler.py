"""Continuous batching for one model, run by the worker thread.

Requests arrive in `incoming` (any thread), wait in arrival order, are
prefilled one chunk per step on a cache of their own, then join the running
batch: one batched decode step per round for every running request whose
consumer has room. Finished and cancelled requests leave the batch at once and
their cache rows are freed.

Backpressure: a request whose consumer has `max_buffer` unread tokens is paused.
It leaves the decode batch before the next step (its cache row moves out to a
cache of its own: it costs the step nothing) and is "parked"; it keeps its batch
slot for `slot_idle_limit` seconds, after which waiting requests may take the
slot. When its consumer reads again it rejoins the batch (at once while it holds
its slot, else when a slot is free, ahead of new requests) with its cache and
sampling state as they were, so its tokens are those of an unpaused run.

Device state of the batch: per layer a KVCache with one row per running
request; per-row positions go in as an int32 array each step, so rows of any
length decode together.

On the CPU the running batch is split into shards, one per core: each shard has
its own rows, caches and sampling state, and its prefill and decode steps run on
an MLX stream of its own, so the shards compute on different cores at once
(MLX's CPU backend, with the single-threaded BLAS of its Linux wheels, keeps one
core busy per stream). A round launches every shard's step together. Where one
shard alone has work (a lone request's decode step; prompts that all go to one
shard), its matmuls are split over every stream instead (nn.split_layers). On a
GPU there is one shard and one stream (one stream already keeps the GPU busy).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from amlx._mlx import Array, array, ops, transforms
from amlx.cache import KVCache
from amlx.constrain import step_masks
from amlx.engine.placement import GPU_PREFILL_CHUNK, EngineOptions, Placement, default_shards
from amlx.engine.rate import RateMeter
from amlx.engine.request import Request
from amlx.sample import BatchSampling, CompiledSteps, StepSample
from amlx.models.base import decode_on_buffers
from amlx.models.nn import split_layers
from amlx.errors import AmlxError, ClosedError, MLXError

PREFILL_CHUNK = GPU_PREFILL_CHUNK  # the largest default prefill chunk (EngineOptions.prefill_chunk)


@dataclass(eq=False)
class _Shard:
    """Rows of the running batch that decode together, on one MLX stream."""

    index: int  # which of the scheduler's streams
    rows: list[Request] = field(default_factory=list)
    cache: list[KVCache] | None = None  # per layer, one row per request of `rows`
    sampling: BatchSampling | None = None  # device sampling state of `rows`


class Scheduler:
    def __init__(self, model, max_batch_size: int, wake: callable, prefill_chunk: int | None = None,
                 compile_step: bool = True, shards: int | None = None, options: EngineOptions | None = None,
                 placement: Placement | None = None, mirror=None):
        """`options` (resolved here if not yet) fix the device, shards, decode
        kernel, KV growth block and prefill chunk once; `shards` and
        `prefill_chunk` override the options' (tests, benchmarks). `placement`:
        the engine's streams if already made (the weights were loaded on them);
        else made here, on the calling thread. `mirror`: rank 0's amlx.tp.leader.Leader
        of a tensor-parallel model (told of every forward pass before it is built,
        and of every request that ends); None otherwise."""
        options = options or EngineOptions(shards=shards)
        if shards is not None or (options.shards is None and options.device == "cpu"):
            options = replace(options, shards=shards or default_shards())
        if prefill_chunk is not None:
            options = replace(options, prefill_chunk=prefill_chunk)
        self.options = options.resolved()
        self.placement = placement if placement is not None else Placement(self.options)
        self.model = model
        self.mirror = mirror
        self.max_batch_size = max_batch_size
        self.prefill_chunk = self.options.prefill_chunk
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
        self.tokens_generated = 0
        self.decode_steps = 0
        self.rate = RateMeter()  # recent tokens per second of work (stats)
        self._step_fn = transforms.compile(self._forward) if compile_step else None
        # the same step traced with the split twin's layers (a cache of its own)
        self._split_step_fn = transforms.compile(self._forward_split) if compile_step else None
        self._twin = None  # the model with its matmuls split over the streams (see _split_model)
        self._sample_steps = CompiledSteps()  # traced on this engine's streams; closed with it
        self._inflight: _Step | None = None  # a decode step launched and not yet read
        self._prepared = False  # the model's derived arrays are evaluated (see Module.prepare)
        model.use_decode_kernel(self.options.decode_kernel)
        # cache growth step: small where decode attention reads the whole capacity (KVCache.block)
        self.block = self.options.kv_block
        self._windows = [c.window for c in model.make_cache(self.block)]  # per layer (no arrays made)
        self.shards = [_Shard(i) for i in range(len(self.placement.streams))]
        # Fault injection for tests, None otherwise: called as fault(rows, chained) while a
        # decode step's graph is built (chained: the step takes the previous step's tokens
        # on the device), and as fault([row], False) when a row runs alone to isolate a
        # failure, and as fault(requests, False) when their prompts are prefilled. It may
        # raise, or return an array (added to the logits) whose evaluation fails.
        self.fault = None

    @property
    def rows(self) -> list[Request]:
        """The running requests, shard by shard."""
        return [r for s in self.shards for r in s.rows]

    @property
    def cache(self) -> list[KVCache] | None:
        """The first shard's caches (the whole batch's when there is one shard);
        benchmarks/profile_step.py drives the decode step through it."""
        return self.shards[0].cache

    @cache.setter
    def cache(self, value: list[KVCache] | None) -> None:
        self.shards[0].cache = value

    def kv_capacity(self) -> list[int]:
        """Each shard's KV cache capacity in positions (0 without rows): for
        stats and tests (worker thread, or between rounds)."""
        return [s.cache[0].capacity if s.cache else 0 for s in self.shards]

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
        while every request left is parked or waits for a slot that parked ones hold."""
        if self._inflight is not None or self._incoming or self.prefilling is not None or self.rows:
            return True
        free = self._slots_held() < self.max_batch_size
        if any(not r.active for r in self.waiting) or (self.waiting and free):
            return True
        return any(not r.active or (r.channel.has_room() and (free or self._holds_slot(r))) for r in self.parked)

    def wake_at(self) -> float | None:
        """When (time.monotonic) a parked request's slot frees up for a waiting
        request; None if no one waits for it. The worker wakes up then."""
        if not self.waiting:
            return None
        times = [r.parked_at + self.slot_idle_limit for r in self.parked if self._holds_slot(r)]
        return min(times, default=None)

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
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
        if self._inflight is not None and self._batch_will_change():
            self._read(self._drain())
        self._drop_inactive()
        self._unpark()
        self._admit()
        if self.prefilling is not None:
            self._prefill_chunk(self.prefilling)
        self._decode()

    def _admit(self) -> None:
        """Starts prompt processing: short prompts are taken together, in arrival
        order, as one right-padded batch of about one chunk of tokens; a prompt
        longer than a chunk is processed alone, one chunk per round."""
        if self.prefilling is not None:
            return
        group: list[Request] = []
        free = self.max_batch_size - self._slots_held()
        if any(r.channel.has_room() for r in self.parked):
            return  # a parked request that is read again goes first, once a slot is free
        while self.waiting and len(group) < free:
            req = self.waiting[0]
            if not req.active:
                self._finish(self.waiting.popleft())
                continue
            if len(req.prompt) > self.prefill_chunk:
                if not group:
                    req.cache = self.model.make_cache(self.block)
                    self.prefilling = self.waiting.popleft()
                break
            longest = max(len(req.prompt), max((len(r.prompt) for r in group), default=0))
            if group and longest * (len(group) + 1) > self.prefill_chunk:
                break
            group.append(self.waiting.popleft())
        if group:
            self._prefill_group(group)

    def _assign(self, reqs: list[Request]) -> list[tuple[_Shard, list[Request]]]:
        """Spreads new requests over the shards, each to the one with the fewest
        rows: a round takes as long as its largest shard."""
        load = [len(s.rows) for s in self.shards]
        parts: dict[int, list[Request]] = {}
        for r in reqs:
            i = min(range(len(load)), key=load.__getitem__)
            load[i] += 1
            parts.setdefault(i, []).append(r)
        return [(self.shards[i], parts[i]) for i in sorted(parts)]

    def _prefill_group(self, group: list[Request]) -> None:
        """Prefills several prompts: one batched forward for the requests of each
        shard they will join, on that shard's stream, so the shards' forwards run
        in parallel. Right padding keeps it exact: causal attention never lets a
        real position see a padded one, and padded slots past a row's length stay
        masked until decoding overwrites them."""
        parts: list[tuple[_Shard, list[Request], list[KVCache]]] = []
        firsts: list[StepSample] = []
        samplers: list[BatchSampling] = []
        assigned = self._assign(group)
        masks = step_masks([[r.matcher for r in reqs] for _, reqs in assigned])
        try:
            for (shard, reqs), mask in zip(assigned, masks):
                with self._on(shard):
                    lengths = [len(r.prompt) for r in reqs]
                    ids = np.zeros((len(reqs), max(lengths)), dtype=np.int32)
                    for i, r in enumerate(reqs):
                        ids[i, :lengths[i]] = r.prompt
                    cache = self.model.make_cache(self.block)
                    parts.append((shard, reqs, cache))
                    last = array(np.asarray(lengths, dtype=np.int32) - 1)
                    if self.mirror is not None:
                        self.mirror.prefill(reqs, lengths, ids.shape[1])
                    logits = self._split_model(len(assigned) == 1)(array(ids), cache, 0, last=last)
                    logits = ops.reshape(logits, (len(reqs), logits.shape[2]))
                    if self.fault is not None:
                        logits = self._inject(logits, reqs, False)
                # (sampling stays on the worker's stream: see _build)
                samplers.append(BatchSampling([r.sampling for r in reqs], self._sample_steps))
                firsts.append(samplers[-1](logits, masks=mask))
            # One evaluation for every shard, so their forwards run at the same time.
            ops.eval(*[a for first in firsts for a in first.arrays()], *[a for bs in samplers for a in bs.state()],
                     *[a for _, _, cache in parts for c in cache for a in c.state()])
            for bs in samplers:
                bs.sync_back()  # the requests' keys move on
        except BaseException as exc:
            for _, _, cache in parts:
                for c in cache:
                    c.close()
            if not isinstance(exc, MLXError) or self.mirror is not None:
                raise  # the worker fails every request held (fail_all), these included
            if len(group) == 1:
                self._fail(group[0], exc)
                return
            # Find the culprit: each prompt on its own.
            for r in group:
                self._prefill_group([r])
            return
        finally:
            for bs in samplers:
                bs.close()
        for (shard, reqs, cache), first in zip(parts, firsts):
            ids_out, lps, tops = first.read()
            for i, r in enumerate(reqs):
                r.pos = len(r.prompt)
                self._emit(r, int(ids_out[i]), float(lps[i]), None if tops is None else tops[i])
            self._join(shard, reqs, cache)

    def _prefill_chunk(self, req: Request) -> None:
        """One chunk of the prompt; on the last chunk, the first token and joining the batch."""
        try:
            start = req.prefilled
            chunk = req.prompt[start:start + self.prefill_chunk]
            req.prefilled += len(chunk)
            if self.mirror is not None:
                self.mirror.chunk(req, start, len(chunk), req.prefilled >= len(req.prompt))
            if req.prefilled < len(req.prompt):
                self._split_model()(array(np.asarray([chunk], dtype=np.int32)), req.cache, start)
                ops.eval(*[a for c in req.cache for a in c.state()])
                return
            logits = self._split_model()(array(np.asarray([chunk], dtype=np.int32)), req.cache, start,
                                         last=array(np.asarray([len(chunk) - 1], dtype=np.int32)))
            first = self._first_tokens(ops.reshape(logits, (1, logits.shape[2])), [req])
            ops.eval(*first.arrays(), *[a for c in req.cache for a in c.state()])
        except MLXError as exc:
            self.prefilling = None
            if self.mirror is not None:
                raise
            self._fail(req, exc)
            return
        self.prefilling = None
        req.pos = len(req.prompt)
        ids_out, lps, tops = first.read()
        self._emit(req, int(ids_out[0]), float(lps[0]), None if tops is None else tops[0])
        cache, req.cache = req.cache, None
        self._join(self._assign([req])[0][0], [req], cache)

    def _join(self, shard: _Shard, reqs: list[Request], cache: list[KVCache]) -> None:
        """Adds requests with their cache rows (`cache`, e.g. freshly prefilled) to a
        shard; those that already finished (EOS or max_tokens at their first token) don't join."""
        keep = [i for i, r in enumerate(reqs) if r.active]
        for i, r in enumerate(reqs):
            if i not in keep:
                self._finish(r)
        if not keep:
            for c in cache:
                c.close()
            return
        with self._on(shard):
            if len(keep) < len(reqs):
                for c in cache:
                    c.take_rows(keep)
            if shard.cache is None:
                shard.cache = cache
            else:
                for mine, theirs in zip(shard.cache, cache):
                    mine.append_rows(theirs)
            ops.eval(*[a for c in shard.cache for a in c.state()])
        self._set_rows(shard, shard.rows + [reqs[i] for i in keep])

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

    def _batch_will_change(self) -> bool:
        rows = self.rows
        if any(not r.active or not r.channel.has_room() for r in rows):
            return True  # a row leaves (finished, cancelled, or paused: parked)
        if any(r.active and r.channel.has_room() for r in self.parked):
            return True  # may rejoin
        return self._slots_held() < self.max_batch_size and bool(self.waiting or self.prefilling)

    # -- paused requests: parked out of the batch -------------------------------
    def _park_paused(self) -> None:
        """Moves every paused row (its consumer's buffer full) out of the batch,
        its cache row into a cache of its own (no step in flight)."""
        changed = False
        for shard in self.shards:
            paused = [i for i, r in enumerate(shard.rows) if r.active and not r.channel.has_room()]
            if not paused:
                continue
            changed = True
            reqs = [shard.rows[i] for i in paused]
            with self._on(shard):
                for i, req in zip(paused, reqs):
                    req.cache = [copy.copy(c) for c in shard.cache]  # the same buffers until take_rows
                    for c in req.cache:
                        c.take_rows([i])
                ops.eval(*[a for r in reqs for c in r.cache for a in c.state()])
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
            self.parked.remove(req)
            cache, req.cache = req.cache, None
            self._join(self._assign([req])[0][0], [req], cache)

    def _decode(self) -> None:
        """Launches one decode step for the batch (every shard) and reads the previous one.

        While the batch stays the same, step t+1 takes step t's sampled tokens
        straight from the device and is scheduled before step t's tokens are
        read back, so the host's work overlaps the device's. Any change to the
        batch (a row finishing, pausing or joining) first drains the step in
        flight; a row that finished at step t has computed step t+1 in vain.

        The order is: build step t+1's graph (Python), launch it, then hand
        step t's tokens to their consumers. Launching before reading keeps the
        device busy: reading step t waits for its end, and a step launched only
        after that left the device idle while the host issued its kernels (on
        the GPU, about as long as the step's host time). Shards holding
        constrained rows launch their forward first and sample later: see
        `_sample_constrained`."""
        prev = self._inflight
        if prev is not None and not self._can_chain(prev):
            self._read(self._drain())
            self._drop_inactive()
            prev = None
        if prev is None:
            self._park_paused()  # (a chained step's rows all have room)
        plan = []
        for shard in self.shards:
            sel = [i for i, r in enumerate(shard.rows) if r.active and r.channel.has_room()]
            if sel:
                plan.append((shard, sel))
        if not plan:
            return
        self._prepare()
        self._inflight = None
        chained = {p.shard: p for p in prev.parts} if prev is not None else {}
        saved = [(shard, shard.sampling.snapshot()) for shard, _ in plan]
        # A lone row leaves the other cores idle: its matmuls are split over every stream.
        split = len(plan) == 1 and len(plan[0][0].rows) == 1
        try:
            parts = [self._build(shard, sel, chained.get(shard), split) for shard, sel in plan]
        except MLXError:
            parts = None
        deferred = [p for p in parts or () if p.sample is None]
        parts = self._launch(parts)
        if prev is not None:
            self._read(prev)
        if parts is not None and deferred:
            parts = self._launch(self._sample_constrained(deferred, parts))
        if parts is None:
            for shard, snapshot in saved:
                shard.sampling.rewind(snapshot)
            self._isolate_failure()
            return
        self._commit(_Step(parts))

    def _can_chain(self, prev: "_Step") -> bool:
        live = [s for s in self.shards if s.rows]
        if len(prev.parts) != len(live):
            return False
        for part, shard in zip(prev.parts, live):
            if part.shard is not shard or len(part.selected) != len(shard.rows) or part.rows != shard.rows:
                return False
        # One token of every row is still in flight: room for it, and one more.
        return all(r.active and r.channel.has_room(extra=1) for r in self.rows)

    def weights_changed(self) -> None:
        """The model's parameters or modules were replaced (e.g. an adapter
        trained a step): the compiled step traced the old ones as constants, so
        it is traced again (worker thread)."""
        with self.placement.on():
            if self._inflight is not None:
                self._read(self._drain())
        self._prepared = False
        self._twin = None
        if self._step_fn is not None:
            self._step_fn.close()
            self._split_step_fn.close()
            self._step_fn = transforms.compile(self._forward)
            self._split_step_fn = transforms.compile(self._forward_split)

    def _build(self, shard: _Shard, sel: list[int], prev: "_Part | None", split: bool = False) -> "_Part":
        """The graph of a shard's next decode step (not yet launched), on its stream.

        With `split` it is built on the home stream whatever the shard, by the
        split twin (matmuls over every stream). Each compiled trace keeps a few bytes
        of constants for as long as the model lives, and is made per batch size,
        capacity and stream: one home stream keeps the split traces as few as the
        batch sizes that use them (a lone row)."""
        with self.placement.on(0 if split else shard.index):
            needed = max(r.pos for r in shard.rows) + 1
            for c in shard.cache:
                c.reserve(needed)
            b = len(shard.rows)
            if prev is not None:
                tokens = ops.reshape(prev.sample.tokens, (b, 1))
            else:
                tokens = array(np.asarray([[r.last] for r in shard.rows], dtype=np.int32))
            positions = array(np.asarray([r.pos for r in shard.rows], dtype=np.int32))
            if self.mirror is not None:
                self.mirror.decode(shard.rows, [r.pos for r in shard.rows])
            logits, state = self._batched_logits(tokens, positions, shard.cache, split)
            if self.fault is not None:
                logits = self._inject(logits, list(shard.rows), prev is not None)
        if any(r.matcher is not None for r in shard.rows):
            # constrained rows need step t's tokens on the host for their masks: sampled later
            return _Part(shard, list(shard.rows), sel, None, [logits, *state], state, logits)
        # Sampling (a few small ops) stays on the home stream: its compiled
        # steps are cached process-wide per shape and stream, each keeping a few
        # bytes of constants, so one stream keeps that cache as small as with one shard.
        step = shard.sampling(logits, sel)
        outputs = [*step.arrays(), *shard.sampling.state(), *state]
        return _Part(shard, list(shard.rows), sel, step, outputs, state)

    def _launch(self, parts: list["_Part"] | None) -> list["_Part"] | None:
        """Launches what the parts have built so far (whole steps; the forwards of parts
        whose sampling waits for masks), so the device runs them while the host reads
        step t (and computes masks); None if that fails. Arrays launched before are
        not computed again."""
        if parts is None:
            return None
        try:
            ops.async_eval(*[a for p in parts for a in p.outputs])
        except MLXError:
            return None
        return parts

    def _sample_constrained(self, deferred: list["_Part"], parts: list["_Part"]) -> list["_Part"] | None:
        """Samples the parts holding constrained rows, now that step t's tokens have advanced
        their matchers: every mask of the step in one parallel llguidance call, then each
        shard's sampling with its masks. None if building the sampling fails.

        A shard holding constrained rows (amlx.constrain) cannot sample step t+1 before
        step t's tokens are on the host: its forward is launched first (`_launch`),
        then step t is read, the masks are computed while the device runs that forward,
        and the masked sampling is launched after it. The cost is the time the masks take
        beyond the forward (the device waits for them then), shared by the unconstrained
        rows of such a shard; shards without constrained rows are unchanged."""
        masks = step_masks([[r.matcher for r in p.rows] for p in deferred])
        try:
            for part, mask in zip(deferred, masks):
                part.sample = part.shard.sampling(part.logits, part.selected, masks=mask)
                part.outputs += [*part.sample.arrays(), *part.shard.sampling.state()]
                part.logits = None
        except MLXError:
            return None
        return parts

    def _commit(self, step: "_Step") -> None:
        """A launched step becomes the batch's state: its caches, and the rows'
        positions. Paused rows computed this step too (the batch shape stays
        fixed), but their position does not advance: the next step rewrites the
        same slot with the same token, so their state is as if they had been left out."""
        self._inflight = step
        for part in step.parts:
            for c, kv in zip(part.shard.cache, part.state):
                c.kv = kv
            for i in part.selected:
                part.rows[i].pos += 1
                part.rows[i].steps += 1
        self.decode_steps += 1

    def _drain(self) -> "_Step":
        step, self._inflight = self._inflight, None
        return step

    def _read(self, step: "_Step") -> None:
        """Hands a launched step's tokens to their requests (waits for the device)."""
        for part in step.parts:
            ids, lps, tops = part.sample.read()
            for i in part.selected:
                req = part.rows[i]
                if req.active:  # a row that finished or was cancelled meanwhile: its token is dropped
                    self._emit(req, int(ids[i]), float(lps[i]), None if tops is None else tops[i])

    def _forward(self, tokens: Array, positions: Array, caches: list[Array]) -> tuple[Array, list[Array]]:
        """One decode step as a pure function of arrays (what gets compiled):
        (tokens (B,1), positions (B,), each layer's cache buffer) -> (logits (B,V), new buffers)."""
        return self._forward_with(self.model, tokens, positions, caches)

    def _forward_split(self, tokens: Array, positions: Array, caches: list[Array]) -> tuple[Array, list[Array]]:
        """`_forward` by the split twin (a lone row's step)."""
        return self._forward_with(self._split_model(), tokens, positions, caches)

    def _forward_with(self, model, tokens: Array, positions: Array, caches: list[Array]):
        return decode_on_buffers(model, self._windows, self.block, tokens, positions, caches)

    def _batched_logits(self, tokens: Array, positions: Array, cache: list[KVCache] | None = None,
                        split: bool = False) -> tuple[Array, list[Array]]:
        """Runs the decode step (compiled once per batch size, cache capacity and
        stream) on `cache` (default: the first shard's): logits and each layer's
        updated cache buffer. `split`: the step is the split twin's (a trace
        keeps the split, so it has a compiled function of its own)."""
        state = [c.kv for c in (self.cache if cache is None else cache)]
        if split:
            fn = self._split_step_fn or self._forward_split
        else:
            fn = self._step_fn or self._forward
        return fn(tokens, positions, state)

    def _emit(self, req: Request, token_id: int, logprob: float, top: list | None = None) -> None:
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        req.last = token_id
        req.sampling.observe(token_id)
        if req.matcher is not None and not req.matcher.consume(token_id):
            self._fail(req, AmlxError(f"constrained decoding: token {token_id} refused: {req.matcher.error}"))
            return
        # a constraint that admits nothing more (but EOS) ends the request here
        complete = req.matcher is not None and req.matcher.finished
        tok = req.assembler.push(token_id, logprob if req.options.logprobs else None, complete=complete)
        if top is not None and req.options.top_logprobs:  # (id, logprob) pairs, best first
            tok = replace(tok, top_logprobs=top[:req.options.top_logprobs])
        self.tokens_generated += 1
        req.channel.put(tok)
        if req.assembler.finished:
            req.done_at = time.perf_counter()
            req.channel.close()

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
            self._keep_rows(shard, keep)
        if changed:
            self._rebalance()

    def _keep_rows(self, shard: _Shard, keep: list[int]) -> None:
        """Keeps only the given rows of a shard (in that order); frees the rest."""
        if not keep:
            # The cache goes before the rows: once stats() shows no active request,
            # the batch's memory is already back.
            for c in shard.cache:
                c.close()
            shard.cache = None
            self._set_rows(shard, [])
            return
        self._set_rows(shard, [shard.rows[i] for i in keep])
        needed = max(r.pos for r in shard.rows) + 1  # capacity follows the rows that stay
        with self._on(shard):
            for c in shard.cache:
                c.take_rows(keep, needed)
            ops.eval(*[a for c in shard.cache for a in c.state()])

    def _rebalance(self) -> None:
        """After rows left: moves rows from the fullest shard to the emptiest until
        no two differ by more than one (a round takes as long as its largest shard)."""
        while len(self.shards) > 1:
            src = max(self.shards, key=lambda s: len(s.rows))
            dst = min(self.shards, key=lambda s: len(s.rows))
            n = (len(src.rows) - len(dst.rows)) // 2
            if n < 1:
                return
            stay, moved = list(range(len(src.rows) - n)), list(range(len(src.rows) - n, len(src.rows)))
            reqs = [src.rows[i] for i in moved]
            with self._on(dst):
                part = [copy.copy(c) for c in src.cache]  # the same buffers, until take_rows copies the rows out
                for c in part:
                    c.take_rows(moved, max(r.pos for r in reqs) + 1)
            self._keep_rows(src, stay)
            self._join(dst, reqs, part)

    def _release(self, req: Request) -> None:
        """The request leaves the scheduler: its own cache is freed (and the other
        ranks' rows of it, for a tensor-parallel model)."""
        self._held.pop(req, None)
        if self.mirror is not None:
            self.mirror.free(req)
        if req.cache is not None:
            for c in req.cache:
                c.close()
            req.cache = None

    def _finish(self, req: Request) -> None:
        self._release(req)
        req.channel.close()

    def _fail(self, req: Request, exc: BaseException) -> None:
        self._release(req)
        req.assembler.finished = True
        req.channel.close(exc)

    def _isolate_failure(self) -> None:
        """A batched step failed: run each row alone to find the culprit(s), fail
        only those, and keep the others (their rows are rebuilt from the single runs).
        A tensor-parallel model cannot: its ranks ran the step (step() fails the model)."""
        if self.mirror is not None:
            raise MLXError("decode", "a batched decode step failed")
        for shard in self.shards:
            for i, req in enumerate(shard.rows):
                row_cache: list[KVCache] = []
                for c in shard.cache:
                    rc = KVCache(window=c.window, block=c.block)
                    rc.kv = ops.take(c.kv, array(np.asarray([i], np.int32)), 1)
                    row_cache.append(rc)
                try:
                    logits = self.model(array(np.asarray([[req.last]], np.int32)), row_cache,
                                        array(np.asarray([req.pos], np.int32)))
                    if self.fault is not None:
                        logits = self._inject(logits, [req], False)
                    ops.eval(logits)
                except MLXError as exc:
                    self._fail(req, exc)
                for c in row_cache:
                    c.close()
        # Rows that failed are inactive now; the next round continues with the rest.
        self._drop_inactive()

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
            if shard.cache is not None:
                for c in shard.cache:
                    c.close()
                shard.cache = None

    def shutdown(self) -> None:
        """Ends every request with ClosedError and frees the batch (worker thread)."""
        with self._lock:
            self.closed = True
            self.waiting.extend(self._incoming)
            self._incoming.clear()
        self.fail_all(ClosedError("the model was closed"))
        if self._step_fn is not None:
            self._step_fn.close()  # MLX's compile cache holds the traced graphs and their constants
            self._split_step_fn.close()
            self._step_fn = self._split_step_fn = None
        self._sample_steps.close()


@dataclass(eq=False)
class _Part:
    """One shard's share of a launched decode step: the shard's rows then, which
    of them ran, and the (not yet read) sampled tokens and log-probabilities, one per row."""

    shard: _Shard
    rows: list[Request]
    selected: list[int]
    sample: StepSample | None  # the sampled tokens, their logprobs (and top logprobs)
    outputs: list[Array]  # everything the part computes (what async_eval launches)
    state: list[Array]  # the shard's caches after the step, one buffer per layer
    logits: Array | None = None  # until a part with constrained rows is sampled


@dataclass(eq=False)
class _Step:
    """A launched decode step: one part per shard that had rows running."""

    parts: list[_Part]
