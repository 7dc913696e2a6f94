"""Faults for tests of failure handling."""

from __future__ import annotations

import numpy as np


def failing_array():
    """A float32 scalar whose evaluation fails inside MLX's eval ("Attempting to eval
    an array without a primitive"): a sum over an intermediate leaked out of a
    compiled function's trace, which MLX cannot evaluate outside the trace. Make it
    on the thread that owns the MLX work (the engine's worker)."""
    from amlx._mlx import array, ops, transforms

    leaked = []

    def traced(x):
        y = ops.multiply(x, array(np.float32(2)))
        leaked.append(y)
        return y

    fn = transforms.compile(traced)
    ops.eval(fn(array(np.ones((2,), np.float32))))
    fn.close()
    return ops.sum(leaked[0])
