// The few-row matmul of MLX's affine-quantized weights against x quantized to
// int8, written once over a traits type T and instantiated in each
// per-instruction-set unit (see gemv.h).
//
// Why: the float kernels (gemv_impl.h) convert every weight to a float and
// spend an FMA on it, so they are bound by that unpacking, not by the bytes
// they read. Here x is rounded once per matmul, per group of the weight's
// group size, to int8 with a float scale d (cpu_gemv.cpp: quantize_x), and a
// group's dot is
//   sum_k (s q_k + b) d xq_k = s * d * sum_k q_k xq_k + b * d * sum_k xq_k,
// with the integer sum done on bytes (VNNI's vpdpbusd: 64 u8 x s8 products
// into 16 int32 lanes in one instruction); d * sum_k xq_k comes precomputed
// (Job::xsum). The result is the dot of the dequantized weights with the
// rounded x: only x's rounding (at most d / 2 per value) separates it from the
// float kernels'.
//
// T provides:
//   B (bytes of x per step), kRegs (vector registers), kOffset8,
//   Q (B bytes), A (int32 lanes), F (float lanes of A),
//   azero(), fzero(), load_x(const int8_t*), load_q8(const uint8_t*) (B bytes),
//   load_q4(const uint8_t*) (B/2 packed bytes -> their B/2 low nibbles, then
//     their B/2 high nibbles, as bytes),
//   dot<BITS>(A acc, Q w, Q x): acc + per-lane sums of (w - kOffset8) * x
//     (kOffset8 is 128 where the 8-bit products must be made signed to fit
//     16 bits, AVX2's vpmaddubsw; 0 otherwise),
//   fma(A acc, float s, F tot): tot + float(acc) * s, hsum(F),
//   L8: vectors of 8 floats for the per-group scalars (see bias_term).
//
// As in gemv_impl.h, R weight rows are streamed side by side and each output
// row is summed in one order for every M and R (x's rounding is per row of x),
// so batching never changes a row's result.
#ifndef MLXC_GEMV_INT8_H
#define MLXC_GEMV_INT8_H

#include "gemv.h"

#define MLXC_UNROLL8 _Pragma("GCC unroll 16")

namespace mlxc::gemv {
namespace {

// Rows side by side: as many as keep the accumulators (2 per row of x and
// weight row) and the weights in registers.
constexpr int int8_rows_for(int M, int regs) {
  return 2 * 4 * M + 4 + 2 <= regs ? 4 : 2 * 2 * M + 2 + 2 <= regs ? 2 : 1;
}

// Per-group scalars (weight scales and biases, x's scales and sums) are handled 8
// groups at a time in vectors of 8 floats (T::L8: load_scales(p, kind, i), loadf,
// mul, fma, zero, store, hsum): done one group at a time they cost several times
// the group's own byte products (measured: about 9 cycles per weight row and group).
template <class T, int BITS>
float bias_term(const Job& j, long row, int m, int G) {
  constexpr int off = BITS == 8 ? T::kOffset8 : 0;
  using L = typename T::L8;
  const long w0 = row * G, x0 = (long)m * G;
  typename L::S acc = L::zero();
  int g = 0;
  for (; g + 8 <= G; g += 8) {
    typename L::S b = L::load_scales(j.biases, j.skind, w0 + g);
    if constexpr (off != 0) {  // dot<8> left out off * sum xq: put it back as a bias
      b = L::fma(L::load_scales(j.scales, j.skind, w0 + g), L::set1((float)off), b);
    }
    acc = L::fma(b, L::loadf(j.xsum + x0 + g), acc);
  }
  float s = L::hsum(acc);
  for (; g < G; ++g) {
    float b = load_scalar(j.biases, j.skind, w0 + g);
    if constexpr (off != 0) b += load_scalar(j.scales, j.skind, w0 + g) * (float)off;
    s += b * j.xsum[x0 + g];
  }
  return s;
}

// How far ahead of the group in hand each weight row is prefetched. The hardware's streams
// alone left the loads waiting (perf: most samples on them): 8 rows of x over a 65536 x 1024
// weight 4.35 -> 3.8-4.0 ms (8-bit), one row of 4-bit 1.31-1.39 -> 0.93-0.99 ms.
constexpr int kPrefetchBytes = 1024;

template <class T, int M, int BITS, int GS, int R>
inline void int8_block(const Job& j, int n) {
  using L = typename T::L8;
  constexpr int B = T::B;
  static_assert(GS % B == 0, "a step never straddles two groups");
  const long K = j.K;
  const int G = j.K / GS;
  const uint8_t* row[R];
  MLXC_UNROLL8 for (int r = 0; r < R; ++r) row[r] = static_cast<const uint8_t*>(j.w) + (long)(n + r) * K * BITS / 8;
  typename T::F tot[R][M];
  MLXC_UNROLL8 for (int r = 0; r < R; ++r)
    MLXC_UNROLL8 for (int m = 0; m < M; ++m) tot[r][m] = T::fzero();
  for (int g0 = 0; g0 < G; g0 += 8) {
    const int gn = G - g0 < 8 ? G - g0 : 8;
    alignas(64) float sd[R][M][8];  // each group's scale times x's
    if (gn == 8) {
      MLXC_UNROLL8 for (int r = 0; r < R; ++r) {
        typename L::S sv = L::load_scales(j.scales, j.skind, (long)(n + r) * G + g0);
        MLXC_UNROLL8 for (int m = 0; m < M; ++m) L::store(sd[r][m], L::mul(sv, L::loadf(j.xd + (long)m * G + g0)));
      }
    } else {
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m)
          for (int t = 0; t < gn; ++t)
            sd[r][m][t] = load_scalar(j.scales, j.skind, (long)(n + r) * G + g0 + t) * j.xd[(long)m * G + g0 + t];
    }
    for (int t = 0; t < gn; ++t) {
      const long k0 = (long)(g0 + t) * GS;
      MLXC_UNROLL8 for (int r = 0; r < R; ++r) __builtin_prefetch(row[r] + k0 * BITS / 8 + kPrefetchBytes);
      typename T::A acc[R][M];
      MLXC_UNROLL8 for (int r = 0; r < R; ++r)
        MLXC_UNROLL8 for (int m = 0; m < M; ++m) acc[r][m] = T::azero();
      MLXC_UNROLL8 for (int kk = 0; kk < GS; kk += B) {
        typename T::Q q[R];
        MLXC_UNROLL8 for (int r = 0; r < R; ++r) {
          if constexpr (BITS == 8) {
            q[r] = T::load_q8(row[r] + k0 + kk);
          } else {
            q[r] = T::load_q4(row[r] + (k0 + kk) / 2);
          }
        }
        MLXC_UNROLL8 for (int m = 0; m < M; ++m) {
          typename T::Q xv = T::load_x(j.xq + m * K + k0 + kk);
          MLXC_UNROLL8 for (int r = 0; r < R; ++r) acc[r][m] = T::template dot<BITS>(acc[r][m], q[r], xv);
        }
      }
      MLXC_UNROLL8 for (int r = 0; r < R; ++r)
        MLXC_UNROLL8 for (int m = 0; m < M; ++m) tot[r][m] = T::fma(acc[r][m], sd[r][m][t], tot[r][m]);
    }
  }
  MLXC_UNROLL8 for (int r = 0; r < R; ++r)
    MLXC_UNROLL8 for (int m = 0; m < M; ++m) {
      j.y[(long)m * j.N + n + r] = T::hsum(tot[r][m]) + bias_term<T, BITS>(j, n + r, m, G);
    }
}

template <class T, int M, int BITS, int GS>
void int8_rows(const Job& j, int n0, int n1) {
  constexpr int R = int8_rows_for(M, T::kRegs);
  int n = n0;
  for (; n + R <= n1; n += R) int8_block<T, M, BITS, GS, R>(j, n);
  for (; n < n1; ++n) int8_block<T, M, BITS, GS, 1>(j, n);
}

template <class T, int M, int BITS>
RowsFn int8_pick_group(const Job& j) {
  if constexpr (T::B <= 32) {  // wider traits are never handed group 32 (gemv_avx512vnni.cpp)
    if (j.group == 32) return &int8_rows<T, M, BITS, 32>;
  }
  if (j.group == 64) return &int8_rows<T, M, BITS, 64>;
  return &int8_rows<T, M, BITS, 128>;
}

template <class T, int M>
RowsFn int8_pick_bits(const Job& j) {
  return j.bits == 8 ? int8_pick_group<T, M, 8>(j) : int8_pick_group<T, M, 4>(j);
}

template <class T>
void int8_run(const Job& j, int n0, int n1) {
  RowsFn fn = nullptr;
  switch (j.M) {
    case 1: fn = int8_pick_bits<T, 1>(j); break;
    case 2: fn = int8_pick_bits<T, 2>(j); break;
    case 3: fn = int8_pick_bits<T, 3>(j); break;
    case 4: fn = int8_pick_bits<T, 4>(j); break;
    case 5: fn = int8_pick_bits<T, 5>(j); break;
    case 6: fn = int8_pick_bits<T, 6>(j); break;
    case 7: fn = int8_pick_bits<T, 7>(j); break;
    default: fn = int8_pick_bits<T, 8>(j); break;
  }
  fn(j, n0, n1);
}

}  // namespace
}  // namespace mlxc::gemv

#endif
