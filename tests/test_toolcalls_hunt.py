"""Tool calls end to end, fuzzed: model replies in each family's markup, cut at any token
boundary, through `amlx.toolcalls` alone and through the server to the official `openai` client.

Replies are built from segments: prose (markup-like text, unicode), `<think>` sections
(plain content to amlx: it has no reasoning parser; a call inside one is content too),
well-formed calls (argument strings holding markup, quotes, backslashes, U+2028; the last
one maybe without its close tag), malformed calls (cut JSON, no close tag, not-a-call
objects) and text after calls; Mistral replies in each of its forms. Checked:

* streamed in any split, the parser gives what the whole-text parse gives, never raises;
* nothing is lost or duplicated: the events replay the text, each call standing for exactly
  one `<tool_call>...</tool_call>` block whose JSON it is; for replies with only well-formed
  calls, the calls and the content are exactly the ones the reply was built from;
* through the server (a scripted model: the public `generate` of a real loaded model is
  replaced by one that yields the reply's tokens, the seam tests/helpers/failing_server.py
  uses), the openai client sees, streamed and not, the same content and valid tool_calls
  (ids, index, type, name, JSON-object arguments), finish_reason "tool_calls" only for a
  reply the model ended (not one cut by max_tokens) that holds calls, and never an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState

import amlx
from amlx.serve.app import Settings, create_app
from amlx.toolcalls import BlankAroundCalls, ToolCallParser, parse_tool_calls
from tests.helpers.scripted import ScriptedModel, chat_replies
from tests.helpers.serving import MountedApps, serve_checkpoint, tool_checkpoint

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------------
# replies

# text a model may write that looks like markup, or is hard to carry (quotes, escapes, line
# separators that SSE readers split at, astral characters)
_TRICKY = [OPEN, CLOSE, "<tool_", "call>", "</tool", "<think>", "</think>", '"', "\\", '\\"', "{", "}", "[", "]",
           "\n", " ", "😀", "\u2028", "\x85", "é", "<", ">", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", ";",
           '"name"', '"arguments"', ":"]
_tricky_text = st.lists(st.one_of(st.sampled_from(_TRICKY), st.text(max_size=5)), max_size=6).map("".join)
_names = st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True),
                   st.sampled_from(["météo", "get weather", "f</tool_call>", "名前", "a\"b"]))
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                     st.floats(allow_nan=False, allow_infinity=False), _tricky_text)
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(_tricky_text, inner, max_size=3)),
                       max_leaves=8)
_arguments = st.dictionaries(_tricky_text, _values, max_size=4)


@dataclass
class Reply:
    text: str
    content: str | None  # what the reply's content is, None where the builder cannot tell
    calls: list[tuple[str, dict]] | None  # the calls (name, arguments) likewise


@st.composite
def _qwen_call(draw) -> tuple[str, tuple[str, dict]]:
    name, args = draw(_names), draw(_arguments)
    as_string = draw(st.booleans())  # some models write the arguments as a JSON string
    obj = {"name": name, "arguments": json.dumps(args) if as_string else args}
    body = json.dumps(obj, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
    pad = draw(st.sampled_from(["", "\n", " ", "\n\n"]))
    return OPEN + pad + body + draw(st.sampled_from(["", "\n", " "])) + CLOSE, (name, args)


@st.composite
def _malformed_qwen_call(draw) -> str:
    call, _ = draw(_qwen_call())
    body = call[len(OPEN):-len(CLOSE)]
    kind = draw(st.sampled_from(["cut", "unclosed", "not_a_call", "junk_after", "bad_args", "nan"]))
    if kind == "cut":  # the JSON cut short (max_tokens, or a model that lost its way), closed anyway
        return OPEN + body[:draw(st.integers(0, max(0, len(body) - 2)))] + CLOSE
    if kind == "unclosed":  # no </tool_call>: the reply ends inside the call
        return OPEN + body[:draw(st.integers(0, len(body)))]
    if kind == "not_a_call":
        return OPEN + draw(st.sampled_from(['{"key": "value"}', '{"name": ""}', '{"name": 3, "arguments": {}}',
                                            '[]', 'null', '{"name": "f", "arguments": [1]}',
                                            '{"name": "f", "arguments": "not json"}'])) + CLOSE
    if kind == "junk_after":
        return OPEN + body + " junk" + CLOSE
    if kind == "bad_args":
        return OPEN + '{"name": "f", "arguments": {"a": 1e400}}' + CLOSE
    return OPEN + '{"name": "f", "arguments": {"a": NaN}}' + CLOSE


_prose = _tricky_text.filter(lambda t: OPEN not in t)


@st.composite
def _think(draw) -> str:
    return "<think>" + draw(_prose) + ("</think>" if draw(st.booleans()) else "") + draw(st.sampled_from(["", "\n\n"]))


def _scan_run(run: str, thinking: bool) -> tuple[bool, bool]:
    """(whether a reasoning section is open after `run`, whether `run` writes a `<tool_call>`
    outside one) for plain text that starts inside a section or not: outside one a `<think>`
    opens one, inside one the next `</think>` closes it, as the parser reads them."""
    pos = 0
    while True:
        if thinking:
            found = run.find("</think>", pos)
            if found < 0:
                return True, False
            pos, thinking = found + len("</think>"), False
            continue
        think, call = run.find("<think>", pos), run.find(OPEN, pos)
        if call >= 0 and (think < 0 or call < think):
            return False, True
        if think < 0:
            return False, False
        pos, thinking = think + len("<think>"), True


@st.composite
def well_formed_qwen(draw) -> Reply:
    """Prose, think sections and well-formed calls, in any order: the calls and content are
    known. A call drawn inside a reasoning section (one opened and not yet closed) is content;
    the last call may lack its `</tool_call>` (the reply ended right after its JSON)."""
    parts = draw(st.lists(st.one_of(st.tuples(st.just("text"), _prose), st.tuples(st.just("think"), _think()),
                                    st.tuples(st.just("call"), _qwen_call())), max_size=6))
    if parts and parts[-1][0] == "call" and draw(st.booleans()):
        call_text, call = parts[-1][1]
        parts[-1] = ("call", (call_text[:-len(CLOSE)], call))
    text, content, calls = "", "", []
    run, thinking = "", False  # the text since the last call, and whether it started in a section
    for kind, value in parts:
        if kind == "call":
            now, opens = _scan_run(run, thinking)
            if opens:  # adjacent prose pieces that together write an opening tag
                return draw(st.nothing())
            text += value[0]
            if now:  # inside a reasoning section the call is text (which may close the section)
                content += value[0]
                run += value[0]
            else:
                calls.append(value[1])
                run, thinking = "", False
        else:
            run += value
            text += value
            content += value
    if _scan_run(run, thinking)[1]:
        return draw(st.nothing())
    return Reply(text, content, calls)


@st.composite
def any_qwen(draw) -> Reply:
    """Anything: malformed calls, tricky text and well-formed calls mixed; only the text is known."""
    parts = draw(st.lists(st.one_of(_tricky_text, _qwen_call().map(lambda c: c[0]), _malformed_qwen_call(), _think()),
                          max_size=6))
    return Reply("".join(parts), None, None)


@st.composite
def llama_reply(draw) -> Reply:
    calls = draw(st.lists(st.tuples(_names, _arguments), min_size=1, max_size=3))
    sep = draw(st.sampled_from(["; ", ";", "\n", ";\n"]))
    body = sep.join(json.dumps({"name": n, "parameters": a}, ensure_ascii=draw(st.booleans())) for n, a in calls)
    text = draw(st.sampled_from(["", "<|python_tag|>", " ", "\n"])) + body
    if draw(st.booleans()):  # malformed: cut, or prose first (a Llama call must start the reply)
        last = json.dumps({"name": calls[-1][0], "parameters": calls[-1][1]})
        cut = text[:len(text) - len(last) // 2 - 1]  # inside the last call's JSON
        text = draw(st.sampled_from([cut, "Sure: " + text, text + " and some text"]))
        if text == cut and len(calls) > 1:  # the calls before the cut one stay calls: see test_known_defects_fixed
            return Reply(text, None, None)
        return Reply(text, text, [])
    return Reply(text, "", calls)


@st.composite
def mistral_reply(draw) -> Reply:
    calls = draw(st.lists(st.tuples(_names, _arguments), min_size=1, max_size=3))
    before = draw(_prose.filter(lambda t: not any(m in t for m in ("[TOOL_CALLS]", "[THINK]", "[/THINK]"))))
    # (the `name[ARGS]{...}` form writes the name as raw text: a blank or JSON punctuation there
    # makes it no name, see test_mistral_args_form_name_is_a_name)
    raw_names = all(not any(ch.isspace() or ch in '[]{}"' for ch in n) for n, _ in calls)
    # the forms of tokenizers v3/v7 (a JSON list), v11+ ([ARGS]), v11 with ids ([CALL_ID]), and
    # the last with its control tokens dropped (name{...})
    form = draw(st.sampled_from(["list", "args", "call_id", "bare"])) if raw_names else "list"
    if form == "list":
        body = last = json.dumps([{"name": n, "arguments": a} for n, a in calls], ensure_ascii=draw(st.booleans()))
    else:
        ids = draw(st.lists(st.from_regex(r"[A-Za-z0-9]{9}", fullmatch=True), min_size=len(calls),
                            max_size=len(calls)))
        head = {"args": "{}[ARGS]", "call_id": "{}[CALL_ID]{}[ARGS]", "bare": "{}"}[form]
        body = "[TOOL_CALLS]".join(head.format(n, i) + json.dumps(a) for (n, a), i in zip(calls, ids))
        last = json.dumps(calls[-1][1])
    if draw(st.booleans()):  # Magistral reasons first; a call written there is part of the reasoning
        before = "[THINK]" + before + draw(st.sampled_from(["", "[TOOL_CALLS]f[ARGS]{}"])) + "[/THINK]"
    text = before + "[TOOL_CALLS]" + body
    if draw(st.booleans()):  # malformed: the JSON (the last call's, in the [ARGS] form) cut short
        text = text[:len(text) - draw(st.integers(1, len(last)))]
        if len(calls) > 1 or form == "list":  # complete calls before the cut stay calls (test_known_defects_fixed)
            return Reply(text, None, None)
        return Reply(text, text, [])
    return Reply(text, before, calls)


def _chunks(text: str, cuts: list[float]) -> list[str]:
    """`text` in pieces cut at `cuts` (fractions of its length, so cuts land anywhere), with the
    empty pieces an engine sends for a token that holds only part of a character."""
    bounds = sorted({round(c * len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
    return pieces + [""] if len(cuts) % 3 == 1 else pieces


_cuts = st.lists(st.floats(0, 1), max_size=24)


# ---------------------------------------------------------------------------------------------
# the parser alone

def _feed(fmt: str | None, pieces: list[str]) -> tuple[list, ToolCallParser]:
    parser = ToolCallParser(fmt)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish(), parser


def _replays(text: str, events: list) -> None:
    """The events account for all of `text` in order: strings as they are, each call as one
    `<tool_call>...</tool_call>` block whose JSON is that call."""
    pos = 0
    for e in events:
        if isinstance(e, str):
            assert text.startswith(e, pos), (text, events, pos)
            pos += len(e)
            continue
        assert text.startswith(OPEN, pos), (text, events, pos)
        end = text.find(CLOSE, pos)
        while end >= 0:  # (a close tag inside an argument string is not the call's end)
            try:
                obj = json.loads(text[pos + len(OPEN):end])
            except ValueError:
                obj = None
            if isinstance(obj, dict) and obj.get("name") == e.name:
                break
            end = text.find(CLOSE, end + 1)
        if end < 0:  # an unclosed call ends the reply
            obj, end = json.loads(text[pos + len(OPEN):]), len(text) - len(CLOSE)
            assert obj.get("name") == e.name
        args = obj.get("arguments", {})
        assert json.loads(e.arguments) == (json.loads(args) if isinstance(args, str) and args.strip() else args or {})
        pos = end + len(CLOSE)
    assert pos == len(text), (text, events, pos)


def _id_ok(fmt: str, call_id: str) -> bool:
    """OpenAI's style of id, or for Mistral the 9 alphanumeric characters its templates take."""
    return bool(re.fullmatch("[0-9A-Za-z]{9}", call_id)) if fmt == "mistral" else call_id.startswith("call_")


def _valid_calls(calls, fmt: str) -> None:
    ids = [c.id for c in calls]
    assert len(set(ids)) == len(ids) and all(_id_ok(fmt, i) for i in ids)
    for c in calls:
        assert isinstance(c.name, str) and c.name
        c.arguments.encode("utf-8")  # sendable
        assert isinstance(json.loads(c.arguments, parse_constant=lambda k: 1 / 0), dict)


@seed(20261206)
@FUZZ
@given(reply=st.one_of(well_formed_qwen(), any_qwen()), cuts=_cuts)
def test_qwen_streams_as_it_parses_and_loses_nothing(reply, cuts):
    events, parser = _feed("qwen", _chunks(reply.text, cuts))
    content = "".join(e for e in events if isinstance(e, str))
    whole_content, whole_calls = parse_tool_calls(reply.text, "qwen")
    assert content == whole_content
    assert [(c.name, c.arguments) for c in parser.calls] == [(c.name, c.arguments) for c in whole_calls]
    assert [e for e in events if not isinstance(e, str)] == parser.calls
    _valid_calls(parser.calls, "qwen")
    _replays(reply.text, events)
    if reply.calls is not None:
        assert content == reply.content
        assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == reply.calls


@seed(20261206)
@FUZZ
@given(data=st.one_of(st.tuples(st.just("llama3"), llama_reply()), st.tuples(st.just("mistral"), mistral_reply())),
       cuts=_cuts)
def test_llama_and_mistral_stream_as_they_parse(data, cuts):
    fmt, reply = data
    events, parser = _feed(fmt, _chunks(reply.text, cuts))
    content = "".join(e for e in events if isinstance(e, str))
    whole_content, whole_calls = parse_tool_calls(reply.text, fmt)
    assert content == whole_content
    assert [(c.name, c.arguments) for c in parser.calls] == [(c.name, c.arguments) for c in whole_calls]
    _valid_calls(parser.calls, fmt)
    if reply.calls is not None:
        assert content == reply.content
        assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == reply.calls


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    """A Qwen tokenizer with <tool_call>, </tool_call>, <think> and </think> as tokens of their own."""
    from amlx.tokenizer import Tokenizer

    return Tokenizer.from_dir(tool_checkpoint(tmp_path_factory.mktemp("hunt-tok")))


@seed(20261206)
@settings(FUZZ, max_examples=40)
@given(reply=st.one_of(well_formed_qwen(), any_qwen()))
def test_qwen_through_the_streaming_detokenizer(qwen_tokenizer, reply):
    """The reply's tokens, detokenized one at a time as the engine does (pieces end only where a
    character does; held-back bytes of an emoji give empty pieces), parse as the whole text."""
    ids = qwen_tokenizer.encode(reply.text, add_special_tokens=False)
    text = qwen_tokenizer.decode(ids)
    detok = qwen_tokenizer.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.finalize()]
    assert "".join(pieces) == text
    events, parser = _feed("qwen", pieces)
    whole_content, whole_calls = parse_tool_calls(text, "qwen")
    assert "".join(e for e in events if isinstance(e, str)) == whole_content
    assert [(c.name, c.arguments) for c in parser.calls] == [(c.name, c.arguments) for c in whole_calls]
    _replays(text, events)
    if reply.calls is not None and text == reply.text:
        assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == reply.calls


# ---------------------------------------------------------------------------------------------
# through the server

SCRIPTS: dict[int, tuple[list[str], str]] = {}  # seed -> (the reply's token texts, finish reason)
_NEXT_SEED = iter(range(1000, 10**9, 10))

_TEMPLATES = {"qwen": None, "llama3": "<|start_header_id|>{{ '<|python_tag|>' }}", "mistral": "{{ '[TOOL_CALLS]' }}"}


def _servers(model, templates: dict[str, str | None] = _TEMPLATES, scripted: bool = True) -> MountedApps:
    """uvicorn on a thread of its own, serving an app per tool-call format at /FORMAT/v1 (the
    model scripted), or the model as it is."""
    return MountedApps({fmt: create_app(ScriptedModel(model, tpl, SCRIPTS) if scripted else model, Settings(model_name="m"))
                        for fmt, tpl in templates.items()})


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with amlx.load_sync(serve_checkpoint(tmp_path_factory.mktemp("hunt-ckpt")), max_context=512) as model:
        srv = _servers(model)
        try:
            yield srv
        finally:
            srv.stop()


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "Weather?"}]


def _script(replies: list[tuple[list[str], str]]) -> int:
    first = next(_NEXT_SEED)
    for k, reply in enumerate(replies):
        SCRIPTS[first + k] = reply
    return first


def _expected(fmt: str, text: str, finish: str) -> tuple[str, list[tuple[str, str]], str]:
    """What the server sends for a reply: its parse, less the blank content between and around
    calls (BlankAroundCalls: the "\n" between two Qwen calls is no content)."""
    parser = ToolCallParser(fmt)
    events = BlankAroundCalls()(parser.feed(text) + parser.finish(), end=True)
    content, calls = "".join(e for e in events if isinstance(e, str)), parser.calls
    return content, [(c.name, c.arguments) for c in calls], "tool_calls" if calls and finish == "stop" else finish


def _check_served(client: openai.OpenAI, fmt: str, replies: list[tuple[list[str], str]]) -> None:
    """The replies (one per choice) asked for whole and streamed; both as their parse gives them."""
    want = [_expected(fmt, "".join(pieces), finish) for pieces, finish in replies]
    kw = dict(model="m", messages=MESSAGES, tools=TOOLS, n=len(replies), max_tokens=64)

    r = client.chat.completions.create(seed=_script(replies), **kw)
    assert sorted(c.index for c in r.choices) == list(range(len(replies)))
    assert r.usage.completion_tokens == sum(len(pieces) for pieces, _ in replies)  # (a token a piece)
    ids = []
    for choice in sorted(r.choices, key=lambda c: c.index):
        content, calls, finish = want[choice.index]
        msg = choice.message
        assert choice.finish_reason == finish
        assert msg.role == "assistant"
        assert (msg.content or "") == content and (msg.content is not None or calls)
        got = msg.tool_calls or []
        assert [(c.function.name, c.function.arguments) for c in got] == calls
        for c in got:
            assert c.type == "function" and _id_ok(fmt, c.id)
            assert isinstance(json.loads(c.function.arguments), dict)
        ids += [c.id for c in got]

    stream = client.chat.completions.create(seed=_script(replies), stream=True, **kw)
    state = ChatCompletionStreamState()
    texts: dict[int, str] = {}
    deltas: dict[int, list] = {}
    finishes: dict[int, list] = {}
    for chunk in stream:
        state.handle_chunk(chunk)
        for ch in chunk.choices:
            assert not finishes.get(ch.index), "a chunk after the choice's finish_reason"
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            deltas.setdefault(ch.index, []).extend(ch.delta.tool_calls or [])
            if ch.finish_reason is not None:
                finishes.setdefault(ch.index, []).append(ch.finish_reason)
    for i, (content, calls, finish) in enumerate(want):
        assert texts.get(i, "") == content
        assert finishes.get(i) == [finish]
        got = deltas.get(i, [])
        assert [d.index for d in got] == list(range(len(calls)))  # each call once, in order
        assert [(d.function.name, d.function.arguments) for d in got] == calls
        assert all(d.type == "function" and _id_ok(fmt, d.id) for d in got)
        ids += [d.id for d in got]
    assert len(set(ids)) == len(ids)  # every call of both responses has an id of its own
    # the openai library's own accumulation of the stream gives the non-streamed message
    # (its snapshot: get_final_completion refuses a reply cut by max_tokens)
    final = state.current_completion_snapshot
    for choice in final.choices:
        content, calls, finish = want[choice.index]
        assert (choice.message.content or "") == content and choice.finish_reason == finish
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] == calls


_finish = st.sampled_from(["stop", "stop", "length"])


@seed(20261206)
@settings(FUZZ, max_examples=40)
@given(replies=st.lists(st.tuples(st.one_of(well_formed_qwen(), any_qwen()), _cuts, _finish), min_size=1,
                        max_size=2))
def test_served_qwen_replies(servers, replies):
    _check_served(servers.client("qwen"), "qwen", [(_chunks(r.text, cuts), f) for r, cuts, f in replies])


@seed(20261206)
@settings(FUZZ, max_examples=20)
@given(data=st.one_of(st.tuples(st.just("llama3"), llama_reply()), st.tuples(st.just("mistral"), mistral_reply())),
       cuts=_cuts, finish=_finish)
def test_served_llama_and_mistral_replies(servers, data, cuts, finish):
    fmt, reply = data
    _check_served(servers.client(fmt), fmt, [(_chunks(reply.text, cuts), finish)])


def test_served_examples(servers):
    """Hand-picked replies: several calls with text between and after, a close tag split over
    tokens, a malformed call then a good one, unicode and line separators in arguments."""
    call = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich\\u2028😀", "q": "</tool_call>"}}'
            '\n</tool_call>')
    for pieces in (
            ["Let me check.", call[:5], call[5:40], call[40:-3], call[-3:], " and ", call, " Done."],
            ["<think>", "I should call <tool_call> later", "</think>", "\n\n", call],
            ["<tool_call>{\"name\": \"f\", \"arguments\": {", "}</tool_call>", call, "after"],
            ["<tool_call>{oops}</tool_call> then ", call],
            ["<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa"]):  # cut by the end
        for finish in ("stop", "length"):
            _check_served(servers.client("qwen"), "qwen", [(pieces, finish)])
    # without tools nothing is parsed: the markup is content
    text = "".join(["x ", call])
    seed_ = _script([([text], "stop")])
    r = servers.client("qwen").chat.completions.create(model="m", messages=MESSAGES, seed=seed_, max_tokens=8)
    assert r.choices[0].message.content == text and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"


def _served(client: openai.OpenAI, pieces: list[str], finish: str, **kw) -> list[tuple]:
    """(content, [(name, arguments)], finish_reason) of a scripted reply, whole and streamed."""
    replies = chat_replies(client, model="m", messages=MESSAGES, tools=TOOLS, seed=_script([(pieces, finish)]),
                           max_tokens=64, **kw)
    return [(content or "", calls, reason) for content, calls, reason in replies]


def test_served_unclosed_call_at_the_end(servers):
    """A reply that ends right after a whole call's JSON without `</tool_call>` has that call,
    streamed and not. Ended by the model (EOS, or a stop string such as "</tool_call>"), the
    finish reason is "tool_calls"; cut by max_tokens, it stays "length", the call included.
    The reply was content: the client saw markup and no call."""
    call = '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    pieces = ["Let me look.", "<tool_call>", call[:9], call[9:]]
    for finish, reason in (("stop", "tool_calls"), ("length", "length")):
        for got in _served(servers.client("qwen"), pieces, finish):
            assert got == ("Let me look.", [("get_weather", '{"city": "Paris"}')], reason)
    # a cut JSON is no call, whatever ended the reply
    for finish in ("stop", "length"):
        for got in _served(servers.client("qwen"), ["<tool_call>", call[:20]], finish):
            assert got == ("<tool_call>" + call[:20], [], finish)


def test_served_calls_inside_reasoning_are_content(servers, tmp_path):
    """A reply's calls inside its `<think>` section are content, also where the chat template's
    generation prompt opened the section (Qwen3 "Thinking" templates end it in `<think>\n`, so
    the reply has only the `</think>`): the server reads the prompt's end to know. The
    reasoning's calls were sent as real calls."""
    from tests.helpers.tokenizers import _QWEN_TEMPLATE

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    want = ("get_weather", '{"city": "Paris"}')
    reply = ["I could ", call[:15], call[15:], " now.\n", "</think>", "\n\n", call]
    ckpt = serve_checkpoint(tmp_path / "thinking")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    opened = _QWEN_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    assert opened != _QWEN_TEMPLATE
    config["chat_template"] = opened
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    with amlx.load_sync(ckpt, max_context=512) as model:
        srv = _servers(model, {"qwen": None})
        try:
            for got in _served(srv.client("qwen"), reply, "stop"):
                assert got == ("".join(reply[:-1]), [want], "tool_calls")
        finally:
            srv.stop()
    # the same reply after a prompt that opens nothing: the section never opened, both are calls
    for got in _served(servers.client("qwen"), reply, "stop"):
        assert got == ("I could  now.\n</think>\n\n", [want, want], "tool_calls")
    # and a section the reply opens itself holds its calls, streamed and not
    for got in _served(servers.client("qwen"), ["<think>", *reply], "stop"):
        assert got == ("<think>" + "".join(reply[:-1]), [want], "tool_calls")


def test_served_raw_sse_events_are_one_line_each(servers):
    """Each SSE event is one `data:` line of JSON even when an argument holds U+2028 / U+0085
    (line breaks to splitlines-based readers), and the call's arguments arrive intact."""
    args = {"s": "a\u2028b\x85c\u2029d\r\ne"}
    text = OPEN + json.dumps({"name": "f", "arguments": args}, ensure_ascii=False) + CLOSE
    seed_ = _script([([text[:7], text[7:]], "stop")])
    body = {"model": "m", "messages": MESSAGES, "tools": TOOLS, "seed": seed_, "stream": True, "max_tokens": 8}
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{servers.url}/qwen/v1/chat/completions", json=body)
    assert r.status_code == 200
    events = [line for line in r.text.splitlines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    calls = [tc for e in events[:-1] for ch in json.loads(e[6:])["choices"] for tc in ch["delta"].get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [(0, "f", args)]


def test_mistral_args_form_name_is_a_name():
    """Regression: a JSON-list reply cut short (max_tokens) inside an argument string holding
    "[ARGS]" fell back to the `name[ARGS]{...}` form, which took all the text before "[ARGS]" as
    the function's name: a call named '[{"name": "f", "arguments": {"k": "', arguments {}, sent
    to the client as a tool call. Text with blanks or JSON punctuation before [ARGS] is no name:
    such a reply is content, as any malformed call is."""
    for text in ('[TOOL_CALLS][{"name": "f", "arguments": {"k": "[ARGS]{}',
                 '[TOOL_CALLS] I think [ARGS]{"a": 1}'):
        for pieces in ([text], _chunks(text, [0.1, 0.4, 0.7])):
            events, parser = _feed("mistral", pieces)
            assert (events, parser.calls) == ([text], []), text
            assert parse_tool_calls(text, "mistral") == (text, [])
    # cut inside a later call: the complete one before it stays a call (as Qwen's do), the cut one
    # is content, and no call is named after the text before its "[ARGS]"
    cut = '{"name": "g", "arguments": {"q": "[ARGS]{"a": 1}'
    text = '[TOOL_CALLS][{"name": "f", "arguments": {}}, ' + cut
    for pieces in ([text], _chunks(text, [0.1, 0.4, 0.7])):
        events, parser = _feed("mistral", pieces)
        assert [(c.name, c.arguments) for c in parser.calls] == [("f", "{}")] and events == [*parser.calls, cut]
        assert parse_tool_calls(text, "mistral")[0] == cut
    # the form itself still reads, names stripped of the blanks around them
    [call] = parse_tool_calls('[TOOL_CALLS] get_weather [ARGS]{"city": "Zürich"}', "mistral")[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Zürich"})


# ---------------------------------------------------------------------------------------------
# a real model's tool call, with the request options around it

@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """The tool checkpoint (greedy: `<tool_call>`, the call's JSON, `</tool_call>`, EOS), served
    as it is, in this process."""
    with amlx.load_sync(tool_checkpoint(tmp_path_factory.mktemp("hunt-tools")), max_context=512) as model:
        srv = _servers(model, {"real": None}, scripted=False)
        try:
            yield srv
        finally:
            srv.stop()


@seed(20261206)
@settings(FUZZ, max_examples=25)
@given(stream=st.booleans(), n=st.integers(1, 2), max_tokens=st.integers(1, 6),
       logprobs=st.sampled_from([None, 0, 2]), stop=st.sampled_from([None, ["</tool_call>"], ["Paris"], ["\n"]]),
       temperature=st.sampled_from([0.0, 1.0]), include_usage=st.booleans(),
       tool_choice=st.sampled_from([None, "auto", "none"]))
def test_real_tool_call_with_any_options(tool_server, stream, n, max_tokens, logprobs, stop, temperature,
                                         include_usage, tool_choice):
    """Whatever the options, the reply is what its text parses to, streamed or not: content and
    calls as parse_tool_calls gives them for the text the model wrote."""
    kw: dict[str, Any] = dict(model="m", messages=MESSAGES, tools=TOOLS, n=n, max_tokens=max_tokens, stop=stop,
                              temperature=temperature, seed=5)
    if logprobs is not None:
        kw.update(logprobs=True, top_logprobs=logprobs)
    if tool_choice is not None:
        kw["tool_choice"] = tool_choice
    fmt = None if tool_choice == "none" else "qwen"
    client = tool_server.client("real")
    if not stream:
        r = client.chat.completions.create(**kw)
        for choice in r.choices:
            got_calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
            text = choice.message.content or ""
            assert all(json.loads(a) == {"city": "Paris", "unit": "celsius"} for _, a in got_calls)
            if got_calls:
                assert choice.finish_reason in ("tool_calls", "length")
            assert choice.finish_reason != "tool_calls" or got_calls
            assert fmt is not None or not got_calls
            if logprobs is not None:
                assert len(choice.logprobs.content) <= max_tokens
        return
    out = client.chat.completions.create(stream=True, stream_options={"include_usage": True} if include_usage else None,
                                         **kw)
    texts: dict[int, str] = {}
    calls: dict[int, list] = {}
    finishes: dict[int, list] = {}
    usage = None
    for chunk in out:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            calls.setdefault(ch.index, []).extend(ch.delta.tool_calls or [])
            if ch.finish_reason:
                finishes.setdefault(ch.index, []).append(ch.finish_reason)
    assert sorted(finishes) == list(range(n)) and all(len(f) == 1 for f in finishes.values())
    for i in range(n):
        assert [d.index for d in calls.get(i, [])] == list(range(len(calls.get(i, []))))
        for d in calls.get(i, []):
            assert d.id.startswith("call_") and d.function.name == "get_weather"
            assert json.loads(d.function.arguments) == {"city": "Paris", "unit": "celsius"}
        assert finishes[i][0] != "tool_calls" or calls.get(i)
        assert fmt is not None or not calls.get(i)
    assert (usage is not None) == include_usage
    if usage is not None:
        assert usage.completion_tokens <= n * max_tokens


def test_qwen_opening_tag_inside_an_open_call_starts_a_new_one():
    """Regression: a `<tool_call>` that opened no call (a thinking model naming the tag in its
    reasoning, or a call whose `</tool_call>` the model forgot) swallowed the reply's real call
    after it: the scan for the close tag ran on through the next `<tool_call>`, and the whole
    stretch, the real call within, came back as text. A `<tool_call>` outside any JSON string
    of an open call means what was opened is no JSON: it is text, and a call may start there."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "q": "<tool_call>"}}\n</tool_call>'
    for text, content in [
            ("<think>\nI should write <tool_call> with the city.\n</think>\n\n" + call,
             "<think>\nI should write <tool_call> with the city.\n</think>\n\n"),
            ('<tool_call>{"name": "now", "arguments": {}}\n' + call, '<tool_call>{"name": "now", "arguments": {}}\n'),
            ("<tool_call><tool_call>" + call + " ok", "<tool_call><tool_call> ok")]:
        for pieces in ([text], _chunks(text, [0.05, 0.3, 0.52, 0.9]), list(text)):
            events, parser = _feed("qwen", pieces)
            assert "".join(e for e in events if isinstance(e, str)) == content
            assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == \
                [("get_weather", {"city": "Paris", "q": "<tool_call>"})]
            _replays(text, events)
    # an opening tag inside an argument string is the string's: the call is whole
    [one] = parse_tool_calls(call, "qwen")[1]
    assert json.loads(one.arguments)["q"] == "<tool_call>"


# A chat template with the id rule of Mistral's (Mistral-7B-Instruct-v0.3, Mixtral, Nemo,
# Small 3.x): a call's id, and a tool message's tool_call_id, must be 9 characters long.
_MISTRAL_LIKE_TEMPLATE = """\
{%- for message in messages %}
{%- if message.role == 'user' %}{{ '[INST]' + message.content + '[/INST]' }}
{%- elif message.tool_calls %}{{ '[TOOL_CALLS][' }}
{%- for call in message.tool_calls %}
{%- if call.id is not defined or call.id | length != 9 %}
{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
{%- endif %}
{{- call.function | tojson }}{{ ', ' if not loop.last else ']</s>' }}
{%- endfor %}
{%- elif message.role == 'tool' %}
{%- if message.tool_call_id is not defined or message.tool_call_id | length != 9 %}
{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
{%- endif %}
{{- '[TOOL_RESULTS]' + message.content + '[/TOOL_RESULTS]' }}
{%- else %}{{ message.content + '</s>' }}
{%- endif %}
{%- endfor %}"""


def test_mistral_tool_call_ids_survive_the_next_turn(tmp_path):
    """Regression: Mistral's chat templates raise for a tool call id that is not 9 alphanumeric
    characters, and amlx gave Mistral calls `call_` + 24 hex digits: the reply's calls went
    back in the next request (as every client sends them) and that request failed with a 400
    invalid_messages. Mistral calls now have 9-character ids; the conversation goes on."""
    ckpt = serve_checkpoint(tmp_path / "mistral-like")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["chat_template"] = _MISTRAL_LIKE_TEMPLATE
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    with amlx.load_sync(ckpt, max_context=512) as model:
        srv = _servers(model, {"mistral": None})  # the model's own template: the "mistral" format
        try:
            client = srv.client("mistral")
            reply = ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                     '{"name": "now", "arguments": {}}]')
            for stream in (False, True):
                seed_ = _script([([reply[:20], reply[20:]], "stop")])
                kw = dict(model="m", messages=MESSAGES, tools=TOOLS, seed=seed_, max_tokens=8)
                if stream:
                    calls = [d for chunk in client.chat.completions.create(stream=True, **kw)
                             for ch in chunk.choices for d in ch.delta.tool_calls or []]
                else:
                    r = client.chat.completions.create(**kw)
                    assert r.choices[0].finish_reason == "tool_calls"
                    calls = r.choices[0].message.tool_calls
                assert [c.function.name for c in calls] == ["get_weather", "now"]
                assert all(re.fullmatch("[0-9A-Za-z]{9}", c.id) for c in calls) and len({c.id for c in calls}) == 2
                history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                  "arguments": c.function.arguments}}
                    for c in calls]}]
                history += [{"role": "tool", "tool_call_id": c.id, "content": "21"} for c in calls]
                seed_ = _script([(["It is 21."], "stop")])
                r = client.chat.completions.create(model="m", messages=history, tools=TOOLS, seed=seed_,
                                                   max_tokens=8)
                assert r.choices[0].message.content == "It is 21."
        finally:
            srv.stop()
    # the library's own parse gives such ids too (Completion.tool_calls goes back the same way)
    _, calls = parse_tool_calls('[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}', "mistral")
    assert [len(c.id) for c in calls] == [9, 9] and calls[0].id != calls[1].id
