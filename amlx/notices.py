"""One-line notices to the user (a slow first compile, a cold kernel cache) and progress bars,
on standard error where there is one.

A process may have none: `pythonw`, a service started with its stderr closed (`2>&-`; Python
then sets `sys.stderr` to None). Writing there raised AttributeError, and tqdm, failing in its
constructor on it, deadlocked later in its finalizer: loading a model hung."""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["notice", "stderr_stream"]


def stderr_stream() -> TextIO | None:
    """`sys.stderr`, or None where the process has none (or it is closed)."""
    stream = sys.stderr
    if stream is None or getattr(stream, "closed", False):
        return None
    return stream


def notice(line: str) -> None:
    """Writes `line` to standard error, if the process has one."""
    stream = stderr_stream()
    if stream is not None:
        print(line, file=stream, flush=True)
