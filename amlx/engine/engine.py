"""`Engine`: the one front door of the engine for one loaded model.

It takes prompts as token ids and hands back a `RequestStream` per request
(`submit`), cancels requests (`abort`), reports counters (`stats`) and shuts
down (`close` / `aclose`). Behind it: the scheduler (continuous batching on the
worker thread), each request's streaming detokenizer and sampling state, and
the channel that carries its tokens to the consumer. `amlx.Model` turns prompts
into ids and wraps the streams; training runs its jobs through `run`.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from typing import Any, Callable

import anyio
import anyio.lowlevel

from amlx._mlx import memory
from amlx.constrain import Constraint, MatcherFactory
from amlx.engine.assembler import TextAssembler, check_context
from amlx.engine.channel import Channel
from amlx.engine.placement import EngineOptions, Placement
from amlx.engine.request import Request, RequestStream
from amlx.sample import RowSampling
from amlx.engine.scheduler import Scheduler
from amlx.engine.worker import Worker, wait_for
from amlx.engine.score import PromptLogprobs, Scorer
from amlx.errors import ClosedError, ContextLengthError
from amlx.types import GenerationOptions


class Engine:
    """Serves one model: any number of concurrent requests, decoded together.

    `model`: the CausalLM (the engine owns it from now on and frees it on close);
    `tokenizer`: for streaming detokenization; `eos_ids`: ids that end a stream;
    `vocab_size`: prompt ids must lie below it; `max_context`: prompt plus
    generated tokens per request; `draft_model`: a draft model's CausalLM for
    speculative decoding (options.draft its path). Every method may be called from any thread;
    none blocks on MLX except `close` and `run_sync`, which wait for the worker.

    `mirror`: rank 0's amlx.tp.leader.Leader when the model is tensor-parallel
    (`model` is then rank 0's shard); the engine stops the other ranks on close
    and closes itself when one fails."""

    def __init__(self, model, tokenizer, *, eos_ids: frozenset[int], vocab_size: int, max_batch_size: int,
                 max_context: int, worker: Worker | None = None, shards: int | None = None,
                 options: EngineOptions | None = None, placement: Placement | None = None, draft_model=None,
                 mirror=None):
        self.model = model
        self.draft_model = draft_model  # speculative decoding's draft (load option draft=PATH), owned too
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.vocab_size = vocab_size
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        # A tensor-parallel engine runs on a worker thread of its own (the caller made it
        # and loaded the model on it: MLX's streams belong to their thread), which it
        # stops on close: MLX's ring backend can leave a collective waiting for good when
        # a rank dies mid-step, and that wait stays on this thread (docs/scaling.md).
        self._worker = Worker.get() if worker is None else worker
        # the engine's device, streams and switches (placement.py): `placement`, if the
        # weights were loaded on it already, else made here from `options`
        self.scheduler = Scheduler(model, max_batch_size, self._worker.wake, shards=shards, options=options,
                                   placement=placement, draft_model=draft_model, vocab_size=vocab_size,
                                   mirror=mirror)
        self.mirror = mirror
        if mirror is not None:
            mirror.on_failure(self._rank_failed)
        self.placement = self.scheduler.placement
        # A request lives in one shard's KV block pool: the context is at most what it holds.
        self.pool_tokens = self.scheduler.pool_tokens()
        self.max_context = min(max_context, self.pool_tokens)
        self._matchers = MatcherFactory(tokenizer, vocab_size)  # constrained requests' grammars
        if self.scheduler.speculator is not None:  # constrained rows' verify masks need the vocabulary
            self.scheduler.speculator.grammar = self._matchers
        self._closed = False
        self._weights_version = 0  # bumped by weights_changed (a score call under way starts again)
        self._close_lock = threading.Lock()
        # done when _shutdown has run: a second close waits for it (a future, so that an async
        # close waits as the first one does, through cancellation)
        self._shut: concurrent.futures.Future = concurrent.futures.Future()
        self._at_close: list[weakref.WeakMethod] = []
        self._close_reason: BaseException | None = None  # what closed it, where not a caller (a rank's failure)
        self._worker.add_scheduler(self.scheduler)

    # -- requests ---------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int]) -> int:
        """Validates prompt ids (inside the vocabulary, fitting the context); returns
        the room left for generated tokens. ValueError / ContextLengthError."""
        if len(prompt_ids) >= self.max_context == self.pool_tokens:
            self._pool_too_small(len(prompt_ids))
        room = check_context(len(prompt_ids), self.max_context)  # first: it costs nothing
        self._check_vocab(prompt_ids)
        return room

    def _check_vocab(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def submit(self, prompt_ids: list[int], options: GenerationOptions) -> RequestStream:
        """Queues a request and returns its stream (ClosedError once closed). Any thread."""
        if self._closed:
            raise self.closed_error()
        ids = list(prompt_ids)
        room = self.check_prompt(ids)
        options.check_vocab(self.vocab_size)
        channel = Channel(options.max_buffer, self._worker.wake)
        req = Request(ids, options, channel, TextAssembler(self.tokenizer, options, self.eos_ids, max_new=room),
                      RowSampling(options, ids))
        if options.constraint is not None:
            # a grammar compiled already (the common case: one schema, many requests) gives its
            # matcher at once, so the request is queued now, with those submitted beside it
            req.matcher = self._matchers.ready_matcher(options.constraint)
            if req.matcher is None:
                self._queue_when_compiled(req, options.constraint)
            else:
                self.scheduler.add(req)
        else:
            self.scheduler.add(req)
        return RequestStream(req)

    def _pool_too_small(self, prompt: int) -> None:
        """ContextLengthError for a prompt that, with one generated token, could not fit
        in a KV block pool even alone (it would wait for room forever)."""
        s = self.scheduler
        need = -(-(prompt + 1) // s.block_size) * s.block_bytes() / 2**20
        held = self.pool_tokens // s.block_size * s.block_bytes() / 2**20
        raise ContextLengthError(
            f"the prompt ({prompt} tokens) and a generated token need {need:.2f} MiB of KV cache, but the KV "
            f"cache pool holds {self.pool_tokens} tokens ({held:.2f} MiB): raise kv_cache_memory at load")

    def _queue_when_compiled(self, req: Request, constraint: Constraint) -> None:
        """A constrained request joins the queue once its matcher is made (a background
        thread: never the event loop nor the worker). A grammar this vocabulary rejects
        ends the stream with its ValueError (malformed ones were refused by the options)."""
        def ready(future) -> None:
            # (a future cancelled by close() raises concurrent.futures.CancelledError, an
            # Exception: asked first, else the stream ended with that bare error, not ClosedError)
            if future.cancelled():
                req.assembler.finished = True
                req.channel.close(ClosedError("the model was closed"))
                return
            try:
                req.matcher = future.result()
                self.scheduler.add(req)
            except Exception as exc:  # ValueError, or ClosedError once the engine is closed
                req.assembler.finished = True
                req.channel.close(exc)

        self._matchers.submit(constraint).add_done_callback(ready)

    async def score(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        """Each continuation's total log-probability after the prompt (see
        amlx.engine.score); on the worker, between decode rounds."""
        if self._closed:
            raise self.closed_error()
        if self.mirror is not None:
            raise ValueError("score() does not support tensor_parallel > 1 yet")
        self.check_prompt(prompt_ids)
        for cont in continuations:
            bad = [t for t in cont if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
            if len(prompt_ids) + len(cont) > self.max_context:
                raise ContextLengthError(f"the prompt and a continuation have {len(prompt_ids) + len(cont)} "
                                         f"tokens but the context holds {self.max_context}")
        scorer = Scorer(self.model, prompt_ids, continuations, chunk=self.scheduler.prefill_chunk,
                        version=lambda: self._weights_version)
        await self._run_steps(scorer)
        return scorer.scores

    async def prompt_logprobs(self, prompt_ids: list[int], top_n: int = 0) -> PromptLogprobs:
        """Each prompt token's log-probability after the tokens before it, and the top_n
        likeliest tokens at each position (see amlx.engine.score.PromptLogprobs); on the
        worker, between decode rounds."""
        if self._closed:
            raise self.closed_error()
        if self.mirror is not None:
            raise ValueError("prompt_logprobs does not support tensor_parallel > 1 yet")
        # nothing is generated: a prompt that fills the context exactly fits (check_prompt keeps
        # room for a generated token, and refused it "including at least one generated token")
        check_context(len(prompt_ids), self.max_context, generated=0)
        self._check_vocab(prompt_ids)
        steps = PromptLogprobs(self.model, prompt_ids, top_n, chunk=self.scheduler.prefill_chunk,
                               vocab=self.vocab_size, version=lambda: self._weights_version)
        await self._run_steps(steps)
        return steps

    async def _run_steps(self, steps: Scorer | PromptLogprobs) -> None:
        """Runs a stepped call (amlx/engine/score.py) a worker job a step, so that decode rounds
        run between them and a cancelled caller's work stops at the next one."""
        try:
            while not await self.run(lambda: self._one_step(steps)):
                pass
        finally:
            if not steps.done:  # cancelled or failed: the worker frees its cache (after a
                self.submit_job(steps.close)  # step still running: jobs run in order)

    def _one_step(self, steps: Scorer | PromptLogprobs) -> bool:
        """One step of a stepped call, on the worker: never after the model began closing
        (its shutdown, queued before this job, has freed the weights)."""
        if self._closed:
            raise ClosedError("the model was closed")
        return steps.step()

    def abort(self, stream: RequestStream) -> None:
        """Cancels a request: it leaves before the next decode step and its memory is freed."""
        stream.cancel()

    def stats(self) -> dict:
        """Requests, token counters, the recent decoding rate, MLX memory (bytes) and
        the KV block pools' counters (`kv_cache`: blocks used (held by requests),
        cached (held by no request, reusable by the prefix cache, evictable), free
        and allocated (the arrays' size: used + cached + free), block size,
        prefix-cache block hits and misses, preemptions), and for models loaded
        with `draft`, `speculative`: drafted and accepted tokens (SpeculativeCounters).

        tokens_per_second: tokens over the time the engine spent working in the
        last 10 seconds (idle time does not count; 0 after 10 idle seconds)."""
        s = self.scheduler
        counts = s.counts()
        kv = {**s.kv_counters(), "preemptions": s.preemptions}
        out = {"active_requests": counts["active"], "waiting_requests": counts["waiting"],
               "tokens_generated": s.tokens_generated, "decode_steps": s.decode_steps,
               "tokens_per_second": s.rate.rate(), "memory": memory.counters(), "kv_cache": kv}
        if s.speculator is not None:  # a model loaded with `draft`: drafted and accepted tokens
            out["speculative"] = s.speculator.stats.snapshot()
        if s.timing.enabled:  # AMLX_STEP_TIMING=1: host seconds per phase of the rounds (engine/timing.py)
            out["step_timing"] = {**s.timing.snapshot(), "decode_steps": s.decode_steps}
        return out

    # -- jobs on the worker thread ------------------------------------------------
    async def run(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` on the worker thread (between decode rounds) and awaits its result;
        the event loop stays free. A cancelled caller leaves the job to run to its end."""
        return await self._worker.run(self._at_home(fn))

    def run_sync(self, fn: Callable[[], Any]) -> Any:
        """`run` for blocking code (on the worker thread itself, `fn` runs at once)."""
        return self._worker.run_sync(self._at_home(fn))

    def submit_job(self, fn: Callable[[], Any]):
        """Queues `fn` on the worker without waiting; returns a concurrent.futures.Future."""
        return self._worker.submit(self._at_home(fn))

    def _at_home(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """`fn` with its MLX work on the engine's home stream (its device)."""
        def job():
            with self.placement.on():
                return fn()
        return job

    def weights_changed(self) -> None:
        """The model's parameters or modules were replaced (e.g. an adapter trained a
        step): the compiled decode step is traced again, and a score call under way
        starts again on the new weights (`Scorer`). Any thread."""
        self._weights_version += 1
        self._worker.run_sync(self.scheduler.weights_changed)

    def at_close(self, method: Callable[[], None]) -> None:
        """Calls the bound `method` on the worker when the engine closes, after the weights
        are freed, for state kept beside the model that no longer has a use (a training run's
        optimizer moments). Held weakly: registering keeps no object alive."""
        with self._close_lock:
            self._at_close.append(weakref.WeakMethod(method))

    @property
    def tensor_parallel(self) -> int:
        """How many ranks (processes) run the model: 1 unless loaded with tensor_parallel=N."""
        return 1 if self.mirror is None else self.mirror.size

    # -- lifetime -------------------------------------------------------------------
    def _shutdown(self) -> None:
        """On the worker: end every request with ClosedError, free caches and weights
        (and stop the other ranks of a tensor-parallel model)."""
        self._matchers.close()
        try:
            with self.placement.on():
                self.scheduler.shutdown()
                self._worker.remove_scheduler(self.scheduler)
                self.model.close()
                if self.draft_model is not None:
                    self.draft_model.close()
                if self.mirror is not None:
                    self.mirror.close()
                with self._close_lock:
                    closers, self._at_close = self._at_close, []
                for ref in closers:
                    method = ref()
                    if method is not None:
                        method()
        finally:
            self.placement.release()
            if self.mirror is not None:
                self._worker.stop()
            self._shut.set_result(None)

    def _rank_failed(self, error: BaseException) -> None:
        """A rank of a tensor-parallel model failed (any thread): its requests end
        with `error` now, and the model closes on its worker. (If MLX's ring backend
        left that worker waiting in a collective for good, the close never runs and
        the model's memory stays until the process exits: docs/scaling.md.)"""
        self.scheduler.abandon(error)
        self._close_reason = error
        if self._begin_close():
            self._worker.submit(self._at_home(self._shutdown))

    def _begin_close(self) -> bool:
        with self._close_lock:
            if self._closed:
                return False
            self._closed = True
            return True

    async def aclose(self) -> None:
        """Ends pending streams with ClosedError and frees the model (idempotent).

        Shielded from cancellation, as resource cleanup is: a caller cancelled meanwhile (an
        `async with` left by a cancelled scope or task) still returns only once the model is
        freed, and then its cancellation is raised here."""
        with anyio.CancelScope(shield=True):
            if self._begin_close():
                await self._worker.run(self._shutdown, to_the_end=True)
            elif self._waits_for_close():
                await wait_for(self._shut, to_the_end=True)
        await anyio.lowlevel.checkpoint_if_cancelled()

    def close(self) -> None:
        if self._begin_close():
            self._worker.run_sync(self._shutdown)
        elif self._waits_for_close():
            self._shut.result()

    def _waits_for_close(self) -> bool:
        """Whether a close that finds another under way waits for its end (a second close
        returned at once, the model's memory still held): not on the worker, which runs it,
        nor after a rank's failure closed it (its worker may never get to it)."""
        return self._close_reason is None and threading.current_thread() is not self._worker.thread

    @property
    def closed(self) -> bool:
        return self._closed

    def closed_error(self) -> ClosedError:
        """The error a call on the closed engine raises: it names what closed it where that
        was not a caller (a tensor-parallel rank's failure), not only that it is closed."""
        reason = self._close_reason
        if reason is None:
            return ClosedError("the model is closed")
        return ClosedError(f"the model is closed: {type(reason).__name__}: {reason}")
