// Host data copied into a new array by the GPU's copy engine (mlxc_array_upload).
//
// On CUDA, MLX gives an array made from host data a buffer of managed memory and
// copies into it with the CPU. A buffer out of MLX's cache was last read by the
// GPU, so its pages live there: each page the CPU writes faults back to the host,
// and the kernel that reads the array faults it over again. A step's token masks
// (64 rows of Gemma's 262,144 tokens: 2 MB) took 0.62 ms to make on an H100 where
// a buffer the GPU had not touched took 0.16 (benchmarks/README.md). The driver's
// copy writes the pages wherever they are, with no faults on either side.
//
// The driver API is reached through dlopen (libcuda.so.1, loaded already by MLX's
// CUDA runtime): amlx builds against MLX's headers alone, with no CUDA toolkit,
// and the same extension runs where there is no GPU. Anything missing (no CUDA, no
// driver, a failed call) falls back to the CPU copy: the result is the same array.

#include <dlfcn.h>

#include <cstring>

#include "internal.h"
#include "mlx/allocator.h"
#include "mlx/backend/cuda/cuda.h"
#include "mlx/device.h"

namespace mx = mlx::core;

namespace {

// The few driver API types and entry points used, as cuda.h declares them.
using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUstream = void*;
using CUdeviceptr = unsigned long long;
constexpr unsigned kStreamNonBlocking = 1;  // CU_STREAM_NON_BLOCKING

struct Driver {
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*ctx_set_current)(CUcontext) = nullptr;
  CUresult (*primary_ctx_retain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*stream_create)(CUstream*, unsigned) = nullptr;
  CUresult (*stream_synchronize)(CUstream) = nullptr;
  CUresult (*copy_htod_async)(CUdeviceptr, const void*, size_t, CUstream) = nullptr;
  CUresult (*host_alloc)(void**, size_t, unsigned) = nullptr;
  CUresult (*free_host)(void*) = nullptr;
};
constexpr unsigned kHostAllocPortable = 1;  // CU_MEMHOSTALLOC_PORTABLE: pinned for every context

// The driver's entry points, or nullptr where MLX runs without CUDA (looked up once).
const Driver* driver() {
  static const Driver* d = []() -> const Driver* {
    if (!mx::cu::is_available() || !mx::is_available(mx::Device(mx::Device::gpu))) return nullptr;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return nullptr;
    static Driver found;
    found.ctx_get_current = reinterpret_cast<decltype(found.ctx_get_current)>(dlsym(lib, "cuCtxGetCurrent"));
    found.ctx_set_current = reinterpret_cast<decltype(found.ctx_set_current)>(dlsym(lib, "cuCtxSetCurrent"));
    found.primary_ctx_retain =
        reinterpret_cast<decltype(found.primary_ctx_retain)>(dlsym(lib, "cuDevicePrimaryCtxRetain"));
    found.stream_create = reinterpret_cast<decltype(found.stream_create)>(dlsym(lib, "cuStreamCreate"));
    found.stream_synchronize =
        reinterpret_cast<decltype(found.stream_synchronize)>(dlsym(lib, "cuStreamSynchronize"));
    found.copy_htod_async =
        reinterpret_cast<decltype(found.copy_htod_async)>(dlsym(lib, "cuMemcpyHtoDAsync_v2"));
    found.host_alloc = reinterpret_cast<decltype(found.host_alloc)>(dlsym(lib, "cuMemHostAlloc"));
    found.free_host = reinterpret_cast<decltype(found.free_host)>(dlsym(lib, "cuMemFreeHost"));
    bool complete = found.host_alloc && found.free_host && found.ctx_get_current && found.ctx_set_current && found.primary_ctx_retain &&
                    found.stream_create && found.stream_synchronize && found.copy_htod_async;
    return complete ? &found : nullptr;
  }();
  return d;
}

// Makes the primary context of device 0 (MLX's) current where this thread has none.
bool with_context(const Driver& d) {
  CUcontext ctx = nullptr;
  if (d.ctx_get_current(&ctx) != 0) return false;
  return ctx != nullptr || (d.primary_ctx_retain(&ctx, 0) == 0 && d.ctx_set_current(ctx) == 0);
}

// This thread's copy stream: non-blocking, so a copy does not wait for the kernels
// MLX has queued (the step running meanwhile). Made once a thread.
CUstream thread_stream(const Driver& d) {
  thread_local CUstream stream = nullptr;
  thread_local bool failed = false;
  if (stream != nullptr || failed) return stream;
  failed = true;
  if (!with_context(d)) return nullptr;
  if (d.stream_create(&stream, kStreamNonBlocking) != 0) {
    stream = nullptr;
    return nullptr;
  }
  failed = false;
  return stream;
}

// Copies n bytes of host memory to dst (managed memory) with the driver; false where
// it could not (the caller copies on the CPU instead).
bool driver_copy(void* dst, const void* src, size_t n) {
  const Driver* d = driver();
  if (d == nullptr || mx::default_device().type != mx::Device::gpu) return false;
  CUstream stream = thread_stream(*d);
  if (stream == nullptr) return false;
  // (synchronized before the array exists: no MLX kernel can read it half written)
  return d->copy_htod_async(reinterpret_cast<CUdeviceptr>(dst), src, n, stream) == 0 &&
         d->stream_synchronize(stream) == 0;
}

}  // namespace

mx::array mlxc::upload(const void* data, mx::Shape shape, mx::Dtype dtype, size_t nbytes) {
  auto buffer = mx::allocator::malloc(nbytes);
  void* dst = buffer.buffer().raw_ptr();
  if (!driver_copy(dst, data, nbytes)) std::memcpy(dst, data, nbytes);
  return mx::array(std::move(buffer), std::move(shape), dtype);
}

bool mlxc::upload_by_driver() {
  return driver() != nullptr;
}

// From pageable memory the driver stages the copy through its own pinned buffer with
// the CPU, and on an H100 the worker's kernel launches meanwhile slowed by as much as
// the copy saved. From page-locked memory it is the copy engine's DMA alone.
void* mlxc::pinned_alloc(size_t nbytes) {
  const Driver* d = driver();
  void* p = nullptr;
  if (d == nullptr || nbytes == 0 || !with_context(*d) || d->host_alloc(&p, nbytes, kHostAllocPortable) != 0)
    return nullptr;
  return p;
}

void mlxc::pinned_free(void* p) {
  const Driver* d = driver();
  if (d != nullptr && p != nullptr && with_context(*d)) d->free_host(p);
}
