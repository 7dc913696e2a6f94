// The few-row matmul kernels for AVX-512 (F, BW, VL) + FMA + F16C (16 floats
// a vector). This unit alone is compiled for those instructions; cpu_gemv.cpp
// calls it only where the CPU has them.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
// GCC 12 flags the intrinsics' own undefined pass-through operands.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include "gemv_impl.h"

namespace mlxc::gemv {
namespace {

struct Avx512 {
  static constexpr int W = 16;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float hsum(V v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  template <int WK>
  static V load_w(const void* row, long k) {
    if constexpr (WK == F32) {
      return _mm512_loadu_ps(static_cast<const float*>(row) + k);
    } else {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + k));
      if constexpr (WK == F16) return _mm512_cvtph_ps(h);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
  static V load_q8(const uint8_t* row, long k) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
  }
  static V load_q4(const uint8_t* bytes, bool high) {
    __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    e = high ? _mm512_srli_epi32(e, 4) : _mm512_and_si512(e, _mm512_set1_epi32(15));
    return _mm512_cvtepi32_ps(e);
  }
};

}  // namespace

void rows_avx512(const Job& j, int n0, int n1) { rows<Avx512>(j, n0, n1); }

}  // namespace mlxc::gemv

#else  // not x86: never picked (cpu_gemv.cpp), defined so the table links

#include "gemv.h"

void mlxc::gemv::rows_avx512(const Job& j, int n0, int n1) { rows_generic(j, n0, n1); }

#endif
