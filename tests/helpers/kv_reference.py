"""numpy references of a quantized KV block pool (kv_bits) and of one decode
step's attention over it, for the CPU path's tests (tests/test_kv_bits.py) and
the CUDA kernel's (tests/test_decode_kernels.py).

The quantization is MLX's affine one as its CPU `quantize` computes it (float32
arithmetic, round half to even; the per-group scale and bias rounded to the
activations' dtype only when stored) or, with `backend="cuda"`, as its CUDA kernel
does (the same float32 arithmetic, but rounding halves away from zero and taking a
group's maximum from 0 up, so an all-negative group's range reaches 0), and the layout is the one ops.quantize
writes: value d of a group of `group` values in bits [(d % P) * bits, +bits) of
uint32 word d // P, P = 32 // bits, lowest bits first. Dequantizing is
`q * scale + bias` with both operations rounded to the dtype, as MLX's
dequantize computes it. Values are float64 arrays holding values of the dtype.
"""

from __future__ import annotations

import numpy as np

__all__ = ["round_to", "quantize", "near_half_step", "unpack", "dequantize", "paged_decode_attention"]


def round_to(x, dtype: str) -> np.ndarray:
    """x rounded to `dtype` ("float32" | "float16" | "bfloat16"), to nearest even, as float64."""
    f = np.asarray(x, np.float64).astype(np.float32)
    if dtype == "float32":
        return f.astype(np.float64)
    if dtype == "float16":
        return f.astype(np.float16).astype(np.float64)
    if dtype != "bfloat16":
        raise ValueError(dtype)
    bits = f.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """CUDA's roundf on float32 values: halves away from zero (|x| + 0.5 taken in
    float64, where it is exact, so 0.49999997 does not round up)."""
    a = np.abs(np.asarray(x, np.float64))
    return np.copysign(np.floor(a + 0.5), x).astype(np.float32)


def _affine(x, group: int, bits: int, backend: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps (..., D), scale, bias (..., D / group)) float32 of MLX's affine quantization
    of x (..., D) as `backend` computes it: steps is (x - bias) / scale, which rounds to
    the stored level."""
    if backend not in ("cpu", "cuda"):
        raise ValueError(backend)
    rnd = np.rint if backend == "cpu" else _round_half_away
    x = np.asarray(x, np.float64).astype(np.float32)
    dim = x.shape[-1]
    g = x.reshape(-1, dim // group, group)
    n_bins = np.float32((1 << bits) - 1)
    w_max, w_min = g.max(axis=-1), g.min(axis=-1)
    if backend == "cuda":
        w_max = np.maximum(w_max, np.float32(0))
    lower = np.abs(w_min) > np.abs(w_max)  # the edge kept exact: the larger magnitude
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scale = np.where(lower, scale, -scale)
    edge = np.where(lower, w_min, w_max)
    q0 = rnd(edge / scale)
    nonzero = q0 != 0
    scale = np.where(nonzero, edge / np.where(nonzero, q0, np.float32(1)), scale).astype(np.float32)
    bias = np.where(nonzero, edge, np.float32(0)).astype(np.float32)
    steps = ((g - bias[..., None]) / scale[..., None]).reshape(x.shape)
    return steps, scale.reshape(*x.shape[:-1], -1), bias.reshape(*x.shape[:-1], -1)


def near_half_step(x, group: int, bits: int, backend: str = "cpu", within: float = 1e-4) -> np.ndarray:
    """(..., D) bool: the values of x whose step (x - bias) / scale lies within `within` of a
    half step, where a division rounded differently (a GPU compiler's faster one) may pick
    the other level."""
    steps = _affine(x, group, bits, backend)[0]
    return np.abs(steps - np.floor(steps) - 0.5) < within


def quantize(x, group: int, bits: int, dtype: str,
             backend: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint32 (..., D * bits / 32), scales, biases (..., D / group) float64 of
    `dtype`) of x (..., D): MLX's affine quantization per group of the last axis, as
    its `backend` ("cpu" | "cuda") computes it."""
    steps, scale, bias = _affine(x, group, bits, backend)
    rnd = np.rint if backend == "cpu" else _round_half_away
    shape, dim = steps.shape[:-1], steps.shape[-1]
    q = np.clip(rnd(steps), 0, np.float32((1 << bits) - 1)).astype(np.uint32).reshape(-1, dim)
    per = 32 // bits
    words = q.reshape(-1, dim // per, per) << (np.arange(per, dtype=np.uint32) * bits)
    packed = np.bitwise_or.reduce(words, axis=-1).astype(np.uint32)
    return packed.reshape(*shape, dim // per), round_to(scale, dtype), round_to(bias, dtype)


def unpack(packed, bits: int) -> np.ndarray:
    """(..., D) uint32: the quantized values of packed words (..., D * bits / 32)."""
    packed = np.asarray(packed, np.uint32)
    per = 32 // bits
    q = (packed[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & np.uint32((1 << bits) - 1)
    return q.reshape(*packed.shape[:-1], -1)


def dequantize(packed, scales, biases, group: int, bits: int, dtype: str, fused: bool = False) -> np.ndarray:
    """(..., D) float64 of `dtype`: q * scale + bias, each operation rounded to `dtype`
    or, `fused`, rounded once (a fused multiply-add, as a CUDA compiler may contract
    MLX's dequantize into: exact here, since q * scale is exact in float64)."""
    q = unpack(packed, bits).astype(np.float64)
    s = np.repeat(np.asarray(scales, np.float64), group, axis=-1)
    b = np.repeat(np.asarray(biases, np.float64), group, axis=-1)
    return round_to(q * s + b, dtype) if fused else round_to(round_to(q * s, dtype) + b, dtype)


def paged_decode_attention(q, k_new, v_new, pool_keys, pool_values, table, pos, scale: float,
                           window: int | None, dtype: str | None = None) -> np.ndarray:
    """(B, H, D) float64: softmax(scale * q k^T) v of each row's new token (q (B, H, D),
    its key and value k_new, v_new (B, KVH, D)) over slots max(0, pos - window + 1)
    .. pos, slot j < pos read from block table[b, j // block_size] at offset
    j % block_size of pool_keys / pool_values (blocks, KVH, block_size, D), slot pos
    from k_new, v_new. Query head h reads key head h // (H / KVH).

    With `dtype`, the roundings MLX's attention makes in that dtype where it has no
    fused kernel (the CPU): the scale and the scaled query, the scores, the
    softmax's output and the result each rounded to `dtype` (sums in float64)."""
    rnd = (lambda x: x) if dtype is None else (lambda x: round_to(x, dtype))
    b, heads, dim = q.shape
    kv_heads, block = pool_keys.shape[1], pool_keys.shape[2]
    out = np.zeros((b, heads, dim))
    qs = rnd(q * rnd(scale))
    for i in range(b):
        p = int(pos[i])
        lo = max(0, p - window + 1) if window else 0
        slots = np.arange(lo, p)
        blocks, offsets = table[i, slots // block], slots % block
        for h in range(heads):
            g = h // (heads // kv_heads)
            ks = np.concatenate([pool_keys[blocks, g, offsets], k_new[i, g][None]])
            vs = np.concatenate([pool_values[blocks, g, offsets], v_new[i, g][None]])
            s = rnd(ks @ qs[i, h])
            w = np.exp(s - s.max())
            out[i, h] = rnd(w / w.sum()) @ vs
    return rnd(out)
