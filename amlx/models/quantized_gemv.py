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

How a call is launched (`launch_shape`, the same for both versions: blocks of 2, 4 or 8
warps, K split 1-8 ways over a block's warps) is chosen by a rule (AMLX_QGEMV_LAUNCH, read
once): "wave" (default, the launch measured on the H200: blocks of 8 warps, split while the
split warps fit on the GPU at once) or "balanced" (not yet measured: the shape a cost model
of the busiest SM, `estimate`, finds at least 10% faster, else the wave one; at Qwen3-8B's
shapes it moves only q/k/v, whose 192 blocks of 8 warps left 60 SMs with twice the work of
72 others, to 384 blocks of 4).

Used by `nn.quantized_dense` on MLX's CUDA backend for 2-D activations of at
most `MAX_ROWS` rows (decode steps, short prompts); MLX's quantized matmul
everywhere else. AMLX_QGEMV=0 (read once, at import) turns it off, for
comparisons. As a custom kernel it is one graph node and survives the
compiled decode step like the other step kernels.

Two versions (`VERSION`; AMLX_QGEMV=1 picks the first). Version 1 is the above,
measured on an H200 first (benchmarks/README.md). Version 2, the default since it
was measured there (2026-12-02 night, benchmarks/qgemv.py, calls one at a time,
Qwen3-8B 4-bit shapes): every shape at 1, 2 and 4 rows as fast or faster, a step's
quantized products 3.48 -> 2.91 ms at one row, 4.75 -> 3.45 at two, 9.65 -> 4.98
at four (the head at one row 49% -> 69% of the copy bandwidth), its GPU tests
passing against the float64 reference. Version 1 as measured: beyond one row it was bound by
instructions, and its x loads, each waited for before use, put a dozen or more
serial L1/L2 round trips in every iteration. Version 2 keeps the work split
and arithmetic and changes how it is issued (ptxas/SASS for sm_90a, bf16, 4
bits; instructions a weight in the K loop, version 1 -> 2: 6.3 -> 4.4 at one
row, 14 -> 9.3 at four, 35 -> 20 at eight):
- every load of an iteration (weights, scales, biases, and x for all rows in
  batches of at most 64 registers) is issued before any is used, and the next
  iteration's weights are loaded before this one is computed (double buffered
  in registers; two chunks a lane an iteration at one row, one beyond; up to
  128 registers a thread at 1-2 rows, still two blocks an SM), so a warp waits for
  DRAM about once, not once an iteration, and computes while its next loads fly;
- mask and OR into 2^23 are one LOP3 (inline PTX; the compiler made two);
- the aligned and unaligned paths are two copies of the loop chosen once, and
  padded rows read the last real row, so an iteration has no branch; a chunk
  past the end is read clamped and weighted by scale and bias 0.
"""

from __future__ import annotations

import os

from amlx._mlx import Array, bfloat16, device, fast, float16, float32, uint32

# AMLX_QGEMV (read once, at import): 0 off (MLX's quantized matmul), 1 the first
# version of the kernel, 2 (default) the second, faster at every measured shape; any
# other value: the default.
_ENV = os.environ.get("AMLX_QGEMV", "2")
ENABLED = _ENV != "0"
VERSION = 1 if _ENV == "1" else 2
MAX_ROWS = 8
# Rows up to which `applies` picks the kernel. Measured on the H200 (benchmarks/qgemv.py,
# Qwen3-8B shapes, 4-bit): 1.1-2.6x MLX's quantized matmul at 1, 2 and 4 rows, but
# 0.16-0.24x at 8, where MLX's tensor-core tile wins (this kernel is compute-bound there).
USE_ROWS = 4
ROW_BUCKETS = (1, 2, 4, 8)  # row counts the kernel is compiled for (fewer rows run in the next one up)
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = (bfloat16, float16, float32)
WARPS = 8  # warps a block at most (the kernels size their shared partial sums for 8); the wave rule's blocks
SMS = 132  # the H200's (an H100 SXM's too)

_HEADER = r"""
// (a & b) | c in one LOP3 (the compiler emits two for a mask and an OR with two
// immediates).
__device__ __forceinline__ uint32_t amlx_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Values [0, P) of one packed word as floats, P = 32 / BITS. A field of bits
// [s, s + BITS) with s + BITS <= 23 is masked in place and OR-ed into the
// exponent of 2^23 (0x4B000000): the float 2^23 + q * 2^s, exactly; then
// f * 2^-s - 2^(23 - s) = q, exact in one FMA (powers of two). Fields above
// bit 22 are first shifted down by SH. No integer-to-float conversion. With LOP3
// the mask and the OR are issued as one instruction (amlx_and_or; version 2).
template <int BITS, bool LOP3 = false>
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
    const float f = __uint_as_float(LOP3 ? amlx_and_or(src, MASK << s, 0x4B000000u)
                                         : (src & (MASK << s)) | 0x4B000000u);
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

// The end of both kernels: a warp's partial sums reduced over its lanes, then, where K
// was split over the block's warps (KS > 1), over those warps in shared memory; lane 0
// of the first K slice writes the block's outputs, rounded to T.
template <typename T, int M, int RB>
__device__ __forceinline__ void amlx_reduce_store(float (&y)[M][RB], float* part, int lane, int wx, int WX,
                                                  int ks, int KS, int n0, int N, int rows, T* out) {
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
}
"""

# Inputs x (rows, K) T, w (N, K*BITS/32) uint32, scales and biases (N, K/G) T;
# output out (rows, N) T. Template: T, BITS, RB (rows compiled for, >= rows).
# Block (32 * WX, KS): warp (wx, ks) computes the M columns n0..n0+M-1 of its
# block over chunks c = lane + 32 * (ks + KS * i) of the K range.
# Both kernels' shapes and thread coordinates (M and RB are set before it): values per
# word and chunk, the partial sums' shared memory, x's rows, W's N and K in words,
# chunks and groups, this lane's warp (wx of WX) and K slice (ks of KS), its first column.
_DIMS = r"""
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
"""

_SOURCE = (
    r"""
  constexpr int M = RB <= 4 ? 4 : 2;      // output columns per warp
  constexpr int U = 2;                    // chunks per lane in flight
"""
    + _DIMS
    + r"""  const bool wvec = (reinterpret_cast<uintptr_t>(w) & 15) == 0;
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

  amlx_reduce_store<T, M, RB>(y, part, lane, wx, WX, ks, KS, n0, N, rows, out);
"""
)

# Version 2 (the default, VERSION = 2): the same work split as version 1, built
# to keep more bytes in flight and to issue fewer instructions a weight.
_HEADER_V2 = r"""
template <int S> struct amlx_elem;
template <> struct amlx_elem<2> { using type = unsigned short; };
template <> struct amlx_elem<4> { using type = unsigned int; };

// 16 bytes at p (elements of E); VEC: p is 16-byte aligned (one load), else
// element by element (two specializations: no unreachable code in either).
template <bool VEC> struct amlx_ld;
template <> struct amlx_ld<true> {
  template <typename E>
  static __device__ __forceinline__ uint4 ld16(const E* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
};
template <> struct amlx_ld<false> {
  template <typename E>
  static __device__ __forceinline__ uint4 ld16(const E* p) {
    uint32_t v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (sizeof(E) == 4) {
        v[i] = __ldg(reinterpret_cast<const unsigned int*>(p) + i);
      } else {
        const unsigned short* h = reinterpret_cast<const unsigned short*>(p) + 2 * i;
        v[i] = (uint32_t)__ldg(h) | ((uint32_t)__ldg(h + 1) << 16);
      }
    }
    return make_uint4(v[0], v[1], v[2], v[3]);
  }
};
template <bool VEC, typename E>
__device__ __forceinline__ uint4 amlx_ld16(const E* p) { return amlx_ld<VEC>::ld16(p); }

// The values of T in one 32-bit word as floats (two of 16 bits, one of 32).
__device__ __forceinline__ void amlx_cvt(const __nv_bfloat16*, uint32_t u, float* f) {
  f[0] = __uint_as_float(u << 16);
  f[1] = __uint_as_float(u & 0xffff0000u);
}
__device__ __forceinline__ void amlx_cvt(const __half*, uint32_t u, float* f) {
  __half2 h;
  memcpy(&h, &u, 4);
  const float2 t = __half22float2(h);
  f[0] = t.x;
  f[1] = t.y;
}
__device__ __forceinline__ void amlx_cvt(const float*, uint32_t u, float* f) { f[0] = __uint_as_float(u); }

// The weights of U chunks (c0 + u * stride, clamped into the row: a chunk past
// the end is read again and given scale and bias 0) of the M rows, and their
// groups' scales and biases.
template <typename T, int M, int U, bool VEC>
__device__ __forceinline__ void amlx_qgemv2_load(const uint32_t* w, const T* scales, const T* biases,
                                                 const int* row, int words, int chunks, int groups, int cpg_shift,
                                                 int c0, int stride, uint4 (&wv)[U][M], float (&sv)[U][M],
                                                 float (&bv)[U][M]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + u * stride;
    const bool live = c < chunks;
    const int cc = live ? c : chunks - 1;
    const int g = cc >> cpg_shift;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      wv[u][m] = amlx_ld16<VEC>(w + (size_t)row[m] * words + cc * 4);
      const float s = static_cast<float>(scales[(size_t)row[m] * groups + g]);
      const float b = static_cast<float>(biases[(size_t)row[m] * groups + g]);
      sv[u][m] = live ? s : 0.0f;
      bv[u][m] = live ? b : 0.0f;
    }
  }
}

// One lane's K loop: y[m][r] += x[r] . W[row[m]] over chunks c0, c0 + stride, ...
// All loads of an iteration (U chunks of M rows, their scales and biases) are
// issued before any use; with PF those of the next iteration are issued before
// this one is computed (double buffered in registers). x comes in batches of JB
// words' worth for all RB rows at once (at most 64 registers of raw x), so its
// L1/L2 round trips are few and overlap the unpacking; padded rows (r >= rows)
// read the last row and are never stored. No branch inside an iteration.
template <typename T, int BITS, int RB, int M, int U, bool PF, bool VEC>
__device__ __forceinline__ void amlx_qgemv2_loop(const T* x, const uint32_t* w, const T* scales, const T* biases,
                                                 const int* row, int rows, int K, int words, int chunks, int groups,
                                                 int cpg_shift, int c_first, int stride, float (&y)[M][RB]) {
  constexpr int VPW = 32 / BITS;                 // weight values per word
  constexpr int VPC = 4 * VPW;                   // per 16-byte chunk
  constexpr int XPW = 4 / (int)sizeof(T);        // x values per 32-bit word
  constexpr int XW = VPW / XPW;                  // x words per weight word, per row: 2, 4 or 8
  constexpr int JB = 4 * XW * RB <= 64 ? 4 : 2 * XW * RB <= 64 ? 2 : 1;  // weight words per x batch
  constexpr int XU = JB * XW / 4;                // 16-byte x loads per row per batch
  using E = typename amlx_elem<sizeof(T)>::type;
  const E* xr[RB];
#pragma unroll
  for (int r = 0; r < RB; ++r) xr[r] = reinterpret_cast<const E*>(x + (size_t)min(r, rows - 1) * K);

  uint4 wv[U][M];
  float sv[U][M], bv[U][M];
  amlx_qgemv2_load<T, M, U, VEC>(w, scales, biases, row, words, chunks, groups, cpg_shift, c_first, stride, wv, sv, bv);
  for (int c0 = c_first; c0 < chunks; c0 += stride * U) {
    uint4 wn[U][M];
    float sn[U][M], bn[U][M];
    if (PF) amlx_qgemv2_load<T, M, U, VEC>(w, scales, biases, row, words, chunks, groups, cpg_shift,
                                           c0 + stride * U, stride, wn, sn, bn);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = min(c0 + u * stride, chunks - 1);
      float a[M][RB];
      float xs[RB];
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        xs[r] = 0.0f;
#pragma unroll
        for (int m = 0; m < M; ++m) a[m][r] = 0.0f;
      }
#pragma unroll
      for (int jb = 0; jb < 4; jb += JB) {
        uint4 xv[RB][XU];
#pragma unroll
        for (int r = 0; r < RB; ++r)
#pragma unroll
          for (int i = 0; i < XU; ++i)
            xv[r][i] = amlx_ld16<VEC>(xr[r] + (size_t)c * VPC + jb * VPW + i * (16 / sizeof(E)));
#pragma unroll
        for (int jj = 0; jj < JB; ++jj) {
          float xf[RB][VPW];
#pragma unroll
          for (int r = 0; r < RB; ++r) {
#pragma unroll
            for (int t = 0; t < XW; ++t) amlx_cvt(x, amlx_word(xv[r][(jj * XW + t) / 4], (jj * XW + t) % 4), &xf[r][t * XPW]);
#pragma unroll
            for (int e = 0; e < VPW; ++e) xs[r] += xf[r][e];
          }
#pragma unroll
          for (int m = 0; m < M; ++m) {
            float q[VPW];
            amlx_unpack<BITS, true>(amlx_word(wv[u][m], jb + jj), q);
#pragma unroll
            for (int r = 0; r < RB; ++r)
#pragma unroll
              for (int e = 0; e < VPW; ++e) a[m][r] = __fmaf_rn(q[e], xf[r][e], a[m][r]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < RB; ++r) y[m][r] += sv[u][m] * a[m][r] + bv[u][m] * xs[r];
    }
    if (PF) {
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int m = 0; m < M; ++m) {
          wv[u][m] = wn[u][m];
          sv[u][m] = sn[u][m];
          bv[u][m] = bn[u][m];
        }
    } else if (c0 + stride * U < chunks) {
      amlx_qgemv2_load<T, M, U, VEC>(w, scales, biases, row, words, chunks, groups, cpg_shift, c0 + stride * U,
                                     stride, wv, sv, bv);
    }
  }
}
"""

# Version 2's body: version 1's setup and reduction around amlx_qgemv2_loop,
# which runs with 16-byte loads when w and x are 16-byte aligned (always, for
# arrays MLX allocates; row views of a fused weight keep it) and element by
# element otherwise.
_SOURCE_V2 = (
    r"""
  constexpr int M = RB <= 4 ? 4 : 2;      // output columns per warp
  // Chunks per lane per iteration: two at one row, one beyond (where the
  // registers hold x for 2-8 rows: two 256-thread blocks an SM still fit at 2);
  // either way the next iteration's weights are in flight while this one is
  // computed (ptxas: 96-190 registers, no spills).
  constexpr int U = RB <= 1 ? 2 : 1;
  constexpr bool PF = true;
"""
    + _DIMS
    + r"""  const bool vec = ((reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(x)) & 15) == 0;

  int row[M];  // the weight rows (past the end: the last row, read but not stored)
#pragma unroll
  for (int m = 0; m < M; ++m) row[m] = min(n0 + m, N - 1);

  float y[M][RB];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < RB; ++r) y[m][r] = 0.0f;

  if (vec) {
    amlx_qgemv2_loop<T, BITS, RB, M, U, PF, true>(x, w, scales, biases, row, rows, K, words, chunks, groups,
                                                  cpg_shift, lane + 32 * ks, 32 * KS, y);
  } else {
    amlx_qgemv2_loop<T, BITS, RB, M, 1, false, false>(x, w, scales, biases, row, rows, K, words, chunks, groups,
                                                      cpg_shift, lane + 32 * ks, 32 * KS, y);
  }

  amlx_reduce_store<T, M, RB>(y, part, lane, wx, WX, ks, KS, n0, N, rows, out);
"""
)

NAME = "amlx_quantized_gemv"
NAMES = {1: NAME, 2: "amlx_quantized_gemv2"}
INPUTS = ["x", "w", "scales", "biases"]

_KERNEL: dict[int, fast.CudaKernel] = {}


def kernel_source(version: int | None = None) -> tuple[str, list[str], str, str]:
    """(name, input names, body, header) as handed to MLX for kernel `version`
    (default VERSION), which writes the signature and template constants
    (scripts/cuda_compile_check.py)."""
    if (version or VERSION) == 1:
        return NAME, INPUTS, _SOURCE, _HEADER
    return NAMES[2], INPUTS, _SOURCE_V2, _HEADER + _HEADER_V2


def columns_per_warp(rows: int) -> int:
    """M in the kernel: output columns one warp computes."""
    return 4 if bucket(rows) <= 4 else 2


def bucket(rows: int) -> int:
    """The row count the kernel is compiled for when x has `rows` rows."""
    return next(b for b in ROW_BUCKETS if b >= rows)


# Registers a thread of each variant, (version, rows compiled for, bits, bytes of x's dtype) -> ptxas's
# count for sm_90a (the larger of float16 and bfloat16 for 2 bytes); scripts/cuda_compile_check.py
# --ptxas fails where a variant uses more than this table says. They set how many warps an SM holds.
REGISTERS = {
    (1, 1, 4, 2): 96, (1, 1, 8, 2): 96, (1, 1, 4, 4): 96, (1, 1, 8, 4): 95,
    (1, 2, 4, 2): 128, (1, 2, 8, 2): 128, (1, 2, 4, 4): 128, (1, 2, 8, 4): 127,
    (1, 4, 4, 2): 168, (1, 4, 8, 2): 168, (1, 4, 4, 4): 168, (1, 4, 8, 4): 168,
    (1, 8, 4, 2): 252, (1, 8, 8, 2): 190, (1, 8, 4, 4): 248, (1, 8, 8, 4): 202,
    (2, 1, 4, 2): 128, (2, 1, 8, 2): 128, (2, 1, 4, 4): 128, (2, 1, 8, 4): 130,
    (2, 2, 4, 2): 128, (2, 2, 8, 2): 96, (2, 2, 4, 4): 96, (2, 2, 8, 4): 96,
    (2, 4, 4, 2): 179, (2, 4, 8, 2): 148, (2, 4, 4, 4): 184, (2, 4, 8, 4): 160,
    (2, 8, 4, 2): 168, (2, 8, 8, 2): 146, (2, 8, 4, 4): 190, (2, 8, 8, 4): 154,
}
LAUNCH_RULES = ("wave", "balanced")
# AMLX_QGEMV_LAUNCH (read once, at import): how the launch shape is chosen, for both versions.
# "wave" (default, the one measured): blocks of 8 warps, K split over a block's warps while the
# split warps still fit on the GPU at once. "balanced" (not yet measured on a GPU): the block size
# and the split that `estimate` finds fastest.
LAUNCH = os.environ.get("AMLX_QGEMV_LAUNCH", "wave")
if LAUNCH not in LAUNCH_RULES:
    LAUNCH = "wave"

# The cost model's H200 figures (`estimate`): copy bandwidth in bytes a microsecond (3.3-3.5 TB/s
# measured, benchmarks/README.md), warp instructions an SM issues a microsecond (4 schedulers at
# 1.98 GHz), one DRAM round trip under load with the block's reduction after it, in microseconds,
# and thread instructions a weight in the K loop by version and rows compiled for (ptxas/SASS, bf16,
# 4 bits; 2 rows between the counted 1 and 4).
_BYTES_US = 3.3e6
_ISSUE_US = 4 * 1980.0
_LATENCY_US = 1.0
_INSTR_PER_WEIGHT = {1: {1: 6.3, 2: 9.0, 4: 14.0, 8: 35.0}, 2: {1: 4.4, 2: 6.0, 4: 9.3, 8: 20.0}}


def warps_per_sm(rows: int, bits: int, itemsize: int, version: int, warps: int) -> int:
    """Warps of the kernel an SM holds at once in blocks of `warps` warps: 64K registers an SM,
    allocated per warp in 256s (8 a thread), at most 64 warps and 32 blocks."""
    regs = -(-REGISTERS[(version, bucket(rows), bits, 4 if itemsize == 4 else 2)] // 8) * 8
    per_sm = min(64, 65536 // (32 * regs))
    return min(32, per_sm // warps) * warps


def estimate(rows: int, n: int, k: int, bits: int, warps: int, split: int, itemsize: int = 2,
             version: int | None = None) -> float:
    """Microseconds the cost model gives one call launched in blocks of `warps` warps with K
    split `split` ways over each block's warps. The busiest SM decides: the blocks it runs
    (ceil(blocks / SMs): equal blocks go round the SMs) issue their instructions at the SM's
    rate, overlapped with the whole matrix streaming at the copy bandwidth (an SM can draw
    more than its share while others idle; bytes in flight do not bound it: a resident warp has
    4-8 KB of loads out, an SM 32-128 KB, where keeping 1/132 of 3.3 TB/s busy over a 1 us
    round trip takes 25 KB), plus a DRAM round trip each time a warp waits on
    its loads: once a round of resident blocks for version 2 (its next loads fly while it
    computes), once an iteration for version 1. Splitting K shortens every warp's loop, so
    fewer iterations wait, but adds rounds where the warps no longer fit at once; smaller
    blocks spread a few hundred blocks evenly over 132 SMs and pack more warps into the
    registers where a thread needs more than 128."""
    version = version or VERSION
    per_warp = columns_per_warp(rows)
    chunks = k * bits // 128
    wx = warps // split
    blocks = -(-n // (wx * per_warp))
    on_sm = -(-blocks // SMS)
    rounds = -(-on_sm // (warps_per_sm(rows, bits, itemsize, version, warps) // warps))
    lane_chunks = -(-chunks // (32 * split))  # chunks of a lane in each of its rows
    waits = 1 if version == 2 else -(-lane_chunks // 2)  # version 1: two chunks a lane an iteration
    instr = per_warp * lane_chunks * (128 // bits) * _INSTR_PER_WEIGHT[version][bucket(rows)]
    read = n * k * bits / 8 / _BYTES_US
    return max(read, on_sm * warps * instr / _ISSUE_US) + rounds * waits * _LATENCY_US


def launch_shape(rows: int, n: int, k: int, bits: int, version: int | None = None, rule: str | None = None,
                 itemsize: int = 2, shape: tuple[int, int] | None = None
                 ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, threadgroup) in MLX's terms (grid counts threads) for x (rows, k) times an (n, k)
    weight: blocks of `warps` warps, WX along the output columns and KS (the split) along k, K
    split over a block's warps and their sums met in shared memory (deterministic: one order).
    `shape`: (warps, split) as given (warps 2, 4 or 8, split a power of two <= warps); else by
    `rule` (default LAUNCH):
    - "wave": blocks of 8 warps; a narrow matrix (few column groups) is split along k (up to 8,
      every lane still with a chunk) as far as the warps still fit on the SMs at once (all of
      its loads then issued in one round, where unsplit warps would read their rows one after
      another);
    - "balanced": the (warps, split) of blocks of 2, 4 or 8 warps and splits 1-8 (every lane
      with a chunk) that `estimate` finds fastest, the fewest splits and largest blocks on ties,
      where it beats the "wave" launch by 10% or more (else that one).
      What it changes at Qwen3-8B's shapes: q/k/v's 192 blocks of 8 warps left 60 of the 132
      SMs with two blocks and 72 with one (the busiest did 1.4x the mean); blocks of 4 give
      384, three on most SMs (1.03x); at 4 rows (148-184 registers) an SM holds 8 warps in
      blocks of 8 but 8-12 in blocks of 4 and 10-12 in blocks of 2."""
    version = version or VERSION
    rule = rule or LAUNCH
    if rule not in LAUNCH_RULES:
        raise ValueError(f"quantized_gemv: launch rule {rule!r} is none of {LAUNCH_RULES}")
    per_warp = columns_per_warp(rows)
    chunks = k * bits // 128
    given = shape is not None
    if not given:
        warps_n = -(-n // per_warp)
        resident = SMS * warps_per_sm(rows, bits, itemsize, 1, WARPS)  # as measured: version 1's residency
        split = 1
        while split < WARPS and warps_n * split * 2 <= resident and chunks >= 32 * split * 2:
            split *= 2
        shape = (WARPS, split)
    if rule == "balanced" and not given:
        # departs from the measured launch only for a predicted gain of 10% or more (the model's
        # figures are rough; its ranking is what it is for)
        best = (estimate(rows, n, k, bits, *shape, itemsize, version) * 0.9, shape)
        for split in (1, 2, 4, 8):
            for warps in (8, 4, 2):
                if split > warps or (split > 1 and chunks < 32 * split):
                    continue
                t = estimate(rows, n, k, bits, warps, split, itemsize, version)
                if t < best[0] * 0.99:
                    best = (t, (warps, split))
        shape = best[1]
    warps, split = shape
    if warps not in (2, 4, 8) or split not in (1, 2, 4, 8) or split > warps:
        raise ValueError(f"quantized_gemv: no launch in blocks of {warps} warps split {split} ways")
    wx = warps // split
    blocks = -(-n // (wx * per_warp))
    return (blocks * 32 * wx, split, 1), (32 * wx, split, 1)


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


def mlx_product_is_wrong(x: Array, k: int, group_size: int) -> bool:
    """Whether MLX's quantized matmul would give wrong values for x (rows, k) on this
    device: on CUDA, MLX 0.32.4 sends products of 2 or more rows whose K is at most the
    group size to its sm90 kernel (H100/H200), which returned 10-25% relative errors and
    sometimes NaN for every dtype and bit width probed on an H200 (2026-12-06, K 64 and
    128, 2-16 rows; K of two groups or more was exact). Real checkpoints' K is 1,024 or
    more; small ones (and the tests' models) meet it. `nn.quantized_dense` then
    dequantizes and multiplies instead."""
    return k <= group_size and device.default_device() == "gpu" and fast.cuda_available()


def quantized_gemv(x: Array, weight: Array, scales: Array, biases: Array, group_size: int, bits: int,
                   version: int | None = None, launch: str | tuple[int, int] | None = None) -> Array:
    """x (rows, K) @ dequantize(weight, scales, biases)^T -> (rows, N) in x's
    dtype (MLX's `quantized_matmul` with transpose=True); see `supports`.
    `version`: 1 or 2, the kernel's (default VERSION); `launch`: a `LAUNCH_RULES` name or
    (warps, split), as `launch_shape` takes them (default LAUNCH)."""
    del group_size  # the kernel reads it from the shapes: K / scales.shape[1]
    version = version or VERSION
    if version not in _KERNEL:
        name, inputs, source, header = kernel_source(version)
        _KERNEL[version] = fast.CudaKernel(name, inputs, ["out"], source, header=header)
    rows, k = x.shape
    n = weight.shape[0]
    grid, group = launch_shape(rows, n, k, bits, version, itemsize=x.dtype.size,
                               rule=launch if isinstance(launch, str) else None,
                               shape=launch if isinstance(launch, tuple) else None)
    (out,) = _KERNEL[version]([x, weight, scales, biases], [(rows, n)], [x.dtype], grid=grid, threadgroup=group,
                              template={"T": x.dtype, "BITS": int(bits), "RB": bucket(rows)})
    return out
