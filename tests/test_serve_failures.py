"""A request that fails inside the engine gets its own error; the server and the other
requests go on. The failures are injected around `model.generate` by
tests/helpers/failing_server.py (seed 666: MLX out of memory after two tokens; 667: a bug)."""

from __future__ import annotations

import asyncio

import openai
import pytest

import amlx
from tests.helpers.serving import ServerProcess, serve_checkpoint

CHAT = [{"role": "user", "content": "Count to ten."}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return serve_checkpoint(tmp_path_factory.mktemp("fail-ckpt"), seed=4)


async def test_failures_stay_in_their_request(ckpt):
    with amlx.load_sync(ckpt, max_context=512) as model:
        ref = (await model.complete(CHAT, max_tokens=40)).text
    with ServerProcess(ckpt, module="tests.helpers.failing_server") as srv:
        client = srv.client()

        async def healthy() -> str:
            stream = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40,
                                                          temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def fails(seed: int, stream: bool):
            with pytest.raises(openai.APIError) as info:
                r = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0,
                                                         seed=seed, stream=stream)
                if stream:
                    async for _ in r:
                        pass
            return info.value

        results = await asyncio.gather(healthy(), fails(666, False), fails(667, False), fails(666, True),
                                       fails(667, True), healthy())
        assert results[0] == results[5] == ref
        oom, bug, oom_streamed, bug_streamed = results[1:5]
        assert oom.status_code == 503 and oom.body["code"] == "out_of_memory"
        assert bug.status_code == 500 and bug.body["code"] == "internal_error"
        # streamed: the status line was sent long ago, so the error arrives as an SSE error event
        assert "out of memory" in oom_streamed.message and "a bug in one request" in bug_streamed.message
        assert srv.alive() and await healthy() == ref
        h = srv.health()
        assert h["running"] == 0 and h["waiting"] == 0
