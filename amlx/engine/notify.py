"""Waking an event loop from the worker thread (asyncio, uvloop or trio)."""

from __future__ import annotations

from typing import Callable



def loop_waker() -> Callable[[Callable[[], None]], None]:
    """For the running event loop: a thread-safe `call_soon(callback)` that never
    blocks the calling thread and ignores a loop that has already closed."""
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:  # not asyncio: trio is the other backend anyio runs on
        import trio

        token = trio.lowlevel.current_trio_token()

        def call_soon(cb):
            try:
                token.run_sync_soon(cb)
            except trio.RunFinishedError:
                pass

        return call_soon

    def call_soon(cb):
        try:
            loop.call_soon_threadsafe(cb)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    return call_soon
