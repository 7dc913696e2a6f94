"""The one worker thread of the process: it makes every MLX call.

Jobs (loading, closing, anything submitted) and the schedulers of the loaded
models take turns: each round runs the queued jobs, then one step of every
scheduler that has work. The thread sleeps when there is nothing to do.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Any, Callable

import anyio

from amlx.engine.notify import batched_wakeups, call_soon, loop_waker

log = logging.getLogger("amlx.engine")


class Worker:
    _instance: "Worker | None" = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls) -> "Worker":
        """The process's worker, started on first use."""
        with cls._instance_lock:
            if cls._instance is None or not cls._instance._thread.is_alive():
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        self._cond = threading.Condition()
        self._jobs: deque = deque()
        self._schedulers: list = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="amlx-worker", daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    # -- from any thread -----------------------------------------------------
    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Runs fn on the worker; the future holds its result or exception."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._jobs.append((fn, fut))
            self._cond.notify()
        return fut

    def run_sync(self, fn: Callable[[], Any]) -> Any:
        """Runs fn on the worker and waits (for scripts; never from the worker itself)."""
        if threading.current_thread() is self._thread:
            return fn()
        return self.submit(fn).result()

    async def run(self, fn: Callable[[], Any], to_the_end: bool = False) -> Any:
        """Runs fn on the worker and awaits its result without blocking the event loop.

        If the awaiting task is cancelled the job still runs to its end (MLX work
        cannot be interrupted halfway); its result is dropped. With `to_the_end` the
        task waits for that end before its cancellation is raised (a close: the caller
        returns once the model is freed), asyncio's own cancellation included, which
        an anyio shield does not hold."""
        return await wait_for(self.submit(fn), to_the_end)

    def add_scheduler(self, scheduler) -> None:
        with self._cond:
            self._schedulers.append(scheduler)
            self._cond.notify()

    def remove_scheduler(self, scheduler) -> None:
        with self._cond:
            if scheduler in self._schedulers:
                self._schedulers.remove(scheduler)

    def stop(self) -> None:
        """Lets the thread end once it has nothing left to do (a worker of its own,
        as a tensor-parallel engine has; never the process's shared one)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # -- the thread ------------------------------------------------------------
    def _idle(self) -> bool:
        return not self._jobs and not any(_asked(s, "has_work", False) for s in self._schedulers)

    def _timeout(self) -> float | None:
        """Seconds until a scheduler wants a round although nothing woke it (a
        parked request's batch slot frees up for a waiting one); None: no such time."""
        times = [t for t in (_asked(s, "wake_at", None) for s in self._schedulers) if t is not None]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    # the time to wake up is asked before whether there is work, not after: a
                    # parked request's slot lapsing between the two (the thread descheduled
                    # there) took its time out of `wake_at`, which had none left to give, and
                    # the thread slept for good although that lapse was what it waited for
                    timeout = self._timeout()
                    if not self._idle():
                        break
                    if self._stopping:
                        return
                    self._cond.wait(timeout)
                jobs = list(self._jobs)
                self._jobs.clear()
                schedulers = [s for s in self._schedulers if _asked(s, "has_work", False)]
            _run_jobs(jobs)
            # a finished future keeps its result alive (a Model its caller dropped, say):
            # the thread holds none while it waits
            jobs.clear()
            _step_all(schedulers)
            # nor a scheduler: one whose model closed in this round (its close a job above)
            # stayed referenced here, with its model's objects, until the next round came
            schedulers.clear()


def _step_all(schedulers: list) -> None:
    for s in schedulers:
        try:
            with batched_wakeups():
                s.step()
        except BaseException as exc:  # noqa: BLE001 - the worker must survive
            log.exception("scheduler step failed")
            _fail_all(s, exc)


def _asked(scheduler, question: str, otherwise):
    """scheduler.has_work() or .wake_at(), asked between rounds, outside any step. Where
    one raises, that scheduler's requests fail with the error and the answer is `otherwise`:
    raised here it would end the worker thread, and with it every model's requests (each
    would wait for good) and every close."""
    try:
        return getattr(scheduler, question)()
    except BaseException as exc:  # noqa: BLE001 - the worker must survive
        log.exception("scheduler.%s failed", question)
        _fail_all(scheduler, exc)
        return otherwise


def _fail_all(scheduler, exc: BaseException) -> None:
    """Fails every request of a scheduler that raised; a failure of that too is logged (the
    worker goes on with the other models)."""
    try:
        scheduler.fail_all(exc)
    except BaseException:  # noqa: BLE001 - the worker must survive
        log.exception("scheduler.fail_all failed")


def _run_jobs(jobs: list[tuple[Callable[[], Any], concurrent.futures.Future]]) -> None:
    for fn, fut in jobs:
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the submitter
                fut.set_exception(exc)
        # A failed job's error holds its traceback, which holds this frame (and the awaiting
        # caller's, in `run`), which held the future, which holds the error: a reference cycle
        # that kept the failed job's frames, and the MLX arrays in them (a failed load's adapter
        # weights), alive after the caller dropped the error, until a garbage collection. As
        # concurrent.futures' own workers do, the frame lets go of the job and its future.
        fn = fut = None


async def wait_for(fut: concurrent.futures.Future, to_the_end: bool = False) -> Any:
    """Awaits a future that another thread completes, without blocking the event loop. With
    `to_the_end`, a cancelled task waits for the future still and raises its cancellation
    afterwards, asyncio's own cancellation included (an anyio shield does not hold that)."""
    event = anyio.Event()
    waker = loop_waker()
    fut.add_done_callback(lambda _: call_soon(waker, event.set))
    cancelled: BaseException | None = None
    while not event.is_set():
        try:
            await event.wait()
        except anyio.get_cancelled_exc_class() as exc:
            if not to_the_end:
                raise
            cancelled = exc
    try:
        if cancelled is not None:
            raise cancelled
        return fut.result()
    finally:
        fut = cancelled = None  # (a reference cycle otherwise: see _run_jobs)
