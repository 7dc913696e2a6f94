"""AMLX_SHARDS past what any machine uses is refused at load, naming the variable: each shard is a
stream with KV pools of its own, and a million of them hung the load (below the int32 bound that
env_int enforces)."""

from __future__ import annotations

import pytest

import amlx
from amlx.engine.placement import SHARDS_LIMIT
from amlx.demo import default_model_dir


def test_too_many_shards_are_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("AMLX_SHARDS", "1000000")
    with pytest.raises(ValueError, match=rf"AMLX_SHARDS must be at most {SHARDS_LIMIT}, not 1000000"):
        amlx.load_sync(default_model_dir())
