"""`save_adapter` replaces an adapter's weights and config as a pair: a save that fails
part way (a full disk, a crash between its writes) leaves the previous adapter loading
as it was, or the new one whole; never new weights read with the old config."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from amlx.models import load_model
from amlx.train import lora

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.test_train_lora import on_worker
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from test_train_lora import on_worker


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture
def model(qwen):
    loaded = on_worker(lambda: load_model(qwen, progress=False))
    yield loaded.model
    on_worker(loaded.model.close)


def _adapt(model, alpha: float, seed: int) -> dict:
    """Gives `model` a fresh adapter; returns what identifies it (each layer's lora_a and scale)."""
    def job():
        lora.remove_lora(model)
        lora.apply_lora(model, rank=2, alpha=alpha, targets=["q_proj", "v_proj"], seed=seed)
    on_worker(job)
    return _adapter_of(model)


def _adapter_of(model) -> dict:
    return on_worker(lambda: {p: (m.lora_a.numpy(), m.scale) for p, m in lora.lora_modules(model).items()})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[p][0], b[p][0]) and a[p][1] == b[p][1] for p in a)


def _fail_at(monkeypatch, where: str) -> None:
    """Makes the next save fail at `where` with a full disk."""
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "weights":
        monkeypatch.setattr(lora.io, "save_safetensors", full)
    elif where == "config":
        monkeypatch.setattr(Path, "write_text", full)
    else:  # the n-th rename
        calls, real = [], os.replace

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == int(where[-1]):
                full()
            real(src, dst)
        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("where", ["weights", "config", "rename 1", "rename 2"])
def test_a_save_that_fails_part_way_never_leaves_a_mixed_pair(model, tmp_path, monkeypatch, where):
    """The weights and the config were renamed into place one after the other: a failure
    between them left the new weights beside the old config, which loaded silently wrong
    (the new matrices with the old scale)."""
    d = tmp_path / "adapter"
    old = _adapt(model, alpha=4.0, seed=0)
    on_worker(lambda: lora.save_adapter(model, d))
    new = _adapt(model, alpha=16.0, seed=1)
    assert not _same(old, new)
    with monkeypatch.context() as m:
        _fail_at(m, where)
        with pytest.raises(OSError, match="No space left"):
            on_worker(lambda: lora.save_adapter(model, d))
    on_worker(lambda: lora.load_adapter(model, d))
    loaded = _adapter_of(model)
    assert _same(loaded, old) or _same(loaded, new)
    assert sorted(os.listdir(d)) == [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]  # no temporary file left


def test_a_first_save_that_fails_between_its_renames_loads_whole(model, tmp_path, monkeypatch):
    """Into a new directory: the weights in place, the config not yet: the adapter they were saved with."""
    d = tmp_path / "adapter"
    new = _adapt(model, alpha=16.0, seed=1)
    with monkeypatch.context() as m:
        _fail_at(m, "rename 2")
        with pytest.raises(OSError, match="No space left"):
            on_worker(lambda: lora.save_adapter(model, d))
    assert sorted(os.listdir(d)) == [lora.ADAPTER_WEIGHTS]
    _adapt(model, alpha=4.0, seed=0)
    on_worker(lambda: lora.load_adapter(model, d))
    assert _same(_adapter_of(model), new)


def test_an_edited_config_is_still_read(model, tmp_path):
    """The pair check does not override a config changed by hand after the save (a layer's scale)."""
    d = tmp_path / "adapter"
    saved = _adapt(model, alpha=4.0, seed=0)
    on_worker(lambda: lora.save_adapter(model, d))
    config = json.loads((d / lora.ADAPTER_CONFIG).read_text())
    path = next(iter(config["modules"]))
    config["modules"][path]["scale"] = 0.5
    (d / lora.ADAPTER_CONFIG).write_text(json.dumps(config))
    on_worker(lambda: lora.load_adapter(model, d))
    loaded = _adapter_of(model)
    assert loaded[path][1] == 0.5 and np.array_equal(loaded[path][0], saved[path][0])
