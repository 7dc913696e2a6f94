// The few-row matmul kernels in portable scalar code: the fallback for CPUs
// without AVX2 (and for other architectures).
#include "gemv_impl.h"

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

}  // namespace

void rows_generic(const Job& j, int n0, int n1) { rows<Scalar>(j, n0, n1); }

}  // namespace mlxc::gemv
