"""Hostile chat templates and malformed chat requests: each fails its one render or request
with a clear error (ChatTemplateError / ValueError in Python, an OpenAI-shaped 400 over HTTP),
in bounded time and memory, and everything else goes on.

Each test here was written for a fault that fuzzing found (see the commit that added it)."""

from __future__ import annotations

import copy
import json

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx.chat_template import TemplateLimits
from amlx.errors import ChatTemplateError
from amlx.prompt import MAX_DEPTH, PromptEncoder
from amlx.tokenizer import Tokenizer
from amlx.toolcalls import ToolCallParser, parse_tool_calls

try:
    from tests.helpers.tokenizers import write_tokenizer
except ImportError:  # tests/ itself on sys.path
    from helpers.tokenizers import write_tokenizer

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("chat-faults-tok")
    write_tokenizer(path, "bpe")
    return Tokenizer.from_dir(path)


def small(tok: Tokenizer, **limits) -> Tokenizer:
    """The tokenizer with smaller template limits (so a test without the fix stays quick)."""
    tok = copy.copy(tok)
    tok.template_limits = TemplateLimits(**limits)
    return tok


# -- templates: objects whose str() writes out what they hold ----------------------------------

# Each wraps X twice in an object that none of the size checks measured: a namespace, and the
# views of a dict. Doubling it 64 times made `{{ x }}` (or `~`, `%`, `|string`) write out 2**64
# copies: the render hung for good, its one Python operation never reaching the time check.
DOUBLERS = {
    "namespace": "namespace(a=X, b=X)",
    "dict values": "{'a': X, 'b': X}.values()",
    "dict items": "{'a': X, 'b': X}.items()",
    "namespace in a list": "[namespace(a=X), namespace(a=X)]",
    "values of a namespace": "dict(a=namespace(a=X), b=X).values()",
}
USES = ["{{ ns.x }}", "{{ '' ~ ns.x }}", "{{ '%s' % ns.x }}", "{{ ns.x | string | length }}",
        "{{ '{}'.format(ns.x) }}", "{{ ns.x | pprint }}"]


@settings(max_examples=30, deadline=None)
@given(doubler=st.sampled_from(sorted(DOUBLERS)), use=st.sampled_from(USES), rounds=st.integers(14, 18))
def test_doubling_through_namespaces_and_dict_views_is_refused_when_built(tok, doubler, use, rounds):
    template = ("{% set ns = namespace(x='ab') %}{% for i in range(" + str(rounds) + ") %}"
                "{% set ns.x = " + DOUBLERS[doubler].replace("X", "ns.x") + " %}{% endfor %}" + use)
    with pytest.raises(ChatTemplateError, match="would make"):  # at creation, not once written out
        small(tok, max_output=1 << 12).apply_chat_template(USER, chat_template=template)


def test_namespaces_and_dict_views_of_normal_size_still_render(tok):
    template = ("{% set ns = namespace(a=1, b='x') %}{{ ns.b }}{{ ns.a }}|{{ {'k': 'v'}.items() | list }}|"
                "{{ {'k': 'v'}.values() | list }}{% for m in messages %}|{{ m.content }}{% endfor %}")
    assert tok.apply_chat_template(USER, chat_template=template) == "x1|[('k', 'v')]|['v']|hi"


# -- templates: numbers that cost more than their size ------------------------------------------

@settings(max_examples=25, deadline=None)
@given(value=st.sampled_from(["7", "7.5", "123456789"]), method=st.sampled_from(["", ", 'floor'", ", 'ceil'"]),
       precision=st.integers(100_000, 1_000_000).flatmap(lambda n: st.sampled_from([n, -n])))
def test_round_with_a_huge_precision_is_refused(tok, value, method, precision):
    """`7|round(-10**9)` and `x|round(10**9, 'floor')` compute 10 ** precision exactly: the
    render hung (10**7 alone takes 7 s). The precision is refused before. (Smaller precisions
    here, so that the test fails quickly without the check.)"""
    template = "{{ " + value + " | round(" + str(precision) + method + ") }}"
    with pytest.raises(ChatTemplateError, match="round filter's precision"):
        tok.apply_chat_template(USER, chat_template=template)


def test_round_of_ordinary_precisions_still_works(tok):
    assert tok.apply_chat_template(USER, chat_template="{{ 2.567 | round(2) }} {{ 2.5 | round(0, 'ceil') }} "
                                   "{{ 1234 | round(-2) }} {{ 1.25 | round(precision=1, method='floor') }}") == \
        "2.57 3.0 1200 1.2"


@pytest.mark.parametrize("call", ["(5).to_bytes(10**8, 'big')", "(5).to_bytes(length=10**8, byteorder='big')"])
def test_int_to_bytes_of_a_huge_length_is_refused_before_it_allocates(tok, call):
    """`(5).to_bytes(2 * 10**9, 'big')` allocated 2 GB before its result was measured (and a
    larger length raised MemoryError, or took the machine's memory)."""
    with pytest.raises(ChatTemplateError, match="int.to_bytes would make"):
        small(tok, max_output=1 << 12).apply_chat_template(USER, chat_template="{{ " + call + " | length }}")
    assert tok.apply_chat_template(USER, chat_template="{{ (258).to_bytes(2, 'big') | list }}") == "[1, 2]"


# -- templates: too large to compile -------------------------------------------------------------

def test_a_template_too_large_to_compile_is_refused_after_counting_its_tokens(tok):
    """Jinja compiles with no limit: a 700 KB template of `{{ a }}` took 9 s and 1.1 GB to
    compile, and 7 MB would take 90 s and 11 GB, once for every request (a failed compile is
    not cached). It is refused after its first 100,000 tokens are counted."""
    template = "{{ messages[0].content }}" * 40_000  # 240,000 tokens
    with pytest.raises(ChatTemplateError, match="more than 100000 Jinja tokens"):
        tok.apply_chat_template(USER, chat_template=template)
    plain = "x" * 3_000_000 + "{{ messages[0].content }}"  # a long text is one token, cheap to compile
    assert tok.apply_chat_template(USER, chat_template=plain).endswith("xhi")


# -- chat messages through the Python API ------------------------------------------------------

def nested(depth: int, leaf: object = "x", kind: str = "dict") -> object:
    value = leaf
    for _ in range(depth):
        value = {"a": value} if kind == "dict" else [value]
    return value


@settings(max_examples=20, deadline=None)
@given(depth=st.integers(MAX_DEPTH + 1, 5000), kind=st.sampled_from(["dict", "list"]),
       where=st.sampled_from(["content", "tool_calls", "extra"]))
def test_messages_nested_too_deep_are_a_value_error(tok, depth, kind, where):
    """Nesting of a few hundred levels (in content parts, tool-call arguments, any key) raised
    RecursionError from the copy into plain data, which model.generate passed on as is."""
    value = nested(depth, kind=kind)
    message = {"role": "assistant", "content": "c"}
    if where == "content":
        message["content"] = [{"type": "text", "text": "t", "extra": value}]
    elif where == "tool_calls":
        message["tool_calls"] = [{"type": "function", "function": {"name": "f", "arguments": value}}]
    else:
        message["metadata"] = value
    with pytest.raises(ChatTemplateError, match=f"nests more than {MAX_DEPTH} levels deep"):
        PromptEncoder(tok, 4096).ids([*USER, message])


def test_messages_that_contain_themselves_or_repeat_a_part_are_a_value_error(tok):
    """A message holding itself recursed without end (RecursionError); one holding a part 2**24
    times over (a list of [x, x] nested 24 deep: 24 objects) was copied out to 16 million."""
    looped = {"role": "user", "content": "hi"}
    looped["self"] = [looped]
    with pytest.raises(ChatTemplateError, match="contains itself"):
        PromptEncoder(tok, 4096).ids([looped])
    shared: object = "x"
    for _ in range(24):
        shared = [shared, shared]
    with pytest.raises(ChatTemplateError, match="holds more than"):
        PromptEncoder(tok, 4096).ids([{"role": "user", "content": "hi", "extra": shared}])
    fine = nested(MAX_DEPTH - 2)  # (inside the message and the list: MAX_DEPTH levels)
    assert PromptEncoder(tok, 4096).ids([{"role": "user", "content": "hi", "extra": fine}])


@pytest.mark.parametrize("where", ["messages", "tools", "kwargs"])
def test_apply_chat_template_itself_refuses_structures_too_deep(tok, where):
    """Tokenizer.apply_chat_template called directly (public API) raised RecursionError for
    nesting a few hundred deep: only generate's path checked before it."""
    deep = nested(MAX_DEPTH + 50)
    messages, tools, kwargs = [*USER], None, {}
    if where == "messages":
        messages = [{"role": "user", "content": "hi", "extra": deep}]
    elif where == "tools":
        tools = [{"type": "function", "function": {"name": "f", "parameters": deep}}]
    else:
        kwargs = {"extra": deep}
    with pytest.raises(ChatTemplateError, match=f"nests more than {MAX_DEPTH} levels deep"):
        tok.apply_chat_template(messages, tools=tools, **kwargs)


def test_a_broken_template_is_compiled_once(tok, monkeypatch):
    """A template that does not compile was parsed again for every request."""
    calls = []
    compile_template = tok._env.compile_template
    monkeypatch.setattr(tok._env, "compile_template", lambda src: calls.append(src) or compile_template(src))
    for _ in range(3):
        with pytest.raises(ChatTemplateError, match="TemplateSyntaxError"):
            tok.apply_chat_template([*USER], chat_template="{% for %}")
    assert len(calls) == 1


def test_templates_passed_per_call_are_kept_only_up_to_a_bound(tok):
    """Every template source a caller passed (`chat_template=`) stayed compiled for good."""
    from amlx.tokenizer import _COMPILED_KEPT

    for i in range(_COMPILED_KEPT + 20):
        assert tok.apply_chat_template([*USER], chat_template=f"{{{{ messages[0].content }}}} {i}") == f"hi {i}"
    assert len(tok._compiled) == _COMPILED_KEPT


def with_template(path, template: str) -> Tokenizer:
    write_tokenizer(path, "bpe")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return Tokenizer.from_dir(path)


def test_a_template_that_renders_nothing_is_a_chat_template_error(tmp_path):
    """An empty rendering reached the engine as an empty prompt ("the prompt is empty"),
    which did not say that the chat template made it."""
    for template in ("{{ '' }}", "{% for m in messages %}{% if false %}{{ m }}{% endif %}{% endfor %}"):
        with pytest.raises(ChatTemplateError, match="chat template rendered nothing"):
            PromptEncoder(with_template(tmp_path, template), 4096).ids(USER)
    assert PromptEncoder(with_template(tmp_path, " "), 4096).ids(USER)  # blank, but a prompt


# -- the server ----------------------------------------------------------------------------------

# The tool checkpoint's template behind a switch: a last message "T:<name>" picks a hostile branch.
HOSTILE = {
    "empty": "",
    "raise": "{{ raise_exception('the template says no') }}",
    "loop": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "undefined": "{{ nothing.here }}",
    "recursion": "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",
    "dunder": "{{ ''.__class__.__mro__ }}",
    "repetition": "{{ 'a' * 10**9 }}",
    "doubling": ("{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = namespace(a=ns.x, b=ns.x) %}"
                 "{% endfor %}{{ ns.x }}"),
    "round": "{{ 7 | round(-10**9) }}",
    "division": "{{ 1 / 0 }}",
}
EXPECTED = {"empty": "rendered nothing", "raise": "the template says no", "loop": "steps", "undefined": "undefined",
            "recursion": "RecursionError", "dunder": "unsafe", "repetition": "repetition", "doubling": "would make",
            "round": "round filter", "division": "ZeroDivisionError"}


def _hostile_template(normal: str) -> str:
    branches = "".join("{%- elif c == 'T:" + name + "' -%}" + body
                       for name, body in HOSTILE.items())
    return ("{%- set c = messages[-1].content if messages[-1].content is string else '' -%}{%- if false -%}"
            + branches + "{%- else -%}" + normal + "{%- endif -%}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.helpers.serving import ServerProcess, tool_checkpoint

    path = tool_checkpoint(tmp_path_factory.mktemp("chat-faults-ckpt"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = _hostile_template(config["chat_template"])
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with ServerProcess(path, "--model-name", "tiny", "--max-context", "512") as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as client:  # one kept-alive connection
        yield client


def chat(http, messages, **body):
    return http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 1, **body})


def assert_error(response, status: int, *fragments: str, param: str | None = "messages") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


def assert_serving(http) -> None:
    assert chat(http, USER).status_code == 200


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_template_fails_its_request_with_a_400_and_the_server_goes_on(server, http, name):
    assert_error(chat(http, [{"role": "user", "content": f"T:{name}"}]), 400, EXPECTED[name])
    assert_serving(http)
    assert server.alive()


@pytest.mark.parametrize("arguments", ['{"a": ' * 600 + "1" + "}" * 600, "[" * 100_000 + "]" * 100_000])
def test_tool_call_arguments_nested_too_deep_are_a_400_not_a_500(http, arguments):
    """Arguments of a few hundred levels made a RecursionError, answered as a 500 internal error;
    100,000 levels (which json.loads refuses) are passed to the template as the text they are."""
    messages = [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]}]
    response = chat(http, messages)
    if arguments.startswith("{"):
        assert_error(response, 400, f"nests more than {MAX_DEPTH} levels deep")
    else:
        assert_error(response, 400, "context holds", param="messages")  # rendered: 200,000 characters
    assert_serving(http)


def test_tool_call_arguments_with_a_huge_integer_are_passed_as_text(http):
    """json.loads refuses integers of over 4300 digits with a ValueError, which was not caught
    (the request failed with Python's 'Exceeds the limit (4300 digits)')."""
    messages = [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"n": ' + "9" * 5000 + "}"}}]}]
    assert_error(chat(http, messages), 400, "context holds", param="messages")  # rendered, only too long


def test_tools_nested_too_deep_are_a_400_naming_tools(http):
    tool = {"type": "function", "function": {"name": "f", "parameters": nested(400)}}
    assert_error(chat(http, USER, tools=[tool]), 400, f"nests more than {MAX_DEPTH} levels deep", param="tools")
    assert_serving(http)


def test_a_text_part_without_text_is_named_as_such(http):
    """{"type": "text"} with no text was refused as "content parts of type 'text' are not
    supported (text only)"."""
    for part in ({"type": "text"}, {"type": "text", "text": None}):
        error = assert_error(chat(http, [{"role": "user", "content": [part]}]), 400, "has no 'text'")
        assert "not supported" not in error["message"]
    assert_error(chat(http, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
                 "'image_url' are not supported")


async def test_the_openai_clients_reply_echoed_back_as_a_dict_is_accepted(server):
    """`messages.append(reply.model_dump())`, the usual way to continue after a tool call, sends
    OpenAI's reply fields refusal, annotations, audio and function_call (null): each was
    refused as an unsupported field."""
    client = server.client()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    first = await client.chat.completions.create(model="tiny", messages=USER, tools=tools, max_tokens=8)
    reply = first.choices[0].message
    assert reply.tool_calls
    for echoed in (reply.model_dump(), {**reply.model_dump(), "refusal": "no", "annotations": []}):
        messages = [*USER, echoed, {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": "sunny"}]
        again = await client.chat.completions.create(model="tiny", messages=messages, tools=tools, max_tokens=1)
        assert again.choices[0].finish_reason in ("length", "stop", "tool_calls")
    with pytest.raises(openai.BadRequestError, match="audio"):
        await client.chat.completions.create(model="tiny", max_tokens=1, messages=[
            *USER, {**reply.model_dump(), "audio": {"id": "a1"}}])


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=False),
                         st.text(max_size=12),
                         st.sampled_from(["T:raise", "T:empty", "T:doubling", "\ud800", "{", "[]"]))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["type", "text", "role", "content", "id", "name",
                                                                  "function", "arguments", "image_url"]),
                                                 inner, max_size=3)), max_leaves=8)
PART = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "refusal", "x"])},
                                       optional={"text": st.one_of(st.text(max_size=8), JSON)}), JSON)
CALL = st.one_of(st.fixed_dictionaries({
    "id": st.one_of(st.text(max_size=6), JSON), "type": st.sampled_from(["function", "other"]),
    "function": st.fixed_dictionaries({"name": st.one_of(st.text(max_size=6), JSON),
                                       "arguments": st.one_of(st.sampled_from(['{"a": 1}', "", "no json", "[1]",
                                                                               "{" * 3000, "null"]), JSON)})}), JSON)
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "developer", "tool", "function"]), JSON)},
    optional={"content": st.one_of(st.text(max_size=10), st.lists(PART, max_size=3), JSON),
              "tool_calls": st.one_of(st.lists(CALL, max_size=2), JSON), "tool_call_id": JSON, "name": JSON,
              "refusal": JSON, "reasoning_content": JSON})
TOOL = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["function", "x"]), "function": st.fixed_dictionaries(
    {"name": st.one_of(st.text(max_size=6), JSON)}, optional={"parameters": JSON, "description": JSON})}), JSON)


@settings(max_examples=60, deadline=None)
@given(messages=st.one_of(st.lists(MESSAGE, min_size=1, max_size=4), JSON),
       extra=st.fixed_dictionaries({}, optional={"tools": st.one_of(st.lists(TOOL, max_size=2), JSON),
                                                 "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]),
                                                                          JSON),
                                                 "stream": st.booleans()}))
def test_any_malformed_chat_request_is_answered_with_200_or_an_openai_400(server, http, messages, extra):
    body = json.dumps({"model": "tiny", "max_tokens": 1, "messages": messages, **extra})  # (\ud800 escaped)
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    if response.status_code != 200:
        assert_error(response, 400, param=response.json()["error"]["param"])
        assert response.json()["error"]["message"]
    assert server.alive()


# -- tool calls in what a model writes -------------------------------------------------------------

# JSON that json.loads refuses with something other than JSONDecodeError, or that decodes to
# text which cannot be sent as UTF-8: a model may write any of it.
HOSTILE_JSON = {
    "deep array": "[" * 5000 + "]" * 5000,
    "deep object": '{"a": ' * 5000 + "1" + "}" * 5000,
    "huge integer": '{"n": ' + "9" * 5000 + "}",
    "lone surrogate": '{"city": "\\ud800"}',
    "NaN": '{"n": NaN}',
    "Infinity": '{"n": [1, -Infinity]}',
}
WRAPS = {
    "qwen": lambda name, args: f'<tool_call>{{"name": "{name}", "arguments": {args}}}</tool_call>',
    "qwen, arguments as a string": lambda name, args: (
        '<tool_call>{"name": "' + name + '", "arguments": ' + json.dumps(args) + "}</tool_call>"),
    "llama3": lambda name, args: f'{{"name": "{name}", "parameters": {args}}}',
    "mistral": lambda name, args: f'[TOOL_CALLS][{{"name": "{name}", "arguments": {args}}}]',
    "mistral, [ARGS]": lambda name, args: f"[TOOL_CALLS]{name}[ARGS]{args}",
}


@settings(max_examples=60, deadline=None)
@given(payload=st.sampled_from(sorted(HOSTILE_JSON)), wrap=st.sampled_from(sorted(WRAPS)),
       name=st.sampled_from(["get_weather", "\\ud800"]), before=st.sampled_from(["", "Sure. "]),
       cut=st.integers(1, 50))
def test_tool_calls_with_json_python_cannot_read_are_content_not_an_exception(payload, wrap, name, before, cut):
    """A reply whose call held JSON nested thousands deep (RecursionError) or an integer of over
    4300 digits (ValueError) failed its request: model.complete raised, the server answered 500
    or 400 with Python's message. A \\ud800 escape made arguments with a lone surrogate, which
    the server could not encode: a 400 'surrogates not allowed', or a dropped stream. NaN and
    Infinity (Python's extensions, not JSON) went out in the arguments.
    Such calls are now plain content, and a surrogate stays escaped in the arguments."""
    fmt = wrap.split(",")[0]
    text = before + WRAPS[wrap](name, HOSTILE_JSON[payload])
    content, calls = parse_tool_calls(text, fmt)
    parser = ToolCallParser(fmt)
    events = [e for i in range(0, len(text), cut) for e in parser.feed(text[i:i + cut])] + parser.finish()
    assert [c.arguments for c in calls] == [e.arguments for e in events if not isinstance(e, str)]
    for call in calls:  # (the [ARGS] form's name is plain text: there "\\ud800" is six characters)
        (call.name + call.arguments).encode("utf-8")
        assert json.loads(call.arguments, parse_constant=lambda c: pytest.fail(f"{c} in {call.arguments}"))
    if not calls:
        assert content == text
    if payload == "lone surrogate" and name == "get_weather" and (fmt != "llama3" or not before):
        assert [c.arguments for c in calls] == ['{"city": "\\ud800"}']


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_prompt_text_too_long_for_any_tokenization_is_refused_before_it_is_tokenized(http, route):
    """Megabytes of prompt text were tokenized (about 9 s for 10 MB) before the 400 said they
    do not fit; the early bound (no token is longer than the vocabulary's longest piece) says so
    at once, as model.generate does."""
    text = "hello world " * 200_000  # 2.4 MB; the context holds 512 tokens
    if route == "chat":
        response = chat(http, [{"role": "user", "content": text}])
    else:
        response = http.post("/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 1})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "at least" in message and "characters" in message and "512" in message, message
    assert chat(http, USER).status_code == 200  # the server goes on, on the same connection
