// y = x W^T for bfloat16 x against bfloat16 weights (or 4-/8-bit ones dequantized to bf16 a
// block at a time), any number of rows of x, with AVX512-BF16's vdpbf16ps: the CPUs that
// have it but no AMX tiles (AMD Zen 4 and 5, Intel Cooper Lake). It takes the role
// gemv_amx.cpp has on AMX machines: every product of bf16 x, a prompt's and a decode step's.
//
// Why: past the few-row kernels' rows, a 16-bit model's prompt went to MLX's matmul, which
// converts x and the whole weight to float32 in memory and calls sgemm (on Zen, OpenBLAS's
// AVX2 kernel: 8 float32 products per instruction). vdpbf16ps takes 32 bf16 products per
// instruction, reading the weights as stored.
//
// Each output y[m, n] is one accumulator of 16 float32 lanes: lane i sums the products of
// values 32t + 2i and 32t + 2i + 1 over the runs t of 32 values, in order, then the lanes
// are added by one fixed reduction. Products of bf16 values are exact in float32, so this is
// the float32 sum of the exact products in a fixed order, the same for every output whatever
// the number of rows of x, its position in a register block and the pool's split: batching
// never changes a row's result. (vdpbf16ps treats subnormal bf16 inputs as zero, as the
// AMX instruction does.)
//
// Register blocks: 4 weight rows x 3-6 rows of x (up to 24 accumulators, 4 weight vectors and
// one of x: 29 of the 32 registers); 8 x 2 and 16 x 1 for fewer rows of x, so that a decode
// step's row has 16 sums in flight, not 4 (one accumulator's chain of vdpbf16ps is bound by
// the instruction's latency). The weight block (16 rows, gemv_bf16_blocks.h) sits in L1/L2
// while every row of x runs over it, so the weights are read from memory once.
#if defined(__x86_64__) && defined(__linux__)
// The standard headers come before the target pragma (see gemv_amx.cpp).
#include <algorithm>
#include <cstring>
#include <vector>

#include "gemv.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")
// GCC 12 flags the intrinsics' own undefined pass-through operands.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "gemv_bf16_blocks.h"

namespace mlxc::gemv {
namespace {

constexpr int kRowsX = 6;  // rows of x of a register block, at most
constexpr int PF = 512;  // bytes ahead a one- or two-row block prefetches each weight row (a decode step streams the weights)

// Weight rows of a register block with `mx` rows of x (a divisor of kBlockRows).
constexpr int rows_w(int mx) { return mx == 1 ? 16 : mx == 2 ? 8 : 4; }

// The one reduction of an accumulator's 16 lanes (fixed order: halves, then pairs).
inline float lanes_sum(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y[m0 .. m0 + MX) x [n .. n + rows) from the block's weight rows `w` (a row `stride` bytes
// apart) and x's rows from m0; `rows` <= R of them stored (the rest are padding).
template <int MX, int R = rows_w(MX)>
inline void block(const Job& j, const char* w, long stride, int m0, int n, int rows) {
  const long K = j.K;
  __m512 acc[R][MX];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm512_setzero_ps();
  const uint16_t* x = j.xbf + (long)m0 * K;
  for (long k = 0; k < K; k += 32) {
    __m512bh wv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      wv[r] = (__m512bh)_mm512_loadu_si512(w + r * stride + k * 2);
      if constexpr (MX <= 2) _mm_prefetch(w + r * stride + k * 2 + PF, _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MX; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
    }
  }
  for (int m = 0; m < MX; ++m) {
    float* y = j.y + (long)(m0 + m) * j.N + n;
    for (int r = 0; r < rows; ++r) y[r] = lanes_sum(acc[r][m]);
  }
}

void block_rows(const Job& j, const char* w, long stride, int m0, int mx, int n, int rows) {
  switch (mx) {
    case 1: return block<1>(j, w, stride, m0, n, rows);
    case 2: return block<2>(j, w, stride, m0, n, rows);
    case 3: return block<3>(j, w, stride, m0, n, rows);
    case 4: return block<4>(j, w, stride, m0, n, rows);
    case 5: return block<5>(j, w, stride, m0, n, rows);
    default: return block<6>(j, w, stride, m0, n, rows);
  }
}

// Output rows [n0, n1) of j (n0 a multiple of 16): each block of 16 weight rows, every row
// of x over it, kRowsX at a time, a register block of its weight rows after another.
template <class Rows>
void bf16_rows(const Job& j, int n0, int n1) {
  Rows src;  // its buffers live for the call: a pool thread keeps no memory between calls
  for (int n = n0; n < n1; n += kBlockRows) {
    const RowBlock b = src.block(j, n, 0);
    const int in_block = std::min(kBlockRows, n1 - n);
    for (int m0 = 0; m0 < j.M; m0 += kRowsX) {
      const int mx = std::min(kRowsX, j.M - m0);
      const int rw = rows_w(mx);
      for (int r = 0; r < in_block; r += rw) {
        block_rows(j, b.base + r * b.stride, b.stride, m0, mx, n + r, std::min(rw, in_block - r));
      }
    }
  }
}

}  // namespace

bool avx512bf16_available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
                         __builtin_cpu_supports("fma");
  return ok;
}

void avx512bf16_rows(const Job& j, int n0, int n1) { bf16_rows<DenseRows>(j, n0, n1); }

void avx512bf16_qrows(const Job& j, int n0, int n1) { bf16_rows<QuantizedRows>(j, n0, n1); }

}  // namespace mlxc::gemv

#else  // not x86-64 Linux: never available, defined so the table links

#include "gemv.h"

bool mlxc::gemv::avx512bf16_available() { return false; }
void mlxc::gemv::avx512bf16_rows(const Job&, int, int) {}
void mlxc::gemv::avx512bf16_qrows(const Job&, int, int) {}

#endif
