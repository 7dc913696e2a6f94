"""Quantized products with K split over more blocks (amlx.models.qmm_split, AMLX_QMM_SPLIT).

Everywhere: the rule that picks the split, both ways of splitting against a float64
reference (MLX's CPU quantized matmul computes them here, float32), when the split applies,
the `copy` mode's derived arrays, and `nn.quantized_dense` taking the split where it applies.
On the GPU (skipped elsewhere): both ways at Qwen3-8B's shapes in bf16 and fp16, and an
engine over a quantized bf16 model scoring and decoding alike with each way and without."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx._mlx import fast
from amlx.models import cpu_matmul, dense_rows, nn
from amlx.models import qmm_split as qs

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.kv_reference import round_to
    from tests.test_quantized_gemv import ROUND, as_mx, on, packed_layer, reference
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from helpers.kv_reference import round_to
    from test_quantized_gemv import ROUND, as_mx, on, packed_layer, reference

cuda = pytest.mark.skipif(not fast.cuda_available(), reason="needs MLX's CUDA backend")


def _layer(rng, n: int, k: int, group: int, bits: int, dtype: str):
    packed, scales, biases, q = packed_layer(rng, n, k, group, bits, dtype)
    layer = nn.QuantizedLinear(mx.array(packed), as_mx(scales, dtype), as_mx(biases, dtype), group, bits)
    return layer, scales, biases, q


def _check(layer, x: np.ndarray, scales, biases, q, group: int, dtype: str, mode: str, device: str) -> None:
    """`product` against float64: each of the s partial outputs is rounded to the dtype once
    and the result once more, and on CUDA MLX's kernel rounds each dequantized weight to the
    dtype (up to two roundings: q * scale, then + bias) before its products (hence `mag`, the
    sum of the terms' sizes, twice in the bound; a wrong slice is off by the values themselves)."""
    with on(device):
        y = qs.product(as_mx(x, dtype), layer, mode)
        got = y.astype(mx.float32).numpy().astype(np.float64)
    assert y.shape == (x.shape[0], layer.weight.shape[0]) and y.dtype is getattr(mx, dtype)
    want, mag = reference(x, scales, biases, q, group)
    bound = ROUND[dtype] * np.abs(want) + (2 * ROUND[dtype] + 1e-5) * mag
    assert np.all(np.abs(got - want) <= bound), f"{mode}: worst {np.max(np.abs(got - want) - bound)} over"


def test_splits_at_qwen3_8b_shapes():
    """The fewest splits giving 90% of 132 SMs' worth of MLX's 128-column blocks: q/k/v
    (48 blocks), o and down (32) four ways, gate/up (192) and the head not at all;
    `interleave` at most two ways; nothing where n is no multiple of 128 or K does not divide."""
    assert [qs.splits(n, k, 64, "copy") for n, k in [(6144, 4096), (4096, 4096), (4096, 12288),
                                                      (24576, 4096), (151936, 4096)]] == [4, 4, 4, 1, 1]
    assert qs.splits(4096, 4096, 64, "interleave") == 2
    assert qs.splits(4096, 4096, 64, "off") == 1
    assert qs.splits(4000, 4096, 64, "copy") == 1  # (MLX's kernel takes n % 128 == 0 only)
    assert qs.splits(4096, 192, 64, "copy") == 1  # (halves of 96 values: not a multiple of 64)
    assert qs.splits(4096, 768, 128, "copy") == 2  # (quarters of 192 values: not whole groups of 128)
    assert qs.splits(128, 1 << 14, 64, "copy") == 8  # (at most eight)
    # slices of two K tiles / groups at least: a one-group slice goes to MLX's sm90 kernel on
    # an H100/H200 (K <= group size there), a one-tile slice prefetches past K in sm80's
    assert qs.splits(512, 256, 64, "copy") == 2 and qs.splits(256, 512, 64, "copy") == 4
    assert qs.splits(256, 256, 128, "copy") == 1 and qs.splits(256, 128, 64, "interleave") == 1


@given(mode=st.sampled_from(["copy", "interleave"]), rows=st.integers(8, 40), n=st.sampled_from([128, 256, 384]),
       k=st.sampled_from([512, 1024]), bits=st.sampled_from([4, 8]), group=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2 ** 16))
@settings(max_examples=40, deadline=None)
def test_split_products_equal_float64_reference(mode, rows, n, k, bits, group, seed):
    rng = np.random.default_rng(seed)
    layer, scales, biases, q = _layer(rng, n, k, group, bits, "float32")
    assert qs.splits(n, k, group, mode) > 1
    x = rng.normal(0.0, 1.0, size=(rows, k))
    _check(layer, x, scales, biases, q, group, "float32", mode, "cpu")


@pytest.mark.parametrize("mode", ["copy", "interleave"])
def test_a_decode_steps_three_axes(mode):
    """x (rows, 1, k), as a decode step passes it: (rows, 1, n), the product of each row."""
    rng = np.random.default_rng(6)
    layer, scales, biases, q = _layer(rng, 256, 512, 64, 4, "float32")
    x = rng.normal(size=(9, 1, 512))
    with on("cpu"):
        y = qs.product(as_mx(x, "float32"), layer, mode)
        got = y.numpy()
    assert y.shape == (9, 1, 256)
    want, mag = reference(x[:, 0], scales, biases, q, 64)
    assert np.all(np.abs(got[:, 0] - want) <= 1e-5 * (np.abs(want) + mag))


def test_applies_only_where_asked_and_where_it_splits(monkeypatch):
    """Off by default; with a mode on, only inside an engine's pass with its kernels on, on
    CUDA, for 16-bit x of MIN_ROWS rows or more and a weight that splits."""
    rng = np.random.default_rng(2)
    narrow, *_ = _layer(rng, 256, 512, 64, 4, "bfloat16")
    wide, *_ = _layer(rng, 128 * 132, 512, 64, 4, "bfloat16")
    x = as_mx(rng.normal(size=(8, 512)), "bfloat16")
    with dense_rows.within(True):
        assert qs.MODE == "off" and not qs.applies(x, narrow)
        monkeypatch.setattr(qs, "MODE", "copy")
        assert not qs.applies(x, narrow)  # (no split copy yet, on CUDA too: `prepare` makes it)
        monkeypatch.setattr(qs, "_on_cuda", lambda: True)
        assert not qs.applies(x, narrow)
        narrow.prepare()
        assert qs.applies(x, narrow)
        assert not qs.applies(as_mx(rng.normal(size=(7, 512)), "bfloat16"), narrow)
        assert not qs.applies(as_mx(rng.normal(size=(8, 512)), "float32"), narrow)
        assert qs.applies(as_mx(rng.normal(size=(8, 1, 512)), "bfloat16"), narrow)  # (a decode step's x)
        assert qs.applies(as_mx(rng.normal(size=(64, 512)), "bfloat16"), narrow)
        assert qs.blocks(64, 256) == 2 and qs.blocks(8, 256) == 2 and qs.blocks(65, 256) == 4
        long_prompt = as_mx(rng.normal(size=(64 * 60, 512)), "bfloat16")  # (120 blocks unsplit)
        assert not qs.applies(long_prompt, narrow)
        monkeypatch.setattr(qs, "MODE", "interleave")  # (no copy needed)
        fresh, *_ = _layer(rng, 256, 512, 64, 4, "bfloat16")
        assert qs.applies(x, fresh)
        assert not qs.applies(x, wide)
    assert not qs.applies(x, narrow)  # (a training pass, or no engine)


def test_copy_mode_derives_the_split_layout_once(monkeypatch):
    """`copy` keeps the split weight, scales and biases as the layer's derived arrays, made
    once (what `prepare` evaluates) and freed with the others; no other mode has any."""
    rng = np.random.default_rng(3)
    layer, *_ = _layer(rng, 256, 1024, 64, 4, "bfloat16")
    monkeypatch.setattr(qs, "_on_cuda", lambda: True)
    monkeypatch.setattr(qs, "MODE", "interleave")
    assert layer.derived_arrays() == []
    monkeypatch.setattr(qs, "MODE", "copy")
    s = qs.splits(256, 1024, 64, "copy")
    first = layer.derived_arrays()
    assert [a.shape for a in first] == [(s, 256, 128 // s), (s, 256, 16 // s), (s, 256, 16 // s)]
    assert all(a is b for a, b in zip(first, layer.derived_arrays()))
    w = np.asarray(layer.weight.numpy())
    np.testing.assert_array_equal(first[0].numpy(), w.reshape(256, s, 128 // s).transpose(1, 0, 2))
    layer.release_derived()
    assert "_memo" not in layer.__dict__
    # layers joined into a fused one (q/k/v, gate/up) keep no copy of their own: the fused one has it
    a, b = (_layer(rng, 256, 1024, 64, 4, "bfloat16")[0] for _ in range(2))
    fused = nn.fuse_outputs([a, b])
    assert a.derived_arrays() == [] and b.derived_arrays() == []
    assert [x.shape for x in fused.derived_arrays()] == [(s, 512, 128 // s), (s, 512, 16 // s), (s, 512, 16 // s)]


def test_quantized_dense_takes_the_split_where_it_applies(monkeypatch):
    """`nn.quantized_dense` hands a product to `qmm_split.product` where `applies` says so
    (the CPU's own kernels stood aside), and the result is the product."""
    calls = []
    real = qs.product
    monkeypatch.setattr(qs, "product", lambda x, layer: calls.append(x.shape) or real(x, layer, "copy"))
    monkeypatch.setattr(qs, "applies", lambda x, layer: x.shape[0] >= qs.MIN_ROWS)
    monkeypatch.setattr(cpu_matmul, "few_rows", lambda x, layer: None)
    monkeypatch.setattr(cpu_matmul, "dequantize_first", lambda x, layer: False)
    rng = np.random.default_rng(4)
    layer, scales, biases, q = _layer(rng, 256, 512, 64, 4, "float32")
    x = rng.normal(size=(8, 512))
    with on("cpu"):
        got = layer(as_mx(x, "float32")).numpy()
        layer(as_mx(x[:4], "float32"))
    assert calls == [(8, 512)]
    want, mag = reference(x, scales, biases, q, 64)
    assert np.all(np.abs(got - want) <= 1e-5 * (np.abs(want) + mag))


def test_a_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv("AMLX_QMM_SPLIT", "sometimes")
    with pytest.raises(ValueError, match="AMLX_QMM_SPLIT"):
        qs._mode()
    monkeypatch.setenv("AMLX_QMM_SPLIT", " Copy ")
    assert qs._mode() == "copy"


# -- on the GPU --------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("mode", ["copy", "interleave"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows,n,k", [(8, 6144, 4096), (64, 4096, 12288), (64, 4096, 4096), (33, 256, 1024)])
def test_split_products_on_cuda(mode, dtype, rows, n, k):
    """Both ways through MLX's CUDA kernel (batched for `copy`) at Qwen3-8B's narrow shapes."""
    rng = np.random.default_rng(rows + n + k)
    layer, scales, biases, q = _layer(rng, n, k, 64, 4, dtype)
    assert qs.splits(n, k, 64, mode) > 1
    x = round_to(rng.normal(0.0, 1.0, size=(rows, k)), dtype)
    _check(layer, x, scales, biases, q, 64, dtype, mode, "gpu")


@pytest.fixture(scope="module")
def bf16_qwen3_4bit(tmp_path_factory):
    """A Qwen3 in bf16 converted to 4 bits, every projection's n a multiple of 128."""
    from amlx.convert import convert

    root = tmp_path_factory.mktemp("qmm-split-model")
    src = make_checkpoint(root / "src", "qwen3", dtype="bfloat16", hidden_size=256, intermediate_size=512,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return convert(src, root / "q4", quantize=4, group_size=64, progress=False)


@cuda
def test_an_engine_scores_and_decodes_alike_with_each_split(bf16_qwen3_4bit, monkeypatch):
    """Through a loaded engine on CUDA (compiled passes): `score` (prompt passes of 8-40 rows)
    gives each way of splitting the log-probabilities it gives without, within bf16 partial
    sums' rounding; eight greedy requests decoded together (8-row steps) start alike."""
    import asyncio

    import anyio

    import amlx

    monkeypatch.setenv("AMLX_WARMUP", "0")
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 200, size=int(rng.integers(8, 40))).tolist() for _ in range(8)]
    continuations = [rng.integers(0, 200, size=6).tolist() for _ in range(3)]
    scores, firsts, used = {}, {}, []
    real = qs.product
    monkeypatch.setattr(qs, "product", lambda x, layer, mode=None: used.append(qs.MODE) or real(x, layer, mode))

    async def body():
        async with await amlx.load(bf16_qwen3_4bit, device="gpu") as model:
            s = [await model.score(p, continuations) for p in prompts[:2]]
            outs = await asyncio.gather(*(model.complete(p, max_tokens=4, temperature=0.0) for p in prompts))
            return s, [o.token_ids[0] for o in outs]

    for mode in ("off", "copy", "interleave"):
        monkeypatch.setattr(qs, "MODE", mode)
        scores[mode], firsts[mode] = anyio.run(body)
    assert "off" not in used and {"copy", "interleave"} <= set(used)
    for mode in ("copy", "interleave"):
        np.testing.assert_allclose(scores[mode], scores["off"], rtol=2e-2, atol=2e-2)
        assert firsts[mode] == firsts["off"], mode
