"""Integer settings from `AMLX_*` environment variables, read the one way for every layer."""

from __future__ import annotations

import os

__all__ = ["env_int"]


def env_int(name: str, least: int = 1) -> int | None:
    """An integer >= `least` from the environment, None where unset or empty; ValueError
    naming the variable for anything else."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from None
    if value < least:
        raise ValueError(f"{name} must be >= {least}, not {value}")
    return value
