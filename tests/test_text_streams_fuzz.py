"""Generated ids to the user's text, with transformers as the oracle: the streaming
detokenizer, and stop strings / max_tokens / logprobs / `Completion` through a loaded model.

The detokenizer is driven directly with hypothesis-drawn ids for four tokenizer families:
Qwen-style byte-level BPE and Gemma-style SentencePiece with byte fallback (the test helpers),
and two Llama-2-style SentencePiece pipelines built here from the Gemma one (the legacy
normalizer with a `Strip` decoder that drops the first space, and a `Metaspace` decoder).
The ids lean on what is hard: byte pieces and lone bytes that split characters, pieces
that decode to U+FFFD (invalid bytes, or the character itself), special and added tokens,
and "▁"-led pieces; the joined pieces must be `transformers`' `decode(ids,
skip_special_tokens=...)`, and every piece final.

A held U+FFFD at the end of the text (the start of a character, or one that only looks
so) used to keep every id since in the decode window, as did an open run of byte pieces:
a reply of mojibake ("����") or stray bytes made each token decode all the ids before it,
quadratic work on the engine's worker thread. The window tests below pin that down.

End to end, a tiny random checkpoint is loaded and a one-string `choice` forces the text:
the model picks how to spell it (often byte by byte), so streamed pieces, stop strings,
max_tokens cuts and `Completion` are checked on real, unusual tokenizations.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers
from transformers import AutoTokenizer

import amlx
from amlx.engine.assembler import TextAssembler
from amlx.tokenizer import Tokenizer
from amlx.types import GenerationOptions

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.tokenizers import _build, streamed_pieces, write_tokenizer
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from helpers.tokenizers import _build, streamed_pieces, write_tokenizer

KINDS = ("bpe", "spm", "llama2", "metaspace")
FFFD = "\ufffd"


def _write_llama_style(path: Path, kind: str) -> None:
    """The Gemma-style vocabulary under a Llama-2-style pipeline (as a released tokenizer.json
    spells it), with a tokenizer_config whose class loads tokenizer.json as it is."""
    tokenizer_json, config, _ = _build("spm")
    backend = BackendTokenizer.from_str(tokenizer_json)
    if kind == "llama2":  # the legacy Llama 2 / Mistral / TinyLlama files
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
    else:  # a Metaspace decoder: "▁" to " " per piece, the first piece's leading one dropped
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                                             decoders.ByteFallback(), decoders.Fuse()])
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    config = {k: v for k, v in config.items() if k != "chat_template"}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """kind -> (amlx Tokenizer, transformers tokenizer, pool of hard ids), all from one folder."""
    out = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(f"streams_{kind}")
        if kind in ("bpe", "spm"):
            write_tokenizer(path, kind)
        else:
            _write_llama_style(path, kind)
        ours = Tokenizer.from_dir(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoTokenizer.from_pretrained(path)
        out[kind] = (ours, hf, _hard_ids(ours))
    return out


def _hard_ids(tok: Tokenizer) -> list[int]:
    """Ids that make streaming hard: byte-fallback pieces (leading, continuation, ASCII and
    space bytes weighted up), byte-level pieces holding part of a character, pieces decoding
    to U+FFFD, special and added tokens, "▁" pieces, and the ids of U+FFFD itself."""
    ids: list[int] = []
    for b in range(256):
        i = tok.token_to_id(f"<0x{b:02X}>")
        if i is not None:
            ids += [i] * (4 if b in (0x20, 0x41, 0x80, 0xA9, 0xBF, 0xC3, 0xE2, 0xF0) else 1)
    ids += [i for i in range(tok.vocab_size) if FFFD in tok.decode([i])]
    ids += sorted(tok.special_token_ids) + [i for i in range(tok.vocab_size - 12, tok.vocab_size)]
    ids += [i for i in (tok.token_to_id(p) for p in ("▁", "▁▁", "▁a", "▁the", "Ġ", "a")) if i is not None]
    ids += tok.encode(FFFD * 2 + " é😀", add_special_tokens=False)
    return ids


def _assert_streams_as_transformers(kind, ours, hf, ids, skip) -> None:
    pieces, _ = streamed_pieces(ours, ids, skip)
    want = hf.decode(ids, skip_special_tokens=skip)
    assert "".join(pieces) == want, (kind, [ours.id_to_token(i) for i in ids], pieces)
    for n in range(1, len(pieces)):  # each piece is final: a prefix of the text, whatever follows
        assert want.startswith("".join(pieces[:n]))
    if FFFD not in want:
        assert all(FFFD not in p for p in pieces)


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(KINDS), skip=st.booleans(), data=st.data())
def test_stream_joins_to_transformers_decode(pairs, kind, skip, data):
    ours, hf, hard = pairs[kind]
    pool = st.one_of(st.integers(0, ours.vocab_size - 1), st.sampled_from(hard), st.sampled_from(hard))
    ids = data.draw(st.lists(pool, max_size=48))
    _assert_streams_as_transformers(kind, ours, hf, ids, skip)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(KINDS), skip=st.booleans(),
       text=st.lists(st.sampled_from([*"ab ▁\n\té€😀日", FFFD, "\u0301", "\U0001d518", "<bos>", "<eos>",
                                      "<|im_end|>", "<think>", "  "]), max_size=30).map("".join))
def test_encoded_text_streams_back(pairs, kind, skip, text):
    """Canonical tokenizations of text rich in what ends up spelled in bytes."""
    ours, hf, _ = pairs[kind]
    _assert_streams_as_transformers(kind, ours, hf, ours.encode(text), skip)


def _window_cases(tok: Tokenizer) -> dict[str, list[int]]:
    """Replies that end in a U+FFFD after every token, or keep a byte run open."""
    a = tok.encode("a", add_special_tokens=False)
    cases = {"mojibake": tok.encode(FFFD, add_special_tokens=False) * 200}  # the character itself
    lone = [i for i in range(tok.vocab_size) if tok.decode([i]) == FFFD and tok.token_to_id("<0x80>") != i]
    if lone:  # byte-level pieces of one stray byte each
        cases["stray_bytes"] = [*a, *[lone[0], lone[-1]] * 300]
    x80, e2, x82, xac = (tok.token_to_id(f"<0x{b:02X}>") for b in (0x80, 0xE2, 0x82, 0xAC))
    if x80 is not None:  # byte fallback: a run that is no UTF-8 however it goes on, then one that is
        cases["spoiled_run"] = [*a * 9, *[x80] * 300, e2, x82, xac, *a, e2, x82, xac, *a]
    return cases


@pytest.mark.parametrize("kind", KINDS)
def test_text_ending_in_fffd_is_decoded_in_linear_work(pairs, kind):
    ours, hf, _ = pairs[kind]
    for name, ids in _window_cases(ours).items():
        for skip in (False, True):
            pieces, decoded = streamed_pieces(ours, ids, skip)
            assert "".join(pieces) == hf.decode(ids, skip_special_tokens=skip), name
            assert decoded <= 20 * len(ids), (name, decoded)  # (was about len(ids)**2 / 2)


def test_an_open_byte_run_is_not_decoded_per_token(pairs):
    """A long run of byte pieces that is valid UTF-8 so far stays open (one bad byte would turn
    all of it into U+FFFD), but nothing becomes final while it grows: it is decoded once."""
    ours, hf, _ = pairs["spm"]
    text = "😀日€" * 60
    ids = [ours.token_to_id(f"<0x{b:02X}>") for b in text.encode()] + ours.encode("a", add_special_tokens=False)
    pieces, decoded = streamed_pieces(ours, ids, False)
    assert "".join(pieces) == hf.decode(ids) == text + "a"
    assert pieces[:-2] == [""] * (len(ids) - 1)
    assert decoded <= 3 * len(ids)  # (was about len(ids)**2 / 2)


# ------------------------------------------------------------------------------ continuing text


def _reading(hf, ids: list[int]) -> str:
    """transformers' text of `ids` as a continuation of other text: decoded after a plain "a",
    which is then cut off (a Strip or Metaspace decoder drops no leading space of theirs)."""
    a = hf.convert_tokens_to_ids("a")
    assert hf.decode([a]) == "a"
    return hf.decode([a, *ids])[1:]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_a_continuing_stream_keeps_the_first_space(pairs, kind, data):
    """`detokenizer(continuing=True)` (what a constrained reply uses) reads the ids as text that
    goes on from earlier text: a first "▁" piece keeps its space where a Llama-2-style decoder
    drops it at a text's start; elsewhere it is plain decode."""
    ours, hf, hard = pairs[kind]
    ids = data.draw(st.lists(st.one_of(st.integers(0, ours.vocab_size - 1), st.sampled_from(hard)), max_size=24))
    detok = ours.detokenizer(continuing=True)
    text = "".join([detok.add(i) for i in ids] + [detok.finalize()])
    assert text == _reading(hf, ids)
    if kind in ("bpe", "spm"):
        assert text == hf.decode(ids)
    first = ours.token_to_id("▁the")
    if kind in ("llama2", "metaspace") and first is not None:
        assert ours.decode([first]) == "the" and _reading(hf, [first]) == " the"


# ------------------------------------------------------------------------------ end to end

ALPHABET = ["a", "b", " ", "é", "☕", "😀", "日", FFFD, "λ", "\n", "ab", "\U0001d518", "🇫🇷", "€"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Greedy random models: Qwen 3 (byte-level BPE), Gemma 3 (byte fallback), Llama with the
    Llama-2-style tokenizer (Strip decoder) and with a Metaspace decoder, and Qwen 3 drafting
    by prompt lookup."""
    root = tmp_path_factory.mktemp("streams_e2e")
    out = {}
    try:
        for name, arch in (("qwen3", "qwen3"), ("gemma3_text", "gemma3_text"), ("llama2", "llama"),
                           ("metaspace", "llama")):
            path = make_checkpoint(root / name, arch, seed=3, tokenizer="spm" if arch != "qwen3" else "bpe")
            if arch == "llama":
                _write_llama_style(path, name)  # (the same vocabulary as the "spm" one)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf = AutoTokenizer.from_pretrained(path)
            out[name] = (amlx.load_sync(path, max_batch_size=4), hf)
        out["qwen3+lookup"] = (amlx.load_sync(root / "qwen3", max_batch_size=4, draft="prompt_lookup"),
                               out["qwen3"][1])
        yield out
    finally:
        for model, _ in out.values():
            model.close()


def _offline(tok: Tokenizer, ids: list[int], forced: str, stop: list[str], max_tokens: int):
    """What the stream of `ids` must be: an assembler (of a request with the same constraint)
    fed them off the engine, the last one marked complete when it completes the forced text
    (the constraint then ends the reply)."""
    options = GenerationOptions.from_kwargs(choice=[forced], max_tokens=max_tokens, stop=stop)
    asm = TextAssembler(tok, options, frozenset(tok.eos_token_ids))
    detok = tok.detokenizer(continuing=True)
    whole = "".join([detok.add(j) for j in ids] + [detok.finalize()])
    out = []
    for n, i in enumerate(ids):
        t = asm.push(i, complete=n == len(ids) - 1 and whole == forced)
        out.append((t.id, t.text, t.finish_reason))
        if asm.finished:
            break
    return out


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(which=st.sampled_from(["qwen3", "gemma3_text", "llama2", "metaspace", "qwen3+lookup"]),
       forced=st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=10).map("".join),
       data=st.data(), max_tokens=st.integers(1, 40), logprobs=st.booleans())
def test_forced_text_streams_stops_and_completes(models, which, forced, data, max_tokens, logprobs):
    """A reply forced to `forced` (spelled as the model likes): streamed pieces, stop strings cut
    from it (overlapping, sharing prefixes, one that diverges) and max_tokens give what an
    assembler gives for the same ids; without a stop the text is transformers' decode of the
    ids (read as continuing text), and `forced` itself unless max_tokens cut it; `Completion`
    is the stream joined; logprobs are there exactly when asked for."""
    model, hf = models[which]
    tok = model.tokenizer
    cut = st.builds(lambda a, n: forced[a:a + n], st.integers(0, len(forced) - 1), st.integers(1, 5))
    stop = data.draw(st.lists(st.one_of(cut, cut.map(lambda s: s + "zz"), st.sampled_from([FFFD, "😀", "a b"])),
                              max_size=3))
    options = dict(choice=[forced], max_tokens=max_tokens, stop=stop, logprobs=logprobs)
    prompt = (forced + " ") * 3  # (prompt lookup drafts from it)
    tokens = list(model.generate_sync(prompt, **options))
    ids = [t.id for t in tokens]
    assert [(t.id, t.text, t.finish_reason) for t in tokens] == _offline(tok, ids, forced, stop, max_tokens)
    assert all((t.logprob is not None) == logprobs for t in tokens)
    text = "".join(t.text for t in tokens)
    body = ids[:-1] if ids[-1] in tok.eos_token_ids else ids
    if not any(s in _reading(hf, body) for s in stop):
        assert text == _reading(hf, body)
        assert text == forced or (len(ids) == max_tokens and tokens[-1].finish_reason == "length")
    else:
        assert tokens[-1].finish_reason == "stop" and not any(s in text for s in stop)
        assert any(_reading(hf, body).startswith(text + s) for s in stop)
    done = model.complete_sync(prompt, **options)
    assert (done.text, done.token_ids, done.finish_reason) == (text, ids, tokens[-1].finish_reason)


def test_hard_replies_stream_whole(models):
    """Fixed replies: mojibake, a character split over many pieces, a stop inside it."""
    rng = random.Random(0)
    for which in ("qwen3", "gemma3_text", "llama2", "metaspace"):
        model, hf = models[which]
        for forced, stop, want in [(FFFD * 12 + "ok", [], FFFD * 12 + "ok"), ("a😀b", ["😀"], "a"),
                                   ("日本😀😀x", ["😀x", "本😀"], "日"), ("ab" * 5, ["bab", "ababx"], "a"),
                                   ("é" * 9, ["éé€"], "é" * 9), (" yes", [], " yes"), ("  x y", ["x y"], "  ")]:
            tokens = list(model.generate_sync(f"{rng.random()}", choice=[forced], stop=stop, max_tokens=64))
            assert "".join(t.text for t in tokens) == want, (which, forced, stop)
            assert tokens[-1].finish_reason == "stop"
            if not stop or want == forced:
                assert want == _reading(hf, [t.id for t in tokens])


@pytest.mark.parametrize("which", ["llama2", "metaspace"])
@pytest.mark.parametrize("options", [dict(choice=[" yes", " no"]), dict(choice=["  x"]), dict(regex=" [0-9]{3}"),
                                     dict(choice=["yes", "no"]), dict(choice=["a b c"]), dict(regex="[a-z]+( [a-z]+)+")])
def test_constrained_text_matches_with_a_strip_or_metaspace_decoder(models, which, options):
    """Llama 2 / Mistral tokenizers drop the leading space of a text's first piece when they
    decode it. A constraint reads "▁yes" as " yes", so choice=[" yes", " no"] let the model
    start with "▁y", and the reply was decoded to "yes": text its constraint does not match.
    A constrained reply is now read as the constraint reads it. Under a Metaspace decoder
    llguidance read "▁y" as the bytes of "▁y", so any constraint with a space failed the
    request (or panicked in llguidance); it now gets the decoder as a Replace of "▁"."""
    model, _ = models[which]
    for prompt in ("hi", "a question?", "Q: 1+1="):
        text = model.complete_sync(prompt, **options).text
        assert text in options["choice"] if "choice" in options else re.fullmatch(options["regex"], text), text


# ------------------------------------------------------------------------------ chat templates

_CONTENT = st.lists(st.sampled_from(["", " ", "\n", "  x  ", "{{ 1 }}", "{% raw %}", "</think>", "<think>\nr\n</think>\n\nc",
                                     "é😀", "\\n", "'\"", "<|im_end|>", "<end_of_turn>", "None", "\t", "\u2028", FFFD]),
                    max_size=4).map("".join)
_MESSAGE_EXTRAS = st.fixed_dictionaries({}, optional={
    "reasoning_content": _CONTENT,
    "tool_calls": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({
        "name": st.sampled_from(["f", "get_weather"]),
        "arguments": st.one_of(st.dictionaries(st.sampled_from(["a", "b"]), st.one_of(_CONTENT, st.integers(), st.none())),
                               st.just('{"x": 1}'))})}), max_size=2),
})


@st.composite
def _conversations(draw):
    messages = [{"role": "system", "content": draw(_CONTENT)}] if draw(st.booleans()) else []
    for n in range(draw(st.integers(1, 5))):
        role = "user" if n % 2 == 0 else "assistant"
        content = draw(st.one_of(_CONTENT, _CONTENT, st.none(), st.builds(lambda t: [{"type": "text", "text": t}], _CONTENT)))
        message = {"role": role, "content": content}
        if role == "assistant":
            message.update(draw(_MESSAGE_EXTRAS))
        messages.append(message)
    if draw(st.booleans()):
        messages.append({"role": "tool", "content": draw(_CONTENT)})
    return messages


def _rendered(render):
    try:
        return render()
    except Exception:  # (the two raise different types; that both refuse is what counts)
        return "refused"


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["bpe", "spm"]), messages=_conversations(), tools=st.booleans(),
       add_generation_prompt=st.booleans(), thinking=st.sampled_from([None, True, False]))
def test_chat_templates_render_as_transformers(pairs, kind, messages, tools, add_generation_prompt, thinking):
    """Drawn conversations (template syntax, markup and U+FFFD in contents, None and list
    contents, tool calls, reasoning, a tool turn) render as transformers renders them, or
    both refuse."""
    ours, hf, _ = pairs[kind]
    schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    kwargs = dict(tools=schema if tools else None, add_generation_prompt=add_generation_prompt)
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    want = _rendered(lambda: hf.apply_chat_template(messages, tokenize=False, **kwargs))
    got = _rendered(lambda: ours.apply_chat_template(messages, **kwargs))
    assert got == want
