"""A numpy transliteration of quantized_gemv's kernels, lane by lane: the launch
shape (either rule, or a given (warps, split)), the work split of _DIMS (block,
warp wx of WX along the columns, K slice ks of KS), each version's K loop (version
2: clamped chunks and rows, double-buffered loads, x batches; version 1: two chunks
an iteration, chunks past the end skipped), amlx_reduce_store (the butterfly over a
warp's lanes, the K slices' partial sums through the block's shared array at its
indices, checked in bounds and written once, summed in slice order) and the float32
arithmetic (the unpacking's FMAs are exact, so computed in float64 and rounded),
against the tests' float64 reference. No GPU is needed: it checks the kernels'
indexing where CUDA cannot run; it does not read the CUDA source, so it must be kept
in step with it by hand.

    python scripts/qgemv_transliteration.py                  # fixed cases, both versions, every block shape
    python scripts/qgemv_transliteration.py --hypothesis 40  # and 40 drawn cases (hypothesis)
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

def run(x, w, scales, biases, BITS, dtype, rows, version=2, launch=None):
    RB = qg.bucket(rows); K = x.shape[1]; N, words = w.shape
    size = 4 if dtype == "float32" else 2
    grid, group = qg.launch_shape(rows, N, K, BITS, version, launch if isinstance(launch, str) else None, size,
                                  launch if isinstance(launch, tuple) else None)
    WXT, KS = group[0], group[1]; WX = WXT // 32; blocks = grid[0] // group[0]
    M = 4 if RB <= 4 else 2; U = (2 if RB <= 1 else 1) if version == 2 else 2
    VPW = 32 // BITS; VPC = 4 * VPW; XPW = 4 // size; XW = VPW // XPW
    JB = 4 if 4 * XW * RB <= 64 else 2 if 2 * XW * RB <= 64 else 1; XU = JB * XW // 4
    # (version 1 loads x a word's worth at a time: the same values, so the batches are shared)
    chunks = words // 4; groups = scales.shape[1]; cpg_shift = int(np.log2((K // groups) // VPC))
    xraw = bits_of(x, dtype).reshape(-1); wflat = w.reshape(-1)
    sc = scales.astype(np.float32).reshape(-1); bi = biases.astype(np.float32).reshape(-1)
    out = np.full((rows, N), np.nan, np.float32); per_elem_u4 = 16 // size
    PART = 8 * M * RB  # __shared__ float part[8 * M * RB]
    for blk in range(blocks):
        part = np.full(PART, np.nan, np.float32); written = np.zeros(PART, int)
        ys = {}
        for wx in range(WX):
            n0 = (blk * WX + wx) * M; row = [min(n0 + m, N - 1) for m in range(M)]
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
                            c = c0 + u * stride
                            if version == 1 and c >= chunks: break  # version 1 skips, version 2 weighs by 0
                            c = min(c, chunks - 1)
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
                                        if version == 1 and r >= rows: xf[r] = [f32(0)] * VPW  # padded rows: zeros
                                        for e in range(VPW): xs[r] = f32(xs[r] + xf[r][e])
                                    for m in range(M):
                                        q = unpack(wv[u, m][jb + jj], BITS)
                                        for r in range(RB):
                                            for e in range(VPW): a[m, r] = f32(np.float64(q[e]) * np.float64(xf[r][e]) + np.float64(a[m, r]))
                            for m in range(M):
                                for r in range(RB): y[m, r] = f32(y[m, r] + f32(f32(sv[u, m] * a[m, r]) + f32(bv[u, m] * xs[r])))
                        wv, sv, bv = load(c0 + stride * U)
                        c0 += stride * U
                for o in (16, 8, 4, 2, 1):  # the butterfly: every lane ends with the warp's sum
                    ylane = ylane + ylane[np.arange(32) ^ o]
                ys[wx, ks] = ylane[0]
                if KS > 1:
                    for m in range(M):
                        for r in range(RB):
                            i = ((ks * WX + wx) * M + m) * RB + r
                            assert 0 <= i < PART and not written[i], (blk, wx, ks, m, r, i)
                            written[i] += 1; part[i] = ylane[0][m, r]
        for wx in range(WX):  # __syncthreads(); lane 0 of slice 0 sums the slices in order and stores
            n0 = (blk * WX + wx) * M
            if KS > 1:
                total = np.zeros((M, RB), np.float32)
                for m in range(M):
                    for r in range(RB):
                        t = f32(0)
                        for k in range(KS): t = f32(t + part[((k * WX + wx) * M + m) * RB + r])
                        total[m, r] = t
            else:
                total = ys[wx, 0]
            for m in range(M):
                n = n0 + m
                if n >= N: break
                for r in range(rows):
                    assert np.isnan(out[r, n]), ("stored twice", r, n)
                    out[r, n] = total[m, r]
    assert not np.isnan(out).any(), "an output never stored"
    return out

def check(rows, n, k, group, bits, dtype, seed, version=2, launch=None):
    rng = np.random.default_rng(seed)
    packed, scales, biases, q = packed_layer(rng, n, k, group, bits, dtype)
    x = round_to(rng.normal(0.0, 1.0, size=(rows, k)), dtype)
    want, mag = reference(x, scales, biases, q, group)
    got = run(x, packed, scales, biases, bits, dtype, rows, version, launch).astype(np.float64)
    err = np.abs(got - want); bound = ROUND[dtype] * np.abs(want) + 1e-5 * mag
    print(f"v{version} launch={launch} rows={rows} n={n} k={k} g={group} bits={bits} {dtype}: "
          f"max err/bound {np.max(err / bound):.3f}", flush=True)
    assert np.all(err <= bound)

SHAPES = [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (8, 8)]  # (warps, split)

def drawn(count):
    """`count` cases drawn by hypothesis: rows, sizes, groups, bits, dtypes, versions, launches."""
    from hypothesis import given, settings, strategies as st

    @given(rows=st.integers(1, 8), n=st.integers(1, 40), chunks=st.integers(1, 12), bits=st.sampled_from([4, 8]),
           group=st.sampled_from([32, 64, 128]), dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
           version=st.sampled_from([1, 2]), launch=st.sampled_from(["wave", "balanced"] + SHAPES),
           seed=st.integers(0, 2 ** 16))
    @settings(max_examples=count, deadline=None, database=None)
    def one(rows, n, chunks, bits, group, dtype, version, launch, seed):
        check(rows, n, chunks * 128, group, bits, dtype, seed, version, launch)
    one()

if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hypothesis", type=int, default=0, help="this many drawn cases after the fixed ones")
    a = ap.parse_args()
    for version in (2, 1):
        for args in [(1, 9, 256, 64, 4, "bfloat16", 1), (3, 5, 128, 32, 8, "float16", 2), (2, 6, 96, 32, 4, "float32", 3),
                     (5, 5, 256, 128, 4, "bfloat16", 4), (8, 3, 96, 32, 8, "float32", 5), (1, 4, 4096, 64, 4, "bfloat16", 6),
                     (4, 3, 2048, 128, 8, "float16", 7), (2, 7, 4096, 64, 4, "bfloat16", 8), (2, 5, 160, 32, 8, "bfloat16", 9)]:
            check(*args, version=version)
        # every block shape: K = 2048 at 8 bits is 128 chunks a row (a split of 8 leaves lanes idle),
        # 37 columns are 10 warps' worth (blocks with columns past the end)
        for i, shape in enumerate(SHAPES):
            check(1 + i % 4, 37, 2048, 64, 8, "bfloat16", 10 + i, version, shape)
        check(3, 40, 4096, 64, 4, "float16", 30, version, "balanced")
    if a.hypothesis:
        drawn(a.hypothesis)
