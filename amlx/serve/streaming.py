"""Answering with a Generation: Server-Sent Events, or one JSON body, and noticing a
client that goes away in both cases.

Starlette's StreamingResponse notices a disconnect only at the next write under ASGI
spec >= 2.4 (and a request being prefilled writes nothing), so `EventStreamResponse`
always listens for `http.disconnect` beside the body and cancels the body the moment it
arrives; the body's `finally` then cancels the generations. A non-streaming request
is watched the same way by `collect`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Awaitable, Callable

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from amlx.serve.errors import APIError
from amlx.serve.generation import Generation, Piece

_KEEPALIVE_EVENT = b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic
_DONE_EVENT = b"data: [DONE]\n\n"


# SSE ends lines only at CR and LF, but clients that read it by lines with Python's splitlines
# rules (httpx's iter_lines / aiter_lines among them) also end them at U+0085, U+2028 and
# U+2029, and a token holding one cut its event in two. JSON may escape them (it escapes the
# other characters splitlines breaks at, the controls below U+0020, anyway).
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _event(body: dict[str, Any]) -> bytes:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        text = text.translate(_LINE_BREAKS)
    return b"data: " + text.encode("utf-8") + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """SSE whose body is cancelled as soon as the client disconnects; `on_close` runs in any
    case (also when the body never started), so the request's generations always end."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def body() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the connection broke while writing
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(body)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self._on_close()


async def sse_body(gen: Generation, shape: Any, include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE stream of one request: chunks, the usage chunk if asked, `[DONE]`.
    A failure mid-stream becomes an `error` event (the status line is long gone)."""
    def framed(chunk: dict[str, Any]) -> bytes:
        if include_usage:  # OpenAI: "All other chunks will also include a usage field, but with a null value"
            chunk["usage"] = None
        return _event(chunk)

    try:
        for chunk in shape.first_chunks(gen):
            yield framed(chunk)
        async for piece in gen.events():
            if not isinstance(piece, Piece):  # KEEPALIVE
                yield _KEEPALIVE_EVENT
                continue
            if piece.content or piece.calls or piece.logprobs or piece.finish_reason:  # a held-back token adds nothing
                yield framed(shape.chunk(piece, gen.choices[piece.index]))
        if include_usage:
            yield _event(shape.usage_chunk(gen))
    except APIError as exc:
        gen.stream_failed(exc.status)
        yield _event(exc.body())
    finally:
        gen.close()
    yield _DONE_EVENT


async def _wait_disconnect(receive: Callable[[], Any]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
    """Runs `work()` while listening for the client's disconnect: (True, its result), or
    (False, None) when the client went away first (the work is then cancelled). For engine
    work before any generation starts (echo's prompt logprobs), which nothing else watches."""
    result: list[Any] = []
    error: Exception | None = None  # raised after the task group, which would wrap it in an ExceptionGroup
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await _wait_disconnect(request.receive)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result.append(await work())
        except Exception as exc:  # noqa: BLE001 - re-raised below
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return (True, result[0]) if result else (False, None)


async def collect(gen: Generation, request: Request) -> bool:
    """Runs every choice to its end; False if the client went away first (all cancelled)."""
    async def drain() -> None:
        async for _ in gen.events():
            pass

    try:
        finished, _ = await unless_gone(request, drain)
    finally:
        gen.close()
    return finished
