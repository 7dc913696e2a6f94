"""A stand-in for a follower that died, so rank 0's pending collectives end.

MLX's ring backend has no timeout: when a peer dies mid-step, rank 0's
connection threads stop after the socket errors and its collectives of that
step (and any later one) wait for good, and MLX counts that stuck work against
every later evaluation of the process. So each follower of a two-rank ring
forks a keeper right after joining: a small process that holds copies of the
follower's two ring sockets and does nothing while the follower lives. When
the follower dies (its "alive" pipe closes without the clean-exit byte), the
keeper answers rank 0 in its place for a while: every byte rank 0 sends on
one socket is answered with a zero byte on the other (a peer that contributes
zeros: each ring step sends and receives equal sizes), plus zeros when rank 0
waits, so rank 0's pending collectives complete (with values nobody uses: the
model has failed by then) instead of hanging. It exits when rank 0 closes the
sockets or goes away, after ECHO_SECONDS, or at once after a clean exit.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import time

ECHO_SECONDS = 30.0
CLEAN_EXIT = b"Q"


def ring_sockets() -> list[int]:
    """This process's connected TCP sockets (a follower's ring connections)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
                s.getpeername()
                found.append(fd)
        except OSError:
            pass
        finally:
            s.close()
    return found


def start(lifeline: int | None) -> int | None:
    """Forks the keeper (two-rank rings only); returns the follower's end of the
    alive pipe (write CLEAN_EXIT to it before a clean exit), or None."""
    socks = ring_sockets()
    if len(socks) != 2:
        return None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the keeper: plain system calls only (a fork of a threaded process)
        try:
            os.setsid()  # out of the follower's process group: rank 0 kills that group
            _close_all_but({r, *socks} | ({lifeline} if lifeline is not None else set()))
            _keep(r, socks, lifeline)
        finally:
            os._exit(0)
    os.close(r)
    return w


def _close_all_but(keep: set[int]) -> None:
    """Closes every inherited descriptor but `keep`: above all the follower's
    heartbeat pipe, whose end-of-file tells rank 0's watchdog the follower died."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _keep(alive: int, socks: list[int], lifeline: int | None) -> None:
    watch = [alive] + ([lifeline] if lifeline is not None else [])
    while True:
        readable, _, _ = select.select(watch, [], [])
        if lifeline in readable and not os.read(lifeline, 1):
            return  # rank 0 is gone
        if alive in readable:
            if os.read(alive, 1) == CLEAN_EXIT:
                return
            break  # the follower died
    _answer(socks, lifeline)


def _answer(socks: list[int], lifeline: int | None) -> None:
    a, b = socks
    other = {a: b, b: a}
    owed = {a: 0, b: 0}  # zero bytes to write on each socket
    deadline = time.monotonic() + ECHO_SECONDS
    while time.monotonic() < deadline:
        want_write = [s for s in socks if owed[s]]
        watch = socks + ([lifeline] if lifeline is not None else [])
        readable, writable, _ = select.select(watch, want_write, [], 0.2)
        if lifeline is not None and lifeline in readable and not os.read(lifeline, 1):
            return
        for s in socks:
            if s in readable:
                try:
                    data = os.read(s, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return  # rank 0 closed its end
                owed[other[s]] += len(data)
        for s in writable:
            try:
                owed[s] -= os.write(s, bytes(min(owed[s], 1 << 16)))
            except BlockingIOError:
                pass
            except OSError:
                return
        if not readable and not want_write:
            for s in socks:  # rank 0 may wait for bytes the follower owed it when it died
                owed[s] += 4096
