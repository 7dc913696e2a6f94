"""Linear layers on the CPU through amlx's own few-row kernels.

Two regimes. A decode step multiplies a few rows of activations by every weight matrix:
there, MLX's CPU backend is slow (sgemm packs the whole weight per call,
16-bit weights are converted in memory first, quantized weights are unpacked
one scalar at a time). `few_rows` sends such products (up to
ROWS rows, by weight format) to amlx._mlx.cpu_kernels.gemv, which reads the
weights as stored, on a pool of threads. Where the CPU has a bf16 kernel (AMX tiles, or
AVX512-BF16 on AMD Zen 4/5), bfloat16 x takes any number of rows against bfloat16
or quantized weights (cpu_kernels.bf16_takes; quantized ones dequantized to bfloat16
a block of rows at a time, in cache). Longer inputs (prefill) otherwise stay with MLX's matmul and its BLAS (OpenBLAS,
see amlx._mlx.blas), in float32: MLX's CPU gemm for 16-bit inputs and its
quantized matmul are 15-25x slower than converting to float32 first and
calling sgemm (measured at 128 x 1024 x 3072), so `widen` and
`dequantize_first` say when to convert.

AMLX_CPU_KERNELS=0 (read once, at import) turns this off, for comparisons.

Quantized weights (4-/8-bit) multiply x rounded to int8 per group, as llama.cpp's
q8_0/q4_0 do: each group's products are summed as integers on bytes (VNNI), which
is faster than converting every weight to a float; the cost is x's rounding, half a
step of its int8 grid per value (cpu_kernels.gemv's `int8`; benchmarks/README.md
has the measured speed and logit error). Only decode steps and speculative verify passes
do (`decode_pass`, set by CausalLM for passes at per-row positions), at any number of rows:
a token's result then never depends on the batch around it or on the pass that computes
its prompt (a prefill, whole or behind the prefix cache, keeps the float kernels, and the
prefix cache keeps no block a decode step wrote: `rounds_decode`, engine/pools.py).
AMLX_CPU_INT8=0 (read once, at import) keeps them on the float kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

from amlx._mlx import Array, bfloat16, cpu_kernels, device, float16, float32, ops

ENABLED = os.environ.get("AMLX_CPU_KERNELS", "1") != "0"
INT8 = os.environ.get("AMLX_CPU_INT8", "1") != "0"
_DENSE = (float32, float16, bfloat16)
# set while a model builds a decode step or a verify pass (CausalLM.__call__): int8 applies there
_DECODE_PASS = contextvars.ContextVar("amlx_cpu_decode_pass", default=False)
# Rows up to which a product goes to the kernels, by weight format: "f32", "f16" (both
# 16-bit dtypes), "int8" (quantized, against x rounded to int8: INT8) or "quantized"
# (against float x); for a 16-bit or quantized weight of more than _MAX_DEQUANTIZED values
# (a vocabulary projection), BIG_ROWS. Past cpu_kernels.BLOCK_ROWS the kernels run in
# chunks of rows, still reading the weight once as stored, where MLX's matmul would
# multiply a float32 copy of it (16-bit or dequantized: 0.6 GB per call for Qwen3-0.6B's
# 151,936 x 1,024 head) or use its quantized matmul (seconds per call there). float32
# weights need no copy, and MLX's sgemm is faster from about 12 rows. The crossovers
# were measured on a 2-core AVX-512 machine (benchmarks/cpu_rows.py, benchmarks/README.md).
# "quantized" was 32 there, against MLX's quantized matmul; a prompt's rows now take it (int8
# is for decode passes), where past 32 the path is a dequantized copy and sgemm per call: a
# 48-token prompt of a Qwen3-0.6B-shaped 4-bit model took 697 ms to its first token that way
# against 313-318 through the kernels (benchmarks/README.md, 2026-12-05).
ROWS = {"f32": 8, "f16": 32, "quantized": 64, "int8": 64}
BIG_ROWS = cpu_kernels.MAX_ROWS
# a float32 copy of a bigger quantized weight (a vocabulary projection) costs
# more memory than the time it saves
_MAX_DEQUANTIZED = 1 << 26


def _cpu_rows(x: Array) -> int:
    """Rows of x (all axes but the last) when the CPU computes; 0 otherwise."""
    if not ENABLED or x.ndim < 1 or x.shape[-1] == 0 or device.default_device() != "cpu":
        return 0
    return x.size // x.shape[-1]


def widen(x: Array) -> bool:
    """Whether a product of 16-bit `x` that the kernels did not take (more rows than
    they hold at once) should be computed in float32 (and the result cast back)."""
    return x.dtype in (float16, bfloat16) and _cpu_rows(x) > cpu_kernels.BLOCK_ROWS


def widen_attention(q: Array, length: int) -> bool:
    """Whether attention with 16-bit q (and keys and values) should run in float32 on
    the CPU: MLX's CPU attention multiplies in the inputs' dtype, and its 16-bit
    matrix product is slow. Measured (perf, Qwen3-0.6B shape, bf16, this 2-core
    machine): it took 45% of a 512-token prefill (16.4 s -> 5.5 s in float32) and
    16% of a decode step (9.1 -> 12.2 tok/s in float32). `length`: new tokens per row."""
    return ENABLED and q.dtype in (float16, bfloat16) and length >= 1 and device.default_device() == "cpu"


def dequantize_first(x: Array, layer) -> bool:
    """Whether x times a quantized layer's weight should dequantize the weight to
    float32 and multiply with sgemm."""
    return _cpu_rows(x) > cpu_kernels.BLOCK_ROWS and layer.weight.shape[0] * x.shape[-1] <= _MAX_DEQUANTIZED


def dequantize(layer) -> Array:
    """A quantized layer's weight as float32 (out, in), through amlx's CPU kernel where
    it applies (MLX's CPU dequantize is built from generic ops: 14-21 ms for a 3072 x
    1024 weight against ~2 ms for a float32 copy of a bf16 one, measured here)."""
    bits, group = layer._bits, layer._group_size
    if ENABLED and bits in (4, 8) and group in cpu_kernels.GROUP_SIZES and device.default_device() == "cpu":
        return cpu_kernels.dequantize(layer.weight, layer.scales, layer.biases, group_size=group, bits=bits)
    return ops.dequantize(layer.weight, layer.scales, layer.biases, group, bits, dtype=float32)


@contextlib.contextmanager
def decode_pass(on: bool) -> Iterator[None]:
    """Lets the products built inside round x to int8 against quantized weights (INT8): a
    decode step's or a verify pass's, never a prefill's (see the module's docstring)."""
    token = _DECODE_PASS.set(on)
    try:
        yield
    finally:
        _DECODE_PASS.reset(token)


def _int8() -> bool:
    return INT8 and _DECODE_PASS.get()


def rounds_decode(model) -> bool:
    """Whether `model`'s decode steps on the CPU round activations to int8 (it has quantized
    layers and INT8 is on): the keys and values they write then differ from a prefill's."""
    return ENABLED and INT8 and any(getattr(m, "_bits", 0) in (4, 8) for _, m in model.named_modules())


def max_rows(layer) -> int:
    """Rows of x up to which `layer`'s product goes to the kernels (few_rows)."""
    weight = layer.weight
    bits = getattr(layer, "_bits", 0)
    kind = ("int8" if _int8() else "quantized") if bits else "f32" if weight.dtype == float32 else "f16"
    if kind != "f32" and weight.shape[0] * weight.shape[-1] * (32 // bits if bits else 1) > _MAX_DEQUANTIZED:
        return min(BIG_ROWS, cpu_kernels.MAX_ROWS)
    return min(ROWS[kind], cpu_kernels.MAX_ROWS)


def threaded() -> bool:
    """Whether the few-row kernels use more than one core: then a decode step's
    products already keep every core busy, and splitting a lone row's matmuls over
    MLX streams as well only adds cross-stream waits (and oversubscribes the cores:
    each stream's call starts the kernels' threads). Measured on the 2-core machine,
    Qwen3-0.6B shape: one row's decode 14.5-15.3 -> 17.0-17.3 tok/s (8-bit), 10.0 ->
    11.1 (bf16) without the split (benchmarks/README.md)."""
    return ENABLED and cpu_kernels.threads() > 1


def few_rows(x: Array, layer) -> Array | None:
    """x W^T for `layer` (Linear, Embedding as a projection, or their quantized
    kinds; W (out, in)) through the CPU kernels; None where they do not apply
    (another device, more rows than ROWS gives the format, an unsupported format). A layer
    with a MatmulSplit keeps it: its column blocks are rows of W, and the kernels
    compute every output the same way in any block, so the split stays exact."""
    rows = _cpu_rows(x)
    if rows < 1:
        return None
    bits = getattr(layer, "_bits", 0)
    if bits:
        if bits not in (4, 8) or layer._group_size not in cpu_kernels.GROUP_SIZES:
            return None
    elif layer.weight.dtype not in _DENSE or layer.weight.ndim != 2:
        return None
    if rows > max_rows(layer) and not cpu_kernels.bf16_takes(x, layer.weight, bits):
        if not (bits and _int8() and x.ndim == 2):
            return None
        # a decode pass of more rows than the kernels take at once: in pieces, so that every
        # decoded row is rounded to int8 alike, whatever the batch
        step = max_rows(layer)
        return ops.concatenate([few_rows(ops.slice(x, (i, 0), (min(i + step, rows), x.shape[1])), layer)
                                for i in range(0, rows, step)], axis=0)
    out = layer.weight.shape[0]
    split = layer.__dict__.get("_split")
    if split is not None and split.parts(out):
        return split.columns(out, lambda lo, hi: _gemv(x, layer, bits, lo, hi))
    return _gemv(x, layer, bits, 0, out)


def _gemv(x: Array, layer, bits: int, lo: int, hi: int) -> Array:
    """Outputs [lo, hi) of x W^T: rows [lo, hi) of the weight (and its scales and biases)."""
    def rows(a: Array) -> Array:
        if lo == 0 and hi == a.shape[0]:
            return a
        return ops.slice(a, (lo, 0), (hi, a.shape[1]))

    if bits:
        return cpu_kernels.gemv(x, rows(layer.weight), rows(layer.scales), rows(layer.biases),
                                group_size=layer._group_size, bits=bits, int8=_int8())
    return cpu_kernels.gemv(x, rows(layer.weight))
