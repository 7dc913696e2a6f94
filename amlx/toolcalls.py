"""Tool calls in generated text: which format a chat template teaches, and parsing it.

Chat models that were trained for function calling write their calls as text in a
format their chat template describes. Three families are understood:

* ``"qwen"`` (Qwen 2.5/3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one tag per call, anywhere in the reply.
* ``"llama3"`` (Llama 3.1/3.2/3.3): the whole reply is a JSON object
  ``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``), several
  separated by ``;``.
* ``"mistral"``: ``[TOOL_CALLS]`` followed by a JSON list ``[{"name": ..., "arguments": {...}}]``,
  or the newer ``[TOOL_CALLS]name[ARGS]{...}`` form.

`ToolCallParser` works on a stream of text pieces: it passes ordinary text through at
once, holds back only what may be the start of a call, and hands out each call as soon
as it is complete. `parse_tool_calls` does the same for a whole text. Text that looks
like a call but does not parse as one is given back unchanged as content.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Union

from amlx.types import ToolCall

__all__ = ["FORMATS", "ToolCallParser", "detect_format", "parse_tool_calls"]

FORMATS = ("qwen", "llama3", "mistral")

_QWEN_OPEN, _QWEN_CLOSE = "<tool_call>", "</tool_call>"
_MISTRAL_OPEN = "[TOOL_CALLS]"
_MISTRAL_ARGS = "[ARGS]"
_LLAMA_TAG = "<|python_tag|>"

Event = Union[str, ToolCall]  # a piece of content text, or one complete call


def detect_format(chat_template: str | Mapping[str, str] | None) -> str | None:
    """The tool-call format a chat template teaches (one of FORMATS), or None."""
    if isinstance(chat_template, Mapping):
        chat_template = "\n".join(str(v) for v in chat_template.values())
    if not chat_template:
        return None
    if _QWEN_OPEN in chat_template:
        return "qwen"
    if _MISTRAL_OPEN in chat_template:
        return "mistral"
    if _LLAMA_TAG in chat_template or ('"parameters"' in chat_template and "<|start_header_id|>" in chat_template):
        return "llama3"
    return None


_CALL_PREFIX = uuid.uuid4().hex[:12]  # per process; a counter makes each id unique
_CALL_COUNTER = itertools.count()


def new_call_id() -> str:
    return f"call_{_CALL_PREFIX}{next(_CALL_COUNTER):012x}"


_MISTRAL_ID_BASE = int(_CALL_PREFIX[:9], 16)


def _mistral_call_id() -> str:
    """9 alphanumeric characters (hex), unique in this process: Mistral's chat templates raise
    "Tool call IDs should be alphanumeric strings with length 9!" for any other id, so the
    `call_...` ids made every next turn of a Mistral tool conversation fail to render (a 400)."""
    return f"{(_MISTRAL_ID_BASE + next(_CALL_COUNTER)) % 16 ** 9:09x}"


def _call_from(obj: Any, args_key: str, new_id: Callable[[], str] = new_call_id) -> ToolCall | None:
    """A ToolCall from a decoded JSON object, or None when it is not shaped like one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        args = _loads(args)
    if not isinstance(args, dict) or not _utf8(obj["name"]):
        return None
    try:
        # allow_nan=False: a number too large for a float (1e400) reads as inf, which json.dumps
        # would write as `Infinity`, arguments a client's JSON.parse refuses (as NaN in _loads)
        arguments = json.dumps(args, ensure_ascii=False, allow_nan=False)
        if not _utf8(arguments):  # a lone surrogate from a \ud800 escape: keep it escaped
            arguments = json.dumps(args, allow_nan=False)
    except (RecursionError, ValueError):  # read at the edge of the recursion limit, deeper here; inf
        return None
    return ToolCall(new_id(), obj["name"], arguments)


def _utf8(text: str) -> bool:
    """Whether `text` can be sent as UTF-8 (JSON's \\ud800 escapes decode to lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    """The JSON value of `text`, or None: also for JSON that Python refuses to read (nesting
    deeper than its recursion limit, integers of over 4300 digits), which a model may write,
    and for Python's extensions NaN and Infinity, which JSON has not (a client's JSON.parse
    would refuse the arguments)."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):  # (JSONDecodeError is a ValueError)
        return None


def _parse_llama(text: str) -> list[ToolCall] | None:
    """`{"name": ..., "parameters": ...}` objects separated by ';' (the whole text), or None."""
    body = text.strip()
    body = body[len(_LLAMA_TAG):].strip() if body.startswith(_LLAMA_TAG) else body
    calls = []
    decoder = json.JSONDecoder(parse_constant=_not_json)
    pos = 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except (ValueError, RecursionError):  # as in _loads
            return None
        call = _call_from(obj, "parameters")
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return calls or None


def _parse_mistral(body: str) -> list[ToolCall] | None:
    """What follows [TOOL_CALLS]: a JSON list (or object) of calls, or `name[ARGS]{json}` parts."""
    body = body.strip()
    # The JSON form first: an argument string may hold "[ARGS]" (which used to send the text
    # down the other path and so back as content).
    data = _loads(body)
    calls = []
    for item in data if isinstance(data, list) else [data]:
        call = _call_from(item, "arguments", _mistral_call_id)
        if call is None:
            break
        calls.append(call)
    else:
        if calls:
            return calls
    return _parse_mistral_args(body) if _MISTRAL_ARGS in body else None


def _parse_mistral_args(body: str) -> list[ToolCall] | None:
    """`name[ARGS]{json}` parts separated by [TOOL_CALLS] (the whole text), or None. Each JSON
    value is read to its end rather than cut at the next marker: its strings may hold markers."""
    decoder = json.JSONDecoder(parse_constant=_not_json)
    calls, pos = [], 0
    while True:
        sep = body.find(_MISTRAL_ARGS, pos)
        if sep < 0:
            return None
        start = sep + len(_MISTRAL_ARGS)
        while start < len(body) and body[start] in " \t\r\n":
            start += 1
        try:
            args, end = decoder.raw_decode(body, start)
        except (ValueError, RecursionError):  # as in _loads
            return None
        name = body[pos:sep].strip()
        # The name is raw text, not a JSON string: text holding blanks or JSON punctuation is
        # not one (no function name has them). A JSON-list reply cut short inside an argument
        # string that holds "[ARGS]" came back as a call named '[{"name": "f", "arguments": ...'.
        if any(ch.isspace() or ch in '[]{}"' for ch in name):
            return None
        call = _call_from({"name": name, "arguments": args}, "arguments", _mistral_call_id)
        if call is None:
            return None
        calls.append(call)
        rest = body[end:].lstrip()
        if not rest:
            return calls
        if not rest.startswith(_MISTRAL_OPEN):
            return None
        pos = len(body) - len(rest) + len(_MISTRAL_OPEN)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallParser:
    """Incremental parser for one reply: `feed(piece)` and, at the end, `finish()`.

    Both return a list of events: strings (content to show) and `ToolCall`s. Joined,
    the strings and the calls account for all of the text: nothing is dropped except
    the markup of calls that parsed."""

    def __init__(self, fmt: str | None):
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {FORMATS} or None")
        self.format = fmt
        self._buf = ""  # held-back text: a possible marker start, or an open call
        self._inside = False  # an opening marker was seen and its call is not complete yet
        self._started = False  # any non-blank text seen (Llama calls must start the reply)
        # Qwen: how far the open call's text has been scanned for its `</tool_call>` (see _qwen_close)
        self._scan, self._in_string, self._escaped = len(_QWEN_OPEN), False, False
        self.calls: list[ToolCall] = []

    def feed(self, piece: str) -> list[Event]:
        if self.format is None:
            return [piece] if piece else []
        self._buf += piece
        if self.format == "qwen":
            return self._feed_qwen()
        if self.format == "mistral":
            return self._feed_until_end(_MISTRAL_OPEN)
        return self._feed_llama()

    def finish(self) -> list[Event]:
        """Everything still held back: calls that complete at the end, else plain text."""
        text, self._buf = self._buf, ""
        self._scan, self._in_string, self._escaped = len(_QWEN_OPEN), False, False
        if not text:
            return []
        calls = None
        if self.format == "mistral" and self._inside:
            calls = _parse_mistral(text[len(_MISTRAL_OPEN):])
        elif self.format == "llama3" and self._inside:
            calls = _parse_llama(text)
        self._inside = False
        if calls:
            self.calls.extend(calls)
            return list(calls)
        return [text]

    def _feed_qwen(self) -> list[Event]:
        out: list[Event] = []
        while True:
            if not self._inside:
                start = self._buf.find(_QWEN_OPEN)
                if start < 0:
                    keep = _partial_suffix(self._buf, _QWEN_OPEN)
                    text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                    if text:
                        out.append(text)
                    return out
                if start:
                    out.append(self._buf[:start])
                self._buf = self._buf[start:]
                self._inside = True
            end = self._qwen_close()
            if end < 0:
                return out
            if self._buf.startswith(_QWEN_OPEN, end):
                # Another opening tag outside any JSON string: what this one opened is no call
                # (JSON has no `<` outside strings), so it is text, and a call may start here.
                # A reasoning section that names the tag ("<think>... I'll write <tool_call>
                # ...</think>") held the reply's real call after it and gave it back as text.
                out.append(self._buf[:end])
                self._buf = self._buf[end:]
                self._scan, self._in_string, self._escaped = len(_QWEN_OPEN), False, False
                continue
            raw = self._buf[:end + len(_QWEN_CLOSE)]
            self._buf = self._buf[len(raw):]
            self._inside = False
            self._scan, self._in_string, self._escaped = len(_QWEN_OPEN), False, False
            call = _call_from(_loads(raw[len(_QWEN_OPEN):-len(_QWEN_CLOSE)].strip()), "arguments")
            if call is None:
                out.append(raw)
            else:
                self.calls.append(call)
                out.append(call)

    def _qwen_close(self) -> int:
        """Where the open call's `</tool_call>` (or a new `<tool_call>`) starts in the buffer, or
        -1 while it has none.

        Only a `</tool_call>` outside a JSON string counts: an argument string may hold one, and
        cutting there made the call's JSON unreadable, so the call came back as text. (For a
        call whose JSON is valid this is where the value ends, what raw_decode would find; text
        with an unclosed quote holds the rest of the reply, to come back as text at finish().)
        The scan goes on from where the last feed left it, so each piece is read once."""
        buf, i = self._buf, self._scan
        while i < len(buf):
            ch = buf[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch == "<":
                if buf.startswith(_QWEN_CLOSE, i) or buf.startswith(_QWEN_OPEN, i):
                    return i
                if _QWEN_CLOSE.startswith(buf[i:]) or _QWEN_OPEN.startswith(buf[i:]):
                    break  # the marker may be split across pieces: read it again with the next one
            i += 1
        self._scan = i
        return -1

    def _feed_until_end(self, marker: str) -> list[Event]:
        """Text before `marker` passes; from the marker on, everything waits for finish()."""
        if self._inside:
            return []
        start = self._buf.find(marker)
        if start >= 0:
            text, self._buf = self._buf[:start], self._buf[start:]
            self._inside = True
        else:
            keep = _partial_suffix(self._buf, marker)
            text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return [text] if text else []

    def _feed_llama(self) -> list[Event]:
        """A Llama reply is a call only if it starts (after blanks) with `{` or the python tag."""
        if self._inside or self._started:
            if self._inside:
                return []
            text, self._buf = self._buf, ""
            return [text] if text else []
        head = self._buf.lstrip()
        if not head:
            return []
        if head.startswith("{") or head.startswith(_LLAMA_TAG):
            self._inside = True
            return []
        if _LLAMA_TAG.startswith(head):
            return []  # still could become the tag
        self._started = True
        text, self._buf = self._buf, ""
        return [text]


def parse_tool_calls(text: str, fmt: str | None) -> tuple[str, list[ToolCall]]:
    """(content without the calls' markup, the calls) of a whole reply in format `fmt`."""
    parser = ToolCallParser(fmt)
    events = parser.feed(text) + parser.finish()
    return "".join(e for e in events if isinstance(e, str)), list(parser.calls)
