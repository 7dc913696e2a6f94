// mlxc: the C ABI over MLX C++ declared in mlxc.h.
//
// Every exported function body runs inside GUARD_BEGIN/GUARD_END, which turns
// any C++ exception into a non-zero status and a thread-local message: MLX
// reports shape errors, bad axes, allocation failures and I/O errors by
// throwing, and none of that may unwind into Python's C frames.

#include "mlxc.h"
#include "internal.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "mlx/compile_impl.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "mlx/backend/cuda/cuda.h"
#include "mlx/fast.h"

namespace mx = mlx::core;

struct mlxc_vec_s {
  std::vector<mx::array> v;
};
struct mlxc_closure_s {
  std::function<std::vector<mx::array>(const std::vector<mx::array>&)> fn;
  std::uintptr_t id;
};
struct mlxc_kernel_s {
  mx::fast::CustomKernelFunction fn;
};
struct mlxc_st_s {
  std::vector<std::string> names;
  std::vector<mx::array> arrays;
  std::vector<std::string> meta_keys;
  std::vector<std::string> meta_values;
};

namespace {

thread_local std::string last_error;

// A limit set through mlxc_memory_set_limit; 0 when none. The CPU allocator
// does not enforce MLX's limit, so evaluation checks it here (see check_limit).
size_t memory_limit = 0;

// Raised when a caller function (mlxc_fn) reports failure: it unwinds through
// MLX's transformations and is turned into a status at the ABI boundary.
struct CallbackFailed : std::exception {
  const char* what() const noexcept override {
    return "a Python function called by MLX failed";
  }
};

#define GUARD_BEGIN try {
#define GUARD_END                                      \
  return 0;                                            \
  }                                                    \
  catch (const std::exception& e) {                    \
    last_error = e.what();                             \
    return 1;                                          \
  }                                                    \
  catch (...) {                                        \
    last_error = "unknown C++ exception inside MLX";   \
    return 1;                                          \
  }

mx::Dtype to_dtype(int d) {
  switch (d) {
    case MLXC_BOOL: return mx::bool_;
    case MLXC_UINT8: return mx::uint8;
    case MLXC_UINT16: return mx::uint16;
    case MLXC_UINT32: return mx::uint32;
    case MLXC_UINT64: return mx::uint64;
    case MLXC_INT8: return mx::int8;
    case MLXC_INT16: return mx::int16;
    case MLXC_INT32: return mx::int32;
    case MLXC_INT64: return mx::int64;
    case MLXC_FLOAT16: return mx::float16;
    case MLXC_FLOAT32: return mx::float32;
    case MLXC_FLOAT64: return mx::float64;
    case MLXC_BFLOAT16: return mx::bfloat16;
    case MLXC_COMPLEX64: return mx::complex64;
  }
  throw std::invalid_argument("[mlxc] unknown dtype code " + std::to_string(d));
}

int from_dtype(mx::Dtype d) {
  // mlxc_dtype mirrors the order of mx::Dtype::Val.
  return static_cast<int>(d.val());
}

mx::Shape to_shape(const int* shape, int ndim) {
  return mx::Shape(shape, shape + ndim);
}

std::vector<int> to_ints(const int* xs, int n) {
  return std::vector<int>(xs, xs + n);
}

int put(mx::array a, mlxc_array* out) {
  *out = mlxc::new_handle(std::move(a));
  return 0;
}

std::optional<mx::array> opt(mlxc_array a) {
  if (a == 0) return std::nullopt;
  return mlxc::arr(a);
}

std::vector<mx::array> to_vector(const mlxc_array* arrays, size_t n) {
  std::vector<mx::array> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(mlxc::arr(arrays[i]));
  return v;
}

// Upper bound of the bytes an evaluation may allocate: every not yet computed
// array in the graph. Only used while a limit is set.
void check_limit(const std::vector<mx::array>& outputs) {
  if (memory_limit == 0) return;
  std::unordered_set<std::uintptr_t> seen;
  std::vector<mx::array> todo(outputs.begin(), outputs.end());
  size_t pending = 0;
  while (!todo.empty()) {
    mx::array a = todo.back();
    todo.pop_back();
    if (!seen.insert(a.id()).second || !a.has_primitive()) continue;
    if (a.status() != mx::array::Status::unscheduled) continue;
    pending += a.nbytes();
    for (auto& in : a.inputs()) todo.push_back(in);
  }
  size_t active = mx::get_active_memory();
  if (active + pending > memory_limit) {
    throw std::runtime_error(
        "[eval] memory limit exceeded: evaluating needs up to " +
        std::to_string(pending) + " bytes with " + std::to_string(active) +
        " active, over the limit of " + std::to_string(memory_limit) +
        " bytes");
  }
}

std::function<std::vector<mx::array>(const std::vector<mx::array>&)> wrap_fn(
    mlxc_fn fn, void* payload) {
  return [fn, payload](const std::vector<mx::array>& inputs) {
    mlxc_vec_s in{inputs};
    mlxc_vec_s out;
    if (fn(payload, &in, &out) != 0) throw CallbackFailed();
    return out.v;
  };
}

mx::Device to_device(int d) {
  return d == 1 ? mx::Device(mx::Device::gpu) : mx::Device(mx::Device::cpu);
}

// MLX does not bounds-check array start offsets: a start past the end (or a
// negative one) reads (slice) or writes (slice_update) outside the buffer. They
// are clamped into [0, dim - size] per axis, as XLA's dynamic_slice does.
// `sizes` holds the window's extent along each of a's axes. Starts MLX will
// reject anyway (bad axes, wrong count) are left for MLX to report.
mx::array clamp_starts(const mx::array& start, const mx::array& a,
                       const std::vector<int>& axes, const mx::Shape& sizes) {
  int nd = static_cast<int>(a.ndim());
  if (start.ndim() > 1 || start.size() != axes.size() ||
      sizes.size() != a.ndim() || !mx::issubdtype(start.dtype(), mx::integer)) {
    return start;
  }
  std::vector<int64_t> hi;
  for (int ax : axes) {
    if (ax < -nd || ax >= nd) return start;
    if (ax < 0) ax += nd;
    hi.push_back(std::max<int64_t>(0, int64_t(a.shape(ax)) - sizes[ax]));
  }
  mx::array lim(hi.begin(), start.shape(), mx::int64);
  return mx::clip(start, mx::array(0, start.dtype()),
                  mx::astype(lim, start.dtype()));
}

// The binary op `op` (an mlxc_binary_op) of two arrays.
mx::array binary_op(int op, const mx::array& x, const mx::array& y) {
  switch (op) {
    case MLXC_ADD: return mx::add(x, y);
    case MLXC_SUBTRACT: return mx::subtract(x, y);
    case MLXC_MULTIPLY: return mx::multiply(x, y);
    case MLXC_DIVIDE: return mx::divide(x, y);
    case MLXC_FLOOR_DIVIDE: return mx::floor_divide(x, y);
    case MLXC_REMAINDER: return mx::remainder(x, y);
    case MLXC_POWER: return mx::power(x, y);
    case MLXC_MAXIMUM: return mx::maximum(x, y);
    case MLXC_MINIMUM: return mx::minimum(x, y);
    case MLXC_EQUAL: return mx::equal(x, y);
    case MLXC_NOT_EQUAL: return mx::not_equal(x, y);
    case MLXC_GREATER: return mx::greater(x, y);
    case MLXC_GREATER_EQUAL: return mx::greater_equal(x, y);
    case MLXC_LESS: return mx::less(x, y);
    case MLXC_LESS_EQUAL: return mx::less_equal(x, y);
    case MLXC_LOGICAL_AND: return mx::logical_and(x, y);
    case MLXC_LOGICAL_OR: return mx::logical_or(x, y);
    case MLXC_MATMUL: return mx::matmul(x, y);
    case MLXC_ARCTAN2: return mx::arctan2(x, y);
    case MLXC_LOGADDEXP: return mx::logaddexp(x, y);
    case MLXC_BITWISE_AND: return mx::bitwise_and(x, y);
    case MLXC_BITWISE_OR: return mx::bitwise_or(x, y);
    case MLXC_BITWISE_XOR: return mx::bitwise_xor(x, y);
    case MLXC_LEFT_SHIFT: return mx::left_shift(x, y);
    case MLXC_RIGHT_SHIFT: return mx::right_shift(x, y);
  }
  throw std::invalid_argument("[binary] unknown op " + std::to_string(op));
}

// A Python scalar is weakly typed, as in MLX's own bindings: it takes the
// array's dtype where that can hold it (x_bf16 * 0.5 stays bfloat16); a float
// with an integer array is float32, an int with a bool array int32.
mx::Dtype weak_float_dtype(const mx::array& a) {
  return mx::issubdtype(a.dtype(), mx::floating) ? a.dtype() : mx::float32;
}

mx::Dtype weak_int_dtype(const mx::array& a) {
  return a.dtype() == mx::bool_ ? mx::int32 : a.dtype();
}

}  // namespace

void mlxc::set_last_error(const std::string& message) { last_error = message; }

extern "C" {

const char* mlxc_last_error(void) { return last_error.c_str(); }
const char* mlxc_version(void) { return mx::version(); }
void mlxc_array_free(mlxc_array a) { mlxc::free_handle(a); }

int mlxc_array_from_data(const void* data, const int* shape, int ndim,
                         int dtype, mlxc_array* out) {
  GUARD_BEGIN
  mx::Dtype dt = to_dtype(dtype);
  mx::Shape sh = to_shape(shape, ndim);
  size_t n = 1;
  for (auto s : sh) {
    if (s < 0) throw std::invalid_argument("[array] negative dimension");
    n *= static_cast<size_t>(s);
  }
  size_t nbytes = n * dt.size();
  // Where MLX's allocator cannot wrap a host pointer (the CPU and CUDA builds), the array's
  // constructor copies the data into a buffer of MLX's own before it returns: the caller's
  // buffer is then only read here, and a private copy first would be a second copy (a step's
  // 1.2 MB of token masks: two). Where it can (Metal), the array would keep the pointer, so it
  // gets a private copy that the caller cannot free.
  if (nbytes > 0) {
    auto wrapped = mx::allocator::make_buffer(const_cast<void*>(data), nbytes);
    if (wrapped.ptr() == nullptr) {
      put(mx::array(const_cast<void*>(data), std::move(sh), dt, [](void*) {}), out);
      return 0;
    }
    mx::allocator::release(wrapped);
  }
  void* copy = std::malloc(nbytes > 0 ? nbytes : 1);
  if (copy == nullptr) throw std::bad_alloc();
  if (nbytes > 0) std::memcpy(copy, data, nbytes);
  put(mx::array(copy, std::move(sh), dt, [](void* p) { std::free(p); }), out);
  GUARD_END
}

int mlxc_array_upload(const void* data, const int* shape, int ndim, int dtype, mlxc_array* out) {
  GUARD_BEGIN
  mx::Dtype dt = to_dtype(dtype);
  mx::Shape sh = to_shape(shape, ndim);
  size_t n = 1;
  for (auto s : sh) {
    if (s < 0) throw std::invalid_argument("[array] negative dimension");
    n *= static_cast<size_t>(s);
  }
  if (n == 0) return mlxc_array_from_data(data, shape, ndim, dtype, out);
  put(mlxc::upload(data, std::move(sh), dt, n * dt.size()), out);
  GUARD_END
}

int mlxc_upload_by_driver(void) {
  return mlxc::upload_by_driver() ? 1 : 0;
}

void* mlxc_pinned_alloc(size_t nbytes) {
  return mlxc::pinned_alloc(nbytes);
}

void mlxc_pinned_free(void* p) {
  mlxc::pinned_free(p);
}

int mlxc_array_from_double(double value, int dtype, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::array(value, to_dtype(dtype)), out);
  GUARD_END
}

int mlxc_array_from_int(int64_t value, int dtype, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::array(value, to_dtype(dtype)), out);
  GUARD_END
}

int mlxc_array_from_bool(int value, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::array(value != 0), out);
  GUARD_END
}

int mlxc_array_clone(mlxc_array a, mlxc_array* out) {
  GUARD_BEGIN
  put(mlxc::arr(a), out);
  GUARD_END
}

int mlxc_array_ndim(mlxc_array a) { return static_cast<int>(mlxc::arr(a).ndim()); }

int mlxc_array_shape(mlxc_array a, int* shape) {
  const auto& s = mlxc::arr(a).shape();
  for (size_t i = 0; i < s.size(); ++i) shape[i] = s[i];
  return 0;
}

int mlxc_array_dtype(mlxc_array a) { return from_dtype(mlxc::arr(a).dtype()); }
size_t mlxc_array_size(mlxc_array a) { return mlxc::arr(a).size(); }
size_t mlxc_array_nbytes(mlxc_array a) { return mlxc::arr(a).nbytes(); }

size_t mlxc_dtype_size(int dtype) {
  try {
    return to_dtype(dtype).size();
  } catch (...) {
    return 0;
  }
}

int mlxc_eval(const mlxc_array* arrays, size_t n) {
  GUARD_BEGIN
  auto v = to_vector(arrays, n);
  check_limit(v);
  mx::eval(std::move(v));
  GUARD_END
}

int mlxc_graph_summary(const mlxc_array* arrays, size_t n, char* buf, size_t buflen, size_t* nodes) {
  GUARD_BEGIN
  std::unordered_set<std::uintptr_t> seen;
  std::map<std::string, size_t> counts;
  std::vector<mx::array> todo = to_vector(arrays, n);
  size_t total = 0;
  while (!todo.empty()) {
    mx::array a = todo.back();
    todo.pop_back();
    if (!a.has_primitive() || a.status() != mx::array::Status::unscheduled) continue;
    // Siblings (outputs of one multi-output primitive) share one node.
    if (!seen.insert(reinterpret_cast<std::uintptr_t>(&a.primitive())).second) continue;
    ++total;
    ++counts[a.primitive().name()];
    for (auto& in : a.inputs()) todo.push_back(in);
  }
  std::vector<std::pair<size_t, std::string>> order;
  for (auto& [k, v] : counts) order.emplace_back(v, k);
  std::sort(order.rbegin(), order.rend());
  std::string text;
  for (auto& [v, k] : order) text += k + " " + std::to_string(v) + "\n";
  if (buflen > 0) {
    size_t m = std::min(buflen - 1, text.size());
    std::memcpy(buf, text.data(), m);
    buf[m] = 0;
  }
  *nodes = total;
  GUARD_END
}

int mlxc_async_eval(const mlxc_array* arrays, size_t n) {
  GUARD_BEGIN
  auto v = to_vector(arrays, n);
  check_limit(v);
  mx::async_eval(std::move(v));
  GUARD_END
}

int mlxc_array_is_ready(mlxc_array a) {
  // An unscheduled array is not ready; a launched one is once its event has fired.
  return mlxc::arr(a).status() != mx::array::Status::unscheduled && mlxc::arr(a).is_available() ? 1 : 0;
}

int mlxc_array_copy_out(mlxc_array a, void* dst, size_t nbytes) {
  GUARD_BEGIN
  if (nbytes != mlxc::arr(a).nbytes()) {
    throw std::invalid_argument(
        "[copy_out] destination has " + std::to_string(nbytes) +
        " bytes, the array " + std::to_string(mlxc::arr(a).nbytes()));
  }
  // A fresh row-contiguous copy whatever the source layout: views share
  // their parent's buffer with arbitrary strides and offsets.
  mx::array c = mlxc::arr(a);
  if (!c.flags().row_contiguous) {
    c = mx::contiguous(c);
  }
  check_limit({c});
  mx::eval(c);
  if (!c.flags().row_contiguous) {
    c = mx::copy(mx::contiguous(c));
    mx::eval(c);
  }
  if (nbytes > 0) std::memcpy(dst, c.data<char>(), nbytes);
  GUARD_END
}

int mlxc_vec_new(mlxc_vec* out) {
  GUARD_BEGIN
  *out = new mlxc_vec_s{};
  GUARD_END
}

void mlxc_vec_free(mlxc_vec v) { delete v; }
size_t mlxc_vec_size(mlxc_vec v) { return v->v.size(); }

int mlxc_vec_get(mlxc_vec v, size_t i, mlxc_array* out) {
  GUARD_BEGIN
  put(v->v.at(i), out);
  GUARD_END
}

int mlxc_vec_push(mlxc_vec v, mlxc_array a) {
  GUARD_BEGIN
  v->v.push_back(mlxc::arr(a));
  GUARD_END
}

// Python's per-array crossings (a cffi call and a status check each) cost more than the
// C++ work here: a compiled decode step passes 60 arrays in and 30 out.
int mlxc_vec_push_many(mlxc_vec v, const mlxc_array* arrays, size_t n) {
  GUARD_BEGIN
  v->v.reserve(v->v.size() + n);
  for (size_t i = 0; i < n; ++i) v->v.push_back(mlxc::arr(arrays[i]));
  GUARD_END
}

// New handles for every one of `arrays` into out[0..size): all, or none (freed again).
static void put_all(const std::vector<mx::array>& arrays, mlxc_array* out) {
  size_t i = 0;
  try {
    for (; i < arrays.size(); ++i) out[i] = mlxc::new_handle(arrays[i]);
  } catch (...) {
    while (i > 0) mlxc::free_handle(out[--i]);
    throw;
  }
}

int mlxc_vec_take(mlxc_vec v, mlxc_array* out, size_t n) {
  GUARD_BEGIN
  if (n != v->v.size()) throw std::invalid_argument("[vec] take: the count is not the list's size");
  put_all(v->v, out);
  v->v.clear();  // (the handles own the arrays now: the list holds nothing alive)
  GUARD_END
}

int mlxc_unary(int op, mlxc_array a, mlxc_array* out) {
  GUARD_BEGIN
  const mx::array& x = mlxc::arr(a);
  switch (op) {
    case MLXC_ABS: return put(mx::abs(x), out);
    case MLXC_NEGATIVE: return put(mx::negative(x), out);
    case MLXC_SIGN: return put(mx::sign(x), out);
    case MLXC_LOGICAL_NOT: return put(mx::logical_not(x), out);
    case MLXC_RECIPROCAL: return put(mx::reciprocal(x), out);
    case MLXC_FLOOR: return put(mx::floor(x), out);
    case MLXC_CEIL: return put(mx::ceil(x), out);
    case MLXC_ROUND: return put(mx::round(x, 0), out);
    case MLXC_SQUARE: return put(mx::square(x), out);
    case MLXC_SQRT: return put(mx::sqrt(x), out);
    case MLXC_RSQRT: return put(mx::rsqrt(x), out);
    case MLXC_EXP: return put(mx::exp(x), out);
    case MLXC_EXPM1: return put(mx::expm1(x), out);
    case MLXC_LOG: return put(mx::log(x), out);
    case MLXC_LOG1P: return put(mx::log1p(x), out);
    case MLXC_LOG2: return put(mx::log2(x), out);
    case MLXC_SIN: return put(mx::sin(x), out);
    case MLXC_COS: return put(mx::cos(x), out);
    case MLXC_TANH: return put(mx::tanh(x), out);
    case MLXC_SIGMOID: return put(mx::sigmoid(x), out);
    case MLXC_ERF: return put(mx::erf(x), out);
    case MLXC_ERFINV: return put(mx::erfinv(x), out);
    case MLXC_STOP_GRADIENT: return put(mx::stop_gradient(x), out);
    case MLXC_COPY: return put(mx::copy(x), out);
    case MLXC_CONTIGUOUS: return put(mx::contiguous(x), out);
    case MLXC_BITWISE_INVERT: return put(mx::bitwise_invert(x), out);
    case MLXC_ISNAN: return put(mx::isnan(x), out);
    case MLXC_ISINF: return put(mx::isinf(x), out);
  }
  throw std::invalid_argument("[unary] unknown op " + std::to_string(op));
  GUARD_END
}

static int binary_into(int op, mlxc_array a, mlxc_array b, mlxc_array* out) {
  GUARD_BEGIN
  put(binary_op(op, mlxc::arr(a), mlxc::arr(b)), out);
  GUARD_END
}

static int binary_float_into(int op, mlxc_array a, double value, int reflected, mlxc_array* out) {
  GUARD_BEGIN
  mx::array s(value, weak_float_dtype(mlxc::arr(a)));
  put(reflected ? binary_op(op, s, mlxc::arr(a)) : binary_op(op, mlxc::arr(a), s), out);
  GUARD_END
}

static int binary_int_into(int op, mlxc_array a, int64_t value, int reflected, mlxc_array* out) {
  GUARD_BEGIN
  mx::Dtype dt = weak_int_dtype(mlxc::arr(a));
  mx::array s = mx::issubdtype(dt, mx::inexact)
                    ? mx::array(static_cast<double>(value), dt)
                    : mx::array(value, dt);
  put(reflected ? binary_op(op, s, mlxc::arr(a)) : binary_op(op, mlxc::arr(a), s), out);
  GUARD_END
}

// (the binary ops return their handle, 0 on failure: no out-parameter for cffi to allocate per op)
mlxc_array mlxc_binary_r(int op, mlxc_array a, mlxc_array b) {
  mlxc_array out = 0;
  return binary_into(op, a, b, &out) ? 0 : out;
}

mlxc_array mlxc_binary_float_r(int op, mlxc_array a, double value, int reflected) {
  mlxc_array out = 0;
  return binary_float_into(op, a, value, reflected, &out) ? 0 : out;
}

mlxc_array mlxc_binary_int_r(int op, mlxc_array a, int64_t value, int reflected) {
  mlxc_array out = 0;
  return binary_int_into(op, a, value, reflected, &out) ? 0 : out;
}

int mlxc_reduce(int op, mlxc_array a, const int* axes, int naxes, int keepdims,
                mlxc_array* out) {
  GUARD_BEGIN
  const mx::array& x = mlxc::arr(a);
  std::vector<int> ax;
  if (naxes < 0) {
    for (int i = 0; i < static_cast<int>(x.ndim()); ++i) ax.push_back(i);
  } else {
    ax = to_ints(axes, naxes);
  }
  bool kd = keepdims != 0;
  switch (op) {
    case MLXC_SUM: return put(mx::sum(x, ax, kd), out);
    case MLXC_MEAN: return put(mx::mean(x, ax, kd), out);
    case MLXC_MAX: return put(mx::max(x, ax, kd), out);
    case MLXC_MIN: return put(mx::min(x, ax, kd), out);
    case MLXC_PROD: return put(mx::prod(x, ax, kd), out);
    case MLXC_ALL: return put(mx::all(x, ax, kd), out);
    case MLXC_ANY: return put(mx::any(x, ax, kd), out);
    case MLXC_LOGSUMEXP: return put(mx::logsumexp(x, ax, kd), out);
    case MLXC_SOFTMAX: return put(mx::softmax(x, ax, false), out);
    case MLXC_SOFTMAX_PRECISE: return put(mx::softmax(x, ax, true), out);
    case MLXC_VAR: return put(mx::var(x, ax, kd, 0), out);
  }
  throw std::invalid_argument("[reduce] unknown op " + std::to_string(op));
  GUARD_END
}

int mlxc_axis(int op, mlxc_array a, int axis, int flag_a, int flag_b,
              mlxc_array* out) {
  GUARD_BEGIN
  const mx::array& x = mlxc::arr(a);
  bool fa = flag_a != 0, fb = flag_b != 0;
  switch (op) {
    case MLXC_ARGMAX: return put(mx::argmax(x, axis, fa), out);
    case MLXC_ARGMIN: return put(mx::argmin(x, axis, fa), out);
    case MLXC_SORT: return put(mx::sort(x, axis), out);
    case MLXC_ARGSORT: return put(mx::argsort(x, axis), out);
    case MLXC_CUMSUM: return put(mx::cumsum(x, axis, fa, fb), out);
    case MLXC_CUMPROD: return put(mx::cumprod(x, axis, fa, fb), out);
    case MLXC_CUMMAX: return put(mx::cummax(x, axis, fa, fb), out);
    case MLXC_CUMMIN: return put(mx::cummin(x, axis, fa, fb), out);
    case MLXC_LOGCUMSUMEXP: return put(mx::logcumsumexp(x, axis, fa, fb), out);
  }
  throw std::invalid_argument("[axis] unknown op " + std::to_string(op));
  GUARD_END
}

int mlxc_addmm(mlxc_array c, mlxc_array a, mlxc_array b, float alpha,
               float beta, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::addmm(mlxc::arr(c), mlxc::arr(a), mlxc::arr(b), alpha, beta), out);
  GUARD_END
}

int mlxc_where(mlxc_array cond, mlxc_array x, mlxc_array y, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::where(mlxc::arr(cond), mlxc::arr(x), mlxc::arr(y)), out);
  GUARD_END
}

int mlxc_clip(mlxc_array a, mlxc_array lo, mlxc_array hi, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::clip(mlxc::arr(a), opt(lo), opt(hi)), out);
  GUARD_END
}

int mlxc_astype(mlxc_array a, int dtype, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::astype(mlxc::arr(a), to_dtype(dtype)), out);
  GUARD_END
}

int mlxc_view(mlxc_array a, int dtype, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::view(mlxc::arr(a), to_dtype(dtype)), out);
  GUARD_END
}

int mlxc_topk(mlxc_array a, int k, int axis, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::topk(mlxc::arr(a), k, axis), out);
  GUARD_END
}

int mlxc_argpartition(mlxc_array a, int kth, int axis, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::argpartition(mlxc::arr(a), kth, axis), out);
  GUARD_END
}

int mlxc_tri(mlxc_array a, int k, int upper, mlxc_array* out) {
  GUARD_BEGIN
  put(upper ? mx::triu(mlxc::arr(a), k) : mx::tril(mlxc::arr(a), k), out);
  GUARD_END
}

int mlxc_reshape(mlxc_array a, const int* shape, int ndim, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::reshape(mlxc::arr(a), to_shape(shape, ndim)), out);
  GUARD_END
}

int mlxc_transpose(mlxc_array a, const int* axes, int naxes, mlxc_array* out) {
  GUARD_BEGIN
  if (naxes < 0) return put(mx::transpose(mlxc::arr(a)), out);
  put(mx::transpose(mlxc::arr(a), to_ints(axes, naxes)), out);
  GUARD_END
}

int mlxc_swapaxes(mlxc_array a, int axis1, int axis2, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::swapaxes(mlxc::arr(a), axis1, axis2), out);
  GUARD_END
}

int mlxc_expand_dims(mlxc_array a, const int* axes, int naxes,
                     mlxc_array* out) {
  GUARD_BEGIN
  put(mx::expand_dims(mlxc::arr(a), to_ints(axes, naxes)), out);
  GUARD_END
}

int mlxc_squeeze(mlxc_array a, const int* axes, int naxes, mlxc_array* out) {
  GUARD_BEGIN
  if (naxes < 0) return put(mx::squeeze(mlxc::arr(a)), out);
  put(mx::squeeze(mlxc::arr(a), to_ints(axes, naxes)), out);
  GUARD_END
}

int mlxc_broadcast_to(mlxc_array a, const int* shape, int ndim,
                      mlxc_array* out) {
  GUARD_BEGIN
  put(mx::broadcast_to(mlxc::arr(a), to_shape(shape, ndim)), out);
  GUARD_END
}

int mlxc_concatenate(mlxc_vec arrays, int axis, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::concatenate(arrays->v, axis), out);
  GUARD_END
}

int mlxc_stack(mlxc_vec arrays, int axis, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::stack(arrays->v, axis), out);
  GUARD_END
}

int mlxc_split(mlxc_array a, const int* indices, int nindices, int sections,
               int axis, mlxc_vec out) {
  GUARD_BEGIN
  out->v = sections > 0 ? mx::split(mlxc::arr(a), sections, axis)
                        : mx::split(mlxc::arr(a), to_shape(indices, nindices), axis);
  GUARD_END
}

int mlxc_slice(mlxc_array a, const int* start, const int* stop,
               const int* strides, int ndim, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::slice(mlxc::arr(a), to_shape(start, ndim), to_shape(stop, ndim),
                to_shape(strides, ndim)),
      out);
  GUARD_END
}

int mlxc_slice_dynamic(mlxc_array a, mlxc_array start, const int* axes,
                       int naxes, const int* sizes, int ndim, mlxc_array* out) {
  GUARD_BEGIN
  auto ax = to_ints(axes, naxes);
  auto size = to_shape(sizes, ndim);
  put(mx::slice(mlxc::arr(a), clamp_starts(mlxc::arr(start), mlxc::arr(a), ax, size), ax, size), out);
  GUARD_END
}

int mlxc_slice_update(mlxc_array src, mlxc_array update, const int* start,
                      const int* stop, const int* strides, int ndim,
                      mlxc_array* out) {
  GUARD_BEGIN
  put(mx::slice_update(mlxc::arr(src), mlxc::arr(update), to_shape(start, ndim),
                       to_shape(stop, ndim), to_shape(strides, ndim)),
      out);
  GUARD_END
}

int mlxc_slice_update_dynamic(mlxc_array src, mlxc_array update,
                              mlxc_array start, const int* axes, int naxes,
                              mlxc_array* out) {
  GUARD_BEGIN
  const mx::array& x = mlxc::arr(src);
  const mx::array& u = mlxc::arr(update);
  auto ax = to_ints(axes, naxes);
  // The window MLX writes: update's shape aligned to x's trailing axes, 1 on
  // the leading axes update lacks.
  mx::Shape size(x.ndim(), 1);
  size_t lead = x.ndim() > u.ndim() ? x.ndim() - u.ndim() : 0;
  for (size_t d = lead; d < x.ndim(); ++d) {
    size[d] = std::min(u.shape(d - lead), x.shape(d));
  }
  put(mx::slice_update(x, u, clamp_starts(mlxc::arr(start), x, ax, size), ax), out);
  GUARD_END
}

int mlxc_take(mlxc_array a, mlxc_array indices, int axis, int axis_is_none,
              mlxc_array* out) {
  GUARD_BEGIN
  if (axis_is_none) return put(mx::take(mlxc::arr(a), mlxc::arr(indices)), out);
  put(mx::take(mlxc::arr(a), mlxc::arr(indices), axis), out);
  GUARD_END
}

int mlxc_take_along_axis(mlxc_array a, mlxc_array indices, int axis,
                         mlxc_array* out) {
  GUARD_BEGIN
  put(mx::take_along_axis(mlxc::arr(a), mlxc::arr(indices), axis), out);
  GUARD_END
}

int mlxc_put_along_axis(mlxc_array a, mlxc_array indices, mlxc_array values,
                        int axis, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::put_along_axis(mlxc::arr(a), mlxc::arr(indices), mlxc::arr(values), axis), out);
  GUARD_END
}

int mlxc_full(const int* shape, int ndim, mlxc_array value, int dtype,
              mlxc_array* out) {
  GUARD_BEGIN
  put(mx::full(to_shape(shape, ndim), mlxc::arr(value), to_dtype(dtype)), out);
  GUARD_END
}

int mlxc_arange(double start, double stop, double step, int dtype,
                mlxc_array* out) {
  GUARD_BEGIN
  put(mx::arange(start, stop, step, to_dtype(dtype)), out);
  GUARD_END
}

int mlxc_random_seed(uint64_t seed) {
  GUARD_BEGIN
  mx::random::seed(seed);
  GUARD_END
}

int mlxc_random_key(uint64_t seed, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::random::key(seed), out);
  GUARD_END
}

int mlxc_random_split(mlxc_array key, int num, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::random::split(mlxc::arr(key), num), out);
  GUARD_END
}

int mlxc_random_uniform(mlxc_array low, mlxc_array high, const int* shape,
                        int ndim, int dtype, mlxc_array key, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::random::uniform(mlxc::arr(low), mlxc::arr(high), to_shape(shape, ndim),
                          to_dtype(dtype), opt(key)),
      out);
  GUARD_END
}

int mlxc_random_normal(const int* shape, int ndim, int dtype, float loc,
                       float scale, mlxc_array key, mlxc_array* out) {
  GUARD_BEGIN
  mx::Dtype dt = to_dtype(dtype);
  put(mx::random::normal(to_shape(shape, ndim), dt, mx::array(loc, dt),
                         mx::array(scale, dt), opt(key)),
      out);
  GUARD_END
}

int mlxc_random_randint(mlxc_array low, mlxc_array high, const int* shape,
                        int ndim, int dtype, mlxc_array key, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::random::randint(mlxc::arr(low), mlxc::arr(high), to_shape(shape, ndim),
                          to_dtype(dtype), opt(key)),
      out);
  GUARD_END
}

int mlxc_random_categorical(mlxc_array logits, int axis, int num_samples,
                            mlxc_array key, mlxc_array* out) {
  GUARD_BEGIN
  if (num_samples <= 0) {
    return put(mx::random::categorical(mlxc::arr(logits), axis, opt(key)), out);
  }
  put(mx::random::categorical(mlxc::arr(logits), axis, num_samples, opt(key)), out);
  GUARD_END
}

int mlxc_random_gumbel(const int* shape, int ndim, int dtype, mlxc_array key,
                       mlxc_array* out) {
  GUARD_BEGIN
  put(mx::random::gumbel(to_shape(shape, ndim), to_dtype(dtype), opt(key)),
      out);
  GUARD_END
}

int mlxc_quantize(mlxc_array w, int group_size, int bits, mlxc_vec out) {
  GUARD_BEGIN
  out->v = mx::quantize(mlxc::arr(w), group_size, bits, "affine");
  GUARD_END
}

int mlxc_dequantize(mlxc_array w, mlxc_array scales, mlxc_array biases,
                    int group_size, int bits, int dtype, mlxc_array* out) {
  GUARD_BEGIN
  std::optional<mx::Dtype> dt;
  if (dtype >= 0) dt = to_dtype(dtype);
  put(mx::dequantize(mlxc::arr(w), mlxc::arr(scales), opt(biases), group_size, bits, "affine",
                     std::nullopt, dt),
      out);
  GUARD_END
}

int mlxc_quantized_matmul(mlxc_array x, mlxc_array w, mlxc_array scales,
                          mlxc_array biases, int transpose, int group_size,
                          int bits, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::quantized_matmul(mlxc::arr(x), mlxc::arr(w), mlxc::arr(scales), opt(biases), transpose != 0,
                           group_size, bits, "affine"),
      out);
  GUARD_END
}

int mlxc_buffer_view(mlxc_array a, mlxc_array* out) {
  GUARD_BEGIN
  std::optional<mx::array> view = mlxc::buffer_view(mlxc::arr(a));
  if (!view) {
    *out = 0;
    return 0;
  }
  put(std::move(*view), out);
  GUARD_END
}

int mlxc_buffer_views(const mlxc_array* arrays, size_t n, mlxc_array* out) {
  GUARD_BEGIN
  // (one call for a step's every layer: the decode kernel's reads of the pool)
  std::vector<mx::array> views;
  views.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::optional<mx::array> view = mlxc::buffer_view(mlxc::arr(arrays[i]));
    if (!view) {
      out[0] = 0;
      return 0;
    }
    views.push_back(std::move(*view));
  }
  put_all(views, out);
  GUARD_END
}

int mlxc_cpu_dequantize(mlxc_array w, mlxc_array scales, mlxc_array biases,
                        int group_size, int bits, mlxc_array* out) {
  GUARD_BEGIN
  put(mlxc::cpu_dequantize(mlxc::arr(w), mlxc::arr(scales), mlxc::arr(biases), bits, group_size), out);
  GUARD_END
}

namespace {
const mx::array* ptr_or_null(mlxc_array a) { return a == 0 ? nullptr : &mlxc::arr(a); }
}  // namespace

int mlxc_cpu_decode_attention(mlxc_array qkv, mlxc_array q_norm, mlxc_array k_norm, mlxc_array inv_freq,
                              mlxc_array kv, mlxc_array scales, mlxc_array biases, mlxc_array pos,
                              mlxc_array table, int heads, float scale, int window, float eps, int bits,
                              int group, mlxc_vec out) {
  GUARD_BEGIN
  out->v = mlxc::cpu_decode_attention(mlxc::arr(qkv), ptr_or_null(q_norm), ptr_or_null(k_norm), mlxc::arr(inv_freq), mlxc::arr(kv),
                                      ptr_or_null(scales), ptr_or_null(biases), mlxc::arr(pos), ptr_or_null(table),
                                      heads, scale, window, eps, bits, group);
  GUARD_END
}

int mlxc_cpu_residual_norm(mlxc_array x, mlxc_array y, mlxc_array w, float eps, mlxc_array pre_w,
                           float pre_eps, mlxc_vec out) {
  GUARD_BEGIN
  out->v = mlxc::cpu_residual_norm(mlxc::arr(x), mlxc::arr(y), mlxc::arr(w), eps, ptr_or_null(pre_w), pre_eps);
  GUARD_END
}

int mlxc_cpu_gated_activation(mlxc_array gate_up, int act, mlxc_array* out) {
  GUARD_BEGIN
  put(mlxc::cpu_gated_activation(mlxc::arr(gate_up), act), out);
  GUARD_END
}

int mlxc_cpu_prefill_attention(mlxc_array q, mlxc_array keys, mlxc_array values, float scale, int window,
                               mlxc_array* out) {
  GUARD_BEGIN
  put(mlxc::cpu_prefill_attention(mlxc::arr(q), mlxc::arr(keys), mlxc::arr(values), scale, window), out);
  GUARD_END
}

int mlxc_cpu_gemv(mlxc_array x, mlxc_array w, mlxc_array scales, mlxc_array biases,
                  int group_size, int bits, int int8_x, mlxc_array* out) {
  GUARD_BEGIN
  if (bits == 0) {
    put(mlxc::cpu_gemv(mlxc::arr(x), mlxc::arr(w), nullptr, 0, 0), out);
  } else {
    if (scales == 0 || biases == 0) {
      throw std::invalid_argument("cpu_gemv: quantized weights need scales and biases");
    }
    mx::array sb[2] = {mlxc::arr(scales), mlxc::arr(biases)};
    put(mlxc::cpu_gemv(mlxc::arr(x), mlxc::arr(w), sb, bits, group_size, int8_x != 0), out);
  }
  GUARD_END
}

int mlxc_rms_norm(mlxc_array x, mlxc_array weight, float eps, mlxc_array* out) {
  GUARD_BEGIN
  put(mx::fast::rms_norm(mlxc::arr(x), opt(weight), eps), out);
  GUARD_END
}

int mlxc_layer_norm(mlxc_array x, mlxc_array weight, mlxc_array bias, float eps,
                    mlxc_array* out) {
  GUARD_BEGIN
  put(mx::fast::layer_norm(mlxc::arr(x), opt(weight), opt(bias), eps), out);
  GUARD_END
}

int mlxc_rope(mlxc_array x, int dims, int traditional, float base, float scale,
              int offset, mlxc_array freqs, mlxc_array* out) {
  GUARD_BEGIN
  std::optional<float> b;
  if (!std::isnan(base)) b = base;
  put(mx::fast::rope(mlxc::arr(x), dims, traditional != 0, b, scale, offset,
                     opt(freqs)),
      out);
  GUARD_END
}

int mlxc_rope_dynamic(mlxc_array x, int dims, int traditional, float base,
                      float scale, mlxc_array offset, mlxc_array freqs,
                      mlxc_array* out) {
  GUARD_BEGIN
  std::optional<float> b;
  if (!std::isnan(base)) b = base;
  put(mx::fast::rope(mlxc::arr(x), dims, traditional != 0, b, scale, mlxc::arr(offset),
                     opt(freqs)),
      out);
  GUARD_END
}

int mlxc_sdpa(mlxc_array q, mlxc_array k, mlxc_array v, float scale,
              const char* mask_mode, mlxc_array mask, mlxc_array* out) {
  GUARD_BEGIN
  std::string mode = mask_mode ? mask_mode : "";
  put(mx::fast::scaled_dot_product_attention(mlxc::arr(q), mlxc::arr(k), mlxc::arr(v), scale, mode,
                                             opt(mask)),
      out);
  GUARD_END
}

int mlxc_compile(mlxc_fn fn, void* payload, int shapeless, mlxc_closure* out) {
  GUARD_BEGIN
  // The payload identifies the Python function, so it keys MLX's compile
  // cache; mlxc_closure_free erases the entry.
  auto id = reinterpret_cast<std::uintptr_t>(payload);
  auto compiled =
      mx::detail::compile(wrap_fn(fn, payload), id, shapeless != 0, {});
  *out = new mlxc_closure_s{std::move(compiled), id};
  GUARD_END
}

void mlxc_closure_free(mlxc_closure c) {
  if (c == nullptr) return;
  try {
    mx::detail::compile_erase(mx::detail::compile_cache(), c->id);
  } catch (...) {
  }
  delete c;
}

int mlxc_closure_call(mlxc_closure c, const mlxc_array* inputs, size_t n_in, mlxc_vec outputs) {
  GUARD_BEGIN
  outputs->v = c->fn(to_vector(inputs, n_in));
  GUARD_END
}

int mlxc_vjp(mlxc_fn fn, void* payload, mlxc_vec primals, mlxc_vec cotangents,
             mlxc_vec outputs, mlxc_vec vjps) {
  GUARD_BEGIN
  auto [outs, grads] = mx::vjp(wrap_fn(fn, payload), primals->v, cotangents->v);
  outputs->v = std::move(outs);
  vjps->v = std::move(grads);
  GUARD_END
}

int mlxc_value_and_grad(mlxc_fn fn, void* payload, mlxc_vec inputs,
                        const int* argnums, int nargnums, mlxc_vec values,
                        mlxc_vec grads) {
  GUARD_BEGIN
  auto vg = mx::value_and_grad(wrap_fn(fn, payload), to_ints(argnums, nargnums));
  auto [vals, gs] = vg(inputs->v);
  values->v = std::move(vals);
  grads->v = std::move(gs);
  GUARD_END
}

int mlxc_st_load(const char* path, mlxc_st* out) {
  GUARD_BEGIN
  auto [arrays, meta] = mx::load_safetensors(std::string(path));
  auto st = new mlxc_st_s{};
  for (auto& [name, arr] : arrays) {
    st->names.push_back(name);
    st->arrays.push_back(arr);
  }
  for (auto& [k, v] : meta) {
    st->meta_keys.push_back(k);
    st->meta_values.push_back(v);
  }
  *out = st;
  GUARD_END
}

void mlxc_st_free(mlxc_st st) { delete st; }
size_t mlxc_st_count(mlxc_st st) { return st->names.size(); }
const char* mlxc_st_name(mlxc_st st, size_t i) { return st->names[i].c_str(); }

int mlxc_st_array(mlxc_st st, size_t i, mlxc_array* out) {
  GUARD_BEGIN
  put(st->arrays.at(i), out);
  GUARD_END
}

size_t mlxc_st_meta_count(mlxc_st st) { return st->meta_keys.size(); }
const char* mlxc_st_meta_key(mlxc_st st, size_t i) {
  return st->meta_keys[i].c_str();
}
const char* mlxc_st_meta_value(mlxc_st st, size_t i) {
  return st->meta_values[i].c_str();
}

int mlxc_st_save(const char* path, const char** names, const mlxc_array* arrays,
                 size_t n, const char** meta_keys, const char** meta_values,
                 size_t nmeta) {
  GUARD_BEGIN
  std::unordered_map<std::string, mx::array> m;
  for (size_t i = 0; i < n; ++i) m.insert({names[i], mlxc::arr(arrays[i])});
  std::unordered_map<std::string, std::string> meta;
  for (size_t i = 0; i < nmeta; ++i) meta[meta_keys[i]] = meta_values[i];
  mx::save_safetensors(std::string(path), std::move(m), std::move(meta));
  GUARD_END
}

int mlxc_memory_active(size_t* out) {
  GUARD_BEGIN
  *out = mx::get_active_memory();
  GUARD_END
}

int mlxc_memory_peak(size_t* out) {
  GUARD_BEGIN
  *out = mx::get_peak_memory();
  GUARD_END
}

int mlxc_memory_cache(size_t* out) {
  GUARD_BEGIN
  *out = mx::get_cache_memory();
  GUARD_END
}

int mlxc_memory_reset_peak(void) {
  GUARD_BEGIN
  mx::reset_peak_memory();
  GUARD_END
}

int mlxc_memory_clear_cache(void) {
  GUARD_BEGIN
  mx::clear_cache();
  GUARD_END
}

int mlxc_memory_get_limit(size_t* out) {
  GUARD_BEGIN
  *out = mx::get_memory_limit();
  GUARD_END
}

int mlxc_memory_set_limit(size_t limit, size_t* previous) {
  GUARD_BEGIN
  // MLX's own default limit means "no limit set by the caller".
  static const size_t default_limit = mx::get_memory_limit();
  *previous = mx::set_memory_limit(limit);
  memory_limit = limit >= default_limit ? 0 : limit;
  GUARD_END
}

int mlxc_memory_set_cache_limit(size_t limit, size_t* previous) {
  GUARD_BEGIN
  *previous = mx::set_cache_limit(limit);
  GUARD_END
}

int mlxc_gpu_available(void) {
  try {
    return mx::is_available(mx::Device(mx::Device::gpu)) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

int mlxc_default_device(void) {
  return mx::default_device().type == mx::Device::gpu ? 1 : 0;
}

int mlxc_set_default_device(int device) {
  GUARD_BEGIN
  mx::set_default_device(to_device(device));
  GUARD_END
}

int mlxc_new_stream(int device, int* index) {
  GUARD_BEGIN
  *index = mx::new_stream(to_device(device)).index;
  GUARD_END
}

int mlxc_set_default_stream(int device, int index) {
  GUARD_BEGIN
  mx::set_default_stream(mx::Stream(index, to_device(device)));
  GUARD_END
}

int mlxc_synchronize(void) {
  GUARD_BEGIN
  mx::synchronize();
  GUARD_END
}

}  // extern "C"

int mlxc_cuda_available(void) {
  try {
    return mx::cu::is_available() ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

int mlxc_cuda_kernel_new(const char* name, const char** input_names, size_t n_in,
                         const char** output_names, size_t n_out, const char* source,
                         const char* header, int ensure_row_contiguous, int shared_memory,
                         mlxc_kernel* out) {
  GUARD_BEGIN
  std::vector<std::string> ins(input_names, input_names + n_in);
  std::vector<std::string> outs(output_names, output_names + n_out);
  auto fn = mx::fast::cuda_kernel(name, ins, outs, source, header ? header : "",
                                  ensure_row_contiguous != 0, shared_memory);
  *out = new mlxc_kernel_s{std::move(fn)};
  GUARD_END
}

int mlxc_cuda_kernel_free(mlxc_kernel k) {
  delete k;
  return 0;
}

int mlxc_cuda_kernel_apply(mlxc_kernel k, const mlxc_array* inputs, size_t n_in,
                           const int* out_shapes, const int* out_ndims, const int* out_dtypes,
                           size_t n_out, int gx, int gy, int gz, int tx, int ty, int tz,
                           const char** tmpl_names, const int* tmpl_kinds, const int* tmpl_values,
                           size_t n_tmpl, mlxc_vec outputs) {
  GUARD_BEGIN
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  const int* p = out_shapes;
  for (size_t i = 0; i < n_out; ++i) {
    shapes.emplace_back(p, p + out_ndims[i]);
    p += out_ndims[i];
    dtypes.push_back(to_dtype(out_dtypes[i]));
  }
  std::vector<std::pair<std::string, mx::fast::TemplateArg>> tmpl;
  for (size_t i = 0; i < n_tmpl; ++i) {
    switch (tmpl_kinds[i]) {
      case 0: tmpl.emplace_back(tmpl_names[i], mx::fast::TemplateArg(tmpl_values[i])); break;
      case 1: tmpl.emplace_back(tmpl_names[i], mx::fast::TemplateArg(tmpl_values[i] != 0)); break;
      default: tmpl.emplace_back(tmpl_names[i], mx::fast::TemplateArg(to_dtype(tmpl_values[i])));
    }
  }
  outputs->v = k->fn(to_vector(inputs, n_in), shapes, dtypes, {gx, gy, gz}, {tx, ty, tz}, tmpl,
                     std::nullopt, false, {});
  GUARD_END
}
