"""Rank 0 of a tensor-parallel model: the scheduler's view of the other ranks.

The scheduler (amlx.engine.scheduler) calls `prefill` and `decode` right
before each forward pass it builds, and `free` when a request ends; each
forward's description goes to the other ranks through MLX's collectives
(amlx.tp.protocol), so every rank runs the same forward on its shard and joins
the same collectives in the same order. Sampling stays on rank 0, and so does
the KV block pool's bookkeeping (allocation, prefix cache, preemption): each
description carries the pool's size and its rows' block tables, which the
other ranks mirror into their own shards of the pool (amlx.tp.rows).

A watchdog thread reads the followers' heartbeats: a follower that dies (its
pipe closes) or stops making progress for `AMLX_TP_STEP_TIMEOUT` seconds (300)
while a step waits on it fails the model: every follower is killed (which
also ends rank 0's pending collective with an error on the ring backend),
every request ends with a TensorParallelError and the model closes.
"""

from __future__ import annotations

import os
import select
import shutil
import threading
import time
from typing import Callable

from amlx._mlx import Array
from amlx._mlx import distributed as dist
from amlx._mlx import ops
from amlx.errors import TensorParallelError
from amlx.kv import PADDING_ROW
from amlx.tp import protocol
from amlx.tp import launch as _launch
from amlx.tp.launch import Launch, Rank
from amlx.tp.rows import encode_rows

STOP_TIMEOUT = 30.0  # seconds a follower gets to exit after STOP
_FAILED_GROUPS: list[dist.Group] = []  # the groups of failed models, never freed (see Leader.close)


class Leader:
    def __init__(self, launch: Launch, group: dist.Group, step_timeout: float | None = None):
        self.launch, self.group, self.size = launch, group, group.size
        self._ids: dict[object, int] = {}  # request -> id the followers know it by
        self._known: dict[int, list[int]] = {}  # id -> the block table the followers hold for it
        self._next_id = 1
        self._frees: list[int] = []
        self._inflight: list[Array] = []  # the last message's collectives
        self._sent = 0
        self._lock = threading.Lock()
        self._failure: TensorParallelError | None = None
        self._on_failure: list[Callable[[TensorParallelError], None]] = []
        self._stopping = threading.Event()
        # seconds a rank may lag behind a step before the model fails (AMLX_TP_STEP_TIMEOUT)
        self._step_timeout = _launch.step_timeout() if step_timeout is None else step_timeout
        self.closed = False  # close() ran to its end: followers gone, group freed
        self._stop_killed = False  # close() killed followers that did not join STOP in time
        self._watchdog = threading.Thread(target=self._watch, name="amlx-tp-watchdog", daemon=True)
        self._watchdog.start()

    def reduce(self, x: Array) -> Array:
        """The all_sum over the group (what sharded layers end with)."""
        return dist.all_sum(x, self.group)

    def on_failure(self, callback: Callable[[TensorParallelError], None]) -> None:
        """`callback(error)` runs once when a rank fails (from any thread)."""
        self._on_failure.append(callback)

    # -- the scheduler's hooks (worker thread) -------------------------------------
    def prefill(self, requests: list, start: int, length: int, ends: list[int], logits_read: bool,
                capacity: int) -> None:
        """A prefill pass writing positions [start, start + length) of each row
        (row b's real ones end at `ends[b]`) into a pool of `capacity` blocks;
        `logits_read`: whether rank 0 evaluates its logits (the others then do)."""
        rows = self._rows(requests)
        self._send(protocol.PREFILL, [capacity, len(requests), start, length, int(logits_read), *ends, *rows])

    def decode(self, rows: list, capacity: int) -> None:
        """A decode pass of `rows` (requests, or amlx.kv's PADDING_ROW) writing each
        row's position `pos`, into a pool of `capacity` blocks."""
        words = self._rows(rows)
        self._send(protocol.DECODE, [capacity, len(rows), *[r.pos for r in rows], *words])

    def _rows(self, rows: list) -> list[int]:
        ids = [0 if r is PADDING_ROW else self._id(r) for r in rows]
        return encode_rows(ids, [r.blocks for r in rows], self._known)

    def free(self, request) -> None:
        """The request ended: the followers drop its rows with the next message."""
        rid = self._ids.pop(request, None)
        if rid is not None:
            self._known.pop(rid, None)
            self._frees.append(rid)

    def _id(self, request) -> int:
        rid = self._ids.get(request)
        if rid is None:
            rid = self._ids[request] = self._next_id
            self._next_id += 1
        return rid

    def _send(self, kind: int, body: list[int]) -> None:
        if self._failure is not None:
            raise self._failure
        frees, self._frees = self._frees, []
        for a in self._inflight:
            a.close()
        self._inflight = protocol.send(self.group, kind, frees, body)
        with self._lock:
            self._sent += 1

    # -- failure -----------------------------------------------------------------------
    def fatal(self, exc: BaseException) -> TensorParallelError:
        """The error a failed step on rank 0 ends the model with: the watchdog's,
        if it saw a rank die (waited for briefly: the step may fail first)."""
        deadline = time.monotonic() + 2.0
        while self._failure is None and time.monotonic() < deadline:
            if any(r.process.poll() is not None for r in self.launch.ranks):
                time.sleep(0.3)  # let the watchdog name the rank
                break
            time.sleep(0.05)
        self._fail(TensorParallelError(f"a tensor-parallel step failed on rank 0: {exc}"))
        return self._failure

    def _fail(self, error: TensorParallelError) -> None:
        with self._lock:
            if self._failure is not None:
                return
            self._failure = error
        self._kill()
        for callback in self._on_failure:
            callback(error)

    def _kill(self) -> None:
        for r in self.launch.ranks:
            _launch.kill_rank(r)

    # -- the watchdog thread ---------------------------------------------------------
    def _watch(self) -> None:
        live = {r.heartbeat: r for r in self.launch.ranks}
        stalled_since: float | None = None
        while live and not self._stopping.is_set():
            readable, _, _ = select.select(list(live), [], [], 0.25)
            for fd in readable:
                data = os.read(fd, 4096)
                rank = live[fd]
                if not data:
                    del live[fd]
                    if not self._stopping.is_set():
                        rank.process.wait(5)
                        self._fail(TensorParallelError(f"{rank.describe_exit()}; the model is closed"
                                                       + _tail(rank)))
                rank.steps += len(data)
            with self._lock:
                behind = any(r.steps < self._sent for r in live.values())
            now = time.monotonic()
            stalled_since = (stalled_since or now) if behind and not readable else None
            if stalled_since is not None and now - stalled_since > self._step_timeout:
                self._fail(TensorParallelError(f"a tensor-parallel rank made no progress for "
                                               f"{self._step_timeout:.0f} s; the model is closed"))
                return

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Stops the followers (STOP, then a kill after STOP_TIMEOUT) and frees
        the group, unless a rank failed (worker thread)."""
        self._stopping.set()
        if self._failure is None:
            # A follower that hangs (stopped, stuck) never joins STOP's collective, and the
            # watchdog has stopped watching: without a bound this close waited for good. After
            # STOP_TIMEOUT the followers are killed, which ends the collective (amlx.tp.keeper
            # answers for a dead rank of a two-rank ring).
            timer = threading.Timer(STOP_TIMEOUT, self._stop_timed_out)
            timer.daemon = True
            timer.start()
            try:
                self._inflight += protocol.send(self.group, protocol.STOP, self._frees, [])
                ops.eval(*self._inflight)
            except Exception:  # noqa: BLE001 - a follower gone already: killed below
                pass
            finally:
                timer.cancel()
        for a in self._inflight:
            a.close()
        self._inflight = []
        deadline = time.monotonic() + STOP_TIMEOUT
        for r in self.launch.ranks:
            try:
                r.process.wait(max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
                pass
        self._kill()
        for r in self.launch.ranks:
            r.process.wait()
        self._watchdog.join(2)
        for r in self.launch.ranks:
            _launch.close_pipes(r)
        if self._failure is None and not self._stop_killed:
            self.group.close()
        else:
            # After a rank failed (or was killed at close), the ring backend's own threads may
            # still be inside the operations the dead peer broke, and this handle is the
            # backend's last owner (amlx._mlx.distributed.init makes MLX forget its cached
            # group): freeing it
            # destroyed the backend under them, a crash in 15 of 350 runs beside busy cores
            # (tests/test_tensor_parallel.py's killed rank, inside mlxc_group_free). The
            # handle and its sockets stay until the process ends.
            _FAILED_GROUPS.append(self.group)
        shutil.rmtree(self.launch.workdir, ignore_errors=True)
        self.closed = True

    def _stop_timed_out(self) -> None:
        """(Timer thread) STOP's collective waited STOP_TIMEOUT: a follower hangs."""
        self._stop_killed = True  # the ring then ended like a failed one: its group is kept
        self._kill()

    @property
    def alive(self) -> list[int]:
        """The pids of follower processes still running (tests, stats)."""
        return [r.process.pid for r in self.launch.ranks if r.process.poll() is None]


def _tail(rank: Rank) -> str:
    tail = rank.error_tail()
    return f"\n--- rank {rank.rank} output ---\n{tail}" if tail else ""
