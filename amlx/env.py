"""Settings from `AMLX_*` environment variables (integers, and one of a few words), read the one
way for every layer."""

from __future__ import annotations

import os

__all__ = ["env_choice", "env_int"]


# The most any integer setting takes: each is a count or size that reaches MLX as an int32 (a
# block or chunk of tokens, a number of streams); past it, AMLX_KV_BLOCK failed the load with
# numpy's "array is too big" and AMLX_SHARDS made streams until the load was killed.
MOST = 2**31 - 1


def env_int(name: str, least: int = 1) -> int | None:
    """An integer in [`least`, MOST] from the environment, None where unset or empty (blank);
    ValueError naming the variable for anything else."""
    raw = _raw(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from None
    if not least <= value <= MOST:
        raise ValueError(f"{name} must be an integer in [{least}, {MOST}], not {value}")
    return value


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """One of `choices` from the environment (case and surrounding space ignored), `default`
    where unset or empty (blank); ValueError naming the variable for anything else."""
    raw = _raw(name)
    value = default if raw is None else raw.lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _raw(name: str) -> str | None:
    """The variable's value without surrounding space; None where unset or blank. (`NAME=` is
    how a shell or a compose file unsets a setting: env_choice refused it, and for
    AMLX_QMM_SPLIT, read at import, `import amlx` failed.)"""
    raw = os.environ.get(name, "").strip()
    return raw or None
