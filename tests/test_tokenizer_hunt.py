"""Tokenizer and chat-template parity hunt: amlx against Hugging Face `tokenizers` /
`transformers` (the oracle, loaded from the same folder), where the other tokenizer tests do
not reach.

- encode parity on hypothesis-drawn text for five pipelines: the helpers' Qwen-style byte-level
  BPE and Gemma-style SentencePiece with byte fallback, a Llama-3-style byte-level BPE (digits
  in runs of 1-3, a BOS template, `PreTrainedTokenizerFast`), and the two Llama-2-style
  SentencePiece pipelines; texts above the size where encode releases the GIL; the refusal of
  unpaired surrogates;
- added tokens with hypothesis-drawn flags (special, normalized, lstrip, rstrip, single_word),
  both files agreeing, inside drawn text;
- the streaming detokenizer finalized at every prefix of a drawn id sequence;
- chat templates: OpenAI-shaped messages (content None beside tool_calls) and Qwen3's
  enable_thinking, against apply_chat_template; hostile templates that must be refused before
  they build something huge.
"""

from __future__ import annotations

import functools
import json
import tracemalloc
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from amlx.chat_template import TemplateLimits
from amlx.errors import ChatTemplateError
from amlx.tokenizer import Tokenizer

try:
    from tests.helpers.tokenizers import CORPUS, _build, write_tokenizer
except ImportError:  # tests/ itself on sys.path (rootdir-less run)
    from helpers.tokenizers import CORPUS, _build, write_tokenizer

# ------------------------------------------------------------------------------------ checkpoints

# Llama 3's pre-tokenization pattern (numbers in runs of at most three digits).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>")


def _entry(content: str, special: bool = True, **flags) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special, **flags}


def _write_llama3(path: Path) -> None:
    """A Llama-3-style tokenizer as the release lays it out: byte-level BPE with ignore_merges,
    a Sequence post-processor (ByteLevel, then a BOS template), PreTrainedTokenizerFast."""
    tok = Backend(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(CORPUS) * 3, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    config = {
        "added_tokens_decoder": {str(i): _entry(t.content) for i, t in sorted(tok.get_added_tokens_decoder().items())},
        "bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def _write_llama2(path: Path, kind: str) -> None:
    """The Gemma-style vocabulary under a Llama-2-style pipeline, as released tokenizer.json files
    spell it: "llama2" the legacy normalizer (Prepend + Replace) with a Strip decoder, "metaspace"
    a Metaspace pre-tokenizer and decoder; a class that loads tokenizer.json as it is."""
    tokenizer_json, config, _ = _build("spm")
    backend = Backend.from_str(tokenizer_json)
    if kind == "llama2":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
    else:
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    config = {**config, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": None}
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


KINDS = ("bpe", "spm", "llama3", "llama2", "metaspace")


def write_kind(path: Path, kind: str) -> Path:
    if kind in ("bpe", "spm"):
        write_tokenizer(path, kind)
    elif kind == "llama3":
        _write_llama3(path)
    else:
        _write_llama2(path, kind)
    return path


def load_pair(path: Path) -> tuple[Tokenizer, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """kind -> (amlx Tokenizer, transformers tokenizer), each folder written once."""

    @functools.lru_cache(maxsize=None)
    def get(kind: str) -> tuple[Tokenizer, object]:
        return load_pair(write_kind(tmp_path_factory.mktemp(kind), kind))

    return get


# ------------------------------------------------------------------------------------ hostile templates


def _small(ours: Tokenizer) -> Tokenizer:
    small = Tokenizer(ours.backend, config={"chat_template": "{{ messages[0].content }}"})
    small.template_limits = TemplateLimits(max_output=100_000, input_factor=1)
    return small


@pytest.mark.parametrize("table", [
    "[''] * 97 + ['x' * 20000]",  # a list is a table too: indexed by code point
    "{97: 'x' * 20000}",
])
def test_str_translate_is_measured_before_it_runs(pairs, table):
    """`str.translate` writes what its table maps each character to: with a list for a table
    (only dicts were measured), a 4,000-character message became 80 MB in one call before its
    result could be refused (unbounded: a larger message and entry took the process down)."""
    ours, hf = pairs("bpe")
    source = "{{ (messages[0].content.translate(" + table + ")) | length }}"
    small = [{"role": "user", "content": "ab"}]
    assert ours.apply_chat_template(small, chat_template=source) == hf.apply_chat_template(
        small, chat_template=source, tokenize=False) == "20001"
    limited = _small(ours)
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match="translate"):
            limited.apply_chat_template([{"role": "user", "content": "a" * 4000}], chat_template=source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak


def test_str_translate_renders_as_before(pairs):
    ours, hf = pairs("bpe")
    messages = [{"role": "user", "content": "Café abc 😀"}]
    source = ("{{ messages[0].content.translate({97: 'A', 98: none, 99: 100}) }}|"
              "{{ messages[0].content.translate(['-'] * 100) }}|{{ messages[0].content.translate('xyz') }}|"
              "{{ messages[0].content.translate(''.maketrans('abc', 'xyz')) }}")
    assert ours.apply_chat_template(messages, chat_template=source) == hf.apply_chat_template(
        messages, chat_template=source, tokenize=False)


# One call that no step can interrupt, its work quadratic in what it is given (the size of its
# result is not): at the default limits, each ran minutes past the render's deadline.
QUADRATIC_CALLS = {
    # textwrap breaks a long word by slicing a line off it at a time, copying the rest each time
    "wordwrap": ("{{ (messages[0].content * 10) | wordwrap(2) | length }}", "wordwrap"),
    # textwrap splits words at ASCII whitespace only: an ideographic space is inside a word
    "wordwrap, ideographic spaces": ("{{ ('a\u3000' * 25000) | wordwrap(2) | length }}", "wordwrap"),
    # each character stripped is looked for among the characters given
    "str.strip": ("{{ ('\u9c3f' * 50000).strip(('{:c}' * 2000).format(*range(38000, 40000))) | length }}", "strip"),
    "str.lstrip": ("{{ ('\u9c3f' * 50000).lstrip(('{:c}' * 2000).format(*range(38000, 40000))) | length }}", "lstrip"),
    "trim": ("{{ ('\u9c3f' * 50000) | trim(('{:c}' * 2000).format(*range(38000, 40000))) | length }}", "trim"),
    "trim by name": ("{{ ('\u9c3f' * 50000) | trim(chars=('{:c}' * 2000).format(*range(38000, 40000))) | length }}",
                     "trim"),
}


@pytest.mark.parametrize("name", sorted(QUADRATIC_CALLS))
def test_quadratic_calls_are_refused_before_they_run(pairs, name):
    ours, _ = pairs("bpe")
    source, says = QUADRATIC_CALLS[name]
    with pytest.raises(ChatTemplateError, match=f"{says}.*character operations"):
        _small(ours).apply_chat_template([{"role": "user", "content": "a" * 5000}], chat_template=source)


def test_wordwrap_and_strip_render_as_before(pairs):
    ours, hf = pairs("bpe")
    messages = [{"role": "user", "content": "Supercalifragilistic words-with-hyphens and  spaces\nnew paragraph "
                                            "x" * 3 + " \u9c3f\u9c3f ab"}]
    source = ("{{ messages[0].content | wordwrap(5) }}|{{ messages[0].content | wordwrap(7, false) }}|"
              "{{ messages[0].content | wordwrap(4, true, '<br>', false) }}|{{ messages[0].content | wordwrap }}|"
              "{{ '  ab  ' | trim }}|{{ 'xyabyx' | trim('xy') }}|{{ 'xxabyy' | trim(chars='xyx') }}|"
              "{{ 'zzaz'.strip('zz') }}|{{ 'zzaz'.lstrip('z') }}|{{ 'azz'.rstrip('zzz') }}|{{ '\u9c3fa\u9c3f'.strip('\u9c3f') }}|"
              "{{ 'zzaz'.encode().strip('zz'.encode()) }}|{{ ' x '.strip() }}|{{ ' x '.strip(none) }}")
    assert ours.apply_chat_template(messages, chat_template=source) == hf.apply_chat_template(
        messages, chat_template=source, tokenize=False)


def test_urlize_trailing_punctuation_is_charged_before_it_runs(pairs):
    """urlize's search for a word's trailing punctuation reads from each character of a run of
    it to the run's end: a 40,000-character run took 38 s in one call."""
    ours, hf = pairs("bpe")
    messages = [{"role": "user", "content": "see www.example.com), mail a@b.co. (www.x.org)... <a>&gt; ok"}]
    source = "{{ messages[0].content | urlize }}|{{ messages[0].content | urlize(20, true, '_blank') }}"
    assert ours.apply_chat_template(messages, chat_template=source) == hf.apply_chat_template(
        messages, chat_template=source, tokenize=False)
    for run in ("')' * 3000 + 'a)'", "'.' * 3000 + 'a.'", "'>' * 1000 + 'a>'", "'a' + '(' * 1500 + ')' * 1500"):
        with pytest.raises(ChatTemplateError, match="urlize.*character operations"):
            _small(ours).apply_chat_template(messages, chat_template="{{ (" + run + ") | urlize | length }}")


# ------------------------------------------------------------------------------------ encode / decode

_PIECES = ["a", "Z", "0", "12", "123456", " ", "  ", "\t", "\n", "\n\n", "\r\n", "'s", "'LL", "’", "don't", "é",
           "e\u0301", "\u0301", "日本", "東京", "😀", "👍🏽", "👩\u200d💻", "\u3000", "\xa0", "▁", "▁▁x", "<", "|>", "ﬁ",
           "Ⅻ", "ǅ", "\ufeff", "\x00", "\u200b", "<|im_end|>", "<|im_start|>", "<eos>", "<bos>", "<|eot_id|>",
           "<think>", "</think>", "<tool_call>", "<start_of_turn>", "<|begin_of_text|>", "<0x41>", "<unk>", "\ufffd"]
TEXTS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    st.lists(st.sampled_from(_PIECES), max_size=16).map("".join),
)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=TEXTS, add=st.booleans())
def test_encode_and_decode_match_transformers(pairs, kind, text, add):
    """Drawn text (digits, contractions, whitespace runs, newlines, CJK, emoji, combining marks,
    special tokens written literally) encodes to transformers' ids; the ids decode to its text."""
    ours, hf = pairs(kind)
    ids = ours.encode(text, add_special_tokens=add)
    assert ids == hf.encode(text, add_special_tokens=add)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", ["bpe", "spm", "llama3"])
def test_long_texts_encode_as_transformers_does(pairs, kind):
    """Above 4,096 characters encode goes through the batch call (which releases the GIL):
    the same ids."""
    ours, hf = pairs(kind)
    text = "\n".join(CORPUS) * 3 + " 1234567 " + "x" * 5000
    assert len(text) > 4096
    for add in (True, False):
        assert ours.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add)


def test_llama3_numbers_split_in_threes_and_bos_comes_from_the_template(pairs):
    ours, hf = pairs("llama3")
    bos = ours.token_to_id("<|begin_of_text|>")
    assert ours.add_bos_token and ours.bos_token_id == bos
    ids = ours.encode("1234567", add_special_tokens=False)
    ends = {len(ours.decode(ids[:k])) for k in range(len(ids) + 1)}
    assert {3, 6, 7} <= ends  # no token spans two runs of digits
    assert ours.encode("1234567") == [bos, *ids] == hf.encode("1234567")
    assert ours.decode(ours.encode("hi there"), skip_special_tokens=True) == "hi there"


@pytest.mark.parametrize("kind", ["bpe", "spm"])
@pytest.mark.parametrize("text, at", [("ok\ud83dx", 2), ("\udfff", 0)])
def test_lone_surrogates_are_refused_by_name(pairs, kind, text, at):
    ours, _ = pairs(kind)
    with pytest.raises(ValueError, match=f"unpaired surrogate.*character {at}"):
        ours.encode(text)


# ------------------------------------------------------------------------------------ added tokens

FLAGS = ("special", "normalized", "lstrip", "rstrip", "single_word")
NEW_TOKENS = ["<x>", "ab", " sp ", "▁q", "日本", "[T]", "é", "<|im_end|>", "<eos>", "the", "x y", "12"]


@st.composite
def added_tokens(draw):
    chosen = draw(st.lists(st.sampled_from(NEW_TOKENS), min_size=1, max_size=3, unique=True))
    return [(c, {f: draw(st.booleans()) for f in FLAGS}) for c in chosen]


@pytest.mark.parametrize("kind", ["bpe", "spm", "llama3", "metaspace"])
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(tokens=added_tokens(), data=st.data())
def test_added_tokens_with_drawn_flags_match_transformers(tmp_path_factory, kind, tokens, data):
    """Added tokens (new, or ones the vocabulary or the added list already has) with drawn flags,
    both files agreeing, amid drawn text: encode, decode and the stream as transformers."""
    path = write_kind(tmp_path_factory.mktemp(kind), kind)
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    for content, flags in tokens:
        known = [t for t in tok["added_tokens"] if t["content"] == content]
        if known:
            known[0].update(flags)
            token_id = known[0]["id"]
        else:
            token_id = vocab.get(content, max(max(vocab.values()), *(t["id"] for t in tok["added_tokens"])) + 1)
            tok["added_tokens"].append({"id": token_id, "content": content, **flags})
        config["added_tokens_decoder"][str(token_id)] = {"content": content, **flags}
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    ours, hf = load_pair(path)
    pieces = [c for c, _ in tokens] + [c[:1] for c, _ in tokens] + [" ", "  ", "\n", "a", "é", "日", "▁", "x", "<"]
    for text in data.draw(st.lists(st.lists(st.sampled_from(pieces), max_size=8).map("".join), min_size=3,
                                   max_size=6)):
        for add in (False, True):
            try:
                expected = hf.encode(text, add_special_tokens=add)
            except BaseException as exc:  # noqa: BLE001 - tokenizers' own panics ("AddedVocabulary bad split")
                if type(exc).__name__ != "PanicException":
                    raise
                with pytest.raises(ValueError, match="tokenizer failed"):
                    ours.encode(text, add_special_tokens=add)
                continue
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == expected, text
            for skip in (False, True):
                want = hf.decode(ids, skip_special_tokens=skip)
                assert ours.decode(ids, skip_special_tokens=skip) == want, (text, add, skip, ids)
                detok = ours.detokenizer(skip_special_tokens=skip)
                assert "".join(detok.add(i) for i in ids) + detok.finalize() == want


# ------------------------------------------------------------------------------------ streaming


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), skip=st.booleans())
def test_stream_finalized_at_every_prefix_is_that_prefix_decoded(pairs, kind, data, skip):
    """One detokenizer per prefix of drawn ids (byte pieces, special and added ids, ids that
    split characters): what it streams and flushes is transformers' decode of that prefix, and
    each piece it streams stays a prefix of every longer decode."""
    ours, hf = pairs(kind)
    added = sorted(ours.backend.get_added_tokens_decoder())
    byte_ids = [i for i in (ours.token_to_id(f"<0x{b:02X}>") for b in (0x41, 0x0A, 0xE6, 0x97, 0xA5, 0xF0, 0x9F, 0x98,
                                                                      0x80, 0xC3, 0xA9, 0xFF)) if i is not None]
    some = st.one_of(st.integers(0, len(ours) - 1), st.sampled_from(added), st.sampled_from(byte_ids or added))
    ids = data.draw(st.lists(some, max_size=14))
    full = hf.decode(ids, skip_special_tokens=skip)
    detok = ours.detokenizer(skip_special_tokens=skip)
    streamed = ""
    for k, token_id in enumerate(ids, 1):
        streamed += detok.add(token_id)
        prefix = hf.decode(ids[:k], skip_special_tokens=skip)
        assert prefix.startswith(streamed), (k, streamed, prefix)
        assert full.startswith(streamed)
        alone = ours.detokenizer(skip_special_tokens=skip)
        assert "".join(alone.add(i) for i in ids[:k]) + alone.finalize() == prefix
    assert streamed + detok.finalize() == full


@pytest.mark.parametrize("tokenizer_class", [None, "PreTrainedTokenizerFast"])
def test_a_special_token_its_normalizer_changes_streams_as_decode_shows_it(tmp_path, tokenizer_class):
    """A special token with normalized=True whose content the normalizer rewrites (" sp " under
    Gemma's " " -> "▁") is in the vocabulary as "▁sp▁", which is no special token's content, so
    decode(skip_special_tokens=True) keeps it. special_token_ids listed it, and the streaming
    detokenizer dropped it: the stream lost text that decode showed."""
    path = write_kind(tmp_path, "spm")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    token_id = max(max(tok["model"]["vocab"].values()), *(t["id"] for t in tok["added_tokens"])) + 1
    entry = _entry(" sp ", normalized=True)
    tok["added_tokens"].append({"id": token_id, **entry})
    config["added_tokens_decoder"][str(token_id)] = entry
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    ours, hf = load_pair(path)
    ids = ours.encode("a sp b")
    assert ids == hf.encode("a sp b") and token_id in ids
    want = hf.decode(ids, skip_special_tokens=True)
    assert " sp " in want and ours.decode(ids, skip_special_tokens=True) == want
    assert token_id not in ours.special_token_ids
    assert ours.special_token_ids == {i for i in hf.added_tokens_decoder if hf.decode([i], skip_special_tokens=True) == ""}
    detok = ours.detokenizer(skip_special_tokens=True)
    assert "".join(detok.add(i) for i in ids) + detok.finalize() == want


@pytest.mark.parametrize("source", [
    # Python reads a key with nested parentheses whole; the check took "(a(b)" for the key and
    # "c" for the conversion, and never saw the width
    "{{ ('%(a(b)c)200000s' % {'a(b)c': 'x'}) | length }}",
    # bytes format as str does, and went unmeasured
    "{{ ('%200000s'.encode() % ('x'.encode(),)) | length }}",
    "{{ ('%(k)200000s'.encode() % {'k'.encode(): 'x'.encode()}) | length }}",
])
def test_percent_formats_are_read_as_python_reads_them(pairs, source):
    ours, hf = pairs("bpe")
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, chat_template=source) == hf.apply_chat_template(
        messages, chat_template=source, tokenize=False) == "200000"
    with pytest.raises(ChatTemplateError, match="% format width"):
        _small(ours).apply_chat_template(messages, chat_template=source)


def test_percent_formats_render_as_before(pairs):
    ours, hf = pairs("bpe")
    messages = [{"role": "user", "content": "Café"}]
    source = ("{{ '%(a(b)c)5s|%%|%(x)-4d' % {'a(b)c': messages[0].content, 'x': 7} }}|"
              "{{ '%s %r %5.2f %%' % (messages[0].content, 'é', 3.14159) }}|{{ '%c%c' % (65, 'z') }}|"
              "{{ '%5s|%-3d'.encode() % ('é'.encode(), 4) }}")
    assert ours.apply_chat_template(messages, chat_template=source) == hf.apply_chat_template(
        messages, chat_template=source, tokenize=False)
    for broken in ("{{ '%(a' % {} }}", "{{ '%(' * 1000 % {} }}"):  # Python refuses an incomplete key
        with pytest.raises(ChatTemplateError, match="incomplete format key"):
            ours.apply_chat_template(messages, chat_template=broken)


_BIG = "{% set big = messages[0].content * 10 %}"
_NS = "{% set ns = namespace() %}" + _BIG + "".join("{%% set ns.a%d = big %%}" % i for i in range(200))
# A value that holds one large text many times over, that no call made (so none was measured):
# writing it out made all the copies before anything could refuse it.
UNMEASURED_VALUES = {
    "batch's fill_with, written out": "{% for row in [1] | batch(1000, " + "messages[0].content * 10) %}{{ row }}{% endfor %}",
    "batch's fill_with, joined": "{{ [1] | batch(1000, messages[0].content * 10) | join }}",
    "batch's fill_with, tojson": "{% for row in [1] | batch(1000, messages[0].content * 10) %}{{ row | tojson }}{% endfor %}",
    "namespace attributes, written out": _NS + "{{ ns }}",
    "namespace attributes, ~": _NS + "{{ ns ~ '' }}",
    "namespace attributes, string filter": _NS + "{{ ns | string | length }}",
    "namespace attributes, upper filter": _NS + "{{ ns | upper | length }}",
}


@pytest.mark.parametrize("name", sorted(UNMEASURED_VALUES))
def test_values_no_call_made_are_measured_before_they_are_written_out(pairs, name):
    """With a 50,000-character text held 200 or 1,000 times, the render that was refused had
    made 20 to 100 MB first (at the default limits, a 4 MB text a thousand times: 4 GB)."""
    ours, _ = pairs("bpe")
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match="would make"):
            _small(ours).apply_chat_template([{"role": "user", "content": "x" * 5000}],
                                             chat_template=UNMEASURED_VALUES[name])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_rows_namespaces_and_joins_render_as_before(pairs):
    ours, hf = pairs("bpe")
    messages = [{"role": "user", "content": "Café 😀"}, {"role": "assistant", "content": "ok"}]
    source = ("{% for row in messages | batch(3, 'pad') %}{{ row }}|{{ row | tojson }}|{{ row | join(',') }}{% endfor %}"
              "{% set ns = namespace(a=messages[0], b=[1, 2]) %}{% set ns.c = 'x' %}{{ ns.b ~ ns.c }}|"
              "{{ messages | join('; ') }}|{{ [1, none, 2.5, [3]] | join('-') }}|{{ messages | map(attribute='role') "
              "| join(' ') }}|{{ messages[0] | string }}|{{ messages | upper }}|{{ (messages | first).content | "
              "center(12) }}")
    assert ours.apply_chat_template(messages, chat_template=source) == hf.apply_chat_template(
        messages, chat_template=source, tokenize=False)


_VARARGS = ("{% set big = messages[0].content * 10 %}{% macro f() %}{{ CALL }}{% endmacro %}"
            "{{ f(*(([none] * 60) | map('default', big, true))) }}")


@pytest.mark.parametrize("call", ["[1].index(varargs)", "raise_exception(varargs)",
                                  "'%s' | format(varargs)"])
def test_containers_no_call_made_are_measured_as_call_arguments(pairs, call):
    """A macro's varargs (here 60 references to one 50,000-character text, from a generator)
    went into calls unmeasured: list.index writes its argument into its error, raise_exception
    made it the error's message."""
    ours, _ = pairs("bpe")
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError) as caught:
            _small(ours).apply_chat_template([{"role": "user", "content": "x" * 5000}],
                                             chat_template=_VARARGS.replace("CALL", call))
        assert len(str(caught.value)) < 1000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_a_namespace_is_measured_as_it_fills(pairs):
    ours, _ = pairs("bpe")
    source = ("{% set big = messages[0].content * 10 %}{% set ns = namespace() %}"
              + "".join("{%% set ns.a%d = big %%}" % i for i in range(200)) + "{{ [1].index(ns) }}")
    with pytest.raises(ChatTemplateError, match="namespace"):
        _small(ours).apply_chat_template([{"role": "user", "content": "x" * 5000}], chat_template=source)


def test_wordwrap_of_words_just_under_the_width_renders_as_transformers(pairs):
    """The wordwrap check reads the words' lengths from one split (a regex for the words longer
    than the width read each shorter word once per character: 18 s for this text)."""
    ours, hf = pairs("bpe")
    messages = [{"role": "user", "content": ("a" * 15999 + " ") * 62}]
    source = "{{ (messages[0].content | wordwrap(16000)) | length }}|{{ (messages[0].content | wordwrap(15998)) | length }}"
    assert ours.apply_chat_template(messages, chat_template=source) == hf.apply_chat_template(
        messages, chat_template=source, tokenize=False)


def test_nested_namespaces_are_measured_once_each(pairs):
    """Namespaces sharing one another, doubling 60 times: measured by walking each once (a walk
    that did not remember a namespace's size took 2 ** 60 steps), and the structure refused."""
    ours, _ = pairs("bpe")
    source = ("{% set h = namespace(n=namespace(x='ab')) %}{% for i in range(60) %}"
              "{% set h.n = namespace(a=h.n, b=h.n) %}{% endfor %}{{ h.n }}")
    with pytest.raises(ChatTemplateError, match="would make"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=source)


def test_what_holds_a_namespace_grows_with_it(pairs):
    """A list measured while its namespace was small is measured again once the namespace grew:
    [ns] * 100, measured (written out) small, then written out after ns came to hold 30,000
    characters (its remembered size stood: 3 MB written before the output limit refused it)."""
    ours, _ = pairs("bpe")
    source = ("{% set ns = namespace(a='') %}{% set many = [ns] * 100 %}{{ many | string | length }}"
              "{% set ns.a = messages[0].content * 6 %}{{ many }}")
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match="would make"):
            _small(ours).apply_chat_template([{"role": "user", "content": "x" * 5000}], chat_template=source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak


@pytest.mark.parametrize("source, says", [
    ("{{ ('{0}' | slice(200000)) | reverse | length }}", "slice"),
    ("{{ ('x' | center(300000)) | length }}", "center"),
    ("{{ (range(100000) | batch(1) | list) | length }}", "list|batch|would make"),
])
def test_constant_expressions_are_evaluated_in_the_render(pairs, source, says):
    """Jinja's optimizer folded constant expressions while compiling, outside the render's
    budget (under the default limits, whatever the tokenizer's), and wrote what they made into
    the compiled module: a list of 200,000 rows took 5 s and 43 MB to compile, 4 million some
    100 s. Evaluated in the render, the tokenizer's limits apply to them."""
    ours, hf = pairs("bpe")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match=says):
        _small(ours).apply_chat_template(messages, chat_template=source)
    assert ours.apply_chat_template(messages, chat_template=source) == hf.apply_chat_template(
        messages, chat_template=source, tokenize=False)


@pytest.mark.parametrize("call", ["replace('', NEW)", "urlize(target=NEW)", "urlize(10, false, NEW)"])
@pytest.mark.parametrize("new", ["[messages[0].content] * 10", "messages", "10 ** 40"])
def test_replace_filter_measures_what_it_writes_for_new(pairs, call, new):
    """The replace filter writes old and new out with str(), urlize its target and rel: a list
    for them was taken for no growth, so its copies between every two characters (in every link)
    went unmeasured (546 MB in one call)."""
    ours, hf = pairs("bpe")
    if call.startswith("urlize"):
        source = "{{ ((messages[0].content | replace('x', 'www.ab.co ')) | " + call.replace("NEW", new) + ") | length }}"
    else:
        source = "{{ (messages[0].content | " + call.replace("NEW", new) + ") | length }}"
    small = [{"role": "user", "content": "ab"}]
    assert ours.apply_chat_template(small, chat_template=source) == hf.apply_chat_template(
        small, chat_template=source, tokenize=False)
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match="replace|urlize"):
            # (300 links for urlize, each of which writes target out)
            long = "x" * (300 if call.startswith("urlize") else 3000)
            _small(ours).apply_chat_template([{"role": "user", "content": long}], chat_template=source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
