// The int8 few-row kernels (gemv_int8.h) on AVX512-VNNI: vpdpbusd on 512 bits
// (64 u8 x s8 products a instruction), and on 256 bits for group size 32 (half
// a register). The float kernels stay those of gemv_avx512.cpp. This unit
// alone is compiled for these instructions; cpu_gemv.cpp calls it only where
// the CPU has them.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512vnni,avx512f,avx512bw,avx512vl,avx2,fma,f16c")
// GCC 12 flags the intrinsics' own undefined pass-through operands.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include "gemv_int8_ymm.h"

namespace mlxc::gemv {
namespace {

struct Zmm8 {
  static constexpr int B = 64;
  static constexpr int kRegs = 32;
  static constexpr int kOffset8 = 0;
  using Q = __m512i;
  using A = __m512i;
  using F = __m512;
  using L8 = L8x86;
  static A azero() { return _mm512_setzero_si512(); }
  static F fzero() { return _mm512_setzero_ps(); }
  static Q load_x(const int8_t* p) { return _mm512_loadu_si512(p); }
  static Q load_q8(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static Q load_q4(const uint8_t* p) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    __m512i t = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
    return _mm512_and_si512(t, _mm512_set1_epi8(15));
  }
  template <int BITS>
  static A dot(A acc, Q w, Q x) { return _mm512_dpbusd_epi32(acc, w, x); }
  static F fma(A acc, float s, F tot) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(s), tot); }
  static float hsum(F v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};

}  // namespace

void int8_rows_avx512vnni(const Job& j, int n0, int n1) {
  if (j.group == 32) {
    int8_run<Ymm8<kEvexVnni>>(j, n0, n1);
  } else {
    int8_run<Zmm8>(j, n0, n1);
  }
}

int int8_step_avx512vnni(int group) { return group == 32 ? 32 : 64; }

}  // namespace mlxc::gemv

#else  // not x86: never picked (cpu_gemv.cpp), defined so the table links

#include "gemv.h"

void mlxc::gemv::int8_rows_avx512vnni(const Job& j, int n0, int n1) { int8_rows_generic(j, n0, n1); }
int mlxc::gemv::int8_step_avx512vnni(int group) { return int8_step_generic(group); }

#endif
