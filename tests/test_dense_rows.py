"""The tensor-core matmul of 2-64 rows (amlx.models.dense_rows) against a float64
reference, and where the model code uses it.

The kernel runs only where MLX has its CUDA backend (the lent GPU machine); there it
is checked against numpy's float64 product over rows, shapes and both 16-bit dtypes
(hypothesis), for rows that do not depend on the other rows, repeatable results, an
x that is not 16-byte aligned, inside a compiled function, and a bfloat16 model's
logits with it on and off. What runs everywhere: the tiling covers every output,
`supports` refuses what the kernel does not take, and the model code asks for it only
inside an engine's pass with the kernels on (never in a training pass: a custom
kernel has no gradient)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx._mlx import device, fast, ops
from amlx.models import cpu_matmul, load_model
from amlx.models import dense_rows as dr
from amlx.train.grad import value_and_grad

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.kv_reference import round_to
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from helpers.kv_reference import round_to

cuda = pytest.mark.skipif(not fast.cuda_available(), reason="needs MLX's CUDA backend")
# the output is rounded once to its dtype; float32 accumulation adds a little
ROUND = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -8}


def as_mx(a: np.ndarray, dtype: str) -> mx.Array:
    return mx.array(np.asarray(a, np.float32)).astype(getattr(mx, dtype))


def on(name: str):
    return device.on_stream(device.new_stream(name))


# -- everywhere ----------------------------------------------------------------------

@given(rows=st.integers(dr.MIN_ROWS, dr.MAX_ROWS), n8=st.integers(1, 40_000))
@settings(max_examples=300, deadline=None)
def test_tiles_cover_every_output(rows, n8):
    n = 8 * n8
    mt, nt, u = dr.tiles(rows, n)
    assert 16 * (mt - 1) < rows <= 16 * mt and mt <= 4
    assert nt in (1, 2, 4) and n % (8 * nt) == 0
    assert n // (8 * nt) >= 128 or nt == 1  # wide tiles only where the blocks still fill the GPU
    assert u in (1, 2) and (u == 1) == (mt * nt >= 16)


def test_supports_refuses_what_the_kernel_does_not_take():
    def ok(rows=4, n=64, k=128, dtype="bfloat16", wdtype=None):
        return dr.supports(ops.zeros((rows, k), getattr(mx, dtype)),
                           ops.zeros((n, k), getattr(mx, wdtype or dtype)))

    assert ok() and ok(rows=2) and ok(rows=64) and ok(dtype="float16") and ok(k=32, n=8)
    assert not ok(rows=1)  # MLX's gemv: no cuBLAS to spare there
    assert not ok(rows=65)
    assert not ok(dtype="float32")
    assert not ok(wdtype="float16")
    assert not ok(k=48) and not ok(n=12)
    assert not dr.supports(ops.zeros((2, 4, 128), mx.bfloat16), ops.zeros((64, 128), mx.bfloat16))


def test_applies_only_inside_an_engine_pass_on_cuda(monkeypatch):
    x, w = ops.zeros((4, 128), mx.bfloat16), ops.zeros((64, 128), mx.bfloat16)
    with on("cpu"):
        with dr.within(True):
            assert not dr.applies(x, w)  # the CPU has its own kernels
    monkeypatch.setattr(dr.fast, "cuda_available", lambda: True)
    monkeypatch.setattr(dr.device, "default_device", lambda: "gpu")
    assert not dr.applies(x, w)
    with dr.within(True):
        assert dr.applies(x, w)
        with dr.within(False):
            assert not dr.applies(x, w)
        assert dr.applies(x, w)
    assert not dr.applies(x, w)
    monkeypatch.setattr(dr, "ENABLED", False)  # AMLX_DENSE_ROWS=0
    with dr.within(True):
        assert not dr.applies(x, w)


@pytest.fixture(scope="module")
def bf16_qwen3(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("dense-rows"), "qwen3", dtype="bfloat16", tokenizer=False,
                           head_dim=64)
    model = load_model(path).model
    yield model
    model.close()


def test_the_model_asks_for_it_only_in_an_engine_pass(bf16_qwen3, monkeypatch):
    """Pretending to be on CUDA (the kernel itself replaced by MLX's matmul): a pass with
    a cache and the kernels on sends its 2-64-row matmuls to dense_rows, the same pass
    with the kernels off, a pass without a cache (what training runs) and its gradient
    send none."""
    model = bf16_qwen3
    calls = []

    def fake(x, w):
        calls.append((x.shape, w.shape))
        return ops.matmul(x, ops.transpose(w))

    monkeypatch.setattr(cpu_matmul, "ENABLED", False)  # (the CPU's own few-row kernels would take them)
    monkeypatch.setattr(dr.fast, "cuda_available", lambda: True)
    monkeypatch.setattr(dr.device, "default_device", lambda: "gpu")
    monkeypatch.setattr(dr, "dense_rows", fake)
    ids = np.arange(8, dtype=np.int32).reshape(2, 4)

    def run(kernels: bool, cache: bool) -> int:
        calls.clear()
        model.use_decode_kernel(kernels)
        kv = model.make_cache() if cache else None
        try:
            with mx.array(ids) as x, model(x, kv, 0) as y:
                ops.eval(y)
        finally:
            for c in kv or []:
                c.close()
        return len(calls)

    try:
        layers = len(model.layers)
        # per layer q/k/v, o, gate/up, down; and the tied head (8 rows: 2 x 4 tokens)
        assert run(True, True) == 4 * layers + 1
        assert all(x[0] == 8 for x, _ in calls)
        assert run(False, True) == 0
        assert run(True, False) == 0
        # a training step with the kernels on: its gradient goes through MLX's matmuls
        model.use_decode_kernel(True)
        calls.clear()
        params = {"model.norm.weight": model.model.norm.weight}
        with mx.array(ids) as x, mx.array(np.ones((2, 4), np.float32)) as mask:
            (loss, _), grads = value_and_grad(model)(params, x, x, mask)
            ops.eval(loss, grads["model.norm.weight"])
        assert not calls
    finally:
        model.use_decode_kernel(False)


# -- on the GPU ----------------------------------------------------------------------

def check(rows: int, n: int, k: int, dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = round_to(rng.normal(0.0, 1.0, size=(rows, k)), dtype)
    w = round_to(rng.normal(0.0, 0.05, size=(n, k)), dtype)
    xa, wa = as_mx(x, dtype), as_mx(w, dtype)
    assert dr.supports(xa, wa)
    y = dr.dense_rows(xa, wa)
    assert y.shape == (rows, n) and y.dtype is getattr(mx, dtype)
    got = y.astype(mx.float32).numpy().astype(np.float64)
    want = x @ w.T
    bound = ROUND[dtype] * np.abs(want) + 1e-5 * (np.abs(x) @ np.abs(w).T)
    bad = np.abs(got - want) > bound
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs off, first at {np.argwhere(bad)[0]}"
    return got


@cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows", [2, 3, 8, 15, 16, 17, 31, 33, 48, 63, 64])
def test_kernel_equals_float64_reference(rows, dtype):
    check(rows, 328, 512, dtype, seed=rows)


@cuda
@pytest.mark.parametrize("rows,n,k", [(64, 4096, 1024), (2, 1024, 3072), (64, 6144, 1024), (17, 1024, 4096),
                                      (64, 4096, 12288), (33, 24576, 4096), (4, 151936, 256), (64, 8, 32),
                                      (5, 2048, 1152)])
def test_kernel_at_model_shapes(rows, n, k):
    """Qwen3-0.6B's and Qwen3-8B's projections (every tile width), a vocabulary head,
    the smallest shape, and Gemma-3-1B's K = 1,152."""
    check(rows, n, k, "bfloat16", seed=n + k)


@cuda
@given(rows=st.integers(dr.MIN_ROWS, dr.MAX_ROWS), n8=st.integers(1, 600), chunks=st.integers(1, 70),
       dtype=st.sampled_from(["bfloat16", "float16"]), seed=st.integers(0, 2 ** 16))
@settings(max_examples=60, deadline=None)
def test_kernel_over_shapes(rows, n8, chunks, dtype, seed):
    check(rows, 8 * n8, 32 * chunks, dtype, seed)


@cuda
def test_a_rows_output_does_not_depend_on_the_other_rows_and_repeats():
    rng = np.random.default_rng(7)
    x = as_mx(round_to(rng.normal(size=(64, 1024)), "bfloat16"), "bfloat16")
    w = as_mx(round_to(rng.normal(0, 0.05, size=(2048, 1024)), "bfloat16"), "bfloat16")
    whole = dr.dense_rows(x, w).astype(mx.float32).numpy()
    np.testing.assert_array_equal(whole, dr.dense_rows(x, w).astype(mx.float32).numpy())
    for rows in (2, 5, 16, 40):
        part = dr.dense_rows(ops.slice(x, (64 - rows, 0), (64, 1024)), w).astype(mx.float32).numpy()
        np.testing.assert_array_equal(part, whole[64 - rows:])


@cuda
def test_kernel_reads_an_x_that_is_not_16_byte_aligned():
    """x a view one element into a flat array (row-contiguous, so MLX passes it as is)."""
    rng = np.random.default_rng(5)
    rows, k, n = 5, 256, 64
    flat = round_to(rng.normal(size=rows * k + 1), "bfloat16")
    w = round_to(rng.normal(0, 0.05, size=(n, k)), "bfloat16")
    x = ops.reshape(ops.slice(as_mx(flat, "bfloat16"), (1,), (rows * k + 1,)), (rows, k))
    got = dr.dense_rows(x, as_mx(w, "bfloat16")).astype(mx.float32).numpy()
    want = flat[1:].reshape(rows, k) @ w.T
    assert np.all(np.abs(got - want) <= ROUND["bfloat16"] * np.abs(want) + 1e-5 * np.abs(flat[1:].reshape(rows, k))
                  @ np.abs(w).T)


@cuda
def test_kernel_inside_a_compiled_function():
    rng = np.random.default_rng(4)
    x = round_to(rng.normal(size=(6, 1024)), "bfloat16")
    w = round_to(rng.normal(0, 0.05, size=(256, 1024)), "bfloat16")
    wa = as_mx(w, "bfloat16")
    step = mx.transforms.compile(lambda a: dr.dense_rows(a, wa) * 2.0)
    with on("gpu"):
        first = step(as_mx(x, "bfloat16")).astype(mx.float32).numpy()
        again = step(as_mx(x, "bfloat16")).astype(mx.float32).numpy()
    want = x @ w.T
    assert np.all(np.abs(first / 2 - want) <= ROUND["bfloat16"] * np.abs(want) + 1e-5 * np.abs(x) @ np.abs(w).T)
    np.testing.assert_array_equal(first, again)


@cuda
def test_a_bfloat16_model_gives_the_same_logits_with_it_on_and_off(bf16_qwen3, monkeypatch):
    """Two rows prefilled (8 tokens: q/k/v, o, gate/up, down and the head at 16 rows) and
    decoded 6 steps (2 rows) with the kernels on, dense_rows on and off: the same logits up
    to bfloat16 rounding differences carried through the layers."""
    model = bf16_qwen3
    model.use_decode_kernel(True)
    rng = np.random.default_rng(2)
    prompts = rng.integers(0, 256, size=(2, 8)).astype(np.int32)
    tokens = rng.integers(0, 256, size=(2, 6)).astype(np.int32)
    runs = {}
    try:
        for enabled in (True, False):
            monkeypatch.setattr(dr, "ENABLED", enabled)
            cache = model.make_cache()
            out = []
            try:
                with mx.array(prompts) as x, model(x, cache, 0) as y:
                    out.append(y.astype(mx.float32).numpy())
                for i in range(tokens.shape[1]):
                    for c in cache:
                        c.reserve(8 + i + 1)
                    with mx.array(tokens[:, i:i + 1]) as x, mx.array(np.array([8 + i] * 2, np.int32)) as p, \
                            model(x, cache, p) as y:
                        out.append(y.astype(mx.float32).numpy())
            finally:
                for c in cache:
                    c.close()
            runs[enabled] = out
    finally:
        model.use_decode_kernel(False)
    for a, b in zip(runs[True], runs[False]):
        assert float(np.max(np.abs(a - b)) / np.max(np.abs(b))) < 3e-2
