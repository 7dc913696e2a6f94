"""Added tokens when tokenizer_config.json and tokenizer.json disagree about them.

Each file lists the added tokens with their flags (special, normalized, lstrip, rstrip,
single_word); hand-edited or converted checkpoints do not always keep the two in step.
transformers' fast tokenizer (the oracle, loaded from the same folder) settles it this way:

- tokenizer_config.json's added_tokens_decoder wins: each entry is re-added over tokenizer.json's;
- a named special token (bos/eos/unk/sep/pad/cls/mask, other "*_token" keys) is special anyway;
- named and additional special tokens that neither file lists are added as special;
- a config without added_tokens_decoder (older format) has tokenizer.json's list read instead;
- Qwen2Tokenizer re-adds every named and additional special token as a plain special one.

The tests build the helpers' Qwen-style BPE and Gemma-style SentencePiece tokenizers, make the
files disagree in one way each, and compare encode, decode (with and without
skip_special_tokens) and streamed detokenization with transformers, token for token.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from amlx.tokenizer import Tokenizer

try:
    from tests.helpers.tokenizers import write_tokenizer
except ImportError:  # tests/ itself on sys.path (rootdir-less run)
    from helpers.tokenizers import write_tokenizer

FLAGS = ("special", "normalized", "lstrip", "rstrip", "single_word")


def _entry(config: dict, content: str) -> dict:
    return next(v for v in config["added_tokens_decoder"].values() if v["content"] == content)


def _json_entry(tok: dict, content: str) -> dict:
    return next(t for t in tok["added_tokens"] if t["content"] == content)


def _new_entry(content: str, **flags) -> dict:
    return {"content": content, **dict.fromkeys(FLAGS[1:], False), "special": False, **flags}


def _append_to_config(config: dict, *entries: dict) -> None:
    decoder = config["added_tokens_decoder"]
    for entry in entries:
        decoder[str(max(map(int, decoder)) + 1)] = entry


# Each scenario edits (tokenizer_config.json, tokenizer.json) of one kind in place.


def _special_flipped(kind: str, config: dict, tok: dict) -> None:
    """The config says special where tokenizer.json says not, and the other way round, for plain,
    additional and named tokens (a named one stays special whatever its entry says)."""
    flips = {
        "bpe": ("<think>", "</think>", "<|im_start|>", "<|endoftext|>", "<|im_end|>"),
        "spm": ("<start_of_turn>", "<end_of_turn>", "<mask>", "<eos>", "<unk>"),
    }[kind]
    for content in flips:
        _entry(config, content)["special"] ^= True


def _flags_in_config(kind: str, config: dict, tok: dict) -> None:
    """lstrip / rstrip / normalized / single_word set in the config only."""
    plan = {
        "bpe": {"<tool_call>": "lstrip", "</tool_call>": "rstrip", "<tool_response>": "normalized",
                "</tool_response>": "single_word", "<|im_end|>": "lstrip", "<|im_start|>": "rstrip"},
        "spm": {"<start_of_turn>": "rstrip", "<end_of_turn>": "lstrip", "<pad>": "single_word",
                "<mask>": "normalized", "<eos>": "lstrip"},
    }[kind]
    for content, flag in plan.items():
        _entry(config, content)[flag] = True


def _flags_in_json(kind: str, config: dict, tok: dict) -> None:
    """The same flags set in tokenizer.json only (the config's entries say False)."""
    scratch = {"added_tokens_decoder": {str(t["id"]): dict(t) for t in tok["added_tokens"]}}
    _flags_in_config(kind, scratch, tok)
    changed = {v["content"]: v for v in scratch["added_tokens_decoder"].values()}
    for entry in tok["added_tokens"]:
        entry.update({k: changed[entry["content"]][k] for k in FLAGS})


def _config_only(kind: str, config: dict, tok: dict) -> None:
    """Tokens that only the config lists, with assorted flags (one has a space, which a
    normalizer may rewrite: only a token with normalized=False still matches it)."""
    _append_to_config(
        config,
        _new_entry("<extra_a>", special=True, lstrip=True),
        _new_entry("<extra b>", normalized=True),
        _new_entry("<extra c>", special=True),
        _new_entry("xyz", single_word=True),
    )
    if kind == "bpe":  # (and one named by additional_special_tokens alone)
        config["additional_special_tokens"] = [*config["additional_special_tokens"], "<extra_d>"]
    else:
        config["extra_special_tokens"] = ["<extra_d>"]


def _extras_listed(kind: str, config: dict, tok: dict) -> None:
    """additional_special_tokens names tokens both files call not special."""
    if kind == "bpe":
        config["additional_special_tokens"] = [*config["additional_special_tokens"], "<tool_call>", "</think>"]
    else:
        for content in ("<start_of_turn>", "<end_of_turn>"):
            _entry(config, content)["special"] = False
            _json_entry(tok, content)["special"] = False
        config["extra_special_tokens"] = ["<start_of_turn>"]


def _named_custom_key(kind: str, config: dict, tok: dict) -> None:
    """A model-specific "*_token" key (like Gemma 3's image_token) names a token marked not special."""
    content = "</think>" if kind == "bpe" else "<end_of_turn>"
    _entry(config, content)["special"] = False
    _json_entry(tok, content)["special"] = False
    config["image_token"] = content


def _legacy_config(kind: str, config: dict, tok: dict) -> None:
    """No added_tokens_decoder in the config (older format): tokenizer.json's list stands in,
    and the named tokens it marks not special become special."""
    del config["added_tokens_decoder"]
    eos = config["eos_token"]
    _json_entry(tok, eos)["special"] = False
    _json_entry(tok, "<|im_start|>" if kind == "bpe" else "<start_of_turn>")["lstrip"] = True


def _all_at_once(kind: str, config: dict, tok: dict) -> None:
    _flags_in_json(kind, config, tok)
    _special_flipped(kind, config, tok)
    _config_only(kind, config, tok)


SCENARIOS: dict[str, Callable[[str, dict, dict], None]] = {
    "special_flipped": _special_flipped,
    "flags_in_config": _flags_in_config,
    "flags_in_json": _flags_in_json,
    "config_only": _config_only,
    "extras_listed": _extras_listed,
    "named_custom_key": _named_custom_key,
    "legacy_config": _legacy_config,
    "all_at_once": _all_at_once,
}
KINDS = ("bpe", "spm")
# the class the helpers write (Qwen2Tokenizer / GemmaTokenizer, whose transformers classes rebuild
# the backend), and the generic one (transformers loads tokenizer.json as it is)
CLASSES = (None, "PreTrainedTokenizerFast")


def _write(path: Path, kind: str, scenario: str, tokenizer_class: str | None) -> Path:
    write_tokenizer(path, kind)
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    SCENARIOS[scenario](kind, config, tok)
    if tokenizer_class is not None:
        config["tokenizer_class"] = tokenizer_class
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(kind, scenario, class) -> (amlx Tokenizer, transformers tokenizer), each built once."""

    @functools.lru_cache(maxsize=None)
    def load(kind: str, scenario: str, tokenizer_class: str | None) -> tuple[Tokenizer, object]:
        path = _write(tmp_path_factory.mktemp(f"{kind}-{scenario}"), kind, scenario, tokenizer_class)
        return Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)

    return load


CASES = [
    pytest.param(kind, scenario, cls, id=f"{kind}-{scenario}-{cls or 'own'}")
    for kind in KINDS
    for scenario in SCENARIOS
    for cls in CLASSES
]


def _state(tok) -> dict[int, tuple]:
    return {i: (t.content, *(getattr(t, f) for f in FLAGS)) for i, t in sorted(tok.items())}


def _pieces(ours: Tokenizer) -> list[str]:
    """Text fragments that put added tokens next to spaces, words, newlines and their own halves."""
    contents = [t.content for t in ours.backend.get_added_tokens_decoder().values()]
    halves = [c[: len(c) // 2] for c in contents] + [c[len(c) // 2 :] for c in contents]
    return [*contents, *halves, " ", "  ", "\n", "\t", "a", "word", "é", "Hello", "你好", "<", ">", "|"]


def _stream(ours: Tokenizer, ids: list[int], skip: bool) -> str:
    detok = ours.detokenizer(skip_special_tokens=skip)
    return "".join(detok.add(i) for i in ids) + detok.finalize()


@pytest.mark.parametrize("kind, scenario, cls", CASES)
def test_added_tokens_match_transformers(pair, kind, scenario, cls):
    """Every added token with its id and all five flags, the special ids, the named tokens."""
    ours, hf = pair(kind, scenario, cls)
    assert _state(ours.backend.get_added_tokens_decoder()) == _state(hf.added_tokens_decoder)
    # special_token_ids is what skip_special_tokens drops: the tokens marked special, and (where
    # tokenizer.json is loaded as it is) those it marked special and the config then did not
    dropped = {i for i in hf.added_tokens_decoder if hf.decode([i], skip_special_tokens=True) == ""}
    assert ours.special_token_ids == dropped >= {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert len(ours) == len(hf)
    assert ours.special_tokens == hf.special_tokens_map
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (hf.eos_token_id, hf.bos_token_id,
                                                                         hf.pad_token_id)
    assert ours.eos_token_id in ours.eos_token_ids


@pytest.mark.parametrize("kind, scenario, cls", CASES)
def test_fixed_texts_match_transformers(pair, kind, scenario, cls):
    ours, hf = pair(kind, scenario, cls)
    texts = [" ".join(_pieces(ours)), "".join(_pieces(ours)), "\n".join(_pieces(ours))]
    texts += [f"x {c} y{c}z  {c}\n{c}" for c in (t.content for t in ours.backend.get_added_tokens_decoder().values())]
    for text in texts:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), text
        for skip in (False, True):
            expected = hf.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, (text, skip)
            assert _stream(ours, ids, skip) == expected, (text, skip)


@pytest.mark.parametrize("kind, scenario, cls", CASES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_texts_and_ids_match_transformers(pair, kind, scenario, cls, data):
    """Texts made of added tokens, their halves and filler; and id sequences rich in added ids."""
    ours, hf = pair(kind, scenario, cls)
    text = "".join(data.draw(st.lists(st.sampled_from(_pieces(ours)), max_size=12), label="pieces"))
    add = data.draw(st.booleans(), label="add_special_tokens")
    ids = ours.encode(text, add_special_tokens=add)
    assert ids == hf.encode(text, add_special_tokens=add)

    added = sorted(ours.backend.get_added_tokens_decoder())
    some = st.one_of(st.sampled_from(added), st.integers(0, len(ours) - 1))
    mixed = data.draw(st.lists(some, max_size=16), label="ids")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    for seq in (ids, mixed):
        expected = hf.decode(seq, skip_special_tokens=skip)
        assert ours.decode(seq, skip_special_tokens=skip) == expected
        assert _stream(ours, seq, skip) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_chat_prompt_tokens_follow_the_config(pair, kind):
    """The rendered chat prompt encodes as transformers encodes it, with the config's flags."""
    ours, hf = pair(kind, "all_at_once", None)
    inner = " ".join(f"a {c}  b" for c in (t.content for t in ours.backend.get_added_tokens_decoder().values()))
    messages = [{"role": "user", "content": f"hi  {inner}  "}, {"role": "assistant", "content": "ok  "},
                {"role": "user", "content": f"again {inner}"}]
    prompt = ours.apply_chat_template(messages)
    assert prompt == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = ours.encode(prompt)
    assert ids == hf.encode(prompt)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", KINDS)
def test_token_only_in_tokenizer_json_is_kept(kind, tmp_path):
    """A token tokenizer.json lists and the config's added_tokens_decoder leaves out stays an
    added token, with tokenizer.json's flags, as transformers keeps it when it loads tokenizer.json
    as it is (PreTrainedTokenizerFast). Not matched on purpose: transformers 5's Qwen2Tokenizer
    and GemmaTokenizer rebuild the backend from the vocabulary and merges and drop such a token
    (its text then splits into ordinary pieces), which would cut off an id the model was trained
    with; transformers 4 kept it for every class."""
    path = write_tokenizer(tmp_path, kind) and tmp_path
    tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"].append({"id": len(Tokenizer.from_dir(path)), **_new_entry("<json_only>", special=True)})
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    ours = Tokenizer.from_dir(path)
    token_id = ours.token_to_id("<json_only>")
    assert token_id is not None and token_id in ours.special_token_ids
    assert ours.encode("a <json_only> b", add_special_tokens=False).count(token_id) == 1
    assert ours.decode([token_id], skip_special_tokens=True) == ""

    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    ours, hf = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    assert _state(ours.backend.get_added_tokens_decoder()) == _state(hf.added_tokens_decoder)
    assert ours.encode("a <json_only> b") == hf.encode("a <json_only> b")
