"""amlx's CPU few-row matmul kernels (amlx._mlx.cpu_kernels) against numpy.

The reference is float64 numpy on exactly the values the kernels read: the
weights rounded to their dtype, or MLX's own dequantization of the packed
weights. Every instruction set this CPU has is checked, with several thread
counts; shapes include K not a multiple of the vector width (the scalar tail)
and N not a multiple of the thread split.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx._mlx import cpu_kernels as ck
from amlx._mlx import memory
from amlx._mlx import ops as O
from amlx._mlx import transforms
from amlx.errors import MLXError

try:
    from tests.helpers.cpu_kernels import as_f64, restore_kernel_settings  # noqa: F401 (an autouse fixture)
except ImportError:  # tests/ itself on sys.path (rootdir-less run)
    from helpers.cpu_kernels import as_f64, restore_kernel_settings  # noqa: F401

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ISAS = [i for i in ("generic", "avx2", "avx512") if i == "generic" or ck.isa() in (i, "avx512")]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _unpack(wq, scales, biases, group: int, bits: int) -> np.ndarray:
    """MLX's affine packing in float64: value i of a row is bits [bits*i, bits*(i+1)) of the
    row's little-endian uint32 words, times its group's scale, plus its group's bias."""
    words = np.asarray(wq).astype(np.uint64)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint64) * bits)
    q = ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1).astype(np.float64)
    return q * np.repeat(as_f64(scales), group, axis=1) + np.repeat(as_f64(biases), group, axis=1)


def _close(got, want: np.ndarray, scale: np.ndarray) -> None:
    err = np.abs(as_f64(got) - want)
    assert np.all(err <= 2e-5 * scale + 1e-6), float((err / (scale + 1e-6)).max())


@SETTINGS
@given(m=st.integers(1, ck.BLOCK_ROWS), k=st.integers(1, 300), n=st.integers(1, 80), seed=st.integers(0, 2**16),
       wdtype=st.sampled_from(list(DTYPES)), xdtype=st.sampled_from(list(DTYPES)), isa=st.sampled_from(ISAS),
       threads=st.integers(1, 3))
def test_dense_gemv_matches_numpy(m, k, n, seed, wdtype, xdtype, isa, threads) -> None:
    ck.set_isa(isa)
    ck.set_threads(threads)
    rng = np.random.default_rng(seed)
    x = O.astype(mx.array(rng.standard_normal((m, k)).astype(np.float32)), DTYPES[xdtype])
    w = O.astype(mx.array(rng.standard_normal((n, k)).astype(np.float32)), DTYPES[wdtype])
    y = ck.gemv(x, w)
    mx.eval(y)
    assert y.shape == (m, n)
    assert y.dtype == O.matmul(x, O.transpose(w)).dtype
    xf, wf = as_f64(x), as_f64(w)
    # a 16-bit result is rounded once more, to its own dtype
    rel = 2e-5 if y.dtype == mx.float32 else 2.0 ** -7
    err = np.abs(as_f64(y) - xf @ wf.T)
    assert np.all(err <= rel * (np.abs(xf) @ np.abs(wf).T) + 1e-6)


@SETTINGS
@given(m=st.integers(1, ck.BLOCK_ROWS), groups=st.integers(1, 6), n=st.integers(1, 80), seed=st.integers(0, 2**16),
       bits=st.sampled_from([4, 8]), group=st.sampled_from(ck.GROUP_SIZES), sdtype=st.sampled_from(list(DTYPES)),
       isa=st.sampled_from(ISAS), threads=st.integers(1, 3))
def test_quantized_gemv_matches_numpy(m, groups, n, seed, bits, group, sdtype, isa, threads) -> None:
    _check_quantized(m, groups, n, seed, bits, group, sdtype, isa, threads)


def _check_quantized(m, groups, n, seed, bits, group, sdtype, isa, threads) -> None:
    ck.set_isa(isa)
    ck.set_threads(threads)
    rng = np.random.default_rng(seed)
    k = groups * group
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
    w = O.astype(mx.array(rng.standard_normal((n, k)).astype(np.float32)), DTYPES[sdtype])
    wq, scales, biases = O.quantize(w, group, bits)
    y = ck.gemv(x, wq, scales, biases, group_size=group, bits=bits)
    mx.eval(y)
    wf = _unpack(wq, scales, biases, group, bits)
    xf = as_f64(x)
    _close(y, xf @ wf.T, np.abs(xf) @ np.abs(wf).T)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([0, 4, 8]), threads=st.integers(1, 3))
def test_a_row_does_not_depend_on_the_other_rows(seed, bits, threads) -> None:
    # batching never changes a request's result: row i of an 8-row product is bitwise row i alone
    ck.set_threads(threads)
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((ck.MAX_ROWS, 256)).astype(np.float32))
    w = O.astype(mx.array(rng.standard_normal((48, 256)).astype(np.float32)), mx.bfloat16)
    q = O.quantize(w, 64, bits) if bits else (w,)
    kw = {"group_size": 64, "bits": bits} if bits else {}
    full = np.asarray(ck.gemv(x, *q, **kw))
    for i in range(ck.MAX_ROWS):
        alone = np.asarray(ck.gemv(O.slice(x, (i, 0), (i + 1, 256)), *q, **kw))
        assert np.array_equal(alone[0], full[i])


def test_leading_axes_are_kept() -> None:
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((2, 3, 64)).astype(np.float32))
    w = mx.array(rng.standard_normal((5, 64)).astype(np.float32))
    y = ck.gemv(x, w)
    assert y.shape == (2, 3, 5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ np.asarray(w).T, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs() -> None:
    rng = np.random.default_rng(1)
    xt = mx.array(rng.standard_normal((64, 2)).astype(np.float32))
    wt = mx.array(rng.standard_normal((64, 40)).astype(np.float32))
    x, w = O.transpose(xt), O.transpose(wt)  # views with strides, not row-contiguous
    want = np.asarray(xt).T @ np.asarray(wt)
    np.testing.assert_allclose(np.asarray(ck.gemv(x, w)), want, rtol=1e-5, atol=1e-5)


def test_compiles_and_differentiates_in_x() -> None:
    rng = np.random.default_rng(2)
    w = mx.array(rng.standard_normal((16, 32)).astype(np.float32))
    x = mx.array(rng.standard_normal((1, 32)).astype(np.float32))
    f = transforms.compile(lambda a: [ck.gemv(a, w)])
    np.testing.assert_allclose(np.asarray(f(x)[0]), np.asarray(x) @ np.asarray(w).T, rtol=1e-5, atol=1e-5)
    grad = transforms.grad(lambda a: O.sum(ck.gemv(a, w)))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(w).sum(0, keepdims=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_differentiates_in_the_weights(dtype) -> None:
    """Full fine-tuning differentiates the weights too: d/dW sum(R * x W^T) = R^T x. (It raised
    "gradients with respect to the weights are not supported", so model.train failed on
    batches of a few rows, which go to this kernel.)"""
    rng = np.random.default_rng(4)
    t = DTYPES[dtype] if dtype != "float32" else mx.float32
    x = O.astype(mx.array(rng.standard_normal((3, 32)).astype(np.float32)), t)
    w = O.astype(mx.array(rng.standard_normal((16, 32)).astype(np.float32)), t)
    r = mx.array(rng.standard_normal((3, 16)).astype(np.float32))
    gx, gw = transforms.grad(lambda a, b: O.sum(O.astype(ck.gemv(a, b), mx.float32) * r), argnums=(0, 1))(x, w)
    assert gw.dtype == t and gw.shape == w.shape and gx.dtype == t
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(as_f64(gw), np.asarray(r).T @ as_f64(x), rtol=tol, atol=tol)
    np.testing.assert_allclose(as_f64(gx), np.asarray(r) @ as_f64(w), rtol=tol, atol=tol)
    q = O.quantize(O.astype(w, mx.float32), 32, 8)
    with pytest.raises(MLXError, match="quantized weights"):
        transforms.grad(lambda b: O.sum(ck.gemv(O.astype(x, mx.float32), b, q[1], q[2], group_size=32, bits=8)))(q[0])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits", [0, 8])
def test_a_16_bit_product_is_one_node_in_its_own_dtype(dtype, bits) -> None:
    """16-bit x goes into the kernel as it is and the result comes out in its dtype: one
    graph node (a decode step has one per projection; conversions around it had made
    three), bit for bit the float32 product rounded once, and its gradient in x's dtype."""
    rng = np.random.default_rng(3)
    t = DTYPES[dtype]
    x = O.astype(mx.array(rng.standard_normal((3, 128)).astype(np.float32)), t)
    w = O.astype(mx.array(rng.standard_normal((40, 128)).astype(np.float32)), t)
    q = O.quantize(w, 64, bits) if bits else (w,)
    args = dict(group_size=64, bits=bits) if bits else {}
    mx.eval(x, *q)
    y = ck.gemv(x, *q, **args)
    nodes, kinds = O.graph_summary(y)
    assert (nodes, kinds) == (1, {"CpuGemv": 1}) and y.dtype == t
    want = O.astype(ck.gemv(O.astype(x, mx.float32), *q, **args), t)
    np.testing.assert_array_equal(as_f64(y), as_f64(want))
    grad = transforms.grad(lambda a: O.sum(O.astype(ck.gemv(a, *q, **args), mx.float32)))(x)
    assert grad.dtype == t and grad.shape == x.shape


@pytest.mark.parametrize("make, match", [
    (lambda: ck.gemv(mx.array(np.ones((ck.MAX_ROWS + 1, 4), np.float32)), mx.array(np.ones((3, 4), np.float32))),
     f"1 to {ck.MAX_ROWS} rows"),
    (lambda: ck.gemv(mx.array(np.ones((1, 4), np.float32)), mx.array(np.ones((3, 5), np.float32))), "in = x"),
    (lambda: ck.gemv(mx.array(np.ones((1, 64), np.float32)), *O.quantize(mx.array(np.ones((4, 64), np.float32)),
                                                                           64, 4), group_size=64, bits=3), "4 or 8"),
])
def test_bad_arguments_raise(make, match) -> None:
    with pytest.raises(MLXError, match=match):
        make()


def test_unknown_isa_is_refused() -> None:
    with pytest.raises(MLXError, match="not supported"):
        ck.set_isa("sse9")


@pytest.mark.parametrize("rows", [1, 8, 9, 40, 65, 100])
@pytest.mark.parametrize("kind", ["bfloat16", "q8", "q4"])
def test_layers_use_the_kernels_for_few_rows(rows, kind, monkeypatch) -> None:
    # amlx/models/cpu_matmul: up to max_rows(layer) rows through CpuGemv, more rows in float32
    # through MLX's matmul (BLAS); against float64 numpy, and of the shape and dtype of the
    # plain MLX way
    from amlx.models import cpu_matmul, nn

    rng = np.random.default_rng(rows)
    w = O.astype(mx.array(rng.standard_normal((96, 128)).astype(np.float32)), mx.bfloat16)
    if kind == "bfloat16":
        layer, wf = nn.Linear(w), as_f64(w)
    else:
        bits = int(kind[1])
        q = O.quantize(w, 64, bits)
        layer, wf = nn.QuantizedLinear(*q, 64, bits), _unpack(*q, 64, bits)
    x = O.astype(mx.array(rng.standard_normal((rows, 128)).astype(np.float32)), mx.bfloat16)
    got = layer(x)
    assert 8 <= cpu_matmul.max_rows(layer) <= ck.MAX_ROWS
    # bf16 x on a bf16 kernel (AMX, AVX512-BF16) takes any number of rows (a prompt's products
    # too), quantized weights dequantized to bf16 there (one more bf16 rounding, of the weights)
    bf16 = ck.bf16_takes(x, layer.weight, 0 if kind == "bfloat16" else bits)
    takes = rows <= cpu_matmul.max_rows(layer) or bf16
    assert ("CpuGemv" in O.graph_summary(got)[1]) == takes
    xf = as_f64(x)
    err = np.abs(as_f64(got) - xf @ wf.T)
    roundings = 2 if bf16 and kind != "bfloat16" and rows > cpu_matmul.max_rows(layer) else 1
    assert np.all(err <= roundings * 2.0 ** -7 * (np.abs(xf) @ np.abs(wf).T))  # bf16 roundings
    monkeypatch.setattr(cpu_matmul, "ENABLED", False)
    plain = layer(x)
    assert "CpuGemv" not in O.graph_summary(plain)[1]
    assert (got.dtype, got.shape) == (plain.dtype, plain.shape)


@SETTINGS
@given(m=st.integers(ck.BLOCK_ROWS + 1, ck.MAX_ROWS), k=st.integers(500, 2100), n=st.integers(1, 150),
       seed=st.integers(0, 2**16), wdtype=st.sampled_from(list(DTYPES)), isa=st.sampled_from(ISAS),
       threads=st.integers(1, 3))
def test_dense_gemv_in_chunks_of_rows_matches_numpy(m, k, n, seed, wdtype, isa, threads) -> None:
    # more rows than the kernels hold: chunks of rows over tiles of 16+ weight rows (K
    # this long makes a tile shorter than N), each output summed as with few rows
    ck.set_isa(isa)
    ck.set_threads(threads)
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
    w = O.astype(mx.array(rng.standard_normal((n, k)).astype(np.float32)), DTYPES[wdtype])
    y = ck.gemv(x, w)
    mx.eval(y)
    assert y.shape == (m, n) and y.dtype == mx.float32
    xf, wf = as_f64(x), as_f64(w)
    _close(y, xf @ wf.T, np.abs(xf) @ np.abs(wf).T)


@SETTINGS
@given(m=st.integers(ck.BLOCK_ROWS + 1, ck.MAX_ROWS), groups=st.integers(1, 24), n=st.integers(1, 150),
       seed=st.integers(0, 2**16), bits=st.sampled_from([4, 8]), group=st.sampled_from(ck.GROUP_SIZES),
       sdtype=st.sampled_from(list(DTYPES)), isa=st.sampled_from(ISAS), threads=st.integers(1, 3))
def test_quantized_gemv_in_chunks_of_rows_matches_numpy(m, groups, n, seed, bits, group, sdtype, isa,
                                                        threads) -> None:
    # as the dense one: several tiles (N past the tile's rows) and chunks, on the float kernels
    _check_quantized(m, groups, n, seed, bits, group, sdtype, isa, threads)


def _peak_of(layer, x) -> int:
    """Peak bytes above what was live, of one product through `layer`."""
    mx.eval(x)
    memory.clear_cache()
    base = memory.active()
    memory.reset_peak()
    y = layer(x)
    mx.eval(y)
    return memory.peak() - base


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "q8", "q4"])
@pytest.mark.parametrize("rows", [9, 16, 32])
def test_more_rows_than_a_block_make_no_float32_copy_of_the_weight(kind, rows, monkeypatch) -> None:
    # a decode step of 9+ rows used to multiply a float32 copy of each 16-bit weight (MLX's
    # matmul), or a dequantized one: 1.2 GB written and read per step for Qwen3-0.6B's head
    from amlx.models import cpu_matmul, nn

    rng = np.random.default_rng(rows)
    out, inp = 2048, 1024
    w = O.astype(mx.array(rng.standard_normal((out, inp)).astype(np.float32)), mx.bfloat16)
    if kind in DTYPES:
        layer = nn.Linear(O.astype(w, DTYPES[kind]))
    else:
        layer = nn.QuantizedLinear(*O.quantize(w, 64, int(kind[1])), 64, int(kind[1]))
    mx.eval(layer.weight)
    x = O.astype(mx.array(rng.standard_normal((rows, inp)).astype(np.float32)), mx.bfloat16)
    if rows > cpu_matmul.max_rows(layer):
        pytest.skip("past this format's crossover: MLX's matmul, as before")
    float32_weight = out * inp * 4
    assert _peak_of(layer, x) < float32_weight / 8  # x, y and their float32 twins: ~0.3 MB
    # the test can fail: the path before (MLX's matmul past 8 rows) copies the weight
    ck.set_bf16_kernel("off")
    monkeypatch.setattr(cpu_matmul, "ROWS", dict.fromkeys(cpu_matmul.ROWS, ck.BLOCK_ROWS))
    monkeypatch.setattr(cpu_matmul, "BIG_ROWS", ck.BLOCK_ROWS)
    assert _peak_of(layer, x) >= float32_weight


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 70), groups=st.integers(1, 5), bits=st.sampled_from([4, 8]),
       group=st.sampled_from(ck.GROUP_SIZES), sdtype=st.sampled_from(list(DTYPES)), threads=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_dequantize_matches_numpy(n, groups, bits, group, sdtype, threads, seed) -> None:
    # float32 s * q + b against float64: one rounding of the product and one of the sum
    ck.set_threads(threads)
    rng = np.random.default_rng(seed)
    w = O.astype(mx.array(rng.standard_normal((n, groups * group)).astype(np.float32)), DTYPES[sdtype])
    wq, scales, biases = O.quantize(w, group, bits)
    got = ck.dequantize(wq, scales, biases, group_size=group, bits=bits)
    assert got.dtype == mx.float32 and got.shape == (n, groups * group)
    want = _unpack(wq, scales, biases, group, bits)
    scale = np.abs(np.repeat(as_f64(scales), group, axis=1)) * (2**bits - 1) + np.abs(want)
    assert np.all(np.abs(as_f64(got) - want) <= 2.0 ** -23 * scale)


def test_quantized_layers_dequantize_through_the_kernel_for_many_rows() -> None:
    from amlx.models import nn

    rng = np.random.default_rng(5)
    w = O.astype(mx.array(rng.standard_normal((96, 128)).astype(np.float32)), mx.bfloat16)
    q = O.quantize(w, 64, 8)
    layer = nn.QuantizedLinear(*q, 64, 8)
    x = mx.array(rng.standard_normal((ck.MAX_ROWS + 36, 128)).astype(np.float32))
    got = layer(x)
    assert "CpuDequantize" in O.graph_summary(got)[1]
    xf, wf = as_f64(x), _unpack(*q, 64, 8)
    assert np.all(np.abs(as_f64(got) - xf @ wf.T) <= 2e-5 * (np.abs(xf) @ np.abs(wf).T) + 1e-6)


# -- the bf16 kernels (AMX tiles, AVX512-BF16): bfloat16 weights against bfloat16 x, any rows ----

# each bf16 kernel this CPU has (none here: the tests below are skipped)
bf16_kernels = pytest.mark.parametrize("kernel", [pytest.param(k, marks=pytest.mark.skipif(
    k not in ck.bf16_kernels(), reason=f"this CPU (or its OS) lacks the {k} kernel")) for k in ck.BF16_KERNELS])


def _bf16(rng, shape) -> mx.array:
    return O.astype(mx.array(rng.standard_normal(shape).astype(np.float32)), mx.bfloat16)


@bf16_kernels
@SETTINGS
@given(m=st.integers(1, 80), chunks=st.integers(1, 40), n=st.integers(1, 100), seed=st.integers(0, 2**16),
       threads=st.integers(1, 3))
def test_bf16_gemv_matches_numpy(kernel, m, chunks, n, seed, threads) -> None:
    # any rows (past MAX_ROWS too), N not a multiple of the blocks' 16, K in runs of 32
    ck.set_bf16_kernel(kernel)
    ck.set_threads(threads)
    rng = np.random.default_rng(seed)
    k = 32 * chunks
    x, w = _bf16(rng, (m, k)), _bf16(rng, (n, k))
    assert ck.bf16_takes(x, w)
    y = ck.gemv(x, w)
    assert y.shape == (m, n) and y.dtype == mx.bfloat16
    xf, wf = as_f64(x), as_f64(w)
    err = np.abs(as_f64(y) - xf @ wf.T)
    assert np.all(err <= 2.0 ** -8 * np.abs(xf @ wf.T) + 1e-5 * (np.abs(xf) @ np.abs(wf).T))


@bf16_kernels
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 70))
def test_bf16_rows_do_not_depend_on_the_batch_or_the_split(kernel, seed, n) -> None:
    # a request's row is bitwise the same alone, in a batch of any size, on any thread count
    ck.set_bf16_kernel(kernel)
    rng = np.random.default_rng(seed)
    x, w = _bf16(rng, (40, 256)), _bf16(rng, (n, 256))
    ck.set_threads(1)
    full = np.asarray(O.astype(ck.gemv(x, w), mx.float32))
    for threads in (2, 3):
        ck.set_threads(threads)
        assert np.array_equal(np.asarray(O.astype(ck.gemv(x, w), mx.float32)), full)
    for i in (0, 7, 16, 39):
        alone = np.asarray(O.astype(ck.gemv(O.slice(x, (i, 0), (i + 1, 256)), w), mx.float32))
        assert np.array_equal(alone[0], full[i])
    for lo, hi in ((1, 3), (5, 12), (20, 39)):  # every size of register block, at every offset in it
        part = np.asarray(O.astype(ck.gemv(O.slice(x, (lo, 0), (hi, 256)), w), mx.float32))
        assert np.array_equal(part, full[lo:hi])


@bf16_kernels
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), bits=st.sampled_from([4, 8]))
def test_bf16_rows_do_not_depend_on_the_batch_in_float32(kernel, seed, n, bits) -> None:
    # the same in float32 (quantized weights with float32 scales give a float32 result, where a
    # bf16 one rounds most differences of order away): a prompt's rows alone, among others at
    # every offset of the register blocks, and on any thread count
    ck.set_bf16_kernel(kernel)
    rng = np.random.default_rng(seed)
    w = mx.array(rng.standard_normal((n, 256)).astype(np.float32))
    q = O.quantize(w, 64, bits)
    x = _bf16(rng, (150, 256))

    def rows(lo: int, hi: int) -> np.ndarray:
        y = ck.gemv(O.slice(x, (lo, 0), (hi, 256)), *q, group_size=64, bits=bits)
        assert y.dtype == mx.float32
        return np.asarray(y)

    ck.set_threads(1)
    full = rows(0, 150)
    ck.set_threads(2)
    assert np.array_equal(rows(0, 150), full)
    for lo, hi in ((1, 66), (5, 80), (80, 150), (3, 70)):
        assert np.array_equal(rows(lo, hi), full[lo:hi])


@bf16_kernels
def test_bf16_kernel_is_in_effect_and_can_be_turned_off(kernel) -> None:
    # With a bf16 kernel a prompt's 100 rows go through one call; without it the few-row kernels
    # refuse them (MAX_ROWS), and float x (not bf16) never takes the bf16 kernel.
    ck.set_bf16_kernel(kernel)
    assert ck.bf16_kernel() == kernel
    rng = np.random.default_rng(0)
    x, w = _bf16(rng, (100, 512)), _bf16(rng, (64, 512))
    on = np.asarray(O.astype(ck.gemv(x, w), mx.float32))
    assert not ck.bf16_takes(O.astype(x, mx.float32), w)
    ck.set_bf16_kernel("off")
    assert ck.bf16_kernel() == "off" and not ck.bf16_takes(x, w)
    with pytest.raises(MLXError, match="rows"):
        mx.eval(ck.gemv(x, w))
    off = np.concatenate([np.asarray(O.astype(ck.gemv(O.slice(x, (i, 0), (i + 8, 512)), w), mx.float32))
                          for i in range(0, 100, 8)])
    # the same products summed in another order: equal to bf16 rounding
    assert np.allclose(on, off, rtol=2.0 ** -7, atol=1e-3)


def test_bf16_kernel_names_are_checked() -> None:
    with pytest.raises(MLXError, match="unknown bf16 kernel 'tiles'"):
        ck.set_bf16_kernel("tiles")
    for k in ck.BF16_KERNELS:
        if k not in ck.bf16_kernels():
            with pytest.raises(MLXError, match=f"no .* for the '{k}' kernel"):
                ck.set_bf16_kernel(k)
    ck.set_bf16_kernel("best")
    assert ck.bf16_kernel() == (ck.bf16_kernels() or ("off",))[0]


@bf16_kernels
@SETTINGS
@given(m=st.integers(ck.MAX_ROWS + 1, 150), groups=st.integers(1, 24), n=st.integers(1, 100),
       seed=st.integers(0, 2**16), bits=st.sampled_from([4, 8]), group=st.sampled_from(ck.GROUP_SIZES),
       sdtype=st.sampled_from(["bfloat16", "float16", "float32"]), threads=st.integers(1, 3))
def test_bf16_quantized_prompt_products_match_numpy(kernel, m, groups, n, seed, bits, group, sdtype,
                                                    threads) -> None:
    # past MAX_ROWS, bf16 x against 4-/8-bit weights: each block of 16 weight rows dequantized to
    # bf16 (s q + b in float32, rounded to nearest even), then the bf16 kernel
    ck.set_bf16_kernel(kernel)
    ck.set_threads(threads)
    rng = np.random.default_rng(seed)
    k = group * groups
    w = O.astype(mx.array(rng.standard_normal((n, k)).astype(np.float32)), DTYPES[sdtype])
    q = O.quantize(w, group, bits)
    x = _bf16(rng, (m, k))
    assert ck.bf16_takes(x, q[0], bits)
    y = ck.gemv(x, *q, group_size=group, bits=bits, int8=True)
    assert y.shape == (m, n) and y.dtype == O.matmul(x, O.transpose(w)).dtype
    xf, wf = as_f64(x), _unpack(*q, group, bits)
    # the weights' bf16 rounding (2^-9 each) and the result's (2^-9 for bf16, less otherwise)
    err = np.abs(as_f64(y) - xf @ wf.T)
    assert np.all(err <= 2.0 ** -8 * (np.abs(xf) @ np.abs(wf).T) + 2.0 ** -8 * np.abs(xf @ wf.T) + 1e-5)
    # and the weights were dequantized to bf16: the exact product of bf16(w) agrees to float32 sums
    wb = np.asarray(O.astype(O.astype(mx.array(wf.astype(np.float32)), mx.bfloat16), mx.float32)).astype(np.float64)
    if y.dtype == mx.float32:
        _close(y, xf @ wb.T, np.abs(xf) @ np.abs(wb).T)
