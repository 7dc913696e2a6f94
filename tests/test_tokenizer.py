"""amlx.tokenizer against transformers' AutoTokenizer loaded from the same folder."""

from __future__ import annotations

import copy
import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import amlx
from amlx.errors import AmlxError, ModelLoadError
from amlx.tokenizer import ChatTemplateError, StreamingDetokenizer, Tokenizer

try:
    from tests.helpers.tokenizers import CORPUS, write_tokenizer
except ImportError:  # tests/ itself on sys.path (rootdir-less run)
    from helpers.tokenizers import CORPUS, write_tokenizer

KINDS = ("bpe", "spm")

TEXTS = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\t  \r\n",
    "Hello world",
    " Hello world",
    "Hello  world   ",
    "  leading and trailing  ",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, won't they?",
    "Café naïve résumé crème brûlée — déjà vu",
    "e\u0301 vs é (NFD vs NFC)",
    "Ελληνικά και русский язык",
    "你好，世界！今天天气很好。",
    "こんにちは世界",
    "안녕하세요",
    "😀🥲👍 🎉",
    "👩‍💻 🇫🇷 ❤️",
    "rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀 ﷽",
    "def f(x):\n    return x ** 2\n",
    "tabs\tand\ttabs\t\t",
    "numbers 1234567890 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<bos><start_of_turn>user\nhello<end_of_turn>",
    "x<think>\nhmm\n</think>\n\ny",
    "<|endoftext|><eos><pad><unk>",
    "looks <special> but </isn't>",
    "€ £ ¥ ₹ ∑ √ ∞",
    *CORPUS[:6],
]


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    vocab_size = write_tokenizer(path, request.param)
    return request.param, path, vocab_size


@pytest.fixture(scope="module")
def pair(checkpoint):
    kind, path, _ = checkpoint
    return kind, Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


# ------------------------------------------------------------------------------ helpers module


def test_helper_vocab_sizes(checkpoint):
    kind, path, vocab_size = checkpoint
    hf = AutoTokenizer.from_pretrained(path)
    assert vocab_size == len(hf) == Tokenizer.from_dir(path).vocab_size
    assert 500 <= vocab_size <= 1000


def test_helper_is_deterministic(checkpoint, tmp_path):
    kind, path, vocab_size = checkpoint
    assert write_tokenizer(tmp_path, kind) == vocab_size
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (path / name).read_bytes()


def test_helper_files_look_like_releases(checkpoint):
    kind, path, _ = checkpoint
    tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {"added_tokens_decoder", "chat_template", "eos_token", "tokenizer_class"} <= set(config)
    if kind == "bpe":
        assert tok["pre_tokenizer"]["pretokenizers"][1]["type"] == "ByteLevel"
        assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["bos_token"] is None
        assert not (path / "special_tokens_map.json").exists()
    else:
        assert tok["model"]["byte_fallback"] is True
        assert tok["normalizer"] == {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        assert config["tokenizer_class"] == "GemmaTokenizer" and config["add_bos_token"] is True
        assert (path / "special_tokens_map.json").exists()


def test_helper_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError):
        write_tokenizer(tmp_path, "wordpiece")


# ------------------------------------------------------------------------------ encode / decode


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    kind, ours, hf = pair
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=add_special_tokens) == hf.encode(
            text, add_special_tokens=add_special_tokens
        ), text


@pytest.mark.parametrize("text, at, char", [("a\ud800b", 1, "D800"), ("\udc00", 0, "DC00"),
                                           ("x" * 70_000 + "\udfff", 70_000, "DFFF")])
def test_unpaired_surrogates_are_a_value_error_naming_them(pair, text, at, char):
    """JSON's "\\ud800" decodes to a str no UTF-8 holds; the tokenizer's own TypeError named no
    cause, so encode raises ValueError with the character and where it is (long texts too,
    which take the batch call)."""
    _, ours, _ = pair
    with pytest.raises(ValueError, match=f"unpaired surrogate, U\\+{char}, at character {at}"):
        ours.encode(text)
    assert ours.encode("a\U0001F600b")  # (a surrogate pair in JSON is one character, and encodes)


def test_bos_rules(pair):
    kind, ours, _ = pair
    if kind == "spm":
        assert ours.add_bos_token and ours.encode("hi")[0] == ours.bos_token_id
        assert ours.encode("") == [ours.bos_token_id]
        assert ours.bos_token_id not in ours.encode("hi", add_special_tokens=False)
    else:
        assert not ours.add_bos_token and ours.bos_token_id is None
        assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_matches_transformers(pair, skip_special_tokens):
    kind, ours, hf = pair
    sequences = [hf.encode(text) for text in TEXTS]
    sequences += [list(range(start, ours.vocab_size, 7)) for start in range(7)]
    sequences += [[], [ours.eos_token_id], list(ours.special_token_ids)]
    for ids in sequences:
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == hf.decode(
            ids, skip_special_tokens=skip_special_tokens
        ), ids


def test_roundtrip_without_special_tokens(pair):
    kind, ours, _ = pair
    for text in TEXTS:
        if "<" in text:
            continue
        expected = unicodedata.normalize("NFC", text) if kind == "bpe" else text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == expected


def test_special_token_properties(pair):
    kind, ours, hf = pair
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.special_tokens == hf.special_tokens_map
    assert ours.eos_token_ids == {hf.eos_token_id}
    assert ours.token_to_id(hf.eos_token) == hf.eos_token_id
    assert ours.id_to_token(hf.eos_token_id) == hf.eos_token
    assert ours.token_to_id("surely-not-a-token") is None
    assert ours.id_to_token(10**6) is None
    assert len(ours) == ours.vocab_size
    assert ours.special_token_ids == set(hf.all_special_ids) | {
        i for i, t in hf.added_tokens_decoder.items() if t.special
    }


def test_eos_token_ids_gather_all_sources(checkpoint, tmp_path):
    kind, path, _ = checkpoint
    ckpt = copy_checkpoint(path, tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5], "bos_token_id": 2}))
    (ckpt / "config.json").write_text(json.dumps({"eos_token_id": 3, "text_config": {"eos_token_id": [6]}}))
    ours = Tokenizer.from_dir(ckpt)
    assert ours.eos_token_ids == {1, 3, 5, 6, ours.eos_token_id}


def test_bos_eos_follow_tokenizer_json_not_config_flags(checkpoint, tmp_path):
    # transformers 5 ignores add_bos_token/add_eos_token in tokenizer_config.json when a
    # tokenizer.json exists; only its post-processor decides. Dict-valued tokens still work.
    kind, path, _ = checkpoint
    ckpt = copy_checkpoint(path, tmp_path / "ckpt")
    eos = "<|im_end|>" if kind == "bpe" else "<eos>"
    edit_json(
        ckpt / "tokenizer_config.json",
        add_eos_token=True,
        add_bos_token=kind == "bpe",
        eos_token={"__type": "AddedToken", "content": eos, "lstrip": False, "normalized": False,
                   "rstrip": False, "single_word": False, "special": True},
    )
    ours, hf = Tokenizer.from_dir(ckpt), AutoTokenizer.from_pretrained(ckpt)
    assert ours.eos_token == eos
    for text in ("hello there", "", "😀"):
        assert ours.encode(text) == hf.encode(text)
        assert ours.encode(text)[-1:] != [ours.eos_token_id]

    tok = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    eos_id = ours.eos_token_id
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {eos: {"id": eos, "ids": [eos_id], "tokens": [eos]}},
    }
    (ckpt / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    ours, hf = Tokenizer.from_dir(ckpt), AutoTokenizer.from_pretrained(ckpt)
    for text in ("hello there", "", "😀"):
        assert ours.encode(text) == hf.encode(text)
        assert ours.encode(text)[-1] == eos_id
    assert not ours.add_bos_token


def test_config_tokens_missing_from_tokenizer_json_are_added(checkpoint, tmp_path):
    kind, path, _ = checkpoint
    ckpt = copy_checkpoint(path, tmp_path / "ckpt")
    edit_json(ckpt / "tokenizer_config.json", sep_token="<|sep|>")
    ours, hf = Tokenizer.from_dir(ckpt), AutoTokenizer.from_pretrained(ckpt)
    assert ours.vocab_size == len(hf)
    assert ours.encode("a<|sep|>b") == hf.encode("a<|sep|>b")


# ------------------------------------------------------------------------------ chat templates

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there 👋"}],
    [
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Salut ! Ça va ?"},
        {"role": "user", "content": "très bien, 谢谢"},
    ],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four.", "tool_calls": None},
        {"role": "user", "content": "  and 3+3?  "},
    ],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city — « précis »",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        },
    }
]

TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools when helpful."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'}},
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 19}'},
    {"role": "assistant", "content": "<think>\nBoth are mild.\n</think>\n\nIt is 21 °C in Zürich."},
    {"role": "user", "content": "Thanks"},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(pair, conversation, add_generation_prompt):
    kind, ours, hf = pair
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert ours.encode(expected, add_special_tokens=False) == hf.encode(expected, add_special_tokens=False)


def test_chat_template_default_adds_generation_prompt(pair):
    kind, ours, hf = pair
    messages = CONVERSATIONS[0]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_bpe_template_tools_and_thinking(pair, enable_thinking, add_generation_prompt):
    kind, ours, hf = pair
    if kind != "bpe":
        pytest.skip("Qwen-style template only")
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    reasoned = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A.", "thinking": "hmm\n"}]
    cases = ((TOOL_CONVERSATION, TOOLS), (CONVERSATIONS[3], None), (CONVERSATIONS[1], TOOLS), (reasoned, None))
    for messages, tools in cases:
        expected = hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
        got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra)
        assert got == expected
    assert "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nA.<|im_end|>" in got
    if add_generation_prompt:
        assert got.endswith("<think>\n\n</think>\n\n") == (enable_thinking is False)
    assert '"description": "Current weather in a city — « précis »"' in ours.apply_chat_template(
        CONVERSATIONS[0], tools=TOOLS
    )


def test_spm_template_content_parts_and_errors(pair):
    kind, ours, hf = pair
    if kind != "spm":
        pytest.skip("Gemma-style template only")
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
    ]
    assert ours.apply_chat_template(parts) == hf.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(parts).startswith("<bos><start_of_turn>user\nBe brief.\n\nHi there")

    bad_role = [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]
    not_alternating = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for messages, message in ((bad_role, "only the roles"), (not_alternating, "must alternate")):
        with pytest.raises(Exception, match=message):
            hf.apply_chat_template(messages, tokenize=False)
        with pytest.raises(ChatTemplateError, match=message) as info:
            ours.apply_chat_template(messages)
        assert isinstance(info.value, ValueError) and isinstance(info.value, AmlxError)


def test_chat_template_kwargs_override_special_tokens(pair):
    kind, ours, hf = pair
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ flavour }}|{{ documents }}|{{ tools }}"
    for kwargs in ({"flavour": "vanilla"}, {"flavour": 1, "eos_token": "<custom>"}):
        assert ours.apply_chat_template(CONVERSATIONS[0], chat_template=template, **kwargs) == hf.apply_chat_template(
            CONVERSATIONS[0], chat_template=template, tokenize=False, **kwargs
        )


def test_tojson_and_helpers_match_transformers(pair):
    kind, ours, hf = pair
    template = (
        "{{ messages | tojson }}\n{{ messages[0] | tojson(indent=2) }}\n{{ {'b': 1, 'a': '<&>'} | tojson }}\n"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% if loop.index > 1 %}"
        "{% break %}{% endif %}{% endfor %}{{ ns.n }}\n{{ strftime_now('%Y') | length }}\n"
        "{% generation %}{{ 'generated' }}{% endgeneration %}\n{{ messages[0].thinking }}"
    )
    messages = [{"role": "user", "content": "ünïcödé 😀 \"quoted\"", "reasoning": "r", "name": None}]
    got = ours.apply_chat_template(messages, chat_template=template)
    assert got == hf.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert "ünïcödé 😀" in got and "\\u" not in got and '"name"' not in got


def test_chat_template_jinja_file_and_named_templates(checkpoint, tmp_path):
    kind, path, _ = checkpoint
    ckpt = copy_checkpoint(path, tmp_path / "ckpt")
    (ckpt / "chat_template.jinja").write_text("FILE:{% for m in messages %}{{ m.content }}{% endfor %}")
    ours, hf = Tokenizer.from_dir(ckpt), AutoTokenizer.from_pretrained(ckpt)
    assert ours.apply_chat_template(CONVERSATIONS[2]) == hf.apply_chat_template(
        CONVERSATIONS[2], tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(CONVERSATIONS[2]).startswith("FILE:")

    (ckpt / "chat_template.jinja").unlink()
    edit_json(
        ckpt / "tokenizer_config.json",
        chat_template=[
            {"name": "default", "template": "D{{ messages[0].content }}"},
            {"name": "tool_use", "template": "T{{ tools | length }}"},
        ],
    )
    ours, hf = Tokenizer.from_dir(ckpt), AutoTokenizer.from_pretrained(ckpt)
    for tools in (None, TOOLS):
        assert ours.apply_chat_template(CONVERSATIONS[0], tools=tools) == hf.apply_chat_template(
            CONVERSATIONS[0], tools=tools, tokenize=False, add_generation_prompt=True
        )
    assert ours.apply_chat_template(CONVERSATIONS[0], chat_template="tool_use", tools=TOOLS) == "T1"


def test_template_failures_are_chat_template_errors(pair):
    kind, ours, _ = pair
    with pytest.raises(ChatTemplateError, match="TemplateSyntaxError"):
        ours.apply_chat_template(CONVERSATIONS[0], chat_template="{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="TypeError"):
        ours.apply_chat_template(CONVERSATIONS[0], chat_template="{{ 'a' + 1 }}")
    with pytest.raises(ChatTemplateError, match="list of"):
        ours.apply_chat_template({"role": "user", "content": "hi"})


def test_missing_chat_template_is_a_value_error(checkpoint, tmp_path):
    kind, path, _ = checkpoint
    ckpt = copy_checkpoint(path, tmp_path / "ckpt")
    config = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_dir(ckpt)
    assert ours.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="empty"):
        Tokenizer.from_dir(path).apply_chat_template([])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{% set x = messages.append({'role': 'x'}) %}",
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
        "{{ (1).__class__.__base__.__subclasses__() }}",
    ],
)
def test_sandbox_refuses_unsafe_templates(pair, template):
    kind, ours, _ = pair
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError):
        ours.apply_chat_template(messages, chat_template=template)
    assert messages == [{"role": "user", "content": "hi"}]


def test_sandbox_hides_dunder_attributes(pair):
    # Like transformers (same sandbox), a lone unsafe attribute renders as undefined: nothing leaks.
    kind, ours, hf = pair
    template = "[{{ messages.__class__ }}][{{ raise_exception.__globals__ }}][{{ messages[0]._private }}]"
    assert ours.apply_chat_template(CONVERSATIONS[0], chat_template=template) == "[][][]"
    assert hf.apply_chat_template(CONVERSATIONS[0], chat_template=template, tokenize=False) == "[][][]"


def test_template_inputs_are_plain_data(pair):
    kind, ours, _ = pair

    class Sneaky:
        def __str__(self):
            return "sneaky"

        def run(self):  # a template must not be able to reach this
            raise AssertionError("called")

    got = ours.apply_chat_template(
        [{"role": "user", "content": "hi", "obj": Sneaky()}],
        chat_template="{{ messages[0].obj }}{{ messages[0].obj.run }}",
    )
    assert got == "<Sneaky>"


# ------------------------------------------------------------------------------ template limits

# A Llama-3.1-style and a Mistral-style template (written for these tests in the shape of the
# released ones: system message handling, tools as JSON, loop.first/last, strict alternation).
LLAMA3_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\nToday Date: " + date_string + "\n\n" }}
{%- if tools is not none %}
    {{- "You have access to these functions:\n\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.tool_calls is defined and message.tool_calls %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + call.name + '", "parameters": ' }}
        {{- call.arguments | tojson + '}<|eot_id|>' }}
    {%- elif message.role == 'tool' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" + message.content | trim + "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim }}
        {{- '<|eot_id|>' }}{% if loop.last and not add_generation_prompt %}{{ '' }}{% endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

MISTRAL_STYLE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

ALTERNATING = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi — ça va ?"},
    {"role": "assistant", "content": "Oui. 😀"},
    {"role": "user", "content": "  Tell me a story.  "},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template", [LLAMA3_STYLE, MISTRAL_STYLE], ids=["llama3", "mistral"])
def test_more_template_styles_match_transformers(pair, template, add_generation_prompt):
    kind, ours, hf = pair
    cases = [(ALTERNATING, None), (ALTERNATING[1:], None)]
    if template is LLAMA3_STYLE:
        cases += [(TOOL_CONVERSATION[:4], TOOLS), (CONVERSATIONS[0], TOOLS)]
    for messages, tools in cases:
        expected = hf.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        got = ours.apply_chat_template(messages, tools=tools, chat_template=template,
                                       add_generation_prompt=add_generation_prompt)
        assert got == expected
    with pytest.raises(ChatTemplateError, match="alternate"):
        ours.apply_chat_template(ALTERNATING[1:2] * 2, chat_template=MISTRAL_STYLE)


def test_counted_loops_keep_jinja_semantics(pair):
    """The counting hooks leave loop features, macros, blocks and concatenation as they were."""
    kind, ours, hf = pair
    template = (
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }}/{{ loop.revindex }}{{ loop.cycle('a', 'b') }}"
        "{% if not loop.first %}<{{ loop.previtem.role }}>{% endif %}{% if loop.last %}!{% endif %}"
        "{% else %}empty{% endfor %}|{% for x in [] %}x{% else %}none{% endfor %}|"
        "{% for x in [[1, [2]], [3]] recursive %}({{ x if x is number else loop(x) }}){% endfor %}|"
        "{% macro box(t) %}[{{ t ~ caller() }}]{% endmacro %}{% call box('k') %}{{ 2 * 3 }}{% endcall %}|"
        "{% set block %}{% for m in messages | selectattr('role', 'equalto', 'user') %}{{ m.content[:2] }}"
        "{% endfor %}{% endset %}{{ block | upper }}|{{ ('ab' ~ 1) * 2 + 'c' }}|{{ '%5s|%-3d' % ('x', 4) }}|"
        "{{ '{:>4}'.format(7) }}|{{ 'x'.center(5) }}|{{ [1, 2] + [3] }}|{{ 2 ** 10 }}|{{ 7 % 4 }}"
    )
    for messages in (CONVERSATIONS[0], CONVERSATIONS[1]):
        expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False)
        assert ours.apply_chat_template(messages, chat_template=template) == expected


RUNAWAY_TEMPLATES = {
    # issue 12.2: these froze the event loop for 45 s and 27 s (9.6 GB)
    "nested ranges": ("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}", "steps"),
    "quiet nested ranges": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                            "steps"),
    "string repetition": ("{{ 'a' * 10**10 }}", "repetition"),
    "list repetition": ("{% set x = [0] * 10**9 %}", "repetition"),
    "repetition in a variable": ("{% set n = 10**10 %}{{ n * 'a' }}", "repetition"),
    "huge output": ("{% for i in range(100000) %}{{ messages[0].content * 10 }}{% endfor %}", "output"),
    "output captured in a macro": ("{% macro m() %}{% for i in range(100000) %}" + "y" * 100
                                   + "{% endfor %}{% endmacro %}{% set s = m() %}", "output"),
    "doubling by ~": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                      "{% endfor %}", "concatenation"),
    "doubling by +": ("{% set ns = namespace(s=['ab']) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}", "concatenation"),
    "huge integer power": ("{{ 3 ** 100000000 }}", "power"),  # Jinja's ** groups to the left
    "power of powers": ("{{ (10 ** 10) ** (10 ** 10) }}", "power"),
    "squaring": ("{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
                 "product"),
    "center filter": ("{{ 'a' | center(10**10) }}", "center"),
    "indent filter": ("{{ 'a\nb' | indent(10**9) }}", "indent"),
    "replace filter": ("{{ ('a' * 100000) | replace('', 'b' * 1000) }}", "replace"),
    "join filter": ("{{ range(100000) | join('x' * 1000) }}", "join"),
    "batch filter": ("{{ [1] | batch(10**10, 0) | list }}", "batch"),
    "slice filter": ("{{ [1] | slice(10**10) | list }}", "slice"),
    "printf width": ("{{ '%10000000000d' % 1 }}", "width"),
    "printf star width": ("{{ '%*d' % (10**10, 1) }}", "'\\*'"),
    "format filter width": ("{{ '%10000000000s' | format('a') }}", "width"),
    "str.format width": ("{{ '{:>10000000000}'.format(1) }}", "width"),
    "str.format nested width": ("{{ '{:{}}'.format(1, 10**10) }}", "nested"),
    "str.ljust": ("{{ 'a'.ljust(10**10) }}", "ljust"),
    "str.zfill": ("{{ 'a'.zfill(10**10) }}", "zfill"),
    "str.join": ("{{ ('x' * 1000).join(range(100000) | map('string')) }}", "join"),
    "str.replace": ("{{ ('a' * 100000).replace('', 'b' * 1000) }}", "replace"),
    "str.expandtabs": ("{{ ('\t' * 1000).expandtabs(10**9) }}", "expandtabs"),
    "tojson indent": ("{{ messages | tojson(indent=10**9) }}", "indent"),
    "doubling list literal": ("{% set ns = namespace(x=messages) %}{% for i in range(64) %}"
                              "{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ ns.x }}", "literal"),
    "doubling dict literal": ("{% set ns = namespace(x=1) %}{% for i in range(64) %}"
                              "{% set ns.x = {'a': ns.x, 'b': ns.x} %}{% endfor %}{{ ns.x | tojson }}", "literal"),
    "doubling by dict()": ("{% set ns = namespace(x='abc') %}{% for i in range(64) %}"
                           "{% set ns.x = dict(a=ns.x, b=ns.x) %}{% endfor %}{{ ns.x }}", "call"),
    "repeating a list of lists": ("{% set x = [messages] * 100000 %}", "repetition"),
    "bytes repetition": ("{{ 'a'.encode() * 10**10 }}", "repetition"),
    "str.translate": ("{{ ('a' * 100000).translate({97: 'b' * 100000}) }}", "translate"),
    "summing lists": ("{{ range(100000) | map('string') | map('list') | sum(start=[]) | length }}", "built more"),
    "lipsum": ("{{ lipsum(10**9) }}", "lipsum"),
}


@pytest.mark.parametrize("name", sorted(RUNAWAY_TEMPLATES))
def test_runaway_templates_raise_chat_template_error(pair, name):
    """Each would run for minutes or take gigabytes; they raise ChatTemplateError instead
    (no timing is asserted: that they end with the error is the test)."""
    kind, ours, _ = pair
    template, reason = RUNAWAY_TEMPLATES[name]
    messages = [{"role": "user", "content": "0123456789" * 10}]
    with pytest.raises(ChatTemplateError, match=reason) as info:
        ours.apply_chat_template(messages, chat_template=template)
    assert isinstance(info.value, amlx.ChatTemplateError) and isinstance(info.value, ValueError)


def test_allocations_add_up_to_a_limit(pair):
    """Many objects each under the size limit still count towards the allocation budget."""
    kind, ours, _ = pair
    from amlx.chat_template import TemplateLimits

    ours = copy.copy(ours)
    ours.template_limits = TemplateLimits(max_output=1 << 16)
    template = ("{% set ns = namespace(n=0) %}{% for i in range(10000) %}"
                "{% set ns.n = ns.n + (messages[0].content * 500) | length %}{% endfor %}{{ ns.n }}")
    messages = [{"role": "user", "content": "0123456789" * 10}]
    with pytest.raises(ChatTemplateError, match="built more"):
        ours.apply_chat_template(messages, chat_template=template)
    assert ours.apply_chat_template(messages, chat_template=template.replace("10000", "20")) == "1000000"


def test_recursive_loops_count_their_items(pair):
    """`loop(items)` in a recursive for runs a new level over items the template chose:
    those iterations are steps too (1e10 of them here, under a smaller step budget)."""
    kind, ours, _ = pair
    from amlx.chat_template import TemplateLimits

    ours = copy.copy(ours)
    ours.template_limits = TemplateLimits(max_steps=200_000, max_seconds=600)
    template = ("{% for x in [0] recursive %}{% if loop.depth < 3 %}{{ loop(range(100000)) }}{% endif %}"
                "{% endfor %}")
    with pytest.raises(ChatTemplateError, match="steps"):
        ours.apply_chat_template(CONVERSATIONS[0], chat_template=template)


def test_time_budget_is_checked_inside_loops(pair):
    kind, ours, _ = pair
    from amlx.chat_template import TemplateLimits

    ours = copy.copy(ours)
    ours.template_limits = TemplateLimits(max_seconds=0.0)  # any step is over time
    with pytest.raises(ChatTemplateError, match="longer than"):
        ours.apply_chat_template(CONVERSATIONS[0], chat_template="{% for m in messages %}{{ m.role }}{% endfor %}")
    assert Tokenizer.template_limits.max_seconds > 0  # the class default is untouched


def test_limits_leave_long_conversations_alone(pair):
    """The output limit grows with the inputs: a conversation of 6 MB renders."""
    kind, ours, hf = pair
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} " + "word " * 40000}
                for i in range(31)]
    got = ours.apply_chat_template(messages)
    assert len(got) > 6_000_000
    assert got == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------ streaming


def stream(ours: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    detok = ours.detokenizer(skip_special_tokens=skip_special_tokens)
    assert isinstance(detok, StreamingDetokenizer)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finalize())
    return pieces


def assert_stream_ok(ours: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> None:
    pieces = stream(ours, ids, skip_special_tokens)
    full = ours.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == full
    for i, piece in enumerate(pieces[:-1]):
        # Emitted text is final: it must survive as a prefix of every longer decode.
        assert full.startswith("".join(pieces[: i + 1]))
        if "\ufffd" not in full:
            assert "\ufffd" not in piece


def test_stream_examples(pair):
    kind, ours, _ = pair
    for text in TEXTS + list(CORPUS):
        ids = ours.encode(text)
        for skip in (False, True):
            assert_stream_ok(ours, ids, skip)


def test_stream_holds_partial_characters(pair):
    kind, ours, _ = pair
    text = "a𝔘😀b"  # not in either vocabulary as whole characters
    ids = ours.encode(text, add_special_tokens=False)
    pieces = stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p] and len(ids) > 4  # several byte-ish tokens per character


def test_stream_byte_fallback_runs_are_all_or_nothing(pair):
    kind, ours, _ = pair
    if kind != "spm":
        pytest.skip("ByteFallback decoder only")
    byte = {b: ours.token_to_id(f"<0x{b:02X}>") for b in (0xE2, 0x82, 0xAC, 0x80)}
    a = ours.encode("a", add_special_tokens=False)
    complete = [byte[0xE2], byte[0x82], byte[0xAC]]
    for ids in (complete + a, complete + [byte[0x80]] + a, complete + [ours.eos_token_id, byte[0x80]] + a):
        for skip in (False, True):
            assert_stream_ok(ours, ids, skip)
    assert ours.decode(complete + [byte[0x80]]) == "\ufffd" * 4  # a later byte spoils the "€"


def test_stream_leading_spaces(pair):
    kind, ours, _ = pair
    for text in (" hello", "  two", "a b  c   d", " ", "\u3000x", "▁literal"):
        ids = ours.encode(text)
        assert_stream_ok(ours, ids)
        assert_stream_ok(ours, ids, skip_special_tokens=True)


def longest_window(ours: Tokenizer, ids: list[int]) -> int:
    detok, pieces, longest = ours.detokenizer(), [], 0
    for i in ids:
        pieces.append(detok.add(i))
        longest = max(longest, len(detok._ids))
    pieces.append(detok.finalize())
    assert "".join(pieces) == ours.decode(ids)
    return longest


def test_stream_window_stays_small(pair):
    # Only recent ids are decoded: the window is bounded by a few ids of context plus the
    # longest run of not-yet-final ids (e.g. byte pieces of an emoji), whatever the length.
    kind, ours, _ = pair
    once = ours.encode(" ".join(CORPUS))
    many = ours.encode(" ".join(CORPUS) * 5)
    assert len(many) > 2000
    assert longest_window(ours, many) == longest_window(ours, once) <= 32
    assert longest_window(ours, ours.encode("plain ascii words only " * 50)) <= 8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40), skip=st.booleans())
def test_stream_property_random_text(pair, text, skip):
    kind, ours, _ = pair
    assert_stream_ok(ours, ours.encode(text), skip)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_stream_property_random_ids(pair, data, skip):
    kind, ours, _ = pair
    # Arbitrary id sequences include lone and misordered byte tokens and special tokens.
    byte_ids = [i for i in (ours.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None]
    pool = st.one_of(st.integers(0, ours.vocab_size - 1), st.sampled_from(byte_ids or [0]))
    ids = data.draw(st.lists(pool, max_size=30))
    assert_stream_ok(ours, ids, skip)


# ------------------------------------------------------------------------------ load errors


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_missing_tokenizer_json(checkpoint, tmp_path):
    kind, path, _ = checkpoint
    ckpt = copy_checkpoint(path, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json") as info:
        Tokenizer.from_dir(ckpt)
    assert str(ckpt / "tokenizer.json") in str(info.value) and "not found" in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("tokenizer.json", '{"version": "1.0", "model": ', "invalid JSON"),
        ("tokenizer.json", '{"model": {"type": "Nope"}}', "not a valid tokenizer"),
        ("tokenizer.json", b"\xff\xfe\x00garbage", "tokenizer.json"),
        ("tokenizer_config.json", "{not json", "invalid JSON"),
        ("tokenizer_config.json", "[1, 2]", "expected a JSON object"),
        ("generation_config.json", "{", "invalid JSON"),
        ("config.json", '{"eos_token_id": ', "invalid JSON"),
        ("special_tokens_map.json", "nope", "invalid JSON"),
        ("chat_template.jinja", b"{{ \xff\xfe }}", "cannot read"),
    ],
)
def test_corrupt_files_name_the_file(checkpoint, tmp_path, name, content, reason):
    kind, path, _ = checkpoint
    ckpt = copy_checkpoint(path, tmp_path / "ckpt")
    target = ckpt / name
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content, encoding="utf-8")
    with pytest.raises(ModelLoadError, match=reason) as info:
        Tokenizer.from_dir(ckpt)
    assert str(target) in str(info.value)
