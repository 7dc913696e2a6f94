"""Load-time checks of speculative decoding (amlx.speculative.draft): the options, and a
draft model that must share its target's tokenizer (small checkpoints from tests/helpers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from amlx.errors import ModelLoadError
from amlx.speculative.draft import (MAX_DRAFT_TOKENS, DraftSpec, DraftTokenizerError, check_draft_checkpoint)

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # run from inside tests/
    from helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("draft")
    target = make_checkpoint(root / "target", "qwen3", seed=0)
    out = {
        "target": target,
        "draft": make_checkpoint(root / "draft", "qwen3", seed=1, num_hidden_layers=1),
        "llama_draft": make_checkpoint(root / "llama_draft", "llama", seed=2, tokenizer="bpe"),
        "spm_draft": make_checkpoint(root / "spm_draft", "qwen3", seed=3, tokenizer="spm"),
    }
    renamed = root / "renamed"
    shutil.copytree(target, renamed)
    tok = json.loads((renamed / "tokenizer.json").read_text())
    think = next(t for t in tok["added_tokens"] if t["content"] == "<think>")
    think["content"] = "<reason>"
    (renamed / "tokenizer.json").write_text(json.dumps(tok))
    out["renamed"], out["think_id"] = renamed, think["id"]
    other_eos = root / "other_eos"
    shutil.copytree(target, other_eos)
    cfg = json.loads((other_eos / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|endoftext|>"
    (other_eos / "tokenizer_config.json").write_text(json.dumps(cfg))
    out["other_eos"] = other_eos
    return out


def test_a_draft_with_the_same_tokenizer_is_accepted(ckpts):
    check_draft_checkpoint(ckpts["target"], ckpts["draft"])  # another size, same tokenizer
    check_draft_checkpoint(ckpts["target"], ckpts["llama_draft"])  # another architecture, same tokenizer
    check_draft_checkpoint(ckpts["target"], ckpts["target"])


def test_a_draft_with_another_vocabulary_is_refused_naming_both_paths(ckpts):
    with pytest.raises(DraftTokenizerError) as info:
        check_draft_checkpoint(ckpts["target"], ckpts["spm_draft"])
    message = str(info.value)
    assert str(ckpts["target"]) in message and str(ckpts["spm_draft"]) in message
    assert "token id 0 is" in message  # the first difference, by id
    assert isinstance(info.value, ValueError) and isinstance(info.value, ModelLoadError)


def test_one_renamed_added_token_is_found(ckpts):
    with pytest.raises(ValueError, match=f"token id {ckpts['think_id']} is '<think>' in the target, "
                                         f"'<reason>' in the draft"):
        check_draft_checkpoint(ckpts["target"], ckpts["renamed"])


def test_another_eos_token_is_refused(ckpts):
    with pytest.raises(ValueError, match="eos_token_id is .* in the target, .* in the draft"):
        check_draft_checkpoint(ckpts["target"], ckpts["other_eos"])


def test_a_draft_without_a_tokenizer_is_a_load_error(ckpts, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        check_draft_checkpoint(ckpts["target"], empty)


def test_options():
    assert DraftSpec.from_options(None) is None
    assert DraftSpec.from_options("prompt_lookup") == DraftSpec("prompt_lookup", None, 4)
    spec = DraftSpec.from_options(Path("/models/small"), 7)
    assert spec == DraftSpec("model", Path("/models/small"), 7)
    for bad in (0, MAX_DRAFT_TOKENS + 1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="num_draft_tokens"):
            DraftSpec.from_options("prompt_lookup", bad)
    for bad_draft in ("", 3):
        with pytest.raises(ValueError, match="draft must be"):
            DraftSpec.from_options(bad_draft)
