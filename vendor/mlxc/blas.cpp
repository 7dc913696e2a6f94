// Routing MLX's BLAS and LAPACK calls to an optimised library, in-process.
//
// MLX's Linux CPU wheel links a bundled netlib reference BLAS: its
// cblas_sgemm is a plain triple loop, ten times slower than OpenBLAS on a
// prompt. LD_PRELOAD would fix it but is not something a pip install can set.
// Exporting our own cblas_sgemm would only win if our extension were loaded
// before libmlx resolved its symbols, which fails whenever `mlx.core` (or
// anything else linking libmlx) was imported first. So we rebind instead:
// libmlx calls every external function through its GOT, one slot per
// relocation; we find the slots of the BLAS/LAPACK symbols in the loaded
// libmlx (dl_iterate_phdr + its dynamic section) and point them at the
// functions of the library we dlopen'd. This works whatever the load order
// and whether libmlx was bound lazily or at load time.
//
// cblas_sgemm goes through a thin wrapper that counts calls, so a test can
// prove that MLX's float32 matmul reached the routed library.

#include "internal.h"
#include "mlxc.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>
#define MLXC_CAN_ROUTE 1
#else
#define MLXC_CAN_ROUTE 0
#endif

namespace {

using sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int,
                          const float*, int, float, float*, int);
using threads_get_fn = int (*)(void);
using threads_set_fn = void (*)(int);

std::atomic<unsigned long long> sgemm_calls{0};
sgemm_fn routed_sgemm = nullptr;
threads_get_fn get_threads = nullptr;
threads_set_fn set_threads = nullptr;
std::string routed_library;  // empty: MLX's own (reference) BLAS is in use
int routed_symbols = 0;

// The symbols libmlx takes from BLAS/LAPACK (nm -D --undefined-only libmlx.so).
const char* const kRouted[] = {
    "cblas_sgemm", "cblas_dgemm", "cblas_cgemm", "sgetrf_", "dgetrf_",
    "sgetri_",     "dgetri_",     "strtri_",     "dtrtri_", "spotrf_",
    "dpotrf_",     "sgeqrf_",     "dgeqrf_",     "sorgqr_", "dorgqr_",
    "sgesdd_",     "dgesdd_",     "cgesdd_",     "sgeev_",  "dgeev_",
    "cgeev_",      "ssyevd_",     "dsyevd_",     "cheevd_",
};

void counting_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha,
                    const float* a, int lda, const float* b, int ldb, float beta,
                    float* c, int ldc) {
  sgemm_calls.fetch_add(1, std::memory_order_relaxed);
  routed_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

#if MLXC_CAN_ROUTE

struct Target {
  void* lib;
  std::string prefix;
  int patched = 0;
  bool found_libmlx = false;
};

void* resolve(Target& t, const char* name) {
  if (std::strcmp(name, "cblas_sgemm") == 0) {
    return reinterpret_cast<void*>(&counting_sgemm);
  }
  return dlsym(t.lib, (t.prefix + name).c_str());
}

// Dynamic-section pointers are absolute in memory on glibc, but relative to
// the load base where the loader left them untouched; accept both.
uintptr_t absolute(uintptr_t p, uintptr_t base) { return p < base ? p + base : p; }

void write_slot(void** slot, void* value) {
  long page = sysconf(_SC_PAGESIZE);
  uintptr_t start = reinterpret_cast<uintptr_t>(slot) & ~static_cast<uintptr_t>(page - 1);
  // The slot may sit in a RELRO page (bound at load): open it for the write.
  mprotect(reinterpret_cast<void*>(start), static_cast<size_t>(page), PROT_READ | PROT_WRITE);
  __atomic_store_n(slot, value, __ATOMIC_RELEASE);
}

void patch_relocs(Target& t, uintptr_t base, const ElfW(Rela)* rel, size_t bytes,
                  const ElfW(Sym)* symtab, const char* strtab) {
  for (size_t i = 0; i < bytes / sizeof(ElfW(Rela)); ++i) {
    const char* name = strtab + symtab[ELF64_R_SYM(rel[i].r_info)].st_name;
    for (const char* wanted : kRouted) {
      if (std::strcmp(name, wanted) != 0) continue;
      void* fn = resolve(t, name);
      if (fn == nullptr) break;
      write_slot(reinterpret_cast<void**>(base + rel[i].r_offset), fn);
      ++t.patched;
      break;
    }
  }
}

int patch_object(struct dl_phdr_info* info, size_t, void* data) {
  auto& t = *static_cast<Target*>(data);
  const char* slash = std::strrchr(info->dlpi_name, '/');
  const char* file = slash ? slash + 1 : info->dlpi_name;
  if (std::strncmp(file, "libmlx.", 7) != 0) return 0;
  t.found_libmlx = true;
  uintptr_t base = info->dlpi_addr;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type != PT_DYNAMIC) continue;
    auto* dyn = reinterpret_cast<const ElfW(Dyn)*>(base + info->dlpi_phdr[i].p_vaddr);
    uintptr_t symtab = 0, strtab = 0, jmprel = 0, rela = 0;
    size_t jmpsz = 0, relasz = 0;
    for (; dyn->d_tag != DT_NULL; ++dyn) {
      switch (dyn->d_tag) {
        case DT_SYMTAB: symtab = absolute(dyn->d_un.d_ptr, base); break;
        case DT_STRTAB: strtab = absolute(dyn->d_un.d_ptr, base); break;
        case DT_JMPREL: jmprel = absolute(dyn->d_un.d_ptr, base); break;
        case DT_PLTRELSZ: jmpsz = dyn->d_un.d_val; break;
        case DT_RELA: rela = absolute(dyn->d_un.d_ptr, base); break;
        case DT_RELASZ: relasz = dyn->d_un.d_val; break;
      }
    }
    auto* syms = reinterpret_cast<const ElfW(Sym)*>(symtab);
    auto* strs = reinterpret_cast<const char*>(strtab);
    if (jmprel) patch_relocs(t, base, reinterpret_cast<const ElfW(Rela)*>(jmprel), jmpsz, syms, strs);
    if (rela) patch_relocs(t, base, reinterpret_cast<const ElfW(Rela)*>(rela), relasz, syms, strs);
  }
  return 1;  // one libmlx is enough
}

#endif  // MLXC_CAN_ROUTE

}  // namespace

extern "C" {

int mlxc_blas_route(const char* path, const char* prefix) {
#if MLXC_CAN_ROUTE
  if (!routed_library.empty()) {
    if (routed_library == path) return 0;
    mlxc::set_last_error("MLX's BLAS is already routed to " + routed_library);
    return 1;
  }
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    mlxc::set_last_error(std::string("cannot load the BLAS library: ") + dlerror());
    return 1;
  }
  Target t{lib, prefix};
  auto sgemm = reinterpret_cast<sgemm_fn>(dlsym(lib, (t.prefix + "cblas_sgemm").c_str()));
  if (sgemm == nullptr) {
    mlxc::set_last_error(std::string(path) + " has no " + t.prefix + "cblas_sgemm");
    dlclose(lib);
    return 1;
  }
  routed_sgemm = sgemm;  // set before any slot points at the wrapper
  get_threads = reinterpret_cast<threads_get_fn>(dlsym(lib, (t.prefix + "openblas_get_num_threads").c_str()));
  set_threads = reinterpret_cast<threads_set_fn>(dlsym(lib, (t.prefix + "openblas_set_num_threads").c_str()));
  dl_iterate_phdr(&patch_object, &t);
  if (!t.found_libmlx || t.patched == 0) {
    mlxc::set_last_error(t.found_libmlx ? "libmlx makes no BLAS calls to route"
                                        : "libmlx is not loaded in this process");
    return 1;
  }
  routed_library = path;
  routed_symbols = t.patched;
  return 0;
#else
  (void)path;
  (void)prefix;
  mlxc::set_last_error("BLAS routing is implemented for Linux only");
  return 1;
#endif
}

const char* mlxc_blas_library(void) { return routed_library.c_str(); }
int mlxc_blas_routed_symbols(void) { return routed_symbols; }
unsigned long long mlxc_blas_sgemm_calls(void) {
  return sgemm_calls.load(std::memory_order_relaxed);
}
int mlxc_blas_threads(void) { return get_threads ? get_threads() : 1; }
int mlxc_blas_set_threads(int n) {
  if (set_threads == nullptr || n < 1) {
    mlxc::set_last_error(set_threads ? "the thread count must be at least 1"
                                     : "MLX's BLAS is not routed: its thread count is fixed");
    return 1;
  }
  set_threads(n);
  return 0;
}

}  // extern "C"
