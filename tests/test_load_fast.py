"""The public Model API's load options, checked before anything heavy runs.

- max_batch_size and max_context take any integer (numbers.Integral, numpy's too), as
  kv_cache_memory and the generate options do, and the model gets plain ints.
- kv_bits with a head dimension its quantization groups cannot divide is refused from the
  config, before any weight is read (it was refused once the whole model had loaded).
"""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import amlx
import amlx.models
from tests.helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("load_fast") / "q", "qwen3", seed=0)


def test_numpy_integer_sizes_load_as_plain_ints(qwen3):
    """max_batch_size=np.int64(4) and max_context=np.int32(64) were refused as "must be an
    integer"; they load as 4 and 64 do, and the engine holds plain ints."""
    with amlx.load_sync(qwen3, max_batch_size=np.int64(4), max_context=np.int32(64)) as m:
        assert m.info.context_length == 64 and type(m.info.context_length) is int
        assert m.engine.max_batch_size == 4 and type(m.engine.max_batch_size) is int
        assert m.complete_sync([5, 6, 7], max_tokens=2).finish_reason == "length"


@pytest.mark.parametrize("bad, message", [
    (dict(max_batch_size=np.int64(0)), "max_batch_size must be an integer >= 1"),
    (dict(max_batch_size=True), "max_batch_size must be an integer >= 1"),
    (dict(max_batch_size=np.float64(4)), "max_batch_size must be an integer >= 1"),
    (dict(max_context=np.uint8(1)), "max_context must be an integer >= 2 or None"),
    (dict(max_context=np.bool_(True)), "max_context must be an integer >= 2 or None"),
    (dict(max_context=64.0), "max_context must be an integer >= 2 or None"),
])
def test_sizes_that_are_no_integers_or_too_small_are_refused(qwen3, bad, message):
    with pytest.raises(ValueError, match=message):
        amlx.load_sync(qwen3, **bad)


@pytest.fixture
def weight_loads(monkeypatch):
    """The checkpoints whose weights a load reads (amlx.models.build_model, spied on)."""
    loads = []
    build = amlx.models.build_model

    def spy(spec, *args, **kwargs):
        loads.append(spec.path.name)
        return build(spec, *args, **kwargs)
    monkeypatch.setattr(amlx.models, "build_model", spy)
    return loads


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_bits_head_dim_refused_before_the_weights_load(tmp_path, weight_loads, bits):
    """A head dimension of 48 (no group of 32 or 64 divides it) with kv_bits: the pool's
    ValueError, from load and load_sync, and no weight was read."""
    path = make_checkpoint(tmp_path / "hd48", "qwen3", seed=0, head_dim=48)
    message = "kv_bits needs a head dimension divisible by 32, not 48"
    with pytest.raises(ValueError, match=message):
        amlx.load_sync(path, kv_bits=bits)
    with pytest.raises(ValueError, match=message):
        anyio.run(lambda: amlx.load(path, kv_bits=np.int64(bits)))
    assert weight_loads == []
    with amlx.load_sync(path) as m:  # (without kv_bits it loads, weights read)
        assert m.complete_sync([5, 6], max_tokens=1).token_ids
    assert weight_loads == ["hd48"]


def test_kv_bits_draft_head_dim_refused_before_the_weights_load(tmp_path, weight_loads):
    """A draft model of head dimension 16 beside a target of 32 with kv_bits=8: refused naming
    the draft (as its pool words it), before the target's weights or the draft's are read."""
    target = make_checkpoint(tmp_path / "t32", "qwen3", seed=5, head_dim=32)
    draft = make_checkpoint(tmp_path / "d16", "qwen3", seed=5, head_dim=16)
    with pytest.raises(ValueError, match=rf"the draft model \(draft={draft}\): kv_bits needs a head "
                                         rf"dimension divisible by 32, not 16"):
        amlx.load_sync(target, kv_bits=8, draft=str(draft))
    assert weight_loads == []
