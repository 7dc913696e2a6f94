"""Tokenizer layer: Hugging Face tokenizer files, chat templates and streaming detokenization.

`Tokenizer.from_dir(path)` reads a checkpoint folder (tokenizer.json, tokenizer_config.json,
chat_template.jinja, generation_config.json, config.json) and reproduces what
`transformers.AutoTokenizer` does with the same files: `encode`, `decode` and
`apply_chat_template(..., tokenize=False)` give identical results. Chat templates are
rendered in Jinja's immutable sandbox, with limits on loops, sizes and time (amlx.chat_template).
`Tokenizer.detokenizer()` turns a stream of token ids into text pieces that never split a
character and join up to exactly `decode(ids)`.

Nothing here touches MLX.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from tokenizers import AddedToken

from amlx.chat_template import ChatEnvironment, TemplateLimits, render
from amlx.checkpoint import TOKENIZER_JSON_LIMIT, read_bytes, read_json
from amlx.errors import ChatTemplateError, ModelLoadError
from amlx.prompt import check_structure

_COMPILED_KEPT = 32  # compiled chat templates kept per tokenizer (its own, and any a caller passes)

__all__ = ["ChatTemplateError", "StreamingDetokenizer", "Tokenizer"]

# The named special tokens transformers knows; tokenizer_config.json may add more "*_token" keys.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Defaults of the transformers tokenizer classes amlx's architectures declare; they apply when
# tokenizer_config.json leaves a key out (an explicit null still means "none").
_CLASS_DEFAULT_TOKENS = {
    "GemmaTokenizer": {
        "unk_token": "<unk>",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    },
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}

# Chat messages may carry the model's reasoning under any of these names; templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

_REPLACEMENT_CHAR = "\ufffd"


# --------------------------------------------------------------------------------------------
# File loading


def _read_json_object(path: Path, *, required: bool) -> dict:
    """A JSON object file beside the tokenizer ({} when optional and absent), read as
    every checkpoint file is: regular files only, bounded (amlx.checkpoint)."""
    return read_json(path, required=required, limit=TOKENIZER_JSON_LIMIT) or {}


def _read_text(path: Path) -> str | None:
    try:
        raw = read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: cannot read file: {e}") from None


# How much a tokenizer.json's normalizer may make of a text before its model splits it (characters
# per character); its post-processor may write the text's tokens once. Encoding work and the ids
# it makes grow with these times the text's length, all of it spent before a caller can compare
# the count with a context length: a post-processor writing `$A` a thousand times made a 10 KB
# prompt 600,000 ids. Real tokenizers stay far below: one copy; normalizers NFC 3, NFKC 18, NFKC
# then Lowercase 54, BertNormalizer 36, Prepend "▁" with Replace 2 (bounds, see _normalizer_growth).
_MAX_EXPANSION = 128
_MAX_ADDED_SPECIAL_IDS = 1024  # ids a post-processor adds to every text (real ones: 0 to 3)
_COPIES_SHOWN = 10 ** 6  # a refusal's count of copies, "more than" beyond

# Most characters one character can become under each normalizer that has no settings to read
# (Unicode's largest decompositions: NFKC/NFKD 18, NFD 4, NFC 3; a lowercase mapping at most 3
# chars; ByteLevel one char per UTF-8 byte).
_NORMALIZER_GROWTH = {"NFC": 3, "NFD": 4, "NFKC": 18, "NFKD": 18, "Lowercase": 3, "ByteLevel": 4, "Strip": 1,
                      "StripAccents": 1, "Nmt": 1}


def _normalizer_growth(node: Any) -> int:
    """An upper bound on the characters one input character becomes under a normalizer (its
    tokenizer.json entry), capped just above _MAX_EXPANSION; the cap for a shape not known."""
    cap = _MAX_EXPANSION + 1
    if node is None:
        return 1
    if not isinstance(node, Mapping):
        return cap
    kind = node.get("type")
    if kind in _NORMALIZER_GROWTH:
        return _NORMALIZER_GROWTH[kind]
    if kind == "Sequence":
        growth = 1
        for child in node.get("normalizers") or []:
            growth = min(cap, growth * _normalizer_growth(child))
        return growth
    if kind == "Prepend":  # once per piece between added tokens: at most one per character
        return min(cap, 1 + len(str(node.get("prepend", ""))))
    if kind == "Replace":
        content = len(str(node.get("content", "")))
        pattern = node.get("pattern") or {}
        literal = pattern.get("String") if isinstance(pattern, Mapping) else None
        if isinstance(literal, str) and literal:
            return min(cap, max(1, -(-content // len(literal))))
        # a regex (or an empty string) may match nothing, between every two characters
        return min(cap, 1 + content)
    if kind == "BertNormalizer":
        lowercase = bool(node.get("lowercase", True))
        strip = node.get("strip_accents")
        strip = lowercase if strip is None else bool(strip)  # (None follows lowercase, as in transformers)
        return (3 if node.get("handle_chinese_chars", True) else 1) * (4 if strip else 1) * (3 if lowercase else 1)
    if kind == "Precompiled":
        return min(cap, _precompiled_growth(node.get("precompiled_charsmap")))
    return cap


def _precompiled_growth(charsmap: Any) -> int:
    """The longest replacement in a SentencePiece precompiled charsmap (base64: a 4-byte
    little-endian trie size, the trie, then the replacements, each ended by a NUL); a match
    takes at least one character."""
    import base64
    import binascii

    try:
        blob = base64.b64decode(str(charsmap or ""))
    except (binascii.Error, ValueError):
        return _MAX_EXPANSION + 1
    if len(blob) < 4:
        return 1
    start = 4 + int.from_bytes(blob[:4], "little")
    return max([1, *(len(piece.decode("utf-8", "replace")) for piece in blob[start:].split(b"\0"))])


def _text_copies(node: Any) -> tuple[int, str]:
    """(How many times a post-processor writes a text's tokens, the processor that writes it
    most): a TemplateProcessing once per `$A`/`$B` in its single template; a Sequence the
    product of its processors'; the others once."""
    if not isinstance(node, Mapping):
        return 1, ""
    kind = node.get("type")
    if kind == "TemplateProcessing":
        single = node.get("single") or []
        return sum(1 for piece in single if isinstance(piece, Mapping) and "Sequence" in piece), str(kind)
    if kind == "Sequence":
        copies, worst = 1, (1, "")
        for child in node.get("processors") or []:
            child_copies = _text_copies(child)
            copies = min(_COPIES_SHOWN + 1, copies * max(1, child_copies[0]))  # (nested: a power tower)
            worst = max(worst, child_copies)
        return copies, worst[1]
    return 1, str(kind)


def _expansion_problem(backend: tokenizers.Tokenizer) -> str | None:
    """Why encoding with `backend` may make far more than its text's worth of ids (None when it
    cannot): checked at load, so that a hostile tokenizer.json is refused by name and the work of
    every encode stays bounded in the length of its text."""
    normalizer = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None
    processor = json.loads(backend.post_processor.__getstate__()) if backend.post_processor is not None else None
    copies, which = _text_copies(processor)
    if copies > 1:  # (real post-processors write a text once, between their special tokens)
        times = f"{copies}" if copies <= _COPIES_SHOWN else f"more than {_COPIES_SHOWN}"
        return f"its post-processor ({which}) writes the tokens of every text {times} times"
    if _normalizer_growth(normalizer) > _MAX_EXPANSION:
        kind = normalizer.get("type") if isinstance(normalizer, Mapping) else "?"
        return f"its normalizer ({kind}) can make one character into more than {_MAX_EXPANSION} characters"
    added = backend.post_processor.num_special_tokens_to_add(False) if backend.post_processor is not None else 0
    if added > _MAX_ADDED_SPECIAL_IDS:
        return f"its post-processor adds {added} special-token ids to every text (at most {_MAX_ADDED_SPECIAL_IDS})"
    return None


def _token_content(value: Any) -> str | None:
    """A special token from a config: a string, or a dict with "content" (serialized AddedToken)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_added_token(value: Mapping[str, Any], *, special: bool) -> AddedToken:
    """An added_tokens_decoder entry as an AddedToken; `special` forces it special (named tokens)."""
    flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
    return AddedToken(value["content"], special=special or bool(value.get("special", False)), **flags)


def _ids_from(value: Any) -> list[int]:
    """eos_token_id style values: an int, a list of ints, or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


# --------------------------------------------------------------------------------------------
# Chat template rendering


def _plain(value: Any) -> Any:
    """Copy template inputs into plain JSON-like data (str, int, float, bool, None, dict, list,
    tuple). Rich objects could expose methods the sandbox does not know to be harmful, so
    anything else becomes an inert "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. OpenAI SDK messages
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: Iterable[Any]) -> list[dict]:
    out = []
    for message in messages:
        message = _plain(message)
        if not isinstance(message, dict):
            raise ChatTemplateError(f"chat messages must be dicts, got {message!r}")
        # Templates handle a missing key better than None (which some would render as "None").
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _template_sources(template: Any) -> str | dict[str, str] | None:
    """A chat_template setting as one source or sources by name; ValueError unless it is
    text, or a list of {"name", "template"} entries (tokenizer_config.json) or a mapping of
    names to text. (A number or true loaded, and every chat reply then failed with a raw
    TypeError where the tool-call format is looked for in the template's text.)"""
    if isinstance(template, (list, tuple)) and all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                                   for t in template):
        template = {t.get("name"): t.get("template") for t in template}
    if template is None or isinstance(template, str) or (isinstance(template, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in template.items())):
        return template
    raise ValueError("chat_template must be text or a list of {'name': ..., 'template': ...} entries of text, "
                     f"not {template!r:.100}")


def _special_tokens_of(config: Mapping[str, Any]) -> tuple[dict[str, str], Any]:
    """The named special tokens of tokenizer_config.json (every "*_token" entry, offered to the
    chat template), and its extra special tokens still to register (a list; [] when they were
    a mapping of names, which joins the named ones)."""
    tokens: dict[str, str] = {}
    tokenizer_class = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    defaults = _CLASS_DEFAULT_TOKENS.get(tokenizer_class, {})
    for key in _NAMED_SPECIAL_TOKENS:
        content = _token_content(config[key] if key in config else defaults.get(key))
        if content is not None:
            tokens[key] = content
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    for key, value in config.items():
        if key.endswith("_token") and key not in tokens and _token_content(value) is not None:
            tokens[key] = _token_content(value)
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            if _token_content(value) is not None:
                tokens.setdefault(key, _token_content(value))
        extra = []
    return tokens, extra


# --------------------------------------------------------------------------------------------
# Tokenizer


_GIL_FREE_ENCODE = 4096  # characters above which encode() releases the GIL (encode_batch)


def check_encodable(text: str, what: str = "the text") -> None:
    """ValueError naming the first unpaired UTF-16 surrogate in `text` (what JSON's "\\ud800"
    escapes decode to: a str no UTF-8 can hold, which the tokenizer refuses with a bare
    TypeError), if it has one; `what` names the text in the message."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        raise ValueError(f"{what} holds an unpaired surrogate, U+{code:04X}, at character {e.start} (a lone "
                         f"\\u{code:04x} escape): it is no Unicode character and cannot be encoded as UTF-8") from None


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template.

    Build it with `Tokenizer.from_dir(path)`. Results match `transformers.AutoTokenizer`
    loaded from the same folder. Instances are immutable and safe to share between threads.
    """

    # What one chat-template render may use (loop steps, output and object sizes, seconds).
    template_limits: TemplateLimits = TemplateLimits()

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        config: Mapping[str, Any] | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        """Wrap a `tokenizers.Tokenizer` (which this object takes over and adjusts).

        `config` is the content of tokenizer_config.json; `chat_template` overrides the one in
        it; `eos_token_ids` adds stop ids (from generation_config.json / config.json).
        """
        config = dict(config or {})
        self._backend = backend

        self._special_tokens, extra = _special_tokens_of(config)
        self._special_ids = self._register_added_tokens(config, extra)
        backend = self._backend  # (_register_added_tokens may have rebuilt it)

        # encode() never truncates or pads, whatever tokenizer.json says (transformers too).
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

        # BOS/EOS on encode come from tokenizer.json's post-processor alone: transformers 5 drops
        # tokenizer_config's add_bos_token / add_eos_token whenever tokenizer.json exists.
        bare = backend.encode("", add_special_tokens=True).ids
        self._add_bos = self.bos_token_id is not None and bare[:1] == [self.bos_token_id]

        template = _template_sources(chat_template if chat_template is not None else config.get("chat_template"))
        self._chat_template: str | dict[str, str] | None = template
        # source -> template, or why it failed; the most recent _COMPILED_KEPT (a caller may pass
        # any template source per call: `chat_template=`)
        self._compiled: OrderedDict[str, jinja2.Template | str] = OrderedDict()
        self._compile_lock = threading.Lock()
        self._env = ChatEnvironment()

        # transformers only cleans up spaces for non-BPE models (it would corrupt BPE text).
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
        )

        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        eos = set(eos_token_ids)
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        self._eos_ids = frozenset(eos)
        self._byte_ids = self._find_byte_fallback_ids()  # id -> the byte it stands for

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load the tokenizer of a Hugging Face checkpoint folder.

        Reads tokenizer.json (required), tokenizer_config.json, chat_template.jinja,
        additional_chat_templates/*.jinja, special_tokens_map.json, generation_config.json
        and config.json. Raises `ModelLoadError` naming the file for anything missing or corrupt.
        """
        root = Path(path)
        if not root.is_dir():
            raise ModelLoadError(f"{root}: not a directory")
        tokenizer_file = root / "tokenizer.json"
        try:
            # read as every checkpoint file is (regular files only, bounded): the tokenizers
            # library's from_file read whatever size it was given, in full, into memory
            raw = read_bytes(tokenizer_file, TOKENIZER_JSON_LIMIT)
        except FileNotFoundError:
            raise ModelLoadError(
                f"{tokenizer_file}: file not found (amlx reads the tokenizers-library tokenizer.json; "
                "tokenizer.model / vocab.json-only checkpoints are not supported)"
            ) from None
        try:
            backend = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the Rust side raises plain Exception; bad UTF-8 a UnicodeDecodeError
            _read_json_object(tokenizer_file, required=True)  # a clearer message if the JSON is broken
            raise ModelLoadError(f"{tokenizer_file}: not a valid tokenizer: {e}") from e
        problem = _expansion_problem(backend)
        if problem:
            raise ModelLoadError(f"{tokenizer_file}: refused: {problem}, so that encoding a text could take "
                                 "time and memory out of all proportion to its length")

        config = _read_json_object(root / "tokenizer_config.json", required=False)
        special_map = _read_json_object(root / "special_tokens_map.json", required=False)
        if "added_tokens_decoder" not in config:
            # Legacy file, read (like transformers does) only for configs of the older format.
            for key, value in special_map.items():
                if key.endswith("_token") or key in ("additional_special_tokens", "extra_special_tokens"):
                    config.setdefault(key, value)

        chat_template: str | dict[str, str] | None = None
        templates: dict[str, str] = {}
        default = _read_text(root / "chat_template.jinja")
        if default is not None:
            templates["default"] = default
        extra_dir = root / "additional_chat_templates"
        if extra_dir.is_dir():
            for file in sorted(extra_dir.glob("*.jinja")):
                templates[file.name.removesuffix(".jinja")] = _read_text(file) or ""
        if list(templates) == ["default"]:
            chat_template = templates["default"]
        elif templates:
            chat_template = templates

        eos_ids: list[int] = []
        generation = _read_json_object(root / "generation_config.json", required=False)
        eos_ids += _ids_from(generation.get("eos_token_id"))
        model_config = _read_json_object(root / "config.json", required=False)
        eos_ids += _ids_from(model_config.get("eos_token_id"))
        text_config = model_config.get("text_config")
        if isinstance(text_config, Mapping):  # multimodal configs (Gemma 3) nest the text model's
            eos_ids += _ids_from(text_config.get("eos_token_id"))

        try:
            return cls(backend, config=config, chat_template=chat_template, eos_token_ids=eos_ids)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{root / 'tokenizer_config.json'}: unusable tokenizer settings: {e}") from e

    def _register_added_tokens(self, config: Mapping[str, Any], extra: Any) -> frozenset[int]:
        """Settle the added tokens and their flags (special, normalized, lstrip, rstrip,
        single_word) as transformers' fast tokenizer does when the two files disagree.

        transformers 5 passes every entry of tokenizer_config.json's added_tokens_decoder (in id
        order) to the backend's add_tokens, which replaces the flags of a token tokenizer.json
        already has: the config wins. A named special token (bos/eos/unk/sep/pad/cls/mask and
        any other "*_token") is always special, whatever its entry says. Named and extra
        (additional_special_tokens) tokens that neither file lists are added as special. A
        config without added_tokens_decoder (the older format) has tokenizer.json's own list
        read in its place. Qwen2Tokenizer then re-adds all its special tokens, named and
        extra, as plain special tokens (default flags).

        Not followed: a token that only tokenizer.json lists stays, with its flags and trained
        id (transformers 5 classes that rebuild the backend, like Qwen2Tokenizer and
        GemmaTokenizer, lose it; PreTrainedTokenizerFast keeps it).
        Returns the ids decode(..., skip_special_tokens=True) drops.
        """
        backend = self._backend
        present = backend.get_added_tokens_decoder()
        named = [c for c in self._special_tokens.values() if c]
        extras = [c for c in map(_token_content, extra if isinstance(extra, (list, tuple)) else []) if c]
        if "added_tokens_decoder" in config:
            declared = config.get("added_tokens_decoder") or {}
            entries = [v for _, v in sorted(declared.items(), key=lambda kv: int(kv[0])) if isinstance(v, Mapping)]
        else:
            entries = [tok.__getstate__() for _, tok in sorted(present.items())]
        to_add: list[AddedToken] = []
        for value in entries:
            if isinstance(value.get("content"), str):
                to_add.append(_as_added_token(value, special=value["content"] in named))
        listed = {tok.content for tok in to_add} | {tok.content for tok in present.values()}
        for content in [*named, *extras]:
            if content not in listed:
                to_add.append(AddedToken(content, special=True))
                listed.add(content)
        tokenizer_class = str(config.get("tokenizer_class") or "").removesuffix("Fast")
        if tokenizer_class == "Qwen2Tokenizer":
            to_add += [AddedToken(content, special=True) for content in dict.fromkeys([*named, *extras])]
        if to_add:
            backend.add_tokens(to_add)
        special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        # The tokenizers library keeps skipping (decode with skip_special_tokens) a token it loaded
        # as special after add_tokens re-marks it not special. transformers' Qwen2Tokenizer and
        # GemmaTokenizer never load tokenizer.json's added tokens (they rebuild the backend from
        # the vocabulary and merges, then add the config's), so for them the final flag alone
        # counts: rebuilt from its own serialization, the backend forgets the stale mark. Other
        # classes load tokenizer.json as it is and keep skipping such a token; so does amlx then.
        stale = {i for i, tok in present.items() if tok.special and i not in special}
        if stale and tokenizer_class in ("Qwen2Tokenizer", "GemmaTokenizer"):
            self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
            stale = set()
        # decode skips an id whose vocabulary string is a special token's content: a normalized
        # special token whose content the normalizer changes (" sp " under Gemma's "▁" for " ")
        # stands in the vocabulary as its normalized form ("▁sp▁"), so decode keeps it, and so
        # must the streaming detokenizer (which dropped it: the stream lost text decode showed)
        tokens = self._backend.get_added_tokens_decoder()
        contents = {tokens[i].content for i in special | stale if i in tokens}
        return frozenset(i for i in tokens if self._backend.id_to_token(i) in contents)

    def _find_byte_fallback_ids(self) -> dict[int, int]:
        """Ids of "<0xNN>" pieces, with their bytes, when the decoder fuses them with ByteFallback
        (SentencePiece style). Such a run only decodes to text once it is complete, see
        StreamingDetokenizer."""
        decoder = self._backend.decoder
        decoder = json.loads(decoder.__getstate__()) if decoder is not None else {}
        stack, found = [decoder], False
        while stack:
            node = stack.pop()
            if isinstance(node, Mapping):
                found = found or node.get("type") == "ByteFallback"
                stack.extend(node.get("decoders") or [])
        if not found:
            return {}
        ids = ((self._backend.token_to_id(f"<0x{b:02X}>"), b) for b in range(256))
        return {i: b for i, b in ids if i is not None}

    # -- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` the checkpoint's BOS/EOS rules apply."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        try:
            if len(text) > _GIL_FREE_ENCODE:
                # the batch call releases the GIL while it works (the single one holds it), so
                # other threads -- an event loop waiting for this one -- run meanwhile
                return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            check_encodable(text)  # (tokenizers' "TextInputSequence must be str" names no cause)
            raise
        except BaseException as e:
            if _is_panic(e):
                raise ValueError(f"the checkpoint's tokenizer failed on this text: {e}") from None
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens` drops tokens marked special (BOS, EOS, ...)."""
        try:
            text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        except BaseException as e:
            if _is_panic(e):
                raise ValueError(f"the checkpoint's tokenizer failed on these ids: {e}") from None
            raise
        if self._clean_up_spaces:
            text = _clean_up_tokenization(text)
        return text

    def detokenizer(self, skip_special_tokens: bool = False, *, continuing: bool = False) -> StreamingDetokenizer:
        """A fresh incremental decoder for one generated sequence.

        `continuing`: decode the ids as text that goes on from earlier text, so a first piece
        keeps the leading space that SentencePiece decoders with a dummy prefix (Llama 2,
        Mistral: a `Strip` or `Metaspace` decoder) drop at the start of a text. Each token then
        reads as the constraint engine reads it (see TextAssembler)."""
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens, continuing=continuing)

    @functools.cached_property
    def _plain_context_id(self) -> int | None:
        """An id that decodes, alone, to one plain ASCII letter or digit (none of the special,
        added or byte pieces): text for a detokenizer to continue from. None if there is none."""
        skip = self._special_ids | set(self._byte_ids) | set(self._backend.get_added_tokens_decoder())
        for char in "aexo0":
            for token_id in (self._backend.token_to_id(char), *self.encode(char, add_special_tokens=False)[-1:]):
                if token_id is not None and token_id not in skip and self.decode([token_id]) == char:
                    return token_id
        return None

    def token_text(self, token_id: int) -> str:
        """The text one token adds inside a text: `decode([token_id])`, except that a
        SentencePiece piece with a leading "▁" keeps its space where the decoder drops it at
        the start of a text (Llama 2, Mistral: a `Strip` or `Metaspace` decoder); what the
        server's logprobs show for each token."""
        context = self._plain_context_id
        if context is None or token_id == context:
            return self.decode([token_id])
        lead = self.decode([context])
        text = self.decode([context, token_id])
        return text[len(lead):] if text.startswith(lead) else self.decode([token_id])

    def continuation_ids(self, text: str) -> list[int]:
        """Ids of `text` as it reads after earlier text (no special tokens): for a tokenizer
        that puts a "▁" before every text (Llama 2, Mistral), " sports" is "▁sports", where
        `encode` of it alone gives "▁", "▁sports". Found as the ids of a lead (a newline, else
        a full stop, a digit or a letter) plus the text minus those of the lead, for the first
        lead whose ids begin them unchanged; else `encode(text)`. (One lead is not enough: a
        vocabulary may merge it with the text's first characters, "\nw" or "\n\n", and the
        fallback then put that "▁" before "world".)"""
        for lead_text in _CONTINUATION_LEADS:
            lead = self.encode(lead_text, add_special_tokens=False)
            ids = self.encode(lead_text + text, add_special_tokens=False)
            if lead and ids[:len(lead)] == lead and self.decode(lead + ids[len(lead):]) == self.decode(lead) + text:
                return ids[len(lead):]
        return self.encode(text, add_special_tokens=False)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of `token_id` (None if out of range)."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string or added token (None if unknown)."""
        return self._backend.token_to_id(token)

    # -- chat templates --------------------------------------------------------------------

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        """The checkpoint's chat template source (a dict when it has several named ones)."""
        return self._chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        chat_template: str | None = None,
        continue_final_message: bool | str = False,
        **kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the chat template.

        `tools` are JSON-schema dicts; extra keyword arguments (e.g. `enable_thinking=False`,
        `documents=[...]`) are passed to the template. `chat_template` picks a named template
        or supplies template source. `continue_final_message`: the text ends with the last
        message's content (or the field it names, e.g. "reasoning_content"), left open for the
        model to go on (an assistant reply begun for it), as transformers' option of that name
        does; no generation prompt is added then. Raises
        `ChatTemplateError` (a ValueError) when there is no template, the template raises, it
        attempts something the sandbox forbids, or it goes over `template_limits` (loop steps,
        output size, object sizes, time).
        """
        source = self._select_template(chat_template, tools)
        if isinstance(messages, (Mapping, str, bytes)):
            raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
        # (before anything copies them: too deep, self-holding or blown-up structures fail here)
        for value, what in ((messages, "the chat messages"), (tools, "the tools"), (kwargs, "the template variables")):
            check_structure(value, what)
        chat = _normalize_messages(messages)
        if not chat:
            raise ChatTemplateError("cannot apply a chat template to an empty conversation")
        final = None
        if continue_final_message:
            add_generation_prompt = False  # (the reply under way is the last message)
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final = _tag_final_message(chat, field, source)
        if tools is not None:
            tools = list(tools)
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise ChatTemplateError(f"tools must be JSON-schema dicts, got {type(tool).__name__}")
        documents = kwargs.pop("documents", None)
        variables = {**self._special_tokens, **kwargs}  # caller's values win over the checkpoint's
        variables = {k: _plain(v) for k, v in variables.items()}
        try:
            template = self._compile(source)
            text = render(
                template,
                self.template_limits,
                messages=chat,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=bool(add_generation_prompt),
                **variables,
            )
        except ChatTemplateError:
            raise
        except Exception as e:  # syntax errors, sandbox refusals, and e.g. TypeError inside the template
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
        return text if final is None else _cut_at_tag(text, final)

    def _select_template(self, name_or_source: str | None, tools: Any) -> str:
        template = self._chat_template
        if isinstance(template, dict):
            if name_or_source is not None:
                return template.get(name_or_source, name_or_source)
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ChatTemplateError(
                f"this checkpoint has several chat templates and no default; pick one of {sorted(template)}"
            )
        if name_or_source is not None:
            return name_or_source
        if template is None:
            raise ChatTemplateError(
                "this checkpoint has no chat template (none in tokenizer_config.json or chat_template.jinja); "
                "pass a prompt string or token ids instead"
            )
        return template

    def _compile(self, source: str) -> jinja2.Template:
        with self._compile_lock:  # (prompts are rendered on several threads)
            template = self._compiled.get(source)
            if template is not None:
                self._compiled.move_to_end(source)
        if template is None:
            try:
                template = self._env.compile_template(source)
            except Exception as exc:  # kept, as its message: a broken template is parsed once, not per request
                template = f"chat template failed: {type(exc).__name__}: {exc}"
            with self._compile_lock:
                self._compiled[source] = template
                while len(self._compiled) > _COMPILED_KEPT:
                    self._compiled.popitem(last=False)
        if isinstance(template, str):
            raise ChatTemplateError(template)
        return template

    # -- special tokens and sizes ----------------------------------------------------------

    def _id_of(self, key: str) -> int | None:
        token = self._special_tokens.get(key)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token string, if the checkpoint has one."""
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """The tokenizer's end-of-sequence token string."""
        return self._special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        """The padding token string, if any."""
        return self._special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        """Id of the BOS token, or None."""
        return self._id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of tokenizer_config's eos_token, or None (see `eos_token_ids` for stopping)."""
        return self._id_of("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token, or None."""
        return self._id_of("pad_token")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: generation_config.json, config.json and eos_token."""
        return self._eos_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the tokens marked special (what `skip_special_tokens` drops)."""
        return self._special_ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens ("bos_token", "eos_token", ...) as the template sees them."""
        return dict(self._special_tokens)

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` starts with BOS (tokenizer.json decides)."""
        return self._add_bos

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (`len()` of the transformers tokenizer;
        transformers' own `.vocab_size` leaves added tokens out)."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (do not modify it)."""
        return self._backend

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


def _is_panic(exc: BaseException) -> bool:
    """Whether `exc` is a panic inside the tokenizers library (e.g. Onig's "retry-limit-in-match
    over" from a checkpoint's backtracking regex, on some text): a pyo3 PanicException, a
    BaseException that no handler caught (the server answered a bare 500). Raised as a
    ValueError instead."""
    return type(exc).__name__ == "PanicException"


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (only used for non-BPE models that ask for it)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


# --------------------------------------------------------------------------------------------
# Streaming detokenization


# Appended to the text of a message to continue (`continue_final_message`), found again in the
# rendered chat to cut there. ASCII, so that filters such as tojson leave it as it is; its
# trailing space shows whether the template kept the text's trailing spaces or trimmed them.
_CONTINUE_TAG = "AMLX_CONTINUE_FINAL_MESSAGE_HERE "


def _tag_final_message(chat: list[dict], field: str, source: str) -> str:
    """Appends `_CONTINUE_TAG` to the last message's `field` (a text, or the last text block of
    a list; a reasoning field's every alias holding the same text) in place; returns the text."""
    if not chat:
        raise ChatTemplateError("continue_final_message needs a conversation")
    last = chat[-1]
    value = last.get(field)
    if value is None:
        raise ChatTemplateError(f"continue_final_message: the last message has no {field!r} to continue")
    fields = [f for f in _REASONING_FIELDS if last.get(f) == value] if field in _REASONING_FIELDS else [field]
    if not any(f in source for f in fields):
        raise ChatTemplateError(f"continue_final_message: the chat template never reads {field!r}")
    if isinstance(value, (list, tuple)):
        blocks = [dict(b) if isinstance(b, Mapping) else b for b in value]
        for block in reversed(blocks):
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                break
        else:
            raise ChatTemplateError("continue_final_message needs a last message with text content")
        last[field] = blocks
        return text
    if not isinstance(value, str):
        raise ChatTemplateError(f"continue_final_message: the last message's {field!r} is not text")
    for f in fields:
        last[f] = value + _CONTINUE_TAG
    return value


def _cut_at_tag(text: str, final: str) -> str:
    """The rendered chat up to where `_CONTINUE_TAG` stands, its trailing spaces kept where the
    template kept the tag's own, trimmed where it trimmed them."""
    tag = _CONTINUE_TAG.strip()
    if tag not in text or final.strip() not in text:
        raise ChatTemplateError("continue_final_message: the chat template does not show the last message's "
                                "text as it is, so it cannot be continued")
    at = text.rindex(tag)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


# What `continuation_ids` puts before a text, tried in turn: a newline, which most tokenizers
# keep apart from the letters and spaces after it (its own token or byte piece), so the split is
# clean; where a vocabulary merges it with what follows, other one-character leads.
_CONTINUATION_LEADS = ("\n", ".", "0", "a")


class StreamingDetokenizer:
    """Turns token ids, one at a time, into final text pieces.

    `add(token_id)` returns the text that became final with this token (often ""), and
    `finalize()` returns whatever was held back. Joined, the pieces equal
    `tokenizer.decode(all_ids, skip_special_tokens=...)`. A piece never ends inside a
    character: text is held back while the last bytes may still belong to an unfinished
    UTF-8 sequence.

    Only a short window of recent ids is decoded per token: a few ids of already emitted
    context (so that decoders which treat the first token specially, like SentencePiece's
    leading-space rules, behave as inside the full sequence) plus the ids not yet emitted.
    A held trailing U+FFFD keeps only the ids that may hold an incomplete character's bytes,
    and an open byte-fallback run is decoded once it ends (or can no longer be valid UTF-8),
    so no reply, mojibake included, costs more than a few short decodes per token.

    `finalize()` flushes; further `add()` calls continue the text after what it returned,
    which stays final: bytes it flushed as U+FFFD (an incomplete character, an open
    byte-fallback run) are not joined with later ones. The
    transformers-style `clean_up_tokenization_spaces` (honoured by `decode` only for non-BPE
    models, none of which amlx runs) is not applied to streamed text.
    """

    # Decode windows are re-anchored once they reach this many ids...
    _REBASE_AT = 8
    # ...keeping the shortest suffix of at most this many ids as context.
    _MAX_CONTEXT = 4
    # Ids kept besides the context while the text ends in a held U+FFFD (see _rebase).
    _HELD_IDS = 3

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, continuing: bool = False) -> None:
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend
        self._skip = skip_special_tokens
        self._skipped_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._byte_ids = tokenizer._byte_ids
        self._ids: list[int] = []  # the decode window
        self._run = bytearray()  # bytes of the byte-fallback run the ids end in (if the decoder has one)
        self._run_whole = 0  # leading bytes of the run known to be whole characters
        self._run_bad = False  # whether the run can no longer be valid UTF-8
        self._emitted = 0  # characters of decode(self._ids) already returned
        if continuing:
            self._continue_text()

    def _continue_text(self) -> None:
        """Starts the window afresh, as text that goes on from earlier text: with a plain
        character, taken as emitted, so that no later id is the text's first (whose leading
        space a Strip or Metaspace decoder drops); later windows keep generated ids as context."""
        context = self._tokenizer._plain_context_id
        self._ids = [] if context is None else [context]
        self._clear_run()
        self._emitted = len(self._decode(self._ids)) if self._ids else 0

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip)

    def _final_length(self, text: str) -> tuple[int, bool]:
        """How many leading characters of `text` (= decode(window)) can no longer change, and
        whether what can is only a trailing U+FFFD. (add() settled open byte-fallback runs.)"""
        if self._run:
            # A run of byte pieces that no later byte can make valid UTF-8: ByteFallback turns
            # each of its bytes into U+FFFD, now and whatever follows, so its text is final.
            # (Holding it kept a model's stray bytes in the window for good: quadratic work.)
            return len(text), False
        # A trailing U+FFFD may be an incomplete character that the next bytes complete.
        if text.endswith(_REPLACEMENT_CHAR):
            return len(text) - 1, True
        return len(text), False

    @staticmethod
    def _whole(data: bytes | bytearray) -> int | None:
        """How many leading bytes of `data` are whole characters, the rest the start of one;
        None when `data` is no prefix of any valid UTF-8 (ByteFallback then decodes every byte
        of such a run to U+FFFD, whatever bytes follow)."""
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            return e.start if e.reason == "unexpected end of data" else None  # (a character cut short)
        return len(data)

    @classmethod
    def _spoiled(cls, data: bytes | bytearray) -> bool:
        """Whether `data` is no prefix of any valid UTF-8 (see _whole)."""
        return cls._whole(data) is None

    def _clear_run(self) -> None:
        self._run.clear()
        self._run_whole = 0
        self._run_bad = False

    def _run_open(self) -> bool:
        """Whether the ids end in a run of byte pieces that may still become valid UTF-8 (not
        `_spoiled`). Only the bytes after its whole characters are read, and a spoiled run stays
        so: a run grows a byte per token, and reading all of it each time was quadratic (a reply
        spelled in byte pieces, 40,000 of them, took 0.9 s of the worker's time)."""
        if not self._run or self._run_bad:
            return False
        whole = self._whole(self._run[self._run_whole:])
        if whole is None:
            self._run_bad = True
            return False
        self._run_whole += whole
        return True

    def _trailing_run(self, ids: list[int]) -> bytes:
        """The bytes of the byte pieces that end `ids`."""
        start = len(ids)
        while start and ids[start - 1] in self._byte_ids:
            start -= 1
        return bytes(self._byte_ids[i] for i in ids[start:])

    def add(self, token_id: int) -> str:
        """Feed one generated id; returns the newly final text (possibly "")."""
        token_id = int(token_id)
        if token_id in self._skipped_ids or self._backend.id_to_token(token_id) is None:
            # decode drops it (a skipped special token, an id past the vocabulary: a model's
            # padding rows) before its decoder runs, so it changes no text and stays out of the
            # window. There, a long run of them left no text to re-anchor the window on, and
            # each one decoded all the ids since: 20,000 took 7 s of the worker's time.
            return ""
        self._ids.append(token_id)
        if self._byte_ids:
            if token_id in self._byte_ids:
                self._run.append(self._byte_ids[token_id])
            else:
                self._clear_run()
            if self._run_open():
                # ByteFallback turns a whole run of byte pieces into text only if all of it is
                # valid UTF-8 (else every byte becomes U+FFFD): while the run is open and may
                # still be valid, nothing after the text before it is final, and that text
                # was settled when the run began (so no decode here, however long the run).
                return ""
        text = self._decode(self._ids)
        final, only_fffd = self._final_length(text)
        piece = text[self._emitted : final] if final > self._emitted else ""
        self._emitted = max(self._emitted, final)
        if len(self._ids) >= self._REBASE_AT:
            if final == len(text):
                self._rebase(text, held=0)
            elif only_fffd and self._emitted == final:
                # The text ends in a U+FFFD held back (an incomplete character, or one that
                # merely looks so: invalid bytes, a literal "\ufffd" token). Re-anchor anyway,
                # keeping the ids that may hold the incomplete character's bytes: without this
                # a run of such tokens (mojibake like "����", a model stuck on stray bytes) never
                # let the window shrink, so every token decoded all the ids since the run began
                # -- quadratic host work on the engine's worker thread.
                self._rebase(text, held=len(text) - final)
        return piece

    def _rebase(self, text: str, held: int) -> None:
        # Keep the shortest suffix of ids that decodes, on its own, to non-empty text ending
        # the current text; later tokens then decode after it as they would in the full sequence.
        # With `held` characters not final (a trailing U+FFFD), the suffix also keeps the last
        # _HELD_IDS ids (add() keeps ids that decode drops out of the window), and one more
        # before them: an incomplete UTF-8 character has at most 3 bytes and each such id at
        # least one, so the window still holds all of that character's bytes, starting in step
        # (its lead byte starts a new character).
        need = self._HELD_IDS + 1 if held else 0
        for k in range(max(1, need), min(self._MAX_CONTEXT + need, len(self._ids) - 1) + 1):
            context = self._ids[-k:]
            if self._byte_ids and self._run and not self._spoiled(self._trailing_run(context)):
                # (a run still open -- final only as spoiled -- must be spoiled in the window too,
                # else the next bytes could make the window's part of it valid text)
                continue
            context_text = self._decode(context)
            if self._ends(text, context_text, held):
                self._ids = context
                self._emitted = len(context_text) - held
                return
        if self._byte_ids and self._run:
            self._anchor_in_spoiled_run()

    def _anchor_in_spoiled_run(self) -> None:
        """Re-anchors a window that ends in a spoiled run no short suffix of which is spoiled
        ("\\x80" then "AAAA..." byte pieces, or a cut character then newlines as "<0x0A>"):
        every byte of the run is U+FFFD, now and as it goes on, so the window becomes one byte
        piece that no UTF-8 holds, its U+FFFD taken as emitted, and the run's next bytes are
        U+FFFD after it as in the text. (It kept all the ids since the run began, each token
        decoding them: 8,000 took 18 s of the worker's time.)"""
        spoiler = next((i for i, b in self._byte_ids.items() if 0x80 <= b < 0xC0), None)
        if spoiler is not None:
            self._ids = [spoiler]
            self._emitted = len(self._decode(self._ids))

    def _ends(self, text: str, context_text: str, held: int) -> bool:
        """Whether `text` ends in a context's text, more of it than the `held` characters. A
        byte-level context that starts inside a character decodes its first bytes each to U+FFFD
        (where the text has the character), and the rest as the text has it (a decoder resyncs
        at the next lead byte): those U+FFFD may differ, and stay the window's own, taken as
        emitted. (Else a reply of tokens that each begin inside a character, "学习" as
        "\\xa6\\xe4"-like pieces, never re-anchored: each token decoded all the ids since.) A
        ByteFallback run's bytes are all U+FFFD once one is bad: there all of it must match."""
        shown = [context_text] if self._byte_ids else [context_text, context_text.lstrip(_REPLACEMENT_CHAR)]
        return any(len(part) > held and text.endswith(part) for part in shown)

    def finalize(self) -> str:
        """Return the text still held back (e.g. an incomplete character, as U+FFFD)."""
        text = self._decode(self._ids)
        piece = text[self._emitted :]
        self._emitted = len(text)
        if piece or self._run:
            # What was held is given out now, as it decodes today; the ids that held it (the
            # start of a character, an open byte run) must not take later bytes: a completed
            # character changed text already returned, and the next piece was cut by as many
            # characters (`add` after `finalize` lost "b" of "a😀b", the bytes split).
            self._continue_text()
        return piece
