"""amlx.toolcalls: the three tool-call formats, whole and streamed in any split."""

from __future__ import annotations

import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from amlx.toolcalls import ToolCallParser, detect_format, parse_tool_calls
from tests.helpers.tokenizers import _QWEN_TEMPLATE

CASES = [
    ("qwen", 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
             '<tool_call>{"name": "now", "arguments": {}}</tool_call> done',
     "Sure.  done", [("get_weather", {"city": "Paris"}), ("now", {})]),
    ("qwen", "no calls here, just <tool text", "no calls here, just <tool text", []),
    ("qwen", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ("llama3", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}', "",
     [("a", {"x": 1}), ("b", {})]),
    ("llama3", 'The JSON {"name": "a"} is not a call', 'The JSON {"name": "a"} is not a call', []),
    ("llama3", '{"key": "value"}', '{"key": "value"}', []),
    ("mistral", 'Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
     "Let me check.", [("get_weather", {"city": "Paris"})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [("get_weather", {"city": "Paris"})]),
    ("mistral", "[TOOL_CALLS] oops", "[TOOL_CALLS] oops", []),
    (None, '<tool_call>{"name": "a", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "a", "arguments": {}}</tool_call>', []),
]


def _check(fmt, content, calls, want_content, want_calls):
    assert content == want_content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == want_calls
    # (Mistral's chat templates take only 9 alphanumeric characters as a call's id)
    assert all(re.fullmatch("[0-9A-Za-z]{9}", c.id) if fmt == "mistral" else c.id.startswith("call_") for c in calls)


def test_whole_texts():
    for fmt, text, want_content, want_calls in CASES:
        _check(fmt, *parse_tool_calls(text, fmt), want_content, want_calls)


@settings(max_examples=200, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_streamed_in_any_split(case, cuts):
    fmt, text, want_content, want_calls = case
    _check(fmt, *_streamed(fmt, text, cuts), want_content, want_calls)


def _streamed(fmt, text, cuts):
    """(content, calls) of `text` fed to a parser in pieces cut at `cuts`."""
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    parser = ToolCallParser(fmt)
    events = []
    for a, b in zip(bounds, bounds[1:]):
        events += parser.feed(text[a:b])
    events += parser.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if not isinstance(e, str)]


# markup, JSON fragments and plain text that a model's reply may mix in any order
_PIECES = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "{", "}", "[", "]", '"name"',
           ":", '"f"', '"arguments"', '"parameters"', ",", "null", " ", "\n", "text", "<tool_", "call>", '"', "😀",
           '{"name": "f", "arguments": {"a": 1}}', '{"name": "g", "parameters": {}}', '[{"name": "h", "arguments": {}}]']


@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from(["qwen", "llama3", "mistral"]), pieces=st.lists(st.sampled_from(_PIECES), max_size=12),
       cuts=st.lists(st.integers(0, 300), max_size=12))
def test_any_reply_streams_as_it_parses_whole(fmt, pieces, cuts):
    """Whatever a reply mixes, fed in any split it gives the content and calls its whole-text
    parse gives, and never raises."""
    text = "".join(pieces)
    want_content, want_calls = parse_tool_calls(text, fmt)
    content, calls = _streamed(fmt, text, cuts)
    assert content == want_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in want_calls]


def test_plain_text_passes_at_once():
    parser = ToolCallParser("qwen")
    assert parser.feed("Hello there") == ["Hello there"]
    assert parser.feed(" <tool") == [" "]  # only a possible marker start waits
    assert parser.feed("box>") == ["<toolbox>"]


def test_detect_format():
    assert detect_format(_QWEN_TEMPLATE) == "qwen"
    assert detect_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_format('<|start_header_id|>{{ "parameters" }}') == "llama3"
    assert detect_format("{{ '<|python_tag|>' }}") == "llama3"
    assert detect_format("{{ messages }}") is None and detect_format(None) is None
    assert detect_format({"default": "x", "tool_use": "<tool_call>"}) == "qwen"


async def test_completion_tool_calls(tmp_path):
    """Model.complete parses the calls of the chat template's format into Completion.tool_calls."""
    import amlx
    from tests.helpers.serving import TOOL_CALL_JSON, serve_checkpoint, tool_checkpoint

    messages = [{"role": "user", "content": "Weather in Paris?"}]
    async with await amlx.load(tool_checkpoint(tmp_path / "tools")) as model:
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        result = await model.complete(model.tokenizer.encode(prompt, add_special_tokens=False), max_tokens=8)
        assert "<tool_call>" in result.text  # the text keeps the call; tool_calls has it parsed
        [call] = result.tool_calls
        assert (call.name, json.loads(call.arguments)) == ("get_weather", json.loads(TOOL_CALL_JSON)["arguments"])
    async with await amlx.load(serve_checkpoint(tmp_path / "plain")) as model:
        assert (await model.complete(messages, max_tokens=8)).tool_calls is None


def test_overflowing_numbers_never_give_invalid_json_arguments():
    """1e400 reads as float('inf'), which json.dumps wrote as `Infinity`: arguments that a
    client's JSON.parse refuses. Such a call is given back as text, as one with NaN is."""
    for fmt, text in [("qwen", '<tool_call>{"name": "f", "arguments": {"a": 1e400}}</tool_call>'),
                      ("qwen", '<tool_call>{"name": "f", "arguments": "{\\"a\\": -1e400}"}</tool_call>'),
                      ("llama3", '{"name": "f", "parameters": {"a": [1e999]}}'),
                      ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1e400}')]:
        for content, calls in (parse_tool_calls(text, fmt), _streamed(fmt, text, [5, 17])):
            assert (content, calls) == (text, []), fmt
    content, [call] = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"a": 1e300}}</tool_call>', "qwen")
    assert json.loads(call.arguments, parse_constant=lambda c: 1 / 0) == {"a": 1e300}


def test_mistral_markers_inside_argument_strings():
    """An argument string may hold "[ARGS]" or "[TOOL_CALLS]" (a model explaining Mistral's
    format, say). Any "[ARGS]" in the text sent the JSON-list form down the `name[ARGS]{...}`
    path, and a "[TOOL_CALLS]" in the arguments split that form's call in two: either way the
    calls came back as text."""
    for text, want in [
            ('[TOOL_CALLS][{"name": "f", "arguments": {"q": "see [ARGS] here"}}]', [("f", {"q": "see [ARGS] here"})]),
            ('[TOOL_CALLS]f[ARGS]{"q": "a [TOOL_CALLS] b"}', [("f", {"q": "a [TOOL_CALLS] b"})]),
            ('[TOOL_CALLS]f[ARGS]{"q": "x [ARGS] y"} [TOOL_CALLS] g[ARGS] {}', [("f", {"q": "x [ARGS] y"}), ("g", {})])]:
        _check("mistral", *parse_tool_calls(text, "mistral"), "", want)
        _check("mistral", *_streamed("mistral", text, [3, 20, 31]), "", want)
    for text in ('[TOOL_CALLS]f[ARGS]{"q": 1} trailing', "[TOOL_CALLS]f[ARGS]"):
        _check("mistral", *parse_tool_calls(text, "mistral"), text, [])
    # a reply that ends at the next call's marker: the complete call stays one, as Qwen's before a
    # cut call (tests/test_known_defects_fixed.py)
    _check("mistral", *parse_tool_calls('[TOOL_CALLS]f[ARGS]{"q": 1}[TOOL_CALLS]', "mistral"), "[TOOL_CALLS]",
           [("f", {"q": 1})])


def test_qwen_close_tag_inside_argument_strings():
    """An argument string may hold "</tool_call>" (a model explaining Qwen's format, say). The
    call was cut at the first "</tool_call>", inside the string, so its JSON did not parse and
    the whole call came back as text; streamed, the splitter cut there as well."""
    for text, want_content, want in [
            ('<tool_call>{"name": "f", "arguments": {"q": "a </tool_call> b"}}</tool_call>', "",
             [("f", {"q": "a </tool_call> b"})]),
            ('Hi <tool_call>\n{"name": "f", "arguments": {"q": "x\\" </tool_call>"}}\n</tool_call> and'
             '<tool_call>{"name": "g", "arguments": "{\\"s\\": \\"</tool_call>\\"}"}</tool_call>', "Hi  and",
             [("f", {"q": 'x" </tool_call>'}), ("g", {"s": "</tool_call>"})])]:
        _check("qwen", *parse_tool_calls(text, "qwen"), want_content, want)
        for cuts in ([], [3, 20, 31, 40], list(range(len(text)))):
            _check("qwen", *_streamed("qwen", text, cuts), want_content, want)
    # what is not a call stays text, whole and streamed alike
    for text in ('<tool_call>{"name": "f", "arguments": {}} junk</tool_call>',
                 '<tool_call>{"name": "f", "arguments": {"q": "open </tool_call> tail'):
        _check("qwen", *parse_tool_calls(text, "qwen"), text, [])
        _check("qwen", *_streamed("qwen", text, [4, 15, 33]), text, [])


# ---------------------------------------------------------------------------------------------
# gaps closed: unclosed Qwen calls at the end, Mistral v11+ forms, "" arguments, reasoning

def _both(fmt, text, **kw):
    """(content, calls) of `text` whole, and fed in pieces of one character, of three, and at
    a few cuts: all four must agree, so each is returned for the caller to check once."""
    whole = parse_tool_calls(text, fmt, **kw)
    out = [whole]
    for cuts in (list(range(len(text))), list(range(0, len(text), 3)), [5, 17, 40]):
        bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
        parser = ToolCallParser(fmt, **kw)
        events = []
        for a, b in zip(bounds, bounds[1:]):
            events += parser.feed(text[a:b])
        events += parser.finish()
        out.append(("".join(e for e in events if isinstance(e, str)), [e for e in events if not isinstance(e, str)]))
    for content, calls in out[1:]:
        assert content == whole[0]
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole[1]]
    return whole


def test_qwen_unclosed_call_at_the_end_is_a_call():
    """A reply that ends (EOS, a stop string such as "</tool_call>", or max_tokens) right after
    a whole call's JSON, without `</tool_call>`, has that call: the JSON is complete, only the
    close tag is missing (vLLM's Hermes parser reads it so too). It was content."""
    for text, want_content, want in [
            ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', "",
             [("get_weather", {"city": "Paris"})]),
            ('Sure. <tool_call>{"name": "a", "arguments": {}}</tool_call> <tool_call>\n{"name": "b", '
             '"arguments": {"x": [1, "}"]}}\n\n', "Sure.  ", [("a", {}), ("b", {"x": [1, "}"]})]),
            ('<tool_call>{"name": "f", "arguments": "{\\"q\\": 2}"} ', "", [("f", {"q": 2})])]:
        _check("qwen", *_both("qwen", text), want_content, want)
    # but only a whole call, and only at the very end: anything else stays text, as before
    for text in ('<tool_call>{"name": "f", "arguments": {"q": 1}', '<tool_call>{"name": "f", "arguments": {}} and',
                 '<tool_call>{"name": "f", "arguments": {}}</tool_ca', '<tool_call>{"key": "value"}',
                 '<tool_call>', '<tool_call>{"name": "f", "arguments": {}}{"name": "g", "arguments": {}}'):
        _check("qwen", *_both("qwen", text), text, [])


def test_mistral_v11_and_later_forms():
    """Mistral's tokenizers v11+ write each call as `[TOOL_CALLS]name[ARGS]{...}`, with
    `[CALL_ID]id` before `[ARGS]` in templates that carry ids (v11), and without the control
    tokens when they are dropped: `[TOOL_CALLS]name{...}`. The [CALL_ID] and bare forms stayed
    content. The model's own id is not kept: ids are amlx's 9-character ones, unique."""
    for text, want_content, want in [
            ('[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris"}', "",
             [("get_weather", {"city": "Paris"})]),
            ('Checking.[TOOL_CALLS]f[CALL_ID]123456789[ARGS]{"q": "[CALL_ID]x[ARGS]{}"}[TOOL_CALLS]g[CALL_ID]'
             'abcdefghi[ARGS]{}', "Checking.", [("f", {"q": "[CALL_ID]x[ARGS]{}"}), ("g", {})]),
            ('[TOOL_CALLS]get_weather{"city": "Paris"}[TOOL_CALLS]now{}', "",
             [("get_weather", {"city": "Paris"}), ("now", {})]),
            ('[TOOL_CALLS] f {"a": 1} [TOOL_CALLS]g[ARGS]{"b": 2}', "", [("f", {"a": 1}), ("g", {"b": 2})])]:
        content, calls = _both("mistral", text)
        _check("mistral", content, calls, want_content, want)
        assert "a1B2c3D4e" not in [c.id for c in calls] and len({c.id for c in calls}) == len(calls)
    for text in ('[TOOL_CALLS]f[CALL_ID][ARGS]{}', '[TOOL_CALLS]f[CALL_ID]my id[ARGS]{}',
                 '[TOOL_CALLS]f[CALL_ID]abc{}', '[TOOL_CALLS]f[OTHER]{}', '[TOOL_CALLS]two words{"a": 1}',
                 '[TOOL_CALLS]f{"a": 1', '[TOOL_CALLS]f{"a": 1} more'):
        _check("mistral", *_both("mistral", text), text, [])


def test_empty_string_arguments_are_no_arguments():
    """`"arguments": ""` (some models' and clients' way to write none) made the call text: ""
    is no JSON. OpenAI clients JSON.parse the arguments, so it goes out as {}."""
    for fmt, text in [("qwen", '<tool_call>{"name": "now", "arguments": ""}</tool_call>'),
                      ("qwen", '<tool_call>{"name": "now", "arguments": " "}'),
                      ("llama3", '{"name": "now", "parameters": ""}'),
                      ("mistral", '[TOOL_CALLS][{"name": "now", "arguments": ""}]'),
                      ("mistral", '[TOOL_CALLS]now[ARGS]""')]:
        content, [call] = _both(fmt, text)
        assert (content, call.name, call.arguments) == ("", "now", "{}"), fmt


_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_calls_inside_reasoning_are_content():
    """A thinking model (Qwen3's `<think>`, Magistral's `[THINK]`) may write a call while it
    reasons; amlx has no reasoning parser, so the section is content, and a call inside it is
    the model thinking aloud, not a call: it stays content, closed section or not. Calls after
    the section are calls. The reasoning's call was sent to the client as a real one."""
    for fmt, text, want_content, want in [
            ("qwen", "<think>\nMaybe " + _CALL + " then.\n</think>\n\n" + _CALL,
             "<think>\nMaybe " + _CALL + " then.\n</think>\n\n", [("get_weather", {"city": "Paris"})]),
            ("qwen", "<think>\nI will write " + _CALL, "<think>\nI will write " + _CALL, []),  # never closed
            ("qwen", "<think>a</think>" + _CALL + "<think>b " + _CALL[:-12], "<think>a</think><think>b " + _CALL[:-12],
             [("get_weather", {"city": "Paris"})]),
            ("qwen", '<tool_call>{"name": <think>' + _CALL + "</think>",  # a broken call, then a section
             '<tool_call>{"name": <think>' + _CALL + "</think>", []),
            ("mistral", '[THINK]use [TOOL_CALLS]f[ARGS]{}?[/THINK][TOOL_CALLS]g[ARGS]{"a": 1}',
             "[THINK]use [TOOL_CALLS]f[ARGS]{}?[/THINK]", [("g", {"a": 1})]),
            ("mistral", '[THINK]use [TOOL_CALLS]f[ARGS]{}', '[THINK]use [TOOL_CALLS]f[ARGS]{}', [])]:
        _check(fmt, *_both(fmt, text), want_content, want)


def test_reply_that_starts_inside_reasoning():
    """A generation prompt that opens the section (Qwen3 "Thinking" templates end in
    `<think>\\n`): the reply has only the `</think>`, and its calls before that are reasoning."""
    from amlx.toolcalls import opens_reasoning

    text = "Let me call " + _CALL + "\n</think>\n\n" + _CALL
    _check("qwen", *_both("qwen", text, thinking=True), text[:-len(_CALL)], [("get_weather", {"city": "Paris"})])
    _check("qwen", *_both("qwen", text), "Let me call \n</think>\n\n",
           [("get_weather", {"city": "Paris"})] * 2)
    assert opens_reasoning("<|im_start|>assistant\n<think>\n", "qwen")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n", "qwen")
    assert not opens_reasoning("<|im_start|>system\nUse <think>.<|im_end|>\n<|im_start|>assistant\n", "qwen")
    assert opens_reasoning("[INST]hi[/INST][THINK]", "mistral") and not opens_reasoning("x<think>", "llama3")


_MARKUP = ["<tool_call>", "</tool_call>", "<think>", "</think>", "[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]",
           "[CALL_ID]", "<|python_tag|>", "<", "[", '{"name": "f", "arguments": {"a": 1}}', '{"a": 1}', "f", "id1",
           '{"name": "g", "arguments": ""}', "x", " ", "\n", '"', "</", "}"]


@settings(max_examples=400, deadline=None)
@given(fmt=st.sampled_from(["qwen", "llama3", "mistral"]), pieces=st.lists(st.sampled_from(_MARKUP), max_size=14),
       cuts=st.lists(st.integers(0, 300), max_size=12), thinking=st.booleans())
def test_streamed_deltas_are_the_whole_parse(fmt, pieces, cuts, thinking):
    """Reasoning markers, Mistral's forms and unclosed calls mixed in any order and split
    anywhere: the content deltas join to the whole-text content (so no partial markup of a
    call that parsed went out as content), and the calls are the whole-text calls."""
    text = "".join(pieces)
    want_content, want_calls = parse_tool_calls(text, fmt, thinking=thinking)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    parser = ToolCallParser(fmt, thinking=thinking)
    deltas, calls = [], []
    for a, b in zip(bounds, bounds[1:]):
        for e in parser.feed(text[a:b]) + (parser.finish() if b == len(text) else []):
            (deltas if isinstance(e, str) else calls).append(e)
    if not text:
        parser.finish()
    assert "".join(deltas) == want_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in want_calls]


# Chat templates of Mistral's three tool-call generations, cut to what renders an assistant's
# calls: v7 (Mistral Small 3 2501: a JSON list), v11 with ids (Mistral Small 3.1 2503:
# [CALL_ID]) and v13 (Magistral / Ministral 3: [ARGS] only, the reasoning in [THINK]).
_MISTRAL_TEMPLATE = """\
{%- for message in messages %}
{%- if message.role == 'user' %}{{ '[INST]' + message.content + '[/INST]' }}
{%- elif message.role == 'assistant' %}
{%- if message.reasoning_content is defined and FORM == 'v13' %}{{ '[THINK]' + message.reasoning_content + '[/THINK]' }}{% endif %}
{%- if message.content is defined and message.content %}{{ message.content }}{% endif %}
{%- if FORM == 'v7' %}{{ '[TOOL_CALLS][' }}{% endif %}
{%- for call in message.tool_calls %}
{%- set arguments = call.function.arguments %}
{%- if arguments is not string %}{% set arguments = arguments | tojson %}{% endif %}
{%- if call.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}
{%- if FORM == 'v7' %}{{ '{"name": ' + call.function.name | tojson + ', "arguments": ' + arguments + ', "id": ' + call.id | tojson + '}' + (', ' if not loop.last else ']') }}
{%- elif FORM == 'v11' %}{{ '[TOOL_CALLS]' + call.function.name + '[CALL_ID]' + call.id + '[ARGS]' + arguments }}
{%- else %}{{ '[TOOL_CALLS]' + call.function.name + '[ARGS]' + arguments }}
{%- endif %}
{%- endfor %}{{ '</s>' }}
{%- endif %}
{%- endfor %}"""


def test_mistral_templates_forms_parse_back(tmp_path):
    """What each generation of Mistral's chat templates writes for an assistant's calls is the
    format detected for it, and parses back to the same calls (names, arguments), text before
    them and reasoning staying content: the text a model trained on that template writes."""
    from amlx.tokenizer import Tokenizer
    from tests.helpers.tokenizers import write_tokenizer

    calls = [{"id": "a1B2c3D4e", "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": '{"city": "Paris", "q": "[ARGS]"}'}},
             {"id": "123456789", "type": "function", "function": {"name": "now", "arguments": {}}}]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Checking.", "reasoning_content": "Use [TOOL_CALLS]f[ARGS]{}?",
                 "tool_calls": calls}]
    for form in ("v7", "v11", "v13"):
        write_tokenizer(tmp_path / form, "bpe")
        config = json.loads((tmp_path / form / "tokenizer_config.json").read_text())
        config["chat_template"] = _MISTRAL_TEMPLATE.replace("FORM", repr(form))
        (tmp_path / form / "tokenizer_config.json").write_text(json.dumps(config))
        tokenizer = Tokenizer.from_dir(tmp_path / form)
        assert detect_format(tokenizer.chat_template) == "mistral"
        reply = tokenizer.apply_chat_template(messages, add_generation_prompt=False).split("[/INST]")[-1]
        reply = reply.removesuffix("</s>")
        assert {"v7": "[TOOL_CALLS][{", "v11": "[CALL_ID]", "v13": "now[ARGS]{}"}[form] in reply, reply
        content = ("[THINK]Use [TOOL_CALLS]f[ARGS]{}?[/THINK]" if form == "v13" else "") + "Checking."
        _check("mistral", *_both("mistral", reply), content,
               [("get_weather", {"city": "Paris", "q": "[ARGS]"}), ("now", {})])


async def test_completion_tool_calls_after_a_prompt_that_opens_reasoning(tmp_path):
    """Model.complete reads its prompt's end as the server does: after a generation prompt
    that opens `<think>` (Qwen3 "Thinking" templates), the reply is reasoning until its
    `</think>`, so a call the model writes before that is not in Completion.tool_calls."""
    import amlx
    from tests.helpers.serving import tool_checkpoint

    ckpt = tool_checkpoint(tmp_path / "tools")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    async with await amlx.load(ckpt) as model:
        prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        plain = await model.complete(model.tokenizer.encode(prompt, add_special_tokens=False), max_tokens=8)
        opened = await model.complete(model.tokenizer.encode(prompt + "<think>\n", add_special_tokens=False),
                                      max_tokens=8)
    assert plain.text.startswith("<tool_call>") and len(plain.tool_calls) == 1
    assert opened.text == plain.text and opened.tool_calls is None
