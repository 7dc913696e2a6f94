"""A decode step's attention as one CUDA kernel.

In a decode step each row adds one token at its own position, and the cache
buffer is longer than any row's history (fixed capacity, so the step
compiles once). MLX's fused attention takes no per-row lengths: the unfilled
slots need an array mask, and with one MLX falls back to about a dozen graph
nodes per layer (matmuls, softmax, select). Every node costs host time in
each step, and decoding small models is bound by exactly that host time.

This kernel takes the fused q/k/v projection of the new token and does what
would otherwise be several nodes: the per-head q/k RMSNorm (Qwen 3, Gemma 3),
the rotary embedding at each row's position, and attention over slots
max(0, pos[b] - window + 1) .. pos[b] only, with an online softmax in float32
(a few keys a warp at a time, each read by a group of lanes: `LANE_DIMS`; or a warp
per key, `KEYS_PER_ROUND`; several warps per head, merged at the end; past
`SPLIT_KEYS` positions a row's keys split over blocks, merged by a second kernel). It
reads the cache for the earlier slots and its own new key and value for the
last, and hands those back for the cache write (one scatter). The cache is a
contiguous buffer or a block pool read through each row's block table, the
pool possibly quantized (kv_bits: dequantized in registers as it is read). It runs on
MLX's CUDA backend, and on the CPU as amlx's own C++ primitive with the same
inputs, outputs and rounding (`cpu_kernels.decode_attention`, vendor/mlxc/cpu_step.cpp),
where the engine's option `decode_kernel` turns it on (see amlx/engine/placement.py);
on Metal attention keeps the mask path, which computes the same thing.
"""

from __future__ import annotations

import os
import struct

from amlx._mlx import Array, bfloat16, cpu_kernels, device, fast, float16, float32, uint32

_HEADER = r"""
__device__ float amlx_warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// RMSNorm over one head held by a warp (E values per lane; w: the lane's E weights, T
// values held as floats), rounded as MLX's rms_norm rounds: the normalised value to T,
// then times the weight in T.
template <typename T, int E>
__device__ void amlx_head_rms_norm(float* x, const float* w, float eps, int dim) {
  float ss = 0.0f;
  for (int e = 0; e < E; ++e) ss += x[e] * x[e];
  const float r = rsqrtf(amlx_warp_sum(ss) / dim + eps);
  for (int e = 0; e < E; ++e) {
    const float n = static_cast<float>(static_cast<T>(x[e] * r));
    x[e] = static_cast<float>(static_cast<T>(w[e] * n));
  }
}

template <int E, typename T>
__device__ void amlx_load(const T* p, float* x) {
  for (int e = 0; e < E; ++e) x[e] = static_cast<float>(p[e]);
}

// The word a lane loads its part of a slot's head in: 16 bytes, or 8 where the part is 8 bytes
// (4 16-bit dims a lane); the part starts at a multiple of its size, so the load is aligned.
template <int BYTES> struct amlx_word { using type = uint4; };
template <> struct amlx_word<8> { using type = uint2; };

// N values of type T packed in words w (amlx_word), as floats.
template <int N, typename T, typename Word>
__device__ void amlx_unpack(const Word* w, float* x) {
  constexpr int PER = sizeof(Word) / sizeof(T);
#pragma unroll
  for (int c = 0; c < N / PER; ++c) {
    const T* v = reinterpret_cast<const T*>(&w[c]);
#pragma unroll
    for (int i = 0; i < PER; ++i) x[c * PER + i] = static_cast<float>(v[i]);
  }
}

// A lane's E values (dimensions first .. first + E - 1) of one slot's head from a quantized pool, in MLX's affine
// layout as ops.quantize writes it: value d in bits [(d % P) * BITS, +BITS) of
// uint32 word d / P (P = 32 / BITS, lowest bits first), group d / GROUP's scale
// and bias; dequantized as MLX's dequantize computes it, q * scale + bias in T,
// so the kernel sees the values the gather path's ops.dequantize gives.
template <typename T, int E, int BITS, int GROUP>
__device__ void amlx_dequant(const uint32_t* words, const T* scales, const T* biases, int first, float* x) {
  constexpr int P = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  for (int e = 0; e < E; ++e) {
    const int d = first + e;
    const uint32_t q = (words[d / P] >> ((d % P) * BITS)) & MASK;
    x[e] = static_cast<float>(static_cast<T>(static_cast<float>(q)) * scales[d / GROUP] + biases[d / GROUP]);
  }
}

// One key's score s (and its value's N values v) into a warp's running max m, sum l and
// output acc: the online softmax's step, in base e (expf) or, BASE2, in base 2 (exp2f).
template <int N, bool BASE2>
__device__ void amlx_softmax_step(float s, const float* v, float& m, float& l, float* acc) {
  const float m_new = fmaxf(m, s);
  const float alpha = BASE2 ? exp2f(m - m_new) : expf(m - m_new);
  const float p = BASE2 ? exp2f(s - m_new) : expf(s - m_new);
  l = l * alpha + p;
  for (int i = 0; i < N; ++i) acc[i] = acc[i] * alpha + p * v[i];
  m = m_new;
}

// Rotary embedding, rotate-half convention, of one head held by a warp, by the
// lane's angles' sines and cosines (sn, cs: position * frequency of each of its E
// dimensions); the partner of lane l's values is in lane l ^ 16.
template <typename T, int E>
__device__ void amlx_rope_half(float* x, const float* sn, const float* cs, int lane) {
  for (int e = 0; e < E; ++e) {
    const float other = __shfl_xor_sync(0xffffffffu, x[e], 16);
    const float y = lane < 16 ? x[e] * cs[e] - other * sn[e] : x[e] * cs[e] + other * sn[e];
    x[e] = static_cast<float>(static_cast<T>(y));
  }
}
"""

# qkv (B, (H + 2*KVH) * D): one row's fused projection [q heads | k heads | v
# heads]; kv (2, B, KVH, capacity, D), the cache (keys, then values), holds
# positions < pos[b]; pos (B,) int32; inv_freq (D/2,) float32 rotary
# frequencies (position scale included). Outputs: out (B, H*D), and the new key
# and value kv_new (2, B*KVH, D) for the cache write that follows. One block of WARPS warps per (head, row). Lane l
# holds dimensions [l*E, l*E + E) of q, of every key and value it reads and of
# its partial output (E = D / 32, so a warp reads one key row in one coalesced
# pass); the rotate-half partner of dimension d (d +- D/2) sits in lane l ^ 16.
# Warp w takes slots first + w, first + w + WARPS, ... with its own online
# softmax; the new position's key and value come from registers, not the cache.
# The partial results of the warps are merged at the end.
_SOURCE = r"""
  constexpr int E = D / 32;
  constexpr int HALF = D / 2;
  const int h = blockIdx.x, b = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kvh = h / (H / KVH);
  __shared__ float warp_max[WARPS];
  __shared__ float warp_sum[WARPS];
  __shared__ float warp_out[WARPS][D];
  const float scale = __int_as_float(SCALE_BITS);
  const float neg_inf = __int_as_float(0xff800000);
  const int last = pos[b];
  const T* row = qkv + (size_t)b * (H + 2 * KVH) * D + lane * E;
  // Every load before the keys' is issued here, before any is used: the norm weights
  // and rotary frequencies too (read where they were used, each waited on its own, a
  // chain of trips to memory, most of the 8 us a call took at one position on the H200)
  float qr[E], kn[E], vn[E], acc[E], sn[E], cs[E];$NORM_DECL$
  for (int e = 0; e < E; ++e) {
    qr[e] = static_cast<float>(row[h * D + e]);
    kn[e] = static_cast<float>(row[(H + kvh) * D + e]);
    vn[e] = static_cast<float>(row[(H + KVH + kvh) * D + e]);
    sn[e] = inv_freq[(lane * E + e) % HALF];$NORM_LOAD$
    acc[e] = 0.0f;
  }
  for (int e = 0; e < E; ++e) {  // (one angle per dimension, for q and k alike)
    const float angle = static_cast<float>(last) * sn[e];
    sincosf(angle, &sn[e], &cs[e]);
  }
$QK_NORM$  amlx_rope_half<T, E>(qr, sn, cs, lane);
  amlx_rope_half<T, E>(kn, sn, cs, lane);
  const size_t rows = pos_shape[0];
$KV_SETUP$  if (warp == 0 && h % (H / KVH) == 0 && blockIdx.z == 0) {
$NEW_WRITE$  }
  const int first = WINDOW > 0 ? max(0, last - WINDOW + 1) : 0;
  // this block's slots lo..hi: all of first..last, or (split, CHUNK > 0) the blockIdx.z-th
  // CHUNK of them, so a row's split count and rounding follow from its own span alone
  const int lo = first + (int)blockIdx.z * CHUNK;
  const int hi = CHUNK > 0 ? min(last, lo + CHUNK - 1) : last;
$ATTEND$  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float mx = neg_inf;
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, warp_max[w]);
    float total = 0.0f, o = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
      // a warp that saw no key has max -inf and adds nothing
      const float c = warp_sum[w] > 0.0f ? expf(warp_max[w] - mx) : 0.0f;
      total += c * warp_sum[w];
      o += c * warp_out[w][d];
    }
$FINISH$  }
"""

# A warp's keys in the prologue's layout (lane l: dimensions [l*E, l*E + E) of every key, a
# key a round, or U: $LOOP$), its sums left in warp_max, warp_sum and warp_out.
_WARP_ATTEND = """  for (int e = 0; e < E; ++e) qr[e] *= scale;
  float m = neg_inf, l = 0.0f;
$LOOP$  if (lane == 0) {
    warp_max[warp] = m;
    warp_sum[warp] = l;
  }
  for (int e = 0; e < E; ++e) warp_out[warp][lane * E + e] = acc[e];
"""

# Lane groups (`LANE_DIMS`): a warp reads LG keys a round, each by a group of 32 / LG lanes
# holding EL = D * LG / 32 dimensions of it (8 to 64 contiguous bytes, loaded whole), and takes
# whole runs of slots (a block of the pool, or 16 slots of a contiguous cache), so where a
# slot lies is worked out once a run, not once a key. A key's dot product takes log2(32 / LG)
# shuffles, a batch of U rounds (LANE_BYTES) is loaded, then scored, then added with one rescale
# of the running sums, and scores are kept in base 2 (exp2f, the query scaled by log2(e)): on
# the H200 the one-key loop issued instructions at 57% of the SMs' rate and read DRAM at 9% for
# 16,384 slots at Qwen3-8B's heads (ncu), instruction-bound.
# The query and the new key and value move to this layout through shared memory; each group
# keeps its own running max and sum, merged within the warp at the end (shuffles across the
# groups' lanes of the same dimensions) and returned to base e for the merge across warps.
_LANES_ATTEND = """  constexpr int LPK = 32 / LG;  // lanes a key
  constexpr int EL = D / LPK;    // dimensions a lane
  constexpr int U = $ROUNDS$;     // rounds whose loads a warp issues before using any
  constexpr float LOG2E = 1.4426950408889634f;
  __shared__ float q_s[D], new_s[2][D];
  if (warp == 0) {
    for (int e = 0; e < E; ++e) {
      q_s[lane * E + e] = qr[e] * (scale * LOG2E);
      new_s[0][lane * E + e] = kn[e];
      new_s[1][lane * E + e] = vn[e];
    }
  }
  __syncthreads();
  const int grp = lane / LPK, sub = lane % LPK;
  float ql[EL], al[EL];
  for (int i = 0; i < EL; ++i) {
    ql[i] = q_s[sub * EL + i];
    al[i] = 0.0f;
  }
  float m = neg_inf, l = 0.0f;
  const int run = $RUN$;
  // Slots lo..top come from the cache; the new one (last) from registers, after the loop.
  // (run bounds are the same in every lane, so the shuffles see the whole warp; a group past
  // the run's end adds nothing)
  const int top = min(hi, last - 1);
  int r0 = lo - lo % run + warp * run;
$RUN_PREP$
  for (; r0 <= top; r0 += WARPS * run) {
$RUN_START$
    const int s1 = min(r0 + run - 1, top);
    for (int j0 = max(r0, lo); j0 <= s1; j0 += LG * U) {
      // every load of U rounds is issued before the first is used (the loop's branches kept
      // the compiler from issuing a round's loads before the last round's sums), so a warp
      // waits on memory once for U * LG keys; a slot past the run's end reads as zeros
$RUN_RAW$
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = j0 + u * LG + grp;
        if (j <= s1) {
$RUN_LOAD$
        } else {
$RUN_ZERO$
        }
      }
      // then the U rounds' scores, independent dot products and shuffles with no branch between
      // them, and one rescale of the running sums for all of them (not one a key)
      float s[U], m_new = m;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float kr[EL], part = 0.0f;
$RUN_KEY$
        for (int i = 0; i < EL; ++i) part += ql[i] * kr[i];
        for (int o = LPK / 2; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
        s[u] = j0 + u * LG + grp <= s1 ? part : neg_inf;
        m_new = fmaxf(m_new, s[u]);
      }
      // (a group with no key yet, all of this batch's past the end, stays at -inf and adds nothing)
      const float alpha = m_new == neg_inf ? 1.0f : exp2f(m - m_new);
      l *= alpha;
      for (int i = 0; i < EL; ++i) al[i] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float vr[EL];
$RUN_VALUE$
        const float p = s[u] == neg_inf ? 0.0f : exp2f(s[u] - m_new);
        l += p;
        for (int i = 0; i < EL; ++i) al[i] += p * vr[i];
      }
      m = m_new;
    }
  }
  if (warp == 0 && lo <= last && hi == last) {  // the new key and value, in the first group
    float kr[EL], vr[EL], part = 0.0f;
    for (int i = 0; i < EL; ++i) {
      kr[i] = new_s[0][sub * EL + i];
      vr[i] = new_s[1][sub * EL + i];
      part += ql[i] * kr[i];
    }
    for (int o = LPK / 2; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if (grp == 0) amlx_softmax_step<EL, true>(part, vr, m, l, al);
  }
  for (int o = LPK; o < 32; o <<= 1) {  // the groups' sums merged (a group that saw no key: l = 0)
    const float m_o = __shfl_xor_sync(0xffffffffu, m, o);
    const float l_o = __shfl_xor_sync(0xffffffffu, l, o);
    const float m_new = fmaxf(m, m_o);
    const float a = l > 0.0f ? exp2f(m - m_new) : 0.0f;
    const float c = l_o > 0.0f ? exp2f(m_o - m_new) : 0.0f;
    l = l * a + l_o * c;
    for (int i = 0; i < EL; ++i) al[i] = al[i] * a + __shfl_xor_sync(0xffffffffu, al[i], o) * c;
    m = m_new;
  }
  if (lane == 0) {
    warp_max[warp] = m * (1.0f / LOG2E);  // (base e again, as the merge across warps takes it)
    warp_sum[warp] = l;
  }
  if (grp == 0) {
    for (int i = 0; i < EL; ++i) warp_out[warp][sub * EL + i] = al[i];
  }
"""


class _Run:
    """How the lane-group loop reads one kind of cache: `run`, the slots of a run (r0, a
    multiple of it, its first); `prep`, before the first run; `start`, at each run; `raw`,
    the declaration of U rounds' loads (`u`: the round, slot j); `load`, issuing slot j's
    loads; `zero`, round u's in their place past the run's end; `key` and `value`, round u's
    key into kr and value into vr as floats; `rounds`, U."""

    def __init__(self, run: str, prep: str, start: str, raw: str, load: str, zero: str, key: str, value: str,
                 rounds: str) -> None:
        self.texts = {"$RUN$": run, "$RUN_PREP$": prep, "$RUN_START$": start, "$RUN_RAW$": raw,
                      "$RUN_LOAD$": load, "$RUN_ZERO$": zero, "$RUN_KEY$": key, "$RUN_VALUE$": value,
                      "$ROUNDS$": rounds}

    def fill(self, text: str) -> str:
        for mark, part in self.texts.items():
            text = text.replace(mark, part)
        return text


# A 16-bit or float32 cache's loads stay packed (W words a slot and lane, amlx_word) until used:
# registers for more keys in flight. U rounds hold LANE_BYTES bytes of keys a lane (and as many
# of values), at least one round, and at least two with one group of 32 lanes (LG 1): on the H200
# a 16-bit cache read one round at a time by one group gave wrong partial sums in split blocks
# (2026-12-04 night: head dims 128 and 256, contiguous and paged, any warps, windows or norms;
# compute-sanitizer's memcheck and racecheck found nothing; float32, two rounds, two or more
# groups and unsplit blocks were right). The cause is not found; no default setting read so.
_LANE_ROUNDS = "({ahead} / (EL * (int)sizeof(T)) > 1 ? {ahead} / (EL * (int)sizeof(T)) : (LG == 1 ? 2 : 1))"
_PACKED = dict(
    raw="""      using Word = typename amlx_word<EL * sizeof(T)>::type;
      constexpr int W = EL * sizeof(T) / sizeof(Word);
      Word kw[U][W], vw[U][W];""",
    load="""          const Word* key = reinterpret_cast<const Word*>(run_keys + (size_t)(j - r0) * D);
          const Word* value = reinterpret_cast<const Word*>(run_keys + (size_t)(j - r0) * D + half);
          for (int c = 0; c < W; ++c) {
            kw[u][c] = key[c];
            vw[u][c] = value[c];
          }""",
    zero="""          for (int c = 0; c < W; ++c) kw[u][c] = vw[u][c] = Word{};""",
    key="        amlx_unpack<EL, T>(kw[u], kr);",
    value="        amlx_unpack<EL, T>(vw[u], vr);",
    rounds="$LANE_ROUNDS$")
# Where a block pool's runs lie: each run a block, its id read through the table one run
# ahead (the next run's lookup in flight while this one's keys are read).
_TABLE_PREP = """  int block_at = r0 / run, next_block = r0 <= top ? row_table[block_at] : 0;"""
_TABLE_NEXT = """    const size_t run_block = next_block;
    block_at += WARPS;
    if (r0 + WARPS * run <= top) next_block = row_table[block_at];"""
# Slot j of a run: a contiguous cache's rows in runs of 16, a block pool's blocks through the
# table, a quantized pool's packed slots (dequantized as they are loaded, U = 2 rounds).
_RUN_CONTIGUOUS = _Run(run="16", prep="", start="""    const T* run_keys = row_keys + (size_t)r0 * D + sub * EL;""",
                       **_PACKED)
_RUN_PAGED = _Run(run="block_size", prep=_TABLE_PREP, start=_TABLE_NEXT + """
    const T* run_keys = kv + (run_block * KVH + kvh) * block_size * D + sub * EL;""", **_PACKED)
_RUN_QUANT = _Run(run="block_size", prep=_TABLE_PREP, start=_TABLE_NEXT + """
    const size_t run_slot = (run_block * KVH + kvh) * block_size;""",
                  raw="""      float kf[U][EL], vf[U][EL];""", load="""
          const size_t ks = run_slot + (j - r0), vs = value_slots + ks;
          amlx_dequant<T, EL, BITS, GROUP>(kv + ks * WORDS, scales + ks * GROUPS, biases + ks * GROUPS, sub * EL, kf[u]);
          amlx_dequant<T, EL, BITS, GROUP>(kv + vs * WORDS, scales + vs * GROUPS, biases + vs * GROUPS, sub * EL, vf[u]);""",
                  zero="""          for (int i = 0; i < EL; ++i) kf[u][i] = vf[u][i] = 0.0f;""",
                  key="        for (int i = 0; i < EL; ++i) kr[i] = kf[u][i];",
                  value="        for (int i = 0; i < EL; ++i) vr[i] = vf[u][i];", rounds="2")

# The end of a block: the merged warps' result as the row's output, or (split) as the
# block's partial result for `_COMBINE`: its unnormalised sum o, its max and its total,
# float32 in part_o (B, H, S, D) and part_ml (B, H, S, 2); a block that saw no slot leaves
# total 0 (and max -inf), which the merge skips.
_OUT = """    out[((size_t)b * H + h) * D + d] = static_cast<T>(o / total);
"""
_PARTS = """    const size_t at = ((size_t)b * H + h) * gridDim.z + blockIdx.z;
    part_o[at * D + d] = o;
    if (d == 0) {
      part_ml[at * 2] = mx;
      part_ml[at * 2 + 1] = total;
    }
"""

# A split step's second kernel: each (row, head)'s partial results merged, one thread a
# dimension. A row whose slots all lay in one block gets exactly the unsplit kernel's
# output: its own max gives the factor expf(0) = 1, so o / total is that block's
# o / total bit for bit, whatever blocks the other rows needed.
_COMBINE = r"""
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  const int S = part_ml_shape[2];
  const size_t base = ((size_t)b * H + h) * S;
  float mx = __int_as_float(0xff800000);
  for (int s = 0; s < S; ++s) {
    if (part_ml[(base + s) * 2 + 1] > 0.0f) mx = fmaxf(mx, part_ml[(base + s) * 2]);
  }
  float total = 0.0f, o = 0.0f;
  for (int s = 0; s < S; ++s) {
    const float l = part_ml[(base + s) * 2 + 1];
    if (l > 0.0f) {
      const float c = expf(part_ml[(base + s) * 2] - mx);
      total += c * l;
      o += c * part_o[(base + s) * D + d];
    }
  }
  out[((size_t)b * H + h) * D + d] = static_cast<T>(o / total);
"""

# The key loop: one key a warp a round, or U > 1 keys a round (`round_keys`); $KV_READ$
# loads slot j's key into kr and its value into vr. Two texts, not the second at U = 1:
# that one holds its keys in arrays across the round and takes 140-147 registers at head
# dim 512, past a 16-warp block's 128 (cuda_compile_check.py --ptxas), where this takes 110-128.
_ONE_KEY_LOOP = r"""
  for (int j = lo + warp; j <= hi; j += WARPS) {
    float kr[E], vr[E];
    if (j == last) {
      for (int e = 0; e < E; ++e) { kr[e] = kn[e]; vr[e] = vn[e]; }
    } else {
$KV_READ$
    }
    float part = 0.0f;
    for (int e = 0; e < E; ++e) part += qr[e] * kr[e];
    amlx_softmax_step<E, false>(amlx_warp_sum(part), vr, m, l, acc);
  }
"""

_KEYS_LOOP = r"""
  // U keys a warp a round (round_keys): every key's loads of a
  // round are issued before the first is used, so a warp waits on memory once a round
  constexpr int U = $U$;
  for (int j0 = lo + warp; j0 <= hi; j0 += WARPS * U) {
    float keys_u[U][E], values_u[U][E], s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * WARPS;
      float* kr = keys_u[u];
      float* vr = values_u[u];
      if (j == last) {
        for (int e = 0; e < E; ++e) { kr[e] = kn[e]; vr[e] = vn[e]; }
      } else if (j <= hi) {
$KV_READ$
      }
    }
    float m_new = m;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      // (j is the same in every lane of the warp: all lanes take the same branch)
      float part = 0.0f;
      for (int e = 0; e < E; ++e) part += qr[e] * keys_u[u][e];
      s[u] = j0 + u * WARPS <= hi ? amlx_warp_sum(part) : neg_inf;
      m_new = fmaxf(m_new, s[u]);
    }
    const float alpha = expf(m - m_new);  // (m_new is finite: key j0 is in range)
    l *= alpha;
    for (int e = 0; e < E; ++e) acc[e] *= alpha;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j0 + u * WARPS > hi) continue;
      const float p = expf(s[u] - m_new);
      l += p;
      for (int e = 0; e < E; ++e) acc[e] += p * values_u[u][e];
    }
    m = m_new;
  }
"""

# The new key and value, by the first warp of each key head's first query head: handed back
# as kv_new (2, B*KVH, D) for the cache's write, or (`write_pool`) written by the kernel
# itself into its slot of the block pool, table[b, pos / block_size] at offset pos %
# block_size, the slot the pool's scatter would write (amlx.kv.rows' decode `writes`). No
# block reads that slot in this step: row b's own blocks read slots < pos only (pos itself
# comes from registers), and another row's table never holds a row's unfilled last block.
_NEW_OUT = """
    const size_t at = ((size_t)b * KVH + kvh) * D + lane * E;
    for (int e = 0; e < E; ++e) {
      kv_new[at + e] = static_cast<T>(kn[e]);
      kv_new[rows * KVH * D + at + e] = static_cast<T>(vn[e]);
    }
"""
_NEW_IN_POOL = """
    // (MLX declares inputs const; this variant's pool input is the pool's own buffer)
    T* slot = const_cast<T*>(kv) + (((size_t)row_table[last / block_size] * KVH + kvh) * block_size
                                    + last % block_size) * D + lane * E;
    for (int e = 0; e < E; ++e) {
      slot[e] = static_cast<T>(kn[e]);
      slot[half + e] = static_cast<T>(vn[e]);
    }
"""

# Qwen 3 and Gemma 3 normalise each q and k head before the rotation.
# Their weights load with the row where registers allow (E <= 8, head dims up to 256);
# at 512 each loads just before its norm (with them live from the start, a 16-warp
# block's 128 registers a thread would not do: cuda_compile_check.py --ptxas).
_QK_NORM = """
  if constexpr (E > 8) {
    for (int e = 0; e < E; ++e) qw[e] = static_cast<float>(q_norm[lane * E + e]);
  }
  amlx_head_rms_norm<T, E>(qr, qw, __int_as_float(EPS_BITS), D);
  if constexpr (E > 8) {
    for (int e = 0; e < E; ++e) kw[e] = static_cast<float>(k_norm[lane * E + e]);
  }
  amlx_head_rms_norm<T, E>(kn, kw, __int_as_float(EPS_BITS), D);
"""
_NORM_DECL = " float qw[E], kw[E];"
_NORM_LOAD = """
    if constexpr (E <= 8) {
      qw[e] = static_cast<float>(q_norm[lane * E + e]);
      kw[e] = static_cast<float>(k_norm[lane * E + e]);
    }"""

# Where slot j's key and value are. Contiguous: kv (2, B, KVH, capacity, D).
_CONTIGUOUS_SETUP = """
  const size_t cap = kv_shape[3];  // a runtime value: no new kernel per capacity
  const T* row_keys = kv + ((size_t)b * KVH + kvh) * cap * D;
  const size_t half = rows * KVH * cap * D;
"""
_CONTIGUOUS_READ = """
        const T* keys = row_keys + (size_t)j * D + lane * E;
        amlx_load<E>(keys, kr);
        amlx_load<E>(keys + half, vr);"""
# Paged (a block pool, amlx.kv): kv (2, blocks, KVH, block_size, D) (one head
# of one block contiguous), table (B, width) int32 the row's block ids in
# position order; slot j lies at offset j % block_size of block table[b, j / block_size].
_PAGED_SETUP = """
  const int block_size = kv_shape[3];
  const size_t half = (size_t)kv_shape[1] * KVH * block_size * D;
  const int* row_table = table + (size_t)b * table_shape[1];
"""
_PAGED_READ = """
        const size_t piece = (size_t)row_table[j / block_size] * KVH + kvh;
        const T* keys = kv + (piece * block_size + j % block_size) * D + lane * E;
        amlx_load<E>(keys, kr);
        amlx_load<E>(keys + half, vr);"""

# Paged and quantized (kv_bits, amlx.kv.pool): kv (2, blocks, KVH, block_size,
# D * BITS / 32) uint32 packed values, scales and biases (2, blocks, KVH,
# block_size, D / GROUP) in T; read through the table as above and dequantized
# in registers (nothing gathered, no dequantized copy of the cache).
_QUANT_SETUP = """
  constexpr int WORDS = D * BITS / 32;  // uint32 words per slot and head
  constexpr int GROUPS = D / GROUP;     // scales (and biases) per slot and head
  const int block_size = kv_shape[3];
  const size_t value_slots = (size_t)kv_shape[1] * KVH * block_size;  // the values follow the keys
  const int* row_table = table + (size_t)b * table_shape[1];
"""
_QUANT_READ = """
        const size_t ks = ((size_t)row_table[j / block_size] * KVH + kvh) * block_size + j % block_size;
        const size_t vs = value_slots + ks;
        amlx_dequant<T, E, BITS, GROUP>(kv + ks * WORDS, scales + ks * GROUPS, biases + ks * GROUPS, lane * E, kr);
        amlx_dequant<T, E, BITS, GROUP>(kv + vs * WORDS, scales + vs * GROUPS, biases + vs * GROUPS, lane * E, vr);"""

WARPS = 16  # warps per (head, row); a block is WARPS * 32 threads


def _choice_from_env(name: str, choices: tuple[int, ...], default: int) -> int:
    """The environment variable `name` as one of `choices` (unset: `default`), else ValueError
    naming the variable: the kernel's settings, read once at import."""
    raw = os.environ.get(name, str(default)).strip()
    if raw not in [str(n) for n in choices]:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, not {raw!r}")
    return int(raw)


def _keys_from_env() -> int:
    """AMLX_ATTENTION_KEYS (1, 2 or 4; default 1)."""
    return _choice_from_env("AMLX_ATTENTION_KEYS", (1, 2, 4), 1)


# Keys a warp reads a round (`round_keys` caps it by registers). Measured alone on the H200
# (benchmarks/step_kernel_micro.py, 2026-12-04; one row, 16 warps): 1 key costs 7.5 us a call
# at 1 position, 14.8 at 200, 40.6 at 1,024 and 136.7 at 4,096; 2 and 4 keys were no faster
# at any length (15.6-15.7 at 200, 152.8-155.4 at 4,096), so 1. AMLX_ATTENTION_KEYS=2/4
# picks another count for a whole process (benchmarks compare them).
KEYS_PER_ROUND = _keys_from_env()


def _split_from_env() -> int:
    """AMLX_SPLIT_KEYS (slots a block reads before a row is split; 0: never split; default
    512), else ValueError naming the variable."""
    raw = os.environ.get("AMLX_SPLIT_KEYS", "512").strip()
    if not (raw.isascii() and raw.isdigit()):  # (str.isdigit alone takes "²", which int() refuses)
        raise ValueError(f"AMLX_SPLIT_KEYS must be a whole number of slots (0: never split), not {raw!r}")
    return int(raw)


# Slots one block of a (head, row) reads. A block's warps read their keys one after another,
# so one block for a long row leaves most of the device idle (on the H200, 40.6 us a call at
# 1,024 slots and 136.7 at 4,096, above). Past SPLIT_KEYS slots a row's slots are split
# over blocks of SPLIT_KEYS each, whose partial results a second kernel merges (`_COMBINE`):
# a graph node more a layer, so only where a row may see more (short contexts, where a step's
# host time bounds small models, keep one kernel).
SPLIT_KEYS = _split_from_env()


def _lane_dims_from_env() -> int:
    """AMLX_ATTENTION_LANE_DIMS (0, 4, 8 or 16; default 8)."""
    return _choice_from_env("AMLX_ATTENTION_LANE_DIMS", (0, 4, 8, 16), 8)


# Dimensions of a key a lane holds in the lane-group loop (`_LANES_ATTEND`; 0: the one-key loop,
# a warp a key). 4, 8 or 16: a warp reads D * 4 / 128, D * 8 / 256 or D * 16 / 256 keys a round
# (`lane_groups`).
# Measured alone on the H200 (benchmarks/step_kernel_micro.py, 2026-12-04 afternoon; Qwen3-8B's
# heads, device us a call, one-key loop -> 8 dims a lane): one row at 200 slots 11.7 -> 11.9,
# 1,024: 29.1 -> 21.3, 4,096: 44.1 -> 34.1, 16,384: 142.6 -> 75.8 (8 warps a block); 64 rows at
# 256: 132.7 -> 63.1 (8 warps). 16 dims a lane was no better past 1,024 slots.
LANE_DIMS = _lane_dims_from_env()


def _lane_one_from_env() -> bool:
    """AMLX_ATTENTION_LANE_ONE (0 or 1; default 1)."""
    return _choice_from_env("AMLX_ATTENTION_LANE_ONE", (0, 1), 1) == 1


# Where LANE_DIMS gives one key a round (a lane's dims * 32 = the head dim: 8 at head dim 256, as
# Gemma-3-1B, 4B and 12B have, or 4 at 128), the lane-group loop with one group of 32 lanes (True,
# the default), or the one-key loop (False). The first reads a key in 16-byte (8-byte) loads, a
# pool block's slots through one table lookup, several rounds' loads ahead and rescales once a
# batch, where the one-key loop looks a key's slot up and loads it value by value.
# Measured alone on the H200 (step_kernel_micro.py --shape gemma3-4b, 2026-12-04 night; one row,
# 8 warps, device us a call at 1,024 / 16,384 slots): one-key loop 44.5 / 86.2, one group (8 dims
# a lane, 64 bytes ahead) 20.6 / 53.6, two groups of 16 lanes (16 dims) 19.8 / 50.9.
LANE_ONE = _lane_one_from_env()


LANE_BYTES_CHOICES = (16, 32, 48, 64, 128)  # (48: 3 rounds at 8 16-bit dims a lane, fewer registers than 4)


def _lane_bytes_from_env() -> int:
    """AMLX_ATTENTION_LANE_BYTES (one of LANE_BYTES_CHOICES; default 64)."""
    return _choice_from_env("AMLX_ATTENTION_LANE_BYTES", LANE_BYTES_CHOICES, 64)


# Bytes of keys (and as many of values) a lane of the lane-group loop loads before it uses the
# first: at 8 bfloat16 dims a lane, 64 bytes are 4 rounds, 8 keys a warp at head dim 128 (a
# quantized pool, dequantized as it is loaded, takes 2 rounds whatever this says).
# Measured alone on the H200 (step_kernel_micro.py, 2026-12-04 evening; Qwen3-8B's heads, 8 warps,
# device us a call, 16 / 64 / 128 bytes): one row at 1,024 slots 27.4 / 22.1 / 21.8, at 16,384
# 73.7 / 64.7 / 71.9; 64 rows at 256: 61.9 / 52.6 / 62.3 (128 bytes: 116 registers, fewer warps an
# SM). Then each batch of rounds scored first and the sums rescaled once a batch: 16,384 slots
# 65.2 / 63.7 -> 62.3 / 63.1, 1,024: 20.9 -> 19.4 / 20.0 (same calls, the two alternating).
LANE_BYTES = _lane_bytes_from_env()

# Blocks a step launches from which the lane-group loop runs WARPS / 2 warps a block: more,
# smaller blocks fit the SMs' registers then (measured as above: 16,384 slots of one row, 1,024
# blocks, 84.7 us at 16 warps and 75.8 at 8; 64 rows, 2,048 blocks, 80.3 and 63.1; one row at
# 4,096, 256 blocks, 34.1 and 37.3, so 16 below). (2026-12-04 night, 64 rows of 256 slots at
# Qwen3-8B's heads, 2,048 blocks: 4 warps 44.1-48.5 us against 8 warps' 49.1-54.7; one row of
# 16,384, 1,024 blocks: 65.2-68.0 against 64.0-67.0. A quarter of WARPS past 2,048 blocks may
# pay; not yet tested on a GPU, so not taken.)
BUSY_BLOCKS = 512


def lane_groups(dim: int, quantized: bool = False) -> int:
    """Keys a warp reads a round in the lane-group loop at head dim `dim` (LANE_DIMS dimensions a
    lane, at most 8 reading a quantized pool: 16 took 142-152 registers in float16 and bfloat16,
    past a 16-warp block's 128, scripts/cuda_compile_check.py --only lanes --ptxas), or 0 where
    the loop does not apply (LANE_DIMS 0, the lane's dims * 32 not a multiple of `dim` in 1..32
    keys, or one key without LANE_ONE: the one-key loop)."""
    dims = min(LANE_DIMS, 8) if quantized else LANE_DIMS
    if dims <= 0 or (dims * 32) % dim:
        return 0
    groups = dims * 32 // dim
    return groups if (1 if LANE_ONE else 2) <= groups <= 32 else 0


MAX_DIM = 512  # head dims the CUDA kernel takes (scripts/cuda_compile_check.py --ptxas: registers)
MAX_QUANT_DIM = 256  # ... reading a quantized pool

# compiled variants by kernel_source's arguments, and the split step's merge under ("combine",)
_KERNELS: dict[tuple, fast.CudaKernel] = {}
_DTYPES = (bfloat16, float16, float32)
QUANT_BITS = (4, 8)


def available(device_name: str) -> bool:
    """Whether the kernel can run for a model on `device_name` ("cpu" | "gpu"): the
    CPU (amlx's C++ kernel), or the GPU where MLX runs on CUDA. Engines choose whether
    to use it once, when they are built (EngineOptions.decode_kernel;
    AMLX_DECODE_KERNEL=0/1 overrides)."""
    return device_name == "cpu" or (device_name == "gpu" and fast.cuda_available())


def _on_cpu() -> bool:
    return device.default_device() == "cpu"


def kernel_source(qk_norm: bool, paged: bool = False, quantized: bool = False,
                  keys: int = 1, write_pool: bool = False, split: bool = False,
                  lanes: bool = False) -> tuple[str, list[str], str, str]:
    """(name, input names, body, header) of one variant, as handed to MLX (which
    writes the signature and the template constants; scripts/cuda_compile_check.py);
    `keys`: keys a warp reads a round (`round_keys`); `write_pool`: the new key and
    value go into the (paged, unquantized) pool, not out as kv_new; `split`: each block
    takes CHUNK slots and hands back its partial result (`_PARTS`, merged by `_COMBINE`);
    `lanes`: the lane-group loop (`_LANES_ATTEND`, LG keys a round, a template constant)."""
    if lanes and keys != 1:
        raise ValueError("decode_attention: the lane-group loop takes no whole keys a round")
    if write_pool and (quantized or not paged):
        raise ValueError("decode_attention: only an unquantized block pool is written by the kernel")
    norms = ["q_norm", "k_norm"] if qk_norm else []
    if quantized:
        setup, read = _QUANT_SETUP, _QUANT_READ
    else:
        setup, read = (_PAGED_SETUP, _PAGED_READ) if paged else (_CONTIGUOUS_SETUP, _CONTIGUOUS_READ)
    loop = _ONE_KEY_LOOP if keys == 1 else _KEYS_LOOP.replace("$U$", str(int(keys)))
    attend = _WARP_ATTEND
    if lanes:
        reader = _RUN_QUANT if quantized else _RUN_PAGED if paged else _RUN_CONTIGUOUS
        attend = reader.fill(_LANES_ATTEND).replace("$LANE_ROUNDS$", _LANE_ROUNDS.format(ahead=LANE_BYTES))
    source = _SOURCE.replace("$ATTEND$", attend).replace("$QK_NORM$", _QK_NORM if qk_norm else "").replace(
        "$NORM_DECL$", _NORM_DECL if qk_norm else "").replace("$NORM_LOAD$", _NORM_LOAD if qk_norm else "").replace(
        "$LOOP$", loop).replace("$KV_SETUP$", setup).replace("$KV_READ$", read).replace(
        "$NEW_WRITE$", _NEW_IN_POOL if write_pool else _NEW_OUT).replace("$FINISH$", _PARTS if split else _OUT)
    name = "amlx_decode_attention" + ("_qk_norm" if qk_norm else "") + ("_paged" if paged else "") + (
        "_quantized" if quantized else "") + (f"_keys{keys}" if keys != 1 else "") + (
        "_write_pool" if write_pool else "") + ("_split" if split else "") + ("_lanes" if lanes else "")
    pool = ["kv", "scales", "biases"] if quantized else ["kv"]
    return name, ["qkv", *norms, "inv_freq", *pool, "pos", *(["table"] if paged else [])], source, _HEADER


def round_keys(dim: int, quantized: bool = False, wanted: int | None = None) -> int:
    """Keys a warp reads a round at head dim `dim`: `wanted` (default KEYS_PER_ROUND), at most
    what a 16-warp block's 128 registers a thread hold (scripts/cuda_compile_check.py --ptxas:
    4 up to dim 128, 2 at 256 and 1 beyond; reading a quantized pool, 4 up to 128, else 1)."""
    e = dim // 32
    cap = (4 if e <= 4 else 1) if quantized else (4 if e <= 4 else 2 if e <= 8 else 1)
    return max(1, min(KEYS_PER_ROUND if wanted is None else wanted, cap))


def _kernel(qk_norm: bool, paged: bool = False, quantized: bool = False, keys: int = 1,
            write_pool: bool = False, split: bool = False, lanes: bool = False) -> fast.CudaKernel:
    key = (qk_norm, paged, quantized, keys, write_pool, split, lanes, LANE_BYTES if lanes else 0)
    if key not in _KERNELS:
        name, inputs, source, header = kernel_source(qk_norm, paged, quantized, keys, write_pool, split, lanes)
        outputs = (["part_o", "part_ml"] if split else ["out"]) + ([] if write_pool else ["kv_new"])
        _KERNELS[key] = fast.CudaKernel(name, inputs, outputs, source, header=header)
    return _KERNELS[key]


def _combine_kernel() -> fast.CudaKernel:
    if ("combine",) not in _KERNELS:
        _KERNELS["combine",] = fast.CudaKernel("amlx_decode_attention_combine", ["part_o", "part_ml"], ["out"],
                                               _COMBINE)
    return _KERNELS["combine",]


def split_count(span: int, window: int | None) -> int:
    """Blocks a row's slots are split over in a step whose rows reach at most `span` slots:
    1 (no split) where a row sees at most SPLIT_KEYS slots (its window included), else one
    block per SPLIT_KEYS slots it may see. A row's own slots decide how its blocks cut them
    (`lo`, `hi` in the kernel), so its output does not depend on the other rows."""
    reach = span if window is None else min(span, window)
    return 1 if SPLIT_KEYS <= 0 or reach <= SPLIT_KEYS else -(-reach // SPLIT_KEYS)


def writes_pool(quant: tuple | None, table: Array | None) -> bool:
    """Whether `decode_attention(..., write_pool=True)` writes the new key and value into
    the pool itself: on CUDA, for an unquantized block pool (the CPU primitive and a
    quantized pool hand them back for the cache's write)."""
    return table is not None and quant is None and not _on_cpu()


def supports(qkv: Array, kv: Array, heads: int, paged: bool = False,
             quant: tuple[Array, Array, int, int] | None = None) -> bool:
    """Whether the kernel takes this step: `kv` contiguous (2, B, KVH, capacity, D)
    or, `paged`, a block pool (2, blocks, KVH, block_size, D); with `quant`
    (scales, biases, bits, group), a quantized block pool (`decode_attention`)."""
    kv_heads = kv.shape[2]
    if quant is None:
        dim = kv.shape[4]
        if kv.dtype is not qkv.dtype:
            return False
    else:
        scales, biases, bits, group = quant
        if not paged or bits not in QUANT_BITS or kv.dtype is not uint32:
            return False
        dim = kv.shape[4] * 32 // bits
        if not (group >= 32 and dim % group == 0 and scales.dtype is qkv.dtype and biases.dtype is qkv.dtype
                and scales.shape == biases.shape == (*kv.shape[:4], dim // group)):
            return False
    # (CUDA: a warp holds a head, 32 lanes of dim / 32 values, and a block of 16 warps
    # launches with up to 128 registers a thread: the quantized read at dim 512 takes 168 or
    # more, so it stops at MAX_QUANT_DIM; the CPU takes any even dim)
    top = MAX_QUANT_DIM if quant is not None else MAX_DIM
    dims_ok = dim % 2 == 0 if _on_cpu() else dim % 32 == 0 and 32 <= dim <= top
    return (qkv.dtype in _DTYPES and dims_ok and heads % kv_heads == 0
            and qkv.shape[1] == (heads + 2 * kv_heads) * dim)


def _bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def decode_attention(qkv: Array, kv: Array, positions: Array, *, heads: int, scale: float,
                     window: int | None, inv_freq: Array, q_norm: Array | None = None,
                     k_norm: Array | None = None, eps: float = 0.0,
                     table: Array | None = None,
                     quant: tuple[Array, Array, int, int] | None = None,
                     write_pool: bool = False) -> tuple[Array, Array | None]:
    """One decode step of attention from the fused q/k/v projection.

    qkv (B, (H + 2*KVH) * D) holds each row's new token; kv (2, B, KVH,
    capacity, D) the cache's keys and values, read at positions < `positions`
    (B,) int32. With a block `table` (B, width) int32, kv is instead a block
    pool (2, blocks, KVH, block_size, D) and row b's position p lies in block
    table[b, p // block_size] (amlx.kv): the kernel reads through the table, so
    no row's keys are gathered or copied. With `quant` = (scales, biases, bits,
    group) as well, the pool is quantized (kv_bits, amlx.kv.pool): kv (2,
    blocks, KVH, block_size, D * bits / 32) uint32 and scales, biases (2,
    blocks, KVH, block_size, D / group) in qkv's dtype, MLX's affine layout;
    the kernel dequantizes what it reads in registers. The new
    q and k get their head RMSNorm (weights `q_norm`/`k_norm`, both or neither)
    and the rotary embedding (`inv_freq`: (D/2,) float32 angles per position);
    then softmax(scale * q k^T) v over slots [pos - window + 1, pos] (all of
    0..pos without a window). The new position's own key and value enter in
    full precision (the cache holds them quantized only after the write).
    Returns (out, kv_new): out (B, H*D), the heads
    side by side as the output projection takes them, and the new key and value
    (2, B * KVH, D), in qkv's dtype, to write into the cache at `positions`
    (quantized there, by the cache's own write, with `quant`): rows by heads in one
    axis, the shape the block pool's scatter takes, so a decode step has no reshape
    between the kernel and the write (a graph node, host time, in every layer).

    With `write_pool`, where `writes_pool` holds, the kernel writes them into the
    pool instead, at each row's slot (table[b, pos // block_size], offset pos %
    block_size), and kv_new is None: the write is no graph node at all (a scatter
    and its reshapes fewer a layer). `kv` must then be the pool's own buffer, whole
    (the pool array, or a view of it: amlx.kv.paged.read_views; MLX would hand the
    kernel a copy of a strided input), on this stream: MLX sees no output there, so
    nothing orders a later reader of the pool within the same launch (the engine
    evaluates a decode step on its own), and stream order after it."""
    if write_pool and not writes_pool(quant, table):
        write_pool = False
    if _on_cpu():
        return cpu_kernels.decode_attention(qkv, kv, positions, heads=heads, scale=scale, window=window,
                                            inv_freq=inv_freq, q_norm=q_norm, k_norm=k_norm, eps=eps, table=table,
                                            quant=quant)
    b = qkv.shape[0]
    paged = table is not None
    kv_heads = kv.shape[2]
    dim = kv.shape[4] if quant is None else kv.shape[4] * 32 // quant[2]
    qk_norm = q_norm is not None
    norms = [q_norm, k_norm] if qk_norm else []
    template = {"T": qkv.dtype, "H": heads, "KVH": kv_heads, "D": dim, "WINDOW": window or 0,
                "SCALE_BITS": _bits(scale), "EPS_BITS": _bits(eps)}
    pool = [kv]
    if quant is not None:
        scales, biases, bits, group = quant
        pool = [kv, scales, biases]
        template.update(BITS=int(bits), GROUP=int(group))
    splits = split_count(table.shape[1] * kv.shape[3] if paged else kv.shape[3], window)
    template["CHUNK"] = SPLIT_KEYS if splits > 1 else 0
    if splits > 1:
        shapes, dtypes = [(b, heads, splits, dim), (b, heads, splits, 2)], [float32, float32]
    else:
        shapes, dtypes = [(b, heads * dim)], [qkv.dtype]
    if not write_pool:
        shapes, dtypes = [*shapes, (2, b * kv_heads, dim)], [*dtypes, qkv.dtype]
    groups = lane_groups(dim, quant is not None)
    warps = WARPS
    if groups:
        template["LG"] = groups
        if heads * b * splits >= BUSY_BLOCKS and WARPS > 1:
            warps = WARPS // 2
    template["WARPS"] = warps
    threads = 32 * warps
    keys = 1 if groups else round_keys(dim, quant is not None)
    got = _kernel(qk_norm, paged, quant is not None, keys, write_pool, splits > 1, groups > 0)(
        [qkv, *norms, inv_freq, *pool, positions, *([table] if paged else [])],
        shapes, dtypes, grid=(heads * threads, b, splits), threadgroup=(threads, 1, 1), template=template)
    out = got[0]
    if splits > 1:
        out = _combine_kernel()([got[0], got[1]], [(b, heads * dim)], [qkv.dtype], grid=(heads * dim, b, 1),
                                threadgroup=(dim, 1, 1), template={"T": qkv.dtype, "H": heads, "D": dim})[0]
    return (out, None) if write_pool else (out, got[-1])
