"""A model collected while still open warns with a ResourceWarning (as httpx's
clients do) and is closed on the worker, so its memory comes back; a closed
model, or one closed through `with`, is collected without a word.
"""

from __future__ import annotations

import gc
import warnings

import pytest

import amlx
from amlx.engine.worker import Worker

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


def _collect() -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    Worker.get().run_sync(lambda: None)  # jobs run in order: a close queued by the collection has run
    return [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_an_open_model_warns_when_collected_and_is_freed(ckpt):
    with amlx.load_sync(ckpt) as warm:  # a first load leaves a few bytes in MLX's process-wide caches
        warm.complete_sync("Hello", max_tokens=3)
    del warm
    assert _collect() == []
    before = amlx.memory()["active"]
    model = amlx.load_sync(ckpt)
    assert model.complete_sync("Hello", max_tokens=3).usage.completion_tokens >= 1
    text = repr(model)
    assert amlx.memory()["active"] > before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del model
        gc.collect()
    Worker.get().run_sync(lambda: None)
    found = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert len(found) == 1 and "unclosed" in str(found[0].message) and text in str(found[0].message)
    assert amlx.memory()["active"] == before


def test_a_closed_model_is_collected_silently(ckpt):
    model = amlx.load_sync(ckpt)
    model.close()
    del model
    with amlx.load_sync(ckpt) as other:
        other.complete_sync("Hello", max_tokens=2)
    del other
    assert _collect() == []


async def test_an_async_closed_model_is_collected_silently(ckpt):
    async with await amlx.load(ckpt) as model:
        await model.complete("Hello", max_tokens=2)
    del model
    assert _collect() == []
