"""`kv_bits=8` / `kv_bits=4`: the KV block pool stored quantized (MLX's affine
quantization per group, dequantized when gathered). Its accuracy cost is
measured here against the full-precision pool on the same model and tokens:
the logits' error relative to their largest magnitude, over a prefill and the
decode steps after it, is printed and bounded."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import numpy as np
import pytest

import amlx
from amlx._mlx import array, ops
from amlx.kv import BlockPool, ShardKV, layer_views, written
from tests.helpers.checkpoints import make_checkpoint

PROMPT = 80
STEPS = 24
# Measured (max |logit error| / max |logit|, over 80 prefill positions and 24 decode
# steps) on this file's random models, whose logits move a lot for small changes of
# the keys and values (random weights, no training): Qwen3 8 bits 0.014, 4 bits 0.23;
# Gemma 3 (sliding window 8) 8 bits 0.11, 4 bits 0.79. The bounds leave room for
# other BLAS sum orders; the round trip itself is exact (test_quantized_pool_round_trip).
BOUNDS = {8: 0.25, 4: 1.5}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {arch: make_checkpoint(tmp_path_factory.mktemp(arch), arch, seed=3, head_dim=64)
            for arch in ("qwen3", "gemma3_text")}


def _logits(lm, bits: int | None, ids: list[int]) -> np.ndarray:
    """Logits (PROMPT + STEPS, V) of a prefill of ids[:PROMPT] and decode steps
    fed ids[PROMPT:], through a block pool (quantized with `bits`). Worker thread."""
    layout, dtype = lm.kv_layout(), lm.activation_dtype()
    pool = BlockPool(layout, dtype, 16, 64, prefix_cache=False, bits=bits)
    kv = ShardKV(pool)
    row = SimpleNamespace(blocks=pool.allocate(-(-len(ids) // 16)), pos=0, created=0.0)
    try:
        views = layer_views(pool.arrays, kv.prefill_tables([row], 0, PROMPT, [PROMPT]), lm.windows(), bits, pool.group)
        out = [lm(array(np.asarray([ids[:PROMPT]], np.int32)), views, 0)[0]]
        pool.arrays = written(views)
        for t in range(PROMPT, len(ids)):
            row.pos = t
            views = layer_views(pool.arrays, kv.decode_tables([row]), lm.windows(), bits, pool.group)
            out.append(lm(array(np.asarray([[ids[t]]], np.int32)), views, array(np.asarray([t], np.int32)))[0])
            pool.arrays = written(views)
        logits = ops.concatenate(out, axis=0)
        ops.eval(logits)
        return np.asarray(logits.numpy(), np.float64)
    finally:
        kv.close()


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_quantized_kv_logit_error_is_measured_and_bounded(ckpts, arch):
    ids = [int(x) for x in np.random.default_rng(0).integers(10, 200, PROMPT + STEPS)]
    with amlx.load_sync(ckpts[arch]) as model:
        lm = model.engine.model
        full = model.engine.run_sync(lambda: _logits(lm, None, ids))
        errors = {}
        for bits, bound in BOUNDS.items():
            got = model.engine.run_sync(lambda bits=bits: _logits(lm, bits, ids))
            err = np.abs(got - full).max() / np.abs(full).max()
            print(f"{arch} kv_bits={bits}: max logit error {err:.4f} of the largest logit")
            assert 0 < err < bound, (arch, bits, err)  # (0: it really was quantized)
            errors[bits] = err
        assert errors[4] > errors[8]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_pool_round_trip(bits):
    """What a quantized pool gives back is exactly MLX's quantize/dequantize of what
    was written, at the right positions of the right rows (decode and prefill writes)."""
    rng = np.random.default_rng(bits)
    h, d, bs = 2, 64, 4
    pool = BlockPool([(h, d)], ops.zeros((1,)).dtype, bs, 12, prefix_cache=False, bits=bits)
    kv = ShardKV(pool)
    rows = [SimpleNamespace(blocks=pool.allocate(3), pos=0, created=0.0) for _ in range(2)]
    x = rng.standard_normal((2, 2, h, 10, d)).astype(np.float32) * 3  # (k/v, row, head, position, dim)
    k, v = array(x[0]), array(x[1])
    views = layer_views(pool.arrays, kv.prefill_tables(rows, 0, 10, [10, 7]), [None], bits, pool.group)
    views[0].update_prefill(k, v, 0)
    pool.arrays = written(views)
    for r in rows:
        r.pos = 10 if r is rows[0] else 7
    new = rng.standard_normal((2, 2, h, 1, d)).astype(np.float32)
    views = layer_views(pool.arrays, kv.decode_tables(rows), [None], bits, pool.group)
    views[0].update_decode(array(new[0]), array(new[1]), array(np.asarray([10, 7], np.int32)))
    got = views[0].gathered().numpy()
    expect = x.copy()
    expect[:, 0, :, 10:11] = 0
    full = np.concatenate([expect, np.zeros_like(expect[:, :, :, :2])], axis=3)
    full[:, 0, :, 10] = new[:, 0, :, 0]
    full[:, 1, :, 7] = new[:, 1, :, 0]
    packed = ops.quantize(array(full.reshape(-1, d)), pool.group, bits)
    want = ops.dequantize(*packed, pool.group, bits).numpy().reshape(full.shape)
    np.testing.assert_array_equal(got[:, 0, :, :11], want[:, 0, :, :11])
    np.testing.assert_array_equal(got[:, 1, :, :8], want[:, 1, :, :8])
    kv.close()


def test_kv_bits_through_the_engine(ckpts):
    """Requests decode with a quantized pool (prefix cache included); a block takes
    about a quarter (8 bits) or an eighth (4 bits) of a float32 block; closing
    gives every byte back."""
    prompt = [int(x) for x in np.random.default_rng(1).integers(10, 200, 40)]
    with amlx.load_sync(ckpts["qwen3"], prefix_cache=False) as full:
        want = full.complete_sync(prompt, max_tokens=12).token_ids
        full_block = full.engine.scheduler.block_bytes()
    gc.collect()
    before = amlx.memory()["active"]
    for bits, share in ((8, 0.3), (4, 0.17)):
        with amlx.load_sync(ckpts["qwen3"], kv_bits=bits) as m:
            assert m.engine.scheduler.block_bytes() < share * full_block
            first = m.complete_sync(prompt, max_tokens=12)
            again = m.complete_sync(prompt, max_tokens=12)
            assert again.usage.cached_tokens == 32 and again.token_ids == first.token_ids
            if bits == 8:
                assert first.token_ids == want  # (a clear-margin path on this model)
        gc.collect()
        assert amlx.memory()["active"] == before  # the quantized pool went with the model


def test_kv_bits_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(ValueError, match="kv_bits"):
        amlx.load_sync(tmp_path, kv_bits=3)
    small = make_checkpoint(tmp_path / "q", "qwen3", seed=0)  # head_dim 16
    gc.collect()
    before = amlx.memory()["active"]
    with pytest.raises(ValueError, match="head dimension divisible by 32"):
        amlx.load_sync(small, kv_bits=8)
    gc.collect()
    assert amlx.memory()["active"] == before  # the weights went with the failed load
