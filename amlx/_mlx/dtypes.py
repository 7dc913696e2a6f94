"""MLX dtypes as seen from Python, with their numpy counterparts."""

from __future__ import annotations

import numpy as np


class Dtype:
    """An MLX element type. `code` is the mlxc_dtype value."""

    __slots__ = ("name", "code", "size", "np", "kind")

    def __init__(self, name: str, code: int, size: int, np_dtype, kind: str):
        self.name, self.code, self.size, self.np, self.kind = name, code, size, np.dtype(np_dtype), kind

    def __repr__(self) -> str:
        return f"amlx.{self.name}"

    @property
    def is_floating(self) -> bool:
        return self.kind == "f"

    @property
    def is_integer(self) -> bool:
        return self.kind in "iu"


# `np` is the numpy type of the raw bytes; bfloat16 travels as uint16 bit patterns.
bool_ = Dtype("bool", 0, 1, np.bool_, "b")
uint8 = Dtype("uint8", 1, 1, np.uint8, "u")
uint16 = Dtype("uint16", 2, 2, np.uint16, "u")
uint32 = Dtype("uint32", 3, 4, np.uint32, "u")
uint64 = Dtype("uint64", 4, 8, np.uint64, "u")
int8 = Dtype("int8", 5, 1, np.int8, "i")
int16 = Dtype("int16", 6, 2, np.int16, "i")
int32 = Dtype("int32", 7, 4, np.int32, "i")
int64 = Dtype("int64", 8, 8, np.int64, "i")
float16 = Dtype("float16", 9, 2, np.float16, "f")
float32 = Dtype("float32", 10, 4, np.float32, "f")
float64 = Dtype("float64", 11, 8, np.float64, "f")
bfloat16 = Dtype("bfloat16", 12, 2, np.uint16, "f")
complex64 = Dtype("complex64", 13, 8, np.complex64, "c")

ALL = (bool_, uint8, uint16, uint32, uint64, int8, int16, int32, int64,
       float16, float32, float64, bfloat16, complex64)
BY_CODE = {d.code: d for d in ALL}
BY_NAME = {d.name: d for d in ALL}
BY_NAME["bool_"] = bool_
_FROM_NUMPY = {d.np: d for d in ALL if d is not bfloat16}


def from_numpy(np_dtype) -> Dtype:
    np_dtype = np.dtype(np_dtype)
    if np_dtype == np.float64:
        return float32  # MLX computes in float32 unless float64 is asked for by name
    try:
        return _FROM_NUMPY[np_dtype]
    except KeyError:
        raise TypeError(f"numpy dtype {np_dtype} has no MLX counterpart") from None


def as_dtype(d) -> Dtype:
    """Accepts a Dtype, its name ('bfloat16') or a numpy dtype."""
    if isinstance(d, Dtype):
        return d
    if isinstance(d, str) and d in BY_NAME:
        return BY_NAME[d]
    try:
        return _FROM_NUMPY[np.dtype(d)]
    except (TypeError, KeyError):
        raise TypeError(f"unknown dtype {d!r}") from None


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (NaN kept NaN)."""
    u = np.asarray(x, dtype=np.float32, order="C").view(np.uint32)  # keeps 0-d arrays 0-d
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, np.uint16(0x7FC0), rounded)
    return rounded
