// Few-row matmuls on the CPU as an MLX primitive (CpuGemv), multi-threaded
// over output rows.
//
// MLX's CPU backend computes a decode step's y = x W^T through cblas_sgemm
// for float32 weights, converts 16-bit weights to float32 in memory first,
// and unpacks quantized weights one scalar at a time. CpuGemv reads the
// weights as stored (float32, float16, bfloat16, or MLX's 4-/8-bit affine
// packing) once for up to kMaxCallRows rows of x, converting in registers with
// the best instruction set the CPU has (gemv.h).
//
// Threads: one small pool, sized to the cores the process may use. A second
// caller while the pool is busy (another MLX stream of the engine's sharded
// batch) computes on its own thread instead of queueing, so the cores are
// never oversubscribed.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <iterator>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "gemv.h"
#include "internal.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace gv = mlxc::gemv;

namespace {

int usable_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// How long a worker waits for the next job, and the caller for the workers to finish, by
// spinning before sleeping on a condition variable. A decode step hands the pool a few hundred
// small matmuls with little host work between them; sleeping and waking through the kernel for
// each cost about a tenth of a 2-core machine's decode time (futex, task switches). The spin is
// bounded so an idle process sleeps. AMLX_CPU_SPIN=0 turns it off; AMLX_CPU_SPIN=<microseconds>
// sets the window (default kDefaultSpinUs).
constexpr int kDefaultSpinUs = 50;

int spin_us_from_env() {
  const char* v = std::getenv("AMLX_CPU_SPIN");
  if (v == nullptr || *v == '\0') return kDefaultSpinUs;
  char* end = nullptr;
  const long us = std::strtol(v, &end, 10);
  if (end == v || *end != '\0' || us < 0) return kDefaultSpinUs;
  return (int)std::min(us, 100000L);  // at most 0.1 s: never a busy-wait that outlives a stall
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until done() or spin_us have passed; true if done() came true.
template <class Done>
bool spin_until(int spin_us, Done done) {
  if (spin_us <= 0) return done();
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
  for (;;) {
    for (int i = 0; i < 32; ++i) {  // read the clock (a vDSO call) once per 32 pauses
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= until) return done();
  }
}

// Runs f(0..parts-1) on the caller and the pool's workers.
//
// A job is published as one 64-bit ticket: generation (high 32 bits), number of parts (16) and
// next unclaimed part (16). A thread claims a part by compare-and-swap on the whole ticket, so a
// worker still looping from the previous job can never claim a part of the next one against the
// previous one's part count (or run the previous job's function on it).
class Pool {
 public:
  explicit Pool(int threads) : spin_us_(spin_us_from_env()) { resize(threads); }

  int threads() const { return threads_.load(); }
  int spin_us() const { return spin_us_.load(std::memory_order_relaxed); }
  void set_spin_us(int us) { spin_us_.store(std::max(0, us), std::memory_order_relaxed); }

  void resize(int threads) {
    std::lock_guard<std::mutex> busy(busy_);
    std::lock_guard<std::mutex> lock(m_);
    while ((int)workers_.size() < threads - 1) {
      workers_.emplace_back([this, id = (int)workers_.size()] { work(id); });
    }
    threads_ = threads;
  }

  void run(int parts, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || parts == 1 || parts > 0xffff) {  // another stream has the pool: stay on this thread
      for (int p = 0; p < parts; ++p) f(p);
      return;
    }
    job_.store(&f, std::memory_order_relaxed);
    pending_.store(parts, std::memory_order_relaxed);
    const uint64_t gen = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
    bool sleepers;
    {
      // Under m_ so that a worker checking for work before it sleeps sees either the old ticket
      // (and is then counted in sleepers_ and woken) or the new one.
      std::lock_guard<std::mutex> lock(m_);
      ticket_.store((gen << 32) | ((uint64_t)parts << 16), std::memory_order_release);
      sleepers = sleepers_ > 0;
    }
    if (sleepers) wake_.notify_all();
    drain(gen);
    auto finished = [this] { return pending_.load(std::memory_order_acquire) == 0; };
    if (!spin_until(spin_us(), finished)) {
      std::unique_lock<std::mutex> lock(m_);
      caller_waits_ = true;
      done_.wait(lock, finished);
      caller_waits_ = false;
    }
  }

 private:
  // Claims and runs parts of generation gen until none is left.
  void drain(uint64_t gen) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      if ((t >> 32) != gen || (t & 0xffff) >= ((t >> 16) & 0xffff)) return;
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      // The claimed part is not done, so the caller is still in run(gen) and job_ is its f.
      (*job_.load(std::memory_order_relaxed))((int)(t & 0xffff));
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(m_);  // the caller checks pending_ under m_ before sleeping
        if (caller_waits_) done_.notify_one();
      }
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  void work(int id) {
    uint64_t seen = 0;
    for (;;) {
      // Workers past the current size sit out; the caller is thread 0.
      auto ready = [&] {
        return (ticket_.load(std::memory_order_acquire) >> 32) != seen && id + 1 < threads_.load();
      };
      if (!spin_until(spin_us(), ready)) {
        std::unique_lock<std::mutex> lock(m_);
        ++sleepers_;
        wake_.wait(lock, ready);
        --sleepers_;
      }
      seen = ticket_.load(std::memory_order_acquire) >> 32;
      drain(seen);
    }
  }

  std::mutex busy_, m_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  std::atomic<int> threads_{1};
  std::atomic<int> spin_us_;
  std::atomic<const std::function<void(int)>*> job_{nullptr};
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> ticket_{0};
  int sleepers_ = 0;          // guarded by m_
  bool caller_waits_ = false;  // guarded by m_
};

Pool& pool() {
  static Pool* p = new Pool(usable_cores());  // never destroyed: workers outlive exit handlers
  return *p;
}

gv::RowsFn pick_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return &gv::rows_avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return &gv::rows_avx2;
  }
#endif
  return &gv::rows_generic;
}

std::atomic<gv::RowsFn> kernel{pick_kernel()};

// The int8 kernels (gemv_int8.h) that go with a float kernel: VNNI where the CPU
// has it, else vpmaddubsw, else scalar (mlxc_cpu_gemv_set_isa's "avx2" keeps
// AVX-VNNI out, "avxvnni" is the AVX2 float kernels with it).
struct Int8Kernel {
  gv::RowsFn rows;
  int (*step)(int group);
  const char* name;
};

bool has_avxvnni() {
#if defined(__x86_64__) || defined(__i386__)
  // __builtin_cpu_supports knows "avxvnni" only from GCC 13: CPUID leaf 7 sub-leaf 1, EAX bit 4
  unsigned a = 7, b = 0, c = 1, d = 0;
  __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
  return __builtin_cpu_supports("avx2") && ((a >> 4) & 1);
#else
  return false;
#endif
}

bool has_avx512vnni() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

constexpr Int8Kernel kInt8Generic{&gv::int8_rows_generic, &gv::int8_step_generic, "generic"};
constexpr Int8Kernel kInt8Avx2{&gv::int8_rows_avx2, &gv::int8_step_avx2, "avx2"};
constexpr Int8Kernel kInt8AvxVnni{&gv::int8_rows_avxvnni, &gv::int8_step_avxvnni, "avxvnni"};
constexpr Int8Kernel kInt8Avx512Vnni{&gv::int8_rows_avx512vnni, &gv::int8_step_avx512vnni, "avx512vnni"};

const Int8Kernel* int8_for(gv::RowsFn fn, bool vnni_allowed) {
  if (fn == &gv::rows_generic) return &kInt8Generic;
  if (fn == &gv::rows_avx512 && has_avx512vnni()) return &kInt8Avx512Vnni;
  if (vnni_allowed && has_avxvnni()) return &kInt8AvxVnni;
  return &kInt8Avx2;
}

std::atomic<const Int8Kernel*> int8_kernel{int8_for(pick_kernel(), true)};

// The bf16 kernels, for bf16 weights against bf16 x, any number of rows (a prompt's products
// too), and for a prompt's products of quantized weights against bf16 x (bf16_kernel): AMX
// tiles where the CPU and the OS have them (gemv_amx.cpp), else AVX512-BF16's vdpbf16ps
// (gemv_avx512bf16.cpp). Several times the AVX-512 kernels' rate at 2+ rows of x (converting
// each weight and an FMA per row of x bounded those), and no float32 copies of x and the
// weight for MLX's sgemm. AMLX_CPU_BF16 (read at load: "off", "amx", "avx512bf16"; anything
// else, or a kernel this CPU lacks, is the best it has) or mlxc_cpu_gemv_set_bf16 picks one.
enum Bf16Kernel { kBf16Off = 0, kBf16Amx = 1, kBf16Avx512 = 2 };
constexpr const char* kBf16Names[] = {"off", "amx", "avx512bf16"};

bool bf16_available(int k) {
  return k == kBf16Off || (k == kBf16Amx && gv::amx_available()) || (k == kBf16Avx512 && gv::avx512bf16_available());
}

int bf16_best() { return bf16_available(kBf16Amx) ? kBf16Amx : bf16_available(kBf16Avx512) ? kBf16Avx512 : kBf16Off; }

// The kernel a name means ("best": bf16_best()), or -1 for an unknown name.
int bf16_named(const std::string& name) {
  if (name == "best") return bf16_best();
  for (int k = 0; k < (int)std::size(kBf16Names); ++k)
    if (name == kBf16Names[k]) return k;
  return -1;
}

int bf16_from_env() {
  const char* v = std::getenv("AMLX_CPU_BF16");
  const int k = v == nullptr ? -1 : bf16_named(v);
  return k >= 0 && bf16_available(k) ? k : bf16_best();
}

std::atomic<int> bf16_on{bf16_from_env()};

int kind_of(mx::Dtype d) {
  if (d == mx::float16) return gv::F16;
  if (d == mx::bfloat16) return gv::BF16;
  if (d == mx::float32) return gv::F32;
  throw std::invalid_argument("cpu_gemv: weights, scales and biases must be float32, float16 or bfloat16");
}

// Rows of x one call takes. The kernels hold at most gv::kMaxRows rows in registers; a call
// with more runs them in chunks of rows (chunk_jobs), each chunk over one tile of the
// weight's rows after another, so a tile read from memory serves every chunk from cache and
// the weight is read as stored, with no float32 copy (a decode step of 9+ rows otherwise went
// to MLX's matmul on a float32 copy of each weight, or on a dequantized one).
constexpr int kMaxCallRows = 64;
// Rows of a chunk. The float kernels (dense weights, and quantized ones against float x)
// load x once per block of weight rows, 4 rows for 1-2 rows of x, 1 row for 5-8
// (gemv_impl.h): in chunks of 2 they load x a quarter as often, which measured up to 2x
// faster at 16-64 rows (bf16, Qwen3-0.6B's MLP, benchmarks/README.md) than chunks of 8. The
// int8 kernels read x as bytes and measured fastest in chunks of 8.
constexpr int kFloatChunkRows = 2, kInt8ChunkRows = gv::kMaxRows;
// Bytes of weight rows a tile holds: every chunk of x runs over it while it sits in L2 (L1
// is too small beside a chunk of x).
constexpr long kTileBytes = 64 << 10;

// `j` cut into jobs of at most `rows` rows of x (and of y and x's group sums); one job when
// it has no more than gv::kMaxRows.
std::vector<gv::Job> chunk_jobs(const gv::Job& j, int rows) {
  if (j.M <= gv::kMaxRows) return {j};
  std::vector<gv::Job> out;
  const long G = j.bits ? j.K / j.group : 0;
  for (int m0 = 0; m0 < j.M; m0 += rows) {
    gv::Job c = j;
    c.M = std::min(rows, j.M - m0);
    c.x = j.x + (long)m0 * j.K;
    c.y = j.y + (long)m0 * j.N;
    if (j.xsum) c.xsum = j.xsum + m0 * G;
    if (j.xq) c.xq = j.xq + (long)m0 * j.K;
    if (j.xd) c.xd = j.xd + m0 * G;
    if (j.xqsum) c.xqsum = j.xqsum + m0 * G;
    out.push_back(c);
  }
  return out;
}

// Weight rows a tile holds: kTileBytes of them, in whole blocks of 4 (the kernels' widest).
int tile_rows(const gv::Job& j) {
  const long row = j.bits ? (long)j.K * j.bits / 8 + 2L * (j.skind == gv::F32 ? 4 : 2) * (j.K / j.group)
                          : (long)j.K * (j.wkind == gv::F32 ? 4 : 2);
  return (int)std::max(16L, kTileBytes / std::max(row, 1L) / 4 * 4);
}

// The output rows of `j`, split into blocks over the pool; x's rows in chunks of `chunk`.
void run_rows(const gv::Job& j, gv::RowsFn fn, int chunk) {
  Pool& p = pool();
  // Blocks of at least 16 rows: thinner ones cost more in wake-ups than they gain.
  const int parts = std::max(1, std::min(p.threads(), j.N / 16));
  const std::vector<gv::Job> chunks = chunk_jobs(j, chunk);
  const int tile = chunks.size() == 1 ? j.N : tile_rows(j);
  p.run(parts, [&](int part) {
    const int n0 = (int)((long)j.N * part / parts), n1 = (int)((long)j.N * (part + 1) / parts);
    for (int t = n0; t < n1; t += tile) {
      for (const gv::Job& c : chunks) fn(c, t, std::min(n1, t + tile));
    }
  });
}

// The output rows of `j` over the pool for a bf16 kernel: in blocks of 16 weight rows
// aligned to the weight (gemv_bf16_blocks.h), all of x's rows in one call per part.
void run_blocks(const gv::Job& j, gv::RowsFn fn) {
  Pool& p = pool();
  const int blocks = (j.N + 15) / 16;
  const int parts = std::max(1, std::min(p.threads(), blocks));
  p.run(parts, [&](int part) {
    const int b0 = (int)((long)blocks * part / parts), b1 = (int)((long)blocks * (part + 1) / parts);
    fn(j, b0 * 16, std::min(j.N, b1 * 16));
  });
}

// x rounded to int8 for the int8 kernels: per row and per group of `group`
// values, d = max|x| / 127 and xq = round(x / d) (to nearest, ties to even,
// as numpy's rint: the tests rebuild it exactly), computed as x * (127 / max|x|).
// 4-bit jobs store each run of `run` values permuted as the kernels unpack the
// nibbles: the run's even values first, then its odd ones. The bias term takes
// the sum of the rounded x (d * sum xq), not of x: then the result is exactly
// the dot of the dequantized weights with the rounded x, whose error is
// sum_k w_k e_k; with x's own sum it would be sum_k (w_k - b) e_k, and w - b = s q
// is all of one sign (measured: 2-3x the error on random weights).
void quantize_x(gv::Job& j, int run, std::vector<int8_t>& xq, std::vector<float>& xd, std::vector<int32_t>& xqsum,
                std::vector<float>& xsum) {
  const int K = j.K, G = K / j.group;
  xq.resize((size_t)j.M * K);
  xd.resize((size_t)j.M * G);
  xsum.resize((size_t)j.M * G);
  xqsum.resize((size_t)j.M * G);
  for (int m = 0; m < j.M; ++m) {
    for (int g = 0; g < G; ++g) {
      const float* x = j.x + (size_t)m * K + (size_t)g * j.group;
      int8_t* q = xq.data() + (size_t)m * K + (size_t)g * j.group;
      float amax = 0.0f;
      for (int i = 0; i < j.group; ++i) amax = std::max(amax, std::fabs(x[i]));
      const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int i = 0; i < j.group; ++i) {
        float v = x[i] * id;
        // adding and taking away 1.5 * 2^23 rounds to an integer, ties to even (|v| <= 127)
        v = v == v ? (v + 12582912.0f) - 12582912.0f : 0.0f;  // a NaN or infinite group: 0, its d is not finite
        const int iv = (int)std::min(127.0f, std::max(-127.0f, v));
        sum += iv;
        int p = i;
        if (run) {
          const int r = i % run;
          p = i - r + (r % 2 == 0 ? r / 2 : run / 2 + r / 2);
        }
        q[p] = (int8_t)iv;
      }
      xd[(size_t)m * G + g] = amax / 127.0f;
      xqsum[(size_t)m * G + g] = sum;
      xsum[(size_t)m * G + g] = xd[(size_t)m * G + g] * (float)sum;
    }
  }
  j.xsum = xsum.data();
  j.xq = xq.data();
  j.xd = xd.data();
  j.xqsum = xqsum.data();
}

// y (M, N) float32 into `out` in its dtype, rounded to nearest even as MLX's astype rounds
// (bf16: MLX's rule, written out so the loop vectorizes).
void store(const std::vector<float>& y, mx::array& out) {
  if (out.dtype() == mx::float16) {
    auto* o = out.data<mx::float16_t>();
    for (size_t i = 0; i < y.size(); ++i) o[i] = static_cast<mx::float16_t>(y[i]);
  } else {
    auto* o = reinterpret_cast<uint16_t*>(out.data<mx::bfloat16_t>());
    for (size_t i = 0; i < y.size(); ++i) {
      uint32_t u;
      std::memcpy(&u, &y[i], 4);
      const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
      o[i] = nan ? (uint16_t)0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
}

// The bf16 kernel that takes the product, if any: bf16 weights against bf16 x, any rows;
// quantized weights against bf16 x past kMaxCallRows (a prompt's; fewer rows keep the int8
// or float kernels, which a decode step's rows use).
gv::RowsFn bf16_kernel(const mx::array& x, const mx::array& w, int bits);

void compute_float(const std::vector<mx::array>& in, gv::Job& j, int bits, int group, bool int8, gv::RowsFn bf16);

// One job: x packed (and for quantized weights its group sums, permuted or rounded
// to int8 as the kernels read it), then its output rows over the pool.
// x (M, K) and y (M, N) are in the activations' dtype; the kernels take and give float32
// (converted here, so a 16-bit model's product is one graph node, not three). The bf16
// kernels read bf16 x as it is.
void compute(const std::vector<mx::array>& in, mx::array& out, int bits, int group, bool int8) {
  const mx::array& x = in[0];
  std::vector<char> xtmp;
  std::vector<float> xf, yf;
  gv::Job j{};
  j.M = x.shape(0);
  j.K = x.shape(1);
  j.N = out.shape(1);
  const void* xp = mlxc::row_major(x, xtmp);
  const gv::RowsFn bf16 = bf16_kernel(x, in[1], bits);
  if (bf16) {
    j.xbf = static_cast<const uint16_t*>(xp);
  } else if (x.dtype() == mx::float32) {
    j.x = static_cast<const float*>(xp);
  } else {
    xf.resize((size_t)j.M * j.K);
    if (x.dtype() == mx::bfloat16) {  // (not through load_scalar: its switch kept the loop scalar)
      mlxc::bf16_to_floats(static_cast<const uint16_t*>(xp), xf.data(), (long)xf.size());
    } else {
      for (size_t i = 0; i < xf.size(); ++i) xf[i] = gv::load_scalar(xp, gv::F16, (long)i);
    }
    j.x = xf.data();
  }
  if (out.dtype() == mx::float32) {
    j.y = out.data<float>();
  } else {
    yf.resize((size_t)j.M * j.N);
    j.y = yf.data();
  }
  compute_float(in, j, bits, group, int8, bf16);
  if (out.dtype() != mx::float32) store(yf, out);
}

// j's x (or xbf), y and shapes set: the weights and the product, y in float32; `bf16` the
// bf16 kernel that takes it, if one does (then j.xbf is x).
void compute_float(const std::vector<mx::array>& in, gv::Job& j, int bits, int group, bool int8, gv::RowsFn bf16) {
  std::vector<char> tmp[4];
  j.w = mlxc::row_major(in[1], tmp[1]);
  j.wkind = bits ? 0 : kind_of(in[1].dtype());
  j.bits = bits;
  j.group = group;
  if (bits) {
    j.scales = mlxc::row_major(in[2], tmp[2]);
    j.biases = mlxc::row_major(in[3], tmp[3]);
    j.skind = kind_of(in[2].dtype());
  }
  if (bf16) {
    run_blocks(j, bf16);  // bf16 products are exact in float32: the same sums, in another order
    return;
  }
  std::vector<float> xsum, xperm, xd;
  std::vector<int8_t> xq;
  std::vector<int32_t> xqsum;
  if (bits) {
    if (int8) {
      const Int8Kernel* k8 = int8_kernel.load();
      quantize_x(j, bits == 4 ? k8->step(group) : 0, xq, xd, xqsum, xsum);
      run_rows(j, k8->rows, kInt8ChunkRows);
      return;
    }
    const int G = j.K / group;
    xsum.assign((size_t)j.M * G, 0.0f);
    for (int m = 0; m < j.M; ++m)
      for (int k = 0; k < j.K; ++k) xsum[(size_t)m * G + k / group] += j.x[(size_t)m * j.K + k];
    j.xsum = xsum.data();
    if (bits == 4) {  // the kernels read x in the order of the nibbles (gemv_impl.h)
      xperm.resize((size_t)j.M * j.K);
      for (long i = 0; i < (long)j.M * j.K; i += 32)
        for (int p = 0; p < 32; ++p) xperm[i + p] = j.x[i + (p < 16 ? 2 * p : 2 * (p - 16) + 1)];
      j.x = xperm.data();
    }
  }
  run_rows(j, kernel.load(), kFloatChunkRows);
}

class CpuGemv : public mx::UnaryPrimitive {
 public:
  CpuGemv(mx::Stream s, int bits, int group, bool int8)
      : mx::UnaryPrimitive(s), bits_(bits), group_(group), int8_(int8) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch(
        [inputs, out = mx::array::unsafe_weak_copy(out), bits = bits_, group = group_, int8 = int8_]() mutable {
          compute(inputs, out, bits, group, int8);
        });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("cpu_gemv runs on the CPU only");
  }

  // d/dx of x W^T is cotangent @ W; d/dW (full fine-tuning of a dense weight) is cotangent^T @ x.
  // Quantized weights are not differentiated (they are never trained).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const auto& c = cotangents[0];
    std::vector<mx::array> out;
    for (int a : argnums) {
      if (a == 0) {
        const mx::Dtype x_type = primals[0].dtype();
        if (bits_) {
          out.push_back(mx::astype(mx::quantized_matmul(c, primals[1], primals[2], primals[3], false, group_, bits_,
                                                        "affine", stream()), x_type, stream()));
        } else {
          out.push_back(mx::astype(mx::matmul(mx::astype(c, mx::float32, stream()),
                                              mx::astype(primals[1], mx::float32, stream()), stream()),
                                   x_type, stream()));
        }
      } else if (a == 1 && !bits_) {
        out.push_back(mx::astype(mx::matmul(mx::transpose(mx::astype(c, mx::float32, stream()), stream()),
                                            mx::astype(primals[0], mx::float32, stream()), stream()),
                                 primals[1].dtype(), stream()));
      } else {
        throw std::invalid_argument("cpu_gemv: gradients with respect to quantized weights are not supported");
      }
    }
    return out;
  }

  const char* name() const override { return "CpuGemv"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuGemv&>(other);
    return bits_ == o.bits_ && group_ == o.group_ && int8_ == o.int8_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[1].shape(0)}};
  }

 private:
  int bits_, group_;
  bool int8_;  // quantized weights against x rounded to int8 (gemv_int8.h)
};

// Dequantization of MLX's affine packing to float32: w = s * q + b, value i of a
// row being bits [bits*i, bits*(i+1)) of its little-endian words. Plain loops
// the compiler vectorizes; the output is written once, so memory bounds it.
void dequantize_rows(const mx::array& w, const mx::array& scales, const mx::array& biases, float* out, int bits,
                     int group, int n0, int n1, std::vector<char>* tmp) {
  const long K = (long)w.shape(1) * 32 / bits, G = K / group;
  const uint8_t* q = static_cast<const uint8_t*>(mlxc::row_major(w, tmp[0]));
  const void* sp = mlxc::row_major(scales, tmp[1]);
  const void* bp = mlxc::row_major(biases, tmp[2]);
  const int sk = kind_of(scales.dtype());
  for (long n = n0; n < n1; ++n) {
    const uint8_t* row = q + n * K * bits / 8;
    float* o = out + n * K;
    for (long gi = 0; gi < G; ++gi) {
      const float s = gv::load_scalar(sp, sk, n * G + gi), b = gv::load_scalar(bp, sk, n * G + gi);
      float* og = o + gi * group;
      if (bits == 8) {
        const uint8_t* r = row + gi * group;
        for (int i = 0; i < group; ++i) og[i] = s * (float)r[i] + b;
      } else {
        const uint8_t* r = row + gi * group / 2;
        for (int i = 0; i < group / 2; ++i) {
          og[2 * i] = s * (float)(r[i] & 15) + b;
          og[2 * i + 1] = s * (float)(r[i] >> 4) + b;
        }
      }
    }
  }
}

class CpuDequantize : public mx::UnaryPrimitive {
 public:
  CpuDequantize(mx::Stream s, int bits, int group) : mx::UnaryPrimitive(s), bits_(bits), group_(group) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([inputs, out = mx::array::unsafe_weak_copy(out), bits = bits_, group = group_]() mutable {
      const int N = out.shape(0);
      Pool& p = pool();
      const int parts = std::max(1, std::min(p.threads(), N / 16));
      p.run(parts, [&](int part) {
        std::vector<char> tmp[3];
        dequantize_rows(inputs[0], inputs[1], inputs[2], out.data<float>(), bits, group,
                        (int)((long)N * part / parts), (int)((long)N * (part + 1) / parts), tmp);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("cpu_dequantize runs on the CPU only");
  }

  const char* name() const override { return "CpuDequantize"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CpuDequantize&>(other);
    return bits_ == o.bits_ && group_ == o.group_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[0].shape(1) * 32 / bits_}};
  }

 private:
  int bits_, group_;
};

// The bf16 kernels take any number of rows: a prompt's products too, where MLX would multiply
// float32 copies of x and the weight (or of the dequantized weight).
gv::RowsFn bf16_kernel(const mx::array& x, const mx::array& w, int bits) {
  const int k = bf16_on.load();
  if (!(k != kBf16Off && x.dtype() == mx::bfloat16 && x.shape(-1) % 32 == 0)) return nullptr;
  const bool amx = k == kBf16Amx;
  if (bits == 0) {
    if (w.dtype() != mx::bfloat16) return nullptr;
    return amx ? &gv::amx_bf16_rows : &gv::avx512bf16_rows;
  }
  const int rows = (int)(x.size() / x.shape(-1));
  if (rows <= kMaxCallRows) return nullptr;
  return amx ? &gv::amx_qbf16_rows : &gv::avx512bf16_qrows;
}

void check_args(const mx::array& x, const mx::array& w, const mx::array* scales, int bits, int group) {
  if (x.ndim() < 1 || w.ndim() != 2) throw std::invalid_argument("cpu_gemv: x must have a last axis and w be 2-D");
  const int K = x.shape(-1);
  const int rows = K ? (int)(x.size() / K) : 0;
  if (rows < 1 || (rows > kMaxCallRows && bf16_kernel(x, w, bits) == nullptr)) {
    throw std::invalid_argument("cpu_gemv: x must have 1 to " + std::to_string(kMaxCallRows) + " rows");
  }
  if (!mx::issubdtype(x.dtype(), mx::floating)) throw std::invalid_argument("cpu_gemv: x must be floating point");
  if (bits == 0) {
    kind_of(w.dtype());
    if (w.shape(1) != K) throw std::invalid_argument("cpu_gemv: w must be (out, in) with in = x's last axis");
    return;
  }
  if (bits != 4 && bits != 8) throw std::invalid_argument("cpu_gemv: bits must be 4 or 8");
  if (group != 32 && group != 64 && group != 128) throw std::invalid_argument("cpu_gemv: group size must be 32, 64 or 128");
  if (K % group != 0 || w.dtype() != mx::uint32 || w.shape(1) != K * bits / 32) {
    throw std::invalid_argument("cpu_gemv: w must be packed uint32 (out, in * bits / 32) with in a multiple of the group");
  }
  const mx::Shape sshape{w.shape(0), K / group};
  if (scales[0].shape() != sshape || scales[1].shape() != sshape || scales[0].dtype() != scales[1].dtype()) {
    throw std::invalid_argument("cpu_gemv: scales and biases must both be (out, in / group) of one dtype");
  }
  kind_of(scales[0].dtype());
}

}  // namespace

int mlxc::float_kind(const mx::Dtype& d) { return kind_of(d); }

void mlxc::parallel_for(int parts, const std::function<void(int)>& f) { pool().run(parts, f); }

mx::array mlxc::cpu_gemv(const mx::array& x, const mx::array& w, const mx::array* scales_biases, int bits,
                         int group, bool int8) {
  mx::Stream s = mx::to_stream({});
  if (s.device.type != mx::Device::cpu) throw std::invalid_argument("cpu_gemv runs on the CPU only");
  check_args(x, w, scales_biases, bits, group);
  const int K = x.shape(-1), N = w.shape(0), M = (int)(x.size() / K);
  mx::Dtype out_type = mx::promote_types(x.dtype(), bits ? scales_biases[0].dtype() : w.dtype());
  // Inputs are taken as they are (a block of a weight's rows is a view, not a
  // copy); eval packs the rare strided one (mlxc::row_major).
  // x goes in as it is (float32 or 16-bit: eval converts it) and y comes out in out_type:
  // one graph node per product, where astype nodes around it had made three.
  mx::array x2 = mx::reshape(x, {M, K}, s);
  if (!(x2.dtype() == mx::float32 || x2.dtype() == mx::float16 || x2.dtype() == mx::bfloat16)) {
    x2 = mx::astype(x2, mx::float32, s);
  }
  const bool direct = out_type == mx::float32 || out_type == mx::float16 || out_type == mx::bfloat16;
  std::vector<mx::array> inputs{x2, w};
  if (bits) {
    inputs.push_back(scales_biases[0]);
    inputs.push_back(scales_biases[1]);
  }
  mx::array y(mx::Shape{M, N}, direct ? out_type : mx::float32,
              std::make_shared<CpuGemv>(s, bits, group, int8 && bits != 0), std::move(inputs));
  mx::Shape shape = x.shape();
  shape.back() = N;
  y = mx::reshape(y, shape, s);
  return direct ? y : mx::astype(y, out_type, s);
}

mx::array mlxc::cpu_dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases, int bits,
                               int group) {
  mx::Stream s = mx::to_stream({});
  if (s.device.type != mx::Device::cpu) throw std::invalid_argument("cpu_dequantize runs on the CPU only");
  if (w.ndim() != 2) throw std::invalid_argument("cpu_dequantize: w must be 2-D");
  if (bits != 4 && bits != 8) throw std::invalid_argument("cpu_dequantize: bits must be 4 or 8");
  const int K = (int)((long)w.shape(1) * 32 / std::max(bits, 1));
  // the packing checks of the gemv, with a stand-in x of the right width
  const mx::array sb[2] = {scales, biases};
  check_args(mx::zeros({1, K}, mx::float32, s), w, sb, bits, group);
  mx::array out(mx::Shape{w.shape(0), K}, mx::float32, std::make_shared<CpuDequantize>(s, bits, group),
                {w, scales, biases});
  return out;
}

extern "C" {

int mlxc_cpu_threads(void) { return pool().threads(); }

int mlxc_cpu_gemv_max_rows(void) { return kMaxCallRows; }

int mlxc_cpu_set_threads(int n) {
  if (n < 1 || n > 256) {
    mlxc::set_last_error("cpu_gemv: the thread count must be between 1 and 256");
    return 1;
  }
  pool().resize(n);
  return 0;
}

const char* mlxc_cpu_gemv_isa(void) {
  gv::RowsFn fn = kernel.load();
  if (fn == &gv::rows_avx2 && int8_kernel.load() == &kInt8AvxVnni) return "avxvnni";
  return fn == &gv::rows_avx512 ? "avx512" : fn == &gv::rows_avx2 ? "avx2" : "generic";
}

const char* mlxc_cpu_gemv_int8_isa(void) { return int8_kernel.load()->name; }

const char* mlxc_cpu_gemv_bf16(void) { return kBf16Names[bf16_on.load()]; }

int mlxc_cpu_gemv_bf16_available(const char* name) {
  const int k = bf16_named(name);
  return k >= 0 && bf16_available(k) ? 1 : 0;
}

int mlxc_cpu_gemv_set_bf16(const char* name) {
  const int k = bf16_named(name);
  if (k < 0) {
    mlxc::set_last_error(std::string("cpu_gemv: unknown bf16 kernel '") + name +
                         "' (one of: off, amx, avx512bf16, best)");
    return 1;
  }
  if (!bf16_available(k)) {
    mlxc::set_last_error(std::string("cpu_gemv: this CPU (or its OS) has no ") +
                         (k == kBf16Amx ? "AMX tiles" : "AVX512-BF16") + " for the '" + name + "' kernel");
    return 1;
  }
  bf16_on = k;
  return 0;
}

int mlxc_cpu_gemv_set_isa(const char* isa) {
  const std::string want = isa;
  gv::RowsFn best = pick_kernel();
  const bool x86_avx2 = best != &gv::rows_generic;
  gv::RowsFn fn = want == "generic"                               ? &gv::rows_generic
                  : (want == "avx2" || want == "avxvnni") && x86_avx2 ? &gv::rows_avx2
                  : want == "avx512" && best == &gv::rows_avx512  ? &gv::rows_avx512
                  : want == "best"                                ? best
                                                                  : nullptr;
  if (fn == nullptr || (want == "avxvnni" && !has_avxvnni())) {
    mlxc::set_last_error("cpu_gemv: instruction set '" + want + "' is unknown or not supported by this CPU");
    return 1;
  }
  // "avx2" means AVX2 alone (vpmaddubsw for int8), "avxvnni" AVX2 with AVX-VNNI
  int8_kernel = int8_for(fn, want != "avx2");
  kernel = fn;
  return 0;
}

}  // extern "C"
