"""A request's constraint options -> one llguidance grammar, checked before the request is queued.

A request names at most one of
- `response_format`: OpenAI's shapes, `{"type": "text"}` (no constraint), `{"type": "json_object"}`
  (any JSON object) or `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`;
- `regex`: a regular expression the whole output matches, as Python's `re` reads it
  (`re.fullmatch`); a schema's `pattern` (and `patternProperties`) is Python's too, `re.search`,
  with class escapes and `.` narrowed to what ECMA-262 also means (pyregex.py says how and why);
- `choice`: a list of strings, the output being exactly one of them;
- `grammar`: a Lark grammar (llguidance's dialect: https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import llguidance

from amlx.constrain.limits import check_definitions, on_deep_stack
from amlx.constrain.pyregex import Refused, to_llguidance
# (check_encodable refuses an unpaired surrogate, what JSON's "\ud800" decodes to: no output,
# UTF-8, can hold one, and llguidance took each differently: a regex that matched nothing failed
# its request once queued, a grammar raised UnicodeEncodeError, a schema's string named no option)
from amlx.tokenizer import check_encodable

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = ["Constraint", "ConstraintKind", "lark_json_schema", "parse_constraint"]

ConstraintKind = Literal["json", "regex", "choice", "grammar"]

# JSON comes out with json.dumps's separators (', ' and ': ', no other blanks; values are spelled
# as the model writes them, 1.000 as well as 1.0). Flexible
# whitespace would let a model spend its whole token budget on blanks between two keys. A schema
# may still choose otherwise through llguidance's "x-guidance" key, which overrides these.
_JSON_STYLE: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_OPTION_NAMES = ("response_format", "regex", "choice", "grammar")

# The longest `regex` and `grammar` taken, in characters. Both are checked on the caller's thread
# (the event loop's), and their cost grows faster than their length: a regex of 200,000
# alternatives ("w0|w1|...", 1.4 MB) took 20 s to read (Python's parser, then the rewrite) before
# llguidance refused it as too big; a Lark rule of 200,000 string alternatives 67 s to check and
# 5 minutes to compile (the grammar thread, every other new constraint waiting) before llguidance
# panicked. At this length the slowest shapes found take well under a second. (A long list of
# alternatives is what `choice` is for: one terminal, its cost linear.)
MAX_PATTERN_CHARS = 64 * 1024


@dataclass(frozen=True, slots=True)
class Constraint:
    """One request's constraint: its kind and the llguidance grammar (a JSON text) it compiles to."""

    kind: ConstraintKind
    grammar: str


def parse_constraint(
    *,
    response_format: Mapping[str, Any] | None = None,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    grammar: str | None = None,
) -> Constraint | None:
    """The constraint the options ask for, or None (no option, or `{"type": "text"}`).

    Raises ValueError naming the option and the problem: two constraints at once, a malformed
    option, or a schema / regex / grammar that llguidance rejects (with llguidance's message).
    """
    built = {
        "response_format": _from_response_format(response_format) if response_format is not None else None,
        "regex": _from_regex(regex) if regex is not None else None,
        "choice": _from_choice(choice) if choice is not None else None,
        "grammar": _from_lark(grammar) if grammar is not None else None,
    }
    given = [name for name in _OPTION_NAMES if built[name] is not None]
    if len(given) > 1:
        raise ValueError(f"at most one constraint per request, got {' and '.join(given)}")
    if not given:
        return None
    constraint = built[given[0]]
    assert constraint is not None
    _check(constraint.grammar, given[0])
    return constraint


def _from_response_format(value: Any) -> Constraint | None:
    if not isinstance(value, Mapping):
        raise ValueError(f"response_format must be a dict like {{'type': 'json_object'}}, got {type(value).__name__}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _from_schema({"type": "object"})
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' dict "
                             "({'name': ..., 'schema': {...}})")
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"response_format.json_schema.name must be a string, got {type(name).__name__}")
        schema = spec.get("schema", {})  # OpenAI: no schema means any JSON value
        if not isinstance(schema, (Mapping, bool)):
            raise ValueError(f"response_format.json_schema.schema must be a JSON schema object, "
                             f"got {type(schema).__name__}")
        return _from_schema(schema)
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _from_schema(schema: Mapping[str, Any] | bool) -> Constraint:
    # A schema nested deeper than Python's recursion limit raised RecursionError (no ValueError:
    # a server's 500) from json.dumps or the walks below; llguidance's own JSON parser stops
    # far sooner (128 levels) with a ValueError that named no option ("recursion limit
    # exceeded at line 1 column 3430").
    try:
        return _schema_constraint(schema)
    except RecursionError:
        raise ValueError("invalid response_format: the JSON schema is nested too deeply") from None


def _schema_constraint(schema: Mapping[str, Any] | bool) -> Constraint:
    # A boolean schema (JSON Schema's `true`: any value, `false`: none) is taken as its object
    # form: llguidance puts the JSON style into the schema object, and on a boolean it failed
    # with "Expecting object schema to apply options", an error that named no option, for
    # `true`, which any JSON value satisfies.
    if schema is True:
        schema = {}
    elif schema is False:
        raise ValueError("invalid response_format: the JSON schema false allows no value")
    try:
        text = json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"response_format: the JSON schema is not JSON-serializable: {e}") from e
    check_encodable(json.dumps(schema, ensure_ascii=False), "response_format: the JSON schema (as JSON text)")
    inexact = _inexact_number(schema, "schema")
    if inexact is not None:
        raise ValueError(f"invalid response_format: {inexact[0]} is {inexact[1]}, which the grammar engine cannot "
                         f"follow exactly (llguidance reads JSON numbers as 64-bit floats and integer bounds as "
                         f"64-bit integers: integers must be exact as floats and below 2**63 in magnitude)")
    try:
        text = _with_python_patterns(text)
    except _NotPython as e:
        raise ValueError(f"invalid response_format: {e}{_llguidance_too(text, schema=True)}") from None
    except ValueError as e:
        raise ValueError(f"invalid response_format: {e}") from None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=_JSON_STYLE)
    except ValueError as e:
        raise ValueError(f"invalid response_format: {e}") from None
    return Constraint("json", grammar)


def lark_json_schema(schema: Mapping[str, Any]) -> str:
    """The text of `schema` for a Lark grammar's `%json` (llguidance's dialect), spelled as a
    `response_format` schema is: the JSON written with json.dumps's separators and no other
    blanks (unless the schema's own "x-guidance" says otherwise), its patterns read as Python's."""
    own = schema.get("x-guidance")  # (one that is no object is ignored, as response_format's llguidance does)
    style = {**_JSON_STYLE, **(own if isinstance(own, Mapping) else {})}
    return _with_python_patterns(json.dumps({**schema, "x-guidance": style}, allow_nan=False))


@functools.lru_cache(maxsize=256)
def _with_python_patterns(text: str) -> str:
    """The schema (a JSON text) with its patterns rewritten for llguidance (`_schema_patterns`).
    Remembered per text, as `_grammar_problem` is: the walk cost a server's requests with one
    schema 24 us each (the test suite's SCHEMA)."""
    schema = json.loads(text)
    rewritten = _schema_patterns(schema, "schema")
    return text if rewritten is schema else json.dumps(rewritten)


# Schema keywords whose value is a schema, a list of schemas, or a map of names to schemas: the
# walk for patterns goes only there (a "pattern" elsewhere, in a const or as a property's name,
# is data).
_SUBSCHEMA = frozenset(("items", "additionalItems", "additionalProperties", "unevaluatedItems", "unevaluatedProperties",
                        "contains", "propertyNames", "not", "if", "then", "else", "contentSchema", "prefixItems",
                        "anyOf", "allOf", "oneOf"))
_SUBSCHEMA_MAPS = frozenset(("properties", "$defs", "definitions", "dependentSchemas", "dependencies"))


def _schema_patterns(node: Any, path: str) -> Any:
    """The schema with each `pattern` and `patternProperties` name rewritten for llguidance
    (`to_llguidance`, ECMA-narrowed); the same object where it has none. ValueError naming the
    pattern and where it is, if one cannot be followed."""
    if isinstance(node, list):
        items = [_schema_patterns(v, f"{path}[{i}]") for i, v in enumerate(node)]
        return node if all(a is b for a, b in zip(items, node)) else items
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        where = f"{path}.{key}"
        if key == "pattern" and isinstance(value, str):
            out[key] = _schema_pattern(value, where)
        elif key == "patternProperties" and isinstance(value, Mapping):
            out[key] = {}
            for name, sub in value.items():
                rewritten = _schema_pattern(name, f"{where}[{json.dumps(name)}]")
                if rewritten in out[key]:
                    raise ValueError(f"two names in {where} are the same pattern ({json.dumps(name)})")
                out[key][rewritten] = _schema_patterns(sub, f"{where}[{json.dumps(name)}]")
        elif key in _SUBSCHEMA_MAPS and isinstance(value, Mapping):
            out[key] = {name: _schema_patterns(sub, f"{where}.{name}") for name, sub in value.items()}
        elif key in _SUBSCHEMA:
            out[key] = _schema_patterns(value, where)
        else:
            out[key] = value
    return node if all(out[k] is node[k] for k in node) else out


def _schema_pattern(pattern: str, where: str) -> str:
    try:
        return to_llguidance(pattern, ecma=True)
    except Refused as e:
        raise ValueError(f"the pattern {pattern!r} at {where}: {e}") from None
    except (re.error, RecursionError) as e:
        raise _NotPython(f"the pattern {pattern!r} at {where} {_not_python(e)}") from None


class _NotPython(ValueError):
    """A schema's pattern that Python's re cannot parse."""


def _not_python(e: Exception) -> str:
    why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
    return (f"is not a regular expression Python's re can read ({why}); amlx reads patterns as "
            f"Python does (Rust's \\p{{..}}, \\x{{..}}, \\z, (?<name>...) are not Python's)")


def _llguidance_too(text: str, schema: bool) -> str:
    """llguidance's own complaint about the pattern (or schema) as given, if it has one: said
    with Python's, as the one error message used to be llguidance's alone."""
    try:
        grammar = (llguidance.LLMatcher.grammar_from_json_schema(text, defaults=_JSON_STYLE) if schema
                   else llguidance.LLMatcher.grammar_from_regex(text))
        if schema:
            check_definitions(grammar, "response_format")
    except ValueError:
        return ""
    problem = _grammar_problem(grammar)
    return f"; llguidance: {problem}" if problem else ""


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _inexact(value: Any, integer_bound: bool) -> bool:
    """An integer that llguidance would change (a float is its own value), or a bound of an
    integer schema beyond 64-bit integers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int) and float(value) != value:
        return True
    return (isinstance(value, int) or integer_bound) and abs(value) >= 2**63


def _inexact_number(node: Any, path: str, integer_bound: bool = False) -> tuple[str, Any] | None:
    """(where, value) of the first number in a schema that llguidance would change, else None.

    Why: llguidance reads a schema's numbers as 64-bit floats and an integer schema's bounds
    then as 64-bit integers, so the constraint it compiled was another one, and its outputs
    broke the schema: {"const": 2**53 + 1} came out 9007199254740992, {"const": 2**70} as
    1180591620717411200000, {"type": "integer", "minimum": 2**70} as 9223372036854775807."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            found = _inexact_number(item, f"{path}[{i}]", integer_bound)
            if found is not None:
                return found
        return None
    if not isinstance(node, Mapping):
        return (path, node) if _inexact(node, integer_bound) else None
    kinds = node.get("type")
    integer = kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds)
    for key, value in node.items():
        where = f"{path}.{key}"
        if key in _BOUNDS and not isinstance(value, (Mapping, list)):
            if _inexact(value, integer):
                return where, value
        elif key in ("const", "enum"):
            found = _inexact_number(_values_only(value), where)
            if found is not None:
                return found
        elif isinstance(value, (Mapping, list)):
            found = _inexact_number(value, where)
            if found is not None:
                return found
    return None


def _values_only(value: Any) -> Any:
    """A const or enum value with its objects as lists of their values (their keys are data, not
    schema keywords: `_inexact_number` looks only at the numbers in them)."""
    if isinstance(value, Mapping):
        return [_values_only(v) for v in value.values()]
    if isinstance(value, list):
        return [_values_only(v) for v in value]
    return value


def _from_regex(regex: Any) -> Constraint:
    if not isinstance(regex, str) or not regex:
        raise ValueError("regex must be a non-empty string")
    check_encodable(regex, "regex")
    _check_length(regex, "regex")
    try:
        rewritten = to_llguidance(regex)
    except Refused as e:
        raise ValueError(f"invalid regex {regex!r}: {e}") from None
    except (re.error, RecursionError) as e:
        raise ValueError(f"invalid regex: {regex!r} {_not_python(e)}{_llguidance_too(regex, schema=False)}") from None
    return Constraint("regex", llguidance.LLMatcher.grammar_from_regex(rewritten))


def _from_choice(choice: Any) -> Constraint:
    if isinstance(choice, (str, bytes)) or not isinstance(choice, Sequence):
        raise ValueError(f"choice must be a list of strings, got {type(choice).__name__}")
    if not choice or not all(isinstance(c, str) and c for c in choice):
        raise ValueError("choice must be a non-empty list of non-empty strings")
    for i, c in enumerate(choice):
        check_encodable(c, f"choice[{i}]")
    # Each choice is one Lark string literal. JSON string syntax is Lark's (quotes, backslashes,
    # control characters and non-ASCII as \u escapes, astral characters as surrogate pairs).
    # The alternation is one terminal (one lexeme, matched by llguidance's lexer), not a rule's
    # alternatives: as rule alternatives, the Earley parser held an item per choice in one row,
    # and from 2,000 choices on the request failed at its second token ("Current row has 2001
    # items; max is 2000").
    alternatives = " | ".join(json.dumps(c) for c in dict.fromkeys(choice))
    return Constraint("choice", llguidance.LLMatcher.grammar_from_lark(f"start: CHOICE\nCHOICE: {alternatives}\n"))


def _from_lark(grammar: Any) -> Constraint:
    if not isinstance(grammar, str) or not grammar.strip():
        raise ValueError("grammar must be a non-empty Lark grammar (a string)")
    check_encodable(grammar, "grammar")
    _check_length(grammar, "grammar")
    return Constraint("grammar", llguidance.LLMatcher.grammar_from_lark(grammar))


def _check_length(text: str, what: str) -> None:
    if len(text) > MAX_PATTERN_CHARS:
        raise ValueError(f"{what} is too long: {len(text)} characters, at most {MAX_PATTERN_CHARS} are taken "
                         f"(for a long list of alternatives, use choice)")


def _check(grammar: str, option: str) -> None:
    """llguidance compiles the grammar (no tokenizer needed); its error names the problem.
    A schema's or a Lark grammar's definitions are counted first (`limits`): too many could
    overflow the compiler's stack. (A choice's or a regex's grammar is one terminal: the ":"
    in its text are characters of its strings.)"""
    if option in ("response_format", "grammar"):
        check_definitions(grammar, option)
    problem = _grammar_problem(grammar)
    if problem is not None:
        raise ValueError(f"invalid {option}: {problem}")


@functools.lru_cache(maxsize=256)
def _grammar_problem(grammar: str) -> str | None:
    """llguidance's first error for `grammar`, or None. Remembered per grammar text (the check
    is a pure function of it): a server's many requests with one schema check it once. Each
    check compiles the grammar (0.1-0.2 ms for a small schema), on the event loop's thread:
    64 such requests submitted together took 20 ms against 4 unconstrained, so the worker
    started the first of them alone and the batch's prefill took two passes (the H200, 8B)."""
    # (on a deep stack: llguidance recurses once per definition it follows, see limits.py)
    is_error, messages = on_deep_stack(llguidance.LLMatcher.validate_grammar_with_warnings, grammar)
    return messages[0].strip() if is_error else None
