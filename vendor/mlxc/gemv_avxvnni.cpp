// The int8 few-row kernels (gemv_int8.h) on AVX-VNNI: vpdpbusd on 256 bits,
// VEX-encoded (CPUs with AVX-VNNI but not AVX512-VNNI: Alder Lake and later
// client cores). The float kernels stay those of gemv_avx2.cpp. This unit
// alone is compiled for these instructions; cpu_gemv.cpp calls it only where
// the CPU has them.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avxvnni,avx2,fma,f16c")

#include <immintrin.h>

#include "gemv_int8_ymm.h"

namespace mlxc::gemv {

void int8_rows_avxvnni(const Job& j, int n0, int n1) { int8_run<Ymm8<kAvxVnni>>(j, n0, n1); }
int int8_step_avxvnni(int) { return 32; }

}  // namespace mlxc::gemv

#else  // not x86: never picked (cpu_gemv.cpp), defined so the table links

#include "gemv.h"

void mlxc::gemv::int8_rows_avxvnni(const Job& j, int n0, int n1) { int8_rows_generic(j, n0, n1); }
int mlxc::gemv::int8_step_avxvnni(int group) { return int8_step_generic(group); }

#endif
