"""A bug hunt of tensor parallelism (`tensor_parallel=2` over MLX's ring backend
on this CPU machine), beside tests/test_tensor_parallel.py (which has the
greedy-equality, cancellation, killed/hung-rank and option tests this file does
not repeat).

Here: logprobs against one process (bound below), messages longer than one
protocol buffer, quantized checkpoints whose parts do not fall on quantization
groups, refused options that must leave no folder or process behind, a close
while requests run or while a follower hangs, a follower dying under several
requests, and a malformed message.

Logprob bound: the ranks add two partial sums per layer where one process adds
one, so logits differ by float32 rounding; over these tiny models the largest
difference seen was 6e-5 (Gemma 3, 4 layers), and the bound is 1e-3, far below
the gaps between these random models' logprobs that would change a token.

Failure scenarios run in a process of their own (`python -m tests.test_tp_hunt
SCENARIO CKPT`, printing one RESULT line), as tests/helpers/tp_failure.py does:
a regression there must fail the test, not hang or crash the test process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import amlx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds: a hang fails the test instead of hanging the suite
LOGPROB_BOUND = 1e-3


def run(coro_fn, *args):
    return asyncio.run(asyncio.wait_for(coro_fn(*args), TIMEOUT))


def processes_of(workdir) -> list[int]:
    """Pids of live processes whose command line names a launch's work folder: its
    followers, and their keepers (amlx.tp.keeper: forks of a follower in a session
    of their own, whose parent is no longer this process)."""
    needle = str(workdir).encode()
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmd and state != "Z":
            found.append(int(entry))
    return found


def gone(workdir, wait: float = 20.0) -> bool:
    """Whether every process of the launch has exited (a keeper exits once rank 0
    closed its end of the lifeline: allowed a moment)."""
    deadline = time.monotonic() + wait
    while processes_of(workdir):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from tests.helpers.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("tp_hunt")
    return {arch: make_checkpoint(root / arch, arch, seed=4) for arch in ("qwen3", "gemma3_text")}


# -- options refused before anything starts ----------------------------------------------

def test_refused_hostfiles_leave_no_work_folder(ckpts, tmp_path, monkeypatch):
    """A hostfile refused (wrong rank count, rank 0 elsewhere, not JSON, bad address)
    leaves no amlx-tp-* folder: the work folder was made before the checks, and
    every refused load left an empty one in the temp folder."""
    import tempfile

    from amlx.tp import hosts

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    hostfile = tmp_path / "hosts.json"
    monkeypatch.setenv("AMLX_TP_HOSTFILE", str(hostfile))
    port = hosts.free_ports(1)[0]
    bad = {json.dumps([[f"127.0.0.1:{port}"]]): "names 1 ranks",
           json.dumps([["192.0.2.1:4000"], [f"127.0.0.1:{port}"]]): "rank 0 .* must be on this host",
           "not json": "not a readable JSON hostfile",
           json.dumps([["127.0.0.1:0"], ["127.0.0.1:70000"]]): "one list of \"host:port\" strings"}
    for text, why in bad.items():
        hostfile.write_text(text)
        with pytest.raises(ValueError, match=why):
            amlx.load_sync(ckpts["qwen3"], device="cpu", tensor_parallel=2)
        assert list(temp.iterdir()) == [], text


def test_hostfile_addresses_are_checked():
    from amlx.tp.hosts import _is_address

    for good in ("127.0.0.1:1", "localhost:65535", "[::1]:5000", "node-3.example:4000"):
        assert _is_address(good), good
    for bad in ("127.0.0.1", "127.0.0.1:", ":5000", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:-1",
                "127.0.0.1:5e3", "127.0.0.1: 80"):
        assert not _is_address(bad), bad


@pytest.mark.parametrize("var", ["AMLX_TP_STEP_TIMEOUT", "AMLX_TP_JOIN_TIMEOUT"])
def test_bad_timeouts_are_refused_before_any_rank_starts(ckpts, var, monkeypatch):
    """A timeout that is no positive number: a ValueError naming the variable, and
    no rank started (float()'s "could not convert string to float: 'abc'" came once
    the followers had loaded, or, for the step timeout, once they had joined)."""
    from amlx.tp import launch

    started = []
    spawn = launch._spawn
    monkeypatch.setattr(launch, "_spawn", lambda *a, **k: started.append(spawn(*a, **k)) or started[-1])
    for value in ("abc", "0", "-5", "nan"):
        monkeypatch.setenv(var, value)
        with pytest.raises(ValueError, match=f"{var} must be a positive number of seconds"):
            amlx.load_sync(ckpts["qwen3"], device="cpu", tensor_parallel=2)
    assert started == []
    monkeypatch.setenv(var, " ")  # blank: the default
    assert launch.join_timeout() == 600.0 and launch.step_timeout() == 300.0
    monkeypatch.setenv(var, "inf")  # no limit
    assert launch.env_seconds(var, 1.0) == float("inf")


def test_a_failed_spawn_stops_the_ranks_already_started(ckpts, monkeypatch):
    """The OS refusing rank 2's process (here: a fault injected in its spawn) ends
    rank 1, already started, and removes the work folder: before, rank 1 ran on
    (until its lifeline closed with this process) and its folder stayed."""
    from amlx.tp import launch

    started = []
    spawn = launch._spawn

    def spawn_once(*args, **kwargs):
        if started:
            raise OSError(24, "Too many open files")
        started.append(spawn(*args, **kwargs))
        return started[-1]
    monkeypatch.setattr(launch, "_spawn", spawn_once)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Too many open files"):
        launch.start(str(ckpts["qwen3"]), 3, "cpu", None)
    (rank,) = started
    assert rank.process.returncode is not None  # killed and reaped
    assert not rank.log.parent.exists()
    assert len(os.listdir("/proc/self/fd")) == fds  # rank 0's ends of its pipes closed
