"""Few-row quantized matmul on CUDA: y = x @ dequantize(W)^T for 1..8 rows of x.

A decode step multiplies one row (or a few) of activations by every weight
matrix, and for a 4-bit model that product is bound by reading the packed
weights. A Qwen3-8B 4-bit decode step, whose device time is mostly MLX's
quantized matmul for one row, ran at 18% of the H200's copy bandwidth
(benchmarks/README.md, issue 20).
This kernel reads MLX's affine layout as stored -- weight uint32 (N, K * BITS
/ 32), value d of a row in bits [(d % P) * BITS, +BITS) of word d / P (P = 32
/ BITS, lowest bits first), scales and biases (N, K / group) in the
activations' dtype -- and is built for bandwidth:

- each lane loads 16 bytes of one weight row at a time (32 values at 4 bits,
  16 at 8), a warp 512 consecutive bytes, several rows and chunks in flight;
  every weight is read once for all rows of x;
- a warp computes M output columns at once, so each x value it loads (from
  L1, converted to float32 once) serves M weight rows;
- values are unpacked without integer-to-float conversions: a field masked in
  place and OR-ed into the bits of 2^23 is the float 2^23 + q * 2^s, and one
  fused multiply-add by exact powers of two gives q (one LOP3 and one FFMA per
  value; no I2F, which sm_90 issues at a fraction of the FMA's rate);
- a 16-byte chunk lies inside one quantization group, so the group's scale
  and bias are applied per chunk, scale * sum(q * x) + bias * sum(x), in
  float32, not per value;
- the K range is split over the warps of a block (blockDim.y) when there are
  few output columns, so the grid fills the GPU's SMs; partial sums meet in
  shared memory and each output is written once, rounded to the activations'
  dtype.

Used by `nn.quantized_dense` on MLX's CUDA backend for 2-D activations of at
most `MAX_ROWS` rows (decode steps, short prompts); MLX's quantized matmul
everywhere else. AMLX_QGEMV=0 (read once, at import) turns it off, for
comparisons. As a custom kernel it is one graph node and survives the
compiled decode step like the other step kernels.
"""

from __future__ import annotations

import os

from amlx._mlx import Array, bfloat16, device, fast, float16, float32, uint32

ENABLED = os.environ.get("AMLX_QGEMV", "1") != "0"
MAX_ROWS = 8
# Rows up to which `applies` picks the kernel. Measured on the H200 (benchmarks/qgemv.py,
# Qwen3-8B shapes, 4-bit): 1.1-2.6x MLX's quantized matmul at 1, 2 and 4 rows, but
# 0.16-0.24x at 8, where MLX's tensor-core tile wins (this kernel is compute-bound there).
USE_ROWS = 4
ROW_BUCKETS = (1, 2, 4, 8)  # row counts the kernel is compiled for (fewer rows run in the next one up)
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = (bfloat16, float16, float32)
WARPS = 8  # warps per block: blockDim.x * blockDim.y = 256
SMS = 132  # the H200's (an H100 SXM's too)

_HEADER = r"""
// Values [0, P) of one packed word as floats, P = 32 / BITS. A field of bits
// [s, s + BITS) with s + BITS <= 23 is masked in place and OR-ed into the
// exponent of 2^23 (0x4B000000): the float 2^23 + q * 2^s, exactly; then
// f * 2^-s - 2^(23 - s) = q, exact in one FMA (powers of two). Fields above
// bit 22 are first shifted down by SH. No integer-to-float conversion.
template <int BITS>
__device__ __forceinline__ void amlx_unpack(uint32_t w, float* q) {
  constexpr int P = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  constexpr int SH = BITS == 4 ? 12 : 16;
  const uint32_t hi = w >> SH;
#pragma unroll
  for (int e = 0; e < P; ++e) {
    const bool low = e * BITS + BITS <= 23;
    const int s = low ? e * BITS : e * BITS - SH;
    const uint32_t src = low ? w : hi;
    const float f = __uint_as_float((src & (MASK << s)) | 0x4B000000u);
    q[e] = __fmaf_rn(f, __uint_as_float((127u - s) << 23), -__uint_as_float((150u - s) << 23));
  }
}

// V consecutive values of T at p as floats; `vec`: p is 16-byte aligned, so
// they come in 8-, 16- or 32-byte loads.
template <typename T, int V>
__device__ __forceinline__ void amlx_load_x(const T* p, bool vec, float* out) {
  constexpr int BYTES = V * sizeof(T);
  alignas(16) T v[V];
  if (vec) {
    if (BYTES >= 16) {
#pragma unroll
      for (int i = 0; i < BYTES / 16; ++i) reinterpret_cast<uint4*>(v)[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
    } else {
      *reinterpret_cast<uint2*>(v) = __ldg(reinterpret_cast<const uint2*>(p));
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = p[i];
  }
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<float>(v[i]);
}

// 16 bytes of packed weights (4 words); `vec`: p is 16-byte aligned.
__device__ __forceinline__ uint4 amlx_load_chunk(const uint32_t* p, bool vec) {
  if (vec) return __ldg(reinterpret_cast<const uint4*>(p));
  return make_uint4(__ldg(p), __ldg(p + 1), __ldg(p + 2), __ldg(p + 3));
}

__device__ __forceinline__ uint32_t amlx_word(const uint4& c, int j) {
  return j == 0 ? c.x : j == 1 ? c.y : j == 2 ? c.z : c.w;
}
"""

# Inputs x (rows, K) T, w (N, K*BITS/32) uint32, scales and biases (N, K/G) T;
# output out (rows, N) T. Template: T, BITS, RB (rows compiled for, >= rows).
# Block (32 * WX, KS): warp (wx, ks) computes the M columns n0..n0+M-1 of its
# block over chunks c = lane + 32 * (ks + KS * i) of the K range.
_SOURCE = r"""
  constexpr int M = RB <= 4 ? 4 : 2;      // output columns per warp
  constexpr int U = 2;                    // chunks per lane in flight
  constexpr int VPW = 32 / BITS;          // values per word
  constexpr int VPC = 4 * VPW;            // values per 16-byte chunk
  __shared__ float part[8 * M * RB];
  const int rows = x_shape[0];
  const int N = w_shape[0];
  const int words = w_shape[1];
  const int K = words * VPW;
  const int chunks = words / 4;
  const int groups = scales_shape[1];
  const int cpg_shift = __ffs((K / groups) / VPC) - 1;  // log2(chunks per group)
  const int lane = threadIdx.x & 31;
  const int wx = threadIdx.x >> 5;
  const int WX = blockDim.x >> 5;
  const int ks = threadIdx.y;
  const int KS = blockDim.y;
  const int n0 = (blockIdx.x * WX + wx) * M;
  const bool wvec = (reinterpret_cast<uintptr_t>(w) & 15) == 0;
  const bool xvec = (reinterpret_cast<uintptr_t>(x) & 15) == 0;

  int row[M];  // the weight rows (past the end: the last row, read but not stored)
#pragma unroll
  for (int m = 0; m < M; ++m) row[m] = min(n0 + m, N - 1);

  float y[M][RB];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < RB; ++r) y[m][r] = 0.0f;

  const int stride = 32 * KS;
  for (int c0 = lane + 32 * ks; c0 < chunks; c0 += stride * U) {
    uint4 wv[U][M];
    float sv[U][M], bv[U][M];  // the chunk's group scale and bias, loaded with its weights
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * stride;
      if (c < chunks) {
        const int g = c >> cpg_shift;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          wv[u][m] = amlx_load_chunk(w + (size_t)row[m] * words + c * 4, wvec);
          sv[u][m] = static_cast<float>(scales[(size_t)row[m] * groups + g]);
          bv[u][m] = static_cast<float>(biases[(size_t)row[m] * groups + g]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * stride;
      if (c >= chunks) break;
      float a[M][RB];
      float xs[RB];
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        xs[r] = 0.0f;
#pragma unroll
        for (int m = 0; m < M; ++m) a[m][r] = 0.0f;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float xv[RB][VPW];
#pragma unroll
        for (int r = 0; r < RB; ++r) {
          if (r < rows) {
            amlx_load_x<T, VPW>(x + (size_t)r * K + (size_t)c * VPC + j * VPW, xvec, xv[r]);
          } else {
#pragma unroll
            for (int e = 0; e < VPW; ++e) xv[r][e] = 0.0f;
          }
#pragma unroll
          for (int e = 0; e < VPW; ++e) xs[r] += xv[r][e];
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float q[VPW];
          amlx_unpack<BITS>(amlx_word(wv[u][m], j), q);
#pragma unroll
          for (int r = 0; r < RB; ++r)
#pragma unroll
            for (int e = 0; e < VPW; ++e) a[m][r] = __fmaf_rn(q[e], xv[r][e], a[m][r]);
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < RB; ++r) y[m][r] += sv[u][m] * a[m][r] + bv[u][m] * xs[r];
    }
  }

#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) y[m][r] += __shfl_xor_sync(0xffffffffu, y[m][r], o);

  if (KS > 1) {
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < RB; ++r) part[((ks * WX + wx) * M + m) * RB + r] = y[m][r];
    }
    __syncthreads();
    if (ks != 0 || lane != 0) return;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        float t = 0.0f;
        for (int k = 0; k < KS; ++k) t += part[((k * WX + wx) * M + m) * RB + r];
        y[m][r] = t;
      }
  } else if (lane != 0) {
    return;
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const int n = n0 + m;
    if (n >= N) break;
#pragma unroll
    for (int r = 0; r < RB; ++r)
      if (r < rows) out[(size_t)r * N + n] = static_cast<T>(y[m][r]);
  }
"""

NAME = "amlx_quantized_gemv"
INPUTS = ["x", "w", "scales", "biases"]

_KERNEL: list[fast.CudaKernel] = []


def kernel_source() -> tuple[str, list[str], str, str]:
    """(name, input names, body, header) as handed to MLX, which writes the
    signature and template constants (scripts/cuda_compile_check.py)."""
    return NAME, INPUTS, _SOURCE, _HEADER


def columns_per_warp(rows: int) -> int:
    """M in the kernel: output columns one warp computes."""
    return 4 if bucket(rows) <= 4 else 2


def bucket(rows: int) -> int:
    """The row count the kernel is compiled for when x has `rows` rows."""
    return next(b for b in ROW_BUCKETS if b >= rows)


def launch_shape(rows: int, n: int, k: int, bits: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, threadgroup) in MLX's terms (grid counts threads) for x (rows, k)
    times an (n, k) weight: blocks of 8 warps, WX along the output columns and
    KS along k. A narrow matrix (few column groups) is split along k (KS up to
    8, every lane still with a chunk) as far as the warps still fit on the SMs
    at once (`resident`): all of its loads are then issued in one round, where
    unsplit warps would read their rows one after another."""
    per_warp = columns_per_warp(rows)
    chunks = k * bits // 128
    warps_n = -(-n // per_warp)
    split = 1
    while split < WARPS and warps_n * split * 2 <= resident(rows) and chunks >= 32 * split * 2:
        split *= 2
    wx = WARPS // split
    blocks = -(-n // (wx * per_warp))
    return (blocks * 32 * wx, split, 1), (32 * wx, split, 1)


def resident(rows: int) -> int:
    """Warps of the kernel that fit on the GPU at once: by its registers (ptxas for
    sm_90a: about 96-128 a thread up to 2 rows, two 256-thread blocks an SM; up to
    252 beyond, one block)."""
    return SMS * (2 if bucket(rows) <= 2 else 1) * WARPS


def supports(x: Array, weight: Array, scales: Array, biases: Array, group_size: int, bits: int) -> bool:
    """Whether the kernel computes x @ dequantize(weight)^T: 2-D x of 1..8 rows,
    MLX's affine format with 4 or 8 bits and groups of 32, 64 or 128 values,
    scales, biases and x of one float dtype, a packed row a whole number of
    16-byte chunks."""
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS or bits not in BITS or group_size not in GROUP_SIZES:
        return False
    if x.dtype not in DTYPES or scales.dtype is not x.dtype or biases.dtype is not x.dtype or weight.dtype is not uint32:
        return False
    n, k = weight.shape[0], x.shape[1]
    if weight.ndim != 2 or k == 0 or k % group_size or (k * bits) % 128 or weight.shape[1] * 32 != k * bits:
        return False
    return n >= 1 and scales.shape == biases.shape == (n, k // group_size)


def applies(x: Array, weight: Array, scales: Array, biases: Array, group_size: int, bits: int) -> bool:
    """Whether `nn.quantized_dense` should use the kernel: it is on (ENABLED), MLX
    runs on CUDA and computes on the GPU here, x has at most USE_ROWS rows, and
    `supports` the shapes."""
    return (ENABLED and x.ndim == 2 and x.shape[0] <= USE_ROWS and device.default_device() == "gpu"
            and fast.cuda_available() and supports(x, weight, scales, biases, group_size, bits))


def quantized_gemv(x: Array, weight: Array, scales: Array, biases: Array, group_size: int, bits: int) -> Array:
    """x (rows, K) @ dequantize(weight, scales, biases)^T -> (rows, N) in x's
    dtype (MLX's `quantized_matmul` with transpose=True); see `supports`."""
    del group_size  # the kernel reads it from the shapes: K / scales.shape[1]
    if not _KERNEL:
        _KERNEL.append(fast.CudaKernel(NAME, INPUTS, ["out"], _SOURCE, header=_HEADER))
    rows, k = x.shape
    n = weight.shape[0]
    grid, group = launch_shape(rows, n, k, bits)
    (out,) = _KERNEL[0]([x, weight, scales, biases], [(rows, n)], [x.dtype], grid=grid, threadgroup=group,
                        template={"T": x.dtype, "BITS": int(bits), "RB": bucket(rows)})
    return out
