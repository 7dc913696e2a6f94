"""Forced tool calls (tool_choice "required" or a named function), probed as a careless or
hostile client would: what the grammar of amlx/serve/tool_choice.py admits must come back as
calls of the tools, and a request it cannot serve must be a 400 naming the field at fault.

The checkpoints are tests/test_tool_choice.py's (random weights, one per tool-call format).
"""

from __future__ import annotations

import json

import amlx
import httpx
import jsonschema
import openai
import pytest

from amlx.constrain import GrammarVocab, parse_constraint
from amlx.serve.errors import APIError
from amlx.serve.schemas import ChatRequest, Tool
from amlx.serve.tool_choice import _Markers, call_grammar, with_forced_calls
from amlx.toolcalls import parse_tool_calls
from tests.test_tool_choice import CHECKPOINTS, MESSAGES, TOOLS, _server


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The qwen checkpoint (its tokenizer has Qwen's <tool_call> and <think> tokens)."""
    model = amlx.load_sync(CHECKPOINTS["qwen"](tmp_path_factory.mktemp("qwen")), max_context=2048)
    try:
        yield model
    finally:
        model.close()


@pytest.fixture(scope="module")
def server(model):
    """The model served at /qwen/v1."""
    srv = _server({"qwen": model})
    try:
        yield srv
    finally:
        srv.stop()


def _spelled(tok, *pieces: str) -> list[int]:
    """Token ids of the pieces, each encoded alone (so a marker's text is spelled in ordinary
    tokens: "</", "think", ">")."""
    return [i for piece in pieces for i in tok.encode(piece, add_special_tokens=False)]


def test_reasoning_text_cannot_close_the_section_in_ordinary_tokens(model):
    """Qwen's </think> is a token; its text spelled in ordinary tokens ends the reasoning section
    to the parser (which reads text) but ended nothing to the grammar, so a reply could go on
    with a call of any name inside what the grammar took as reasoning, and it came back as a
    tool call ("rm_rf", among no tools). The grammar now refuses that text before the token."""
    tok = model.tokenizer
    tools = [Tool.model_validate(t) for t in TOOLS]
    grammar = call_grammar("qwen", tools, _Markers(tok), several=False, thinking=True, template=tok.chat_template)
    vocab = GrammarVocab.from_tokenizer(tok, tok.vocab_size)
    real = '<tool_call>\n{"name": "count", "arguments": {"n": 4}}\n</tool_call>'
    fake = _spelled(tok, "hm ", "</", "think", ">", "<", "tool", "_call", ">",
                    '\n{"name": "rm_rf", "arguments": {}}\n', "</", "tool", "_call", ">")
    reply = fake + tok.encode("</think>\n\n" + real, add_special_tokens=False)
    assert parse_tool_calls(tok.decode(reply), "qwen", thinking=True)[1][0].name == "rm_rf"  # what it would read
    matcher = vocab.matcher(parse_constraint(grammar=grammar))
    assert not all(matcher.consume(i) for i in reply)
    # reasoning that only mentions the markup, and closes with the token, is still allowed
    ok = _spelled(tok, "hm ", "<", "think", ">", " and </thin") + tok.encode("</think>\n\n" + real, add_special_tokens=False)
    matcher = vocab.matcher(parse_constraint(grammar=grammar))
    assert all(matcher.consume(i) for i in ok) and matcher.accepting


def test_a_schema_whose_x_guidance_is_no_object_is_taken_as_response_format_takes_it(server):
    """llguidance ignores an "x-guidance" that is no object (response_format takes such a schema);
    the forced call's grammar merged it into its JSON style with ** and the request failed with
    a 400 naming no field: "'str' object is not a mapping"."""
    client = server.client("qwen")
    for own in ("s", 1, ["a"]):
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["n"], "additionalProperties": False, "x-guidance": own}
        tools = [{"type": "function", "function": {"name": "count", "parameters": schema}}]
        reply = client.chat.completions.create(model="m", messages=MESSAGES, tools=tools, tool_choice="required",
                                               max_tokens=40, temperature=1.0, seed=1, parallel_tool_calls=False)
        [call] = reply.choices[0].message.tool_calls
        assert call.function.name == "count" and reply.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.function.arguments), {k: v for k, v in schema.items() if k != "x-guidance"})


def _error(call) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value.body if "param" in info.value.body else info.value.body["error"]


def test_a_named_function_whose_schema_is_refused_is_named_by_its_own_index(server):
    """A named tool_choice built its grammar from that tool alone, so the 400 for its schema
    named it tools[0] wherever it stood in the request's tools."""
    bad = {"type": "function", "function": {"name": "bad", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}
    client = server.client("qwen")
    for choice in ("required", {"type": "function", "function": {"name": "bad"}}):
        err = _error(lambda: client.chat.completions.create(model="m", messages=MESSAGES, tools=[*TOOLS, bad],
                                                            tool_choice=choice, max_tokens=5))
        assert err["param"] == "tools" and err["message"].startswith("tools[3].function.parameters ('bad'): "), err


def _forced(tok, tools: list[dict], tool_choice="required") -> str:
    """The grammar `with_forced_calls` gives a qwen request for these tools (a prompt that opens
    no reasoning)."""
    req = ChatRequest.model_validate({"model": "m", "messages": MESSAGES, "tools": tools, "tool_choice": tool_choice})
    return with_forced_calls(req, "qwen", tok, []).grammar


def _takes(tok, grammar: str, reply: str) -> bool:
    matcher = GrammarVocab.from_tokenizer(tok, tok.vocab_size).matcher(parse_constraint(grammar=grammar))
    return all(matcher.consume(i) for i in tok.encode(reply, add_special_tokens=False)) and matcher.accepting


def test_an_agents_tools_fit_the_grammar(model):
    """The grammar's length is bounded (64 KiB): 60 tools whose parameters are described as an
    agent's are (a sentence each), or 400 tools without parameters, went over it, and the 400
    told the client to "use choice". Descriptions constrain nothing and are left out; tools of
    one schema share its rule. A property named "description" is still its schema's."""
    tok = model.tokenizer
    about = "The value to use for this parameter; see the tool's documentation for the accepted forms. " * 2
    props = {f"p{k}": {"type": "string", "description": about, "title": f"P{k}"} for k in range(6)}
    props["description"] = {"type": "integer", "description": about}
    schema = {"type": "object", "properties": props, "required": ["description"], "additionalProperties": False,
              "description": about}
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": about,
                                               "parameters": {**schema, "$comment": f"v{i}"}}} for i in range(60)]
    grammar = _forced(tok, tools)
    call = '<tool_call>\n{"name": "tool_59", "arguments": {"p0": "x", "description": %s}}\n</tool_call>'
    assert _takes(tok, grammar, call % "3") and not _takes(tok, grammar, call % '"x"')
    assert _forced(tok, [{"type": "function", "function": {"name": f"t{i}"}} for i in range(400)])


def test_tools_too_large_for_the_grammar_are_told_so(model):
    """Where the calls cannot fit, the 400 names the tools and what to do, not `choice` (which
    a forced call cannot use)."""
    big = {"type": "object", "properties": {"a": {"enum": [f"value number {i}" for i in range(6000)]}}}
    with pytest.raises(APIError) as info:
        _forced(model.tokenizer, [{"type": "function", "function": {"name": "f", "parameters": big}}])
    err = info.value
    assert err.status == 400 and err.param == "tools" and "use choice" not in err.message, err.message
    assert err.message.startswith("tool_choice: the calls of these tools make a grammar of "), err.message


def test_an_unpaired_surrogate_is_named_by_its_field(server):
    """JSON's lone "\\ud800" escape decodes to a str no UTF-8 holds: the tokenizer refused the
    rendered prompt, and the 400 named no field, only a character of the template's text."""
    body = ('{"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": CONTENT}], '
            '"tools": [{"type": "function", "function": {"name": NAME}}], "tool_choice": "required"}')
    cases = [('"hi"', '"f\\ud800"', "tools", "tools[0].function.name holds an unpaired surrogate, U+D800, at character 1"),
             ('"a\\udfffb"', '"f"', "messages", "messages[0].content holds an unpaired surrogate, U+DFFF, at character 1")]
    for content, name, param, message in cases:
        reply = httpx.post(f"{server.url}/qwen/v1/chat/completions", headers={"content-type": "application/json"},
                           content=body.replace("CONTENT", content).replace("NAME", name).encode(), timeout=60)
        err = reply.json()["error"]
        assert reply.status_code == 400 and err["param"] == param and err["message"].startswith(message), err


def test_a_schema_that_is_no_json_is_named_once(model):
    """A schema number too large for a float (1e400 reads as inf) is no JSON: the 400 said
    "tools[0].function.parameters ('f'): tools[0].function.parameters: the JSON schema ..."."""
    schema = {"type": "object", "properties": {"a": {"type": "number", "maximum": float("inf")}}}
    with pytest.raises(APIError) as info:
        _forced(model.tokenizer, [{"type": "function", "function": {"name": "f", "parameters": schema}}])
    assert info.value.message.startswith("tools[0].function.parameters ('f'): the JSON schema is not JSON"), info.value


def test_a_malformed_named_tool_choice_is_named_by_its_field(server):
    """An object for tool_choice is a named function: its fault is reported, not that it is no
    "none", "auto" or "required" (which a function of null, or a name of null, was told)."""
    cases = [({"type": "function", "function": None}, "tool_choice.function"),
             ({"type": "function", "function": []}, "tool_choice.function"),
             ({"type": "function", "function": {"name": None}}, "tool_choice.function.name"),
             ("REQUIRED", "tool_choice"), (1, "tool_choice")]
    for choice, param in cases:
        reply = httpx.post(f"{server.url}/qwen/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": MESSAGES, "tools": TOOLS, "tool_choice": choice, "max_tokens": 4})
        err = reply.json()["error"]
        assert reply.status_code == 400 and err["param"] == param, (choice, err)
        assert ("'none', 'auto' or 'required'" in err["message"]) == (param == "tool_choice"), (choice, err)


def test_an_unpaired_surrogate_in_a_completions_prompt_is_named(server):
    """The same for /v1/completions: the 400 named no field ("the text holds ...")."""
    for prompt, where in (('"a\\ud800"', "prompt holds"), ('["ok", "a\\ud800"]', "prompt[1] holds")):
        reply = httpx.post(f"{server.url}/qwen/v1/completions", headers={"content-type": "application/json"},
                           content=f'{{"model": "m", "max_tokens": 2, "prompt": {prompt}}}'.encode(), timeout=60)
        err = reply.json()["error"]
        assert reply.status_code == 400 and err["param"] == "prompt" and err["message"].startswith(
            f"{where} an unpaired surrogate, U+D800, at character 1"), err
