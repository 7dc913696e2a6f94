// The few-row matmul kernels in portable scalar code: the fallback for CPUs
// without AVX2 (and for other architectures), float (gemv_impl.h) and int8
// (gemv_int8.h).
#include "gemv_impl.h"
#include "gemv_int8.h"

namespace mlxc::gemv {
namespace {

struct Scalar {
  static constexpr int W = 1;
  using V = float;
  static V zero() { return 0.0f; }
  static V set1(float f) { return f; }
  static V load(const float* p) { return *p; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static float hsum(V v) { return v; }
  template <int WK>
  static V load_w(const void* row, long k) { return load_scalar(row, WK, k); }
  static V load_q8(const uint8_t* row, long k) { return static_cast<float>(row[k]); }
  static V load_q4(const uint8_t* bytes, bool high) { return static_cast<float>(high ? bytes[0] >> 4 : bytes[0] & 15); }
};

struct L8Scalar {
  struct S {
    float v[8];
  };
  static S zero() { return S{}; }
  static S set1(float f) {
    S s;
    for (float& e : s.v) e = f;
    return s;
  }
  static S loadf(const float* p) {
    S s;
    for (int i = 0; i < 8; ++i) s.v[i] = p[i];
    return s;
  }
  static S load_scales(const void* p, int kind, long i) {
    S s;
    for (int t = 0; t < 8; ++t) s.v[t] = load_scalar(p, kind, i + t);
    return s;
  }
  static S mul(S a, const S& b) {
    for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static S fma(const S& a, const S& b, S c) {
    for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static void store(float* p, const S& s) {
    for (int i = 0; i < 8; ++i) p[i] = s.v[i];
  }
  static float hsum(const S& s) {
    float t = 0.0f;
    for (float e : s.v) t += e;
    return t;
  }
};

// 32 bytes a step, as the 256-bit units take them (so x's 4-bit order is theirs).
struct Scalar8 {
  static constexpr int B = 32;
  static constexpr int kRegs = 1 << 10;  // no registers to run out of: the compiler decides
  static constexpr int kOffset8 = 0;
  struct Q {
    uint8_t v[32];
  };
  using A = int32_t;
  using F = float;
  using L8 = L8Scalar;
  static A azero() { return 0; }
  static F fzero() { return 0.0f; }
  static Q load_x(const int8_t* p) {
    Q q;
    __builtin_memcpy(q.v, p, 32);
    return q;
  }
  static Q load_q8(const uint8_t* p) {
    Q q;
    __builtin_memcpy(q.v, p, 32);
    return q;
  }
  static Q load_q4(const uint8_t* p) {
    Q q;
    for (int i = 0; i < 16; ++i) q.v[i] = p[i] & 15, q.v[16 + i] = p[i] >> 4;
    return q;
  }
  template <int BITS>
  static A dot(A acc, const Q& w, const Q& x) {
    for (int i = 0; i < 32; ++i) acc += (int32_t)w.v[i] * (int32_t)(int8_t)x.v[i];
    return acc;
  }
  static F fma(A acc, float s, F tot) { return (float)acc * s + tot; }
  static float hsum(F v) { return v; }
};

}  // namespace

void rows_generic(const Job& j, int n0, int n1) { rows<Scalar>(j, n0, n1); }
void int8_rows_generic(const Job& j, int n0, int n1) { int8_run<Scalar8>(j, n0, n1); }
int int8_step_generic(int) { return 32; }

}  // namespace mlxc::gemv
