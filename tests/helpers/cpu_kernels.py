"""What the CPU kernel tests share: the kernels' process-wide settings put back after
each test, and arrays read as float64 for the numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from amlx import _mlx as mx
from amlx._mlx import cpu_kernels as ck
from amlx._mlx import ops as O


@pytest.fixture(autouse=True)
def restore_kernel_settings():
    """A test may pick an instruction set, the bf16 kernel or a thread count; the next one
    starts from the defaults."""
    threads, bf16 = ck.threads(), ck.bf16_kernel()
    yield
    ck.set_isa("best")
    ck.set_bf16_kernel(bf16)
    ck.set_threads(threads)


def as_f64(a) -> np.ndarray:
    """An MLX array (any float dtype) as float64 numpy."""
    return np.asarray(O.astype(a, mx.float32)).astype(np.float64)
