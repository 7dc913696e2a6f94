"""`TextAssembler`: stop strings are never emitted, also where the text only becomes final at
the stream's end (EOS or max_tokens): what the stop-string check held back, and an incomplete
last character, which decodes to U+FFFD once nothing can complete it."""

from __future__ import annotations

import pytest

from amlx.engine.assembler import TextAssembler
from amlx.tokenizer import Tokenizer
from amlx.types import GenerationOptions
from tests.helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_dir(make_checkpoint(tmp_path_factory.mktemp("asm"), "qwen3"))


def _ids_ending_mid_character(tok: Tokenizer) -> list[int]:
    """Ids of "λ" and then of the first byte alone of a multi-byte character that the
    vocabulary spells byte by byte (byte-level BPE): the text ends mid-character."""
    head = tok.encode("λ", add_special_tokens=False)
    assert tok.decode(head) == "λ"
    for char in "☃鑫𝄞ꙮ𓀀":
        tail = tok.encode(char, add_special_tokens=False)
        if len(tail) > 1 and tok.decode(tail[:1]) == "\ufffd":
            return [*head, tail[0]]
    raise AssertionError("no character the test vocabulary spells in bytes")


def _run(tok: Tokenizer, ids: list[int], stop: list[str], max_tokens: int = 16) -> tuple[str, str | None]:
    eos = frozenset(tok.eos_token_ids)
    asm = TextAssembler(tok, GenerationOptions.from_kwargs(max_tokens=max_tokens, stop=stop), eos)
    out, reason = [], None
    for i in ids:
        t = asm.push(i)
        out.append(t.text)
        reason = t.finish_reason
        if asm.finished:
            break
    return "".join(out), reason


@pytest.mark.parametrize("stop", [["\ufffd"], ["λ\ufffd"], ["zz", "\ufffd"]])
@pytest.mark.parametrize("end", ["eos", "max_tokens"])
def test_a_stop_string_completed_by_the_last_characters_is_not_emitted(tokenizer, stop, end):
    ids = _ids_ending_mid_character(tokenizer)
    if end == "eos":
        ids = [*ids, sorted(tokenizer.eos_token_ids)[0]]
    text, reason = _run(tokenizer, ids, stop, max_tokens=len(ids))
    assert reason == "stop"
    assert not any(s in text for s in stop)
    assert text == ("" if stop == ["λ\ufffd"] else "λ")


@pytest.mark.parametrize("end", ["eos", "max_tokens"])
def test_without_a_matching_stop_the_incomplete_character_ends_the_text(tokenizer, end):
    ids = _ids_ending_mid_character(tokenizer)
    if end == "eos":
        ids = [*ids, sorted(tokenizer.eos_token_ids)[0]]
    text, reason = _run(tokenizer, ids, ["zz"], max_tokens=len(ids))
    assert text == "λ\ufffd" and reason == ("stop" if end == "eos" else "length")
