"""`amlx chat`: a conversation in the terminal.

Lines starting with "/" are commands (/help lists them); every other line is
the user's next message. Ctrl-D or /exit leaves. Ctrl-C while a reply streams
stops that reply: its request is cancelled, and the part already shown stays
in the conversation as the assistant's turn, so the model's context is what the
user saw (/reset forgets it). A reply stopped before its first token leaves no
trace: the unanswered message is dropped too. Ctrl-C at the prompt discards the
line being typed. The replies go to stdout; the banner, notices and `-v`
statistics to stderr.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import amlx
from amlx.reply import report, stream_reply

COMMANDS = {
    "/help": "show this help",
    "/reset": "start the conversation afresh (the system prompt stays)",
    "/exit": "leave (so does Ctrl-D)",
}

_HELP = "\n".join([*(f"  {name:<8}{what}" for name, what in COMMANDS.items()),
                   "  Ctrl-C stops a reply (the part shown stays in the conversation)."])


class Conversation:
    """The messages so far, starting with the system prompt when there is one."""

    def __init__(self, system: str | None = None):
        self._system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict[str, str]] = list(self._system)

    def reset(self) -> None:
        self.messages = list(self._system)


def _read_line(prompt: str, err: TextIO) -> str | None:
    """The next line typed, None at the end of input. A Windows line end's "\\r" (input() keeps
    it, from a file or pipe of CRLF lines) and a byte order mark (U+FEFF, which some Windows
    tools write first) are no part of the line: they were sent to the model."""
    while True:
        try:
            return input(prompt).removesuffix("\r").removeprefix("\ufeff")
        except EOFError:
            return None
        except KeyboardInterrupt:
            print("\n(the line was discarded; /exit or Ctrl-D leaves)", file=err, flush=True)


def _is_text(line: str) -> bool:
    """False for a line holding undecodable bytes (input() hands them over as lone surrogates)."""
    try:
        line.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _command(text: str, conversation: Conversation, err: TextIO) -> bool:
    """Carries out a /command; False when the chat should end."""
    if text == "/exit":
        return False
    if text == "/help":
        print(_HELP, file=err, flush=True)
    elif text == "/reset":
        conversation.reset()
        print("(the conversation starts afresh)", file=err, flush=True)
    else:
        print(f"(unknown command {text}; /help lists the commands)", file=err, flush=True)
    return True


def _turn(model: amlx.Model, conversation: Conversation, line: str, options: dict[str, Any], verbose: bool,
          err: TextIO) -> None:
    """One exchange: the user's line, the streamed reply, the history updated."""
    conversation.messages.append({"role": "user", "content": line})
    try:
        reply = stream_reply(model, conversation.messages, options)
    except amlx.ContextLengthError as exc:
        conversation.messages.pop()
        print(f"({exc}; /reset starts afresh)", file=err, flush=True)
        return
    if reply.text:
        conversation.messages.append({"role": "assistant", "content": reply.text})
    else:
        conversation.messages.pop()
    if reply.interrupted:
        print("(stopped; the reply so far stays in the conversation)" if reply.text else "(stopped)",
              file=err, flush=True)
    if verbose:
        report(reply, err)


def run_chat(model: amlx.Model, options: dict[str, Any], *, system: str | None = None, verbose: bool = False,
             err: TextIO | None = None) -> int:
    """The chat loop on stdin/stdout; returns the exit status."""
    err = sys.stderr if err is None else err
    if model.tokenizer.chat_template is None:
        raise ValueError(f"{model.info.path} has no chat template, so it cannot chat; use `amlx generate`")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    conversation = Conversation(system)
    print(f"amlx chat with {model.info.path}: /help lists the commands, Ctrl-D or /exit leaves", file=err,
          flush=True)
    prompt = "> " if interactive else ""
    while True:
        line = _read_line(prompt, err)
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and " " not in text:
            if not _command(text, conversation, err):
                break
            continue
        if not _is_text(line):  # bytes the locale could not decode: the tokenizer would end the chat over them
            print("(the line is not UTF-8 text and was not sent)", file=err, flush=True)
            continue
        _turn(model, conversation, line, options, verbose, err)
    return 0
