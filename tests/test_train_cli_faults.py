"""Robustness of fine-tuning inputs and of the command line.

Bad training data (records that are not Unicode text, JSON lines Python's json
cannot take, chat records of the wrong types) is a `DataError` naming the file,
the line and the cause; bad options are a ValueError / TypeError before any
training step; a loss that turns non-finite stops the run with an error instead
of training on NaN; the command line answers bad arguments with one error line
and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx
from amlx.tokenizer import Tokenizer
from amlx.train.data import DataError, load_dataset

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = [{"text": "hello world"}, {"text": "bye now"}]
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def tok(ckpt) -> Tokenizer:
    return Tokenizer.from_dir(ckpt)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# -- data ---------------------------------------------------------------------------

_SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)
_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)


@FAST
@given(before=_TEXT, lone=_SURROGATE, after=_TEXT,
       shape=st.sampled_from(["text", "prompt", "completion", "chat"]))
def test_a_lone_surrogate_is_a_data_error_naming_the_line(tok, tmp_path, before, lone, after, shape):
    bad = before + lone + after
    record = {"text": {"text": bad}, "prompt": {"prompt": bad, "completion": " x"},
              "completion": {"prompt": "p", "completion": bad},
              "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": bad}]}}[shape]
    # json.dumps writes the lone surrogate as its \\udxxx escape, as other JSON writers do
    path = _jsonl(tmp_path / "sur.jsonl", [{"text": "fine"}, record])
    with pytest.raises(DataError, match=rf"sur\.jsonl:2: .*unpaired surrogate, U\+{ord(lone):04X}, at character "
                                        rf"{len(before)}"):
        load_dataset(path, tok)


@FAST
@given(digits=st.integers(4301, 20000), depth=st.integers(50_000, 200_000), which=st.booleans())
def test_json_that_python_cannot_read_is_a_data_error_naming_the_line(tok, tmp_path, digits, depth, which):
    # valid JSON that json.loads refuses with a ValueError / RecursionError of its own
    line = ('{"text": "x", "n": ' + "7" * digits + "}") if which else \
        ('{"text": "x", "n": ' + "[" * depth + "]" * depth + "}")
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    cause = "unreadable JSON .*digits" if which else "JSON nested too deeply"
    with pytest.raises(DataError, match=rf"odd\.jsonl:3: {cause}"):
        load_dataset(path, tok)


_NOT_A_LIST = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.text(min_size=1),
                        st.dictionaries(st.text(max_size=3), st.integers(), min_size=1))


@FAST
@given(tools=_NOT_A_LIST)
def test_tools_that_are_not_a_list_are_a_data_error_naming_the_line(tok, tmp_path, tools):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = _jsonl(tmp_path / "tools.jsonl", [{"messages": chat}, {"messages": chat, "tools": tools}])
    with pytest.raises(DataError, match=r"tools\.jsonl:2: 'tools' must be a list of tool \(function\) definitions"):
        load_dataset(path, tok)


@FAST
@given(role=st.one_of(st.none(), st.integers(), st.booleans(), st.just(""), st.lists(st.text(), max_size=2)),
       index=st.integers(0, 1))
def test_a_role_that_is_not_a_string_is_named_with_the_line(tok, tmp_path, role, index):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chat[index] = {**chat[index], "role": role}
    path = _jsonl(tmp_path / "roles.jsonl", [{"messages": chat}])
    with pytest.raises(DataError, match=rf"roles\.jsonl:1: messages\[{index}\] has role .*: a role is a non-empty "
                                        rf"string"):
        load_dataset(path, tok)
