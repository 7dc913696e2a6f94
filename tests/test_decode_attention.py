"""The CUDA decode-attention kernel against the masked attention it replaces.

Runs where MLX has its CUDA backend (the lent GPU machine); on other machines
these tests are skipped, because the kernel cannot run there and attention
takes the mask path that every other test covers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx._mlx import fast, ops
from amlx.models import decode_attention as da

pytestmark = pytest.mark.skipif(not fast.cuda_available(), reason="needs MLX's CUDA backend")

TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def reference(q, k, v, pos, scale, window) -> np.ndarray:
    """Masked softmax attention in float64 numpy, from the arrays' own values."""
    q, k, v = (a.astype(mx.float32).numpy().astype(np.float64) for a in (q, k, v))
    b, heads, _, dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros((b, heads, 1, dim))
    for i in range(b):
        lo = max(0, pos[i] - window + 1) if window else 0
        for h in range(heads):
            keys, vals = k[i, h // group, lo:pos[i] + 1], v[i, h // group, lo:pos[i] + 1]
            s = keys @ q[i, h, 0] * scale
            w = np.exp(s - s.max())
            out[i, h, 0] = w @ vals / w.sum()
    return out


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 5), kv=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2, 4]),
       dim=st.sampled_from([64, 128, 256]), cap=st.sampled_from([256, 512, 1024]),
       window=st.sampled_from([None, 1, 7, 100, 512]), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       seed=st.integers(0, 2 ** 16))
def test_kernel_equals_masked_attention(b, kv, group, dim, cap, window, dtype, seed):
    rng = np.random.default_rng(seed)
    heads = kv * group
    dt = getattr(mx, dtype)
    q = mx.array(rng.standard_normal((b, heads, 1, dim)).astype(np.float32)).astype(dt)
    k = mx.array(rng.standard_normal((b, kv, cap, dim)).astype(np.float32)).astype(dt)
    v = mx.array(rng.standard_normal((b, kv, cap, dim)).astype(np.float32)).astype(dt)
    pos_np = rng.integers(0, cap, size=b).astype(np.int32)
    pos_np[0] = cap - 1  # the last slot is reachable
    scale = dim ** -0.5
    with mx.array(pos_np) as pos:
        got = da.decode_attention(q, k, v, pos, scale, window)
        assert got.shape == (b, heads * dim) and got.dtype is dt
        want = reference(q, k, v, pos_np, scale, window)
        np.testing.assert_allclose(got.astype(mx.float32).numpy(), want.reshape(b, heads * dim), rtol=TOL[dtype],
                                   atol=TOL[dtype])


def test_kernel_inside_a_compiled_function():
    rng = np.random.default_rng(0)
    q = mx.array(rng.standard_normal((2, 4, 1, 128)).astype(np.float32))
    k = mx.array(rng.standard_normal((2, 2, 256, 128)).astype(np.float32))
    pos = mx.array(np.array([5, 255], np.int32))
    step = mx.transforms.compile(lambda q, k, p: da.decode_attention(q, k, k, p, 0.1, None))
    got = step(q, k, pos).numpy()
    want = reference(q, k, k, np.array([5, 255]), 0.1, None).reshape(2, 4 * 128)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    nodes, kinds = ops.graph_summary(step(q, k, pos))
    assert kinds == {"CustomKernel": 1} or nodes <= 2
