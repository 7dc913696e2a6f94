"""MLX's CPU BLAS is routed to OpenBLAS in-process (vendor/mlxc/blas.cpp).

The routed cblas_sgemm counts its calls; on MLX's bundled reference BLAS the
count stays at zero, so these tests fail there. Results are checked against
numpy. The load-order and opt-out cases run in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx._mlx import blas
from amlx._mlx import ops as O

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the route is Linux's")


def test_openblas_is_routed() -> None:
    info = blas.info()
    assert info.reason == ""
    assert "openblas" in info.library
    assert info.routed_symbols >= 3  # cblas_sgemm, _dgemm, _cgemm, and LAPACK
    # one thread per call (the engine's streams and the kernels' pool share out the cores)
    assert info.threads == 1 or "OPENBLAS_NUM_THREADS" in os.environ


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 70), k=st.integers(1, 70), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_float32_matmul_goes_through_openblas(m: int, k: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    before = blas.info().sgemm_calls
    got = O.matmul(mx.array(a), mx.array(b))
    mx.eval(got)
    assert blas.info().sgemm_calls > before
    want = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    assert np.all(np.abs(np.asarray(got) - want) <= 1e-5 * scale + 1e-6)


def test_thread_count_is_settable() -> None:
    n = blas.info().threads
    blas.set_threads(1)
    try:
        assert blas.info().threads == 1
        with pytest.raises(Exception, match="at least 1"):
            blas.set_threads(0)
    finally:
        blas.set_threads(n)


def _fresh(code: str, **env: str) -> str:
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_route_holds_when_libmlx_was_bound_first() -> None:
    # mlx.core loads libmlx and calls its sgemm (binding the reference) before amlx is imported.
    out = _fresh("""
        import mlx.core as m
        a = m.ones((32, 32)); m.eval(a @ a)
        from amlx._mlx import blas
        before = blas.info().sgemm_calls
        b = m.ones((32, 16)); m.eval(a @ b)
        print(blas.info().sgemm_calls - before)
    """)
    assert out == "1"


def test_reference_blas_on_request_says_so() -> None:
    out = _fresh("""
        from amlx import _mlx as mx
        from amlx._mlx import blas, ops
        a = mx.array([[1.0, 2.0], [3.0, 4.0]])
        mx.eval(ops.matmul(a, a))
        i = blas.info()
        print(i.library, i.sgemm_calls, i.reason)
    """, AMLX_BLAS="reference")
    assert out == "reference 0 AMLX_BLAS=reference"
