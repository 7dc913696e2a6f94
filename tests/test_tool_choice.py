"""tool_choice "required" and a named function: the reply is constrained to tool calls in the
checkpoint's own format (amlx/serve/tool_choice.py).

The checkpoints have random weights: unconstrained, they write gibberish, so a reply that comes
back as valid calls (names among the tools, arguments valid against their schemas) does so only
through the constraint. One uvicorn server on a thread serves one app per format at /FORMAT/v1,
called with the official openai client.
"""

from __future__ import annotations

import json
from pathlib import Path

import amlx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amlx.serve.app import Settings, create_app
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.serving import MountedApps, serve_checkpoint
from tests.helpers.tokenizers import _QWEN_TEMPLATE

SCHEMAS = {
    "get_weather": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                     "unit": {"enum": ["c", "f"]}},
                    "required": ["city", "unit"], "additionalProperties": False},
    "count": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "exact": {"type": "boolean"}},
              "required": ["n"], "additionalProperties": False},
    "tag": {"type": "object", "properties": {"label": {"type": "string", "pattern": "^[a-z]{1,4}$"}},
            "required": ["label"], "additionalProperties": False},
}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in SCHEMAS.items()]
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
                                                                      "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]

# A Llama 3.1-like template: detect_format reads "llama3" from its header markers and "parameters"
_LLAMA_TEMPLATE = """\
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools %}
{{- 'Respond with a JSON object {"name": function name, "parameters": dictionary of arguments}.\\n' }}
{%- for t in tools %}{{- t | tojson + '\\n' }}{%- endfor %}
{%- endif %}
{{- '<|eot_id|>' }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + (message.content or '') + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

# Mistral templates: the v3 JSON-list form, and the v11+ `[TOOL_CALLS]name[ARGS]{...}` form
_MISTRAL_LIST_TEMPLATE = """\
{%- if tools %}{{- '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}{{- '[INST]' + message.content + '[/INST]' }}
{%- elif message.tool_calls %}{{- '[TOOL_CALLS]' + message.tool_calls | map(attribute='function') | list | tojson }}
{%- else %}{{- (message.content or '') + '</s>' }}{%- endif %}
{%- endfor %}"""
_MISTRAL_ARGS_TEMPLATE = """\
{%- if tools %}{{- '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}{{- '[INST]' + message.content + '[/INST]' }}
{%- elif message.tool_calls %}
{%- for call in message.tool_calls %}{{- '[TOOL_CALLS]' + call.function.name + '[ARGS]' + call.function.arguments }}
{%- endfor %}{{- '</s>' }}
{%- else %}{{- (message.content or '') + '</s>' }}{%- endif %}
{%- endfor %}"""
# Qwen3 "Thinking": the generation prompt opens the reasoning section
_THINKING_TEMPLATE = _QWEN_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}",
                                            "{{- '<|im_start|>assistant\\n<think>\\n' }}")
assert _THINKING_TEMPLATE != _QWEN_TEMPLATE
# One whose tool calls amlx cannot read
_PLAIN_TEMPLATE = "{%- for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{%- endfor %}assistant: "


def _with_template(path: Path, template: str) -> Path:
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _mistral_checkpoint(path: Path) -> Path:
    """A tiny Qwen3 whose tokenizer has Mistral's control tokens [TOOL_CALLS] and [ARGS], flagged
    special as in Mistral's releases, with the v11 template."""
    from tokenizers import AddedToken, Tokenizer

    probe = make_checkpoint(path, "qwen3", tie_word_embeddings=False)
    tok = Tokenizer.from_file(str(probe / "tokenizer.json"))
    markers = ["[TOOL_CALLS]", "[ARGS]"]
    tok.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in markers])
    path = make_checkpoint(path, "qwen3", tie_word_embeddings=False, vocab_size=tok.get_vocab_size(True))
    tok.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    for m in markers:
        config["added_tokens_decoder"][str(tok.token_to_id(m))] = {
            "content": m, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return _with_template(path, _MISTRAL_ARGS_TEMPLATE)


def _server(models: dict[str, amlx.Model]) -> MountedApps:
    """uvicorn on a thread, an app per checkpoint at /NAME/v1."""
    return MountedApps({name: create_app(model, Settings(model_name="m")) for name, model in models.items()})


# name -> (checkpoint maker, the format its template teaches)
CHECKPOINTS = {
    "qwen": lambda p: serve_checkpoint(p),
    "thinking": lambda p: _with_template(serve_checkpoint(p), _THINKING_TEMPLATE),
    "llama3": lambda p: _with_template(make_checkpoint(p, "llama"), _LLAMA_TEMPLATE),
    "mistral": _mistral_checkpoint,
    "mistral-list": lambda p: _with_template(serve_checkpoint(p), _MISTRAL_LIST_TEMPLATE),
    "plain": lambda p: _with_template(serve_checkpoint(p), _PLAIN_TEMPLATE),
}
FORMATS = ["qwen", "llama3", "mistral", "mistral-list"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = {name: amlx.load_sync(make(tmp_path_factory.mktemp(name)), max_context=2048)
              for name, make in CHECKPOINTS.items()}
    srv = _server(models)
    try:
        yield srv
    finally:
        srv.stop()
        for model in models.values():
            model.close()


def _calls(reply) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """([(name, arguments)], finish_reason, content) of a whole reply."""
    choice = reply.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return calls, choice.finish_reason, choice.message.content


def _streamed(stream) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """The same from a stream: each call assembled from its deltas, by index."""
    calls: dict[int, list[str]] = {}
    finish, content = None, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, ["", ""])
                call[0] += d.function.name or "" if d.function else ""
                call[1] += d.function.arguments or "" if d.function else ""
            finish = choice.finish_reason or finish
    return [(n, a) for _, (n, a) in sorted(calls.items())], finish, content or None


def _ask(client: openai.OpenAI, stream: bool, **kw):
    kw = {"model": "m", "messages": MESSAGES, "max_tokens": 160, **kw}
    if stream:
        return _streamed(client.chat.completions.create(stream=True, **kw))
    return _calls(client.chat.completions.create(**kw))


def _assert_valid(calls: list[tuple[str, str]], tools: list[dict], named: str | None = None) -> None:
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    assert calls
    for name, arguments in calls:
        assert name in schemas and (named is None or name == named), calls
        jsonschema.validate(json.loads(arguments), schemas[name])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(FORMATS), temperature=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 10**6),
       stream=st.booleans(), named=st.sampled_from([None, "get_weather", "count", "tag"]))
def test_forced_calls_are_valid_calls_of_the_tools(server, fmt, temperature, seed, stream, named):
    """One call (parallel_tool_calls false, or a named function), of one of the tools (that
    one), its arguments valid against the function's schema; the reply ends there."""
    choice = "required" if named is None else {"type": "function", "function": {"name": named}}
    calls, finish, content = _ask(server.client(fmt), stream, tools=TOOLS, tool_choice=choice,
                                  temperature=temperature, seed=seed, parallel_tool_calls=False)
    _assert_valid(calls, TOOLS, named)
    assert len(calls) == 1 and finish == "tool_calls" and not content, (calls, finish, content)


@pytest.mark.parametrize("fmt", FORMATS)
def test_several_calls_each_valid_and_streamed_as_whole(server, fmt):
    """Parallel calls allowed: one or more, each valid; streamed, the same calls as whole (the
    same seed: the same tokens)."""
    for seed in range(3):
        kw = dict(tools=[*TOOLS, NOW], tool_choice="required", temperature=1.0, seed=seed, max_tokens=200)
        whole = _ask(server.client(fmt), False, **kw)
        assert _ask(server.client(fmt), True, **kw) == whole
        calls, finish, _ = whole
        _assert_valid(calls, [*TOOLS, NOW])
        assert finish in ("tool_calls", "length")


def test_named_function_without_arguments(server):
    for fmt in FORMATS:
        calls, finish, _ = _ask(server.client(fmt), False, tools=[*TOOLS, NOW], temperature=1.0, seed=3,
                                tool_choice={"type": "function", "function": {"name": "now"}})
        assert [name for name, _ in calls] == ["now"] and json.loads(calls[0][1]) == {} and finish == "tool_calls"


def test_a_prompt_that_opens_reasoning_closes_it_then_calls(server):
    """A Qwen3 "Thinking" prompt ends in `<think>\\n`: the reply may reason, closes the section
    and then calls; the reasoning comes back as content. (The bias on </think> makes the random
    model close it at once: the constraint allows it there, and then forces the call.)"""
    close = str(_token_id(server, "thinking", "</think>"))
    for stream in (False, True):
        for temperature in (0.0, 1.0):
            calls, finish, content = _ask(server.client("thinking"), stream, tools=TOOLS, tool_choice="required",
                                          temperature=temperature, logit_bias={close: 100},
                                          parallel_tool_calls=False)
            _assert_valid(calls, TOOLS)
            assert finish == "tool_calls" and content == "</think>\n\n", content


def test_reasoning_text_before_the_call_is_allowed(server):
    """The grammar of a thinking prompt takes any reasoning text (markup-like too) before the
    closing marker, then only calls: with the marker a token (Qwen's </think> here) and as text
    (Mistral's [/THINK], no token in this tokenizer)."""
    from amlx.constrain import GrammarVocab, parse_constraint
    from amlx.serve.schemas import Tool
    from amlx.serve.tool_choice import _Markers, call_grammar

    tools = [Tool.model_validate(t) for t in TOOLS]
    qwen_call = '<tool_call>\n{"name": "count", "arguments": {"n": 4}}\n</tool_call>'
    mistral_call = '[TOOL_CALLS][{"name": "count", "arguments": {"n": 4}}]'
    cases = {("thinking", "qwen"): [("Let me <b>think</b> {\"a\": 1}\n</think>\n\n" + qwen_call, True),
                                    ("</think>\n\n" + qwen_call, True),
                                    ("hm </think>\n\nplain text", False),
                                    ("hm </think>\n\n" + qwen_call.replace("count", "nope"), False),
                                    (qwen_call, False)],
             ("mistral-list", "mistral"): [("Let me [THINK] see [/THINK" + "[/THINK]" + mistral_call, True),
                                           ("[/THINK]" + mistral_call, True),
                                           ("a [/THINK] b [/THINK]" + mistral_call, False),
                                           (mistral_call, False)]}
    for (name, fmt), replies in cases.items():
        tok = _model(server, name).tokenizer
        grammar = call_grammar(fmt, tools, _Markers(tok), several=False, thinking=True, template=tok.chat_template)
        vocab = GrammarVocab.from_tokenizer(tok, tok.vocab_size)
        for reply, ok in replies:
            matcher = vocab.matcher(parse_constraint(grammar=grammar))
            took = all(matcher.consume(i) for i in tok.encode(reply, add_special_tokens=False))
            assert (took and matcher.accepting) == ok, reply


def _model(server, name):
    return next(r.app for r in server.server.config.app.routes if r.path == f"/{name}").state.server.model


def _token_id(server, name, text):
    return _model(server, name).tokenizer.token_to_id(text)


def _error(call) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value.body if "param" in info.value.body else info.value.body["error"]


def test_the_400s(server):
    client = server.client("qwen")
    base = dict(model="m", messages=MESSAGES, tools=TOOLS, max_tokens=8)
    err = _error(lambda: client.chat.completions.create(
        **base, tool_choice={"type": "function", "function": {"name": "nope"}}))
    assert err["param"] == "tool_choice" and "'nope'" in err["message"], err
    for other in (dict(response_format={"type": "json_object"}), dict(extra_body={"regex": "a+"}),
                  dict(extra_body={"choice": ["a"]}), dict(extra_body={"grammar": 'start: "a"'})):
        for choice in ("required", {"type": "function", "function": {"name": "count"}}):
            err = _error(lambda: client.chat.completions.create(**base, tool_choice=choice, **other))
            assert err["param"] == "tool_choice" and "at most one constraint" in err["message"], err
    err = _error(lambda: server.client("plain").chat.completions.create(**base, tool_choice="required"))
    assert err["param"] == "tool_choice" and "tool-call format" in err["message"], err
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "integer", "minimum": 2**70}}}]
    err = _error(lambda: client.chat.completions.create(**{**base, "tools": bad}, tool_choice="required"))
    assert err["param"] == "tools" and "tools[0].function.parameters" in err["message"], err
    err = _error(lambda: client.chat.completions.create(**{**base, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "array"}}}]}, tool_choice="required"))
    assert err["param"] == "tools" and "object" in err["message"], err
    err = _error(lambda: server.client("mistral").chat.completions.create(
        **{**base, "tools": [{"type": "function", "function": {"name": "a b"}}]}, tool_choice="required"))
    assert err["param"] == "tools", err
    # response_format text is no constraint: allowed with a forced call
    calls, finish, _ = _ask(client, False, tools=TOOLS, tool_choice="required", response_format={"type": "text"},
                            parallel_tool_calls=False)
    _assert_valid(calls, TOOLS)


def test_auto_and_none_are_unchanged(server):
    """auto and none add no constraint: the random model writes what it writes (no call here),
    the same text as with no tool_choice at all (auto) or no tools at all (none)."""
    client = server.client("qwen")
    kw = dict(temperature=0.0, max_tokens=12)
    free = _ask(client, False, tools=TOOLS, **kw)
    assert _ask(client, False, tools=TOOLS, tool_choice="auto", **kw) == free
    assert free[0] == [] and free[1] == "length"
    assert _ask(client, False, tools=TOOLS, tool_choice="none", **kw) == _ask(client, False, **kw)
    # auto alongside response_format is allowed, as before
    calls, _, content = _ask(client, False, tools=TOOLS, tool_choice="auto", response_format={"type": "json_object"},
                             **kw)
    assert calls == [] and content.startswith("{")
