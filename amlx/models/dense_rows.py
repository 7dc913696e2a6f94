"""Matmuls of 2 to 64 rows on CUDA with tensor cores: y = x @ W^T, x (rows, K), W (N, K).

Why: MLX's CUDA backend sends every 16-bit matmul with more than one row to
cuBLASLt, and builds that call from nothing each time: a matmul descriptor,
four matrix layouts, an algorithm search (cublasLtMatmulAlgoGetHeuristic) and
a stream capture into its CUDA graph (mlx/backend/cuda/gemms/cublas_gemm.cpp,
MLX 0.32). That is host time in every step, for every projection. On the
H200 a Qwen3-0.6B step at 64 rows spent 3.8 ms launching 267 nodes against
1.2 ms at one row (where MLX's own gemv runs, no cuBLAS): about 22 us more
for each of its 113 matmuls (benchmarks/README.md, "Where a decode step's time
goes"), and a Qwen3-8B step at 64 rows 6.2 ms (issue 16's 8B run). Batched
decoding is bound by exactly that host time. This kernel is one custom-kernel
node, launched like the other step kernels.

How it computes: `mma.sync` m16n8k16 (bfloat16 or float16 in, float32
accumulation). A warp takes NT tiles of 8 output columns (NT * 8 rows of W)
and all rows of x (MT tiles of 16, the last one padded by repeating the last
row, whose outputs are not written). Each lane loads 16 bytes of a W row per
32-value chunk of K (a warp reads 8 rows x 64 contiguous bytes a tile) and
the same 16 bytes' positions of its two x rows; the eight values are spread
over two mma steps in the one order both operands use (a dot product does
not care which k goes where, only that x and W agree), so each load feeds
the tensor cores directly, without shuffles or shared memory. The 8 warps of
a block take the K chunks in turn (chunk c to warp c % 8, so together they
read each W row front to back) and their sums meet in shared memory in one
fixed order: results are deterministic, and a row's output does not depend on
the other rows of x.

Used by `nn.linear` and `Embedding.as_linear` for inference passes of a model
whose engine turned the decode kernels on (`within`; training passes, which need
gradients a custom kernel has none of, never are), on MLX's CUDA backend, for
16-bit x and W of one dtype with K % 32 == 0 and N % 8 == 0, where it is measured
to pay: 2 to USE_ROWS rows and weights of at most USE_ELEMENTS. One row keeps MLX's
gemv (no cuBLAS there); more rows or larger weights keep cuBLAS, whose kernels read
the weights 2-4x faster than this one does (it keeps too few bytes in flight an SM to
reach the memory's bandwidth: no multi-stage pipeline into shared memory, as cuBLAS's
TMA kernels have), and where the device time, not the host's, sets the pace.
AMLX_DENSE_ROWS=0 (read once) turns it off.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

from amlx._mlx import Array, bfloat16, device, fast, float16

ENABLED = os.environ.get("AMLX_DENSE_ROWS", "1") != "0"
MIN_ROWS = 2
MAX_ROWS = 64  # what the kernel computes (tiles of 16 rows, up to 4)
# Where the model code uses it (`applies`): its device time is 1.3-2x cuBLAS's at 2-16 rows
# of Qwen3-0.6B's weights and 2-5x at Qwen3-8B's or at 64 rows (benchmarks/dense_rows_micro.py,
# H200, benchmarks/README.md): it pays where the ~15-20 us of host time it saves a call
# exceed that, which is small weights at few rows.
USE_ROWS = 16
USE_ELEMENTS = 8 << 20  # N * K: Qwen3-0.6B's and Gemma-3-1B's attention and MLP weights
WARPS = 8
NAME = "amlx_dense_rows"
INPUTS = ["x", "w"]

# set while a model builds an engine's pass with its kernels on (CausalLM.__call__)
_INFERENCE = contextvars.ContextVar("amlx_dense_rows_inference", default=False)

HEADER = r"""
// One m16n8k16 tensor-core product-accumulate, float32 accumulators: the overload
// is picked by the element type (a null pointer of it); PTX names it in the opcode.
#define AMLX_MMA(CT, PT)                                                                         \
  __device__ __forceinline__ void amlx_mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2,     \
                                           uint32_t a3, uint32_t b0, uint32_t b1, const CT*) { \
    asm("mma.sync.aligned.m16n8k16.row.col.f32." PT "." PT ".f32 {%0,%1,%2,%3}, "               \
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                                                 \
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                        \
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));                                \
  }
AMLX_MMA(__nv_bfloat16, "bf16")
AMLX_MMA(__half, "f16")
#undef AMLX_MMA

// 16 bytes at p (8 values of 16 bits); `vec`: p is 16-byte aligned. Weights are
// read once, so they skip L1 (`stream`); x is read by every block, so it stays.
template <bool STREAM>
__device__ __forceinline__ uint4 amlx_load16(const uint16_t* p, bool vec) {
  uint4 v;
  if (vec) {
    if (STREAM) {
      asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
          : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    } else {
      v = __ldg(reinterpret_cast<const uint4*>(p));
    }
    return v;
  }
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = uint32_t(__ldg(p + 2 * i)) | (uint32_t(__ldg(p + 2 * i + 1)) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}
"""

# x (rows, K) T; w (N, K) T -> out (rows, N) T. Template: T, MT (16-row tiles of x, >= rows / 16),
# NT (8-column tiles a warp), U (K chunks a warp loads before it computes them). Grid: N / (8 NT)
# blocks of WARPS warps.
SOURCE = r"""
  constexpr int WARPS = 8;
  const int rows = x_shape[0];
  const int K = x_shape[1];
  const int N = w_shape[0];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;   // the mma fragments' row group
  const int t = lane & 3;    // the lane within it
  const int n0 = blockIdx.x * (8 * NT);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x);
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(w);
  const bool vec = ((reinterpret_cast<size_t>(x) | reinterpret_cast<size_t>(w)) & 15) == 0;
  // this lane's rows: x rows 16 m + g and 16 m + g + 8 (padding repeats the last row), W rows n0 + 8 j + g
  const uint16_t* xr[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) xr[m][h] = xs + (size_t)min(16 * m + 8 * h + g, rows - 1) * K + 8 * t;
  const uint16_t* wr[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) wr[j] = ws + (size_t)(n0 + 8 * j + g) * K + 8 * t;
  float acc[MT][NT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.0f;
  const int chunks = K / 32;
  for (int c0 = warp; c0 < chunks; c0 += U * WARPS) {
    uint4 wv[U][NT];
    uint4 xv[U][MT][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      // a chunk past the end reads chunk c0 again and is not added (uniform over the warp)
      const int c = c0 + u * WARPS < chunks ? c0 + u * WARPS : c0;
#pragma unroll
      for (int j = 0; j < NT; ++j) wv[u][j] = amlx_load16<true>(wr[j] + 32 * c, vec);
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) xv[u][m][h] = amlx_load16<false>(xr[m][h] + 32 * c, vec);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u > 0 && c0 + u * WARPS >= chunks) break;
      // the lane's 8 values of k (8 t .. 8 t + 7 of the chunk) in two mma steps: words x, y in the
      // first (as its k 2t, 2t+1 and 2t+8, 2t+9), z, w in the second; x and W alike
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint4& a = xv[u][m][0];
          const uint4& b = xv[u][m][1];
          amlx_mma(acc[m][j], a.x, b.x, a.y, b.y, wv[u][j].x, wv[u][j].y, (const T*)nullptr);
          amlx_mma(acc[m][j], a.z, b.z, a.w, b.w, wv[u][j].z, wv[u][j].w, (const T*)nullptr);
        }
    }
  }
  // the warps' sums, in one order: warp WARPS - 1 first, warp 0 last, which writes
  __shared__ float part[MT * NT * 4 * 32];
#pragma unroll 1
  for (int v = WARPS - 1; v > 0; --v) {
    if (warp == v) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float& s = part[((m * NT + j) * 4 + e) * 32 + lane];
            s = v == WARPS - 1 ? acc[m][j][e] : s + acc[m][j][e];
          }
    }
    __syncthreads();
  }
  if (warp != 0) return;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float y[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) y[e] = part[((m * NT + j) * 4 + e) * 32 + lane] + acc[m][j][e];
      const int col = n0 + 8 * j + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 16 * m + 8 * h + g;
        if (r < rows) {
          out[(size_t)r * N + col] = static_cast<T>(y[2 * h]);
          out[(size_t)r * N + col + 1] = static_cast<T>(y[2 * h + 1]);
        }
      }
    }
"""

_KERNEL: list[fast.CudaKernel] = []


@contextlib.contextmanager
def within(on: bool) -> Iterator[None]:
    """Lets `applies` take the matmuls built inside (an engine's pass with its kernels on)."""
    token = _INFERENCE.set(on)
    try:
        yield
    finally:
        _INFERENCE.reset(token)


def in_inference() -> bool:
    """Whether the ops built now belong to an engine's pass with its kernels on (`within`)."""
    return _INFERENCE.get()


def supports(x: Array, weight: Array) -> bool:
    """Whether the kernel computes x @ weight^T: 2-D x of MIN_ROWS..MAX_ROWS rows, 16-bit
    x and weight of one dtype, weight (N, K) with K % 32 == 0 and N % 8 == 0."""
    return (x.ndim == 2 and weight.ndim == 2 and MIN_ROWS <= x.shape[0] <= MAX_ROWS
            and x.dtype in (bfloat16, float16) and weight.dtype == x.dtype
            and weight.shape[1] == x.shape[1] and x.shape[1] % 32 == 0 and x.shape[1] > 0
            and weight.shape[0] % 8 == 0 and weight.shape[0] > 0)


def applies(x: Array, weight: Array) -> bool:
    """Whether `nn.linear` should use the kernel here: on (ENABLED), inside `within(True)`,
    MLX computing on its CUDA backend, at most USE_ROWS rows of x and USE_ELEMENTS
    weights, and `supports`."""
    return (ENABLED and in_inference() and x.ndim == 2 and x.shape[0] <= USE_ROWS
            and weight.size <= USE_ELEMENTS and device.default_device() == "gpu" and fast.cuda_available()
            and supports(x, weight))


def tiles(rows: int, n: int) -> tuple[int, int, int]:
    """(MT, NT, U): 16-row tiles of x; 8-column tiles a warp, as many as still leave
    at least 128 blocks (one per SM of an H100/H200 or nearly; fewer, wider blocks
    re-read x less often), dividing N; K chunks in flight a warp (two, where the
    registers allow)."""
    mt = -(-rows // 16)
    nt = next(c for c in (4, 2, 1) if n % (8 * c) == 0 and (n // (8 * c) >= 128 or c == 1))
    u = 1 if mt * nt >= 16 else 2
    return mt, nt, u


def dense_rows(x: Array, weight: Array) -> Array:
    """x (rows, K) @ weight (N, K)^T -> (rows, N) in x's dtype; see `supports`."""
    if not _KERNEL:
        _KERNEL.append(fast.CudaKernel(NAME, INPUTS, ["out"], SOURCE, header=HEADER))
    rows, _ = x.shape
    n = weight.shape[0]
    mt, nt, u = tiles(rows, n)
    (out,) = _KERNEL[0]([x, weight], [(rows, n)], [x.dtype], grid=(n // (8 * nt) * 32 * WARPS, 1, 1),
                        threadgroup=(32 * WARPS, 1, 1), template={"T": x.dtype, "MT": mt, "NT": nt, "U": u})
    return out
