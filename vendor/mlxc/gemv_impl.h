// The few-row matmul kernels, written once over a vector traits type T and
// instantiated in each per-instruction-set unit (see gemv.h). T provides:
//   W (lanes), V (vector of W floats), zero(), set1(f), load(const float*),
//   fma(a, b, c) = a*b + c, add(a, b), hsum(v),
//   load_w<kind>(const void* row, long k): W weights from element k as floats,
//   load_q8(const uint8_t* row, long k), load_q4(const uint8_t* row, long k):
//   W quantized values from element k as floats (0..255 / 0..15).
//
// Decode is bound by reading the weights: every kernel streams a weight row
// once for all M rows of x, converting in registers, and keeps 2M
// independent accumulators so FMA latency stays hidden.
//
// Quantized rows use sum_k x_k (s q_k + b) = s * sum_k x_k q_k + b * sum_k x_k:
// the inner loop is one FMA per value; the group sums of x come precomputed.
#ifndef MLXC_GEMV_IMPL_H
#define MLXC_GEMV_IMPL_H

#include "gemv.h"

namespace mlxc::gemv {
namespace {

template <class T, int M, int WK>
void dense_rows(const Job& j, int n0, int n1) {
  using V = typename T::V;
  constexpr int W = T::W;
  // Two chains per row hide FMA latency for one row; the same for every M, so a
  // row's sum is computed in one order (batching never changes a row's result).
  constexpr int U = 2;
  const long K = j.K;
  const int esize = WK == F32 ? 4 : 2;
  for (int n = n0; n < n1; ++n) {
    const char* row = static_cast<const char*>(j.w) + (long)n * K * esize;
    V acc[U][M];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = T::zero();
    long k = 0;
    for (; k + U * W <= K; k += U * W) {
      for (int u = 0; u < U; ++u) {
        V w = T::template load_w<WK>(row, k + u * W);
        for (int m = 0; m < M; ++m) acc[u][m] = T::fma(w, T::load(j.x + m * K + k + u * W), acc[u][m]);
      }
    }
    for (; k + W <= K; k += W) {
      V w = T::template load_w<WK>(row, k);
      for (int m = 0; m < M; ++m) acc[0][m] = T::fma(w, T::load(j.x + m * K + k), acc[0][m]);
    }
    for (int m = 0; m < M; ++m) {
      V a = acc[0][m];
      a = T::add(a, acc[1][m]);
      float s = T::hsum(a);
      for (long t = k; t < K; ++t) s += load_scalar(row, WK, t) * j.x[m * K + t];
      j.y[(long)m * j.N + n] = s;
    }
  }
}

template <class T, int M, int BITS>
void quant_rows(const Job& j, int n0, int n1) {
  using V = typename T::V;
  constexpr int W = T::W;
  const long K = j.K;
  const int g = j.group, G = j.K / j.group;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = static_cast<const uint8_t*>(j.w) + (long)n * K * BITS / 8;
    V tot[M];
    float bias_part[M];
    for (int m = 0; m < M; ++m) tot[m] = T::zero(), bias_part[m] = 0.0f;
    for (int gi = 0; gi < G; ++gi) {
      const long k0 = (long)gi * g;
      V acc[M];
      for (int m = 0; m < M; ++m) acc[m] = T::zero();
      for (long k = k0; k < k0 + g; k += W) {
        V q = BITS == 8 ? T::load_q8(row, k) : T::load_q4(row, k);
        for (int m = 0; m < M; ++m) acc[m] = T::fma(q, T::load(j.x + m * K + k), acc[m]);
      }
      const long si = (long)n * G + gi;
      V s = T::set1(load_scalar(j.scales, j.skind, si));
      float b = load_scalar(j.biases, j.skind, si);
      for (int m = 0; m < M; ++m) {
        tot[m] = T::fma(s, acc[m], tot[m]);
        bias_part[m] += b * j.xsum[(long)m * G + gi];
      }
    }
    for (int m = 0; m < M; ++m) j.y[(long)m * j.N + n] = T::hsum(tot[m]) + bias_part[m];
  }
}

template <class T, int M>
RowsFn pick_for_rows(const Job& j) {
  if (j.bits == 8) return &quant_rows<T, M, 8>;
  if (j.bits == 4) return &quant_rows<T, M, 4>;
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
