"""API keys: `Authorization: Bearer <key>` on every route except /health and the chat page's files.

Keys come from `--api-key` (repeatable), `--api-key-file` (one per line, `#` comments)
and the AMLX_API_KEY environment variable. Each presented key is compared with every
configured key in constant time (hmac.compare_digest), so timing tells nothing about
how much of a key was right. With no keys configured, every request is let in.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from fastapi import Request

from amlx.serve.errors import APIError

ENV_VAR = "AMLX_API_KEY"


def collect_keys(keys: Iterable[str] = (), key_file: str | os.PathLike | None = None,
                 environ: dict[str, str] | None = None) -> list[str]:
    """Every configured key: the given ones, the file's lines, then $AMLX_API_KEY."""
    found = [k.strip() for k in keys if k.strip()]
    if key_file is not None:
        path = Path(key_file)
        try:
            # (utf-8-sig: a byte order mark that a Windows editor wrote first is not part of the first
            # key; it was, and the server refused to start over a key "holding a character other
            # than printable ASCII" that nobody could see)
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the API key file: {exc.strerror or exc}") from exc
        found += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    env = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if env:
        found.append(env)
    return list(dict.fromkeys(found))


class KeyCheck:
    """A check run before a route reads its body (app.py): 401 unless the request carries one of the keys."""

    def __init__(self, keys: Iterable[str]):
        self._keys = [k.encode("utf-8") for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __call__(self, request: Request) -> None:
        if not self._keys:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        given = presented.strip().encode("utf-8") if scheme.lower() == "bearer" else b""
        ok = False
        for key in self._keys:  # no early exit: every key is compared
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
