// mlxc distributed: MLX's collective communication (mlx::core::distributed)
// behind the C ABI declared in mlxc.h's "distributed" block.
//
// It lives apart from mlxc.cpp so that the tensor-parallel work stays in one
// file. It follows mlxc.cpp's conventions (int status, no C++ exception
// crossing the ABI) but keeps its own thread-local error text, read with
// mlxc_distributed_last_error(): mlxc.cpp's is private to that file.

#include "mlxc.h"
#include "internal.h"

#include <string>

#include "mlx/mlx.h"
#include "mlx/distributed/distributed.h"
#include "mlx/distributed/ops.h"

namespace mx = mlx::core;
namespace dist = mlx::core::distributed;

struct mlxc_group_s {
  dist::Group g;
};

namespace {

thread_local std::string dist_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    dist_error = e.what();
    return 1;
  } catch (...) {
    dist_error = "unknown C++ exception inside MLX's distributed layer";
    return 1;
  }
}

int put(mx::array a, mlxc_array* out) {
  *out = mlxc::new_handle(std::move(a));
  return 0;
}

}  // namespace

extern "C" {

const char* mlxc_distributed_last_error(void) { return dist_error.c_str(); }

int mlxc_distributed_is_available(const char* backend) {
  try {
    return dist::is_available(std::string(backend)) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

int mlxc_distributed_init(const char* backend, int strict, mlxc_group* out) {
  return guarded([&] {
    *out = new mlxc_group_s{dist::init(strict != 0, std::string(backend))};
  });
}

int mlxc_distributed_clear_backends(void) {
  return guarded([] { dist::clear_backends(); });
}

void mlxc_group_free(mlxc_group g) { delete g; }
int mlxc_group_rank(mlxc_group g) { return g->g.rank(); }
int mlxc_group_size(mlxc_group g) { return g->g.size(); }

int mlxc_all_sum(mlxc_array x, mlxc_group g, mlxc_array* out) {
  return guarded([&] { put(dist::all_sum(mlxc::arr(x), g->g), out); });
}

int mlxc_all_gather(mlxc_array x, mlxc_group g, mlxc_array* out) {
  return guarded([&] { put(dist::all_gather(mlxc::arr(x), g->g), out); });
}

int mlxc_send(mlxc_array x, int dst, mlxc_group g, mlxc_array* out) {
  return guarded([&] { put(dist::send(mlxc::arr(x), dst, g->g), out); });
}

int mlxc_recv_like(mlxc_array like, int src, mlxc_group g, mlxc_array* out) {
  return guarded([&] { put(dist::recv_like(mlxc::arr(like), src, g->g), out); });
}

}  // extern "C"
