"""Writing a checkpoint into the working directory: a full fine-tune's save_path="."
(each save replaces the checkpoint) and `amlx.convert(src, ".")` leave the working
directory in place holding the checkpoint; a save_path holding the working directory
is refused before training."""

from __future__ import annotations

import os

import pytest

import amlx

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint

DATA = [{"prompt": "The secret word is", "completion": " banana split"}]
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


async def test_full_training_saves_into_the_working_directory(qwen, tmp_path, monkeypatch):
    """save_path="." trained, then renaming "." aside was a raw OSError (EBUSY), leaving a
    "..xxx.old" directory behind."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    async with await amlx.load(qwen) as model:
        events = [ev async for ev in model.train(DATA, iters=2, batch_size=1, save_every=1, save_path=".")]
        assert [(ev.kind, ev.step, ev.path) for ev in events if ev.kind != "step"] == [
            ("save", 1, "."), ("save", 2, "."), ("done", 2, ".")]  # the second save replaced the first
        trained = (await model.complete("The secret word is", max_tokens=4, logprobs=True)).logprobs
    assert os.getcwd() == str(out)  # still there: not a deleted directory
    assert sorted(os.listdir(".")) == FILES  # no staging or old directory left, inside or beside
    assert sorted(os.listdir(tmp_path)) == ["out"]
    async with await amlx.load(".") as again:
        assert (await again.complete("The secret word is", max_tokens=4, logprobs=True)).logprobs == trained


async def test_a_save_path_holding_the_working_directory_is_refused_up_front(qwen, tmp_path, monkeypatch):
    """Replacing a checkpoint directory that holds the working directory deleted it."""
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    (previous / "notes").mkdir()
    monkeypatch.chdir(previous / "notes")
    async with await amlx.load(qwen) as model:
        with pytest.raises(ValueError, match=r"^save_path \.\. holds the working directory .*name a directory of "
                                             r"its own$"):
            model.train(DATA, iters=1, batch_size=1, save_path="..")
    assert sorted(os.listdir(previous)) == ["config.json", "notes"]


async def test_a_working_directory_that_is_no_checkpoint_is_refused_up_front(qwen, tmp_path, monkeypatch):
    """A project directory with a config.json passed for a checkpoint: save_path="." would have
    replaced everything in it."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("{}")
    (project / "train.py").write_text("# mine")
    monkeypatch.chdir(project)
    async with await amlx.load(qwen) as model:
        with pytest.raises(ValueError, match=r"^save_path \. exists and is neither empty nor a checkpoint directory"):
            model.train(DATA, iters=1, batch_size=1, save_path=".")
    assert sorted(os.listdir(project)) == ["config.json", "train.py"]


def test_convert_into_the_working_directory_keeps_it(qwen, tmp_path, monkeypatch):
    """convert(src, ".") wrote the checkpoint in place of the working directory: this process (and
    the shell of `amlx convert src .`) was left in a deleted directory that listed empty."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    amlx.convert(qwen, ".", progress=False)
    assert os.getcwd() == str(out)
    assert sorted(os.listdir(".")) == sorted(FILES + ["model.safetensors.index.json"])
    assert sorted(os.listdir(tmp_path)) == ["out"]
