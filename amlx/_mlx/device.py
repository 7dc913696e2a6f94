"""Devices and streams."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from amlx._mlx._lib import check, ffi, lib

_NAMES = {0: "cpu", 1: "gpu"}
_CODES = {"cpu": 0, "gpu": 1}


def gpu_available() -> bool:
    return bool(lib.mlxc_gpu_available())


def default_device() -> str:
    return _NAMES[lib.mlxc_default_device()]


def _code(device: str) -> int:
    try:
        return _CODES[device]
    except KeyError:
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}") from None


@dataclass(frozen=True)
class Stream:
    """An MLX stream: a queue of work on one device (on the CPU, one thread)."""

    device: str  # "cpu" | "gpu"
    index: int


def new_stream(device: str) -> Stream:
    """A new stream on `device`. MLX keeps streams per thread: make it on the
    thread that will use it."""
    if device == "gpu" and not gpu_available():
        raise ValueError("no GPU is available to MLX on this machine")
    out = ffi.new("int*")
    check(lib.mlxc_new_stream(_code(device), out), "new_stream")
    return Stream(device, int(out[0]))


def synchronize() -> None:
    check(lib.mlxc_synchronize(), "synchronize")


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


# -- running work on a stream ---------------------------------------------------
# Ops of the C layer take no stream: they run on the calling thread's default
# stream of MLX's default device. `on_stream` makes a stream the thread's
# default for its device for the length of a block, so every op made inside runs
# there. MLX keeps the default stream per thread, but the default *device* is one
# per process; a block on a stream of the other device switches it for the
# block only and puts it back (the worker thread is the only one making MLX
# calls while a model runs, so no other thread sees the switch). Outside such
# blocks nothing here changes the default device.

_local = threading.local()


def current_stream() -> Stream | None:
    """The stream of the innermost `on_stream` block on this thread, or None."""
    return getattr(_local, "current", None)


@contextmanager
def on_stream(stream: Stream) -> Iterator[None]:
    """Ops made inside the block (on this thread) run on `stream`; blocks nest."""
    prev = current_stream()
    if stream == prev:
        yield
        return
    code = _code(stream.device)
    prev_device = lib.mlxc_default_device()
    back = prev if prev is not None and prev.device == stream.device else _thread_default(stream.device)
    check(lib.mlxc_set_default_stream(code, stream.index), "set_default_stream")
    if prev_device != code:
        check(lib.mlxc_set_default_device(code), "set_default_device")
    _local.current = stream
    try:
        yield
    finally:
        if prev_device != code:
            check(lib.mlxc_set_default_device(prev_device), "set_default_device")
        check(lib.mlxc_set_default_stream(code, back.index), "set_default_stream")
        _local.current = prev


def _thread_default(device: str) -> Stream:
    """The stream this thread's ops on `device` ran on before any `on_stream`
    block: MLX's own default, remembered as the first stream entered there."""
    defaults = _local.__dict__.setdefault("defaults", {})
    if device not in defaults:
        # MLX gives each thread its default stream lazily; a fresh stream stands
        # in for it, so leaving the outermost block lands on a stream of our own
        # that no one else queues work on.
        defaults[device] = new_stream(device)
    return defaults[device]
