// y = x W^T on Intel AMX tiles (Sapphire Rapids and later) for bfloat16
// weights against bfloat16 x, any number of rows of x (tdpbf16ps); and for
// MLX's 4-/8-bit weights against bfloat16 x, dequantized to bf16 a block of
// rows at a time (a prompt's products: QuantizedRows).
//
// Why: the AVX-512 kernels (gemv_impl.h) convert every bf16 weight to float32
// and spend an FMA per row of x on it: 8 rows of x took 3.4x one row's time,
// and a prompt went to MLX's sgemm on float32 copies of x and of the weight.
// One tile instruction multiplies 16 weight rows by up to 16 rows of x over 32
// values; the products of bf16 values are exact in float32, so only the order of
// the float32 sums differs from the other kernels.
//
// The tiles: A = 16 weight rows, loaded in place (a row's stride apart),
// B = x for those 32 values, packed once per call as the instruction wants
// (pairs of consecutive values of each row of x side by side), C = 16 weight
// rows x up to 16 rows of x in float32.
//
// Each output row is computed by the same instructions whatever the number of
// rows of x and wherever the pool's split falls (blocks of 16 weight rows are
// aligned to the weight; the last, short one is read from a zero-padded copy),
// so batching never changes a row's result. Only this unit is compiled for AMX;
// cpu_gemv.cpp calls it only where amx_available() said yes, which also asked
// the kernel for the tile state (Linux's arch_prctl).
//
// Tried and left out: the int8 kernels' work (quantized weights against x rounded
// to int8, tdpbusd) on tiles. Each quantization group needs its own float scaling,
// so each group's tile went to memory and back: 8 rows of x took 3.1 ms against
// the VNNI kernels' 4.5 (a 16384 x 4096 8-bit weight), but one row 2.4 ms against
// 1.6, and a row's result must not depend on the batch, so one kernel serves both.
#if defined(__x86_64__) && defined(__linux__)
// The standard headers come before the target pragma: their inline functions (vector's
// growth, say) are shared with the other units and must not be compiled for AMX machines.
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "gemv.h"

#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")
#include <immintrin.h>

#include "gemv_bf16_blocks.h"

namespace mlxc::gemv {
namespace {

constexpr int kTileRows = kBlockRows;  // weight rows of an A tile, and rows of x of a B tile at most

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// A tile layout: each tile's bytes per row and rows. GCC's tile intrinsics paste their tile
// arguments into the assembly, so the kernels name tiles by literal digits.
struct Layout {
  uint16_t colsb[8];
  uint8_t rows[8];
  bool operator==(const Layout& o) const {
    return std::equal(colsb, colsb + 8, o.colsb) && std::equal(rows, rows + 8, o.rows);
  }
};

// Loads `l` unless it is the thread's current one (loading costs, and zeroes the tiles);
// `fresh` forgets the current one (a call starts from a released state).
void configure(const Layout& l, bool fresh) {
  thread_local Layout last{};
  if (!fresh && l == last) return;
  last = l;
  TileConfig c;
  std::copy(l.colsb, l.colsb + 8, c.colsb);
  std::copy(l.rows, l.rows + 8, c.rows);
  // GCC 12 took ldtilecfg to read only part of the struct and dropped the other stores:
  // make them all visible first.
  __asm__ __volatile__("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

// C (16 rows x `m` columns of float32, `ld` floats apart) into y's columns [n, n + rows).
void store_transposed(const float* c, int ld, const Job& j, int m0, int m, int n, int rows) {
  for (int i = 0; i < m; ++i) {
    float* y = j.y + (long)(m0 + i) * j.N + n;
    for (int r = 0; r < rows; ++r) y[r] = c[r * ld + i];
  }
}

// -- bfloat16 ----------------------------------------------------------------------------

// x's rows [m0, m0 + m) as B tiles: for each run of 32 values, 16 rows of m pairs of values.
// A pair of bf16 is 32 bits: the tiles are the transpose of x's rows as 32-bit pairs.
void pack_bf16(const Job& j, int m0, int m, uint16_t* out) {
  const int pairs = j.K / 2;
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  for (int i = 0; i < m; ++i) {
    const uint16_t* x = j.xbf + (long)(m0 + i) * j.K;
    for (int p = 0; p < pairs; ++p) std::memcpy(&o[(long)p * m + i], x + 2 * p, 4);
  }
}

// Tiles: 0, 1 accumulators for two blocks of 16 weight rows; 2, 3 and 4, 5 those blocks'
// weights, and 6 and 7 x, for even and odd runs of 32 values (tiles are not renamed: a load
// into a tile the previous product still reads waits for it). `Rows` gives the blocks' bf16
// rows (DenseRows, QuantizedRows).
template <class Rows>
void bf16_rows(const Job& j, int n0, int n1) {
  const int chunks = j.K / 32;
  Rows src;  // its buffers live for the call: a pool thread keeps no memory between calls
  std::vector<uint16_t> xb((size_t)j.M * j.K);
  for (int m0 = 0; m0 < j.M; m0 += kTileRows) pack_bf16(j, m0, std::min(kTileRows, j.M - m0), xb.data() + (long)m0 * j.K);
  alignas(64) float cbuf[2][kTileRows * kTileRows];
  bool fresh = true;
  for (int n = n0; n < n1; n += 2 * kTileRows) {
    const bool two = n + kTileRows < n1;
    const RowBlock ra = src.block(j, n, 0);
    const RowBlock rb = two ? src.block(j, n + kTileRows, 1) : ra;
    const int rows_a = std::min(kTileRows, n1 - n), rows_b = std::min(kTileRows, n1 - n - kTileRows);
    for (int m0 = 0; m0 < j.M; m0 += kTileRows) {
      const int m = std::min(kTileRows, j.M - m0);
      const uint16_t cb = (uint16_t)(m * 4);
      configure(Layout{{cb, cb, 64, 64, 64, 64, cb, cb}, {16, 16, 16, 16, 16, 16, 16, 16}}, fresh);
      fresh = false;
      const uint16_t* xt = xb.data() + (long)m0 * j.K;
      _tile_zero(0);
      _tile_zero(1);
      for (int c = 0; c < chunks; c += 2) {
        _tile_loadd(2, ra.base + c * 64, ra.stride);
        _tile_loadd(6, xt + (long)c * 32 * m, m * 4);
        _tile_dpbf16ps(0, 2, 6);
        if (two) {
          _tile_loadd(3, rb.base + c * 64, rb.stride);
          _tile_dpbf16ps(1, 3, 6);
        }
        if (c + 1 < chunks) {
          _tile_loadd(4, ra.base + (c + 1) * 64, ra.stride);
          _tile_loadd(7, xt + (long)(c + 1) * 32 * m, m * 4);
          _tile_dpbf16ps(0, 4, 7);
          if (two) {
            _tile_loadd(5, rb.base + (c + 1) * 64, rb.stride);
            _tile_dpbf16ps(1, 5, 7);
          }
        }
      }
      _tile_stored(0, cbuf[0], kTileRows * 4);
      store_transposed(cbuf[0], kTileRows, j, m0, m, n, rows_a);
      if (two) {
        _tile_stored(1, cbuf[1], kTileRows * 4);
        store_transposed(cbuf[1], kTileRows, j, m0, m, n + kTileRows, rows_b);
      }
    }
  }
  _tile_release();
}

constexpr long ARCH_REQ_XCOMP_PERM = 0x1023;
constexpr int XFEATURE_XTILEDATA = 18;

bool probe() {
  unsigned a = 7, b = 0, c = 0, d = 0;
  __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
  const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;  // CPUID.(7,0):EDX AMX-TILE, AMX-BF16
  // the unit's other code (QuantizedRows, the packing) is compiled for these too
  if (!(tile && bf16) || !__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512bf16")) {
    return false;
  }
  // The OS keeps the tile state only for a process that asked (Linux 5.16+).
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

}  // namespace

bool amx_available() {
  static const bool ok = probe();
  return ok;
}

void amx_bf16_rows(const Job& j, int n0, int n1) { bf16_rows<DenseRows>(j, n0, n1); }

void amx_qbf16_rows(const Job& j, int n0, int n1) { bf16_rows<QuantizedRows>(j, n0, n1); }

}  // namespace mlxc::gemv

#else  // no AMX here: never available, defined so the table links

#include "gemv.h"

bool mlxc::gemv::amx_available() { return false; }
void mlxc::gemv::amx_bf16_rows(const Job&, int, int) {}
void mlxc::gemv::amx_qbf16_rows(const Job&, int, int) {}

#endif
