"""The decode step's fused kernels against what they replace.

`decode_attention` (head norms, rotation and attention of one new token per
row) and `step_kernels` (residual add + RMSNorm, gated activation) run on the
default device: MLX's CUDA backend where it has one (the lent GPU machine), the
CPU (amlx's C++ primitives, vendor/mlxc/cpu_step.cpp) elsewhere; on Metal they
do not exist and these tests are skipped. Each kernel is checked
against a float64 numpy reference rounded where the plain ops round, and
whole models decode with the kernels on and off to the same logits."""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx._mlx import fast, ops
from amlx.models import decode_attention as da
from amlx.kv import BlockPool, ShardKV, layer_views, paged, written
from amlx.models import load_model, step_kernels

try:
    from tests.helpers import kv_reference
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers import kv_reference
    from helpers.checkpoints import make_checkpoint

round_to = kv_reference.round_to

pytestmark = pytest.mark.skipif(not da.available(mx.device.default_device()),
                                reason="the decode kernels run on CUDA and the CPU")

TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# The rotation angle (position * frequency) is a float32 product, as in MLX's
# rope: at positions in the hundreds it is off by ~1e-5 rad from float64.
ROPE_TOL = {"float32": 2e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
DTYPES = st.sampled_from(["float32", "float16", "bfloat16"])


# keys a warp reads a round in the CUDA attention kernel: 1, 2 or 4 whole keys (da.round_keys
# caps it by head dim), or "lanesN" / "lanesN:B", the lane-group loop with N dimensions a lane
# (da.LANE_DIMS: a key a group of lanes, D * N / 32 keys a round, one group of 32 lanes too where
# that is one key, da.LANE_ONE) and B bytes of keys a lane loaded ahead (da.LANE_BYTES; default
# 64); the CPU's kernel has no such setting and computes the same either way
KEYS = st.sampled_from([1, 2, 4, "lanes4", "lanes8", "lanes16", "lanes8:16", "lanes8:48", "lanes8:128",
                        "lanes16:128"])


# slots a block reads before a row's slots are split over blocks (da.SPLIT_KEYS, 512 by
# default): small ones here split the tests' rows over many blocks (the CPU ignores it)
SPLITS = st.sampled_from([da.SPLIT_KEYS, 8, 32])


@contextmanager
def keys_a_round(keys: int | str, split: int | None = None):
    saved = da.KEYS_PER_ROUND, da.SPLIT_KEYS, da.LANE_DIMS, da.LANE_BYTES, da.LANE_ONE
    lanes = isinstance(keys, str)
    da.KEYS_PER_ROUND = 1 if lanes else keys
    dims, _, ahead = keys.removeprefix("lanes").partition(":") if lanes else ("0", "", "")
    da.LANE_DIMS, da.LANE_BYTES, da.LANE_ONE = int(dims), int(ahead or saved[3]), lanes
    da.SPLIT_KEYS = saved[1] if split is None else split
    try:
        yield
    finally:
        da.KEYS_PER_ROUND, da.SPLIT_KEYS, da.LANE_DIMS, da.LANE_BYTES, da.LANE_ONE = saved


def rnd(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to `dtype` (as the kernels and MLX's ops round), back in float64."""
    with mx.array(np.asarray(x, np.float32)) as a, a.astype(getattr(mx, dtype)) as b, b.astype(mx.float32) as c:
        return c.numpy().astype(np.float64)


def as_mx(x: np.ndarray, dtype: str) -> mx.Array:
    return mx.array(np.asarray(x, np.float32)).astype(getattr(mx, dtype))


def as_np(a: mx.Array) -> np.ndarray:
    return a.astype(mx.float32).numpy().astype(np.float64)


def ref_norm(x, w, eps, dtype):
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return rnd(w * rnd(x * r, dtype), dtype)


def ref_rope(x, pos, inv_freq, dtype):
    """Rotate-half rotary embedding of x (B, heads, D) at per-row positions."""
    half = x.shape[-1] // 2
    ang = pos[:, None, None].astype(np.float64) * np.concatenate([inv_freq, inv_freq])[None, None, :]
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return rnd(x * np.cos(ang) + rot * np.sin(ang), dtype)


def ref_attention(qkv, keys, values, pos, heads, scale, window, inv_freq, norms, eps, dtype):
    """(out (B, H*D), kv_new (2, B*KVH, D)) from the arrays' own values."""
    b = qkv.shape[0]
    kv, dim = keys.shape[1], keys.shape[3]
    x = qkv.reshape(b, heads + 2 * kv, dim)
    q, k, v = x[:, :heads], x[:, heads:heads + kv], x[:, heads + kv:]
    if norms is not None:
        q, k = ref_norm(q, norms[0], eps, dtype), ref_norm(k, norms[1], eps, dtype)
    q, k = ref_rope(q, pos, inv_freq, dtype), ref_rope(k, pos, inv_freq, dtype)
    group = heads // kv
    out = np.zeros((b, heads, dim))
    for i in range(b):
        lo = max(0, pos[i] - window + 1) if window else 0
        for h in range(heads):
            g = h // group
            ks = np.concatenate([keys[i, g, lo:pos[i]], k[i, g][None]])
            vs = np.concatenate([values[i, g, lo:pos[i]], v[i, g][None]])
            s = ks @ q[i, h] * scale
            w = np.exp(s - s.max())
            out[i, h] = w @ vs / w.sum()
    return out.reshape(b, heads * dim), np.stack([k, v]).reshape(2, b * kv, dim)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 5), kv=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2, 4]),
       dim=st.sampled_from([64, 128, 256]), cap=st.sampled_from([256, 512]),
       window=st.sampled_from([None, 1, 7, 100]), qk_norm=st.booleans(), dtype=DTYPES,
       seed=st.integers(0, 2 ** 16), keys=KEYS, split=SPLITS)
# (always: one group of 32 lanes a key, head dim 256 at 8 dims a lane, Gemma 3's, split and not)
@example(b=3, kv=2, group=2, dim=256, cap=512, window=None, qk_norm=True, dtype="bfloat16", seed=1, keys="lanes8",
         split=32)
@example(b=2, kv=1, group=4, dim=256, cap=256, window=100, qk_norm=False, dtype="float32", seed=2, keys="lanes8",
         split=512)
@example(b=3, kv=2, group=2, dim=256, cap=512, window=None, qk_norm=True, dtype="float16", seed=11, keys="lanes8:16",
         split=8)  # (one group, 16 bytes ahead, split: wrong on the H200 while it read one round at a time)
def test_attention_kernel_equals_reference(b, kv, group, dim, cap, window, qk_norm, dtype, seed, keys, split):
    rng = np.random.default_rng(seed)
    heads = kv * group
    qkv = rnd(rng.standard_normal((b, (heads + 2 * kv) * dim)), dtype)
    cached = rnd(rng.standard_normal((b, kv, cap, dim)), dtype)
    values = rnd(rng.standard_normal((b, kv, cap, dim)), dtype)
    pos = rng.integers(0, cap, size=b).astype(np.int32)
    pos[0] = cap - 1  # the last slot is reachable
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    norms = [rnd(1 + 0.3 * rng.standard_normal(dim), dtype) for _ in range(2)] if qk_norm else None
    scale = dim ** -0.5
    weights = [as_mx(w, dtype) for w in norms] if qk_norm else [None, None]
    with keys_a_round(keys, split):
        got = da.decode_attention(as_mx(qkv, dtype), as_mx(np.stack([cached, values]), dtype), mx.array(pos),
                                  heads=heads, scale=scale, window=window, inv_freq=mx.array(inv_freq),
                                  q_norm=weights[0], k_norm=weights[1], eps=1e-6)
    want = ref_attention(qkv, cached, values, pos, heads, scale, window, inv_freq.astype(np.float64), norms, 1e-6,
                         dtype)
    assert [a.shape for a in got] == [(b, heads * dim), (2, b * kv, dim)]
    for g, w in zip(got, want):
        assert g.dtype is getattr(mx, dtype)
        np.testing.assert_allclose(as_np(g), w, rtol=ROPE_TOL[dtype], atol=ROPE_TOL[dtype])


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 5), kv=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2]),
       dim=st.sampled_from([64, 128]), block=st.sampled_from([1, 16, 32]), length=st.integers(1, 200),
       window=st.sampled_from([None, 7, 100]), qk_norm=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2 ** 16),
       keys_a=KEYS, split=SPLITS)
@example(b=3, kv=2, group=2, dim=128, block=16, length=200, window=None, qk_norm=True, dtype="float16", seed=3,
         keys_a="lanes4", split=32)  # (always: one group of 32 lanes a key)
def test_paged_attention_kernel_reads_through_block_tables(b, kv, group, dim, block, length, window, qk_norm, dtype,
                                                         seed, keys_a, split):
    """The block-pool variant: each row's positions lie in blocks scattered over a shared
    pool (its table in position order, unused entries the null block 0); the result equals
    the reference over the contiguous keys."""
    rng = np.random.default_rng(seed)
    heads = kv * group
    width = -(-length // block)
    n_blocks = 1 + b * width + 3  # block 0: the null block; spare blocks hold noise
    pool = rnd(rng.standard_normal((2, n_blocks, kv, block, dim)), dtype)
    table = np.zeros((b, width + 1), np.int32)  # one spare column: tables are wider than a row needs
    order = rng.permutation(np.arange(1, n_blocks))
    keys, values = np.zeros((b, kv, width * block, dim)), np.zeros((b, kv, width * block, dim))
    for i in range(b):
        table[i, :width] = order[i * width:(i + 1) * width]
        for j in range(width):
            keys[i, :, j * block:(j + 1) * block] = pool[0, table[i, j]]
            values[i, :, j * block:(j + 1) * block] = pool[1, table[i, j]]
    pos, qkv, inv_freq, norms, weights = _paged_step(rng, b, length, heads, kv, dim, qk_norm, dtype)
    with keys_a_round(keys_a, split):
        got = da.decode_attention(as_mx(qkv, dtype), as_mx(pool, dtype), mx.array(pos), heads=heads,
                                  scale=dim ** -0.5, window=window, inv_freq=mx.array(inv_freq), q_norm=weights[0],
                                  k_norm=weights[1], eps=1e-6, table=mx.array(table))
    want = ref_attention(qkv, keys, values, pos, heads, dim ** -0.5, window, inv_freq.astype(np.float64), norms,
                         1e-6, dtype)
    assert [a.shape for a in got] == [(b, heads * dim), (2, b * kv, dim)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(as_np(g), w, rtol=ROPE_TOL[dtype], atol=ROPE_TOL[dtype])
    # write_pool: on CUDA the kernel writes the new key and value into the pool itself, at each
    # row's slot (table[b, pos // block], offset pos % block), the same output, nothing else touched
    target = as_mx(pool, dtype)
    ops.eval(target)
    with keys_a_round(keys_a, split):
        out, new = da.decode_attention(as_mx(qkv, dtype), target, mx.array(pos), heads=heads,
                                       scale=dim ** -0.5, window=window, inv_freq=mx.array(inv_freq),
                                       q_norm=weights[0], k_norm=weights[1], eps=1e-6, table=mx.array(table),
                                       write_pool=True)
        ops.eval(out)
    np.testing.assert_array_equal(as_np(out), as_np(got[0]))
    if not da.writes_pool(None, mx.array(table)):  # (the CPU primitive: handed back, as without)
        np.testing.assert_array_equal(as_np(new), as_np(got[1]))
        return
    assert new is None
    mx.device.synchronize()
    expect = pool.copy()
    fresh = as_np(got[1]).reshape(2, b, kv, dim)
    for i in range(b):
        expect[:, table[i, pos[i] // block], :, pos[i] % block] = fresh[:, i]
    np.testing.assert_array_equal(as_np(target), expect)


def _paged_step(rng, b, length, heads, kv, dim, qk_norm, dtype):
    """A paged decode step's random inputs: positions (b,) (row 0 at the last slot, so
    it is reachable), the fused qkv (b, (heads + 2 kv) * dim), rotary frequencies, and
    the q/k norm weights (numpy, and as MLX arrays; None, [None, None] without)."""
    pos = rng.integers(0, length, size=b).astype(np.int32)
    pos[0] = length - 1
    qkv = rnd(rng.standard_normal((b, (heads + 2 * kv) * dim)), dtype)
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    norms = [rnd(1 + 0.3 * rng.standard_normal(dim), dtype) for _ in range(2)] if qk_norm else None
    weights = [as_mx(w, dtype) for w in norms] if qk_norm else [None, None]
    return pos, qkv, inv_freq, norms, weights


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 120), min_size=2, max_size=5), block=st.sampled_from([1, 4, 16]),
       window=st.sampled_from([None, 7, 40]), split=st.sampled_from([8, 16]), dtype=DTYPES,
       seed=st.integers(0, 2 ** 16), keys_a=KEYS)
def test_a_rows_attention_is_the_same_alone_and_in_any_batch(lengths, block, window, split, dtype, seed, keys_a):
    """A row's output does not depend on the rows beside it: in a batch whose longest row
    splits its slots over blocks (da.SPLIT_KEYS) and alone, with a table as wide as its own
    blocks (where a short row's step does not split at all), the same bits. A row's blocks
    cut its own slots, and a row within one block gets the unsplit kernel's result exactly
    (tests/test_prefix_cache.py compares runs that batch differently, token for token)."""
    rng = np.random.default_rng(seed)
    kv, heads, dim = 2, 4, 64
    b = len(lengths)
    widths = [-(-n // block) for n in lengths]
    n_blocks = 1 + sum(widths)
    pool = as_mx(rnd(rng.standard_normal((2, n_blocks, kv, block, dim)), dtype), dtype)
    order = rng.permutation(np.arange(1, n_blocks)).astype(np.int32)
    table = np.zeros((b, max(widths)), np.int32)
    for i, start in enumerate(np.cumsum([0, *widths[:-1]])):
        table[i, :widths[i]] = order[start:start + widths[i]]
    pos = np.asarray(lengths, np.int32) - 1
    qkv = as_mx(rnd(rng.standard_normal((b, (heads + 2 * kv) * dim)), dtype), dtype)
    inv_freq = mx.array((1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim)).astype(np.float32))
    args = dict(heads=heads, scale=dim ** -0.5, window=window, inv_freq=inv_freq)
    with keys_a_round(keys_a, split):
        batch = as_np(da.decode_attention(qkv, pool, mx.array(pos), table=mx.array(table), **args)[0])
        for i in range(b):
            alone = da.decode_attention(ops.slice(qkv, (i, 0), (i + 1, qkv.shape[1])), pool, mx.array(pos[i:i + 1]),
                                        table=mx.array(table[i:i + 1, :widths[i]]), **args)[0]
            np.testing.assert_array_equal(as_np(alone)[0], batch[i])


def _quantized_pool(rng, b, kv, dim, block, length, bits, qgroup, dtype):
    """A quantized pool (numpy: packed, scales, biases, each (2, blocks, kv, block,
    n)) of random keys and values, each row's blocks in random order, and the
    table (b, width + 1) (a spare column of null blocks)."""
    width = -(-length // block)
    n_blocks = 1 + b * width + 3  # block 0: the null block; spare blocks hold noise
    raw = round_to(rng.standard_normal((2, n_blocks, kv, block, dim)) * 2, dtype)
    stored = kv_reference.quantize(raw, qgroup, bits, dtype)
    table = np.zeros((b, width + 1), np.int32)
    order = rng.permutation(np.arange(1, n_blocks))
    for i in range(b):
        table[i, :width] = order[i * width:(i + 1) * width]
    return stored, table


def _contiguous(pool: np.ndarray, table: np.ndarray, width: int) -> np.ndarray:
    """(2, b, kv, width * block, ...) of a pool (2, blocks, kv, block, ...) through the table."""
    got = pool[:, table[:, :width]]  # (2, b, width, kv, block, ...)
    got = np.moveaxis(got, 3, 2)  # (2, b, kv, width, block, ...)
    return got.reshape(*got.shape[:3], -1, *got.shape[5:])


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 5), kv=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2, 3]),
       dim=st.sampled_from([64, 128, 256]), qgroup=st.sampled_from([32, 64]), bits=st.sampled_from([4, 8]),
       block=st.sampled_from([1, 16, 32]), length=st.integers(1, 300), window=st.sampled_from([None, 1, 7, 100]),
       qk_norm=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2 ** 16), keys_a=KEYS, split=SPLITS)
@example(b=2, kv=2, group=2, dim=256, qgroup=64, bits=4, block=16, length=300, window=None, qk_norm=True,
         dtype="bfloat16", seed=4, keys_a="lanes8", split=32)  # (always: one group of 32 lanes, head dim 256)
def test_quantized_paged_kernel_equals_reference_and_gather_path(b, kv, group, dim, qgroup, bits, block, length,
                                                                 window, qk_norm, dtype, seed, keys_a, split):
    """kv_bits: the kernel reads packed keys and values, scales and biases through
    the table and dequantizes them itself. Against (1) the float64 reference over
    the device's own dequantization of the same pool (MLX's dequantize: on the CPU
    it rounds q * scale and + bias each to the dtype, as kv_reference does; on CUDA
    the kernel and MLX round them once, and a float16 value a step apart from the
    CPU's put the reference 0.0024 off where 0.0022 is allowed; the new token in
    full precision, as the kernel attends it) and (2) the path it replaces, MLX's gather + dequantize
    and the kernel over the contiguous result: the same outputs, and the same new
    key and value bit for bit (so the cache write, which quantizes them, is too)."""
    rng = np.random.default_rng(seed)
    heads = kv * group
    width = -(-length // block)
    stored, table = _quantized_pool(rng, b, kv, dim, block, length, bits, qgroup, dtype)
    deq = as_np(ops.dequantize(mx.array(stored[0]), as_mx(stored[1], dtype), as_mx(stored[2], dtype), qgroup,
                               bits))  # (2, blocks, kv, block, dim), as the device dequantizes
    keys, values = _contiguous(deq, table, width)
    pos, qkv, inv_freq, norms, weights = _paged_step(rng, b, length, heads, kv, dim, qk_norm, dtype)
    packed, scales, biases = mx.array(stored[0]), as_mx(stored[1], dtype), as_mx(stored[2], dtype)
    args = dict(heads=heads, scale=dim ** -0.5, window=window, inv_freq=mx.array(inv_freq), q_norm=weights[0],
                k_norm=weights[1], eps=1e-6)
    quant = (scales, biases, bits, qgroup)
    assert da.supports(as_mx(qkv, dtype), packed, heads, paged=True, quant=quant)
    with keys_a_round(keys_a, split):
        got = da.decode_attention(as_mx(qkv, dtype), packed, mx.array(pos), table=mx.array(table), quant=quant,
                                  **args)
    want = ref_attention(qkv, keys, values, pos, heads, dim ** -0.5, window, inv_freq.astype(np.float64), norms,
                         1e-6, dtype)
    assert [a.shape for a in got] == [(b, heads * dim), (2, b * kv, dim)]
    for g, w in zip(got, want):
        assert g.dtype is getattr(mx, dtype)
        np.testing.assert_allclose(as_np(g), w, rtol=ROPE_TOL[dtype], atol=ROPE_TOL[dtype])
    # the gather path: MLX's take + dequantize on the device, then the contiguous kernel
    gathered = ops.dequantize(mx.array(_contiguous(stored[0], table, width)),
                              as_mx(_contiguous(stored[1], table, width), dtype),
                              as_mx(_contiguous(stored[2], table, width), dtype), qgroup, bits)
    before = da.decode_attention(as_mx(qkv, dtype), gathered, mx.array(pos), **args)
    np.testing.assert_allclose(as_np(got[0]), as_np(before[0]), rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_array_equal(as_np(got[1]), as_np(before[1]))


def test_lane_groups_follow_the_head_dim(monkeypatch):
    """`lane_groups`: LANE_DIMS * 32 / dim keys a warp a round where that is 2..32 (1..32 with
    LANE_ONE), else 0 (the one-key loop: LANE_DIMS 0, or a head dim the lanes cannot split so);
    reading a quantized pool, at most 8 dims a lane."""
    monkeypatch.setattr(da, "LANE_ONE", False)
    for dims, want in ((0, {64: 0, 128: 0, 256: 0, 512: 0}), (4, {64: 2, 128: 0, 256: 0, 512: 0}),
                       (8, {64: 4, 128: 2, 256: 0, 512: 0}), (16, {64: 8, 128: 4, 256: 2, 512: 0})):
        monkeypatch.setattr(da, "LANE_DIMS", dims)
        assert {d: da.lane_groups(d) for d in want} == want
    assert da.lane_groups(96) == 0  # (16 * 32 / 96 is no whole number)
    monkeypatch.setattr(da, "LANE_ONE", True)
    assert da.lane_groups(512) == 1 and da.lane_groups(256) == 2  # (one group of 32 lanes at 512)
    monkeypatch.setattr(da, "LANE_DIMS", 8)
    assert da.lane_groups(256) == 1 and da.lane_groups(512) == 0
    assert da.lane_groups(128, quantized=True) == 2  # (a quantized pool: at most 8 dims a lane, registers)
    name, _, body, _ = da.kernel_source(True, True, True, 1, False, True, lanes=True)
    assert name == "amlx_decode_attention_qk_norm_paged_quantized_split_lanes"
    assert "amlx_dequant<T, EL, BITS, GROUP>" in body and "lane * E, kr" not in body
    with pytest.raises(ValueError, match="whole keys"):
        da.kernel_source(True, True, False, 4, lanes=True)


def test_quantized_kernel_is_refused_where_it_cannot_apply():
    """Shapes the quantized variant does not take fall back (supports() is False)."""
    qkv = ops.zeros((1, 6 * 64), mx.float32)
    packed = ops.zeros((2, 3, 2, 16, 16), mx.uint32)  # 64 values in 8 bits
    sb = ops.zeros((2, 3, 2, 16, 1), mx.float32)
    assert da.supports(qkv, packed, 2, paged=True, quant=(sb, sb, 8, 64))
    assert not da.supports(qkv, packed, 2, paged=False, quant=(sb, sb, 8, 64))  # contiguous: not quantized
    assert not da.supports(qkv, packed, 2, paged=True, quant=(sb, sb, 3, 64))
    assert not da.supports(qkv, packed, 2, paged=True, quant=(sb.astype(mx.float16), sb, 8, 64))
    assert not da.supports(qkv, packed, 2, paged=True, quant=(sb, sb, 4, 64))  # 128 values: not qkv's heads


def test_keys_a_round_stay_within_a_blocks_registers(monkeypatch):
    """`round_keys`: what KEYS_PER_ROUND asks, at most 4 up to head dim 128, 2 at 256 and 1
    beyond (1 beyond 128 reading a quantized pool): the counts whose variants fit a 16-warp
    block's 128 registers a thread (scripts/cuda_compile_check.py --ptxas compiles each). One
    key a round is the one-key loop, named as before; more make variants of their own."""
    for wanted, dim, quantized, want in ((4, 64, False, 4), (4, 128, False, 4), (4, 256, False, 2),
                                         (4, 512, False, 1), (4, 128, True, 4), (4, 256, True, 1),
                                         (2, 128, False, 2), (1, 64, False, 1), (0, 64, False, 1)):
        assert da.round_keys(dim, quantized, wanted) == want
    monkeypatch.setattr(da, "KEYS_PER_ROUND", 2)
    assert da.round_keys(128) == 2 and da.round_keys(512) == 1
    one, four = da.kernel_source(True, True, False, 1), da.kernel_source(True, True, False, 4)
    assert one[0] == "amlx_decode_attention_qk_norm_paged" and four[0] == one[0] + "_keys4"
    assert "constexpr int U = 4;" in four[2] and "constexpr int U" not in one[2]


@pytest.mark.parametrize("name, read, good, bad, default", [
    ("AMLX_ATTENTION_KEYS", da._keys_from_env, ("4", 4), ("3", "0", "four", ""), 1),
    ("AMLX_SPLIT_KEYS", da._split_from_env, ("256", 256), ("-1", "lots", "", "1.5", "\u00b2"), 512),
    ("AMLX_ATTENTION_LANE_DIMS", da._lane_dims_from_env, ("4", 4), ("2", "32", "x", ""), 8),
    ("AMLX_ATTENTION_LANE_ONE", da._lane_one_from_env, ("0", False), ("2", "yes", ""), True),
    ("AMLX_ATTENTION_LANE_BYTES", da._lane_bytes_from_env, ("128", 128), ("0", "8", "256", "64B", ""), 64),
])
def test_attention_settings_from_the_environment(monkeypatch, name, read, good, bad, default):
    """AMLX_ATTENTION_KEYS (1, 2 or 4), AMLX_SPLIT_KEYS (a whole number of slots),
    AMLX_ATTENTION_LANE_DIMS (0, 4, 8 or 16), AMLX_ATTENTION_LANE_ONE (0 or 1) and
    AMLX_ATTENTION_LANE_BYTES (16, 32, 48, 64 or 128) set the kernel's keys a round, split size,
    loop and loads ahead for a process; anything else is an error that names the variable; unset,
    the defaults."""
    monkeypatch.setenv(name, good[0])
    assert read() == good[1]
    for value in bad:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            read()
    monkeypatch.delenv(name)
    assert read() == default


def test_split_counts_follow_the_rows_reach(monkeypatch):
    """`split_count`: one block while a row may see at most SPLIT_KEYS slots (its window
    counted), else one per SPLIT_KEYS slots it may see; SPLIT_KEYS 0 never splits."""
    monkeypatch.setattr(da, "SPLIT_KEYS", 512)
    assert [da.split_count(n, None) for n in (1, 512, 513, 1024, 16384)] == [1, 1, 2, 2, 32]
    assert [da.split_count(16384, w) for w in (512, 513, 1024, 4096)] == [1, 2, 2, 8]
    assert da.split_count(300, 4096) == 1
    monkeypatch.setattr(da, "SPLIT_KEYS", 0)
    assert da.split_count(1 << 20, None) == 1


def test_cuda_kernel_head_dims(monkeypatch):
    """On CUDA the kernel takes head dims that are multiples of 32 up to MAX_DIM, and a
    quantized pool up to MAX_QUANT_DIM (beyond, a 16-warp block needs more registers than it
    may have: cuda_compile_check --ptxas); the CPU's kernel takes any even dim."""
    monkeypatch.setattr(da, "_on_cpu", lambda: False)

    def plain(dim):
        return da.supports(ops.zeros((1, 6 * dim), mx.float32), ops.zeros((2, 3, 2, 16, dim), mx.float32), 2,
                           paged=True)

    def quantized(dim):
        packed = ops.zeros((2, 3, 2, 16, dim // 4), mx.uint32)  # 8 bits
        sb = ops.zeros((2, 3, 2, 16, dim // 64), mx.float32)
        return da.supports(ops.zeros((1, 6 * dim), mx.float32), packed, 2, paged=True, quant=(sb, sb, 8, 64))

    assert [plain(d) for d in (32, 48, 96, 512, 544)] == [True, False, True, da.MAX_DIM >= 512, False]
    assert quantized(256) and not quantized(512) and da.MAX_QUANT_DIM == 256
    monkeypatch.setattr(da, "_on_cpu", lambda: True)
    assert plain(48) and plain(544) and quantized(512)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), width=st.sampled_from([64, 1000, 1152, 2048, 4096, 5376, 8192]), pre=st.booleans(),
       dtype=DTYPES,
       seed=st.integers(0, 2 ** 16))
def test_residual_norm_kernel_equals_reference(n, width, pre, dtype, seed):
    rng = np.random.default_rng(seed)
    x, y = (rnd(rng.standard_normal((n, width)) * 3, dtype) for _ in range(2))
    w, pre_w = (rnd(1 + 0.3 * rng.standard_normal(width), dtype) for _ in range(2))
    y_eff = ref_norm(y, pre_w, 1e-5, dtype) if pre else y
    total = rnd(x + y_eff, dtype)
    want = [total, ref_norm(total, w, 1e-6, dtype)]
    got = step_kernels.residual_norm(as_mx(x, dtype), as_mx(y, dtype), as_mx(w, dtype), 1e-6,
                                     as_mx(pre_w, dtype) if pre else None, 1e-5)
    for g, v in zip(got, want):
        assert g.shape == (n, width) and g.dtype is getattr(mx, dtype)
        np.testing.assert_allclose(as_np(g), v, rtol=TOL[dtype], atol=TOL[dtype] * np.abs(v).max())


@given(columns=st.integers(1, 3 * step_kernels.MAX_PER * step_kernels.MAX_THREADS))
def test_residual_launch_covers_the_row_within_a_block(columns):
    """Every column has a thread (threads x columns a thread >= the row), blocks are whole
    warps of at most MAX_THREADS, and on CUDA a row wider than the kernel holds is refused
    (the CPU's kernels take any width)."""
    from amlx._mlx import device

    threads, per = step_kernels.residual_launch(columns)
    assert threads % 32 == 0 and 32 <= threads <= step_kernels.MAX_THREADS
    assert threads * per >= columns and (per - 1) * threads < columns
    x = ops.zeros((1, columns), mx.float32)
    on_cpu = device.default_device() == "cpu"
    assert step_kernels.supports(x) == (on_cpu or per <= step_kernels.MAX_PER)
    real = step_kernels.device.default_device
    try:
        step_kernels.device.default_device = lambda: "gpu"  # (what supports decides for CUDA, on any machine)
        assert step_kernels.supports(x) == (per <= step_kernels.MAX_PER)
    finally:
        step_kernels.device.default_device = real


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), width=st.sampled_from([1, 100, 3072, 6912]), act=st.sampled_from(["silu", "gelu_tanh"]),
       dtype=DTYPES, seed=st.integers(0, 2 ** 16))
def test_gated_activation_kernel_equals_reference(n, width, act, dtype, seed):
    rng = np.random.default_rng(seed)
    gu = rnd(rng.standard_normal((n, 2 * width)) * 3, dtype)
    g, u = gu[:, :width], gu[:, width:]
    if act == "silu":
        a = g / (1 + np.exp(-g))
    else:
        a = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    got = step_kernels.gated_activation(as_mx(gu, dtype), act)
    assert got.shape == (n, width) and got.dtype is getattr(mx, dtype)
    # (where every g is far below zero the activation is ~1e-10 of g: there 1 + tanh cancels,
    # and the error is relative to g * u, not to the tiny result; hypothesis found n = width = 1)
    scale = max(np.abs(a * u).max(), 1e-3 * np.abs(g * u).max())
    np.testing.assert_allclose(as_np(got), a * u, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def test_kernel_inside_a_compiled_function():
    rng = np.random.default_rng(0)
    qkv = mx.array(rng.standard_normal((2, 8 * 128)).astype(np.float32))
    keys = rng.standard_normal((2, 2, 256, 128)).astype(np.float32)
    kv = mx.array(np.stack([keys, keys]))
    pos = mx.array(np.array([5, 255], np.int32))
    inv = mx.array((1.0 / 10000.0 ** (np.arange(0, 128, 2) / 128)).astype(np.float32))
    step = mx.transforms.compile(lambda q, c, p, f: da.decode_attention(q, c, p, heads=4, scale=0.1, window=None,
                                                                        inv_freq=f)[0])
    got = step(qkv, kv, pos, inv).numpy()
    want = ref_attention(qkv.numpy().astype(np.float64), keys, keys, np.array([5, 255]), 4, 0.1, None,
                         inv.numpy().astype(np.float64), None, 0.0, "float32")[0]
    np.testing.assert_allclose(got, want, rtol=ROPE_TOL["float32"], atol=ROPE_TOL["float32"])


# ---------------------------------------------------------------------------
# whole models: the decode step with the kernels against the plain ops

ARCHS = ["qwen3", "gemma3_text", "llama", "qwen2", "mistral"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> float32 model with heads of 64 (the attention kernel's smallest)."""
    out = {}
    for arch in ARCHS:
        path = make_checkpoint(tmp_path_factory.mktemp(arch), arch, tokenizer=False, head_dim=64)
        out[arch] = load_model(path).model
    yield out
    for m in out.values():
        m.close()


def decode_logits(model, prompts: np.ndarray, positions: list[list[int]], tokens: np.ndarray) -> list[np.ndarray]:
    """Prefills both rows, then one step per entry of `positions` (per-row
    positions, so rows may sit at different places) with `tokens`."""
    cache = model.make_cache()
    out = []
    try:
        with mx.array(prompts) as x, model(x, cache, 0):
            pass
        for i, pos in enumerate(positions):
            for c in cache:
                c.reserve(max(pos) + 1)
            with mx.array(tokens[:, i:i + 1]) as x, mx.array(np.array(pos, np.int32)) as p, model(x, cache, p) as y:
                out.append(y.numpy()[:, 0])
    finally:
        for c in cache:
            c.close()
    return out


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("split", [None, 8])
@pytest.mark.parametrize("arch", ARCHS)
def test_models_decode_the_same_with_and_without_kernels(arch, split, models, monkeypatch):
    """Whole models' decode steps with the kernels and with the plain ops, each row alone and
    batched; with `split` (on CUDA), the attention kernel's rows split over blocks of 8 slots."""
    if split is not None:
        monkeypatch.setattr(da, "SPLIT_KEYS", split)
    model = models[arch]
    rng = np.random.default_rng(1)
    n, steps = 12, 30
    prompts = rng.integers(0, 256, size=(2, n)).astype(np.int32)
    # row 1 rewrites from an earlier position, so the rows sit at different
    # places; 30 steps run through Gemma's and Mistral's windows of 8
    positions = [[n + i, n - 5 + i] for i in range(steps)]
    tokens = rng.integers(0, 256, size=(2, steps)).astype(np.int32)
    runs = {}
    for flag in ("1", "0"):
        model.use_decode_kernel(flag == "1")  # the engine's choice, made here by hand
        runs[flag] = [decode_logits(model, prompts[r:r + 1], [[p[r]] for p in positions], tokens[r:r + 1])
                      for r in range(2)]
        runs[flag, "batch"] = decode_logits(model, prompts, positions, tokens)
    for r in range(2):
        for step in range(steps):
            # one row: the same float32 arithmetic up to summation order
            assert _rel(runs["1"][r][step][0], runs["0"][r][step][0]) < 1e-5
            # rows batched at their own positions give each row's own result;
            # MLX's CUDA matmuls round float32 through TF32 when more than one
            # row is multiplied, hence the wider bound (a row attending at a
            # wrong position or over wrong slots is off by far more)
            assert _rel(runs["1", "batch"][step][r], runs["1"][r][step][0]) < 1e-2


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_kernels_cut_the_nodes_of_a_decode_step(arch, models, monkeypatch):
    model = models[arch]
    layers = len(model.layers)
    counts = {}
    for flag in ("1", "0"):
        model.use_decode_kernel(flag == "1")  # the engine's choice, made here by hand
        cache = model.make_cache()
        with mx.array(np.zeros((2, 4), np.int32)) as x, model(x, cache, 0) as y:
            ops.eval(y, *[a for c in cache for a in c.state()])
        with mx.array(np.zeros((2, 1), np.int32)) as x, mx.array(np.array([4, 4], np.int32)) as p, \
                model(x, cache, p) as y:
            counts[flag], kinds = ops.graph_summary(y, *[a for c in cache for a in c.state()])
        for c in cache:
            c.close()
    # per layer: norm-fused residuals (2), q/k/v, attention, the cache write and the
    # reshape of the kernel's new keys and values to this contiguous cache's layout
    # (the engine's block pool takes them as they are), output projection, gate/up,
    # activation, down projection; on the CPU, MLX computes the first layer's input
    # RMSNorm from plain ops (about 7 nodes)
    extra = 8 if mx.device.default_device() == "cpu" else 0
    assert counts["1"] <= 10 * layers + 12 + extra
    assert counts["1"] < counts["0"]


# ---------------------------------------------------------------------------
# kv_bits: whole models decoding from a quantized block pool, the kernel reading
# it against the gather path it replaces (gathered, dequantized keys)


def paged_decode(model, bits: int | None, prompts: np.ndarray, lengths: list[int], tokens: np.ndarray,
                 views: bool = False):
    """Prefills rows of `lengths` tokens of `prompts` into a pool (quantized with `bits`),
    then one decode step per column of `tokens`, each row at its own position (`views`:
    the decode kernel reading the pool through views of its buffers, as the engine's
    steps do, paged.read_views). Returns per step the logits (B, V), the pool's arrays
    (numpy) and the step's graph size."""
    windows = {w for w in model.windows() if w}
    pool = BlockPool(model.kv_layout(), model.activation_dtype(), 16, 64, prefix_cache=False, bits=bits)
    kv = ShardKV(pool, 1, windows.pop() if len(windows) == 1 else None)
    n = prompts.shape[1]
    rows = [SimpleNamespace(blocks=pool.allocate(-(-(n + tokens.shape[1]) // 16)), pos=0, created=0.0)
            for _ in lengths]
    out = []
    try:
        views = layer_views(pool.arrays, kv.prefill_tables(rows, 0, n, lengths), model.windows(), bits, pool.group)
        with mx.array(prompts) as x, model(x, views, 0) as y:
            pool.arrays = written(views)
            ops.eval(y, *pool.arrays)
        for i in range(tokens.shape[1]):
            for r, length in zip(rows, lengths):
                r.pos = length + i
            reads = paged.read_views(pool.arrays) if views else None
            layers = layer_views(pool.arrays, kv.decode_tables(rows), model.windows(), bits, pool.group, reads)
            pos = np.asarray([r.pos for r in rows], np.int32)
            with mx.array(tokens[:, i:i + 1]) as x, mx.array(pos) as p:
                y = model(x, layers, p)
                pool.arrays = written(layers)
                nodes, _ = ops.graph_summary(y, *pool.arrays)
                ops.eval(y, *pool.arrays)
                out.append((y.numpy()[:, 0], [a.numpy() if a.dtype is mx.uint32 else as_np(a) for a in pool.arrays],
                            nodes))
    finally:
        kv.close()
    return out


def decode_both_ways(model, monkeypatch, setting: str, bits: int | None, seed: int, views: bool = False,
                     where=paged, values=(True, False)):
    """`paged_decode`'s steps (two rows of 12 and 7 prompt tokens, 20 steps) with the
    decode kernel and `<where>.<setting>` (default amlx.kv.paged's) at values[0], beside the
    same at values[1] (default on, then off): pairs of (logits, pool, nodes)."""
    model.use_decode_kernel(True)
    rng = np.random.default_rng(seed)
    lengths, steps = [12, 7], 20
    prompts = rng.integers(0, 256, size=(2, 12)).astype(np.int32)
    tokens = rng.integers(0, 256, size=(2, steps)).astype(np.int32)
    runs = {}
    for value in values:
        monkeypatch.setattr(where, setting, value)
        runs[value] = paged_decode(model, bits, prompts, lengths, tokens, views)
    return zip(runs[values[0]], runs[values[1]])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_models_decode_the_same_with_the_quantized_kernel_and_the_gather_path(arch, bits, models, monkeypatch):
    """Two rows at their own positions decode 20 steps (through Gemma's window of 8)
    from a quantized pool, the kernel reading the pool itself and the kernel over
    gathered, dequantized keys (what ran before): the same logits (the bound is
    the batched one of test_models_decode_the_same_with_and_without_kernels: the
    kernels dequantize alike, but a last-bit difference would pass through TF32
    matmuls); the first layer's pool (its inputs are the embeddings only) the same
    bit for bit, the others at most one quantization step apart; and fewer graph
    nodes per step (no gather, no dequantize)."""
    parts = 3  # packed values, scales, biases per layer
    for (logits, pool, nodes), (logits0, pool0, nodes0) in decode_both_ways(models[arch], monkeypatch,
                                                                           "QUANTIZED_KERNEL", bits, 2):
        assert _rel(logits, logits0) < 1e-2
        for a, b in zip(pool[:parts], pool0[:parts]):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(pool[parts::parts], pool0[parts::parts]):
            step = np.abs(kv_reference.unpack(a, bits).astype(np.int64) - kv_reference.unpack(b, bits))
            assert step.max() <= 1
        assert nodes < nodes0


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_models_decode_the_same_with_the_kernel_writing_the_pool(arch, models, monkeypatch):
    """Two rows at their own positions decode 20 steps (through Gemma's window of 8) from
    a block pool the kernel reads through views of its buffers, as the engine's steps do:
    the kernel writing each step's new keys and values into the pool itself (on CUDA;
    decode_attention's write_pool) and the scatter (paged.KERNEL_WRITES off) give the
    same logits and the same pool, bit for bit; on CUDA with at least three graph nodes
    fewer a layer (the scatter and the pool's two reshapes), elsewhere the same graph."""
    model = models[arch]
    with mx.array(np.zeros((1, 1), np.int32)) as table:
        writes = da.writes_pool(None, table)
    for (logits, pool, nodes), (logits0, pool0, nodes0) in decode_both_ways(model, monkeypatch, "KERNEL_WRITES",
                                                                           None, 3, views=True):
        np.testing.assert_array_equal(logits, logits0)
        for a, b in zip(pool, pool0):
            np.testing.assert_array_equal(a, b)
        # (and the write slots' broadcast, once a pass)
        assert nodes <= nodes0 - 3 * len(model.layers) if writes else nodes == nodes0


@pytest.mark.skipif(not fast.cuda_available(), reason="the lane-group loop is a CUDA variant")
@pytest.mark.parametrize("lane_dims, lane_bytes", [(8, 64), (16, 64), (8, 16), (8, 128)])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_models_decode_alike_with_the_lane_group_loop(arch, lane_dims, lane_bytes, models, monkeypatch):
    """Two rows decode 20 steps (through Gemma's window of 8) from a block pool the kernel
    writes itself, with the lane-group loop (decode_attention.LANE_DIMS, loading LANE_BYTES of
    keys a lane ahead) and the one-key loop: the same logits up to float32 summation order (a
    key scored against the wrong query or value would be off by far more), in the same graph."""
    monkeypatch.setattr(da, "LANE_BYTES", lane_bytes)
    for (logits, _, nodes), (logits0, _, nodes0) in decode_both_ways(models[arch], monkeypatch, "LANE_DIMS", None,
                                                                     5, views=True, where=da, values=(lane_dims, 0)):
        assert _rel(logits, logits0) < 1e-4
        assert nodes == nodes0


@pytest.mark.skipif(not fast.cuda_available(), reason="the lane-group loop is a CUDA variant")
def test_gemma_at_head_dim_256_decodes_alike_with_one_group_of_lanes(tmp_path, monkeypatch):
    """Gemma 3's head dim, 256, at 8 dims a lane is one key a round: one group of 32 lanes
    (LANE_ONE, the default) against the one-key loop, whole-model decode steps through the
    window, from a block pool the kernel writes itself: the same logits up to float32 order."""
    path = make_checkpoint(tmp_path / "gemma256", "gemma3_text", tokenizer=False, head_dim=256)
    model = load_model(path).model
    try:
        monkeypatch.setattr(da, "LANE_DIMS", 8)
        assert da.lane_groups(256) in (0, 1)  # (1 with LANE_ONE, 0 without: the loops compared)
        for (logits, _, _), (logits0, _, _) in decode_both_ways(model, monkeypatch, "LANE_ONE", None, 6,
                                                                 views=True, where=da, values=(True, False)):
            assert _rel(logits, logits0) < 1e-4
    finally:
        model.close()


def test_engines_choose_the_kernels_on_the_cpu(monkeypatch):
    """CPU engines decode with the fused kernels unless told not to (AMLX_DECODE_KERNEL=0
    or decode_kernel=False), read when the options are resolved."""
    from amlx.engine.placement import EngineOptions

    monkeypatch.delenv("AMLX_DECODE_KERNEL", raising=False)
    assert EngineOptions(device="cpu").resolved().decode_kernel
    assert not EngineOptions(device="cpu", decode_kernel=False).resolved().decode_kernel
    monkeypatch.setenv("AMLX_DECODE_KERNEL", "0")
    assert not EngineOptions(device="cpu").resolved().decode_kernel
