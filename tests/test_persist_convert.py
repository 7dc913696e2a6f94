"""`amlx.convert`'s quantize and group_size are integers: config.json records ints, and a
float or bool is refused up front with a ValueError naming the option."""

from __future__ import annotations

import json

import numpy as np
import pytest

import amlx

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.mark.parametrize("option, value", [("quantize", 4.0), ("quantize", 4.5), ("quantize", True),
                                           ("quantize", "4"), ("group_size", 64.0), ("group_size", True)])
def test_non_integer_bits_or_group_size_are_refused(qwen, tmp_path, option, value):
    """quantize=4.0 passed (4.0 in (4, 8)) and config.json said "bits": 4.0."""
    kwargs = {"quantize": 4, option: value}
    with pytest.raises(ValueError, match=rf"^{option} must be .*not {value!r}$"):
        amlx.convert(qwen, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_numpy_integers_are_written_as_ints(qwen, tmp_path):
    """np.int64 passed the checks, then json could not write it: a raw TypeError."""
    out = amlx.convert(qwen, tmp_path / "out", quantize=np.int64(4), group_size=np.int32(32), progress=False)
    config = json.loads((out / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        assert config[key] == {"group_size": 32, "bits": 4}
        assert all(type(v) is int for v in config[key].values())
