// A prompt's attention on the CPU, as an MLX primitive: queries at positions
// [start, end) of each row against its keys and values at [0, end), causal, at
// most `window` back where the layer has a window, in float32 with the softmax
// computed block by block (a running maximum and sum per query, as flash
// attention does), the heads sharing a KV head reading it in turn.
//
// Why: MLX's CPU attention for a prompt multiplies the whole (L, end) score matrix
// through sgemm, masks it with a select and takes the softmax with a scalar exp
// that calls libm's fmaf for each value (MLX's CPU build has no FMA). For a
// 512-token bf16 prompt of Qwen3-0.6B's shape on a Zen 5 that was as much time as
// all the layers' matrix products; here causal blocks above the diagonal are
// never computed and the exp is a polynomial the compiler vectorizes.
//
// Each query's result depends on its position alone: keys are taken in blocks of
// kKeys aligned to key 0, a block's scores are summed over D in one order, and a
// block that holds none of a query's keys leaves its running state exactly as it
// was (a factor of exactly 1, nothing added). So a prompt's rows come out the same
// whole, in chunks, behind a cached prefix or beside other prompts.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "gemv.h"
#include "internal.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace {

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define MLXC_ATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("O3")))
#else
#define MLXC_ATTN_CLONES
#endif

constexpr int kQueries = 16;  // query rows of a task
constexpr int kKeys = 64;     // keys of a block
constexpr int kMaxDim = 256;  // head dims up to this (Gemma 3's 256 included)

// exp(x) for x <= 0 (scores minus their running maximum), to about 2e-7 relative: x = n ln2
// + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial to r^7, then 2^n in the exponent bits.
// Branch-free, so the loop over a block vectorizes. Below -87 the result is 0: such a weight
// is below float32's normal range beside the maximum's weight of 1.
MLXC_ATTN_CLONES void exp_block(float* x, int n) {
  for (int i = 0; i < n; ++i) {
    const float v = x[i];
    const float c = std::max(v, -87.0f);
    const float t = c * 1.44269504088896341f + 12582912.0f;  // adding 1.5 * 2^23 rounds to an integer
    const float fn = t - 12582912.0f;
    const float r = (c - fn * 0.693145751953125f) - fn * 1.42860682030941723e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)fn + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &bits, 4);
    x[i] = v < -87.0f ? 0.0f : p * scale;
  }
}

// s[r][j] = q[r] . kt[.][j] for rows r < rows, over d < dim: keys along the vector lanes.
MLXC_ATTN_CLONES void scores(const float* q, int rows, const float* kt, int dim, float* s) {
  for (int r = 0; r < rows; ++r) {
    float acc[kKeys] = {};
    const float* qr = q + r * kMaxDim;
    for (int d = 0; d < dim; ++d) {
      const float a = qr[d];
      const float* k = kt + d * kKeys;
      for (int j = 0; j < kKeys; ++j) acc[j] += a * k[j];
    }
    std::memcpy(s + r * kKeys, acc, sizeof(acc));
  }
}

// o[r] = o[r] * f[r] + sum_j p[r][j] v[j] for rows r < rows (v's rows `dim` apart): each row's
// sums held in registers over the block's keys where DIM, the head dim, is a compile-time
// constant (through memory every key reloaded and stored them); DIM 0 takes `dim` at run time.
template <int DIM>
MLXC_ATTN_CLONES void weigh(float* o, const float* f, const float* p, int rows, const float* __restrict v, int dim) {
  if constexpr (DIM != 0) dim = DIM;
  for (int r = 0; r < rows; ++r) {
    float acc[DIM != 0 ? DIM : kMaxDim];
    float* __restrict orow = o + r * kMaxDim;
    const float fr = f[r];
    for (int d = 0; d < dim; ++d) acc[d] = orow[d] * fr;
    const float* pr = p + r * kKeys;
    for (int j = 0; j < kKeys; ++j) {
      const float w = pr[j];
      const float* __restrict vj = v + j * dim;
      for (int d = 0; d < dim; ++d) acc[d] += w * vj[d];
    }
    for (int d = 0; d < dim; ++d) orow[d] = acc[d];
  }
}

void weigh_dims(float* o, const float* f, const float* p, int rows, const float* v, int dim) {
  switch (dim) {
    case 64: return weigh<64>(o, f, p, rows, v, dim);
    case 128: return weigh<128>(o, f, p, rows, v, dim);
    case 256: return weigh<256>(o, f, p, rows, v, dim);
    default: return weigh<0>(o, f, p, rows, v, dim);
  }
}

// n values of `kind` (mlxc::gemv::Kind) from element i0 of p, as float32.
void to_floats(const void* p, int kind, long i0, long n, float* dst) {
  if (kind == mlxc::gemv::BF16) return mlxc::bf16_to_floats(static_cast<const uint16_t*>(p) + i0, dst, n);
  if (kind == mlxc::gemv::F32) return (void)std::memcpy(dst, static_cast<const float*>(p) + i0, n * sizeof(float));
  for (long i = 0; i < n; ++i) dst[i] = mlxc::gemv::load_scalar(p, kind, i0 + i);
}

struct Shape {
  int B, H, KVH, L, end, D, start, window;
  float scale;
  int key_blocks() const { return (end + kKeys - 1) / kKeys; }
};

// The inputs as float32: queries times the scale (B, H, L, D); each row's and KV head's keys
// in blocks of kKeys, each block transposed, (B, KVH, blocks, D, kKeys); values
// (B, KVH, blocks * kKeys, D); both zero past `end`.
struct Floats {
  std::vector<float> q, kt, v;
};

// A 4-D input read a row of its last axis at a time: the rows may be strided (keys and values
// are slices of the gathered cache), the last axis is contiguous (else a packed copy).
struct Rows {
  const void* data;
  int kind;
  long s0, s1, s2;
  std::vector<char> copy;
  explicit Rows(const mx::array& a) : kind(mlxc::float_kind(a.dtype())) {
    if (a.strides(3) == 1 || a.shape(3) == 1) {
      data = a.data<void>();
      s0 = a.strides(0), s1 = a.strides(1), s2 = a.strides(2);
    } else {
      data = mlxc::row_major(a, copy);
      s2 = a.shape(3), s1 = s2 * a.shape(2), s0 = s1 * a.shape(1);
    }
  }
  long at(int i0, int i1, int i2) const { return i0 * s0 + i1 * s1 + i2 * s2; }
};

void prepare(const Shape& s, const Rows& q, const Rows& k, const Rows& v, Floats& f) {
  const int D = s.D, nb = s.key_blocks();
  const long span = (long)nb * kKeys;
  f.q.resize((size_t)s.B * s.H * s.L * D);
  f.kt.assign((size_t)s.B * s.KVH * span * D, 0.0f);
  f.v.assign((size_t)s.B * s.KVH * span * D, 0.0f);
  const int heads = s.B * s.H, all = heads + s.B * s.KVH, parts = std::max(1, std::min(all, 64));
  mlxc::parallel_for(parts, [&](int part) {
    std::vector<float> row((size_t)kKeys * D);
    for (int t = part; t < all; t += parts) {
      if (t < heads) {
        float* dst = f.q.data() + (long)t * s.L * D;
        for (int i = 0; i < s.L; ++i) to_floats(q.data, q.kind, q.at(t / s.H, t % s.H, i), D, dst + (long)i * D);
        for (long i = 0; i < (long)s.L * D; ++i) dst[i] *= s.scale;
        continue;
      }
      const int bg = t - heads, b = bg / s.KVH, g = bg % s.KVH;
      float* vdst = f.v.data() + (long)bg * span * D;
      for (int i = 0; i < s.end; ++i) to_floats(v.data, v.kind, v.at(b, g, i), D, vdst + (long)i * D);
      for (int kb = 0; kb < nb; ++kb) {
        const int n = std::min(kKeys, s.end - kb * kKeys);
        for (int j = 0; j < n; ++j) to_floats(k.data, k.kind, k.at(b, g, kb * kKeys + j), D, row.data() + (long)j * D);
        float* kt = f.kt.data() + ((long)bg * nb + kb) * D * kKeys;
        for (int j = 0; j < n; ++j)
          for (int d = 0; d < D; ++d) kt[d * kKeys + j] = row[j * D + d];
      }
    }
  });
}

// Query rows [q0, q0 + kQueries) of row b, head h: out (B, L, H, D) in the output's dtype `T`.
template <typename T>
void task(const Shape& s, const Floats& in, T* out, int b, int h, int q0, std::vector<float>& buf) {
  const int D = s.D, rows = std::min(kQueries, s.L - q0), g = h / (s.H / s.KVH), nb = s.key_blocks();
  buf.resize((size_t)2 * kQueries * kMaxDim + (size_t)kQueries * kKeys + 3 * kQueries);
  float* qs = buf.data();                   // the queries, kMaxDim apart (rows, kMaxDim)
  float* acc = qs + kQueries * kMaxDim;     // running weighted sums of values (rows, kMaxDim)
  float* sc = acc + kQueries * kMaxDim;     // scores, then weights (rows, kKeys)
  float* m = sc + kQueries * kKeys;         // running maximum per query
  float* l = m + kQueries;                  // running sum of weights per query
  float* f = l + kQueries;                  // this block's factor on the state
  const float* q = in.q.data() + (((long)b * s.H + h) * s.L + q0) * D;
  for (int r = 0; r < rows; ++r) {
    std::memcpy(qs + r * kMaxDim, q + (long)r * D, D * sizeof(float));
    std::fill(acc + r * kMaxDim, acc + r * kMaxDim + D, 0.0f);
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  const int first = s.start + q0, last = first + rows - 1;  // the block's query positions
  const int lo = s.window > 0 ? std::max(0, first - s.window + 1) : 0;
  const long bg = (long)b * s.KVH + g;
  for (int kb = lo / kKeys; kb * kKeys <= last; ++kb) {
    const int k0 = kb * kKeys, n = std::min(kKeys, s.end - k0);
    scores(qs, rows, in.kt.data() + (bg * nb + kb) * (long)D * kKeys, D, sc);
    for (int r = 0; r < rows; ++r) {
      const int pos = first + r;
      float* sr = sc + r * kKeys;
      float top = -INFINITY;
      for (int j = 0; j < kKeys; ++j) {
        const int key = k0 + j;
        const bool seen = j < n && key <= pos && (s.window <= 0 || key > pos - s.window);
        sr[j] = seen ? sr[j] : -INFINITY;
        top = std::max(top, sr[j]);
      }
      const float mnew = std::max(m[r], top);
      if (mnew == -INFINITY) {  // none of this query's keys yet: its state stays as it is
        f[r] = 1.0f;
        std::fill(sr, sr + kKeys, 0.0f);
        continue;
      }
      f[r] = m[r] == -INFINITY ? 0.0f : std::exp(m[r] - mnew);
      for (int j = 0; j < kKeys; ++j) sr[j] -= mnew;  // (-inf stays -inf: its weight is 0)
      exp_block(sr, kKeys);
      float sum = 0.0f;
      for (int j = 0; j < kKeys; ++j) sum += sr[j];
      l[r] = l[r] * f[r] + sum;
      m[r] = mnew;
    }
    weigh_dims(acc, f, sc, rows, in.v.data() + (bg * nb * kKeys + k0) * D, D);
  }
  for (int r = 0; r < rows; ++r) {
    const float inv = 1.0f / l[r];
    T* o = out + (((long)b * s.L + q0 + r) * s.H + h) * D;
    for (int d = 0; d < D; ++d) o[d] = static_cast<T>(acc[r * kMaxDim + d] * inv);
  }
}

template <typename T>
void run(const std::vector<mx::array>& in, mx::array& out, const Shape& s) {
  Floats f;
  prepare(s, Rows(in[0]), Rows(in[1]), Rows(in[2]), f);
  const int blocks = (s.L + kQueries - 1) / kQueries, tasks = s.B * s.H * blocks;
  // Tasks interleaved over the parts: causal work grows along the prompt.
  const int parts = std::max(1, std::min(tasks, 64));
  T* o = out.data<T>();
  mlxc::parallel_for(parts, [&](int part) {
    std::vector<float> buf;
    for (int t = part; t < tasks; t += parts) {
      const int qb = t % blocks, bh = t / blocks;
      task<T>(s, f, o, bh / s.H, bh % s.H, qb * kQueries, buf);
    }
  });
}

class CpuPrefillAttention : public mx::UnaryPrimitive {
 public:
  CpuPrefillAttention(mx::Stream st, float scale, int window) : mx::UnaryPrimitive(st), scale_(scale), window_(window) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    const mx::array& q = inputs[0];
    const Shape s{q.shape(0), q.shape(1), inputs[1].shape(1), q.shape(2), inputs[1].shape(2), q.shape(3),
                  inputs[1].shape(2) - q.shape(2), window_, scale_};
    encoder.dispatch([inputs, out = mx::array::unsafe_weak_copy(out), s]() mutable {
      switch (out.dtype()) {
        case mx::float32:
          run<float>(inputs, out, s);
          break;
        case mx::float16:
          run<mx::float16_t>(inputs, out, s);
          break;
        default:
          run<mx::bfloat16_t>(inputs, out, s);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("cpu_prefill_attention runs on the CPU only");
  }

  const char* name() const override { return "CpuPrefillAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuPrefillAttention&>(other);
    return scale_ == o.scale_ && window_ == o.window_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const mx::array& q = inputs[0];
    return {{q.shape(0), q.shape(2), q.shape(1), q.shape(3)}};
  }

 private:
  float scale_;
  int window_;
};

}  // namespace

mx::array mlxc::cpu_prefill_attention(const mx::array& q, const mx::array& keys, const mx::array& values, float scale,
                                      int window) {
  mx::Stream s = mlxc::cpu_stream("cpu_prefill_attention");
  if (q.ndim() != 4 || keys.ndim() != 4 || keys.shape() != values.shape() || keys.dtype() != values.dtype() ||
      !mlxc::is_float(q.dtype()) || !mlxc::is_float(keys.dtype())) {
    throw std::invalid_argument("cpu_prefill_attention: q (B, H, L, D) and keys, values (B, KVH, end, D) of floats");
  }
  const int B = q.shape(0), H = q.shape(1), L = q.shape(2), D = q.shape(3), KVH = keys.shape(1);
  if (keys.shape(0) != B || keys.shape(3) != D || KVH < 1 || H % KVH != 0 || keys.shape(2) < L || L < 1) {
    throw std::invalid_argument("cpu_prefill_attention: keys must be (B, KVH, end, D) with KVH dividing H and end >= L");
  }
  if (D > kMaxDim) throw std::invalid_argument("cpu_prefill_attention: head dim above " + std::to_string(kMaxDim));
  if ((long)B * H * ((L + kQueries - 1) / kQueries) > (1L << 30)) {
    throw std::invalid_argument("cpu_prefill_attention: too many heads and positions");
  }
  return mx::array({B, L, H, D}, q.dtype(), std::make_shared<CpuPrefillAttention>(s, scale, std::max(window, 0)),
                   {q, keys, values});
}
