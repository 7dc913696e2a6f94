"""Timing perturbation for hunting races between the event loop and the engine's worker thread.

`jitter(seed)` wraps the methods at the seams between the two threads (a channel's put,
close, take and cancel; the worker's wake, job queue and idle questions; the scheduler's
round phases, parking, joins, leaves, preemption; the wake-ups of event loops; a stream's
start and finish; a request's `active`) so that each call, drawn from a seeded generator, may first yield the GIL
(`time.sleep(0)`) or sleep up to `max_sleep` seconds, and sets a very short GIL switch
interval, so that interleavings a loaded machine makes now and then are made all the time; and the decisions
the engine takes on measured times (the speculator's cost model, a constrained shard's order)
are drawn at random from the same generator.
A draw depends on the seed and on the order in which the threads reach the seams, so a seed
does not replay one interleaving exactly, but it makes a failing one likely again.

Opt-in for the state machines: AMLX_TEST_JITTER=<seed> (tests/test_engine_stateful.py).
"""

from __future__ import annotations

import functools
import random
import sys
import threading
import time
from contextlib import contextmanager

# (module, class, methods): the seams
SEAMS = [
    ("amlx.engine.channel", "Channel", ["put", "close", "_take", "cancel", "has_room"]),
    ("amlx.engine.worker", "Worker", ["wake", "submit", "_idle", "_timeout"]),
    ("amlx.engine.scheduler", "Scheduler",
     ["add", "has_work", "wake_at", "_round", "_drop_inactive", "_unpark", "_admit", "_park_paused",
      "_preempt", "_join", "_finish", "_emit", "_read", "_decode", "_prefill_chunk", "_prefill_group",
      "weights_changed"]),
    ("amlx.engine.request", "RequestStream", ["cancel", "get"]),
    ("amlx.model", "TokenStream", ["_begin", "_finish", "__anext__"]),
]
FUNCTIONS = [("amlx.engine.notify", ["call_soon", "flush_wakeups"])]


class Jitter:
    def __init__(self, seed: int, rate: float = 0.3, max_sleep: float = 0.002) -> None:
        self.seed = seed
        self.rate = rate
        self.max_sleep = max_sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.calls = 0

    def pause(self) -> None:
        with self._lock:
            self.calls += 1
            u = self._rng.random()
            d = self._rng.random() * self.max_sleep
        if u < self.rate / 2:
            time.sleep(0)  # a GIL yield: the other thread may run a little here
        elif u < self.rate:
            time.sleep(d)  # descheduled for a while


def _wrap(fn, j: Jitter, is_async: bool):
    if is_async:
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            j.pause()
            return await fn(*args, **kwargs)
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            j.pause()
            return fn(*args, **kwargs)
    return wrapper


@contextmanager
def jitter(seed: int, rate: float = 0.3, max_sleep: float = 0.002, switch_interval: float = 1e-5):
    """Within the block, the seams pause at random (seeded); restored afterwards."""
    import importlib
    import inspect

    j = Jitter(seed, rate, max_sleep)
    undo = []
    for mod_name, cls_name, names in SEAMS:
        cls = getattr(importlib.import_module(mod_name), cls_name)
        for name in names:
            fn = cls.__dict__[name]
            setattr(cls, name, _wrap(fn, j, inspect.iscoroutinefunction(fn)))
            undo.append((cls, name, fn))
    for mod_name, names in FUNCTIONS:
        mod = importlib.import_module(mod_name)
        for name in names:
            fn = getattr(mod, name)
            setattr(mod, name, _wrap(fn, j, False))
            undo.append((mod, name, fn))
    # a request's `active` (the consumer's cancel read by the worker, often several times a
    # round): mostly a GIL yield, now and then a short sleep, so that a cancel lands between two reads
    from amlx.engine.request import Request

    active = Request.__dict__["active"]

    def yielding_active(self):
        with j._lock:
            u = j._rng.random()
            d = j._rng.random() * j.max_sleep / 2
        if u < j.rate / 8:  # (read often: a sleep now and then is enough)
            time.sleep(d)
        elif u < j.rate:
            time.sleep(0)
        return active.fget(self)

    Request.active = property(yielding_active)
    undo.append((Request, "active", active))
    # modules that imported those functions by name
    import amlx.engine.scheduler as scheduler
    import amlx.engine.worker as worker

    for mod, name in [(worker, "call_soon"), (scheduler, "flush_wakeups")]:
        if hasattr(mod, name):
            fn = getattr(mod, name)
            setattr(mod, name, _wrap(fn, j, False))
            undo.append((mod, name, fn))
    # the engine's decisions taken on measured times, drawn instead as a loaded machine may
    # make them: the speculator's cost measurements (they set the draft lengths, and so the
    # verify widths) scaled by 1/4..4, and whether a constrained shard's forward goes first
    # (`waited > DEVICE_BOUND_WAIT`) a coin toss
    import amlx.engine.speculate as speculate

    best = speculate._best_seconds

    def noisy_best_seconds(run):
        seconds = best(run)
        with j._lock:
            return seconds * 4 ** (2 * j._rng.random() - 1)

    speculate._best_seconds = noisy_best_seconds
    undo.append((speculate, "_best_seconds", best))

    class _CoinToss:
        def __lt__(self, other):  # (`waited > it` asks it `it < waited`)
            with j._lock:
                return j._rng.random() < 0.5

        __gt__ = __lt__

    undo.append((scheduler, "DEVICE_BOUND_WAIT", scheduler.DEVICE_BOUND_WAIT))
    scheduler.DEVICE_BOUND_WAIT = _CoinToss()
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval)
    try:
        yield j
    finally:
        sys.setswitchinterval(old_interval)
        for obj, name, fn in reversed(undo):
            setattr(obj, name, fn)
