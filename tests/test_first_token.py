"""A request's first token reaches its consumer as soon as its prefill has sampled it:
the event loop is woken before the scheduler builds and launches the round's decode
step (notify.flush_wakeups), not after it."""

from __future__ import annotations

import threading

import anyio

import amlx
from amlx.demo import default_model_dir


def test_the_first_token_reaches_its_consumer_before_the_decode_step_is_built():
    received = threading.Event()
    waited: list[bool] = []

    async def body():
        async with await amlx.load(default_model_dir()) as model:
            calls = []

            def fault(rows, chained):
                # called once for the prefill, then while the first decode step is built:
                # there, wait (on the worker) until the consumer holds its first token
                calls.append(chained)
                if len(calls) == 2:
                    waited.append(received.wait(timeout=60))

            model.engine.scheduler.fault = fault
            tokens = []
            async for tok in model.generate([5, 6, 7, 8, 9], max_tokens=3):
                tokens.append(tok.id)
                received.set()
            assert len(tokens) == 3 and len(calls) >= 2

    anyio.run(body)
    assert waited == [True]
