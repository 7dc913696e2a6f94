/*
 * mlxc: amlx's C ABI over MLX's C++ library.
 *
 * This header is the single source of truth for the cffi binding: build_ffi.py
 * feeds everything between the cdef markers (minus preprocessor lines) to
 * cffi's cdef, so it must stay plain C that cffi can parse.
 *
 * Conventions
 * - Handles are opaque and owned: every handle returned through an out
 *   parameter must be released with its *_free function exactly once.
 * - Every function that can fail returns an int status: 0 on success, non-zero
 *   on failure, in which case mlxc_last_error() (thread-local) holds the text.
 *   No C++ exception ever crosses this ABI.
 * - Arrays taken as inputs are borrowed; arrays returned are new handles.
 * - Ops run on the default stream of the default device.
 */
#ifndef MLXC_H
#define MLXC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */

/* One mlx::core::array, owned: the address of mlxc's object holding it, as an
 * integer. An integer, not a struct pointer, so that Python holds it as a plain
 * int: amlx's Array keeps it in a C field (vendor/mlxc/arraytype.c) and cffi
 * passes an int through with no pointer object made per call. 0 is "none". */
typedef uintptr_t mlxc_array;
typedef struct mlxc_vec_s* mlxc_vec;         /* a list of arrays */
typedef struct mlxc_closure_s* mlxc_closure; /* a compiled function */
typedef struct mlxc_st_s* mlxc_st;           /* a loaded safetensors file */
typedef struct mlxc_kernel_s* mlxc_kernel;   /* a custom CUDA kernel (fast::cuda_kernel) */

/* A function of arrays implemented by the caller (for compile, vjp and
 * value_and_grad). It reads `inputs`, appends its results to `outputs` and
 * returns 0, or returns non-zero to abort the transformation; the caller keeps
 * its own record of why. */
typedef int (*mlxc_fn)(void* payload, mlxc_vec inputs, mlxc_vec outputs);

enum mlxc_dtype {
  MLXC_BOOL = 0, MLXC_UINT8, MLXC_UINT16, MLXC_UINT32, MLXC_UINT64,
  MLXC_INT8, MLXC_INT16, MLXC_INT32, MLXC_INT64,
  MLXC_FLOAT16, MLXC_FLOAT32, MLXC_FLOAT64, MLXC_BFLOAT16, MLXC_COMPLEX64
};

enum mlxc_unary_op {
  MLXC_ABS = 0, MLXC_NEGATIVE, MLXC_SIGN, MLXC_LOGICAL_NOT, MLXC_RECIPROCAL,
  MLXC_FLOOR, MLXC_CEIL, MLXC_ROUND, MLXC_SQUARE, MLXC_SQRT, MLXC_RSQRT,
  MLXC_EXP, MLXC_EXPM1, MLXC_LOG, MLXC_LOG1P, MLXC_LOG2, MLXC_SIN, MLXC_COS,
  MLXC_TANH, MLXC_SIGMOID, MLXC_ERF, MLXC_ERFINV, MLXC_STOP_GRADIENT,
  MLXC_COPY, MLXC_CONTIGUOUS, MLXC_BITWISE_INVERT, MLXC_ISNAN, MLXC_ISINF
};

enum mlxc_binary_op {
  MLXC_ADD = 0, MLXC_SUBTRACT, MLXC_MULTIPLY, MLXC_DIVIDE, MLXC_FLOOR_DIVIDE,
  MLXC_REMAINDER, MLXC_POWER, MLXC_MAXIMUM, MLXC_MINIMUM, MLXC_EQUAL,
  MLXC_NOT_EQUAL, MLXC_GREATER, MLXC_GREATER_EQUAL, MLXC_LESS,
  MLXC_LESS_EQUAL, MLXC_LOGICAL_AND, MLXC_LOGICAL_OR, MLXC_MATMUL,
  MLXC_ARCTAN2, MLXC_LOGADDEXP, MLXC_BITWISE_AND, MLXC_BITWISE_OR,
  MLXC_BITWISE_XOR, MLXC_LEFT_SHIFT, MLXC_RIGHT_SHIFT
};

/* Reductions over a set of axes (naxes < 0: over all axes). */
enum mlxc_reduce_op {
  MLXC_SUM = 0, MLXC_MEAN, MLXC_MAX, MLXC_MIN, MLXC_PROD, MLXC_ALL, MLXC_ANY,
  MLXC_LOGSUMEXP, MLXC_SOFTMAX, MLXC_SOFTMAX_PRECISE, MLXC_VAR
};

/* Operations along one axis. */
enum mlxc_axis_op {
  MLXC_ARGMAX = 0, MLXC_ARGMIN, MLXC_SORT, MLXC_ARGSORT, MLXC_CUMSUM,
  MLXC_CUMPROD, MLXC_CUMMAX, MLXC_CUMMIN, MLXC_LOGCUMSUMEXP
};

/* Errors, version, lifetime of handles. */
const char* mlxc_last_error(void);
const char* mlxc_version(void);
void mlxc_array_free(mlxc_array a);

/* MLX's BLAS (Linux). libmlx calls cblas_sgemm and LAPACK through its own
 * symbol slots; mlxc_blas_route points them at the library at `path`, whose
 * symbols carry `prefix` (scipy-openblas32: "scipy_"). Until then (or when it
 * fails) MLX uses the reference BLAS bundled with its wheel.
 * mlxc_blas_library: the routed library's path, "" when none.
 * mlxc_blas_sgemm_calls: cblas_sgemm calls that went through the route. */
int mlxc_blas_route(const char* path, const char* prefix);
const char* mlxc_blas_library(void);
int mlxc_blas_routed_symbols(void);
unsigned long long mlxc_blas_sgemm_calls(void);
int mlxc_blas_threads(void);
int mlxc_blas_set_threads(int n);

/* Few-row matmuls on the CPU (y = x W^T, x with 1..8 rows; W (out, in)):
 * dense weights (scales = biases = 0, bits = 0: float32, float16,
 * bfloat16) or MLX's affine 4-/8-bit packing (group size 32, 64 or 128),
 * read as stored, with AVX-512 / AVX2 chosen at run time and the rows of the
 * output split over a pool of threads. The result has x's leading shape and
 * the promoted type of x and the weights (scales when quantized). With
 * int8_x != 0, quantized weights are multiplied by x rounded to int8 per group
 * (a float scale each), the products summed on bytes (AVX512-VNNI / AVX-VNNI /
 * AVX2): faster, at the cost of x's rounding. */
int mlxc_cpu_gemv(mlxc_array x, mlxc_array w, mlxc_array scales, mlxc_array biases,
                  int group_size, int bits, int int8_x, mlxc_array* out);
int mlxc_cpu_threads(void);
int mlxc_cpu_gemv_max_rows(void);  /* rows of x one mlxc_cpu_gemv call takes */
int mlxc_cpu_set_threads(int n);
/* MLX's affine 4-/8-bit packing (group size 32, 64 or 128) back to float32
 * (out, in), on the CPU, rows split over the same threads: the prefill path
 * multiplies quantized weights as float32 (MLX's own dequantize is several
 * times slower). */
int mlxc_cpu_dequantize(mlxc_array w, mlxc_array scales, mlxc_array biases,
                        int group_size, int bits, mlxc_array* out);
/* The decode step's fused kernels on the CPU (cpu_step.cpp): what
 * amlx/models/decode_attention.py and step_kernels.py compute on CUDA.
 * Attention of one new token per row: out = (out (B, H*D), kv_new (2, B, KVH,
 * 1, D)); q_norm/k_norm both or neither (0); kv a contiguous cache (2, B,
 * KVH, capacity, D) or with `table` (B, width) int32 a block pool (2, blocks,
 * KVH, block_size, D), quantized (uint32, bits 4/8, group) where scales and
 * biases are given; window <= 0: none. */
int mlxc_cpu_decode_attention(mlxc_array qkv, mlxc_array q_norm, mlxc_array k_norm, mlxc_array inv_freq,
                              mlxc_array kv, mlxc_array scales, mlxc_array biases, mlxc_array pos,
                              mlxc_array table, int heads, float scale, int window, float eps, int bits,
                              int group, mlxc_vec out);
/* out = (x + y', rms_norm(x + y') * w) for x, y (N, C); y' = y, or
 * rms_norm(y) * pre_w where pre_w is not 0. */
int mlxc_cpu_residual_norm(mlxc_array x, mlxc_array y, mlxc_array w, float eps, mlxc_array pre_w,
                           float pre_eps, mlxc_vec out);
/* act(gate) * up for gate_up (N, 2I) = [gate | up]; act 0: silu, 1: gelu (tanh). */
int mlxc_cpu_gated_activation(mlxc_array gate_up, int act, mlxc_array* out);
/* a prompt's attention: q (B, H, L, D) at positions [end - L, end) against keys, values
 * (B, KVH, end, D), causal, at most `window` back (0: no window); out (B, L, H, D) */
int mlxc_cpu_prefill_attention(mlxc_array q, mlxc_array keys, mlxc_array values, float scale, int window,
                               mlxc_array* out);
/* A leaf array on a's buffer that does not hold it (buffer_view.cpp): readers
 * through it leave MLX free to write a in place. For readers on a's stream
 * launched after a, while a's buffer lives. *out = 0 when a is not a whole
 * evaluated row-contiguous buffer. */
int mlxc_buffer_view(mlxc_array a, mlxc_array* out);
/* mlxc_buffer_view of each of arrays[0..n) into out[0..n), all or none: out[0] = 0
 * (and no handles) when one of them is not such a buffer. */
int mlxc_buffer_views(const mlxc_array* arrays, size_t n, mlxc_array* out);
/* 1 when glibc's mmap and trim thresholds were raised as this library loaded
 * (malloc_tuning.cpp; AMLX_MALLOC_TUNING=0 turns it off), else 0. */
int mlxc_malloc_tuned(void);
const char* mlxc_cpu_gemv_isa(void);      /* "avx512", "avxvnni", "avx2" or "generic" */
int mlxc_cpu_gemv_set_isa(const char* isa);  /* one of those, or "best" */
/* the int8 kernels that go with it: "avx512vnni", "avxvnni", "avx2" or "generic" */
const char* mlxc_cpu_gemv_int8_isa(void);
/* the bf16 kernel for bf16 weights against bf16 x, any rows: "amx" (tiles), "avx512bf16"
 * (vdpbf16ps) or "off"; set one of those or "best" (error if unknown or this CPU lacks it) */
const char* mlxc_cpu_gemv_bf16(void);
int mlxc_cpu_gemv_bf16_available(const char* name);
int mlxc_cpu_gemv_set_bf16(const char* name);

/* Construction. `data` is copied; for MLXC_BFLOAT16 it holds the raw 16-bit
 * patterns. */
int mlxc_array_from_data(const void* data, const int* shape, int ndim,
                         int dtype, mlxc_array* out);
/* The same, for data on its way to the GPU (a step's token masks): on CUDA the
 * driver copies it into the new array's memory, where MLX's copy would write
 * managed memory the GPU last held, page by page (device_copy.cpp). Elsewhere,
 * or if the driver cannot, as mlxc_array_from_data. */
int mlxc_array_upload(const void* data, const int* shape, int ndim, int dtype, mlxc_array* out);
/* 1 where mlxc_array_upload copies with the CUDA driver, else 0. */
int mlxc_upload_by_driver(void);
/* nbytes of page-locked host memory, from which mlxc_array_upload is a DMA with no
 * staging copy; NULL where mlxc_upload_by_driver() is 0 or the driver refused.
 * Freed with mlxc_pinned_free (NULL is ignored). */
void* mlxc_pinned_alloc(size_t nbytes);
void mlxc_pinned_free(void* p);
int mlxc_array_from_double(double value, int dtype, mlxc_array* out);
int mlxc_array_from_int(int64_t value, int dtype, mlxc_array* out);
int mlxc_array_from_bool(int value, mlxc_array* out);
int mlxc_array_clone(mlxc_array a, mlxc_array* out); /* a new handle, same array */

/* Metadata (never evaluates). */
int mlxc_array_ndim(mlxc_array a);
int mlxc_array_shape(mlxc_array a, int* shape); /* fills ndim entries */
int mlxc_array_dtype(mlxc_array a);
size_t mlxc_array_size(mlxc_array a);
size_t mlxc_array_nbytes(mlxc_array a);
size_t mlxc_dtype_size(int dtype);

/* Evaluation and read-back. copy_out evaluates and writes the array in row-major
 * order, whatever its layout (transposed, broadcast, strided views). */
int mlxc_eval(const mlxc_array* arrays, size_t n);
int mlxc_async_eval(const mlxc_array* arrays, size_t n);
/* 1 if the array's value is computed (launched work finished), else 0; never waits. */
int mlxc_array_is_ready(mlxc_array a);
/* Diagnostics: the not yet computed part of the graph behind `arrays`, as
 * "Name count" lines (one per primitive kind, most frequent first) into buf,
 * with the total number of nodes in *nodes. */
int mlxc_graph_summary(const mlxc_array* arrays, size_t n, char* buf, size_t buflen, size_t* nodes);
int mlxc_array_copy_out(mlxc_array a, void* dst, size_t nbytes);

/* Lists of arrays. */
int mlxc_vec_new(mlxc_vec* out);
void mlxc_vec_free(mlxc_vec v);
size_t mlxc_vec_size(mlxc_vec v);
int mlxc_vec_get(mlxc_vec v, size_t i, mlxc_array* out);
int mlxc_vec_push(mlxc_vec v, mlxc_array a);
/* One call for many: append arrays[0..n) to v; move all of v's n arrays into new
 * handles in out[0..n) (n must be v's size; v is left empty). */
int mlxc_vec_push_many(mlxc_vec v, const mlxc_array* arrays, size_t n);
int mlxc_vec_take(mlxc_vec v, mlxc_array* out, size_t n);

/* Elementwise and general ops. */
int mlxc_unary(int op, mlxc_array a, mlxc_array* out);
/* The binary ops return the result, 0 on failure (mlxc_last_error says
 * why): the operators' hot path, without an out-parameter for the caller to
 * allocate per op (benchmarks/ffi_overhead.py). */
mlxc_array mlxc_binary_r(int op, mlxc_array a, mlxc_array b);
/* op(a, value) with a Python scalar, weakly typed as in MLX's own bindings
 * (the scalar takes a's dtype where it can hold it); reflected: op(value, a). */
mlxc_array mlxc_binary_float_r(int op, mlxc_array a, double value, int reflected);
mlxc_array mlxc_binary_int_r(int op, mlxc_array a, int64_t value, int reflected);
int mlxc_reduce(int op, mlxc_array a, const int* axes, int naxes, int keepdims,
                mlxc_array* out);
int mlxc_axis(int op, mlxc_array a, int axis, int flag_a, int flag_b,
              mlxc_array* out); /* argmax/argmin: flag_a=keepdims;
                                   cum*: flag_a=reverse, flag_b=inclusive */
int mlxc_addmm(mlxc_array c, mlxc_array a, mlxc_array b, float alpha,
               float beta, mlxc_array* out);
int mlxc_where(mlxc_array cond, mlxc_array x, mlxc_array y, mlxc_array* out);
int mlxc_clip(mlxc_array a, mlxc_array lo, mlxc_array hi,
              mlxc_array* out); /* lo or hi may be 0 (none) */
int mlxc_astype(mlxc_array a, int dtype, mlxc_array* out);
int mlxc_view(mlxc_array a, int dtype, mlxc_array* out);
int mlxc_topk(mlxc_array a, int k, int axis, mlxc_array* out);
int mlxc_argpartition(mlxc_array a, int kth, int axis, mlxc_array* out);
int mlxc_tri(mlxc_array a, int k, int upper, mlxc_array* out); /* tril/triu */

/* Shapes. */
int mlxc_reshape(mlxc_array a, const int* shape, int ndim, mlxc_array* out);
int mlxc_transpose(mlxc_array a, const int* axes, int naxes,
                   mlxc_array* out); /* naxes < 0: reverse */
int mlxc_swapaxes(mlxc_array a, int axis1, int axis2, mlxc_array* out);
int mlxc_expand_dims(mlxc_array a, const int* axes, int naxes, mlxc_array* out);
int mlxc_squeeze(mlxc_array a, const int* axes, int naxes,
                 mlxc_array* out); /* naxes < 0: all size-1 axes */
int mlxc_broadcast_to(mlxc_array a, const int* shape, int ndim,
                      mlxc_array* out);
int mlxc_concatenate(mlxc_vec arrays, int axis, mlxc_array* out);
int mlxc_stack(mlxc_vec arrays, int axis, mlxc_array* out);
int mlxc_split(mlxc_array a, const int* indices, int nindices, int sections,
               int axis, mlxc_vec out); /* sections > 0: equal parts */

/* Slicing, static and with array offsets. */
int mlxc_slice(mlxc_array a, const int* start, const int* stop,
               const int* strides, int ndim, mlxc_array* out);
int mlxc_slice_dynamic(mlxc_array a, mlxc_array start, const int* axes,
                       int naxes, const int* sizes, int ndim, mlxc_array* out);
int mlxc_slice_update(mlxc_array src, mlxc_array update, const int* start,
                      const int* stop, const int* strides, int ndim,
                      mlxc_array* out);
int mlxc_slice_update_dynamic(mlxc_array src, mlxc_array update,
                              mlxc_array start, const int* axes, int naxes,
                              mlxc_array* out);

/* Gathers and scatters. axis_is_none: take over the flattened array. */
int mlxc_take(mlxc_array a, mlxc_array indices, int axis, int axis_is_none,
              mlxc_array* out);
int mlxc_take_along_axis(mlxc_array a, mlxc_array indices, int axis,
                         mlxc_array* out);
int mlxc_put_along_axis(mlxc_array a, mlxc_array indices, mlxc_array values,
                        int axis, mlxc_array* out);

/* Creation. */
int mlxc_full(const int* shape, int ndim, mlxc_array value, int dtype,
              mlxc_array* out);
int mlxc_arange(double start, double stop, double step, int dtype,
                mlxc_array* out);

/* Random. `key` may be 0 (MLX's global key). */
int mlxc_random_seed(uint64_t seed);
int mlxc_random_key(uint64_t seed, mlxc_array* out);
int mlxc_random_split(mlxc_array key, int num, mlxc_array* out);
int mlxc_random_uniform(mlxc_array low, mlxc_array high, const int* shape,
                        int ndim, int dtype, mlxc_array key, mlxc_array* out);
int mlxc_random_normal(const int* shape, int ndim, int dtype, float loc,
                       float scale, mlxc_array key, mlxc_array* out);
int mlxc_random_randint(mlxc_array low, mlxc_array high, const int* shape,
                        int ndim, int dtype, mlxc_array key, mlxc_array* out);
int mlxc_random_categorical(mlxc_array logits, int axis, int num_samples,
                            mlxc_array key, mlxc_array* out); /* num_samples<=0: one */
int mlxc_random_gumbel(const int* shape, int ndim, int dtype, mlxc_array key,
                       mlxc_array* out);

/* Quantization (MLX's affine mode). */
int mlxc_quantize(mlxc_array w, int group_size, int bits, mlxc_vec out);
int mlxc_dequantize(mlxc_array w, mlxc_array scales, mlxc_array biases,
                    int group_size, int bits, int dtype, /* dtype < 0: default */
                    mlxc_array* out);
int mlxc_quantized_matmul(mlxc_array x, mlxc_array w, mlxc_array scales,
                          mlxc_array biases, int transpose, int group_size,
                          int bits, mlxc_array* out);

/* Fused kernels (mlx::core::fast). Optional arrays may be 0 (none); base is NaN when
 * `freqs` is given. */
int mlxc_rms_norm(mlxc_array x, mlxc_array weight, float eps, mlxc_array* out);
int mlxc_layer_norm(mlxc_array x, mlxc_array weight, mlxc_array bias, float eps,
                    mlxc_array* out);
int mlxc_rope(mlxc_array x, int dims, int traditional, float base, float scale,
              int offset, mlxc_array freqs, mlxc_array* out);
int mlxc_rope_dynamic(mlxc_array x, int dims, int traditional, float base,
                      float scale, mlxc_array offset, mlxc_array freqs,
                      mlxc_array* out);
int mlxc_sdpa(mlxc_array q, mlxc_array k, mlxc_array v, float scale,
              const char* mask_mode, mlxc_array mask, mlxc_array* out);

/* Transformations over caller functions. */
int mlxc_compile(mlxc_fn fn, void* payload, int shapeless, mlxc_closure* out);
void mlxc_closure_free(mlxc_closure c);
/* Runs a compiled function on n_in input handles; its outputs go into `outputs`. */
int mlxc_closure_call(mlxc_closure c, const mlxc_array* inputs, size_t n_in, mlxc_vec outputs);
int mlxc_vjp(mlxc_fn fn, void* payload, mlxc_vec primals, mlxc_vec cotangents,
             mlxc_vec outputs, mlxc_vec vjps);
int mlxc_value_and_grad(mlxc_fn fn, void* payload, mlxc_vec inputs,
                        const int* argnums, int nargnums, mlxc_vec values,
                        mlxc_vec grads);

/* Safetensors. */
int mlxc_st_load(const char* path, mlxc_st* out);
void mlxc_st_free(mlxc_st st);
size_t mlxc_st_count(mlxc_st st);
const char* mlxc_st_name(mlxc_st st, size_t i);
int mlxc_st_array(mlxc_st st, size_t i, mlxc_array* out);
size_t mlxc_st_meta_count(mlxc_st st);
const char* mlxc_st_meta_key(mlxc_st st, size_t i);
const char* mlxc_st_meta_value(mlxc_st st, size_t i);
int mlxc_st_save(const char* path, const char** names, const mlxc_array* arrays,
                 size_t n, const char** meta_keys, const char** meta_values,
                 size_t nmeta);

/* Memory counters (bytes) and limits. */
int mlxc_memory_active(size_t* out);
int mlxc_memory_peak(size_t* out);
int mlxc_memory_cache(size_t* out);
int mlxc_memory_reset_peak(void);
int mlxc_memory_clear_cache(void);
int mlxc_memory_get_limit(size_t* out);
int mlxc_memory_set_limit(size_t limit, size_t* previous);
int mlxc_memory_set_cache_limit(size_t limit, size_t* previous);

/* Devices (0 = cpu, 1 = gpu) and streams. */
int mlxc_gpu_available(void);
int mlxc_default_device(void);
int mlxc_set_default_device(int device);
int mlxc_new_stream(int device, int* index);
int mlxc_set_default_stream(int device, int index);
int mlxc_synchronize(void);

/* Custom CUDA kernels (JIT-compiled by MLX's CUDA backend; only that backend
 * can run them). `source` is the kernel body; MLX writes the signature from
 * the input/output names. Applying one: output shapes are given flattened
 * (out_ndims[i] ints each); grid is in threads; template arguments are
 * named ints (kind 0), bools (kind 1) or dtypes (kind 2). */
int mlxc_cuda_available(void);
int mlxc_cuda_kernel_new(const char* name, const char** input_names, size_t n_in,
                         const char** output_names, size_t n_out, const char* source,
                         const char* header, int ensure_row_contiguous, int shared_memory,
                         mlxc_kernel* out);
int mlxc_cuda_kernel_free(mlxc_kernel k);
int mlxc_cuda_kernel_apply(mlxc_kernel k, const mlxc_array* inputs, size_t n_in,
                           const int* out_shapes, const int* out_ndims, const int* out_dtypes,
                           size_t n_out, int gx, int gy, int gz, int tx, int ty, int tz,
                           const char** tmpl_names, const int* tmpl_kinds, const int* tmpl_values,
                           size_t n_tmpl, mlxc_vec outputs);

/* ---- distributed (vendor/mlxc/distributed.cpp) --------------------------
 * MLX's collectives (mlx::core::distributed) for tensor parallelism. These
 * functions keep their own thread-local error text:
 * mlxc_distributed_last_error(). A group is an owned handle (mlxc_group_free).
 * Backends: "ring" (TCP; env MLX_RANK and MLX_HOSTFILE), "nccl", "mpi",
 * "jaccl", or "any". Ops are lazy like every other op: the communication
 * happens when the result is evaluated. */
typedef struct mlxc_group_s* mlxc_group;
const char* mlxc_distributed_last_error(void);
int mlxc_distributed_is_available(const char* backend); /* 1 or 0, never fails */
int mlxc_distributed_init(const char* backend, int strict, mlxc_group* out);
/* Forgets the groups MLX caches per backend name (held groups stay usable):
 * the next init connects anew, e.g. to freshly launched peers. */
int mlxc_distributed_clear_backends(void);
void mlxc_group_free(mlxc_group g);
int mlxc_group_rank(mlxc_group g);
int mlxc_group_size(mlxc_group g);
int mlxc_all_sum(mlxc_array x, mlxc_group g, mlxc_array* out);
int mlxc_all_gather(mlxc_array x, mlxc_group g, mlxc_array* out); /* along axis 0 */
int mlxc_send(mlxc_array x, int dst, mlxc_group g, mlxc_array* out);
int mlxc_recv_like(mlxc_array like, int src, mlxc_group g, mlxc_array* out);
/* ---- end distributed ---------------------------------------------------- */

/* cdef-end */

#ifdef __cplusplus
}
#endif

#endif /* MLXC_H */
