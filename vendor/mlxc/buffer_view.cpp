// A read-only handle on an evaluated array's buffer that does not hold the buffer
// (amlx.kv.paged: what the CUDA decode kernel reads the KV block pool through).
//
// MLX writes a scatter's input in place only when nothing else holds its data,
// and a GPU command buffer holds the data of every kernel input until the buffer
// completes. The decode kernel reads a layer's pool before the step's write into
// it (it hands back the new key and value to write), and the engine launches a
// step before the previous one is read: either way the pool's data was held
// when the scatter ran, so every decode step copied each layer's whole pool
// (benchmarks/pool_write.py). Reading through this handle instead leaves the
// pool's own data held by the pool alone, so the write happens in place.
//
// The handle is a leaf array with a data record of its own that does not own
// the memory (freeing it frees nothing, and MLX never donates a buffer that is
// not owned). It carries no dependency on the array it was taken from, so it is
// only for readers on that array's stream, launched after it (stream order
// makes them see its contents), and only while that array's buffer lives: the
// pool keeps it between steps, and a pool that grows waits for its copy first.

#include <optional>

#include "internal.h"
#include "mlx/allocator.h"

namespace mx = mlx::core;

std::optional<mx::array> mlxc::buffer_view(const mx::array& a) {
  // (only a whole, evaluated, row-contiguous buffer: a broadcast or a slice has other strides)
  if (a.status() == mx::array::Status::unscheduled || a.data_shared_ptr() == nullptr ||
      !a.flags().row_contiguous || a.data_size() != a.size() || a.offset() != 0) {
    return std::nullopt;
  }
  return mx::array(mx::allocator::Data(a.buffer(), [](mx::allocator::Buffer) {}), a.shape(), a.dtype());
}
