"""A process's first requests' one-time cost, paid while the model loads.

Measured on the lent H200 (2026-12-03, Qwen3-8B 4-bit, every MLX kernel already in
its on-disk cache): the process's first request took 7.6 s and its first batch of
four concurrent requests 2.7 s, where every later request took 0.05-0.25 s whatever
its prompt length (8 to 1,001 tokens). Nearly all of it was spent inside MLX's
evaluation (cProfile: 6.8 of 7.3 s in `async_eval`): what MLX's CUDA backend sets up
the first time each kind of pass runs in a process, not a compile per shape. So one
short request, then a few at once, run at load, take that cost out of the user's
first requests.

`warm_requests(engine)` runs them through the engine on its worker thread (the
caller's thread must be that worker: `amlx.model` calls it inside the load job) and
then zeroes the engine's counters, so `stats()` starts from nothing. Each prompt,
with its generated tokens, stays shorter than one KV block, so nothing enters the
prefix cache (it keys full blocks only). A failure is the caller's to report: the
load goes on without it.
"""

from __future__ import annotations

from amlx.engine.engine import Engine
from amlx.types import GenerationOptions

__all__ = ["WARM_BATCHES", "WARM_NEW_TOKENS", "warm_prompt", "warm_requests"]

WARM_BATCHES = (1, 4)  # one request, then this many at once (a prefill group, then a batched decode)
WARM_NEW_TOKENS = 3  # two decode steps after the first token: the compiled step chained on itself
_MAX_ROUNDS = 1000  # (a backstop: the requests above end in a few rounds)


def warm_prompt(engine: Engine, index: int) -> list[int]:
    """A short prompt of ordinary token ids (no end-of-sequence id), different per `index`,
    that with its WARM_NEW_TOKENS generated tokens fits inside one KV block and the
    engine's context; [] where the context is too short for any."""
    length = max(1, min(engine.scheduler.block_size - WARM_NEW_TOKENS - 1, 12))
    length = min(length, engine.max_context - WARM_NEW_TOKENS - 1)
    ids, token = [], 1 + 7 * index
    while len(ids) < length:
        token = (token * 31 + 17) % engine.vocab_size
        if token not in engine.eos_ids:
            ids.append(token)
    return ids


def warm_requests(engine: Engine, batches: tuple[int, ...] = WARM_BATCHES) -> int:
    """Runs, for each size in `batches` (capped at the engine's batch size), that many
    short greedy requests at once to their end; returns how many ran. Call it on the
    engine's worker thread, before any user request. Raises what a request raised."""
    scheduler = engine.scheduler
    options = GenerationOptions(max_tokens=WARM_NEW_TOKENS, temperature=0.0)
    ran = 0
    if not warm_prompt(engine, 0):
        return 0  # (a context too short for a prompt and its tokens: nothing to warm with)
    for size in batches:
        streams = []
        try:
            for i in range(min(size, engine.max_batch_size)):
                streams.append(engine.submit(warm_prompt(engine, ran + i), options))
            ran += len(streams)
            for _ in range(_MAX_ROUNDS):
                if all(s.done for s in streams) and not scheduler.has_work():
                    break
                scheduler.step()
            else:
                raise RuntimeError(f"the load-time warm-up requests did not end within {_MAX_ROUNDS} rounds")
            for s in streams:
                while s.get_sync() is not None:  # (ended: this returns at once; raises a request's error)
                    pass
        except BaseException:
            for s in streams:  # (none is left to run after the load, counted as a user's)
                s.cancel()
            raise
    scheduler.reset_counters()
    return ran
