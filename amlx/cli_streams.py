"""The command line's standard streams and the text on them: a prompt read from stdin, arguments
that must be text, closed standard files, a stdout whose reader left or whose encoding is narrow.
(`amlx.cli` uses these; kept apart so that it stays the parser and the commands.)"""

from __future__ import annotations

import argparse
import os
import sys


def read_prompt(arg: str) -> str:
    """PROMPT as given, or for "-" stdin's text (ValueError when it is not text in stdin's encoding)."""
    if arg != "-":
        return arg
    stdin = sys.stdin
    if stdin.isatty():  # `amlx generate -` typed at a terminal: without a word it looked like a hang
        print("amlx: reading the prompt from the terminal; end it with Ctrl-D", file=sys.stderr, flush=True)
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # a text-only stdin (an embedding application's)
        text = stdin.read()
    else:
        data = raw.read()
        encoding = stdin.encoding or "utf-8"
        try:
            text = data.decode(encoding)  # strictly: Python's own stdin may let bad bytes through as surrogates
        except UnicodeDecodeError as exc:
            raise ValueError(f"the prompt on stdin is not {encoding} text ({exc.reason}: byte "
                             f"{data[exc.start]:#04x} at offset {exc.start})") from None
    # the line end `echo` and editors add (a Windows editor's too: it left a "\r" at the prompt's end),
    # and the byte order mark some Windows tools write first (it reached the model as U+FEFF); the
    # lines of a Windows file end in "\n" as Python's text stdin reads them (its inner lines reached
    # the model ending in "\r", as `amlx chat`'s did before it dropped them)
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    return text.removesuffix("\n") if text.endswith("\n") else text


def reopen_closed_standard_files() -> None:
    """A closed stdin/stdout/stderr (`amlx ... <&-`) puts /dev/null in its place: otherwise the next
    file opened takes its descriptor, and the model's weights became 'stdin' (MLX then refused to
    read them) or 'stderr' (`amlx generate Hi 2>&-` then hung: cause not pinned down))."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:  # Python sets a closed one to None at startup
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", encoding="utf-8", closefd=False))


def replace_unencodable_output() -> None:
    """The model's text on a stdout whose encoding cannot hold it (PYTHONIOENCODING=ascii, a
    Windows code page for `> out.txt`) gets '?' for such characters: strict encoding ended the
    reply at the first one, with "amlx: error: 'ascii' codec can't encode character"."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and getattr(sys.stdout, "errors", None) == "strict":
        reconfigure(errors="replace")


def discard_stdout() -> None:
    """Points stdout at /dev/null, so that flushing what is left in its buffer at exit raises no
    second BrokenPipeError ("Exception ignored ...") on stderr."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # no real stdout (an embedding or a test's capture)
        pass


def check_text_arguments(args: argparse.Namespace) -> None:
    """PROMPT, --system and --stop must be text: bytes the locale could not decode reach Python as
    lone surrogates, which the tokenizer reported at a position in the rendered chat template."""
    given = [("PROMPT", getattr(args, "prompt", None)), ("--system", getattr(args, "system", None)),
             *(("--stop", stop) for stop in args.stop)]
    for name, value in given:
        if value is None:
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{name} is not UTF-8 text ({_undecodable(value[exc.start])} at character "
                             f"{exc.start})") from None


def _undecodable(char: str) -> str:
    """The byte that a surrogate-escaped character stands for, or the character itself."""
    return f"byte {ord(char) - 0xDC00:#04x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"character U+{ord(char):04X}"
