// The 256-bit traits of the int8 kernels (gemv_int8.h), for the units that
// include it after their own `#pragma GCC target` and <immintrin.h>:
// gemv_avx2.cpp (DOT = kMaddubs), gemv_avxvnni.cpp (kAvxVnni) and
// gemv_avx512vnni.cpp (kEvexVnni, for group size 32, which half a 512-bit
// register holds). Only the branch of the unit's DOT is ever instantiated.
#ifndef MLXC_GEMV_INT8_YMM_H
#define MLXC_GEMV_INT8_YMM_H

#include "gemv_int8.h"

namespace mlxc::gemv {
namespace {

enum YmmDot { kMaddubs, kAvxVnni, kEvexVnni };

// 8 floats (AVX + F16C): the int8 kernels' per-group scalars, in every x86 unit.
struct L8x86 {
  using S = __m256;
  static S zero() { return _mm256_setzero_ps(); }
  static S set1(float f) { return _mm256_set1_ps(f); }
  static S loadf(const float* p) { return _mm256_loadu_ps(p); }
  static S load_scales(const void* p, int kind, long i) {
    if (kind == F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if (kind == F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static S mul(S a, S b) { return _mm256_mul_ps(a, b); }
  static S fma(S a, S b, S c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, S v) { _mm256_storeu_ps(p, v); }
  static float hsum(S v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

template <int DOT>
struct Ymm8 {
  static constexpr int B = 32;
  static constexpr int kRegs = DOT == kEvexVnni ? 32 : 16;
  // vpmaddubsw adds pairs of u8 x s8 products into saturating int16: 255 * 127 * 2
  // would overflow, so 8-bit weights go in as w - 128 (see dot).
  static constexpr int kOffset8 = DOT == kMaddubs ? 128 : 0;
  using Q = __m256i;
  using A = __m256i;
  using F = __m256;
  using L8 = L8x86;
  static A azero() { return _mm256_setzero_si256(); }
  static F fzero() { return _mm256_setzero_ps(); }
  static Q load_x(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static Q load_q8(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static Q load_q4(const uint8_t* p) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    __m256i t = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
    return _mm256_and_si256(t, _mm256_set1_epi8(15));
  }
  template <int BITS>
  static A dot(A acc, Q w, Q x) {
    if constexpr (DOT == kEvexVnni) {
      return _mm256_dpbusd_epi32(acc, w, x);
    } else if constexpr (DOT == kAvxVnni) {
      return _mm256_dpbusd_avx_epi32(acc, w, x);
    } else {
      const __m256i ones = _mm256_set1_epi16(1);
      if constexpr (BITS == 8) {
        // (w - 128) * x as |w - 128| (at most 128, a u8) times x with w - 128's sign
        // (|x| <= 127): a pair sums to at most 2 * 128 * 127 < 2^15
        __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
        __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(ws, ws), _mm256_sign_epi8(x, ws));
        return _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
      } else {  // nibbles: a pair is at most 2 * 15 * 127
        return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
      }
    }
  }
  static F fma(A acc, float s, F tot) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s), tot); }
  static float hsum(F v) { return L8x86::hsum(v); }
};

}  // namespace
}  // namespace mlxc::gemv

#endif
