"""Linear layers on the CPU through amlx's own few-row kernels.

A decode step multiplies 1..8 rows of activations by every weight matrix:
there, MLX's CPU backend is slow (sgemm packs the whole weight per call,
16-bit weights are converted in memory first, quantized weights are unpacked
one scalar at a time). `few_rows` sends such products to
amlx._mlx.cpu_kernels.gemv, which reads the weights as stored, on a pool of
threads. Longer inputs (prefill) stay with MLX and its BLAS.

AMLX_CPU_KERNELS=0 (read once, at import) turns this off, for comparisons.
"""

from __future__ import annotations

import os

from amlx._mlx import Array, bfloat16, cpu_kernels, device, float16, float32

ENABLED = os.environ.get("AMLX_CPU_KERNELS", "1") != "0"
_DENSE = (float32, float16, bfloat16)


def few_rows(x: Array, layer) -> Array | None:
    """x W^T for `layer` (Linear, Embedding as a projection, or their quantized
    kinds; W (out, in)) through the CPU kernels; None where they do not apply
    (another device, more rows than they take, an unsupported format)."""
    if not ENABLED or x.ndim < 1 or device.default_device() != "cpu":
        return None
    k = x.shape[-1]
    if k == 0 or not 1 <= x.size // k <= cpu_kernels.MAX_ROWS:
        return None
    bits = getattr(layer, "_bits", 0)
    if bits:
        if bits not in (4, 8) or layer._group_size not in cpu_kernels.GROUP_SIZES:
            return None
        return cpu_kernels.gemv(x, layer.weight, layer.scales, layer.biases, group_size=layer._group_size,
                                bits=bits)
    if layer.weight.dtype not in _DENSE or layer.weight.ndim != 2:
        return None
    return cpu_kernels.gemv(x, layer.weight)
