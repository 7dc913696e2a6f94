"""The one place that loads the native extensions (the cffi binding and Array's C core) and
turns C statuses into exceptions."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pathlib
import re
import sys
import threading

from amlx.errors import MLXError


def _preload_libmlx() -> None:
    # The extension links against libmlx by soname; load the copy that the
    # import system finds first, so an in-place build and an installed wheel
    # both resolve to the MLX wheel of the running environment.
    names = ("libmlx.dylib",) if sys.platform == "darwin" else ("libmlx.so",)
    dirs = []
    if os.environ.get("AMLX_MLX_DIR"):
        dirs.append(pathlib.Path(os.environ["AMLX_MLX_DIR"]))
    spec = importlib.util.find_spec("mlx")
    if spec is not None:
        dirs.extend(pathlib.Path(p) for p in spec.submodule_search_locations or [])
    for d in dirs:
        for name in names:
            path = d / "lib" / name
            if path.is_file():
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                return


_preload_libmlx()

try:
    from amlx._mlxc import ffi, lib  # noqa: E402
    from amlx import _arraytype as arraytype  # noqa: E402  (Array's C core: vendor/mlxc/arraytype.c)
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"amlx's native extensions could not be loaded ({exc}). Build it with "
        "`pip install -e .` or `python build_ffi.py` in an environment with mlx-cpu==0.32.4 "
        "(mlx-cuda-13 / mlx-metal on GPUs)."
    ) from exc

# What the other modules of amlx/_mlx take from here.
__all__ = ["arraytype", "check", "error", "ffi", "fix_for", "lib", "set_pending"]

# Exceptions raised by Python functions that MLX called back (compile, grads),
# kept per thread so the failing C call can re-raise the original.
_pending = threading.local()


def error(op: str, last_error=None) -> MLXError:
    """The exception for a failed C call of operation `op` on this thread.
    `last_error`: the C function holding the message, when not mlxc_last_error
    (the distributed functions keep their own: vendor/mlxc/distributed.cpp)."""
    cause = getattr(_pending, "exc", None)
    message = ffi.string((last_error or lib.mlxc_last_error)()).decode("utf-8", "replace")
    if cause is not None:
        _pending.exc = None
        err = MLXError(op, f"{message}: {type(cause).__name__}: {cause}")
        err.__cause__ = cause
        return err
    return MLXError(op, message, fix_for(message))


_MISSING_HEADER = re.compile(r'cannot open source file "([^"]+)"')


# How MLX's allocators report running out: CUDA's cudaMalloc(Async), the common and CPU
# allocator's malloc, Metal's buffer limit and its command buffers.
_OUT_OF_MEMORY = re.compile(r"out of memory|Unable to allocate|greater than the maximum allowed buffer size|"
                            r"Insufficient Memory", re.IGNORECASE)


def fix_for(message: str) -> str | None:
    """The fix for an MLX failure amlx recognises, else None: the device out of memory, or
    a missing CUDA header (MLX's CUDA backend compiles some kernels at first use, NVRTC:
    the multi-row quantized matmul, and fails with NVRTC's log when one is missing)."""
    if _OUT_OF_MEMORY.search(message):
        return ("The device ran out of memory. Other processes on it count too: MLX keeps freed buffers "
                "cached in each process (up to 95% of a GPU), so two MLX processes on one device can starve "
                "each other. Lower the load options kv_cache_memory or max_batch_size, or "
                "AMLX_PREFILL_MEMORY (bytes a prefill pass may take).")
    missing = _MISSING_HEADER.search(message)
    if missing is None:
        return None
    header = missing.group(1)
    if header.startswith("crt/"):
        return (f"MLX's CUDA kernel compiler could not find CUDA's {header}. The crt/ headers come from "
                f"NVIDIA's nvidia-cuda-crt package: `pip install nvidia-cuda-crt` (for mlx-cuda-13), or "
                f"install the CUDA toolkit and point CUDA_HOME at it.")
    return (f"MLX's CUDA kernel compiler could not find the header {header}. Install the CUDA toolkit's "
            f"headers (NVIDIA's pip packages, or the toolkit with CUDA_HOME pointing at it).")


def check(status: int, op: str) -> None:
    if status:
        raise error(op)


def set_pending(exc: BaseException) -> None:
    _pending.exc = exc
