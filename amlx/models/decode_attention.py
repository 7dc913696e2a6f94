"""Decode attention without a mask, as one CUDA kernel.

In a decode step each row adds one token at its own position, and the cache
buffers are longer than any row's history (fixed capacity, so the step
compiles once). MLX's fused attention takes no per-row lengths: the unfilled
slots need an array mask, and with one MLX falls back to about a dozen graph
nodes per layer (matmuls, softmax, select). Every node costs host time in
each step, and decoding small models is bound by exactly that host time.

This kernel reads each row's position instead: row b attends to slots
max(0, pos[b] - window + 1) .. pos[b] only, with an online softmax in float32
(one warp per key at a time, several warps per head, merged at the end). It
runs only on MLX's CUDA backend; elsewhere (and with AMLX_DECODE_KERNEL=0)
attention keeps the mask path, which computes the same thing.
"""

from __future__ import annotations

import os
import struct

from amlx._mlx import Array, bfloat16, device, fast, float16, float32

_HEADER = r"""
__device__ float amlx_warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
"""

# q (B, H, 1, D), keys/values (B, KVH, capacity, D), pos (B,) int32 -> out (B, H*D).
# One block of WARPS warps per (head, row). Lane l holds dimensions
# [l*E, l*E + E) of q, of every key and value it reads and of its partial
# output (E = D / 32, so a warp reads one key row in one coalesced pass).
# Warp w takes keys first + w, first + w + WARPS, ... with its own online
# softmax; the warps' partial results are merged at the end.
_SOURCE = r"""
  constexpr int E = D / 32;
  const int h = blockIdx.x, b = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kvh = h / (H / KVH);
  __shared__ float warp_max[WARPS];
  __shared__ float warp_sum[WARPS];
  __shared__ float warp_out[WARPS][D];
  const float scale = __int_as_float(SCALE_BITS);
  const float neg_inf = __int_as_float(0xff800000);
  float qr[E], acc[E];
  const T* qp = q + ((size_t)b * H + h) * D + lane * E;
  for (int e = 0; e < E; ++e) {
    qr[e] = static_cast<float>(qp[e]) * scale;
    acc[e] = 0.0f;
  }
  const int last = pos[b];
  const int first = WINDOW > 0 ? max(0, last - WINDOW + 1) : 0;
  const size_t cap = keys_shape[2];  // a runtime value: no new kernel per capacity
  const size_t base = ((size_t)b * KVH + kvh) * cap * D + lane * E;
  float m = neg_inf, l = 0.0f;
  for (int j = first + warp; j <= last; j += WARPS) {
    const T* kr = keys + base + (size_t)j * D;
    const T* vr = values + base + (size_t)j * D;
    float part = 0.0f;
    for (int e = 0; e < E; ++e) part += qr[e] * static_cast<float>(kr[e]);
    const float s = amlx_warp_sum(part);
    const float m_new = fmaxf(m, s);
    const float alpha = expf(m - m_new);
    const float p = expf(s - m_new);
    l = l * alpha + p;
    for (int e = 0; e < E; ++e) acc[e] = acc[e] * alpha + p * static_cast<float>(vr[e]);
    m = m_new;
  }
  if (lane == 0) {
    warp_max[warp] = m;
    warp_sum[warp] = l;
  }
  for (int e = 0; e < E; ++e) warp_out[warp][lane * E + e] = acc[e];
  __syncthreads();
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
    out[((size_t)b * H + h) * D + d] = static_cast<T>(o / total);
  }
"""

WARPS = 16  # keys in flight per (head, row); a block is WARPS * 32 threads

_KERNEL: fast.CudaKernel | None = None
_DTYPES = (bfloat16, float16, float32)


def enabled() -> bool:
    """Whether decode steps here use the kernel (MLX on CUDA, GPU as default device)."""
    if os.environ.get("AMLX_DECODE_KERNEL", "1") == "0":
        return False
    return fast.cuda_available() and device.default_device() == "gpu"


def _kernel() -> fast.CudaKernel:
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = fast.CudaKernel("amlx_decode_attention", ["q", "keys", "values", "pos"], ["out"], _SOURCE,
                                  header=_HEADER)
    return _KERNEL


def supports(q: Array, keys: Array) -> bool:
    b, heads, length, dim = q.shape
    kv_heads = keys.shape[1]
    return (length == 1 and q.dtype in _DTYPES and keys.dtype is q.dtype and dim % 32 == 0
            and 32 <= dim <= 512 and heads % kv_heads == 0)


def decode_attention(q: Array, keys: Array, values: Array, positions: Array, scale: float,
                     window: int | None) -> Array:
    """softmax(scale * q k^T) v for one query per row over slots
    [pos - window + 1, pos] (all of 0..pos without a window). q (B, H, 1, D),
    keys/values (B, KVH, capacity, D) with D == q's, positions (B,) int32.
    Returns (B, H*D): the heads side by side, as the output projection takes them."""
    b, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    scale_bits = struct.unpack("<i", struct.pack("<f", float(scale)))[0]
    threads = 32 * WARPS
    (out,) = _kernel()([q, keys, values, positions], [(b, heads * dim)], [q.dtype],
                       grid=(heads * threads, b, 1), threadgroup=(threads, 1, 1),
                       template={"T": q.dtype, "H": heads, "KVH": kv_heads, "D": dim,
                                 "WINDOW": window or 0, "WARPS": WARPS, "SCALE_BITS": scale_bits})
    return out
