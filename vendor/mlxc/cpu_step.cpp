// The decode step's fused kernels on the CPU, as MLX primitives: one new token's
// attention (head norms, rotation, attention over the cache through a block
// table), residual add with RMSNorm, and the gated activation of the MLP.
//
// They compute what amlx/models/decode_attention.py and step_kernels.py compute
// on CUDA, rounded at the same places (see those files for the layouts). On the
// CPU a decode step of a small model is bound by host work per graph node (MLX
// builds, schedules and hands every node to its stream's thread): the plain ops
// of one layer's attention are about fifty nodes (norms, rotation, gather,
// matmuls, softmax, select), here they are one.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "gemv.h"
#include "internal.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace {

// Work (multiply-adds) below which a kernel stays on its stream's thread: handing
// parts to the pool costs a few microseconds.
constexpr long kParallelWork = 1 << 15;

// x rounded to T, back as float (where the CUDA kernels and MLX's ops round).
template <typename T>
inline float rnd(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// The attention's inner loops, compiled for AVX2 + FMA as well where the compiler can make
// clones picked at load (GCC's ifunc on x86-64 Linux); the build's own flags keep SSE2 only.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define MLXC_VEC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), optimize("O3")))
#else
#define MLXC_VEC_CLONES
#endif

}  // namespace

MLXC_VEC_CLONES void mlxc::bf16_to_floats(const uint16_t* bits, float* dst, long n) {
  for (long i = 0; i < n; ++i) dst[i] = mlxc::gemv::bf16_to_float(bits[i]);
}

bool mlxc::is_float(const mx::Dtype& d) { return d == mx::float32 || d == mx::float16 || d == mx::bfloat16; }

mx::Stream mlxc::cpu_stream(const char* what) {
  mx::Stream s = mx::to_stream({});
  if (s.device.type != mx::Device::cpu) throw std::invalid_argument(std::string(what) + " runs on the CPU only");
  return s;
}

namespace {

using mlxc::bf16_to_floats;
using mlxc::cpu_stream;
using mlxc::is_float;

// n values of T as floats; bfloat16 by its bits (MLX's conversion, one value at a
// time, kept the loop scalar).
template <typename T>
inline void to_floats(const T* src, float* dst, int n) {
  if constexpr (std::is_same_v<T, mx::bfloat16_t>) {
    bf16_to_floats(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// Blocks of 8 independent lanes, so the compiler keeps them in vectors: a plain
// reduction loop is one dependent chain of adds (the compiler may not reorder it).
MLXC_VEC_CLONES float dot(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int d = 0;
  for (; d + 8 <= n; d += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[d + l] * b[d + l];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// y += w * x over n values.
MLXC_VEC_CLONES void axpy(float w, const float* x, float* y, int n) {
  int d = 0;
  for (; d + 8 <= n; d += 8)
    for (int l = 0; l < 8; ++l) y[d + l] += w * x[d + l];
  for (; d < n; ++d) y[d] += w * x[d];
}

// Each input's data row-major: its own buffer, or a packed copy where it is a
// strided view (rare: the model hands these kernels contiguous arrays). Making
// inputs contiguous in the graph instead would add a node per input.
struct Data {
  std::vector<const void*> ptr;
  std::vector<std::vector<char>> copies;

  explicit Data(const std::vector<mx::array>& in) : ptr(in.size()), copies(in.size()) {
    for (size_t i = 0; i < in.size(); ++i) ptr[i] = mlxc::row_major(in[i], copies[i]);
  }
};

// RMSNorm over n values in place, rounded as MLX's rms_norm rounds: the normalised
// value to T, then times the weight in T.
template <typename T>
void head_norm(float* x, const mx::array& w, const void* wp, int n, float eps) {
  float ss = 0.0f;
  for (int e = 0; e < n; ++e) ss += x[e] * x[e];
  const float r = 1.0f / std::sqrt(ss / n + eps);
  const int wk = mlxc::float_kind(w.dtype());
  for (int e = 0; e < n; ++e) x[e] = rnd<T>(mlxc::gemv::load_scalar(wp, wk, e) * rnd<T>(x[e] * r));
}

// Rotate-half rotary embedding of one head (D values) at position pos, rounded to T.
template <typename T>
void rope_half(float* x, const float* inv_freq, int dim, int pos) {
  const int half = dim / 2;
  for (int d = 0; d < half; ++d) {
    const float a = static_cast<float>(pos) * inv_freq[d];
    const float c = std::cos(a), s = std::sin(a);
    const float lo = x[d], hi = x[d + half];
    x[d] = rnd<T>(lo * c - hi * s);
    x[d + half] = rnd<T>(hi * c + lo * s);
  }
}

struct AttnParams {
  int heads, kv_heads, dim, window;
  float scale, eps;
  bool qk_norm, paged, quantized;
  int bits, group;
};

// Where slot j of row b's head kvh lives, and its D values as float.
template <typename T>
struct Reader {
  const AttnParams& p;
  const mx::array& kv;
  const T* dense = nullptr;        // plain cache or pool
  const uint32_t* words = nullptr;  // quantized pool
  const T* scales = nullptr;
  const T* biases = nullptr;
  const int32_t* table = nullptr;
  size_t table_width = 0, block_size = 1, value_offset = 0, capacity = 0, rows = 0;

  // Slot index (keys) of (b, kvh, j) in units of one head's values.
  size_t slot(int b, int kvh, int j) const {
    if (p.paged) {
      const size_t block = (size_t)table[(size_t)b * table_width + j / block_size];
      return (block * p.kv_heads + kvh) * block_size + j % block_size;
    }
    return ((size_t)b * p.kv_heads + kvh) * capacity + j;
  }

  void read(size_t s, float* out) const {
    const int D = p.dim;
    if (!p.quantized) {
      to_floats(dense + s * D, out, D);
      return;
    }
    const int per = 32 / p.bits, words_per = D / per, groups = D / p.group;
    const uint32_t mask = (1u << p.bits) - 1u;
    const uint32_t* w = words + s * words_per;
    const T* sc = scales + s * groups;
    const T* bi = biases + s * groups;
    for (int d = 0; d < D; ++d) {
      const float q = static_cast<float>((w[d / per] >> ((d % per) * p.bits)) & mask);
      const int g = d / p.group;
      out[d] = rnd<T>(rnd<T>(q * static_cast<float>(sc[g])) + static_cast<float>(bi[g]));
    }
  }
};

// inputs: qkv, [q_norm, k_norm], inv_freq, kv, [scales, biases], pos, [table]
template <typename T>
void attention(const AttnParams& p, const std::vector<mx::array>& in, mx::array& out, mx::array& kv_new) {
  const Data data(in);
  const auto& ptr = data.ptr;
  size_t i = 0;
  const T* x = static_cast<const T*>(ptr[i++]);
  const mx::array& qkv = in[0];
  const int qn = p.qk_norm ? (int)i++ : -1;
  const int kn = p.qk_norm ? (int)i++ : -1;
  const float* inv_freq = static_cast<const float*>(ptr[i++]);
  const mx::array& kv = in[i];
  Reader<T> r{p, kv};
  if (p.quantized) {
    r.words = static_cast<const uint32_t*>(ptr[i++]);
    r.scales = static_cast<const T*>(ptr[i++]);
    r.biases = static_cast<const T*>(ptr[i++]);
  } else {
    r.dense = static_cast<const T*>(ptr[i++]);
  }
  const int32_t* positions = static_cast<const int32_t*>(ptr[i++]);
  const int B = qkv.shape(0), H = p.heads, KVH = p.kv_heads, D = p.dim, G = H / KVH;
  if (p.paged) {
    const mx::array& table = in[i];
    r.table = static_cast<const int32_t*>(ptr[i++]);
    r.table_width = table.shape(1);
    r.block_size = kv.shape(3);
    r.value_offset = (size_t)kv.shape(1) * KVH * r.block_size;  // the values follow the keys
  } else {
    r.capacity = kv.shape(3);
    r.value_offset = (size_t)B * KVH * r.capacity;
  }
  T* o = out.data<T>();
  T* kvn = kv_new.data<T>();

  auto job = [&](int part) {
    const int b = part / KVH, kvh = part % KVH;
    const int last = positions[b];
    const int first = p.window > 0 ? std::max(0, last - p.window + 1) : 0;
    const int n = last - first + 1;
    const T* row = x + (size_t)b * (H + 2 * KVH) * D;
    std::vector<float> buf((size_t)(G + 3) * D + (size_t)G * n);
    float* q = buf.data();            // G heads' queries
    float* k = q + (size_t)G * D;     // the new key
    float* v = k + D;                 // the new value
    float* tmp = v + D;               // one slot's key or value
    float* s = tmp + D;               // scores (G, n), then weights
    to_floats(row + (size_t)(H + kvh) * D, k, D);
    to_floats(row + (size_t)(H + KVH + kvh) * D, v, D);
    if (kn >= 0) head_norm<T>(k, in[kn], ptr[kn], D, p.eps);
    rope_half<T>(k, inv_freq, D, last);
    for (int g = 0; g < G; ++g) {
      float* qg = q + (size_t)g * D;
      const int h = kvh * G + g;
      to_floats(row + (size_t)h * D, qg, D);
      if (qn >= 0) head_norm<T>(qg, in[qn], ptr[qn], D, p.eps);
      rope_half<T>(qg, inv_freq, D, last);
      for (int d = 0; d < D; ++d) qg[d] *= p.scale;
    }
    const size_t at = ((size_t)b * KVH + kvh) * D;
    for (int d = 0; d < D; ++d) {
      kvn[at + d] = static_cast<T>(k[d]);
      kvn[(size_t)B * KVH * D + at + d] = static_cast<T>(v[d]);
    }
    for (int j = first; j <= last; ++j) {
      const float* key = k;
      if (j < last) {
        r.read(r.slot(b, kvh, j), tmp);
        key = tmp;
      }
      for (int g = 0; g < G; ++g) s[(size_t)g * n + (j - first)] = dot(q + (size_t)g * D, key, D);
    }
    std::vector<float> acc((size_t)G * D, 0.0f), total(G, 0.0f);
    for (int g = 0; g < G; ++g) {
      float* sg = s + (size_t)g * n;
      float m = sg[0];
      for (int t = 1; t < n; ++t) m = std::max(m, sg[t]);
      for (int t = 0; t < n; ++t) {
        sg[t] = std::exp(sg[t] - m);
        total[g] += sg[t];
      }
    }
    for (int j = first; j <= last; ++j) {
      const float* val = v;
      if (j < last) {
        r.read(r.value_offset + r.slot(b, kvh, j), tmp);
        val = tmp;
      }
      for (int g = 0; g < G; ++g) axpy(s[(size_t)g * n + (j - first)], val, acc.data() + (size_t)g * D, D);
    }
    for (int g = 0; g < G; ++g) {
      T* dst = o + ((size_t)b * H + kvh * G + g) * D;
      const float inv_total = 1.0f / total[g];
      for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[(size_t)g * D + d] * inv_total);
    }
  };
  long work = 0;
  for (int b = 0; b < B; ++b) {
    const int last = positions[b];
    work += (long)(p.window > 0 ? std::min(last + 1, p.window) : last + 1) * H * D;
  }
  const int parts = B * KVH;
  if (work < kParallelWork || parts == 1) {
    for (int part = 0; part < parts; ++part) job(part);
  } else {
    mlxc::parallel_for(parts, job);
  }
}

class CpuDecodeAttention : public mx::Primitive {
 public:
  CpuDecodeAttention(mx::Stream s, AttnParams p) : mx::Primitive(s), p_(p) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    for (auto& o : outputs) encoder.set_output_array(o);
    encoder.dispatch([inputs, out = mx::array::unsafe_weak_copy(outputs[0]),
                      kv_new = mx::array::unsafe_weak_copy(outputs[1]), p = p_]() mutable {
      switch (out.dtype()) {
        case mx::float32:
          attention<float>(p, inputs, out, kv_new);
          break;
        case mx::float16:
          attention<mx::float16_t>(p, inputs, out, kv_new);
          break;
        default:
          attention<mx::bfloat16_t>(p, inputs, out, kv_new);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("cpu_decode_attention runs on the CPU only");
  }

  const char* name() const override { return "CpuDecodeAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuDecodeAttention&>(other).p_;
    return std::memcmp(&o, &p_, sizeof(AttnParams)) == 0;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const int B = inputs[0].shape(0);
    return {{B, p_.heads * p_.dim}, {2, B * p_.kv_heads, p_.dim}};
  }

 private:
  AttnParams p_;
};

// x, y (N, C); [pre_w (C)]; w (C) -> total = x + y' (rounded to T), normed =
// rms_norm(total) * w, y' = y or rms_norm(y) * pre_w.
template <typename T>
void residual_rows(const std::vector<mx::array>& in, bool pre, float eps, float pre_eps, mx::array& total,
                   mx::array& normed, int n0, int n1) {
  const Data data(in);
  const mx::array& wa = in[pre ? 3 : 2];
  const int C = in[0].shape(1);
  const T* x = static_cast<const T*>(data.ptr[0]);
  const T* y = static_cast<const T*>(data.ptr[1]);
  const void* w = data.ptr[pre ? 3 : 2];
  const void* pw = pre ? data.ptr[2] : nullptr;
  const int wk = mlxc::float_kind(wa.dtype()), pk = pre ? mlxc::float_kind(in[2].dtype()) : 0;
  T* t = total.data<T>();
  T* nr = normed.data<T>();
  std::vector<float> tv(C);
  for (int n = n0; n < n1; ++n) {
    const T* xr = x + (size_t)n * C;
    const T* yr = y + (size_t)n * C;
    float ry = 1.0f;
    if (pre) {
      float ssy = 0.0f;
      for (int c = 0; c < C; ++c) ssy += static_cast<float>(yr[c]) * static_cast<float>(yr[c]);
      ry = 1.0f / std::sqrt(ssy / C + pre_eps);
    }
    float ss = 0.0f;
    for (int c = 0; c < C; ++c) {
      const float yv = pre ? rnd<T>(mlxc::gemv::load_scalar(pw, pk, c) * rnd<T>(static_cast<float>(yr[c]) * ry))
                           : static_cast<float>(yr[c]);
      const float tc = rnd<T>(static_cast<float>(xr[c]) + yv);
      tv[c] = tc;
      ss += tc * tc;
    }
    const float r = 1.0f / std::sqrt(ss / C + eps);
    for (int c = 0; c < C; ++c) {
      t[(size_t)n * C + c] = static_cast<T>(tv[c]);
      nr[(size_t)n * C + c] = static_cast<T>(mlxc::gemv::load_scalar(w, wk, c) * rnd<T>(tv[c] * r));
    }
  }
}

// Rows [0, n) split over the pool where the work is worth it.
template <typename F>
void over_rows(int n, long work_per_row, F&& f) {
  const int parts = std::min(n, std::max(1, (int)std::min<long>(64, (long)n * work_per_row / kParallelWork)));
  if (parts <= 1) {
    f(0, n);
    return;
  }
  mlxc::parallel_for(parts, [&](int part) { f((int)((long)n * part / parts), (int)((long)n * (part + 1) / parts)); });
}

class CpuResidualNorm : public mx::Primitive {
 public:
  CpuResidualNorm(mx::Stream s, bool pre, float eps, float pre_eps)
      : mx::Primitive(s), pre_(pre), eps_(eps), pre_eps_(pre_eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    for (auto& o : outputs) encoder.set_output_array(o);
    encoder.dispatch([inputs, total = mx::array::unsafe_weak_copy(outputs[0]),
                      normed = mx::array::unsafe_weak_copy(outputs[1]), pre = pre_, eps = eps_,
                      pre_eps = pre_eps_]() mutable {
      const int N = inputs[0].shape(0), C = inputs[0].shape(1);
      over_rows(N, 3L * C, [&](int n0, int n1) {
        switch (total.dtype()) {
          case mx::float32:
            residual_rows<float>(inputs, pre, eps, pre_eps, total, normed, n0, n1);
            break;
          case mx::float16:
            residual_rows<mx::float16_t>(inputs, pre, eps, pre_eps, total, normed, n0, n1);
            break;
          default:
            residual_rows<mx::bfloat16_t>(inputs, pre, eps, pre_eps, total, normed, n0, n1);
        }
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("cpu_residual_norm runs on the CPU only");
  }

  const char* name() const override { return "CpuResidualNorm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuResidualNorm&>(other);
    return pre_ == o.pre_ && eps_ == o.eps_ && pre_eps_ == o.pre_eps_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape(), inputs[0].shape()};
  }

 private:
  bool pre_;
  float eps_, pre_eps_;
};

// gate_up (N, 2I) = [gate | up] per row -> (N, I) act(gate) * up; act 0 silu, 1 gelu (tanh).
template <typename T>
void gated_rows(const mx::array& gu, mx::array& out, int act, int n0, int n1) {
  const size_t I = out.shape(1);
  std::vector<char> tmp;
  const T* src = static_cast<const T*>(mlxc::row_major(gu, tmp));
  T* dst = out.data<T>();
  for (int n = n0; n < n1; ++n) {
    const T* g = src + (size_t)n * 2 * I;
    const T* u = g + I;
    T* o = dst + (size_t)n * I;
    for (size_t c = 0; c < I; ++c) {
      const float gv = static_cast<float>(g[c]);
      const float a = act == 0 ? gv / (1.0f + std::exp(-gv))
                               : 0.5f * gv * (1.0f + std::tanh(0.7978845608028654f * (gv + 0.044715f * gv * gv * gv)));
      o[c] = static_cast<T>(a * static_cast<float>(u[c]));
    }
  }
}

class CpuGatedActivation : public mx::UnaryPrimitive {
 public:
  CpuGatedActivation(mx::Stream s, int act) : mx::UnaryPrimitive(s), act_(act) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(inputs[0]);
    encoder.set_output_array(out);
    encoder.dispatch([gu = inputs[0], out = mx::array::unsafe_weak_copy(out), act = act_]() mutable {
      over_rows(out.shape(0), 8L * out.shape(1), [&](int n0, int n1) {
        switch (out.dtype()) {
          case mx::float32:
            gated_rows<float>(gu, out, act, n0, n1);
            break;
          case mx::float16:
            gated_rows<mx::float16_t>(gu, out, act, n0, n1);
            break;
          default:
            gated_rows<mx::bfloat16_t>(gu, out, act, n0, n1);
        }
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("cpu_gated_activation runs on the CPU only");
  }

  const char* name() const override { return "CpuGatedActivation"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return act_ == static_cast<const CpuGatedActivation&>(other).act_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[0].shape(1) / 2}};
  }

 private:
  int act_;
};

}  // namespace

const void* mlxc::row_major(const mx::array& a, std::vector<char>& tmp) {
  if (a.flags().row_contiguous) return a.data<void>();
  const size_t n = a.size(), item = a.itemsize();
  const int nd = a.ndim();
  tmp.resize(n * item);
  const char* src = a.data<char>();
  std::vector<int> idx(nd, 0);
  for (size_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (int d = 0; d < nd; ++d) off += (int64_t)idx[d] * a.strides(d);
    std::memcpy(&tmp[i * item], src + off * (int64_t)item, item);
    for (int d = nd - 1; d >= 0 && ++idx[d] == a.shape(d); --d) idx[d] = 0;
  }
  return tmp.data();
}


std::vector<mx::array> mlxc::cpu_decode_attention(const mx::array& qkv, const mx::array* q_norm,
                                                  const mx::array* k_norm, const mx::array& inv_freq,
                                                  const mx::array& kv, const mx::array* scales,
                                                  const mx::array* biases, const mx::array& pos,
                                                  const mx::array* table, int heads, float scale, int window,
                                                  float eps, int bits, int group) {
  mx::Stream s = cpu_stream("cpu_decode_attention");
  const bool quantized = scales != nullptr;
  if (qkv.ndim() != 2 || !is_float(qkv.dtype())) throw std::invalid_argument("cpu_decode_attention: qkv must be (B, n) floats");
  if (kv.ndim() != 5 || kv.shape(0) != 2) throw std::invalid_argument("cpu_decode_attention: kv must be (2, ., KVH, ., D)");
  const int B = qkv.shape(0), KVH = kv.shape(2);
  const int D = quantized ? kv.shape(4) * 32 / bits : kv.shape(4);
  if (heads < 1 || heads % KVH != 0 || qkv.shape(1) != (heads + 2 * KVH) * D || D % 2 != 0) {
    throw std::invalid_argument("cpu_decode_attention: qkv's width must be (heads + 2 * kv_heads) * head_dim");
  }
  if (pos.ndim() != 1 || pos.shape(0) != B || pos.dtype() != mx::int32) {
    throw std::invalid_argument("cpu_decode_attention: positions must be (B,) int32");
  }
  if (inv_freq.dtype() != mx::float32 || inv_freq.size() != (size_t)D / 2) {
    throw std::invalid_argument("cpu_decode_attention: inv_freq must be (head_dim / 2,) float32");
  }
  if ((q_norm == nullptr) != (k_norm == nullptr)) throw std::invalid_argument("cpu_decode_attention: q_norm and k_norm go together");
  if (quantized) {
    if (table == nullptr || biases == nullptr || (bits != 4 && bits != 8) || kv.dtype() != mx::uint32 ||
        group < 1 || D % group != 0 || scales->dtype() != qkv.dtype() || biases->dtype() != qkv.dtype()) {
      throw std::invalid_argument("cpu_decode_attention: a quantized pool needs a table, 4 or 8 bits, and scales "
                                  "and biases in qkv's dtype");
    }
  } else if (kv.dtype() != qkv.dtype()) {
    throw std::invalid_argument("cpu_decode_attention: kv must have qkv's dtype");
  }
  if (table != nullptr && (table->ndim() != 2 || table->shape(0) != B || table->dtype() != mx::int32)) {
    throw std::invalid_argument("cpu_decode_attention: the table must be (B, width) int32");
  }
  AttnParams p{};
  p.heads = heads;
  p.kv_heads = KVH;
  p.dim = D;
  p.window = window > 0 ? window : 0;
  p.scale = scale;
  p.eps = eps;
  p.qk_norm = q_norm != nullptr;
  p.paged = table != nullptr;
  p.quantized = quantized;
  p.bits = quantized ? bits : 0;
  p.group = quantized ? group : 0;
  std::vector<mx::array> inputs{qkv};
  if (q_norm) {
    inputs.push_back(*q_norm);
    inputs.push_back(*k_norm);
  }
  inputs.push_back(inv_freq);
  inputs.push_back(kv);
  if (quantized) {
    inputs.push_back(*scales);
    inputs.push_back(*biases);
  }
  inputs.push_back(pos);
  if (table) inputs.push_back(*table);
  return mx::array::make_arrays({{B, heads * D}, {2, B * KVH, D}}, {qkv.dtype(), qkv.dtype()},
                                std::make_shared<CpuDecodeAttention>(s, p), std::move(inputs));
}

std::vector<mx::array> mlxc::cpu_residual_norm(const mx::array& x, const mx::array& y, const mx::array& w, float eps,
                                               const mx::array* pre_w, float pre_eps) {
  mx::Stream s = cpu_stream("cpu_residual_norm");
  if (x.ndim() != 2 || x.shape() != y.shape() || x.dtype() != y.dtype() || !is_float(x.dtype())) {
    throw std::invalid_argument("cpu_residual_norm: x and y must be (N, C) floats of one dtype");
  }
  for (const mx::array* a : {&w, pre_w}) {
    if (a && (a->ndim() != 1 || a->shape(0) != x.shape(1) || !is_float(a->dtype()))) {
      throw std::invalid_argument("cpu_residual_norm: norm weights must be (C,) floats");
    }
  }
  std::vector<mx::array> inputs{x, y};
  if (pre_w) inputs.push_back(*pre_w);
  inputs.push_back(w);
  return mx::array::make_arrays({x.shape(), x.shape()}, {x.dtype(), x.dtype()},
                                std::make_shared<CpuResidualNorm>(s, pre_w != nullptr, eps, pre_eps),
                                std::move(inputs));
}

mx::array mlxc::cpu_gated_activation(const mx::array& gate_up, int act) {
  mx::Stream s = cpu_stream("cpu_gated_activation");
  if (gate_up.ndim() != 2 || gate_up.shape(1) % 2 != 0 || !is_float(gate_up.dtype())) {
    throw std::invalid_argument("cpu_gated_activation: gate_up must be (N, 2I) floats");
  }
  if (act != 0 && act != 1) throw std::invalid_argument("cpu_gated_activation: act must be 0 (silu) or 1 (gelu_tanh)");
  return mx::array({gate_up.shape(0), gate_up.shape(1) / 2}, gate_up.dtype(),
                   std::make_shared<CpuGatedActivation>(s, act), {gate_up});
}
