"""amlx's internal array layer over MLX (through the cffi extension `amlx._mlxc`).

Only this package talks to the extension. At run time only the engine's worker
thread calls into it; tests of the array layer call it directly on one thread.
"""

from amlx._mlx import blas, device, fast, io, memory, ops, random, transforms
from amlx._mlx._lib import ffi, lib
from amlx._mlx.array import Array, array, from_bits
from amlx._mlx.dtypes import (Dtype, bfloat16, bool_, complex64, float16, float32, float64, int8, int16, int32,
                              int64, uint8, uint16, uint32, uint64)
from amlx._mlx.ops import async_eval, eval

# MLX's CPU matmuls go to OpenBLAS rather than the wheel's reference BLAS.
blas.route()


def version() -> str:
    """The version of the libmlx in use."""
    return ffi.string(lib.mlxc_version()).decode()


__all__ = ["Array", "array", "from_bits", "Dtype", "eval", "async_eval", "version", "ops", "fast", "random", "io",
           "memory", "transforms", "blas", "device", "bool_", "uint8", "uint16", "uint32", "uint64", "int8", "int16",
           "int32", "int64", "float16", "float32", "float64", "bfloat16", "complex64"]
