"""Training data: record shapes and their loss masks, batching, and clear errors
(file and line) for malformed JSON, unknown shapes, overlong records, empty files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from amlx.tokenizer import Tokenizer
from amlx.train.data import DataError, encode_record, iterate_batches, load_dataset, make_batch

try:
    from tests.helpers.tokenizers import write_tokenizer
except ImportError:  # tests/ itself on sys.path
    from helpers.tokenizers import write_tokenizer


@pytest.fixture(scope="module", params=["bpe", "spm"])
def tok(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    write_tokenizer(d, request.param)
    return Tokenizer.from_dir(d)


def _learned(tok, ex) -> str:
    return tok.decode([t for t, m in zip(ex.tokens, ex.mask) if m])


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_text_records_learn_everything_and_end_with_eos(tok):
    ex = encode_record({"text": "Hello world", "id": 7}, tok)  # extra keys are ignored
    assert tok.decode(ex.tokens, skip_special_tokens=True) == "Hello world"
    assert ex.tokens[-1] == tok.eos_token_id and ex.mask[-1]
    # a BOS the tokenizer adds is context, not a target
    if tok.bos_token_id is not None and ex.tokens[0] == tok.bos_token_id:
        assert not ex.mask[0]
    assert all(ex.mask[1:])


def test_prompt_completion_learns_only_the_completion(tok):
    ex = encode_record({"prompt": "Question: what is up? Answer:", "completion": " the sky"}, tok)
    assert _learned(tok, ex).startswith(" the sky") or _learned(tok, ex).startswith("the sky")
    assert "Question" not in _learned(tok, ex)
    assert ex.mask[-1] and ex.tokens[-1] == tok.eos_token_id


def test_chat_learns_assistant_turns_only(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "fine thanks"}]
    ex = encode_record({"messages": messages}, tok)
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.encode(full, add_special_tokens=False) == ex.tokens  # exactly what inference renders
    learned = _learned(tok, ex)
    assert "hello there" in learned and "fine thanks" in learned
    for text in ("Be brief", "hi", "again", "user"):
        assert text not in learned
    # the end-of-turn marker after each answer is learned (the model must stop)
    ends = [t for t, m in zip(ex.tokens, ex.mask) if m and tok.decode([t]) in ("<|im_end|>", "<end_of_turn>")]
    assert len(ends) == 2
    # conversational prompt/completion: the completion's messages are learned
    ex2 = encode_record({"prompt": messages[:4], "completion": messages[4:]}, tok)
    assert "fine thanks" in _learned(tok, ex2) and "hello there" not in _learned(tok, ex2)


def test_batches_pad_and_mask(tok):
    ds = load_dataset([{"text": "a b c d e f g h"}, {"prompt": "x", "completion": " y"}], tok)
    b = make_batch(ds.examples, pad_id=0, pad_multiple=8)
    assert b.inputs.shape == b.targets.shape == b.mask.shape and b.inputs.shape[1] % 8 == 0
    assert b.inputs.dtype == np.int32 and b.mask.dtype == np.float32
    for i, e in enumerate(ds.examples):
        n = len(e.tokens) - 1
        assert list(b.inputs[i, :n]) == e.tokens[:-1] and list(b.targets[i, :n]) == e.tokens[1:]
        assert list(b.mask[i, :n]) == [float(m) for m in e.mask[1:]]
        assert not b.mask[i, n:].any()
    assert b.trained == int(b.mask.sum()) and b.tokens == sum(len(e.tokens) - 1 for e in ds.examples)
    batches = iterate_batches(ds, 2, seed=1)
    assert [next(batches).inputs.shape[0] for _ in range(3)] == [2, 2, 2]
    once = list(iterate_batches(ds, 3, shuffle=False, loop=False))
    assert len(once) == 1 and once[0].inputs.shape[0] == 2
    with pytest.raises(DataError, match="cannot fill a batch of 3"):
        next(iterate_batches(ds, 3))


def test_malformed_json_names_the_line(tok, tmp_path):
    p = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), "", json.dumps({"text": "fine"}),
                                        '{"text": "broken'])
    with pytest.raises(DataError, match=r"bad\.jsonl:4: malformed JSON"):
        load_dataset(p, tok)


def test_unknown_record_shapes_name_the_line(tok, tmp_path):
    cases = [
        ({"content": "x"}, r"unknown record shape: an object with keys \[content\]"),
        (["text", "x"], r"unknown record shape: a JSON list"),
        ({"text": "x", "messages": []}, r"unknown record shape: both text and messages"),
        ({"prompt": "x"}, r"needs both keys, this one has only prompt"),
        ({"text": 5}, r"'text' must be a non-empty string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"no assistant message"),
        ({"messages": "hi"}, r"'messages' must be a non-empty list"),
    ]
    for record, pattern in cases:
        p = _write(tmp_path / "shape.jsonl", [json.dumps({"text": "good"}), json.dumps(record)])
        with pytest.raises(DataError, match=r"shape\.jsonl:2: (.*)?" + pattern):
            load_dataset(p, tok)


def test_overlong_records_name_the_line_or_truncate(tok, tmp_path):
    long_text = " ".join(["word"] * 200)
    p = _write(tmp_path / "long.jsonl", [json.dumps({"text": "short"}), json.dumps({"text": long_text})])
    with pytest.raises(DataError, match=r"long\.jsonl:2: the record has \d+ tokens, more than max_seq_len=32"):
        load_dataset(p, tok, max_seq_len=32)
    ds = load_dataset(p, tok, max_seq_len=32, truncate=True)
    assert len(ds.examples[1].tokens) == 32 and ds.examples[1].line == 2
    # truncation that leaves nothing to learn is an error too
    p2 = _write(tmp_path / "prompt.jsonl", [json.dumps({"prompt": long_text, "completion": " end"})])
    with pytest.raises(DataError, match=r"prompt\.jsonl:1: the record has no token to learn after truncation"):
        load_dataset(p2, tok, max_seq_len=32, truncate=True)


def test_empty_and_missing_files(tok, tmp_path):
    with pytest.raises(DataError, match=r"empty\.jsonl: no records \(the file is empty\)"):
        load_dataset(_write(tmp_path / "empty.jsonl", []), tok)
    with pytest.raises(DataError, match=r"blank\.jsonl: no records"):
        load_dataset(_write(tmp_path / "blank.jsonl", ["", "   "]), tok)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load_dataset(tmp_path / "missing.jsonl", tok)
    with pytest.raises(DataError, match="the dataset is empty"):
        load_dataset([], tok)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        load_dataset(tmp_path / "latin1.jsonl", tok)
    with pytest.raises(ValueError, match="max_seq_len"):
        load_dataset([{"text": "x"}], tok, max_seq_len=1)
