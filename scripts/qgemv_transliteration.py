"""A numpy transliteration of quantized_gemv's version-2 kernel, lane by lane:
its launch shape, work split, clamped chunks and rows, double-buffered loads,
x batches and float32 arithmetic (the unpacking's FMAs are exact, so computed
in float64 and rounded), against the tests' float64 reference. No GPU is
needed: it checks the kernel's indexing where CUDA cannot run; it does not
read the CUDA source, so it must be kept in step with it by hand.

    python scripts/qgemv_transliteration.py     # a few shapes, ~10 s
"""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from amlx.models import quantized_gemv as qg
from test_quantized_gemv import packed_layer, reference, ROUND
from helpers.kv_reference import round_to
f32 = np.float32

def bits_of(a, dtype):  # raw element buffer of x as the kernel sees it
    if dtype == "float32": return a.astype(np.float32).view(np.uint32)
    if dtype == "float16": return a.astype(np.float16).view(np.uint16)
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # exact: values are bf16

def cvt(u, dtype):  # amlx_cvt on one 32-bit word
    u = np.uint32(u)
    if dtype == "bfloat16": return [np.uint32(u << 16).view(f32), np.uint32(u & 0xffff0000).view(f32)]
    if dtype == "float16": return [f32(np.uint16(u & 0xffff).view(np.float16)), f32(np.uint16(u >> 16).view(np.float16))]
    return [u.view(f32)]

def unpack(w, BITS):
    P = 32 // BITS; MASK = (1 << BITS) - 1; SH = 12 if BITS == 4 else 16
    hi = np.uint32(w) >> np.uint32(SH); out = []
    for e in range(P):
        low = e * BITS + BITS <= 23; s = e * BITS if low else e * BITS - SH
        src = np.uint32(w) if low else hi
        f = np.uint32((src & np.uint32(MASK << s)) | np.uint32(0x4B000000)).view(f32)
        a = np.uint32((127 - s) << 23).view(f32); b = np.uint32((150 - s) << 23).view(f32)
        out.append(f32(np.float64(f) * np.float64(a) - np.float64(b)))  # exact: fma == this (all exact)
    return out

def run(x, w, scales, biases, BITS, dtype, rows):
    RB = qg.bucket(rows); K = x.shape[1]; N, words = w.shape
    grid, group = qg.launch_shape(rows, N, K, BITS)
    WXT, KS = group[0], group[1]; WX = WXT // 32; blocks = grid[0] // group[0]
    M = 4 if RB <= 4 else 2; U = 2 if RB <= 1 else 1
    VPW = 32 // BITS; VPC = 4 * VPW; size = 4 if dtype == "float32" else 2; XPW = 4 // size; XW = VPW // XPW
    JB = 4 if 4 * XW * RB <= 64 else 2 if 2 * XW * RB <= 64 else 1; XU = JB * XW // 4
    chunks = words // 4; groups = scales.shape[1]; cpg_shift = int(np.log2((K // groups) // VPC))
    xraw = bits_of(x, dtype).reshape(-1); wflat = w.reshape(-1)
    sc = scales.astype(np.float32).reshape(-1); bi = biases.astype(np.float32).reshape(-1)
    out = np.zeros((rows, N), np.float32); per_elem_u4 = 16 // size
    for blk in range(blocks):
        for wx in range(WX):
            n0 = (blk * WX + wx) * M; row = [min(n0 + m, N - 1) for m in range(M)]
            total = np.zeros((M, RB), np.float32)
            for ks in range(KS):
                ylane = np.zeros((32, M, RB), np.float32)
                for lane in range(32):
                    y = ylane[lane]; stride = 32 * KS
                    def load(c0):
                        wv, sv, bv = {}, {}, {}
                        for u in range(U):
                            c = c0 + u * stride; live = c < chunks; cc = c if live else chunks - 1; g = cc >> cpg_shift
                            for m in range(M):
                                wv[u, m] = wflat[row[m] * words + cc * 4: row[m] * words + cc * 4 + 4]
                                sv[u, m] = sc[row[m] * groups + g] if live else f32(0)
                                bv[u, m] = bi[row[m] * groups + g] if live else f32(0)
                        return wv, sv, bv
                    c0 = lane + 32 * ks; wv, sv, bv = load(c0)
                    while c0 < chunks:
                        for u in range(U):
                            c = min(c0 + u * stride, chunks - 1)
                            a = np.zeros((M, RB), np.float32); xs = np.zeros(RB, np.float32)
                            for jb in range(0, 4, JB):
                                xv = {}
                                for r in range(RB):
                                    base = min(r, rows - 1) * K + c * VPC + jb * VPW
                                    raw = [xraw[base + i * per_elem_u4: base + (i + 1) * per_elem_u4] for i in range(XU)]
                                    xv[r] = np.concatenate(raw).view(np.uint32)
                                for jj in range(JB):
                                    xf = {}
                                    for r in range(RB):
                                        xf[r] = sum((cvt(xv[r][jj * XW + t], dtype) for t in range(XW)), [])
                                        for e in range(VPW): xs[r] = f32(xs[r] + xf[r][e])
                                    for m in range(M):
                                        q = unpack(wv[u, m][jb + jj], BITS)
                                        for r in range(RB):
                                            for e in range(VPW): a[m, r] = f32(np.float64(q[e]) * np.float64(xf[r][e]) + np.float64(a[m, r]))
                            for m in range(M):
                                for r in range(RB): y[m, r] = f32(y[m, r] + f32(f32(sv[u, m] * a[m, r]) + f32(bv[u, m] * xs[r])))
                        wv, sv, bv = load(c0 + stride * U)
                        c0 += stride * U
                total += ylane.sum(axis=0)
            for m in range(M):
                n = n0 + m
                if n < N:
                    for r in range(rows): out[r, n] = total[m, r]
    return out

def check(rows, n, k, group, bits, dtype, seed):
    rng = np.random.default_rng(seed)
    packed, scales, biases, q = packed_layer(rng, n, k, group, bits, dtype)
    x = round_to(rng.normal(0.0, 1.0, size=(rows, k)), dtype)
    want, mag = reference(x, scales, biases, q, group)
    got = run(x, packed, scales, biases, bits, dtype, rows).astype(np.float64)
    err = np.abs(got - want); bound = ROUND[dtype] * np.abs(want) + 1e-5 * mag
    print(f"rows={rows} n={n} k={k} g={group} bits={bits} {dtype}: max err/bound {np.max(err / bound):.3f}", flush=True)
    assert np.all(err <= bound)

if __name__ == "__main__":
    for args in [(1, 9, 256, 64, 4, "bfloat16", 1), (3, 5, 128, 32, 8, "float16", 2), (2, 6, 96, 32, 4, "float32", 3),
                 (5, 5, 256, 128, 4, "bfloat16", 4), (8, 3, 96, 32, 8, "float32", 5), (1, 4, 4096, 64, 4, "bfloat16", 6),
                 (4, 3, 2048, 128, 8, "float16", 7), (2, 7, 4096, 64, 4, "bfloat16", 8), (2, 5, 160, 32, 8, "bfloat16", 9)]:
        check(*args)
