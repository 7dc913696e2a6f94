"""Settings from `AMLX_*` environment variables (integers, and one of a few words), read the one
way for every layer."""

from __future__ import annotations

import os

__all__ = ["env_choice", "env_int"]


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


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """One of `choices` from the environment (case and surrounding space ignored), `default`
    where unset; ValueError naming the variable for anything else."""
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value
