"""Continuous batching for one model, run by the worker thread.

Requests arrive in `incoming` (any thread), wait in arrival order, are
prefilled one chunk per step on a cache of their own, then join the running
batch: one batched decode step per round for every running request whose
consumer has room (the others are paused: left out of the step). Finished and
cancelled requests leave the batch at once and their cache rows are freed.

Device state of the batch: per layer a KVCache with one row per running
request; per-row positions go in as an int32 array each step, so rows of any
length decode together.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from amlx._mlx import Array, array, ops, transforms
from amlx._mlx import int32 as _int32
from amlx.cache import KVCache
from amlx.engine.channel import Channel
from amlx.engine.sampling import BatchSampling, RowSampling
from amlx.errors import AmlxError, ClosedError, MLXError
from amlx.generate import PREFILL_CHUNK, TextAssembler
from amlx.models import decode_attention
from amlx.types import GenerationOptions


@dataclass(eq=False)
class Request:
    prompt: list[int]
    options: GenerationOptions
    channel: Channel
    assembler: TextAssembler
    sampling: RowSampling
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    done_at: float | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    cache: list[KVCache] | None = None  # own cache while prefilling
    pos: int = 0  # next cache position to write
    last: int = -1  # last sampled token (input of the next step)
    steps: int = 0  # decode steps computed for this request

    @property
    def active(self) -> bool:
        return not (self.channel.cancelled or self.assembler.finished)


class Scheduler:
    def __init__(self, model, tokenizer, eos_ids: frozenset[int], max_batch_size: int, max_context: int,
                 wake: callable, prefill_chunk: int = PREFILL_CHUNK, compile_step: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self._wake = wake
        self._lock = threading.Lock()
        self._incoming: deque[Request] = deque()
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        self.rows: list[Request] = []
        self.cache: list[KVCache] | None = None
        self.closed = False
        self.tokens_generated = 0
        self.decode_steps = 0
        self._started = time.perf_counter()
        self._step_fn = transforms.compile(self._forward) if compile_step else None
        self._sampling: BatchSampling | None = None  # device sampling state of `rows`
        self._inflight: _Step | None = None  # a decode step launched and not yet read
        self._prepared = False  # the model's derived arrays are evaluated (see Module.prepare)
        # cache growth step: small where decode attention reads the whole capacity (KVCache.block)
        self.block = 256 if decode_attention.enabled() else 64
        # Test hook: called with the token ids of every decode step's rows.
        self.before_step = None

    # -- any thread ------------------------------------------------------------
    def add(self, request: Request) -> None:
        with self._lock:
            if self.closed:
                raise ClosedError("the model is closed")
            self._incoming.append(request)
        self._wake()

    def has_work(self) -> bool:
        if self._inflight is not None:
            return True
        if self._incoming or self.waiting or self.prefilling is not None:
            return True
        return any(not r.active or r.channel.has_room() for r in self.rows)

    def counts(self) -> dict:
        return {"active": len(self.rows) + (self.prefilling is not None),
                "waiting": len(self.waiting) + len(self._incoming)}

    # -- worker thread ------------------------------------------------------------
    def step(self) -> None:
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
        if self._inflight is not None and self._batch_will_change():
            self._read(self._drain())
        self._drop_inactive()
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
        free = self.max_batch_size - len(self.rows)
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

    def _prefill_group(self, group: list[Request]) -> None:
        """Prefills several prompts in one batched forward. Right padding keeps it
        exact: causal attention never lets a real position see a padded one, and
        padded slots past a row's length stay masked until decoding overwrites them."""
        lengths = [len(r.prompt) for r in group]
        ids = np.zeros((len(group), max(lengths)), dtype=np.int32)
        for i, r in enumerate(group):
            ids[i, :lengths[i]] = r.prompt
        cache = self.model.make_cache(self.block)
        try:
            last = array(np.asarray(lengths, dtype=np.int32) - 1)
            logits = self.model(array(ids), cache, 0, last=last)
            logits = ops.reshape(logits, (len(group), logits.shape[2]))
            tokens, logprobs = self._first_tokens(logits, group)
            ops.eval(tokens, logprobs, *[a for c in cache for a in c.state()])
        except MLXError as exc:
            for c in cache:
                c.close()
            if len(group) == 1:
                self._fail(group[0], exc)
                return
            # Find the culprit: each prompt on its own.
            for r in group:
                self._prefill_group([r])
            return
        ids_out, lps = tokens.tolist(), logprobs.tolist()
        for i, r in enumerate(group):
            r.pos = lengths[i]
            self._emit(r, int(ids_out[i]), float(lps[i]))
        self._join(group, cache)

    def _prefill_chunk(self, req: Request) -> None:
        """One chunk of the prompt; on the last chunk, the first token and joining the batch."""
        try:
            start = req.prefilled
            chunk = req.prompt[start:start + self.prefill_chunk]
            req.prefilled += len(chunk)
            if req.prefilled < len(req.prompt):
                self.model(array(np.asarray([chunk], dtype=np.int32)), req.cache, start)
                ops.eval(*[a for c in req.cache for a in c.state()])
                return
            logits = self.model(array(np.asarray([chunk], dtype=np.int32)), req.cache, start,
                                last=array(np.asarray([len(chunk) - 1], dtype=np.int32)))
            tokens, logprobs = self._first_tokens(ops.reshape(logits, (1, logits.shape[2])), [req])
            ops.eval(tokens, logprobs, *[a for c in req.cache for a in c.state()])
        except MLXError as exc:
            self.prefilling = None
            self._fail(req, exc)
            return
        self.prefilling = None
        req.pos = len(req.prompt)
        self._emit(req, int(tokens.tolist()[0]), float(logprobs.tolist()[0]))
        cache, req.cache = req.cache, None
        self._join([req], cache)

    def _join(self, reqs: list[Request], cache: list[KVCache]) -> None:
        """Adds freshly prefilled requests (rows of `cache`) to the running batch;
        those that already finished (EOS or max_tokens at their first token) don't join."""
        keep = [i for i, r in enumerate(reqs) if r.active]
        for i, r in enumerate(reqs):
            if i not in keep:
                self._finish(r)
        if not keep:
            for c in cache:
                c.close()
            return
        if len(keep) < len(reqs):
            for c in cache:
                c.take_rows(keep)
        if self.cache is None:
            self.cache = cache
        else:
            for mine, theirs in zip(self.cache, cache):
                mine.append_rows(theirs)
        ops.eval(*[a for c in self.cache for a in c.state()])
        self._set_rows(self.rows + [reqs[i] for i in keep])

    def _first_tokens(self, logits: Array, reqs: list[Request]) -> tuple[Array, Array]:
        """Samples the first token of freshly prefilled requests; their keys move on."""
        bs = BatchSampling([r.sampling for r in reqs])
        try:
            tokens, logprobs = bs(logits)
            ops.eval(tokens, logprobs, *bs.state())
            bs.sync_back()
        finally:
            bs.close()
        return tokens, logprobs

    def _set_rows(self, rows: list[Request]) -> None:
        """Changes the batch's rows (the cache is already arranged to match) and
        rebuilds the device sampling state from the rows' own."""
        if self._sampling is not None:
            self._sampling.sync_back()
            self._sampling.close()
            self._sampling = None
        self.rows = rows
        if rows:
            self._sampling = BatchSampling([r.sampling for r in rows])

    def _batch_will_change(self) -> bool:
        if any(not r.active for r in self.rows):
            return True
        return len(self.rows) < self.max_batch_size and bool(self.waiting or self.prefilling)

    def _decode(self) -> None:
        """Launches one decode step for the batch and reads the previous one.

        While the batch stays the same, step t+1 takes step t's sampled tokens
        straight from the device and is scheduled before step t's tokens are
        read back, so the host's work overlaps the device's. Any change to the
        batch (a row finishing, pausing or joining) first drains the step in
        flight; a row that finished at step t has computed step t+1 in vain.

        The order is: build step t+1's graph (Python), hand step t's tokens to
        their consumers, then launch step t+1 (MLX queues its kernels without
        holding the GIL), so the event loop handles the tokens while the
        worker is in MLX instead of competing with it for the interpreter."""
        prev = self._inflight
        if prev is not None and not self._can_chain(prev):
            self._read(self._drain())
            self._drop_inactive()
            prev = None
        if not self.rows:
            return
        running = [r.active and r.channel.has_room() for r in self.rows]
        if not any(running):
            return
        sel = [i for i, run in enumerate(running) if run]
        self._inflight = None
        try:
            step = self._build(sel, prev)
        except MLXError:
            step = None
        if prev is not None:
            self._read(prev)
        if step is not None:
            try:
                ops.async_eval(*step.outputs)
            except MLXError:
                step = None
        if step is None:
            self._isolate_failure()
            return
        self._commit(step)

    def _can_chain(self, prev: "_Step") -> bool:
        if self.before_step is not None or len(prev.selected) != len(self.rows) or prev.rows != self.rows:
            return False
        # One token of every row is still in flight: room for it, and one more.
        return all(r.active and r.channel.has_room(extra=1) for r in self.rows)

    def weights_changed(self) -> None:
        """The model's parameters or modules were replaced (e.g. an adapter
        trained a step): the compiled step traced the old ones as constants, so
        it is traced again (worker thread)."""
        if self._inflight is not None:
            self._read(self._drain())
        self._prepared = False
        if self._step_fn is not None:
            self._step_fn.close()
            self._step_fn = transforms.compile(self._forward)

    def _build(self, sel: list[int], prev: "_Step | None") -> "_Step":
        """The graph of the next decode step (not yet launched); rows advance."""
        if not self._prepared:
            self.model.prepare()
            self._prepared = True
        needed = max(r.pos for r in self.rows) + 1
        for c in self.cache:
            c.reserve(needed)
        b = len(self.rows)
        if prev is not None:
            tokens = ops.reshape(prev.tokens, (b, 1))
        else:
            tokens = array(np.asarray([[r.last] for r in self.rows], dtype=np.int32))
        positions = array(np.asarray([r.pos for r in self.rows], dtype=np.int32))
        if self.before_step is not None:
            self.before_step([r.last for r in self.rows])
        logits, state = self._batched_logits(tokens, positions)
        new, logprobs = self._sampling(logits, sel)
        outputs = [new, logprobs, *self._sampling.state(), *state]
        return _Step(list(self.rows), sel, new, logprobs, outputs, state)

    def _commit(self, step: "_Step") -> None:
        """A launched step becomes the batch's state: its caches, and the rows'
        positions. Paused rows computed this step too (the batch shape stays
        fixed), but their position does not advance: the next step rewrites the
        same slot with the same token, so their state is as if they had been left out."""
        self._inflight = step
        for i, c in enumerate(self.cache):
            c.keys, c.values = step.state[2 * i], step.state[2 * i + 1]
        for i in step.selected:
            self.rows[i].pos += 1
            self.rows[i].steps += 1
        self.decode_steps += 1

    def _drain(self) -> "_Step":
        step, self._inflight = self._inflight, None
        return step

    def _read(self, step: "_Step") -> None:
        """Hands a launched step's tokens to their requests (waits for the device)."""
        ids, lps = step.tokens.tolist(), step.logprobs.tolist()
        for i in step.selected:
            req = step.rows[i]
            if req.active:  # a row that finished or was cancelled meanwhile: its token is dropped
                self._emit(req, int(ids[i]), float(lps[i]))

    def _forward(self, tokens: Array, positions: Array, caches: list[Array]) -> tuple[Array, list[Array]]:
        """One decode step as a pure function of arrays (what gets compiled):
        (tokens (B,1), positions (B,), [k0, v0, k1, v1, ...]) -> (logits (B,V), new caches)."""
        step_cache = []
        for i, c in enumerate(self.cache):
            sc = KVCache(window=c.window, block=c.block)
            sc.keys, sc.values = caches[2 * i], caches[2 * i + 1]
            step_cache.append(sc)
        logits = self.model(tokens, step_cache, positions)
        logits = ops.reshape(logits, (tokens.shape[0], logits.shape[2]))
        return logits, [a for c in step_cache for a in (c.keys, c.values)]

    def _batched_logits(self, tokens: Array, positions: Array) -> tuple[Array, list[Array]]:
        """Runs the decode step (compiled once per batch size and cache capacity):
        logits and the updated caches [k0, v0, k1, v1, ...]."""
        state = [a for c in self.cache for a in (c.keys, c.values)]
        fn = self._step_fn or self._forward
        return fn(tokens, positions, state)

    def _emit(self, req: Request, token_id: int, logprob: float) -> None:
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        req.last = token_id
        req.sampling.observe(token_id)
        tok = req.assembler.push(token_id, logprob if req.options.logprobs else None)
        self.tokens_generated += 1
        req.channel.put(tok)
        if req.assembler.finished:
            req.done_at = time.perf_counter()
            req.channel.close()

    def _drop_inactive(self) -> None:
        for req in [r for r in self.waiting if not r.active]:
            self.waiting.remove(req)
            self._finish(req)
        if self.prefilling is not None and not self.prefilling.active:
            req, self.prefilling = self.prefilling, None
            self._finish(req)
        keep = [i for i, r in enumerate(self.rows) if r.active]
        if len(keep) == len(self.rows):
            return
        for i, r in enumerate(self.rows):
            if i not in keep:
                self._finish(r)
        if not keep:
            # The cache goes before the rows: once stats() shows no active request,
            # the batch's memory is already back.
            for c in self.cache:
                c.close()
            self.cache = None
            self._set_rows([])
            return
        self._set_rows([self.rows[i] for i in keep])
        for c in self.cache:
            c.take_rows(keep)
        ops.eval(*[a for c in self.cache for a in c.state()])

    def _finish(self, req: Request) -> None:
        if req.cache is not None:
            for c in req.cache:
                c.close()
            req.cache = None
        req.channel.close()

    def _fail(self, req: Request, exc: BaseException) -> None:
        if req.cache is not None:
            for c in req.cache:
                c.close()
            req.cache = None
        req.assembler.finished = True
        req.channel.close(exc)

    def _isolate_failure(self) -> None:
        """A batched step failed: run each row alone to find the culprit(s), fail
        only those, and keep the others (their rows are rebuilt from the single runs)."""
        for i, req in enumerate(self.rows):
            row_cache: list[KVCache] = []
            for c in self.cache:
                rc = KVCache(window=c.window, block=c.block)
                rc.keys = ops.take(c.keys, array(np.asarray([i], np.int32)), 0)
                rc.values = ops.take(c.values, array(np.asarray([i], np.int32)), 0)
                row_cache.append(rc)
            try:
                if self.before_step is not None:
                    self.before_step([req.last])
                logits = self.model(array(np.asarray([[req.last]], np.int32)), row_cache,
                                    array(np.asarray([req.pos], np.int32)))
                ops.eval(logits)
            except MLXError as exc:
                self._fail(req, exc)
            for c in row_cache:
                c.close()
        # Rows that failed are inactive now; the next round continues with the rest.
        self._drop_inactive()

    def fail_all(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, AmlxError) else MLXError("engine", f"{type(exc).__name__}: {exc}")
        for req in list(self.waiting) + ([self.prefilling] if self.prefilling else []) + list(self.rows):
            self._fail(req, err)
        self.waiting.clear()
        self.prefilling = None
        self._inflight = None
        self._set_rows([])
        if self.cache is not None:
            for c in self.cache:
                c.close()
            self.cache = None

    def shutdown(self) -> None:
        """Ends every request with ClosedError and frees the batch (worker thread)."""
        with self._lock:
            self.closed = True
            self.waiting.extend(self._incoming)
            self._incoming.clear()
        self.fail_all(ClosedError("the model was closed"))
        if self._step_fn is not None:
            self._step_fn.close()  # MLX's compile cache holds the traced graphs and their constants
            self._step_fn = None


@dataclass(eq=False)
class _Step:
    """A launched decode step: the batch's rows then, which of them ran, and the
    (not yet read) sampled tokens and log-probabilities, one per row."""

    rows: list[Request]
    selected: list[int]
    tokens: Array
    logprobs: Array
    outputs: list[Array]  # everything the step computes (what async_eval launches)
    state: list[Array]  # the batch's caches after the step [k0, v0, k1, v1, ...]
