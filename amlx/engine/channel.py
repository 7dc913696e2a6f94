"""The hand-over of tokens from the worker thread to one consumer.

The worker appends tokens; the consumer (async or blocking) takes them. A
request whose consumer holds `max_buffer` unread tokens is paused by the
scheduler, which reads `has_room()`; taking a token from a full buffer wakes
the worker so the request resumes.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from typing import Callable

import anyio
import anyio.lowlevel

from amlx.engine.notify import loop_waker, wake


class Channel:
    def __init__(self, max_buffer: int, wake_worker: Callable[[], None]):
        self._max = max_buffer
        self._wake_worker = wake_worker
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._items: deque = deque()
        self._done = False
        self._error: BaseException | None = None
        # every task waiting in `get` (the loop's waker, its event): one stream read from two
        # tasks at once must wake both, or the one not woken waits for good, even past the end
        self._async_waiters: list[tuple] = []
        self.cancelled = False

    # -- worker side -------------------------------------------------------
    def has_room(self, extra: int = 0) -> bool:
        """Whether the consumer can take another token (beyond `extra` still in flight)."""
        return len(self._items) + extra < self._max

    def put(self, item) -> None:
        with self._lock:
            self._items.append(item)
            self._notify()

    def close(self, error: BaseException | None = None) -> None:
        if error is not None:
            detach_frames(error)
        with self._lock:
            if self._done:
                return
            self._done = True
            self._error = error
            self._notify()

    def _notify(self) -> None:
        self._ready.notify_all()
        waiters, self._async_waiters = self._async_waiters, []
        for waker, event in waiters:
            wake(waker, event)

    # -- consumer side -----------------------------------------------------
    def cancel(self) -> None:
        """The consumer is gone: the scheduler drops the request before its next step."""
        self.cancelled = True
        self._wake_worker()

    def _take(self):
        """An item, or raises the error, or returns None at the end; `...` if nothing yet."""
        if self._items:
            was_full = len(self._items) >= self._max
            item = self._items.popleft()
            if was_full:
                self._wake_worker()
            return item
        if self._done:
            if self._error is not None:
                raise self._error
            return None
        return ...

    async def get(self):
        # A cancelled reader gets nothing, even where an item is ready: under trio (or an anyio
        # cancel scope) a read that never waits was no checkpoint, and one more token went out
        # after the scope was cancelled. Checked before an item is taken, so a reader that
        # catches its cancellation and reads on loses none.
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            with self._lock:
                item = self._take()
                if item is not ...:
                    return item
                waiter = (loop_waker(), anyio.Event())
                self._async_waiters.append(waiter)
            try:
                await waiter[1].wait()
            finally:
                if not waiter[1].is_set():  # (a woken one is off the list already)
                    self._forget(waiter)

    def _forget(self, waiter: tuple) -> None:
        """Drops a waiter that stopped waiting unwoken (its read cancelled, a timeout): a
        consumer polling with short timeouts would otherwise pile them up until the next token."""
        with self._lock:
            self._async_waiters = [w for w in self._async_waiters if w is not waiter]

    def get_sync(self):
        with self._lock:
            while True:
                item = self._take()
                if item is not ...:
                    return item
                self._ready.wait()

    @property
    def done(self) -> bool:
        return self._done


def _add_note(exc: BaseException, note: str) -> None:
    """`exc.add_note(note)`, also on Python 3.10 (amlx's least), where BaseException has no
    add_note (PEP 678 came in 3.11): there the note goes into `__notes__` as 3.11 keeps it. (Each
    failed request's error became an AttributeError about add_note on 3.10.)"""
    add = getattr(exc, "add_note", None)
    if add is not None:
        add(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]


def detach_frames(exc: BaseException) -> None:
    """Replaces the tracebacks of `exc` and the exceptions chained to it by their text (a
    note). A failure handed to a consumer is raised again on its side, and the consumer's
    frames join the traceback; one of them holds the channel, which holds the error: a cycle
    that kept the failed step's frames, with their MLX arrays, alive until the next garbage
    collection. Without frames the error is freed with its last reference, and the text
    still shows where the worker failed."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        if tb is not None:
            exc.__traceback__ = None
            _add_note(exc, "worker traceback (most recent call last):\n" + "".join(traceback.format_tb(tb)).rstrip())
        chained = [e for e in (exc.__cause__, exc.__context__) if e is not None and id(e) not in seen]
        for other in chained[1:]:
            detach_frames(other)
        exc = chained[0] if chained else None
