"""Small, deterministic tokenizer checkpoints in the on-disk format of real releases.

`write_tokenizer(dirpath, "bpe")` writes a Qwen3-style byte-level BPE tokenizer and
`write_tokenizer(dirpath, "spm")` a Gemma 3-style SentencePiece BPE with byte fallback.
Both are trained offline on the tiny multilingual corpus below (a few hundred tokens), so
tests can compare amlx against `transformers.AutoTokenizer` loaded from the same folder.
The function returns the number of token ids (added tokens included) so checkpoint
builders can pick a matching `vocab_size`.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = ["CORPUS", "write_tokenizer"]

# Text the toy vocabularies are learned from: English, accented Latin, Greek, Cyrillic,
# CJK, emoji, code and chat markup, so that merges exist for all of them.
CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I'm fine, thanks.",
    "Once upon a time there was a small model that learned to speak.",
    "It was the best of times, it was the worst of times.",
    "We can't stop here; this is bat country. They'd rather we'd left.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 1,000,000.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    'for i in range(10):\n\tif i % 2 == 0:\n\t\tprint("even", i)\n',
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "<tool_call>\n<think>\nThe user wants the weather.\n</think>\n",
    "You are a helpful assistant. Answer the question concisely.",
    "What is the capital of France? The capital of France is Paris.",
    "Café, naïve, résumé, façade, crème brûlée, déjà vu, piñata, jalapeño.",
    "Über die Brücke gehen wir schön langsam; Straße, Mädchen, Fußgänger.",
    "El niño comió más frutas y verduras en el año pasado. ¿Qué tal? ¡Olé!",
    "Tiếng Việt có nhiều dấu: ă â đ ê ô ơ ư, và người Việt rất thân thiện.",
    "Ελληνικά: καλημέρα κόσμε, ευχαριστώ πολύ.",
    "Русский язык: привет, мир! Как дела? Спасибо, хорошо.",
    "中文：你好，世界！今天天气很好。我们一起学习机器学习和自然语言处理。",
    "日本語：こんにちは世界。今日はいい天気ですね。ありがとうございます。",
    "한국어: 안녕하세요 세계! 오늘 날씨가 좋네요. 감사합니다.",
    "Emoji: 😀 😂 🥲 👍 🎉 ❤️ 🚀 🌍 🤖 👩‍💻 🇫🇷 ✨",
    "Mixed: I ❤️ 東京 and café ☕ at 9:30am — “quotes” and ‘single’ … done.",
    "   leading spaces, trailing spaces   \n\n\nmany newlines\r\nwindows line\t\ttabs",
    "Math: ∑ x² + √y ≤ ∞, α β γ δ, π ≈ 3.14, € £ ¥ ₹ $.",
)

# Qwen2/Qwen3 pre-tokenization pattern (it is part of the published tokenizer format).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_QWEN_TEMPLATE = """\
{%- set has_system = messages and messages[0].role == 'system' %}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if has_system %}
{{- messages[0].content + '\\n\\n' }}
{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' + tool | tojson }}
{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments' }}
{{- ' within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif has_system %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set state = namespace(last_user=-1) %}
{%- for message in messages %}
{%- if message.role == 'user' %}
{%- set state.last_user = loop.index0 %}
{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'system' %}
{%- if not loop.first %}
{{- raise_exception('A system message is only allowed first.') }}
{%- endif %}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
{%- if not reasoning and '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>assistant\\n' }}
{%- if loop.index0 > state.last_user and reasoning %}
{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}
{%- endif %}
{{- content }}
{%- for call in message.tool_calls or [] %}
{%- set fn = call.function if call.function is defined else call %}
{%- if loop.first and content %}
{{- '\\n' }}
{%- elif not loop.first %}
{{- '\\n' }}
{%- endif %}
{{- '<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' }}
{%- if fn.arguments is string %}
{{- fn.arguments }}
{%- else %}
{{- fn.arguments | tojson }}
{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
{{- '<|im_start|>user' }}
{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- else %}
{{- raise_exception('Unknown role: ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}
"""

_GEMMA_TEMPLATE = """\
{{ bos_token }}
{%- macro text_of(content) -%}
{%- if content is string -%}
{{ content }}
{%- else -%}
{%- for part in content if part.type == 'text' -%}
{{ part.text }}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}
{%- set preamble = text_of(messages[0].content) + '\\n\\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set preamble = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- if message.role not in ['user', 'assistant', 'model'] -%}
{{ raise_exception('Gemma supports only the roles user, assistant and one leading system message, got ' + message.role) }}
{%- endif -%}
{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif -%}
{{ '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\\n' }}
{%- if loop.first -%}
{{ preamble }}
{%- endif -%}
{{ text_of(message.content) | trim }}{{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""


def _added(content: str, special: bool = True) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict]:
    return {str(i): _added(t.content, t.special) for i, t in sorted(tok.get_added_tokens_decoder().items())}


@functools.lru_cache(maxsize=None)
def _build(kind: str) -> tuple[str, dict, dict | None]:
    """Train the tokenizer once per process; returns (tokenizer.json text, config, special map)."""
    if kind == "bpe":
        return _build_bpe()
    if kind == "spm":
        return _build_spm()
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'bpe' or 'spm'")


def _build_bpe() -> tuple[str, dict, None]:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(list(CORPUS) * 3, trainer=trainer)
    # Like Qwen, special tokens sit after the learned vocabulary; the tool and think
    # markers are added but not special, so skip_special_tokens keeps them.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
        ]
    )
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": _QWEN_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 40960,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    return tok.to_str(), config, None


def _build_spm() -> tuple[str, dict, dict]:
    # Learn merges on "▁"-joined words, then lay the vocabulary out as Gemma does:
    # special tokens first, then the 256 byte-fallback pieces, then the learned pieces.
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    # Keep the 160 most frequent characters (ties broken by code point, so the result is
    # deterministic); rarer ones are left to byte fallback, which the tests want to exercise.
    counts = Counter("".join(CORPUS).replace(" ", "▁"))
    alphabet = sorted(counts, key=lambda ch: (-counts[ch], ch))[:160]
    trainer = trainers.BpeTrainer(
        vocab_size=650,
        min_frequency=2,
        show_progress=False,
        limit_alphabet=len(alphabet),
        initial_alphabet=alphabet,
        special_tokens=[],
    )
    learner.train_from_iterator(list(CORPUS) * 3, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    vocab: dict[str, int] = {}
    for piece in [*specials, *byte_pieces, *sorted(learned["vocab"], key=learned["vocab"].get)]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "bos_token": "<bos>",
        "chat_template": _GEMMA_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "extra_special_tokens": {},
        "model_max_length": 32768,
        "pad_token": "<pad>",
        "sp_model_kwargs": None,
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special_map = {
        name: {"content": value, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        for name, value in (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"), ("unk_token", "<unk>"))
    }
    return tok.to_str(), config, special_map


def write_tokenizer(dirpath: str | os.PathLike, kind: str) -> int:
    """Write the tokenizer files of `kind` ("bpe" or "spm") into `dirpath`.

    Writes tokenizer.json and tokenizer_config.json (plus special_tokens_map.json for "spm",
    as Gemma releases ship one). Creates `dirpath` if needed and leaves other files alone.
    Returns the number of token ids, added tokens included.
    """
    tokenizer_json, config, special_map = _build(kind)
    out = Path(dirpath)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    if special_map is not None:
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    return Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)


def tokenizer_pairs(tmp_path_factory, prefix: str, kinds=("bpe", "spm")) -> dict:
    """kind -> (amlx Tokenizer, transformers tokenizer) of one folder written per kind."""
    import warnings

    from transformers import AutoTokenizer

    from amlx.tokenizer import Tokenizer as AmlxTokenizer

    out = {}
    for kind in kinds:
        path = tmp_path_factory.mktemp(f"{prefix}_{kind}")
        write_tokenizer(path, kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[kind] = (AmlxTokenizer.from_dir(path), AutoTokenizer.from_pretrained(path))
    return out


def streamed_pieces(tok, ids: list[int], skip: bool = False) -> tuple[list[str], int]:
    """The pieces a fresh detokenizer of amlx tokenizer `tok` streams for `ids` (finalize's
    last), and how many ids its decodes took in all (the work it did: its windows, summed)."""
    detok = tok.detokenizer(skip_special_tokens=skip)
    decoded = 0
    inner = detok._decode

    def counting(window: list[int]) -> str:
        nonlocal decoded
        decoded += len(window)
        return inner(window)

    detok._decode = counting
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finalize())
    return pieces, decoded
