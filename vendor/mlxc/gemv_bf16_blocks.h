// Blocks of 16 weight rows as bfloat16, for the kernels that multiply bf16 weights by bf16 x
// for any number of rows of x (gemv_amx.cpp on AMX tiles, gemv_avx512bf16.cpp with
// AVX512-BF16's vdpbf16ps): the weights as stored, or MLX's 4-/8-bit affine weights
// dequantized to bf16 a block at a time (a prompt's products).
//
// Included by those units only, after their `#pragma GCC target` and after the standard
// headers it uses (<algorithm>, <cstring>, <vector>): everything here has internal linkage and
// is compiled with AVX-512 F/BW/VL and AVX512-BF16, which only those units may use.
#ifndef MLXC_GEMV_BF16_BLOCKS_H
#define MLXC_GEMV_BF16_BLOCKS_H

#include <immintrin.h>

#include "gemv.h"

namespace mlxc::gemv {
namespace {

constexpr int kBlockRows = 16;  // weight rows of a block (the tiles' rows; the split's unit)

// The weight rows [n, n + 16) of a block: in place, a row's `stride` bytes apart, where all 16
// exist; else from `pad`, a zeroed copy of the rows that do (the kernels always read 16 rows).
struct RowBlock {
  const char* base;
  long stride;
};

inline RowBlock rows_of(const char* w, long row_bytes, int n, int N, std::vector<char>& pad) {
  if (n + kBlockRows <= N) return {w + (long)n * row_bytes, row_bytes};
  pad.assign((size_t)kBlockRows * row_bytes, 0);
  std::memcpy(pad.data(), w + (long)n * row_bytes, (size_t)(N - n) * row_bytes);
  return {pad.data(), row_bytes};
}

// The weights as stored (bf16): 16 rows in place, or a padded copy of the last short block.
struct DenseRows {
  std::vector<char> pad[2];
  RowBlock block(const Job& j, int n, int which) {
    return rows_of(static_cast<const char*>(j.w), (long)j.K * 2, n, j.N, pad[which]);
  }
};

// MLX's 4-/8-bit affine weights, 16 rows at a time dequantized to bf16 (w = s q + b in float32,
// rounded to nearest even): done once per block for all rows of x, so a prompt's products cost
// a copy of the block, in cache, where MLX's path wrote and read a float32 copy of the weight.
struct QuantizedRows {
  std::vector<uint16_t> buf[2];
  RowBlock block(const Job& j, int n, int which) {
    const int K = j.K, G = K / j.group, rows = std::min(kBlockRows, j.N - n);
    std::vector<uint16_t>& out = buf[which];
    out.assign((size_t)kBlockRows * K, 0);
    const uint8_t* q = static_cast<const uint8_t*>(j.w);
    for (int r = 0; r < rows; ++r) {
      const uint8_t* row = q + (long)(n + r) * K * j.bits / 8;
      uint16_t* o = out.data() + (long)r * K;
      for (int g = 0; g < G; ++g) {
        const __m512 s = _mm512_set1_ps(load_scalar(j.scales, j.skind, (long)(n + r) * G + g));
        const __m512 b = _mm512_set1_ps(load_scalar(j.biases, j.skind, (long)(n + r) * G + g));
        for (int i = 0; i < j.group; i += 16) {
          __m512i v;
          if (j.bits == 8) {
            v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * j.group + i)));
          } else {  // 8 bytes: values 2t (low nibble) and 2t + 1 (high) of byte t
            const __m128i p = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (g * j.group + i) / 2)));
            const __m128i lo = _mm_and_si128(p, _mm_set1_epi16(15)), hi = _mm_srli_epi16(p, 4);
            v = _mm512_cvtepu16_epi32(_mm256_set_m128i(_mm_unpackhi_epi16(lo, hi), _mm_unpacklo_epi16(lo, hi)));
          }
          const __m512 w = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(v), b);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + g * j.group + i), (__m256i)_mm512_cvtneps_pbh(w));
        }
      }
    }
    return {reinterpret_cast<const char*>(out.data()), (long)K * 2};
  }
};

}  // namespace
}  // namespace mlxc::gemv

#endif
