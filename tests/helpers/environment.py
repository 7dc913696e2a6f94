"""Environment variables set for a block (where pytest's monkeypatch cannot reach: a
hypothesis state machine's rule, a helper called from one)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Sets each variable (None: unset) for the block, then puts back what was there."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(saved)


def _apply(values: Mapping[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def python_path(*first: object) -> str:
    """A PYTHONPATH for a child process: `first` ahead of this process's own PYTHONPATH,
    which is kept (on the GPU machines MLX's CUDA build is found only through it)."""
    inherited = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(p) for p in first] + ([inherited] if inherited else []))
