"""MLX's fused kernels: normalisation, rotary embeddings, attention."""

from __future__ import annotations

import math

from amlx._mlx._lib import ffi, lib
from amlx._mlx.array import Array, _call


def _opt(a: Array | None):
    return ffi.NULL if a is None else a.handle


def rms_norm(x: Array, weight: Array | None, eps: float) -> Array:
    return _call(lib.mlxc_rms_norm, "rms_norm", x.handle, _opt(weight), float(eps))


def layer_norm(x: Array, weight: Array | None, bias: Array | None, eps: float) -> Array:
    return _call(lib.mlxc_layer_norm, "layer_norm", x.handle, _opt(weight), _opt(bias), float(eps))


def rope(x: Array, dims: int, *, traditional: bool = False, base: float | None = None, scale: float = 1.0,
         offset: int | Array = 0, freqs: Array | None = None) -> Array:
    """Rotary embedding over the last axis of x (B, H, L, D) from position `offset`.

    `offset` is an int, or an int array: a scalar, or one offset per batch row.
    Give either `base` or `freqs`: custom frequencies as MLX defines them, the
    periods `base ** (2i / dims)` (the reciprocal of Hugging Face's inv_freq), so
    that the angle of pair i at position p is `p * scale / freqs[i]`."""
    if (base is None) == (freqs is None):
        raise ValueError("rope: give exactly one of base and freqs")
    b = math.nan if base is None else float(base)
    if isinstance(offset, Array):
        return _call(lib.mlxc_rope_dynamic, "rope", x.handle, int(dims), int(traditional), b, float(scale),
                     offset.handle, _opt(freqs))
    return _call(lib.mlxc_rope, "rope", x.handle, int(dims), int(traditional), b, float(scale), int(offset),
                 _opt(freqs))


def scaled_dot_product_attention(q: Array, k: Array, v: Array, *, scale: float,
                                 mask: None | str | Array = None) -> Array:
    """softmax(q k^T * scale + mask) v with grouped-query broadcasting.

    `mask` is None, "causal", or an array (boolean: keep where true; float: added)."""
    if mask is None:
        return _call(lib.mlxc_sdpa, "scaled_dot_product_attention", q.handle, k.handle, v.handle, float(scale),
                     b"", ffi.NULL)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask mode {mask!r}")
        return _call(lib.mlxc_sdpa, "scaled_dot_product_attention", q.handle, k.handle, v.handle, float(scale),
                     b"causal", ffi.NULL)
    return _call(lib.mlxc_sdpa, "scaled_dot_product_attention", q.handle, k.handle, v.handle, float(scale),
                 b"array", mask.handle)
