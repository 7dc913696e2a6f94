// Shared between the C++ sources of mlxc (not part of the C ABI).
#ifndef MLXC_INTERNAL_H
#define MLXC_INTERNAL_H

#include <optional>
#include <string>

#include "mlx/array.h"

namespace mlxc {
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

// A leaf array on `a`'s buffer that does not hold it, for readers that must not
// keep MLX from writing `a` in place (buffer_view.cpp); nullopt unless `a` is a
// whole evaluated row-contiguous buffer.
std::optional<mlx::core::array> buffer_view(const mlx::core::array& a);
}  // namespace mlxc

#endif
