// glibc malloc tuned at load so a step's large temporaries reuse memory.
//
// MLX's CPU allocator keeps at most 32 MB of freed buffers (its cache limit)
// and hands the rest back to malloc. glibc maps a large block with mmap (above
// a threshold that starts at 128 KB) and unmaps it on free, and returns the
// free top of its heaps to the kernel beyond a trim threshold: either way the
// next step's buffers are fresh pages, which the kernel zeroes on first touch
// (perf once showed that clearing at 31% of a decode step). Raising both
// thresholds once, when this library loads, keeps that memory in the process
// for reuse; the price is up to kTrim bytes of freed memory held, not returned.
//
// AMLX_MALLOC_TUNING=0 leaves malloc as it is.
#include <cstdlib>  // first: it defines __GLIBC__
#include <cstring>
#if defined(__linux__) && defined(__GLIBC__)
#include <malloc.h>
#endif

namespace {

constexpr int kMmap = 32 << 20;   // glibc's largest mmap threshold on 64-bit
constexpr int kTrim = 512 << 20;

int tuned = 0;

__attribute__((constructor)) void tune_malloc() {
#if defined(__linux__) && defined(__GLIBC__)
  const char* off = std::getenv("AMLX_MALLOC_TUNING");
  if (off != nullptr && std::strcmp(off, "0") == 0) return;
  tuned = mallopt(M_MMAP_THRESHOLD, kMmap) == 1 && mallopt(M_TRIM_THRESHOLD, kTrim) == 1;
#endif
}

}  // namespace

extern "C" int mlxc_malloc_tuned(void) { return tuned; }
