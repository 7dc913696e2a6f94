"""Rank 0 joins the group of a launch (amlx.tp.launch), bounded in time."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

from amlx._mlx import distributed as dist
from amlx.errors import TensorParallelError
from amlx.tp import hosts
from amlx.tp.launch import Launch, Rank, join_timeout


_JOIN_LOCK = threading.Lock()


def join(launch: Launch, timeout: float | None = None) -> dist.Group:
    """Rank 0's group with the followers, once every follower has loaded its
    part and said so. TensorParallelError when a follower exits first or the
    wait passes `timeout` (with the follower's own error output)."""
    result: dict = {}

    def connect() -> None:
        try:
            result["group"] = dist.init(launch.backend)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = exc

    deadline = time.monotonic() + (join_timeout() if timeout is None else timeout)
    # One join at a time in this process: MLX's backends read the rank's environment
    # (MLX_RANK, MLX_HOSTFILE), which is the process's, and amlx's distributed.init
    # clears MLX's cached backends around each init. Two models loading at once (each on
    # a worker of its own) swapped hostfiles or cleared each other's backend mid-join:
    # their ranks failed to connect ("Couldn't connect") or waited out the timeout.
    while not _JOIN_LOCK.acquire(timeout=0.1):
        _check_alive(launch.ranks, deadline, lambda: None)
    try:
        saved = {k: os.environ.get(k) for k in launch.env}
        os.environ.update(launch.env)
        try:
            helper = threading.Thread(target=connect, name="amlx-tp-join", daemon=True)
            helper.start()
            while helper.is_alive():
                helper.join(0.1)
                _check_alive(launch.ranks, deadline, lambda: _unblock(launch), _remote(launch))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        _JOIN_LOCK.release()
    if "error" in result:
        raise TensorParallelError(f"rank 0 could not join the tensor-parallel group: {result['error']}"
                                  + _tails(launch.ranks))
    group = result["group"]
    try:
        _wait_ready(launch.ranks, deadline)
    except BaseException:
        group.close()
        raise
    return group


def _check_alive(ranks: list[Rank], deadline: float, unblock, remote: list[int] | None = None) -> None:
    dead = [r for r in ranks if r.process.poll() is not None]
    late = time.monotonic() > deadline
    if dead or late:
        unblock()
        why = dead[0].describe_exit() if dead else "the tensor-parallel ranks did not start in time"
        if not dead and remote:  # (amlx starts only this host's ranks: say which ones it waited for)
            why += (f" (the hostfile places rank{'s' if len(remote) > 1 else ''} "
                    f"{', '.join(map(str, remote))} on other hosts: start them there with the same model)")
        raise TensorParallelError(f"{why} while loading" + _tails(dead or ranks))


def _remote(launch: Launch) -> list[int]:
    """The ranks that amlx did not start (the hostfile places them on other hosts)."""
    return sorted(set(range(1, launch.size)) - {r.rank for r in launch.ranks})


def _wait_ready(ranks: list[Rank], deadline: float) -> None:
    """Every follower writes one byte, "R", once its part of the model is loaded."""
    waiting = {r.heartbeat: r for r in ranks}
    while waiting:
        readable, _, _ = select.select(list(waiting), [], [], 0.2)
        for fd in readable:
            rank = waiting.pop(fd)
            if os.read(fd, 1) != b"R":
                rank.process.wait(5)
                raise TensorParallelError(f"{rank.describe_exit()} while loading" + _tails([rank]))
            rank.ready = True
        _check_alive([r for r in ranks if not r.ready], deadline, lambda: None)


def _tails(ranks: list[Rank]) -> str:
    parts = [f"\n--- rank {r.rank} output ---\n{tail}" for r in ranks for tail in [r.error_tail()] if tail]
    return "".join(parts)


def _unblock(launch: Launch) -> None:
    """MLX's ring backend accepts its left neighbour without a timeout: a
    connection of our own lets the abandoned join thread move on (and fail)."""
    path = launch.env.get("MLX_HOSTFILE")
    if launch.backend != "ring" or not path:
        return
    host, _, port = hosts.read_hostfile(path)[0][0].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        pass
