"""Two small CUDA kernels of the decode step: residual add with RMSNorm, and
the gated activation of the MLP.

A decode step of a small model is bound by host time, and that is about a
fixed cost per graph node. Each of these kernels is one node where the plain
ops take two or three (an add, then a norm; a split, then the activation and
the product), in every layer. They compute in float32 and round to the
activation dtype where the plain ops' results are rounded (the residual sum,
the normalised value), so they agree with those ops to the last bit or one
rounding step. Used in decode steps on MLX's CUDA backend and on the CPU (amlx's
C++ primitives with the same rounding, `cpu_kernels.residual_norm` and
`gated_activation`), where the engine's `decode_kernel` option turns them on;
on Metal the plain ops run.
"""

from __future__ import annotations

import struct

from amlx._mlx import Array, bfloat16, cpu_kernels, device, fast, float16, float32

_DTYPES = (bfloat16, float16, float32)
THREADS = 256

_HEADER = r"""
// Sum of v over the block (blockDim.x a multiple of 32, at most 1024 threads).
__device__ float amlx_block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < blockDim.x / 32; ++w) total += scratch[w];
  return total;
}

// rms_norm's value: x * r rounded to T, times the weight w (a T value, in float), rounded
template <typename T>
__device__ T amlx_norm_value(float x, float r, float w) {
  const float n = static_cast<float>(static_cast<T>(x * r));
  return static_cast<T>(w * n);
}
"""

# x, y (N, C); optional pre_w (C): y is first RMS-normalised with it (Gemma's
# norm after attention and after the MLP); w (C). One block per row; thread t
# holds columns t, t + blockDim.x, ... (PER of them, in registers). Every load
# of a row, the norm weights' included, is issued before any result is used: at
# one row (a decode step of one stream) the kernel is a few dependent trips to
# memory, not one trip per column a thread holds (measured 13.7 us a call at
# C = 4,096 with 256 threads that re-read their own stores; Qwen3-8B runs 72 of
# them a step), nor a second trip for the weights after the reduction (4.5 us
# alone on the H200 with it, against 2.0 for MLX's RMSNorm: step_kernel_micro.py).
# Outputs: total = x + y (rounded to T), normed = rms_norm(total) * w.
_RESIDUAL = r"""
  __shared__ float scratch[32];
  const int n = blockIdx.x;
  const int C = x_shape[1];
  const size_t base = (size_t)n * C;
  float xv[PER], yv[PER], wv[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    xv[i] = c < C ? static_cast<float>(x[base + c]) : 0.0f;
    yv[i] = c < C ? static_cast<float>(y[base + c]) : 0.0f;
    // (the weights too, before any use: not a second trip to memory after the reduction)
    wv[i] = c < C ? static_cast<float>(w[c]) : 0.0f;
  }
  $PRE_LOAD$
  $PRE_RMS$
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < C) {
      const T t = static_cast<T>(xv[i] + yv[i]);
      total[base + c] = t;
      xv[i] = static_cast<float>(t);
      ss += xv[i] * xv[i];
    }
  }
  const float r = rsqrtf(amlx_block_sum(ss, scratch) / C + __int_as_float(EPS_BITS));
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < C) normed[base + c] = amlx_norm_value<T>(xv[i], r, wv[i]);
  }
"""

_PRE_LOAD = r"""
  float pv[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    pv[i] = c < C ? static_cast<float>(pre_w[c]) : 0.0f;
  }
"""

_PRE_RMS = r"""
  float ssy = 0.0f;
#pragma unroll
  for (int i = 0; i < PER; ++i) ssy += yv[i] * yv[i];
  const float ry = rsqrtf(amlx_block_sum(ssy, scratch) / C + __int_as_float(PRE_EPS_BITS));
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < C) yv[i] = static_cast<float>(amlx_norm_value<T>(yv[i], ry, pv[i]));
  }
"""

MAX_PER = 16  # columns a thread holds; wider rows (C > 8,192) take the plain ops
MAX_THREADS = 512  # (at 1,024 a thread may use 64 registers; PER = 16 takes 124 for the pre-norm variant)


def residual_launch(columns: int) -> tuple[int, int]:
    """(threads a block, columns a thread) for rows of `columns`: about four
    columns a thread up to MAX_THREADS threads, more columns a thread beyond."""
    quarter = -(-columns // 4)
    threads = min(MAX_THREADS, max(32, -(-quarter // 32) * 32))
    return threads, -(-columns // threads)


# gate_up (N, 2I) = [gate | up] per row -> out (N, I) = act(gate) * up.
_GATED = r"""
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t width = gate_up_shape[1] / 2;
  if (i >= (size_t)gate_up_shape[0] * width) return;
  const size_t n = i / width, c = i % width;
  const float g = static_cast<float>(gate_up[n * 2 * width + c]);
  const float u = static_cast<float>(gate_up[n * 2 * width + width + c]);
  float a;
  if (ACT == 0) {
    a = g / (1.0f + expf(-g));
  } else {
    a = 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
  }
  out[i] = static_cast<T>(a * u);
"""

ACTIVATIONS = cpu_kernels.ACTIVATIONS  # (name -> the code both kernels take as ACT)

_KERNELS: dict[str, fast.CudaKernel] = {}


def kernel_source(name: str) -> tuple[str, list[str], list[str], str, str]:
    """(kernel name, inputs, outputs, body, header) of "residual", "residual_pre" or
    "gated", as handed to MLX (scripts/cuda_compile_check.py compiles them)."""
    if name == "residual":
        return ("amlx_residual_norm", ["x", "y", "w"], ["total", "normed"],
                _RESIDUAL.replace("$PRE_LOAD$", "").replace("$PRE_RMS$", ""), _HEADER)
    if name == "residual_pre":
        return ("amlx_residual_prenorm", ["x", "y", "pre_w", "w"], ["total", "normed"],
                _RESIDUAL.replace("$PRE_LOAD$", _PRE_LOAD).replace("$PRE_RMS$", _PRE_RMS), _HEADER)
    return "amlx_gated_activation", ["gate_up"], ["out"], _GATED, ""


def _kernel(name: str) -> fast.CudaKernel:
    if name not in _KERNELS:
        kernel, inputs, outputs, body, header = kernel_source(name)
        _KERNELS[name] = fast.CudaKernel(kernel, inputs, outputs, body, header=header)
    return _KERNELS[name]


def _bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def on_cpu() -> bool:
    """Whether the kernels run on the CPU (cpu_step.cpp) here, not CUDA."""
    return device.default_device() == "cpu"


def supports(x: Array, *weights: Array) -> bool:
    """Whether the kernels take activations x (N, C) with these norm weights."""
    if not (x.ndim == 2 and x.dtype in _DTYPES and all(w.ndim == 1 and w.dtype in _DTYPES for w in weights)):
        return False
    # (the CPU's kernels take any width; a CUDA block holds MAX_PER columns a thread)
    return on_cpu() or residual_launch(x.shape[1])[1] <= MAX_PER


def residual_norm(x: Array, y: Array, w: Array, eps: float, pre_w: Array | None = None,
                  pre_eps: float = 0.0) -> tuple[Array, Array]:
    """(x + y', rms_norm(x + y', w, eps)) for x, y (N, C), where y' is y, or
    rms_norm(y, pre_w, pre_eps) when `pre_w` is given."""
    if on_cpu():
        return cpu_kernels.residual_norm(x, y, w, eps, pre_w, pre_eps)
    n = x.shape[0]
    threads, per = residual_launch(x.shape[1])
    template = {"T": x.dtype, "EPS_BITS": _bits(eps), "PER": per}
    inputs = [x, y, w]
    name = "residual"
    if pre_w is not None:
        inputs, name = [x, y, pre_w, w], "residual_pre"
        template["PRE_EPS_BITS"] = _bits(pre_eps)
    total, normed = _kernel(name)(inputs, [x.shape, x.shape], [x.dtype, x.dtype], grid=(n * threads, 1, 1),
                                  threadgroup=(threads, 1, 1), template=template)
    return total, normed


def gated_activation(gate_up: Array, act: str) -> Array:
    """act(gate) * up for gate_up (N, 2I) = [gate | up] per row; (N, I)."""
    if on_cpu():
        return cpu_kernels.gated_activation(gate_up, act)
    n, width = gate_up.shape[0], gate_up.shape[1] // 2
    total = n * width
    blocks = -(-total // THREADS)
    (out,) = _kernel("gated")([gate_up], [(n, width)], [gate_up.dtype], grid=(blocks * THREADS, 1, 1),
                              threadgroup=(THREADS, 1, 1), template={"T": gate_up.dtype, "ACT": ACTIVATIONS[act]})
    return out
