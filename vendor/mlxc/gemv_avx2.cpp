// The few-row matmul kernels for AVX2 + FMA + F16C (8 floats a vector), and
// the int8 ones on vpmaddubsw (gemv_int8_ymm.h).
// This unit alone is compiled for those instructions; cpu_gemv.cpp calls it
// only where the CPU has them.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include "gemv_impl.h"
#include "gemv_int8_ymm.h"

namespace mlxc::gemv {
namespace {

struct Avx2 {
  static constexpr int W = 8;
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  template <int WK>
  static V load_w(const void* row, long k) {
    if constexpr (WK == F32) {
      return _mm256_loadu_ps(static_cast<const float*>(row) + k);
    } else {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + k));
      if constexpr (WK == F16) return _mm256_cvtph_ps(h);
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  static V load_q8(const uint8_t* row, long k) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  }
  static V load_q4(const uint8_t* bytes, bool high) {
    __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    e = high ? _mm256_srli_epi32(e, 4) : _mm256_and_si256(e, _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(e);
  }
};

}  // namespace

void rows_avx2(const Job& j, int n0, int n1) { rows<Avx2>(j, n0, n1); }
void int8_rows_avx2(const Job& j, int n0, int n1) { int8_run<Ymm8<kMaddubs>>(j, n0, n1); }
int int8_step_avx2(int) { return 32; }

}  // namespace mlxc::gemv

#else  // not x86: never picked (cpu_gemv.cpp), defined so the table links

#include "gemv.h"

void mlxc::gemv::rows_avx2(const Job& j, int n0, int n1) { rows_generic(j, n0, n1); }
void mlxc::gemv::int8_rows_avx2(const Job& j, int n0, int n1) { int8_rows_generic(j, n0, n1); }
int mlxc::gemv::int8_step_avx2(int group) { return int8_step_generic(group); }

#endif
