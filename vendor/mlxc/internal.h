// Shared between the C++ sources of mlxc (not part of the C ABI).
#ifndef MLXC_INTERNAL_H
#define MLXC_INTERNAL_H

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>
#include <string>

#include "mlx/array.h"
#include "mlx/stream.h"

// What an mlxc_array handle addresses (mlxc.h: handles are integers on the C ABI).
struct mlxc_array_s {
  mlx::core::array a;
};

namespace mlxc {
// The array a handle holds (never 0 here: callers check optional handles first).
inline mlx::core::array& arr(uintptr_t h) { return reinterpret_cast<mlxc_array_s*>(h)->a; }
// A new handle owning `a`.
inline uintptr_t new_handle(mlx::core::array a) {
  return reinterpret_cast<uintptr_t>(new mlxc_array_s{std::move(a)});
}
// Frees a handle made by new_handle.
inline void free_handle(uintptr_t h) { delete reinterpret_cast<mlxc_array_s*>(h); }

// A new array holding a copy of `nbytes` of host data, copied by the GPU's copy engine
// where MLX runs on CUDA, else by the CPU (device_copy.cpp).
mlx::core::array upload(const void* data, mlx::core::Shape shape, mlx::core::Dtype dtype, size_t nbytes);
// Whether `upload` copies with the CUDA driver here.
bool upload_by_driver();
// Page-locked host memory from the CUDA driver (device_copy.cpp): nullptr where
// upload_by_driver() is false or the driver refused.
void* pinned_alloc(size_t nbytes);
void pinned_free(void* p);

// Sets the thread-local text that mlxc_last_error() returns.
void set_last_error(const std::string& message);

// x W^T for 1..8 rows of x on the CPU (cpu_gemv.cpp). Dense when bits == 0
// (w: (out, in) float32/float16/bfloat16); otherwise MLX's affine packing of
// `bits` bits with scales_biases[0..1] of shape (out, in / group); then
// `int8` rounds x to int8 per group and multiplies on bytes (gemv_int8.h).
mlx::core::array cpu_gemv(const mlx::core::array& x, const mlx::core::array& w,
                          const mlx::core::array* scales_biases, int bits, int group, bool int8 = false);

// MLX's affine 4-/8-bit packing of w (out, in * bits / 32) back to float32
// (out, in) on the CPU, on the kernels' threads (cpu_gemv.cpp).
mlx::core::array cpu_dequantize(const mlx::core::array& w, const mlx::core::array& scales,
                                const mlx::core::array& biases, int bits, int group);

// The few-row kernels' code for a float32 / float16 / bfloat16 dtype (mlxc::gemv::Kind, for
// gemv.h's load_scalar); std::invalid_argument for any other (cpu_gemv.cpp).
int float_kind(const mlx::core::Dtype& d);

// f(0) .. f(parts - 1) on the CPU kernels' pool of threads (cpu_gemv.cpp); on the
// calling thread alone where another stream holds the pool.
void parallel_for(int parts, const std::function<void(int)>& f);

// The decode step's fused CPU kernels (cpu_step.cpp), what amlx/models/decode_attention.py
// and step_kernels.py compute on CUDA. Attention: (out (B, H*D), kv_new (2, B, KVH, 1, D));
// kv a contiguous cache (2, B, KVH, capacity, D) or, with `table`, a block pool (2, blocks,
// KVH, block_size, D), quantized (uint32, with scales and biases) where scales != nullptr.
std::vector<mlx::core::array> cpu_decode_attention(
    const mlx::core::array& qkv, const mlx::core::array* q_norm, const mlx::core::array* k_norm,
    const mlx::core::array& inv_freq, const mlx::core::array& kv, const mlx::core::array* scales,
    const mlx::core::array* biases, const mlx::core::array& pos, const mlx::core::array* table, int heads,
    float scale, int window, float eps, int bits, int group);
// (x + y', rms_norm(x + y') * w), y' = y, or rms_norm(y) * pre_w where pre_w != nullptr.
std::vector<mlx::core::array> cpu_residual_norm(const mlx::core::array& x, const mlx::core::array& y,
                                                const mlx::core::array& w, float eps,
                                                const mlx::core::array* pre_w, float pre_eps);
// act(gate) * up of gate_up (N, 2I) = [gate | up]; act 0: silu, 1: gelu (tanh).
mlx::core::array cpu_gated_activation(const mlx::core::array& gate_up, int act);
// An evaluated array's data row-major: its own buffer, or a packed copy in `tmp` where it is
// a strided view (cpu_step.cpp).
const void* row_major(const mlx::core::array& a, std::vector<char>& tmp);
// n bfloat16 values (their bits) as float32, vectorized where the CPU allows (cpu_step.cpp).
void bf16_to_floats(const uint16_t* bits, float* dst, long n);
// Whether d is float32, float16 or bfloat16 (cpu_step.cpp).
bool is_float(const mlx::core::Dtype& d);
// The default stream, checked to be the CPU's: std::invalid_argument "<what> runs on the CPU
// only" otherwise (cpu_step.cpp).
mlx::core::Stream cpu_stream(const char* what);

// A prompt's attention (cpu_attention.cpp): q (B, H, L, D) at positions [end - L, end) against
// keys and values (B, KVH, end, D), causal, at most `window` back where window > 0, in float32;
// (B, L, H, D) in q's dtype.
mlx::core::array cpu_prefill_attention(const mlx::core::array& q, const mlx::core::array& keys,
                                       const mlx::core::array& values, float scale, int window);

// A leaf array on `a`'s buffer that does not hold it, for readers that must not
// keep MLX from writing `a` in place (buffer_view.cpp); nullopt unless `a` is a
// whole evaluated row-contiguous buffer.
std::optional<mlx::core::array> buffer_view(const mlx::core::array& a);
}  // namespace mlxc

#endif
