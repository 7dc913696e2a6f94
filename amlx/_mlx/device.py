"""Devices and streams."""

from __future__ import annotations

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
