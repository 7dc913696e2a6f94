// Few-row matmuls on the CPU (y = x W^T for M <= 8 rows of x): the shared
// description of a job and the per-instruction-set entry points.
//
// The kernels are compiled once per instruction set, each in its own
// translation unit with its own target (gemv_avx512.cpp, gemv_avx2.cpp,
// gemv_generic.cpp), from the template in gemv_impl.h; cpu_gemv.cpp picks one
// at run time. Those units include nothing but this header, gemv_impl.h and
// the intrinsics, so no inline function of a shared header is ever compiled
// with instructions the machine may lack.
#ifndef MLXC_GEMV_H
#define MLXC_GEMV_H

#include <stdint.h>

namespace mlxc::gemv {

enum Kind { F32 = 0, F16 = 1, BF16 = 2 };

constexpr int kMaxRows = 8;  // rows of x one job handles

struct Job {
  const float* x;      // M x K, float32, row-major (4-bit: permuted, see gemv_impl.h)
  const uint16_t* xbf;  // the AMX kernels' x instead: M x K bfloat16, row-major
  int M, K, N;
  const void* w;       // dense: N x K of `wkind`; quantized: N x K*bits/32 uint32
  int wkind;           // Kind of a dense weight
  int bits;            // 0: dense; 4 or 8: MLX affine quantization
  int group;           // quantization group size (32, 64, 128)
  const void* scales;  // N x K/group of `skind`
  const void* biases;  // N x K/group of `skind`
  int skind;
  const float* xsum;   // M x K/group: each group's sum of x (quantized only; int8: of the rounded x)
  float* y;            // M x N, float32
  // The int8 kernels (gemv_int8.h) only: x rounded to int8 per group (4-bit:
  // permuted in runs of int8_step(group), see cpu_gemv.cpp), each group's
  // scale (x ~= xd * xq) and the integer sum of its xq.
  const int8_t* xq;
  const float* xd;     // M x K/group
  const int32_t* xqsum;  // M x K/group
};

// Output rows [n0, n1) of `job`.
using RowsFn = void (*)(const Job& job, int n0, int n1);

void rows_generic(const Job& job, int n0, int n1);
void rows_avx2(const Job& job, int n0, int n1);
void rows_avx512(const Job& job, int n0, int n1);

// Quantized weights against int8 x (gemv_int8.h): the same job with xq, xd
// and xqsum filled in. int8_step_*(group) is the bytes of x one step of the
// kernel reads: cpu_gemv.cpp permutes a 4-bit job's x in runs of that length.
void int8_rows_generic(const Job& job, int n0, int n1);
void int8_rows_avx2(const Job& job, int n0, int n1);        // vpmaddubsw + vpmaddwd
void int8_rows_avxvnni(const Job& job, int n0, int n1);     // AVX-VNNI, 256 bits
void int8_rows_avx512vnni(const Job& job, int n0, int n1);  // AVX512-VNNI, 512 bits
int int8_step_generic(int group);
int int8_step_avx2(int group);
int int8_step_avxvnni(int group);
int int8_step_avx512vnni(int group);

// Intel AMX (gemv_amx.cpp), for any M: bfloat16 weights against bfloat16 x (Job::xbf). Only where amx_available(), which also asks
// the OS for the tile state; n0 a multiple of 16 (blocks of 16 weight rows, aligned to
// the weight, so a row's arithmetic never depends on the split).
bool amx_available();
void amx_bf16_rows(const Job& job, int n0, int n1);
void amx_qbf16_rows(const Job& job, int n0, int n1);  // 4-/8-bit weights, dequantized to bf16 per block

// AVX512-BF16 (gemv_avx512bf16.cpp), for any M, the same jobs as the AMX kernels take, where
// the CPU has vdpbf16ps but no tiles (AMD Zen 4/5); n0 a multiple of 16 likewise.
bool avx512bf16_available();
void avx512bf16_rows(const Job& job, int n0, int n1);
void avx512bf16_qrows(const Job& job, int n0, int n1);  // 4-/8-bit weights, dequantized to bf16 per block

// Internal linkage: each per-instruction-set unit keeps its own copy (one
// compiled with AVX-512 must never stand in for the generic unit's).
namespace {

// A half's bits as a float (no instruction needed: the generic unit uses it).
inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: man * 2^-24
    float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline float load_scalar(const void* p, int kind, long i) {
  switch (kind) {
    case F16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

}  // namespace
}  // namespace mlxc::gemv

#endif
