"""`amlx serve`: an OpenAI-compatible HTTP server (and a chat page) over amlx's public API.

    from amlx.serve import create_app, Settings
    app = create_app(model, Settings(model_name="qwen3"))   # an ASGI app; run it with uvicorn

Modules: app (routes), schemas (request bodies), prompts and options (request -> prompt ids
and generation options), generation (a request's choices), responses (OpenAI bodies),
streaming (SSE and disconnects), errors, auth, metrics, cli.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `amlx --help` (which imports amlx.serve.cli) does not import FastAPI.
    if name in __all__:
        from amlx.serve import app

        return getattr(app, name)
    raise AttributeError(name)
