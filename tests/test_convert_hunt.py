"""`amlx.convert` and `amlx.train.fuse` probed with hostile destinations: what cannot be
written is refused up front with a ValueError naming the cause, and nothing is left behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import amlx
from amlx.models import load_model
from amlx.train import lora

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.decoding import prefill_logits
    from tests.helpers.hub import COMMIT, hub_cache
    from tests.test_train_lora import on_worker
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from helpers.decoding import prefill_logits
    from helpers.hub import COMMIT, hub_cache
    from test_train_lora import on_worker


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def adapter(qwen, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter")
    loaded = on_worker(lambda: load_model(qwen, progress=False))
    on_worker(lambda: lora.apply_lora(loaded.model, rank=2, targets=["q_proj"]))
    on_worker(lambda: lora.save_adapter(loaded.model, d))
    on_worker(loaded.model.close)
    return d


def _convert(qwen, adapter, dst):
    return amlx.convert(qwen, dst, progress=False)


def _fuse(qwen, adapter, dst):
    return lora.fuse(qwen, adapter, dst, progress=False)


@pytest.mark.parametrize("write", [_convert, _fuse], ids=["convert", "fuse"])
@pytest.mark.parametrize("below", [False, True], ids=["the-link", "below-the-link"])
def test_a_dangling_link_in_the_destination_is_refused_up_front(qwen, adapter, tmp_path, write, below):
    """A destination that is (or lies below) a link to a missing directory passed the checks:
    convert and fuse read and wrote the whole checkpoint, then the rename onto the link was a raw
    NotADirectoryError (a FileExistsError from mkdir, below it), the work lost."""
    link = tmp_path / "out"
    os.symlink(tmp_path / "missing", link)
    dst = link / "sub" if below else link
    with pytest.raises(ValueError, match=f"{link} is a link to {tmp_path / 'missing'}, which does not exist"):
        write(qwen, adapter, dst)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging directory left behind


def test_fuse_below_a_file_is_refused_up_front(qwen, adapter, tmp_path):
    """fuse lacked convert's check: a destination below a file was a raw FileExistsError, raised
    only after the model was loaded and the adapter fused."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"{tmp_path / 'file'} exists and is not a directory"):
        lora.fuse(qwen, adapter, tmp_path / "file" / "out", progress=False)


@pytest.mark.parametrize("write", [_convert, _fuse], ids=["convert", "fuse"])
def test_the_working_directory_as_the_destination(qwen, adapter, tmp_path, monkeypatch, write):
    """dst "." (an empty working directory) was staged inside itself, and once everything was
    written rmdir(".") failed: a raw "OSError: [Errno 22] Invalid argument: '.'"."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    assert write(qwen, adapter, ".") == Path(".")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging directory left behind
    np.testing.assert_array_equal(prefill_logits(out, [5, 17, 42]),
                                  prefill_logits(write(qwen, adapter, tmp_path / "plain"), [5, 17, 42]))


def test_paths_whose_bytes_are_not_utf8_convert_load_and_fuse(qwen, adapter, tmp_path):
    """A directory name that is not UTF-8 (Latin-1 "café", legal on Linux) was a raw
    UnicodeEncodeError from every safetensors read and write: amlx.load, convert, adapters, fuse."""
    odd = tmp_path / os.fsdecode(b"caf\xe9")
    shutil.copytree(qwen, odd / "src")
    shutil.copytree(adapter, odd / "adapter")
    out = amlx.convert(odd / "src", odd / "out", progress=False)
    fused = lora.fuse(out, odd / "adapter", odd / "fused", progress=False)
    plain = lora.fuse(qwen, adapter, tmp_path / "plain", progress=False)
    ids = [5, 17, 42, 99, 3]
    np.testing.assert_array_equal(prefill_logits(fused, ids), prefill_logits(plain, ids))


# -- the Hugging Face cache ------------------------------------------------------------------------


def _incomplete_cache(tmp_path):
    """A Hugging Face cache holding acme/tiny as an interrupted download leaves it: the revision's
    file listing (huggingface_hub 2.x's trees/<commit>.json) names config.json and the weights,
    and only config.json reached the snapshot."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    cache, repo = hub_cache(tmp_path)
    write_tree_cache(str(repo), COMMIT, {"config.json": TreeCacheEntry(2, "a" * 40),
                                          "model.safetensors": TreeCacheEntry(8, "b" * 40, "c" * 64, 8)})
    return cache


@pytest.mark.parametrize("offline", [False, True], ids=["download-off", "HF_HUB_OFFLINE"])
def test_an_incomplete_cached_snapshot_is_named_as_such(tmp_path, monkeypatch, offline):
    """The error said the model was "not found in the local Hugging Face cache" when it is there
    but incomplete, sending the user to look for a model that is in the cache."""
    from huggingface_hub import constants

    from amlx.hub import resolve_model

    cache = _incomplete_cache(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    with pytest.raises(amlx.ModelLoadError) as info:
        resolve_model("acme/tiny", cache_dir=cache, download=offline)
    assert str(info.value) == (
        f"'acme/tiny' is not a local directory, and its snapshot in the local Hugging Face cache at {cache} is "
        f"incomplete (1 file(s) are missing (model.safetensors): an interrupted download?)"
        + (", and downloading failed: HF_HUB_OFFLINE is set" if offline else " (downloading is off)"))
