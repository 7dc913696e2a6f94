"""The public Model API's load options, checked before anything heavy runs.

- max_batch_size and max_context take any integer (numbers.Integral, numpy's too), as
  kv_cache_memory and the generate options do, and the model gets plain ints.
"""

from __future__ import annotations

import numpy as np
import pytest

import amlx
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
