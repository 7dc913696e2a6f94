"""Waking event loops (asyncio, uvloop or trio) from the worker thread.

A waker is the loop's own thread-safe scheduling method (asyncio's
`call_soon_threadsafe`, trio's `run_sync_soon`); the same loop always gives an
equal waker, so the worker can wake each loop once per step for all the tokens
it produced, instead of once per token.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

Waker = Callable[[Callable[[], None]], None]

_local = threading.local()


def loop_waker() -> Waker:
    """The waker of the event loop running in this thread."""
    import asyncio

    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # not asyncio: trio is the other backend anyio runs on
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon


def call_soon(waker: Waker, callback: Callable[[], None]) -> None:
    """Schedules `callback` on the waker's loop; a loop that has closed is ignored."""
    try:
        waker(callback)
    except Exception:  # noqa: BLE001 - RuntimeError (asyncio) or RunFinishedError (trio)
        pass


def wake(waker: Waker, event) -> None:
    """Sets an anyio Event on its loop: at once, or at the end of the batch in progress."""
    pending = getattr(_local, "pending", None)
    if pending is None:
        call_soon(waker, event.set)
    else:
        pending.setdefault(waker, []).append(event)


def _set_all(events) -> None:
    for e in events:
        e.set()


def flush_wakeups() -> None:
    """Delivers the wake-ups gathered so far in the batch in progress, which goes on
    gathering: a request's first token, sampled from its prefill, then reaches its
    consumer before the rest of the scheduler's round (building and launching a decode
    step, reading the one in flight) instead of after it."""
    pending = getattr(_local, "pending", None)
    if pending:
        _local.pending = {}
        for waker, events in pending.items():
            call_soon(waker, lambda events=events: _set_all(events))


@contextmanager
def batched_wakeups():
    """Within this block (on one thread), wake-ups are gathered and each loop is woken once at the end."""
    _local.pending = {}
    try:
        yield
    finally:
        pending, _local.pending = _local.pending, None
        for waker, events in pending.items():
            call_soon(waker, lambda events=events: _set_all(events))
