"""`TextAssembler`: stop strings are never emitted, also where the text only becomes final at
the stream's end (EOS or max_tokens): what the stop-string check held back, and an incomplete
last character, which decodes to U+FFFD once nothing can complete it."""

from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amlx.engine.assembler import TextAssembler
from amlx.tokenizer import Tokenizer
from amlx.types import GenerationOptions
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.tokenizers import write_tokenizer


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


def _pieces(tok: Tokenizer, ids: list[int], stop: list[str], max_tokens: int,
            eos: frozenset[int] = frozenset()) -> tuple[list[str], str | None]:
    """The texts an assembler emits for `ids` (until it finishes) and its finish reason."""
    asm = TextAssembler(tok, GenerationOptions.from_kwargs(max_tokens=max_tokens, stop=stop), eos)
    out, reason = [], None
    for i in ids:
        t = asm.push(i)
        out.append(t.text)
        reason = t.finish_reason
        if asm.finished:
            break
    return out, reason


def _run(tok: Tokenizer, ids: list[int], stop: list[str], max_tokens: int = 16) -> tuple[str, str | None]:
    pieces, reason = _pieces(tok, ids, stop, max_tokens, frozenset(tok.eos_token_ids))
    return "".join(pieces), reason


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


def _full_text(tok: Tokenizer, ids: list[int]) -> str:
    """The whole text of `ids`: an assembler without stop strings, ended at the last id."""
    return "".join(_pieces(tok, ids, [], len(ids))[0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stop_strings_cut_where_the_first_one_completes(tokenizer, data):
    """Any ids, stop strings taken from their text (or not in it): the joined output is the text
    up to the start of the stop string whose first occurrence ends first (the longer one at equal
    ends), whichever id completed it, no emitted piece holds a stop string, and the stream ends
    "stop" exactly when one was found."""
    special = set(tokenizer.eos_token_ids)
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1).filter(lambda i: i not in special),
                             min_size=1, max_size=16))
    full = _full_text(tokenizer, ids)
    stops = data.draw(st.lists(st.one_of(
        st.builds(lambda a, n: full[a:a + n], st.integers(0, max(0, len(full) - 1)), st.integers(1, 6)),
        st.text(min_size=1, max_size=3)).filter(bool), min_size=1, max_size=3))
    found = [(full.find(s) + len(s), full.find(s)) for s in stops if full.find(s) >= 0]
    want = full[:min(found)[1]] if found else full
    pieces, reason = _pieces(tokenizer, ids, stops, len(ids))
    assert "".join(pieces) == want
    assert not any(s in p for s in stops for p in pieces)
    assert reason == ("stop" if found else "length")


@pytest.mark.parametrize("end", ["max_tokens", "complete"])
def test_the_last_id_cuts_at_the_earliest_stop_it_completes(tokenizer, end):
    """The last id (max_tokens, or a constraint that is complete) makes final both the text it
    decodes to and what the detokenizer held (an incomplete character, U+FFFD now): stop strings
    completed only by the held part count. The check used to run on the id's text alone, which
    holds neither stop here; of two stops ending together, the cut is before the longer."""
    head = _ids_ending_mid_character(tokenizer)
    ids = [*head, head[-1]]  # "λ", a lone first byte (final as U+FFFD once the next one comes), another
    assert tokenizer.decode(ids) == "λ\ufffd\ufffd"
    stop = ["\ufffd\ufffd", "λ\ufffd\ufffd"]
    asm = TextAssembler(tokenizer, GenerationOptions.from_kwargs(max_tokens=len(ids) + (end == "complete"),
                                                                 stop=stop), frozenset())
    tokens = [asm.push(i, complete=(end == "complete" and n == len(ids) - 1)) for n, i in enumerate(ids)]
    assert asm.finished and tokens[-1].finish_reason == "stop"
    assert "".join(t.text for t in tokens) == ""


@pytest.fixture(scope="module", params=["bpe", "spm"])
def any_tokenizer(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"asm_{request.param}")
    write_tokenizer(path, request.param)
    return Tokenizer.from_dir(path)


def _reference(tok: Tokenizer, ids: list[int], stop: list[str], max_tokens: int) -> tuple[str, str]:
    """What the stream must come to, by plain string search: after each id, the text that is
    final (all of it once the id ends the stream: EOS, whose own text is none, or max_tokens);
    the first time it holds a stop string, it ends before the one that ends first in it (the
    longer one at equal ends)."""
    detok, final = tok.detokenizer(), ""
    for n, i in enumerate(ids, 1):
        last = i in tok.eos_token_ids or n >= max_tokens
        if i not in tok.eos_token_ids:
            final += detok.add(i)
        if last:
            final += detok.finalize()
        found = [(final.find(s) + len(s), final.find(s)) for s in stop if s in final]
        if found:
            return final[:min(found)[1]], "stop"
        if last:
            return final, "stop" if i in tok.eos_token_ids else "length"
    raise AssertionError("the ids must end the stream")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streams_match_a_plain_reference(any_tokenizer, data):
    """Random ids (lone bytes that split characters, byte-fallback pieces, special tokens),
    ended by EOS or max_tokens; stop strings cut from the text (across token and character
    boundaries), special tokens' texts, U+FFFD, and prefixes of one another."""
    tok = any_tokenizer
    byte_ids = [i for i in (tok.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None]
    byte_ids += [i for i in (tok.token_to_id(chr(c)) for c in range(0x100, 0x144)) if i is not None]  # (ByteLevel)
    specials = sorted(tok.special_token_ids)
    pool = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(byte_ids), st.sampled_from(specials))
    ids = data.draw(st.lists(pool, min_size=1, max_size=20))
    if data.draw(st.booleans()):
        ids.append(sorted(tok.eos_token_ids)[0])
        max_tokens = data.draw(st.integers(len(ids), len(ids) + 4))
    else:
        max_tokens = data.draw(st.integers(1, len(ids)))
    full = tok.decode(ids)
    stop = data.draw(st.lists(st.one_of(
        st.builds(lambda a, n: full[a:a + n], st.integers(0, max(0, len(full) - 1)), st.integers(1, 8)),
        st.sampled_from([tok.decode([i]) for i in specials] + ["\ufffd"]),
        st.text(min_size=1, max_size=3)).filter(bool), min_size=1, max_size=3))
    stop += [s[:len(s) // 2] for s in stop if len(s) > 1][:1]
    pieces, reason = _pieces(tok, ids, stop, max_tokens, frozenset(tok.eos_token_ids))
    assert ("".join(pieces), reason) == _reference(tok, ids, stop, max_tokens)
    assert not any(s in p for s in stop for p in pieces)


@pytest.mark.parametrize("stop", [["all", "l"], ["l", "all"], ["ll", "all"]])
def test_the_cut_does_not_depend_on_how_the_text_is_split_into_tokens(tokenizer, stop):
    """Overlapping stop strings completed by one token cut where a character-by-character
    reading cuts: before the one that ends first ("l" inside "all"), the longer at equal ends.
    The stop that started first ("all") used to win when one id completed both."""
    text = "a ball rolls"
    spelled = [i for c in text for i in tokenizer.encode(c, add_special_tokens=False)]
    whole = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(spelled) == tokenizer.decode(whole) == text
    assert any(len(tokenizer.decode([i])) > 1 for i in whole)  # (some token holds several characters)
    want = "a ba" if "l" in stop else "a b"
    assert _run(tokenizer, spelled, stop) == (want, "stop")
    assert _run(tokenizer, whole, stop) == (want, "stop")
