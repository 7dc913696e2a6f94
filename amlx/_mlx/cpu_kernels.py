"""amlx's own CPU kernels (vendor/mlxc/cpu_gemv.cpp): few-row matmuls, and
dequantization of MLX's affine packing to float32; and the decode step's fused
kernels (vendor/mlxc/cpu_step.cpp: `decode_attention`, `residual_norm`,
`gated_activation`, what amlx.models.decode_attention and step_kernels compute on
CUDA, reached through those modules).

`gemv(x, w)` computes x W^T for 1..MAX_ROWS rows of x with W (out, in) stored
as float32, float16 or bfloat16, or in MLX's 4-/8-bit affine packing (with
scales and biases), reading the weights as stored and converting in registers,
on a pool of threads (one per usable core). The kernels hold up to BLOCK_ROWS
rows of x in registers; a call with more runs them in chunks of rows (2 for the
float kernels, 8 for the int8 ones) over each cache-sized tile of the weight in
turn, so the weight is still read from memory once, and each row's result is
the same as alone. It is an MLX primitive: it takes
part in lazy evaluation, compile and (with respect to x) gradients.
"""

from __future__ import annotations

from amlx._mlx._lib import check, ffi, lib
from amlx._mlx.array import Array, _call, _handle_or_null
from amlx._mlx.dtypes import bfloat16
from amlx._mlx.ops import _Vec

MAX_ROWS = int(lib.mlxc_cpu_gemv_max_rows())
BLOCK_ROWS = 8  # vendor/mlxc/gemv.h kMaxRows
GROUP_SIZES = (32, 64, 128)


def gemv(x: Array, w: Array, scales: Array | None = None, biases: Array | None = None, *,
         group_size: int = 0, bits: int = 0, int8: bool = False) -> Array:
    """x @ W^T on the CPU; quantized when `bits` is 4 or 8 (then scales, biases and group_size are needed).

    `int8` (quantized weights only): x is first rounded to int8 per group of `group_size`
    values (scale max|x| / 127, ties to even) and each group's products are summed as
    integers on bytes (VNNI where the CPU has it), the bias term from x's exact sum:
    several times faster, with the error of that rounding (at most half a step of x's
    grid per value)."""
    if bits and (scales is None or biases is None):
        raise ValueError("cpu_kernels.gemv: quantized weights need scales and biases")
    s = scales.handle if bits and scales is not None else 0
    b = biases.handle if bits and biases is not None else 0
    return _call(lib.mlxc_cpu_gemv, "cpu_gemv", x.handle, w.handle, s, b, int(group_size), int(bits),
                 int(bool(int8)))


def dequantize(w: Array, scales: Array, biases: Array, *, group_size: int, bits: int) -> Array:
    """MLX's affine 4-/8-bit packing (w (out, in * bits / 32) uint32, scales and biases
    (out, in / group_size)) as float32 (out, in), on the CPU: what ops.dequantize(...,
    dtype=float32) computes, several times faster on this backend."""
    return _call(lib.mlxc_cpu_dequantize, "cpu_dequantize", w.handle, scales.handle, biases.handle,
                 int(group_size), int(bits))



def decode_attention(qkv: Array, kv: Array, positions: Array, *, heads: int, scale: float, window: int | None,
                     inv_freq: Array, q_norm: Array | None = None, k_norm: Array | None = None, eps: float = 0.0,
                     table: Array | None = None,
                     quant: tuple[Array, Array, int, int] | None = None) -> tuple[Array, Array]:
    """amlx.models.decode_attention.decode_attention on the CPU (same arguments and
    results; see there). Attention runs in float32 with an exact softmax (scores,
    then weights) per row and KV head, the heads sharing that KV head together."""
    scales, biases, bits, group = quant if quant is not None else (None, None, 0, 0)
    with _Vec() as v:
        check(lib.mlxc_cpu_decode_attention(qkv.handle, _handle_or_null(q_norm), _handle_or_null(k_norm), inv_freq.handle, kv.handle,
                                            _handle_or_null(scales), _handle_or_null(biases), positions.handle, _handle_or_null(table), int(heads),
                                            float(scale), int(window or 0), float(eps), int(bits), int(group),
                                            v.h), "cpu_decode_attention")
        out, kv_new = v.arrays()
        return out, kv_new


def residual_norm(x: Array, y: Array, w: Array, eps: float, pre_w: Array | None = None,
                  pre_eps: float = 0.0) -> tuple[Array, Array]:
    """amlx.models.step_kernels.residual_norm on the CPU."""
    with _Vec() as v:
        check(lib.mlxc_cpu_residual_norm(x.handle, y.handle, w.handle, float(eps), _handle_or_null(pre_w), float(pre_eps),
                                         v.h), "cpu_residual_norm")
        total, normed = v.arrays()
        return total, normed


ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # the activations' codes (the CUDA kernel's ACT too)


PREFILL_HEAD_DIM = 256  # the largest head dim prefill_attention takes


def prefill_attention(q: Array, keys: Array, values: Array, scale: float, window: int | None = None) -> Array:
    """A prompt's attention: q (B, H, L, D) at positions [end - L, end) against keys and values
    (B, KVH, end, D) (KVH dividing H), causal, at most `window` back; (B, L, H, D) in q's dtype.
    In float32 with a blockwise softmax (vendor/mlxc/cpu_attention.cpp); each query's result
    depends on its position alone, not on the other queries of the pass."""
    return _call(lib.mlxc_cpu_prefill_attention, "cpu_prefill_attention", q.handle, keys.handle, values.handle,
                 float(scale), int(window or 0))


def gated_activation(gate_up: Array, act: str) -> Array:
    """amlx.models.step_kernels.gated_activation on the CPU."""
    return _call(lib.mlxc_cpu_gated_activation, "cpu_gated_activation", gate_up.handle, ACTIVATIONS[act])


def threads() -> int:
    """Threads the kernels split a matmul's output rows over."""
    return int(lib.mlxc_cpu_threads())


def set_threads(n: int) -> None:
    check(lib.mlxc_cpu_set_threads(int(n)), "cpu_kernels.set_threads")


def isa() -> str:
    """The instruction set in use: "avx512", "avxvnni" (AVX2 with AVX-VNNI), "avx2" or "generic"."""
    return ffi.string(lib.mlxc_cpu_gemv_isa()).decode()


def int8_isa() -> str:
    """The int8 kernels' instructions under isa(): "avx512vnni", "avxvnni", "avx2" (vpmaddubsw) or "generic"."""
    return ffi.string(lib.mlxc_cpu_gemv_int8_isa()).decode()


BF16_KERNELS = ("amx", "avx512bf16")  # the bf16 kernels, best first


def bf16_kernel() -> str:
    """The kernel gemv runs bfloat16 x on where it can (see bf16_takes): "amx" (Intel AMX
    tiles), "avx512bf16" (AVX512-BF16's vdpbf16ps: AMD Zen 4/5, Intel Cooper Lake) or "off".
    By default the best this CPU has; AMLX_CPU_BF16 (read at load) picks another."""
    return ffi.string(lib.mlxc_cpu_gemv_bf16()).decode()


def bf16_kernels() -> tuple[str, ...]:
    """The bf16 kernels this CPU (and its OS) can run, best first."""
    return tuple(k for k in BF16_KERNELS if lib.mlxc_cpu_gemv_bf16_available(k.encode()))


def bf16_takes(x: Array, w: Array, bits: int = 0) -> bool:
    """Whether gemv(x, w, ...) runs on a bf16 kernel, which takes any number of rows of x
    (MAX_ROWS does not apply): one in use, x bfloat16 with its last axis a multiple of 32, and w
    bfloat16, or quantized (`bits` 4 or 8) with more than MAX_ROWS rows of x (a prompt's: then
    the weight is dequantized to bfloat16 a block of 16 rows at a time, w = s q + b rounded to
    bfloat16, in cache, for all rows of x; fewer rows keep the int8 or float kernels)."""
    if not (x.dtype == bfloat16 and x.shape[-1] % 32 == 0 and bf16_kernel() != "off"):
        return False
    if bits:
        return bits in (4, 8) and x.size // x.shape[-1] > MAX_ROWS
    return w.dtype == bfloat16


def set_bf16_kernel(name: str) -> None:
    """Use the bf16 kernel `name`: "amx", "avx512bf16", "off", or "best" (the default); MLXError
    if the name is unknown or this CPU lacks it."""
    check(lib.mlxc_cpu_gemv_set_bf16(name.encode()), "cpu_kernels.set_bf16_kernel")


def set_isa(name: str) -> None:
    """Use "avx512", "avxvnni", "avx2", "generic", or "best" (the default); MLXError if the CPU
    lacks it. "avx2" keeps the int8 kernels off VNNI even where the CPU has it."""
    check(lib.mlxc_cpu_gemv_set_isa(name.encode()), "cpu_kernels.set_isa")
