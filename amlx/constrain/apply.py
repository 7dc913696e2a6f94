"""A step's token bitmasks applied to its logits, on the device (the worker thread).

The masks travel packed, as llguidance fills them: one int32 word per 32 token ids, so a step
uploads B * V / 8 bytes, once. They are unpacked on the device. `apply_token_mask` is made
of ops that `transforms.compile` fuses: the compiled sampling step (amlx.sample) calls it on
its masks input, so masking costs a constrained batch one fused unpack and a select inside
the step, with no per-row work and nothing proportional to the vocabulary on the host.
"""

from __future__ import annotations

import numpy as np

from amlx._mlx import Array, array, ops
from amlx._mlx import int32 as _int32

__all__ = ["apply_token_mask", "check_mask_shape", "masked_logits", "token_mask"]


def check_mask_shape(mask_shape: tuple, logits_shape: tuple) -> None:
    """ValueError unless a (rows, words) mask covers logits of shape (rows, vocab)."""
    b, v = logits_shape
    if len(mask_shape) != 2 or mask_shape[0] != b or mask_shape[1] * 32 < v:
        raise ValueError(f"a {tuple(mask_shape)} token mask does not cover logits of shape ({b}, {v})")


def _allowed(masks: Array) -> Array:
    """(B, words, 32) bool: bit j of word w, the words shifted by 0..31 along a new last axis
    (one fused elementwise kernel under compile)."""
    b, words = masks.shape
    shifts = ops.reshape(ops.arange(0, 32, dtype=_int32), (1, 1, 32))
    bits = ops.bitwise_and(ops.right_shift(ops.reshape(masks, (b, words, 1)), shifts), array(1, _int32))
    return ops.not_equal(bits, array(0, _int32))


def token_mask(masks: Array, vocab: int) -> Array:
    """(B, vocab) bool, True where the packed (B, words) int32 bitmask allows the token.

    Bit `i % 32` of word `i // 32` is token i (`_allowed`); the (B, words, 32) result is
    read as (B, words * 32), which is contiguous, so the reshape and the cut to `vocab` copy
    nothing."""
    b, words = masks.shape
    allowed = ops.reshape(_allowed(masks), (b, words * 32))
    return allowed if words * 32 == vocab else ops.slice(allowed, (0, 0), (b, vocab))


def apply_token_mask(logits: Array, masks: Array, dtype=None) -> Array:
    """`logits` (B, V) with every token a row's packed mask forbids at -inf (traceable), cast
    to `dtype` if given.

    Allowed logits come out bit for bit as they went in (a select, no arithmetic; the cast
    after it), so a row whose mask is all ones (an unconstrained row) samples exactly what it
    would alone. Where the mask's words cover the vocabulary exactly (V a multiple of 32, as
    Qwen's, Llama's and Gemma's are), the select runs on the logits viewed as (B, words, 32),
    so the unpacking, the select and the cast are one fused kernel under `compile`, reading
    the logits once and writing the result once, with no (B, V) mask in between."""
    b, v = logits.shape
    words = masks.shape[1]
    if words * 32 != v:
        x = ops.where(token_mask(masks, v), logits, array(float("-inf"), logits.dtype))
        return x if dtype is None else ops.astype(x, dtype)
    x = ops.where(_allowed(masks), ops.reshape(logits, (b, words, 32)), array(float("-inf"), logits.dtype))
    if dtype is not None:
        x = ops.astype(x, dtype)
    return ops.reshape(x, (b, v))


def masked_logits(logits: Array, masks: np.ndarray | Array) -> Array:
    """`apply_token_mask` for masks on the host (`GrammarVocab.fill_masks`; an unconstrained
    row is all ones) or already on the device; checks the shapes (ValueError)."""
    check_mask_shape(tuple(masks.shape), tuple(logits.shape))
    if isinstance(masks, np.ndarray):
        masks = array(np.ascontiguousarray(masks, dtype=np.int32), _int32)
    return apply_token_mask(logits, masks)
