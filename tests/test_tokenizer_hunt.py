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
