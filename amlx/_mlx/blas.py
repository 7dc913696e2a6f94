"""Which BLAS MLX's CPU backend uses, and routing it to OpenBLAS.

MLX's Linux CPU wheel links netlib's reference BLAS, whose sgemm is a plain
loop. amlx depends on `scipy-openblas32` on Linux and, when this module is
imported, points libmlx's BLAS and LAPACK calls at it (see vendor/mlxc/blas.cpp).
Set AMLX_BLAS=reference to keep MLX's own BLAS (for comparisons). OpenBLAS runs
each call on one thread unless OPENBLAS_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from amlx._mlx._lib import check, ffi, lib


@dataclasses.dataclass(frozen=True)
class BlasInfo:
    """Where MLX's CPU BLAS calls go.

    library: path of the routed library, or "reference" (MLX's bundled netlib BLAS).
    reason: why the route is not in effect ("" when it is).
    routed_symbols: libmlx symbol slots pointed at the library.
    threads: threads the BLAS runs a call on.
    sgemm_calls: cblas_sgemm calls that went through the route since start.
    """

    library: str
    reason: str
    routed_symbols: int
    threads: int
    sgemm_calls: int


_reason = ""


def _openblas_path() -> str:
    import scipy_openblas32  # a runtime dependency on Linux

    lib_dir = scipy_openblas32.get_lib_dir()
    return os.path.join(lib_dir, f"lib{scipy_openblas32.get_library()}.so")


def route() -> None:
    """Route MLX's BLAS to OpenBLAS once; on failure keep the reference BLAS and remember why."""
    global _reason
    if not sys.platform.startswith("linux"):
        _reason = "MLX uses the platform's BLAS here"
        return
    if os.environ.get("AMLX_BLAS", "") == "reference":
        _reason = "AMLX_BLAS=reference"
        return
    try:
        path = _openblas_path()
    except ImportError:
        _reason = "scipy-openblas32 is not installed"
        return
    if lib.mlxc_blas_route(path.encode(), b"scipy_"):
        _reason = ffi.string(lib.mlxc_last_error()).decode("utf-8", "replace")
        return
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        # One thread per call: the cores are already shared out by the engine (one MLX
        # stream per core) and by amlx's CPU kernels' pool; a threaded BLAS on top of
        # them oversubscribes, and its spin-waits made a one-row sgemm 10x slower here.
        lib.mlxc_blas_set_threads(1)


def info() -> BlasInfo:
    """The BLAS in use by MLX's CPU backend."""
    library = ffi.string(lib.mlxc_blas_library()).decode()
    return BlasInfo(library=library or "reference", reason=_reason,
                    routed_symbols=lib.mlxc_blas_routed_symbols(), threads=lib.mlxc_blas_threads(),
                    sgemm_calls=lib.mlxc_blas_sgemm_calls())


def set_threads(n: int) -> None:
    """Set the number of threads the routed BLAS uses per call (raises MLXError when not routed)."""
    check(lib.mlxc_blas_set_threads(int(n)), "blas.set_threads")
