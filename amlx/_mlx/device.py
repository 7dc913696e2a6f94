"""Devices and streams."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
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


def set_default_device(device: str) -> None:
    if device == "gpu" and not gpu_available():
        raise ValueError("no GPU is available to MLX on this machine")
    check(lib.mlxc_set_default_device(_code(device)), "set_default_device")


def new_stream(device: str) -> int:
    out = ffi.new("int*")
    check(lib.mlxc_new_stream(_code(device), out), "new_stream")
    return int(out[0])


def set_default_stream(device: str, index: int) -> None:
    check(lib.mlxc_set_default_stream(_code(device), int(index)), "set_default_stream")


def synchronize() -> None:
    check(lib.mlxc_synchronize(), "synchronize")


# -- CPU streams for parallel work ----------------------------------------------
# MLX runs the work of a stream on one thread, and the BLAS of its Linux CPU
# wheels is single-threaded, so CPU work on one stream keeps one core busy. Work
# put on different streams runs on different cores at once. A thread's default
# stream is its own (MLX keeps it per thread), so the streams are per thread too.

_local = threading.local()


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_streams(n: int) -> list[int]:
    """n CPU streams of the calling thread, made on first use. The first becomes
    the thread's default CPU stream, so the thread's other work stays on one
    stream and `on_stream` only switches away from it for a block."""
    streams: list[int] | None = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = [new_stream("cpu")]
        set_default_stream("cpu", streams[0])
        _local.current = streams[0]
    while len(streams) < n:
        streams.append(new_stream("cpu"))
    return streams[:n]


@contextmanager
def on_stream(stream: int) -> Iterator[None]:
    """Ops made inside the block run on `stream` (one of `cpu_streams`); blocks nest."""
    prev = getattr(_local, "current", None)
    if prev is None:
        raise RuntimeError("on_stream needs this thread's streams: call cpu_streams first")
    if stream == prev:
        yield
        return
    set_default_stream("cpu", stream)
    _local.current = stream
    try:
        yield
    finally:
        set_default_stream("cpu", prev)
        _local.current = prev


@contextmanager
def split_matmuls(streams: list[int]) -> Iterator[None]:
    """Within the block (on this thread), `ops.matmul(a, w)`, `ops.addmm(c, a, w)` and
    `ops.quantized_matmul(a, w, ..., transpose=True)` by a 2-D weight `w` split
    their output columns into blocks, one per stream of `streams` (from
    `cpu_streams`; the first must be the current stream), and join them on the
    current stream. Column blocks are free views for weights laid out as the
    models use them (a transposed view of an (out, in) array; a packed quantized
    (out, ...) array); other layouts are copied. A compiled function traced
    inside the block keeps the split in its trace."""
    prev = getattr(_local, "split", None)
    _local.split = list(streams) if len(streams) > 1 else None
    try:
        yield
    finally:
        _local.split = prev


def split_streams() -> list[int] | None:
    """The streams matmuls are split over here (see `split_matmuls`), or None."""
    return getattr(_local, "split", None)
