"""A prompt's pass on the CPU through amlx's own kernels (vendor/mlxc/cpu_attention.cpp, the gated
activation of cpu_step.cpp): the attention kernel against float64 numpy, each query's result
independent of the rest of its pass, and whole models' prefill through the kernels against the
plain ops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx._mlx import cpu_kernels as ck
from amlx._mlx import ops
from amlx.errors import MLXError
from amlx.models import load_model

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.cpu_kernels import as_f64, restore_kernel_settings  # noqa: F401 (an autouse fixture)
except ImportError:  # run from inside tests/
    from helpers.checkpoints import make_checkpoint
    from helpers.cpu_kernels import as_f64, restore_kernel_settings  # noqa: F401

pytestmark = pytest.mark.skipif(mx.device.default_device() != "cpu", reason="the CPU's kernels")


def reference(q, k, v, scale, start, window):
    """float64 attention of q (B, H, L, D) at positions start.. against k, v (B, KVH, end, D)."""
    b, h, length, d = q.shape
    kvh, end = k.shape[1], k.shape[2]
    rep = h // kvh
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("bhld,bhkd->bhlk", q * scale, k)
    qpos = start + np.arange(length)[:, None]
    kpos = np.arange(end)[None, :]
    seen = kpos <= qpos
    if window:
        seen &= kpos > qpos - window
    s = np.where(seen, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhlk,bhkd->blhd", w, v)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), kvh=st.sampled_from([1, 2]), rep=st.sampled_from([1, 2, 4]),
       length=st.integers(1, 80), start=st.integers(0, 90), d=st.sampled_from([32, 64, 128, 256]),
       window=st.sampled_from([None, 1, 7, 33, 100]), dtype=st.sampled_from(["float32", "bfloat16"]),
       threads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_prefill_attention_matches_numpy(b, kvh, rep, length, start, d, window, dtype, threads, seed) -> None:
    ck.set_threads(threads)
    rng = np.random.default_rng(seed)
    end = start + length
    dt = getattr(mx, dtype)
    q, k, v = (ops.astype(mx.array(rng.standard_normal(shape).astype(np.float32)), dt)
               for shape in ((b, kvh * rep, length, d), (b, kvh, end, d), (b, kvh, end, d)))
    scale = d ** -0.5
    got = ck.prefill_attention(q, k, v, scale, window)
    assert got.shape == (b, length, kvh * rep, d) and got.dtype == dt
    want = reference(as_f64(q), as_f64(k), as_f64(v), scale, start, window)
    # float32 sums (and, for bf16, the output's rounding: 2^-9 of a value)
    tol = 2e-5 if dtype == "float32" else 2.0 ** -8
    assert np.all(np.abs(as_f64(got) - want) <= tol * (np.abs(want) + np.abs(as_f64(v)).max()))


@settings(max_examples=15, deadline=None)
@given(length=st.integers(2, 70), cut=st.integers(1, 69), window=st.sampled_from([None, 5, 40]),
       seed=st.integers(0, 2**16))
def test_a_query_does_not_depend_on_the_rest_of_its_pass(length, cut, window, seed) -> None:
    # a prompt prefilled whole, or in two chunks (the second behind the first, as behind a
    # cached prefix), or beside another row: each query's output bit for bit the same
    cut = min(cut, length - 1)
    rng = np.random.default_rng(seed)
    q, k, v = (mx.array(rng.standard_normal(shape).astype(np.float32)) for shape in
               ((1, 4, length, 64), (1, 2, length, 64), (1, 2, length, 64)))
    whole = np.asarray(ck.prefill_attention(q, k, v, 0.125, window))
    first = ck.prefill_attention(ops.slice(q, (0, 0, 0, 0), (1, 4, cut, 64)), ops.slice(k, (0, 0, 0, 0), (1, 2, cut, 64)),
                                 ops.slice(v, (0, 0, 0, 0), (1, 2, cut, 64)), 0.125, window)
    second = ck.prefill_attention(ops.slice(q, (0, 0, cut, 0), (1, 4, length, 64)), k, v, 0.125, window)
    assert np.array_equal(np.asarray(first), whole[:, :cut])
    assert np.array_equal(np.asarray(second), whole[:, cut:])
    other = mx.array(rng.standard_normal((1, 4, length, 64)).astype(np.float32))
    pair = ck.prefill_attention(ops.concatenate([other, q], axis=0), ops.concatenate([k, k], axis=0),
                                ops.concatenate([v, v], axis=0), 0.125, window)
    assert np.array_equal(np.asarray(pair)[1:], whole)


def test_bad_shapes_are_refused() -> None:
    q = mx.array(np.zeros((1, 3, 4, 32), np.float32))
    k = mx.array(np.zeros((1, 2, 4, 32), np.float32))
    with pytest.raises(MLXError, match="KVH dividing H"):
        ck.prefill_attention(q, k, k, 1.0)
    with pytest.raises(MLXError, match="end >= L"):
        ck.prefill_attention(mx.array(np.zeros((1, 2, 5, 32), np.float32)), k, k, 1.0)
    with pytest.raises(MLXError, match="head dim"):
        big = mx.array(np.zeros((1, 2, 4, 512), np.float32))
        ck.prefill_attention(big, big, big, 1.0)


ARCHS = ["qwen3", "gemma3_text", "llama"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for arch in ARCHS:
        out[arch] = load_model(make_checkpoint(tmp_path_factory.mktemp(arch), arch, tokenizer=False)).model
    yield out
    for m in out.values():
        m.close()


def prefill(model, prompts: np.ndarray, chunks: list[int]) -> tuple[np.ndarray, list[str]]:
    """Logits of `prompts` prefilled into a fresh cache in chunks of these lengths, and the
    last chunk's graph's primitives."""
    cache = model.make_cache()
    try:
        start = 0
        for n in chunks:
            with mx.array(prompts[:, start:start + n]) as x:
                y = model(x, cache, start)
                kinds = ops.graph_summary(y)[1]
                out = y.numpy()
                y.close()
            start += n
        return out, kinds
    finally:
        for c in cache:
            c.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_models_prefill_through_the_kernels_as_through_the_plain_ops(arch, models) -> None:
    # Gemma's windowed layers included (its test checkpoint's window is shorter than the prompt)
    model = models[arch]
    rng = np.random.default_rng(3)
    prompts = rng.integers(0, 256, size=(2, 40)).astype(np.int32)
    runs = {}
    for on in (True, False):
        model.use_decode_kernel(on)  # the engine's choice, made here by hand
        runs[on] = prefill(model, prompts, [40])
        runs[on, "chunks"] = prefill(model, prompts, [25, 15])
    assert "CpuPrefillAttention" in runs[True][1] and "CpuGatedActivation" in runs[True][1]
    assert "CpuPrefillAttention" not in runs[False][1] and "CpuGatedActivation" not in runs[False][1]
    for key in (True, (True, "chunks")):
        got, want = runs[key][0], runs[False][0] if key is True else runs[False, "chunks"][0]
        assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    # the last 15 positions' logits, prefilled whole or behind the first 25
    assert np.max(np.abs(runs[True, "chunks"][0] - runs[True][0][:, 25:])) <= 1e-4 * np.max(np.abs(runs[True][0]))


def test_a_pass_without_a_cache_keeps_the_plain_ops(models) -> None:
    # training's forward (no cache) needs gradients, which the kernels have none of
    model = models["qwen3"]
    model.use_decode_kernel(True)
    with mx.array(np.zeros((1, 8), np.int32)) as x, model(x) as y:
        kinds = ops.graph_summary(y)[1]
    assert "CpuPrefillAttention" not in kinds and "CpuGatedActivation" not in kinds
