"""Tool calls in generated text: which format a chat template teaches, and parsing it.

Chat models that were trained for function calling write their calls as text in a
format their chat template describes. Three families are understood:

* ``"qwen"`` (Qwen 2.5/3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one tag per call, anywhere in the reply.
* ``"llama3"`` (Llama 3.1/3.2/3.3): the whole reply is a JSON object
  ``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``), several
  separated by ``;``.
* ``"mistral"``: ``[TOOL_CALLS]`` followed by a JSON list ``[{"name": ..., "arguments": {...}}]``
  (tokenizers v3/v7), or per call ``[TOOL_CALLS]name[ARGS]{...}`` (v11+, v13),
  ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`` (v11 templates that carry ids) or
  ``[TOOL_CALLS]name{...}`` (the same with the control tokens dropped). One chat template
  writes one of these, but a reply is read in any of them: they cannot be mistaken for
  one another, and a model may drift from its template.

`ToolCallParser` works on a stream of text pieces: it passes ordinary text through at
once, holds back only what may be the start of a call, and hands out each call as soon
as it is complete. `parse_tool_calls` does the same for a whole text. Text that looks
like a call but does not parse as one is given back unchanged as content. A reply that ends
inside a call (max_tokens cut it) keeps the calls it completed before it, in every format: the
cut call's text is content.

Reasoning: amlx has no reasoning parser, so a thinking model's ``<think>...</think>``
(Mistral's ``[THINK]...[/THINK]``) stays in the content. What it holds is the model thinking
aloud, not a call: a call written inside it, or after a ``<think>`` the reply never closes,
is content too.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from amlx.types import ToolCall

__all__ = ["FORMATS", "MISTRAL_ARGS", "MISTRAL_OPEN", "QWEN_CLOSE", "QWEN_OPEN", "THINK", "BlankAroundCalls",
           "ToolCallParser", "detect_format", "is_raw_word", "opens_reasoning", "parse_tool_calls", "prompt_opens_reasoning"]

FORMATS = ("qwen", "llama3", "mistral")

QWEN_OPEN, QWEN_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
MISTRAL_ARGS, _MISTRAL_CALL_ID = "[ARGS]", "[CALL_ID]"
_LLAMA_TAG = "<|python_tag|>"

Event = Union[str, ToolCall]  # a piece of content text, or one complete call

# A reasoning section's opening and closing markers, per format (Llama 3 has none)
THINK = {"qwen": ("<think>", "</think>"), "mistral": ("[THINK]", "[/THINK]")}


def detect_format(chat_template: str | Mapping[str, str] | None) -> str | None:
    """The tool-call format a chat template teaches (one of FORMATS), or None."""
    if isinstance(chat_template, Mapping):
        chat_template = "\n".join(str(v) for v in chat_template.values())
    if not chat_template:
        return None
    if QWEN_OPEN in chat_template:
        return "qwen"
    if MISTRAL_OPEN in chat_template:
        return "mistral"
    if _LLAMA_TAG in chat_template or ('"parameters"' in chat_template and "<|start_header_id|>" in chat_template):
        return "llama3"
    return None


# Where a chat turn starts or ends, in the templates of the formats above (ChatML, Llama 3,
# Gemma, Mistral): reasoning opened before the last of these belongs to an earlier turn.
_TURN_DELIMITERS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|eot_id|>", "<start_of_turn>",
                    "<end_of_turn>", "[INST]", "[/INST]", "[/SYSTEM_PROMPT]", "[/TOOL_RESULTS]", "</s>")

# Markup that may stand inside a reply's turn, each a special token in some tokenizers (Mistral's
# control tokens): not where the turn starts
_REPLY_MARKUP = ("<tool_call>", "</tool_call>", MISTRAL_OPEN, MISTRAL_ARGS, _MISTRAL_CALL_ID, _LLAMA_TAG)


def opens_reasoning(prompt: str, fmt: str | None) -> bool:
    """Whether a rendered chat prompt leaves a reasoning section open for the reply: its last
    turn (the reply's, after the last turn delimiter such as `<|im_start|>` or `[/INST]`) holds
    the format's opening marker with no closing one after it. Qwen3 "Thinking" templates end the
    generation prompt in `<think>\n`; others go on after it with fixed text, and a continued
    assistant message (continue_final_message) may stop inside its reasoning, any length after
    the `<think>`. A `<think>` in a system prompt or tool description opens nothing."""
    markers = THINK.get(fmt or "")
    if not markers:
        return False
    turn = max((at + len(d) for d in _TURN_DELIMITERS if (at := prompt.rfind(d)) >= 0), default=0)
    opened = prompt.rfind(markers[0], turn)
    return opened >= 0 and prompt.find(markers[1], opened) < 0


# Prompt tokens read back at most for `prompt_opens_reasoning`: decoding them costs about a
# microsecond each (4096 took 4-6 ms), paid per request only where the reply's turn is that long
# (a continued message, a prompt without turns); a section opened further back is taken as none.
_REASONING_LOOKBACK = 4096


def prompt_opens_reasoning(tokenizer: Any, ids: Sequence[int], fmt: str | None) -> bool:
    """`opens_reasoning` for a prompt given as token ids (the server's choices and
    `Completion.tool_calls` alike): the text of its last turn, the ids after its last special
    token (a turn delimiter: `<|im_start|>`, `[/INST]`, ...; the format's markers aside), at
    most the last _REASONING_LOOKBACK. (The last 8 ids alone missed a `<think>` with more text
    after it.)"""
    markers = THINK.get(fmt or "")
    if not markers:
        return False
    specials = getattr(tokenizer, "special_token_ids", frozenset())
    own = {tokenizer.token_to_id(m) for m in (*markers, *_REPLY_MARKUP)}
    end = len(ids)
    start = max(0, end - _REASONING_LOOKBACK)
    for i in range(end - 1, start - 1, -1):
        if ids[i] in specials and ids[i] not in own:
            start = i + 1
            break
    return opens_reasoning(tokenizer.decode(list(ids[start:end])), fmt)


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
    if args is None:
        # JSON null: no arguments, as "" below and as a missing key (a function without
        # parameters); OpenAI clients JSON.parse the arguments and expect an object, so {}
        # rather than vLLM's "null" (it json.dumps whatever the model wrote)
        args = {}
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        # "" is how some models (and clients, which templates then render back) write "no
        # arguments"; OpenAI clients JSON.parse the arguments, so it goes out as {}
        args = _loads(args) if args.strip() else {}
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


# What the parse of a reply's calls gives: (the calls, the text of a call the reply ended inside,
# which is content; "" when it ended with a whole call)
Parsed = tuple[list[ToolCall], str]


def _unclosed(text: str) -> bool:
    """Whether `text` is the start of a JSON object that the text ends inside: it opens with `{`
    (after blanks) and its brackets, outside strings, never all close."""
    text = text.lstrip()
    if not text.startswith("{"):
        return False
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth <= 0:
                return False
    return True


def _cut(calls: list[ToolCall], rest: str) -> Parsed | None:
    """Where a reply's calls stop parsing at `rest`: the complete calls before it, and `rest` as
    content, when `rest` is a call the reply ended inside (max_tokens cut it), as a cut Qwen call
    leaves the calls before it; None (no calls: all of the text is content) otherwise."""
    return (calls, rest) if calls and _unclosed(rest) else None


def _parse_llama(text: str) -> Parsed | None:
    """`{"name": ..., "parameters": ...}` objects separated by ';' (the whole text), or None."""
    body = text.strip()
    body = body[len(_LLAMA_TAG):].strip() if body.startswith(_LLAMA_TAG) else body
    calls: list[ToolCall] = []
    decoder = json.JSONDecoder(parse_constant=_not_json)
    pos = 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except (ValueError, RecursionError):  # as in _loads
            return _cut(calls, body[pos:])
        call = _call_from(obj, "parameters")
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return (calls, "") if calls else None


def _parse_mistral(body: str) -> Parsed | None:
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
            return calls, ""
    if data is None and body.startswith("["):
        return _parse_mistral_list_cut(body)  # (no name starts with "[": not the named form)
    return _parse_mistral_named(body)


def _parse_mistral_list_cut(body: str) -> Parsed | None:
    """A JSON list of calls that the reply ended inside (it is no JSON): the calls it completed,
    and the one it ended inside as content; None when it holds something else."""
    decoder = json.JSONDecoder(parse_constant=_not_json)
    calls: list[ToolCall] = []
    pos = 1
    while True:
        while pos < len(body) and body[pos] in " \t\r\n":
            pos += 1
        if pos == len(body):  # ended after a call, or after its comma
            return (calls, "") if calls else None
        try:
            item, end = decoder.raw_decode(body, pos)
        except (ValueError, RecursionError):  # as in _loads
            return _cut(calls, body[pos:])
        call = _call_from(item, "arguments", _mistral_call_id)
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n":
            pos += 1
        if pos < len(body) and body[pos] == ",":
            pos += 1
        elif pos < len(body):  # the list's end with more after it, or no list
            return None


def is_raw_word(text: str) -> bool:
    """Whether `text` can be a name or id written as raw text (not a JSON string): no blanks or
    JSON punctuation, which no function name has. A JSON-list reply cut short inside an argument
    string holding "[ARGS]" came back as a call named '[{"name": "f", "arguments": ...'."""
    return bool(text) and not any(ch.isspace() or ch in '[]{}"' for ch in text)


def _parse_mistral_named(body: str) -> Parsed | None:
    """`name[ARGS]{json}`, `name[CALL_ID]id[ARGS]{json}` or `name{json}` parts separated by
    [TOOL_CALLS] (the whole text), or None. Each JSON value is read to its end rather than cut
    at the next marker: its strings may hold markers. A last part the reply ended inside
    (`_named_cut`) leaves the calls before it, with its own text (from its [TOOL_CALLS]) as content."""
    decoder = json.JSONDecoder(parse_constant=_not_json)
    calls: list[ToolCall] = []
    pos = 0

    def failed() -> Parsed | None:
        return (calls, MISTRAL_OPEN + body[pos:]) if calls and _named_cut(body[pos:]) else None

    while True:
        head = min((i for i in (body.find("[", pos), body.find("{", pos)) if i >= 0), default=-1)
        if head < 0 or not is_raw_word(body[pos:head].strip()):
            return failed()
        name = body[pos:head].strip()
        if body.startswith(_MISTRAL_CALL_ID, head):
            # The model's own id is read and dropped: ids must be unique among all the calls a
            # client sees, which a model copying an earlier turn's id would break (see
            # _mistral_call_id for the form given instead).
            sep = body.find(MISTRAL_ARGS, head)
            if sep < 0 or not is_raw_word(body[head + len(_MISTRAL_CALL_ID):sep].strip()):
                return failed()
            head = sep
        if body.startswith(MISTRAL_ARGS, head):
            head += len(MISTRAL_ARGS)
        elif body[head] != "{":
            return failed()
        while head < len(body) and body[head] in " \t\r\n":
            head += 1
        try:
            args, end = decoder.raw_decode(body, head)
        except (ValueError, RecursionError):  # as in _loads
            return failed()
        call = _call_from({"name": name, "arguments": args}, "arguments", _mistral_call_id)
        if call is None:
            return None
        calls.append(call)
        rest = body[end:].lstrip()
        if not rest:
            return calls, ""
        if not rest.startswith(MISTRAL_OPEN):
            # (the reply ended inside the next [TOOL_CALLS], written as text: its start is content)
            return (calls, rest) if MISTRAL_OPEN.startswith(rest) else None
        pos = len(body) - len(rest) + len(MISTRAL_OPEN)


def _named_cut(part: str) -> bool:
    """Whether `part`, what follows a [TOOL_CALLS] in the named form, is a call the reply ended
    inside: its name (or the start of it), maybe its [CALL_ID] id and [ARGS] (or the start of
    either), and the start of its JSON arguments without their end."""
    part = part.lstrip()
    head = min((i for i in (part.find("["), part.find("{")) if i >= 0), default=len(part))
    name, rest = part[:head].strip(), part[head:]
    if name and not is_raw_word(name):
        return False
    if rest.startswith(_MISTRAL_CALL_ID):
        rest = rest[len(_MISTRAL_CALL_ID):]
        sep = rest.find(MISTRAL_ARGS)
        given = rest[:len(rest) - _partial_suffix(rest, MISTRAL_ARGS)] if sep < 0 else rest[:sep]
        if given.strip() and not is_raw_word(given.strip()):
            return False
        if sep < 0:
            return True
        rest = rest[sep:]
    if rest.startswith(MISTRAL_ARGS):
        rest = rest[len(MISTRAL_ARGS):]
    elif rest and (MISTRAL_ARGS.startswith(rest) or _MISTRAL_CALL_ID.startswith(rest)):
        return True  # inside the marker
    return not rest.strip() or _unclosed(rest)


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
    the markup of calls that parsed.

    `thinking`: the reply starts inside a reasoning section, as when the chat template's
    generation prompt ends in an open ``<think>`` (see `opens_reasoning`)."""

    def __init__(self, fmt: str | None, *, thinking: bool = False):
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {FORMATS} or None")
        self.format = fmt
        self._buf = ""  # held-back text: a possible marker start, or an open call
        self._inside = False  # an opening marker was seen and its call is not complete yet
        self._started = False  # any non-blank text seen (Llama calls must start the reply)
        self._think = THINK.get(fmt or "")
        self._thinking = bool(thinking and self._think)  # inside a reasoning section
        # Qwen: how far the open call's text has been scanned for its `</tool_call>` (see _qwen_close)
        self._scan, self._in_string, self._escaped = len(QWEN_OPEN), False, False
        self.calls: list[ToolCall] = []

    def feed(self, piece: str) -> list[Event]:
        if self.format is None:
            return [piece] if piece else []
        self._buf += piece
        if self.format == "qwen":
            return self._feed_qwen()
        if self.format == "mistral":
            return self._feed_mistral()
        return self._feed_llama()

    def finish(self) -> list[Event]:
        """Everything still held back: calls that complete at the end, else plain text (a
        Llama 3 or Mistral reply that ends inside a call after others: those calls, and the
        cut one's text).

        A Qwen call left open at the end (no `</tool_call>`: the model stopped, or a stop
        string or max_tokens cut it, right after the JSON) is a call when its JSON is a whole
        call, as vLLM's Hermes parser takes it; the finish reason stays what it was."""
        text, self._buf = self._buf, ""
        self._scan, self._in_string, self._escaped = len(QWEN_OPEN), False, False
        if not text:
            return []
        parsed: Parsed | None = None
        if self.format == "qwen" and self._inside:
            call = _call_from(_loads(text[len(QWEN_OPEN):].strip()), "arguments")
            parsed = ([call], "") if call else None
        elif self.format == "mistral" and self._inside:
            parsed = _parse_mistral(text[len(MISTRAL_OPEN):])
        elif self.format == "llama3" and self._inside:
            parsed = _parse_llama(text)
        self._inside = False
        if parsed:
            calls, rest = parsed
            self.calls.extend(calls)
            # (a cut call's text ends the reply: with the blanks after it, which the parse stripped)
            return [*calls, rest + text[len(text.rstrip()):]] if rest else list(calls)
        return [text]

    def _pass_text(self, marker: str) -> tuple[str, bool]:
        """(the buffer's leading text that is content, whether the buffer now starts with
        `marker` opening a call). Text of a reasoning section is content, the marker in it too;
        what may be the start of a marker waits for the next piece."""
        text = ""
        while True:
            buf = self._buf
            if self._thinking:
                end = buf.find(self._think[1])
                if end < 0:
                    keep = len(buf) - _partial_suffix(buf, self._think[1])
                    self._buf = buf[keep:]
                    return text + buf[:keep], False
                end += len(self._think[1])
                text, self._buf, self._thinking = text + buf[:end], buf[end:], False
                continue
            start = buf.find(marker)
            think = buf.find(self._think[0]) if self._think else -1
            if think >= 0 and (start < 0 or think < start):
                end = think + len(self._think[0])
                text, self._buf, self._thinking = text + buf[:end], buf[end:], True
                continue
            if start >= 0:
                self._buf = buf[start:]
                return text + buf[:start], True
            keep = max(_partial_suffix(buf, marker), _partial_suffix(buf, self._think[0]) if self._think else 0)
            self._buf = buf[len(buf) - keep:]
            return text + buf[:len(buf) - keep], False

    def _feed_qwen(self) -> list[Event]:
        out: list[Event] = []
        while True:
            if not self._inside:
                text, opened = self._pass_text(QWEN_OPEN)
                if text:
                    out.append(text)
                if not opened:
                    return out
                self._inside = True
            end = self._qwen_close()
            if end < 0:
                return out
            if not self._buf.startswith(QWEN_CLOSE, end):
                # Another opening tag, or a reasoning section's, outside any JSON string: what
                # this one opened is no call (JSON has no `<` outside strings), so it is text,
                # and a call or a reasoning section may start here. A reasoning section that
                # names the tag ("<think>... I'll write <tool_call> ...</think>") held the
                # reply's real call after it and gave it back as text.
                out.append(self._buf[:end])
                self._buf = self._buf[end:]
                self._inside = False
                self._scan, self._in_string, self._escaped = len(QWEN_OPEN), False, False
                continue
            raw = self._buf[:end + len(QWEN_CLOSE)]
            self._buf = self._buf[len(raw):]
            self._inside = False
            self._scan, self._in_string, self._escaped = len(QWEN_OPEN), False, False
            call = _call_from(_loads(raw[len(QWEN_OPEN):-len(QWEN_CLOSE)].strip()), "arguments")
            if call is None:
                out.append(raw)
            else:
                self.calls.append(call)
                out.append(call)

    def _qwen_close(self) -> int:
        """Where the open call's `</tool_call>` (or a new `<tool_call>` or `<think>`) starts in
        the buffer, or -1 while it has none.

        Only a `</tool_call>` outside a JSON string counts: an argument string may hold one, and
        cutting there made the call's JSON unreadable, so the call came back as text. (For a
        call whose JSON is valid this is where the value ends, what raw_decode would find; text
        with an unclosed quote holds the rest of the reply, to come back as text at finish().)
        The scan goes on from where the last feed left it, so each piece is read once."""
        buf, i = self._buf, self._scan
        markers = (QWEN_CLOSE, QWEN_OPEN, self._think[0])
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
                if any(buf.startswith(m, i) for m in markers):
                    return i
                if any(m.startswith(buf[i:]) for m in markers):
                    break  # the marker may be split across pieces: read it again with the next one
            i += 1
        self._scan = i
        return -1

    def _feed_mistral(self) -> list[Event]:
        """Text before [TOOL_CALLS] passes; from the marker on, everything waits for finish()."""
        if self._inside:
            return []
        text, self._inside = self._pass_text(MISTRAL_OPEN)
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


class BlankAroundCalls:
    """Drops the content of a reply that is only whitespace and lies between two tool calls, or
    between one and the reply's start or end: the "\n" a model writes between its calls (and
    around them) is markup, not a message, and vLLM sends none of it. The server passes each
    token's `ToolCallParser` events through it (`end=True` with the last token's).

    Blank text is held until what follows shows what it is: text the model wrote takes it along
    as it is (blanks before or after text are never dropped), a call drops it. A reply without
    calls keeps all of its text, blanks included."""

    def __init__(self) -> None:
        self._held = ""  # blank content since the reply's start or the last call
        self._blank = True  # the content since the reply's start or the last call is blank so far
        self._calls = False  # a call was seen

    def __call__(self, events: list[Event], end: bool = False) -> list[Event]:
        out: list[Event] = []
        for event in events:
            if not isinstance(event, str):
                self._held, self._blank, self._calls = "", True, True
                out.append(event)
            elif self._blank and not event.strip():
                self._held += event
            elif event:
                out.append(self._held + event if self._blank else event)
                self._held, self._blank = "", False
        if end:
            if self._held and not self._calls:
                out.append(self._held)
            self._held = ""
        return out


def parse_tool_calls(text: str, fmt: str | None, *, thinking: bool = False) -> tuple[str, list[ToolCall]]:
    """(content without the calls' markup, the calls) of a whole reply in format `fmt`
    (`thinking`: see ToolCallParser)."""
    parser = ToolCallParser(fmt, thinking=thinking)
    events = parser.feed(text) + parser.finish()
    return "".join(e for e in events if isinstance(e, str)), list(parser.calls)
