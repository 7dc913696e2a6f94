"""Faults and races in the engine, each test written for a defect found by probing it (see the
commit that added it): a close while a request's grammar is still queued for compiling, two
tasks reading one stream, a batched decode step that fails while each of its rows alone runs."""

from __future__ import annotations

import threading

import anyio
import pytest

import amlx
from amlx.constrain import matcher as matcher_module
from amlx.demo import default_model_dir


async def _outcome(stream) -> tuple[str, object]:
    """How a stream ended: ("ok", token ids) or (the error's type name, its text)."""
    ids = []
    try:
        async for tok in stream:
            ids.append(tok.id)
    except Exception as exc:  # noqa: BLE001 - the outcome under test
        return type(exc).__name__, str(exc)
    return "ok", ids


def test_a_close_ends_a_request_whose_grammar_waits_to_compile_with_closed_error(monkeypatch):
    """Two constrained requests with grammars not compiled yet: the first one's compile runs
    (held here), the second waits behind it on the grammar thread; the model closes. Both end
    with ClosedError. The waiting one's future, cancelled by the close, ended its stream with a
    bare concurrent.futures.CancelledError (an Exception, so the callback took it as the
    request's own error)."""
    entered, gate = threading.Event(), threading.Event()
    build = matcher_module.GrammarVocab.from_tokenizer.__func__

    def held_build(cls, *args, **kwargs):
        entered.set()
        gate.wait(60)
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(matcher_module.GrammarVocab, "from_tokenizer", classmethod(held_build))
    ends: dict[int, tuple[str, object]] = {}

    async def body():
        model = await amlx.load(default_model_dir())
        try:
            streams = [model.generate("hi", regex="[ab]+", max_tokens=4),
                       model.generate("hi", regex="[cd]+", max_tokens=4)]

            async def read(k: int) -> None:
                ends[k] = await _outcome(streams[k])

            async with anyio.create_task_group() as tg:
                for k in range(2):
                    tg.start_soon(read, k)
                await anyio.to_thread.run_sync(entered.wait, 60)
                await model.aclose()
                gate.set()
        finally:
            gate.set()
            await model.aclose()

    anyio.run(body)
    assert ends[0][0] == "ClosedError" and ends[1][0] == "ClosedError", ends
