"""The few-row quantized matmul kernel (amlx.models.quantized_gemv) against a
float64 reference.

The kernel runs only where MLX has its CUDA backend (the lent GPU machine);
there it is checked against numpy's float64 product with the dequantized
weight over bits, group sizes, dtypes, 1..8 rows and odd output sizes, inside
a compiled function, and a quantized model's logits with it on and off. On
other machines those tests are skipped; what runs everywhere: the packing the
reference assumes is MLX's own (ops.dequantize on the CPU), `supports`
refuses what the kernel does not take, the launch shape covers every output,
and `nn.quantized_dense` takes MLX's path on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx._mlx import device, fast, ops
from amlx.models import cpu_matmul, load_model, nn
from amlx.models import quantized_gemv as qg

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.kv_reference import round_to
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from helpers.kv_reference import round_to

cuda = pytest.mark.skipif(not fast.cuda_available(), reason="needs MLX's CUDA backend")

# the output is rounded once to its dtype; float32 accumulation adds a little
ROUND = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -8}


def packed_layer(rng, n: int, k: int, group: int, bits: int, dtype: str):
    """(w packed uint32 (n, k*bits/32), scales, biases (n, k/group) float64
    values of `dtype`, q (n, k)): MLX's affine layout, random codes."""
    q = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint32)
    per = 32 // bits
    words = q.reshape(n, k // per, per) << (np.arange(per, dtype=np.uint32) * bits)
    packed = np.bitwise_or.reduce(words, axis=-1).astype(np.uint32)
    scales = round_to(rng.uniform(0.002, 0.05, size=(n, k // group)) * rng.choice([-1, 1], (n, k // group)), dtype)
    biases = round_to(rng.normal(0.0, 0.2, size=(n, k // group)), dtype)
    return packed, scales, biases, q


def reference(x, scales, biases, q, group: int):
    """(y, bound): x @ W^T in float64 with W = q * scale + bias exactly, and the
    sum over k of |q * scale| |x| + |bias| |x| (what float32 sums are relative to)."""
    s = np.repeat(scales, group, axis=1)
    b = np.repeat(biases, group, axis=1)
    w = q * s + b
    return x @ w.T, np.abs(x) @ (np.abs(q * s) + np.abs(b)).T


def on(name: str):
    """Ops inside run on device `name` ("cpu" | "gpu")."""
    return device.on_stream(device.new_stream(name))


def as_mx(a: np.ndarray, dtype: str) -> mx.Array:
    return mx.array(np.asarray(a, np.float32)).astype(getattr(mx, dtype))


def check(rows: int, n: int, k: int, group: int, bits: int, dtype: str, seed: int, version: int | None = None,
          launch=None) -> None:
    rng = np.random.default_rng(seed)
    packed, scales, biases, q = packed_layer(rng, n, k, group, bits, dtype)
    x = round_to(rng.normal(0.0, 1.0, size=(rows, k)), dtype)
    want, mag = reference(x, scales, biases, q, group)
    args = (as_mx(x, dtype), mx.array(packed), as_mx(scales, dtype), as_mx(biases, dtype))
    assert qg.supports(*args, group, bits)
    y = qg.quantized_gemv(*args, group, bits, version, launch)
    assert y.shape == (rows, n) and y.dtype is getattr(mx, dtype)
    got = y.astype(mx.float32).numpy().astype(np.float64)
    err = np.abs(got - want)
    bound = ROUND[dtype] * np.abs(want) + 1e-5 * mag
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (f"v{version or qg.VERSION} launch={launch} rows={rows} n={n} k={k} g={group} bits={bits} {dtype}: at {worst} got "
                                  f"{got[worst]} want {want[worst]} (bound {bound[worst]})")


# -- everywhere --------------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
def test_the_references_packing_is_mlxs(bits, group):
    """The layout the reference writes is the one MLX's dequantize reads."""
    rng = np.random.default_rng(bits + group)
    packed, scales, biases, q = packed_layer(rng, 5, 256, group, bits, "float32")
    with on("cpu"):
        got = ops.dequantize(mx.array(packed), as_mx(scales, "float32"), as_mx(biases, "float32"), group, bits)
        got = got.numpy().astype(np.float64)
    want = q * np.repeat(scales, group, axis=1) + np.repeat(biases, group, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_supports_refuses_what_the_kernel_does_not_take():
    rng = np.random.default_rng(0)
    packed, scales, biases, _ = packed_layer(rng, 8, 256, 64, 4, "bfloat16")
    w, s, b = mx.array(packed), as_mx(scales, "bfloat16"), as_mx(biases, "bfloat16")

    def x_of(rows, dtype="bfloat16", k=256):
        return as_mx(np.zeros((rows, k)), dtype)

    assert qg.supports(x_of(1), w, s, b, 64, 4)
    assert qg.supports(x_of(8), w, s, b, 64, 4)
    assert not qg.supports(x_of(9), w, s, b, 64, 4)  # prefill: MLX's tiled kernel
    assert not qg.supports(as_mx(np.zeros((1, 1, 256)), "bfloat16"), w, s, b, 64, 4)  # 3-D
    assert not qg.supports(x_of(1, "float32"), w, s, b, 64, 4)  # x and scales differ in dtype
    assert not qg.supports(x_of(1), w, s, b, 64, 3)  # 3 bits
    assert not qg.supports(x_of(1), w, s, b, 16, 4)  # groups of 16
    assert not qg.supports(x_of(1, k=128), w, s, b, 64, 4)  # x does not match the weight
    packed2, scales2, biases2, _ = packed_layer(rng, 8, 96, 32, 4, "bfloat16")  # three 16-byte chunks a row
    assert qg.supports(x_of(1, k=96), mx.array(packed2), as_mx(scales2, "bfloat16"), as_mx(biases2, "bfloat16"),
                           32, 4)


@given(rows=st.integers(1, 8), n=st.integers(1, 200_000), k=st.sampled_from([256, 1024, 4096, 12288, 25600]),
       bits=st.sampled_from([4, 8]), version=st.sampled_from([1, 2]), rule=st.sampled_from(qg.LAUNCH_RULES),
       itemsize=st.sampled_from([2, 4]))
@settings(max_examples=300, deadline=None)
def test_launch_shape_covers_every_output(rows, n, k, bits, version, rule, itemsize):
    grid, group = qg.launch_shape(rows, n, k, bits, version, rule, itemsize)
    assert grid[0] % group[0] == 0 and grid[1] == group[1] and grid[2] == group[2] == 1
    warps = group[0] * group[1] // 32
    assert warps in (2, 4, 8) and group[0] % 32 == 0 and group[1] in (1, 2, 4, 8)
    assert warps <= qg.WARPS  # the partial sums' shared memory holds 8 warps' worth
    blocks = grid[0] // group[0]
    per_block = group[0] // 32 * qg.columns_per_warp(rows)
    assert blocks * per_block >= n > (blocks - 1) * per_block
    assert k * bits // 128 >= 32 * group[1] or group[1] == 1  # every lane of a split has a chunk
    if rule == "balanced":  # never predicted slower than the measured launch
        wave = qg.launch_shape(rows, n, k, bits, version, "wave", itemsize)[1]
        shape = (warps, group[1])
        assert qg.estimate(rows, n, k, bits, *shape, itemsize, version) <= qg.estimate(
            rows, n, k, bits, wave[0] * wave[1] // 32, wave[1], itemsize, version)


def test_wave_launch_is_the_measured_one():
    """The default launch at Qwen3-8B's shapes is the one benchmarks/README.md measured: blocks
    of 8 warps, K split in two for o and down at 1-2 rows (their warps then still fit at once)."""
    for rows in (1, 2, 4):
        for n, k in [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (151936, 4096)]:
            split = 2 if n == 4096 and rows <= 2 else 1
            want = (-(-n // (4 * 8 // split)) * 32 * 8 // split, split, 1), (32 * 8 // split, split, 1)
            for version in (1, 2):
                assert qg.launch_shape(rows, n, k, 4, version, "wave") == want


def test_balanced_launch_spreads_qkv_over_the_sms():
    """The balanced launch (not yet measured) moves Qwen3-8B's q/k/v (192 blocks of 8 warps: 60
    SMs with two, 72 with one) to blocks of 4 warps (384: three on most SMs) and leaves the other
    projections as measured."""
    for version in (1, 2):
        for rows in (1, 2, 4):
            grid, group = qg.launch_shape(rows, 6144, 4096, 4, version, "balanced")
            blocks = grid[0] // group[0]
            assert group == (128, 1, 1) and blocks == 384
            assert -(-blocks // qg.SMS) / (blocks / qg.SMS) < 1.05
            for n, k in [(4096, 4096), (24576, 4096), (4096, 12288), (151936, 4096)]:
                assert qg.launch_shape(rows, n, k, 4, version, "balanced") == qg.launch_shape(rows, n, k, 4, version,
                                                                                              "wave")


def test_launch_shape_takes_a_given_shape_and_refuses_a_bad_one():
    assert qg.launch_shape(1, 100, 4096, 4, shape=(2, 2)) == ((25 * 32, 2, 1), (32, 2, 1))
    assert qg.launch_shape(3, 100, 4096, 4, shape=(4, 1)) == ((7 * 128, 1, 1), (128, 1, 1))
    for rule in qg.LAUNCH_RULES:  # a given shape stands whatever the rule
        assert qg.launch_shape(1, 6144, 4096, 4, rule=rule, shape=(2, 2)) == ((1536 * 32, 2, 1), (32, 2, 1))
    for bad in [(16, 1), (4, 8), (8, 3), (1, 1)]:
        with pytest.raises(ValueError):
            qg.launch_shape(1, 100, 4096, 4, shape=bad)
    with pytest.raises(ValueError):
        qg.launch_shape(1, 100, 4096, 4, rule="even")


def test_quantized_dense_takes_mlxs_path_on_the_cpu(monkeypatch):
    """On the CPU the dispatch never picks the CUDA kernel (whatever the shape)."""
    calls = []
    monkeypatch.setattr(qg, "quantized_gemv", lambda *a: calls.append(a))
    # the CPU's exact float kernels (its int8 path rounds x: tests/test_cpu_int8_kernels.py)
    monkeypatch.setattr(cpu_matmul, "INT8", False)
    rng = np.random.default_rng(1)
    packed, scales, biases, q = packed_layer(rng, 24, 128, 64, 4, "float32")
    layer = nn.QuantizedLinear(mx.array(packed), as_mx(scales, "float32"), as_mx(biases, "float32"), 64, 4)
    x = rng.normal(size=(2, 128))
    with on("cpu"):
        assert not qg.applies(as_mx(x, "float32"), layer.weight, layer.scales, layer.biases, 64, 4)
        got = layer(as_mx(x, "float32")).numpy()
    assert not calls
    want, _ = reference(x, scales, biases, q, 64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# -- on the GPU --------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
def test_kernel_equals_float64_reference(rows, bits, group, dtype):
    check(rows, 301, 512, group, bits, dtype, seed=rows * 100 + bits + group)


@cuda
@pytest.mark.parametrize("dtype,bits,group", [("bfloat16", 4, 64), ("float16", 8, 32), ("float32", 4, 128)])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_other_version_equals_float64_reference(rows, bits, group, dtype):
    """The version that is not the default (AMLX_QGEMV picks it) against the reference too."""
    check(rows, 301, 512, group, bits, dtype, seed=rows * 100 + bits + group, version=3 - qg.VERSION)


@cuda
@pytest.mark.parametrize("rows,n,k", [(1, 6144, 4096), (1, 4096, 12288), (4, 4096, 12288), (8, 24576, 4096),
                                      (1, 1, 4096), (2, 7, 128), (1, 151936, 256)])
def test_kernel_at_model_shapes(rows, n, k):
    """Real projection shapes (Qwen3-8B's q/k/v, down, gate/up), a wide head, and
    shapes where a block holds fewer columns than it computes."""
    check(rows, n, k, 64, 4, "bfloat16", seed=n + k)


@cuda
@pytest.mark.parametrize("rows,n,k", [(2, 5376, 21504), (4, 5376, 21504), (4, 8192, 5376), (2, 5376, 4096),
                                      (3, 21504, 5376)])
def test_kernel_at_gemma3_27b_shapes(rows, n, k):
    """Gemma-3-27B's projections at the few rows a 64-stream batch passes through as its rows
    end (down, fused q/k/v, o, half of gate/up): K = 5,376 and 21,504, where its 64-stream run
    once failed with an illegal memory access (benchmarks/README.md, 2026-12-03)."""
    check(rows, n, k, 64, 4, "bfloat16", seed=n + k + rows)


@cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_with_an_odd_number_of_chunks(bits):
    """K = 96 in groups of 32: three (4 bits) or six (8 bits) 16-byte chunks a row
    (lanes without a chunk; version 2 reads a clamped chunk and weighs it by 0)."""
    for version in (2, 1):
        for rows in (1, 3, 8):
            check(rows, 45, 96, 32, bits, "bfloat16", seed=rows, version=version)


@cuda
@given(rows=st.integers(1, 8), n=st.integers(1, 700), chunks=st.integers(1, 80), bits=st.sampled_from([4, 8]),
       group=st.sampled_from([32, 64, 128]), dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
       seed=st.integers(0, 2 ** 16), launch=st.sampled_from([None, "balanced", (2, 1), (4, 2), (8, 4)]))
@settings(max_examples=60, deadline=None)
def test_kernel_over_shapes(rows, n, chunks, bits, group, dtype, seed, launch):
    k = chunks * 128  # a multiple of every group size
    check(rows, n, k, group, bits, dtype, seed, launch=launch)


@cuda
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("launch", [(2, 1), (2, 2), (4, 1), (4, 4), (8, 8), "balanced"])
def test_kernel_in_every_block_shape(launch, version):
    """Blocks of 2, 4 and 8 warps with K split over 1-8 of them (partial sums met in shared
    memory), and the balanced rule (Qwen3-8B's q/k/v shape at 1 and 3 rows: blocks of 4 warps),
    against the reference; a split larger than the chunks leaves lanes without any (K = 1024 at
    4 bits: 32 chunks a row). Only the launch differs from the other tests: no new variants."""
    for rows, n, k, bits in [(1, 301, 4096, 8), (3, 77, 1024, 4), (1, 6144, 4096, 4), (3, 6144, 4096, 4)]:
        if not isinstance(launch, str) and n == 6144:
            continue
        check(rows, n, k, 64, bits, "bfloat16", seed=rows + n + bits, version=version, launch=launch)


@cuda
def test_kernel_reads_row_views_of_a_fused_weight():
    """The layers of a fused projection hold row slices (views) of its arrays."""
    rng = np.random.default_rng(3)
    packed, scales, biases, q = packed_layer(rng, 96, 512, 64, 4, "bfloat16")
    x = round_to(rng.normal(size=(2, 512)), "bfloat16")
    w, s, b = mx.array(packed), as_mx(scales, "bfloat16"), as_mx(biases, "bfloat16")
    view = [ops.slice(a, (40, 0), (96, a.shape[1])) for a in (w, s, b)]
    got = qg.quantized_gemv(as_mx(x, "bfloat16"), *view, 64, 4).astype(mx.float32).numpy()
    want, mag = reference(x, scales[40:], biases[40:], q[40:], 64)
    assert np.all(np.abs(got - want) <= ROUND["bfloat16"] * np.abs(want) + 1e-5 * mag)


@cuda
@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("rows,bits", [(1, 4), (3, 8)])
def test_kernel_reads_an_x_that_is_not_16_byte_aligned(rows, bits, version):
    """x a view one element into a flat array (row-contiguous, so MLX passes it as
    is): the kernels' element-by-element path."""
    rng = np.random.default_rng(5)
    k = 256
    packed, scales, biases, q = packed_layer(rng, 37, k, 32, bits, "bfloat16")
    flat = round_to(rng.normal(size=rows * k + 1), "bfloat16")
    x = ops.reshape(ops.slice(as_mx(flat, "bfloat16"), (1,), (rows * k + 1,)), (rows, k))
    got = qg.quantized_gemv(x, mx.array(packed), as_mx(scales, "bfloat16"), as_mx(biases, "bfloat16"), 32, bits,
                            version).astype(mx.float32).numpy()
    want, mag = reference(flat[1:].reshape(rows, k), scales, biases, q, 32)
    assert np.all(np.abs(got - want) <= ROUND["bfloat16"] * np.abs(want) + 1e-5 * mag)


@cuda
def test_kernel_inside_a_compiled_function():
    rng = np.random.default_rng(4)
    packed, scales, biases, q = packed_layer(rng, 257, 1024, 64, 4, "bfloat16")
    layer = nn.QuantizedLinear(mx.array(packed), as_mx(scales, "bfloat16"), as_mx(biases, "bfloat16"), 64, 4)
    step = mx.transforms.compile(lambda x: layer(x) * 2.0)
    x = round_to(rng.normal(size=(1, 1024)), "bfloat16")
    with on("gpu"):
        assert qg.applies(as_mx(x, "bfloat16"), layer.weight, layer.scales, layer.biases, 64, 4)
        first = step(as_mx(x, "bfloat16")).astype(mx.float32).numpy()
        again = step(as_mx(x, "bfloat16")).astype(mx.float32).numpy()
    want, mag = reference(x, scales, biases, q, 64)
    assert np.all(np.abs(first / 2 - want) <= ROUND["bfloat16"] * np.abs(want) + 1e-5 * mag)
    np.testing.assert_array_equal(first, again)


@cuda
@pytest.mark.parametrize("rows", [2, 5, 16])
@pytest.mark.parametrize("k,group,bits,dtype", [(64, 64, 4, "float32"), (128, 128, 8, "bfloat16")])
def test_layers_whose_k_is_one_group_multiply_right(rows, k, group, bits, dtype):
    """A quantized layer whose K is at most its group size, past the kernel's rows: MLX
    0.32.4's product for it is wrong on an H100/H200 (its sm90 kernel), so
    `nn.quantized_dense` dequantizes and multiplies instead (`mlx_product_is_wrong`)."""
    rng = np.random.default_rng(rows)
    packed, scales, biases, q = packed_layer(rng, 128, k, group, bits, dtype)
    layer = nn.QuantizedLinear(mx.array(packed), as_mx(scales, dtype), as_mx(biases, dtype), group, bits)
    x = round_to(rng.normal(size=(rows, k)), dtype)
    with on("gpu"):
        assert qg.mlx_product_is_wrong(as_mx(x, dtype), k, group)
        got = layer(as_mx(x, dtype)).astype(mx.float32).numpy()
    want, mag = reference(x, scales, biases, q, group)
    # (weights dequantized to the dtype, float32 possibly through TF32: 2^-9 of the magnitude;
    # MLX's own product was off by 10-25% of it)
    assert np.all(np.abs(got - want) <= 2 * ROUND[dtype] * np.abs(want) + 2.0 ** -9 * mag)


@pytest.fixture(scope="module")
def quantized_qwen3(tmp_path_factory):
    """bits -> a Qwen3 checkpoint converted to `bits` (float32 activations)."""
    from amlx.convert import convert

    root = tmp_path_factory.mktemp("qgemv-models")
    src = make_checkpoint(root / "src", "qwen3", hidden_size=128, intermediate_size=256)
    return {bits: convert(src, root / f"q{bits}", quantize=bits, group_size=64, progress=False) for bits in (4, 8)}


def _step_logits(model, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Last-position logits after a prefill of `prefill` tokens, then after each
    further token fed alone."""
    cache = model.make_cache()
    out = []
    try:
        with mx.array(ids[:, :prefill]) as x, model(x, cache, 0) as y:
            out.append(y.numpy()[0, -1])
        for i in range(prefill, ids.shape[1]):
            with mx.array(ids[:, i:i + 1]) as x, model(x, cache, i) as y:
                out.append(y.numpy()[0, -1])
    finally:
        for c in cache:
            c.close()
    return np.stack(out)


@cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_logits_with_and_without_the_kernel(bits, quantized_qwen3, monkeypatch):
    """A converted Qwen3 decodes to the same logits through the kernel as through
    MLX's one-row quantized matmul, token by token (float32 sums in another
    order); a 5-token prefill through the kernel (5 rows) gives the logits of
    those tokens fed one by one (attention over 5 query rows may round float32
    through TF32 in MLX, hence the wider bound). MLX's multi-row kernel is left
    out: it would compile for 20 s or more per variant."""
    model = load_model(quantized_qwen3[bits]).model
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)
    try:
        monkeypatch.setattr(qg, "ENABLED", False)
        plain = _step_logits(model, ids, 1)
        monkeypatch.setattr(qg, "ENABLED", True)
        kernel = _step_logits(model, ids, 1)
        prefilled = _step_logits(model, ids, 5)
    finally:
        model.close()
    top = np.max(np.abs(plain))
    assert np.max(np.abs(kernel - plain)) <= 1e-4 * top
    assert np.max(np.abs(prefilled - plain[4:])) <= 1e-2 * top


@cuda
def test_engine_decodes_greedily_through_the_kernel(quantized_qwen3, monkeypatch):
    """The engine's compiled decode step with the kernel gives the greedy tokens of
    the model stepped by hand through MLX's one-row quantized matmul (a one-token
    prompt: every product has one row on both sides, so nothing but the kernel
    and summation order differs)."""
    import amlx

    monkeypatch.setenv("AMLX_WARMUP", "0")  # MLX's multi-row variants are not needed here
    path = quantized_qwen3[4]
    prompt = [17]
    monkeypatch.setattr(qg, "ENABLED", False)
    model = load_model(path).model
    want: list[int] = []
    try:
        cache = model.make_cache()
        ids = list(prompt)
        for i in range(len(prompt) + 11):
            with mx.array(np.array([[ids[i]]], np.int32)) as x, model(x, cache, i) as y:
                if i >= len(prompt) - 1:
                    ids.append(int(np.argmax(y.numpy()[0, -1])))
        want = ids[len(prompt):len(prompt) + 12]
        for c in cache:
            c.close()
    finally:
        model.close()
    monkeypatch.setattr(qg, "ENABLED", True)
    engine_model = amlx.load_sync(path, device="gpu")
    try:
        got = engine_model.complete_sync(prompt, max_tokens=12, temperature=0.0).token_ids
    finally:
        engine_model.close()
    assert got and got == want[:len(got)]  # (shorter only where the model drew its end-of-sequence token)

