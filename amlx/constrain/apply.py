"""A step's token bitmasks applied to its logits, on the device (the worker thread)."""

from __future__ import annotations

import numpy as np

from amlx._mlx import Array, array, ops
from amlx._mlx import int32 as _int32

__all__ = ["masked_logits"]

_BIT_INDEX = np.arange(32, dtype=np.int32).reshape(1, 1, 32)


def masked_logits(logits: Array, masks: np.ndarray) -> Array:
    """`logits` (B, V) with every token a row's mask forbids at -inf.

    `masks` is the (B, words) int32 bitmask of `GrammarVocab.fill_masks` (an unconstrained row
    is all ones). Allowed logits come out bit for bit as they went in (a select, no arithmetic),
    so rows without a constraint sample exactly what they would alone. The bits are unpacked on
    the device: only B * V / 8 bytes travel per step.
    """
    b, v = logits.shape
    words = masks.shape[1]
    if masks.shape[0] != b or words * 32 < v:
        raise ValueError(f"a ({masks.shape[0]}, {words}) token mask does not cover logits of shape ({b}, {v})")
    shifted = ops.right_shift(ops.reshape(array(masks, _int32), (b, words, 1)), array(_BIT_INDEX))
    bits = ops.bitwise_and(shifted, array(1, _int32))
    allowed = ops.not_equal(ops.slice(ops.reshape(bits, (b, words * 32)), (0, 0), (b, v)), array(0, _int32))
    return ops.where(allowed, logits, array(float("-inf"), logits.dtype))
