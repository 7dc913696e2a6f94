"""`amlx serve`'s app over a real model whose requests fail on demand, run as a subprocess:

    python -m tests.helpers.failing_server CKPT PORT

A request with seed 666 fails after two tokens with an MLX out-of-memory error, one with
seed 667 with a plain bug (RuntimeError); every other request is the model's own. The
failure is injected around the public API (`model.generate`), so the server's handling of
a request that dies inside the engine is tested without touching the engine.
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn

import amlx
from amlx.serve import Settings, create_app

FAILURES = {666: lambda: amlx.MLXError("malloc", "[malloc] out of memory allocating 4096 bytes"),
            667: lambda: RuntimeError("a bug in one request")}


class _FailingStream:
    def __init__(self, stream, error):
        self._stream, self._error, self._seen = stream, error, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._seen == 2:
            self._stream.close()
            raise self._error()
        self._seen += 1
        return await self._stream.__anext__()

    def close(self):
        self._stream.close()


class FailingModel:
    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, prompt, **options):
        stream = self._model.generate(prompt, **options)
        error = FAILURES.get(options.get("seed"))
        return stream if error is None else _FailingStream(stream, error)


async def main(path: str, port: int) -> None:
    async with await amlx.load(path, max_context=512) as model:
        app = create_app(FailingModel(model), Settings(model_name="tiny"))
        await uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).serve()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
