"""Defects found hunting in the streaming text path (the detokenizer, stop strings, the text
handed out token by token), each pinned by the test written for it; transformers decodes the
same tokenizer folders as the oracle."""

from __future__ import annotations

import copy
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx
import amlx.chat
from amlx.cli_streams import read_prompt
from amlx.engine.assembler import TextAssembler
from amlx.reply import stream_reply
from amlx.tokenizer import Tokenizer
from amlx.types import GenerationOptions

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.tokenizers import streamed_pieces, tokenizer_pairs
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from helpers.tokenizers import streamed_pieces, tokenizer_pairs

KINDS = ("bpe", "spm")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """kind -> (amlx Tokenizer, transformers tokenizer) of one folder."""
    return tokenizer_pairs(tmp_path_factory, "detok", KINDS)


def _reading(hf, ids: list[int]) -> str:
    """transformers' text of `ids` going on after other text (decoded after "a", cut off)."""
    a = hf.convert_tokens_to_ids("a")
    return hf.decode([a, *ids])[1:]


def _streamed(tok: Tokenizer, ids: list[int], skip: bool = False) -> tuple[str, int]:
    """The text a fresh detokenizer streams for `ids`, and how many ids its decodes took in all
    (the work it did)."""
    pieces, decoded = streamed_pieces(tok, ids, skip)
    return "".join(pieces), decoded


# ------------------------------------------------------------------------------ finalize, then add


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(KINDS), text=st.lists(st.sampled_from(["a", "b", " ", "😀", "é", "日", "\ufffd"]),
                                                  min_size=1, max_size=6).map("".join), data=st.data())
def test_add_after_finalize_loses_no_text(pairs, kind, text, data):
    """`finalize()` flushes what was held (a character's first bytes, an open byte run, as
    U+FFFD) and further `add()` calls go on after it. They went on decoding the flushed bytes
    with the later ones: a completed character changed text already returned, and every later
    piece came short by as many characters ("a😀b" spelled in bytes, flushed after the third
    byte of 😀, ended "a���": the "b" was lost for good)."""
    ours, hf = pairs[kind]
    ids = ours.encode(text, add_special_tokens=False)
    if kind == "spm":  # spell the text's characters byte by byte, as a model may
        a = ours.token_to_id("a")
        ids = [a if ch == "a" else ours.token_to_id(f"<0x{b:02X}>") for ch in text for b in ch.encode()]
    cut = data.draw(st.integers(0, len(ids)))
    detok = ours.detokenizer()
    before = [detok.add(i) for i in ids[:cut]] + [detok.finalize()]
    after = [detok.add(i) for i in ids[cut:]] + [detok.finalize()]
    first = "".join(before)
    assert first == hf.decode(ids[:cut])
    assert "".join(after) == (_reading(hf, ids[cut:]) if first else hf.decode(ids[cut:]))


class _CountedRun(bytearray):
    """A detokenizer's byte run that counts the bytes read from it (copied or sliced)."""

    read = 0

    def __bytes__(self):
        type(self).read += len(self)
        return bytes(memoryview(self))

    def __getitem__(self, key):
        part = bytearray.__getitem__(self, key)
        type(self).read += len(part) if isinstance(key, slice) else 1
        return part


def test_a_long_open_byte_run_costs_linear_work(pairs):
    """While the ids end in byte pieces that may still be valid UTF-8, the detokenizer holds
    them (one bad byte turns the whole run into U+FFFD). It checked that by decoding all of the
    run at every token: a reply of characters spelled in byte pieces (a script outside the
    vocabulary) cost work quadratic in its length, 0.9 s of the worker's time for 40,000. Only
    the bytes after the run's whole characters need reading."""
    ours, hf = pairs["spm"]
    # 500 characters of 4 bytes each, a byte that spoils the run, 200 more bytes, a letter
    run = "\U00010000".encode() * 500 + b"\x80" + "\U00010000".encode() * 50
    ids = [ours.token_to_id(f"<0x{b:02X}>") for b in run] + ours.encode("a", add_special_tokens=False)
    detok = ours.detokenizer()
    detok._run = _CountedRun()
    _CountedRun.read = 0
    pieces = [detok.add(i) for i in ids] + [detok.finalize()]
    assert "".join(pieces) == hf.decode(ids)
    assert _CountedRun.read <= 8 * len(ids)  # (was about len(ids) ** 2 / 2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dropped", ["skipped special", "past the vocabulary"])
def test_ids_that_decode_drops_cost_linear_work(pairs, kind, dropped):
    """Ids that decode drops before its decoder runs -- special tokens under
    skip_special_tokens, ids past the tokenizer's vocabulary (the padding rows of a model's
    embedding: a broken model may emit nothing else) -- stayed in the decode window. A long run
    of them left no text to re-anchor the window on, so each token decoded all of them: 20,000
    took 7 s of the worker's time. And under byte fallback, such an id between the byte pieces
    of a character was taken to end their run: "x€x€" streamed as "x€x\ufffd"."""
    ours, hf = pairs[kind]
    skip = dropped == "skipped special"
    gone = min(ours.special_token_ids) if skip else ours.vocab_size + 5
    euro = ours.encode("x€", add_special_tokens=False)
    ids = [*euro, *[gone] * 1000, *euro[:-1], *[gone] * 1000, euro[-1], gone]
    text, decoded = _streamed(ours, ids, skip)
    assert text == hf.decode(ids, skip_special_tokens=skip) == "x€x€"
    assert decoded <= 20 * len(ids)  # (was about len(ids) ** 2 / 2)


@pytest.mark.parametrize("after", ["A", "\n"])
def test_a_spoiled_byte_run_whose_last_bytes_read_as_text_costs_linear_work(pairs, after):
    """A run of byte pieces that one bad byte spoiled decodes to U+FFFD for every byte, also
    those after it. The window was re-anchored only on a suffix of ids spoiled on its own;
    when the run went on in bytes that read as text alone (a cut character, then newlines as
    "<0x0A>", as Llama 2 spells them), there was none, and each token decoded all the ids
    since: 8,000 took 18 s of the worker's time."""
    ours, hf = pairs["spm"]
    run = b"\xf0\x9f" + after.encode() * 1000
    ids = [ours.token_to_id(f"<0x{b:02X}>") for b in run] + ours.encode("a", add_special_tokens=False)
    text, decoded = _streamed(ours, ids)
    assert text == hf.decode(ids) == "\ufffd" * len(run) + "a"
    assert decoded <= 20 * len(ids)  # (was about len(ids) ** 2 / 2)


def _byte_level_bytes(tok: Tokenizer) -> dict[int, bytes]:
    """The bytes of each byte-level BPE piece (GPT-2's map of bytes to printable characters)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char_of = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    byte_of = {c: b for b, c in char_of.items()}
    pieces = {i: tok.id_to_token(i) for i in range(tok.vocab_size)}
    return {i: bytes(byte_of[c] for c in p) for i, p in pieces.items() if p and all(c in byte_of for c in p)}


def _utf8_after(open_bytes: int, data: bytes) -> int | None:
    """Continuation bytes still owed after `data`, when `open_bytes` were owed before it (None
    if it breaks UTF-8)."""
    for b in data:
        if open_bytes:
            if not 0x80 <= b < 0xC0:
                return None
            open_bytes -= 1
        else:
            open_bytes = 0 if b < 0x80 else 1 if 0xC2 <= b < 0xE0 else 2 if 0xE0 <= b < 0xF0 else 3 if 0xF0 <= b < 0xF5 else -1
            if open_bytes < 0:
                return None
    return open_bytes


def test_a_reply_of_tokens_that_begin_inside_characters_costs_linear_work(pairs):
    """Byte-level pieces may hold the end of one character and the start of the next. A reply
    whose every token began inside a character (valid UTF-8 all the same) gave no id suffix
    whose own text the text ended in -- its first bytes decode to U+FFFD on their own -- so the
    window was never re-anchored and each token decoded all the ids since: quadratic work."""
    ours, hf = pairs["bpe"]
    pieces = _byte_level_bytes(ours)
    inside = {owed: sorted(i for i, b in pieces.items() if _utf8_after(owed, b) not in (None, 0)) for owed in (1, 2, 3)}
    first = next(i for i, b in sorted(pieces.items()) if _utf8_after(0, b) not in (None, 0))
    ids, owed = [first], _utf8_after(0, pieces[first])
    while len(ids) < 1500:  # (each piece begins inside a character and ends inside the next)
        choices = inside[owed]
        ids.append(choices[len(ids) * 7 % len(choices)])
        owed = _utf8_after(owed, pieces[ids[-1]])
    text, decoded = _streamed(ours, ids)
    assert text == hf.decode(ids) and "\ufffd" not in text[:-1]
    assert decoded <= 20 * len(ids)  # (was about len(ids) ** 2 / 2)


# ------------------------------------------------------------------------------ stop strings


class _Counted(str):
    """A stop string that counts the prefixes taken of it (each a length the assembler tries)."""

    taken = 0

    def __getitem__(self, key):
        type(self).taken += 1
        return str.__getitem__(self, key)


def test_held_text_costs_linear_work_in_the_reply(pairs):
    """Text that may begin a stop string is held, and after each token the assembler finds the
    longest such suffix. It tried every length from each stop's own down, each token: with a
    long stop matched (its first 255 characters held) the others cost 255 tries a token, 1.4 ms
    of the worker's time per token for 16 stops of 256 characters. A stop's match grows by at
    most the new characters, so far fewer lengths need trying."""
    ours, _ = pairs["bpe"]
    a = ours.encode("a", add_special_tokens=False)
    assert ours.decode(a) == "a" and len(a) == 1
    stop = [*(_Counted("b" * 255 + chr(ord("c") + i)) for i in range(15)), _Counted("a" * 255 + "z")]
    asm = TextAssembler(ours, GenerationOptions.from_kwargs(stop=stop, max_tokens=600), frozenset())
    _Counted.taken = 0
    tokens = [asm.push(a[0]) for _ in range(600)]
    assert "".join(t.text for t in tokens) == "a" * 600 and tokens[-1].finish_reason == "length"
    assert [t.text for t in tokens[255:-1]] == ["a"] * 344  # (the 255 held, then one a token)
    assert _Counted.taken <= 4 * len(stop) * len(tokens)  # (was about 15 * 255 * len(tokens))


# ------------------------------------------------------------------------------ the terminal


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    with amlx.load_sync(make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")) as model:
        yield model


def test_chat_sends_lines_of_a_crlf_file_without_their_carriage_return(qwen3, monkeypatch, capsys):
    """`amlx chat MODEL < questions.txt` with Windows line ends: input() keeps each line's "\\r",
    and every user message reached the model ending in it (`amlx generate -` drops it); the
    first began with the file's byte order mark, U+FEFF, where a Windows tool wrote one."""
    sent = []

    def recording(model, messages, options, out=None):
        sent.append(copy.deepcopy(messages))
        return stream_reply(model, messages, options, out)

    monkeypatch.setattr(amlx.chat, "stream_reply", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeffHello\r\n  indented \r\n"))
    assert amlx.chat.run_chat(qwen3, dict(max_tokens=2)) == 0
    assert [messages[-1]["content"] for messages in sent] == ["Hello", "  indented "]


def test_a_prompt_on_stdin_loses_a_byte_order_mark(monkeypatch):
    """`amlx generate MODEL - < prompt.txt` from a Windows tool that writes a byte order mark:
    the prompt reached the model beginning with U+FEFF."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\ufeffHello\r\n".encode()), encoding="utf-8"))
    assert read_prompt("-") == "Hello"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_reply_on_a_terminal_shows_control_characters_instead_of_sending_them(qwen3):
    """`amlx generate` / `amlx chat` wrote the model's text to the terminal as it was: a reply
    repeating a hostile document's escape sequences cleared the screen, set the clipboard (OSC
    52) or hid text. On a terminal they now show as symbols; the Reply's text, and what goes to
    a file or pipe, stay as the model wrote them."""
    forced = "ok\x1b]52;c;aGk=\x07\x1b[2J\x08\x00\x7f\x9b31m\ta\r\nb"
    shown, piped = _Terminal(), io.StringIO()
    replies = [stream_reply(qwen3, "hi", dict(choice=[forced], max_tokens=64), out) for out in (shown, piped)]
    assert [r.text for r in replies] == [forced, forced]
    assert piped.getvalue() == forced + "\n"
    assert shown.getvalue() == "ok\u241b]52;c;aGk=\u2407\u241b[2J\u2408\u2400\u2421\ufffd31m\ta\r\nb\n"
