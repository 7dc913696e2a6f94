// The few-row matmul kernels, written once over a vector traits type T and
// instantiated in each per-instruction-set unit (see gemv.h). T provides:
//   W (lanes), V (vector of W floats), zero(), set1(f), load(const float*),
//   fma(a, b, c) = a*b + c, add(a, b), hsum(v),
//   load_w<kind>(const void* row, long k): W weights from element k as floats,
//   load_q8(const uint8_t* row, long k): W 8-bit values from element k (0..255),
//   load_q4(const uint8_t* bytes, bool high): the low (or high) nibbles of W
//   bytes as floats (0..15).
//
// Every kernel streams R weight rows side by side, loading each value of x once
// for the R of them (fewer loads per FMA, R streams for the prefetchers), and
// keeps the accumulators in registers (the loops over rows are unrolled at
// compile time: a runtime loop over M spilled them to the stack, 9 cycles an FMA).
// R depends on M, but a row's own arithmetic does not: each output row is
// summed in one order for every M and R, so batching never changes its result.
//
// Quantized rows use sum_k x_k (s q_k + b) = s * sum_k x_k q_k + b * sum_k x_k:
// the inner loop is one FMA per value; the group sums of x come precomputed.
// 4-bit rows read x permuted (cpu_gemv.cpp): in each run of 32 values, first the
// 16 even ones, then the 16 odd ones, which are the low and high nibbles of 16
// packed bytes, so unpacking is a mask or a shift, with no shuffles.
#ifndef MLXC_GEMV_IMPL_H
#define MLXC_GEMV_IMPL_H

#include "gemv.h"

#define MLXC_UNROLL _Pragma("GCC unroll 16")

namespace mlxc::gemv {
namespace {

// Two chains per output row hide FMA latency when R * M is small.
constexpr int U = 2;

template <class T, int M, int WK, int R>
inline void dense_block(const Job& j, int n) {
  using V = typename T::V;
  constexpr int W = T::W;
  const long K = j.K;
  constexpr int esize = WK == F32 ? 4 : 2;
  const char* row[R];
  MLXC_UNROLL for (int r = 0; r < R; ++r) row[r] = static_cast<const char*>(j.w) + (long)(n + r) * K * esize;
  V acc[R][U][M];
  MLXC_UNROLL for (int r = 0; r < R; ++r)
    MLXC_UNROLL for (int u = 0; u < U; ++u)
      MLXC_UNROLL for (int m = 0; m < M; ++m) acc[r][u][m] = T::zero();
  long k = 0;
  for (; k + U * W <= K; k += U * W) {
    MLXC_UNROLL for (int u = 0; u < U; ++u) {
      V w[R];
      MLXC_UNROLL for (int r = 0; r < R; ++r) w[r] = T::template load_w<WK>(row[r], k + u * W);
      MLXC_UNROLL for (int m = 0; m < M; ++m) {
        V xv = T::load(j.x + m * K + k + u * W);
        MLXC_UNROLL for (int r = 0; r < R; ++r) acc[r][u][m] = T::fma(w[r], xv, acc[r][u][m]);
      }
    }
  }
  for (; k + W <= K; k += W) {
    V w[R];
    MLXC_UNROLL for (int r = 0; r < R; ++r) w[r] = T::template load_w<WK>(row[r], k);
    MLXC_UNROLL for (int m = 0; m < M; ++m) {
      V xv = T::load(j.x + m * K + k);
      MLXC_UNROLL for (int r = 0; r < R; ++r) acc[r][0][m] = T::fma(w[r], xv, acc[r][0][m]);
    }
  }
  MLXC_UNROLL for (int r = 0; r < R; ++r) {
    MLXC_UNROLL for (int m = 0; m < M; ++m) {
      float s = T::hsum(T::add(acc[r][0][m], acc[r][1][m]));
      for (long t = k; t < K; ++t) s += load_scalar(row[r], WK, t) * j.x[m * K + t];
      j.y[(long)m * j.N + n + r] = s;
    }
  }
}

template <class T, int M, int WK>
void dense_rows(const Job& j, int n0, int n1) {
  constexpr int R = M <= 2 ? 4 : M <= 4 ? 2 : 1;
  int n = n0;
  for (; n + R <= n1; n += R) dense_block<T, M, WK, R>(j, n);
  for (; n < n1; ++n) dense_block<T, M, WK, 1>(j, n);
}

template <class T, int M, int BITS, int GS, int R>
inline void quant_block(const Job& j, int n) {
  using V = typename T::V;
  constexpr int W = T::W;
  const long K = j.K;
  const int G = j.K / GS;
  const uint8_t* row[R];
  MLXC_UNROLL for (int r = 0; r < R; ++r) row[r] = static_cast<const uint8_t*>(j.w) + (long)(n + r) * K * BITS / 8;
  V tot[R][M];
  float bias_part[R][M];
  MLXC_UNROLL for (int r = 0; r < R; ++r)
    MLXC_UNROLL for (int m = 0; m < M; ++m) tot[r][m] = T::zero(), bias_part[r][m] = 0.0f;
  for (int gi = 0; gi < G; ++gi) {
    const long k0 = (long)gi * GS;
    V acc[R][M];
    MLXC_UNROLL for (int r = 0; r < R; ++r)
      MLXC_UNROLL for (int m = 0; m < M; ++m) acc[r][m] = T::zero();
    MLXC_UNROLL for (int kk = 0; kk < GS; kk += W) {
      const long k = k0 + kk;
      V q[R];
      MLXC_UNROLL for (int r = 0; r < R; ++r) {
        if constexpr (BITS == 8) {
          q[r] = T::load_q8(row[r], k);
        } else {  // permuted position k: byte (k / 32) * 16 + k % 16, high nibble in a run's second half
          q[r] = T::load_q4(row[r] + k0 / 2 + (kk / 32) * 16 + kk % 16, kk % 32 >= 16);
        }
      }
      MLXC_UNROLL for (int m = 0; m < M; ++m) {
        V xv = T::load(j.x + m * K + k);
        MLXC_UNROLL for (int r = 0; r < R; ++r) acc[r][m] = T::fma(q[r], xv, acc[r][m]);
      }
    }
    MLXC_UNROLL for (int r = 0; r < R; ++r) {
      const long si = (long)(n + r) * G + gi;
      V s = T::set1(load_scalar(j.scales, j.skind, si));
      float b = load_scalar(j.biases, j.skind, si);
      MLXC_UNROLL for (int m = 0; m < M; ++m) {
        tot[r][m] = T::fma(s, acc[r][m], tot[r][m]);
        bias_part[r][m] += b * j.xsum[(long)m * G + gi];
      }
    }
  }
  MLXC_UNROLL for (int r = 0; r < R; ++r)
    MLXC_UNROLL for (int m = 0; m < M; ++m) j.y[(long)m * j.N + n + r] = T::hsum(tot[r][m]) + bias_part[r][m];
}

template <class T, int M, int BITS, int GS>
void quant_rows(const Job& j, int n0, int n1) {
  constexpr int R = M <= 2 ? 4 : M <= 4 ? 2 : 1;
  int n = n0;
  for (; n + R <= n1; n += R) quant_block<T, M, BITS, GS, R>(j, n);
  for (; n < n1; ++n) quant_block<T, M, BITS, GS, 1>(j, n);
}

template <class T, int M, int BITS>
RowsFn pick_group(const Job& j) {
  if (j.group == 32) return &quant_rows<T, M, BITS, 32>;
  if (j.group == 64) return &quant_rows<T, M, BITS, 64>;
  return &quant_rows<T, M, BITS, 128>;
}

template <class T, int M>
RowsFn pick_for_rows(const Job& j) {
  if (j.bits == 8) return pick_group<T, M, 8>(j);
  if (j.bits == 4) return pick_group<T, M, 4>(j);
  if (j.wkind == F16) return &dense_rows<T, M, F16>;
  if (j.wkind == BF16) return &dense_rows<T, M, BF16>;
  return &dense_rows<T, M, F32>;
}

template <class T>
void rows(const Job& j, int n0, int n1) {
  RowsFn fn = nullptr;
  switch (j.M) {
    case 1: fn = pick_for_rows<T, 1>(j); break;
    case 2: fn = pick_for_rows<T, 2>(j); break;
    case 3: fn = pick_for_rows<T, 3>(j); break;
    case 4: fn = pick_for_rows<T, 4>(j); break;
    case 5: fn = pick_for_rows<T, 5>(j); break;
    case 6: fn = pick_for_rows<T, 6>(j); break;
    case 7: fn = pick_for_rows<T, 7>(j); break;
    default: fn = pick_for_rows<T, 8>(j); break;
  }
  fn(j, n0, n1);
}

}  // namespace
}  // namespace mlxc::gemv

#endif
