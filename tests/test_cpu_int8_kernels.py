"""The int8 path of amlx's CPU few-row kernels (cpu_kernels.gemv(..., int8=True)):
quantized weights against x rounded to int8 per group, summed on bytes.

Two references, both float64 numpy:
- the exact int8 one: x rounded as the kernel documents (d = max|x| / 127 per group,
  xq = rint(x * (127 / max|x|)) in float32, ties to even), the integer sums exact; the
  kernel may differ from it only by float32 rounding of a few dozen operations per
  group, so the bound is a small multiple of 2^-24 of the sum of the terms' sizes;
- the float one (the dequantized weights times x): apart from that rounding, the
  difference is sum_k w_k (d xq_k - x_k), at most sum_k |w_k| d / 2.
Every instruction set this CPU has is checked (VNNI 512/256 bits, AVX-VNNI, AVX2's
vpmaddubsw, scalar), with 1..MAX_ROWS rows (past BLOCK_ROWS in chunks), group sizes 32/64/128 and thread counts.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx._mlx import cpu_kernels as ck
from amlx._mlx import ops as O
from amlx.errors import MLXError

try:
    from tests.helpers.cpu_kernels import as_f64, restore_kernel_settings  # noqa: F401 (an autouse fixture)
except ImportError:  # tests/ itself on sys.path (rootdir-less run)
    from helpers.cpu_kernels import as_f64, restore_kernel_settings  # noqa: F401

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _supported() -> list[str]:
    found = []
    for name in ("generic", "avx2", "avxvnni", "avx512"):
        try:
            ck.set_isa(name)
        except MLXError:
            continue
        found.append(name)
    ck.set_isa("best")
    return found


ISAS = _supported()


def _codes(wq, bits: int) -> np.ndarray:
    """MLX's packed weights as their integer codes (n, k)."""
    words = np.asarray(wq).astype(np.uint64)
    shifts = np.arange(32 // bits, dtype=np.uint64) * bits
    return ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1).astype(np.int64)


def _round_x(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """x (m, k) float32 as the kernel rounds it: int codes (m, G, group) and scales (m, G), float32 math."""
    m, k = x.shape
    xg = x.reshape(m, k // group, group)
    amax = np.abs(xg).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xg * inv[..., None]), -127, 127).astype(np.int64)
    return q, (amax / np.float32(127)).astype(np.float32)


def _case(m, groups, n, seed, bits, group, sdtype, spread):
    rng = np.random.default_rng(seed)
    k = groups * group
    # `spread` scales groups of x differently (activations have outliers)
    x = (rng.standard_normal((m, k)) * np.repeat(rng.uniform(0.01, spread, (m, groups)), group, axis=1))
    x = mx.array(x.astype(np.float32))
    w = O.astype(mx.array(rng.standard_normal((n, k)).astype(np.float32)), DTYPES[sdtype])
    wq, scales, biases = O.quantize(w, group, bits)
    return x, wq, scales, biases


def _check(y, x, wq, scales, biases, group, bits) -> None:
    xf = np.asarray(x)
    m, k = xf.shape
    groups = k // group
    xq, d = _round_x(xf, group)                                  # (m, G, g), (m, G)
    q = _codes(wq, bits).reshape(-1, groups, group)              # (n, G, g)
    s, b = as_f64(scales), as_f64(biases)                            # (n, G)
    isum = np.einsum("ngk,mgk->mng", q, xq)                      # exact integers
    xqsum = xq.sum(-1)                                           # (m, G)
    d64 = d.astype(np.float64)
    exact = (isum * s[None] * d64[:, None] + b[None] * (d64 * xqsum)[:, None]).sum(-1)
    # the size of every term the kernel rounds (with the 128 offset AVX2 uses for 8 bits)
    size = ((np.einsum("ngk,mgk->mng", q + 128, np.abs(xq)) * np.abs(s)[None]
             + (np.abs(b) + 128 * np.abs(s))[None] * np.abs(xq).sum(-1)[:, None]) * np.abs(d64)[:, None]).sum(-1)
    got = as_f64(y)
    assert got.shape == (m, q.shape[0])
    err = np.abs(got - exact)
    # a few dozen float32 roundings per output, of random sign: measured at most 0.15 units
    # of 2^-24 * size over every kernel and shape here (the worst case is ~(groups + 30) units)
    tol = 8 * 2.0 ** -24 * size
    assert np.all(err <= tol), float((err / np.maximum(tol, 1e-30)).max())
    # against the float product: x's rounding, at most d / 2 per value, times |w|
    wf = q * s[..., None] + b[..., None]                          # (n, G, g)
    want = np.einsum("ngk,mgk->mn", wf, xf.reshape(m, groups, group).astype(np.float64))
    bound = np.einsum("ng,mg->mn", np.abs(wf).sum(-1), d64 / 2) * (1 + 1e-5) + tol
    assert np.all(np.abs(got - want) <= bound)


@SETTINGS
@given(m=st.integers(1, ck.MAX_ROWS), groups=st.integers(1, 20), n=st.integers(1, 70), seed=st.integers(0, 2**16),
       bits=st.sampled_from([4, 8]), group=st.sampled_from(ck.GROUP_SIZES), sdtype=st.sampled_from(list(DTYPES)),
       isa=st.sampled_from(ISAS), threads=st.integers(1, 3), spread=st.sampled_from([1.0, 100.0]))
def test_int8_gemv_matches_the_exact_int8_product(m, groups, n, seed, bits, group, sdtype, isa, threads,
                                                  spread) -> None:
    ck.set_isa(isa)
    ck.set_threads(threads)
    x, wq, scales, biases = _case(m, groups, n, seed, bits, group, sdtype, spread)
    y = ck.gemv(x, wq, scales, biases, group_size=group, bits=bits, int8=True)
    mx.eval(y)
    _check(y, x, wq, scales, biases, group, bits)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", ck.GROUP_SIZES)
def test_every_kernel_shape(isa, bits, group) -> None:
    # every row count (each its own compiled kernel), with rows left over after the
    # blocks of 4 and 2 weight rows, and 17 groups (two chunks of 8 and a tail)
    ck.set_isa(isa)
    for m in range(1, ck.MAX_ROWS + 1):
        x, wq, scales, biases = _case(m, 17, 23, m * 7 + bits, bits, group, "bfloat16", 10.0)
        _check(ck.gemv(x, wq, scales, biases, group_size=group, bits=bits, int8=True), x, wq, scales, biases,
               group, bits)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([4, 8]), threads=st.integers(1, 3),
       isa=st.sampled_from(ISAS))
def test_a_row_does_not_depend_on_the_other_rows(seed, bits, threads, isa) -> None:
    # x is rounded per row, and each row summed in one order: batching never changes a result
    ck.set_isa(isa)
    ck.set_threads(threads)
    x, wq, scales, biases = _case(ck.MAX_ROWS, 9, 48, seed, bits, 64, "bfloat16", 10.0)
    kw = {"group_size": 64, "bits": bits, "int8": True}
    full = np.asarray(ck.gemv(x, wq, scales, biases, **kw))
    for i in range(ck.MAX_ROWS):
        alone = np.asarray(ck.gemv(O.slice(x, (i, 0), (i + 1, x.shape[1])), wq, scales, biases, **kw))
        assert np.array_equal(alone[0], full[i])


@pytest.mark.parametrize("isa", ISAS)
def test_zero_groups_of_x_contribute_nothing(isa) -> None:
    ck.set_isa(isa)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    x[0] = 0.0
    x[1, 64:192] = 0.0
    w = mx.array(rng.standard_normal((20, 256)).astype(np.float32))
    wq, scales, biases = O.quantize(w, 64, 8)
    y = np.asarray(ck.gemv(mx.array(x), wq, scales, biases, group_size=64, bits=8, int8=True))
    assert np.all(y[0] == 0.0)
    x1 = mx.array(np.concatenate([x[1:, :64], x[1:, 192:]], axis=1))
    sl = lambda a, lo, hi: O.slice(a, (0, lo), (a.shape[0], hi))  # noqa: E731
    cut = lambda a, per: O.concatenate([sl(a, 0, per), sl(a, 3 * per, 4 * per)], axis=1)  # noqa: E731
    y1 = np.asarray(ck.gemv(x1, cut(wq, 16), cut(scales, 1), cut(biases, 1), group_size=64, bits=8, int8=True))
    np.testing.assert_allclose(y[1], y1[0], rtol=1e-6, atol=1e-6)


def test_isa_names() -> None:
    names = {"generic": "generic", "avx2": "avx2", "avxvnni": "avxvnni"}
    for isa in ISAS:
        ck.set_isa(isa)
        assert ck.isa() == isa
        if isa in names:
            assert ck.int8_isa() == names[isa]
        else:
            assert ck.int8_isa() in ("avx512vnni", "avxvnni", "avx2")


def test_dense_weights_ignore_int8() -> None:
    rng = np.random.default_rng(4)
    x = mx.array(rng.standard_normal((3, 96)).astype(np.float32))
    w = O.astype(mx.array(rng.standard_normal((10, 96)).astype(np.float32)), mx.bfloat16)
    assert np.array_equal(np.asarray(ck.gemv(x, w, int8=True)), np.asarray(ck.gemv(x, w)))


@pytest.mark.parametrize("bits", [4, 8])
def test_layers_follow_the_switch(bits, monkeypatch) -> None:
    # amlx/models/cpu_matmul.INT8 (AMLX_CPU_INT8) picks the int8 or the float kernel, in a decode
    # pass only (cpu_matmul.decode_pass): a prefill's rows always take the float kernel
    from amlx.models import cpu_matmul, nn

    rng = np.random.default_rng(bits)
    w = O.astype(mx.array(rng.standard_normal((40, 128)).astype(np.float32)), mx.bfloat16)
    q = O.quantize(w, 64, bits)
    layer = nn.QuantizedLinear(*q, 64, bits)
    x = mx.array(rng.standard_normal((2, 128)).astype(np.float32))
    for on in (True, False):
        monkeypatch.setattr(cpu_matmul, "INT8", on)
        for decoding in (True, False):
            with cpu_matmul.decode_pass(decoding):
                got = layer(x)
            want = ck.gemv(x, *q, group_size=64, bits=bits, int8=on and decoding)
            assert np.array_equal(np.asarray(got), np.asarray(O.astype(want, got.dtype)))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_decode_pass_of_many_rows_rounds_every_row_alike(bits) -> None:
    """A decode pass of more rows than the kernels take at once (a batch past 64) goes through
    them in pieces: each row's result is the one it gets alone. (Past 64 rows the pass took the
    float path, and a row's tokens depended on the batch size.)"""
    from amlx.models import cpu_matmul, nn

    rng = np.random.default_rng(bits)
    q = O.quantize(mx.array(rng.standard_normal((24, 128)).astype(np.float32)), 64, bits)
    layer = nn.QuantizedLinear(*q, 64, bits)
    rows = ck.MAX_ROWS + 9
    x = mx.array(rng.standard_normal((rows, 128)).astype(np.float32))
    with cpu_matmul.decode_pass(True):
        together = np.asarray(layer(x))
        alone = [np.asarray(layer(O.slice(x, (i, 0), (i + 1, 128)))) for i in (0, 63, 64, rows - 1)]
    for i, row in zip((0, 63, 64, rows - 1), alone):
        np.testing.assert_array_equal(together[i:i + 1], row)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([4, 8]), lo=st.integers(0, 30), threads=st.integers(1, 3))
def test_an_output_does_not_depend_on_the_other_weight_rows(seed, bits, lo, threads) -> None:
    # a block of W's rows (MatmulSplit's column blocks, a vocabulary-sharded head) gives
    # bitwise the outputs of the whole product
    ck.set_threads(threads)
    x, wq, scales, biases = _case(3, 9, 61, seed, bits, 32, "bfloat16", 10.0)
    kw = {"group_size": 32, "bits": bits, "int8": True}
    full = np.asarray(ck.gemv(x, wq, scales, biases, **kw))
    rows = lambda a: O.slice(a, (lo, 0), (61, a.shape[1]))  # noqa: E731
    part = np.asarray(ck.gemv(x, rows(wq), rows(scales), rows(biases), **kw))
    assert np.array_equal(part, full[:, lo:])
