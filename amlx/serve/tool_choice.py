"""tool_choice "required" or a named function: the reply constrained to tool calls.

A forced call is a Lark grammar (llguidance's dialect) handed to the engine as the request's
`grammar` constraint. It spells the calls in the checkpoint's own tool-call format (the one
`amlx.toolcalls.detect_format` reads from its chat template), so the reply goes through the same
`ToolCallParser` as a free one and comes back as `tool_calls`, streamed or not:

* qwen: ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``, several separated by "\\n";
* llama3: ``{"name": ..., "parameters": ...}``, several separated by "; ";
* mistral: ``[TOOL_CALLS][{"name": ..., "arguments": ...}, ...]``, or ``[TOOL_CALLS]name[ARGS]{...}``
  per call where the template writes `[ARGS]` (tokenizers v11+).

Each call names one of the tools (a named tool_choice: that one, once) and its arguments are a
JSON value of the function's `parameters` schema (llguidance's `%json`, written as
`response_format` JSON is: json.dumps's separators, no other blanks). `parallel_tool_calls:
false` allows one call. A marker that is a token llguidance takes as special (an added `<...>`
token such as Qwen's `<tool_call>`, or one flagged special such as Mistral's `[TOOL_CALLS]`) is
that token (`<[id]>`): the token the model was trained to write, which decodes to the marker's
text, what the parser reads. Other markers are text.

A prompt that leaves a reasoning section open (Qwen3 "Thinking" templates end in `<think>\\n`,
`toolcalls.prompt_opens_reasoning`) is let finish its reasoning first: any text up to the
section's closing marker, then the calls (Qwen: after "\\n\\n", as Qwen3 writes). The parser
reads that text as content, as it would unforced. Elsewhere the reply starts with its calls: a
model that would open a reasoning section of its own (Qwen3 whose template leaves thinking on
without opening it) does not reason first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from amlx.constrain import parse_constraint
from amlx.constrain.spec import MAX_PATTERN_CHARS, lark_json_schema
from amlx.serve.errors import APIError
from amlx.serve.schemas import ChatRequest, Tool
from amlx.toolcalls import (MISTRAL_ARGS, MISTRAL_OPEN, QWEN_CLOSE, QWEN_OPEN, THINK, is_raw_word,
                            prompt_opens_reasoning)

__all__ = ["check_tool_choice", "forcing", "with_forced_calls"]

# The request's other constraints: one per request (constrain/spec.py)
_CONSTRAINT_FIELDS = ("response_format", "regex", "choice", "grammar")

# What a reasoning section is followed by before the reply proper, per format
_AFTER_REASONING = {"qwen": "\n\n"}

# Schema keywords that annotate and constrain nothing, left out of the grammar: its length is
# bounded (MAX_PATTERN_CHARS), and the descriptions of a tool's parameters are most of the text
# of its schema (a few dozen tools of an agent went over it). Dropped only with a string value:
# a property of that name has a schema.
_ANNOTATIONS = frozenset(("title", "description", "$comment"))
# Keywords whose value is data, not a schema: kept whole (a const object may hold "description")
_DATA = frozenset(("const", "enum", "default", "examples", "x-guidance"))


def forcing(req: ChatRequest) -> bool:
    """Whether the request's tool_choice forces a call ("required" or a named function)."""
    return req.tool_choice is not None and req.tool_choice not in ("none", "auto")


def _named(req: ChatRequest) -> str | None:
    choice = req.tool_choice
    return None if isinstance(choice, str) or choice is None else _function_name(choice.function)


def _function_name(function: Mapping[str, str]) -> str:
    name = function.get("name")
    if name is None:
        raise APIError(400, "tool_choice.function needs a 'name'", param="tool_choice.function",
                       code="invalid_value")
    return name


def check_tool_choice(req: ChatRequest, fmt: str | None) -> None:
    """Raises the 400 a forced call cannot be made for (nothing for "auto" and "none"): a
    named function that is none of the tools, a template that teaches no tool-call format,
    another constraint on the same reply. (tool_choice without tools is prompts.chat_tools')"""
    if not forcing(req) or not req.tools:
        return
    named = _named(req)
    if named is not None and named not in {t.function.name for t in req.tools}:
        raise APIError(400, f"tool_choice names the function {named!r}, which is not among the tools "
                       f"({', '.join(repr(t.function.name) for t in req.tools)})", param="tool_choice",
                       code="invalid_value")
    if fmt is None:
        raise APIError(400, "tool_choice cannot force a call: this model's chat template has no tool-call format "
                       "amlx knows (Qwen/Hermes, Llama 3.1, Mistral)", param="tool_choice",
                       code="unsupported_parameter")
    others = [name for name in _CONSTRAINT_FIELDS if _constrains(req, name)]
    if others:
        # (as parse_constraint says it of two constraint options)
        raise APIError(400, f"at most one constraint per request, got tool_choice {_shown(req)} and "
                       f"{' and '.join(others)}", param="tool_choice", code="invalid_value")


def _constrains(req: ChatRequest, field: str) -> bool:
    value = getattr(req, field)
    return value is not None and not (field == "response_format" and value.type == "text")


def _shown(req: ChatRequest) -> str:
    named = _named(req)
    return "'required'" if named is None else f"(the function {named!r})"


def with_forced_calls(req: ChatRequest, fmt: str | None, tokenizer: Any, prompt: Sequence[int]) -> ChatRequest:
    """The request with its forced calls as its `grammar`, or the request itself when its
    tool_choice forces none (blocking: llguidance checks the grammar; run it off the event
    loop). Call `check_tool_choice` first."""
    if not forcing(req) or not req.tools or fmt is None:
        return req
    named = _named(req)
    thinking = prompt_opens_reasoning(tokenizer, prompt, fmt)
    several = named is None and req.parallel_tool_calls is not False
    grammar = call_grammar(fmt, req.tools, _Markers(tokenizer), several=several, thinking=thinking,
                           template=tokenizer.chat_template, named=named)
    if len(grammar) > MAX_PATTERN_CHARS:  # (the grammar's own 400 told the client to use `choice`)
        raise APIError(400, f"tool_choice: the calls of these tools make a grammar of {len(grammar)} characters, "
                       f"at most {MAX_PATTERN_CHARS} are taken: name one function in tool_choice, or send fewer "
                       f"tools or smaller parameters schemas", param="tools", code="invalid_value")
    try:
        parse_constraint(grammar=grammar)  # (its result is remembered: the engine's own check costs nothing)
    except ValueError as exc:
        raise APIError(400, f"tool_choice: the tools' calls cannot be constrained: {exc}", param="tools",
                       code="invalid_value") from exc
    return req.model_copy(update={"grammar": grammar})


class _Markers:
    """Markup in a grammar: the special token it names, else its text."""

    def __init__(self, tokenizer: Any):
        # The tokens llguidance takes as special (matcher._mark_special_tokens): added tokens
        # flagged special, or named `<...>`. As text they would be spelled in ordinary tokens.
        self._special = {t.content: i for i, t in tokenizer.backend.get_added_tokens_decoder().items()
                         if t.special or (t.content.startswith("<") and t.content.endswith(">"))}

    def __call__(self, text: str) -> str:
        token = self._special.get(text)
        return f"<[{token}]>" if token is not None else _lark_string(text)

    def is_token(self, text: str) -> bool:
        return text in self._special


def _lark_string(text: str) -> str:
    """A Lark string literal of `text` (JSON's string syntax is Lark's)."""
    return json.dumps(text)


def call_grammar(fmt: str, tools: Sequence[Tool], markers: _Markers, *, several: bool, thinking: bool,
                 template: str | Mapping[str, str] | None, named: str | None = None) -> str:
    """The Lark grammar of one (or with `several`, one or more) calls of `tools` in format `fmt`
    (where `named`, of the tools of that name only), after the rest of an open reasoning section
    where `thinking`. An error about a tool names it by its index among all the `tools`."""
    rules = ["%llguidance {}", f"start: {'reasoning ' if thinking else ''}calls"]
    if thinking:
        rules += _reasoning_rules(fmt, markers)
    args_key = "parameters" if fmt == "llama3" else "arguments"
    named_form = fmt == "mistral" and MISTRAL_ARGS in _template_text(template)
    alternatives = []
    args_rules: dict[str, str] = {}  # a schema's text -> its rule: tools with one schema share it
    for i, tool in enumerate(tools):
        name = tool.function.name
        if named is not None and name != named:
            continue
        _check_name(name, named_form)
        schema = _arguments_schema(tool, i)
        args = args_rules.get(schema)
        if args is None:
            args = args_rules[schema] = f"args_{i}"
            rules.append(f"{args}: %json {schema}")
        if named_form:
            head = f"{_lark_string(name)} {markers(MISTRAL_ARGS)}"
            rules.append(f"call_{i}: {head} {args}")
        else:
            head = _lark_string(f'{{"name": {json.dumps(name, ensure_ascii=False)}, "{args_key}": ')
            rules.append(f'call_{i}: {head} {args} "}}"')
        alternatives.append(f"call_{i}")
    rules.append(f"call: {' | '.join(alternatives)}")
    rules.append(_calls_rule(fmt, markers, several, named_form))
    return "\n".join(rules) + "\n"


def _check_name(name: str, named_form: bool) -> None:
    """A name the parser reads back: not empty, and in Mistral's `name[ARGS]` form a raw word
    (no blanks, brackets or quotes; OpenAI's names are letters, digits, '_' and '-' anyway)."""
    if not name or (named_form and not is_raw_word(name)):
        raise APIError(400, f"tool_choice cannot force a call of the function {name!r}: this model's tool-call "
                       f"format cannot write that name", param="tools", code="invalid_value")


def _calls_rule(fmt: str, markers: _Markers, several: bool, named_form: bool) -> str:
    """`calls`: one call, or with `several` one or more, with the format's markup around them."""
    def repeated(item: str, separator: str) -> str:
        return f"{item} ({_lark_string(separator)} {item})*" if several else item

    if fmt == "qwen":
        one = f"{markers(QWEN_OPEN)} {_lark_string(chr(10))} call {_lark_string(chr(10))} {markers(QWEN_CLOSE)}"
        return f"calls: {repeated('one_call', chr(10))}\none_call: {one}"
    if fmt == "llama3":
        return f"calls: {repeated('call', '; ')}"
    if named_form:  # each call after its own [TOOL_CALLS]
        return f"calls: ({markers(MISTRAL_OPEN)} call){'+' if several else ''}"
    return f'calls: {markers(MISTRAL_OPEN)} "[" {repeated("call", ", ")} "]"'


def _reasoning_rules(fmt: str, markers: _Markers) -> list[str]:
    """The rest of an open reasoning section: any text, its closing marker, then what the
    format writes before the reply. The parser reads text: the section ends where the marker's
    text first occurs, so the text before the marker never holds it. (Where the marker is a
    token, its text spelled in ordinary tokens ended the section to the parser, not to the
    grammar, and a call written after it, of any name, was read as one.) A marker in text ends
    the section the first place it occurs."""
    close = THINK[fmt][1]
    after = _AFTER_REASONING.get(fmt, "")
    tail = f" {_lark_string(after)}" if after else ""
    marker = re.escape(close).replace("/", "\\/")
    if markers.is_token(close):
        return [f"reasoning: THOUGHT {markers(close)}{tail}", f"THOUGHT: /(?s:.*)/ & ~/(?s:.*{marker}.*)/"]
    return [f"reasoning: THOUGHT{tail}", f"THOUGHT: /(?s:.*{marker})/ & ~/(?s:.*{marker}.+)/"]


def _template_text(template: str | Mapping[str, str] | None) -> str:
    if isinstance(template, Mapping):
        return "\n".join(str(v) for v in template.values())
    return template or ""


def _arguments_schema(tool: Tool, index: int) -> str:
    """The function's `parameters` as the text of a `%json` schema: any object where it has
    none (OpenAI's "no parameters"), patterns read as Python's (as response_format's), the JSON
    written as response_format's is, without its annotations (`_ANNOTATIONS`). A schema the
    server would refuse as a response_format is refused here too, naming the tool."""
    where = f"tools[{index}].function.parameters"
    schema = _object_schema(tool.function.parameters, where)
    try:
        parse_constraint(response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    except ValueError as exc:
        # ("invalid response_format: ..." or "response_format: ...": the prefix says `where` already)
        message = str(exc).replace("invalid response_format: ", "").replace("response_format", where)
        message = message.removeprefix(f"{where}: ")
        raise APIError(400, f"{where} ({tool.function.name!r}): {message}", param="tools",
                       code="invalid_value") from exc
    return lark_json_schema(_without_annotations(schema))


def _without_annotations(node: Any) -> Any:
    """A schema without its annotations (`_ANNOTATIONS`), its data (`_DATA`) as it was."""
    if isinstance(node, list):
        return [_without_annotations(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {key: value if key in _DATA else _without_annotations(value) for key, value in node.items()
            if not (key in _ANNOTATIONS and isinstance(value, str))}


def _object_schema(params: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """`parameters` as a schema of objects only: a call's arguments are an object (the parser
    reads nothing else as a call), so a schema without a type gets type "object", and one of
    another type is refused."""
    if params is None:
        return {"type": "object"}
    kind = params.get("type")
    if kind is None:
        return {**params, "type": "object"}
    if kind == "object":
        return params
    if isinstance(kind, list) and "object" in kind:
        return {**params, "type": "object"}
    raise APIError(400, f"{where} must be the JSON schema of an object (a call's arguments are an object), "
                   f"got type {kind!r}", param="tools", code="invalid_value")
