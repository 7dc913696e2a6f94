"""`amlx serve` under load and with clients that go away: cancellation (also during the
prefill of a long prompt), exact outputs for the clients that stay, memory back to idle,
admission control (429), and many concurrent streams."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest

import amlx
from tests.helpers.serving import ServerProcess, serve_checkpoint

LONG_PROMPT = "hello world " * 700  # ~3,500 tokens


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return serve_checkpoint(tmp_path_factory.mktemp("serve-load-ckpt"), seed=1)


@pytest.fixture(scope="module")
def server(ckpt):
    with ServerProcess(ckpt, "--model-name", "tiny", "--keepalive", "0.2", "--max-context", "4096") as srv:
        yield srv


def _cancelled(server) -> dict[str, float]:
    m = server.metrics()
    return {phase: m.get(f'amlx_requests_cancelled_total{{phase="{phase}"}}', 0.0) for phase in ("prefill", "decode")}


async def _idle(server, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = server.health()
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {server.health()}")


async def test_disconnects_cancel_and_others_get_full_outputs(server, ckpt):
    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(32)]
    with amlx.load_sync(ckpt, max_context=4096) as model:
        solo = [(await model.complete(prompts[i], max_tokens=32)).text for i in range(20)]
    client = server.client()
    await client.chat.completions.create(model="tiny", messages=prompts[0], max_tokens=2, temperature=0)  # warm up
    idle = (await _idle(server))["memory"]["active"]
    before = _cancelled(server)

    async def full(i: int) -> str:
        stream = await client.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=32,
                                                      temperature=0, stream=True)
        text, finishes = "", []
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            finishes += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
        assert finishes == ["length"]
        return text

    async def drop_mid_stream(i: int) -> int:
        stream = await client.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=3000,
                                                      temperature=0, stream=True)
        seen = 0
        async for chunk in stream:
            seen += bool(chunk.choices[0].delta.content)
            if seen == 3:
                break
        await stream.close()  # the connection goes away mid-stream
        return seen

    tasks = [drop_mid_stream(i) for i in range(20, 30)] + [full(i) for i in range(20)]
    results = await asyncio.gather(*tasks)
    assert results[:10] == [3] * 10
    assert results[10:] == solo
    await _idle(server)
    after = _cancelled(server)
    assert after["prefill"] - before["prefill"] == 0
    assert after["decode"] - before["decode"] == 10
    h = await _idle(server)
    # No request holds a KV block any more: cancelled ones gave theirs back. What stays is the
    # block pool's arrays (kept at their high-water mark while the model is open, freed at close;
    # finished requests' blocks stay in them for the prefix cache) and memoized index arrays.
    metrics = server.metrics()
    kv = {k.split('"')[1]: v for k, v in metrics.items() if k.startswith("amlx_kv_cache{")}
    assert kv["blocks_used"] == 0, kv
    # the tokens handed to clients, and (at least those, with the dropped streams' unread ones)
    # every token the engine generated
    assert 0 < metrics["amlx_generation_tokens_total"] <= metrics["amlx_engine_generated_tokens_total"], metrics
    assert metrics["amlx_engine_decode_steps_total"] > 0
    cfg = json.loads((ckpt / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_block = cfg["num_hidden_layers"] * 2 * kv["block_size"] * cfg["num_key_value_heads"] * head_dim * 4
    assert 0 <= h["memory"]["active"] - idle <= (kv["blocks_allocated"] + 1) * per_block + 4096, (
        h["memory"]["active"], idle, kv)
    await client.chat.completions.create(model="tiny", messages=prompts[0], max_tokens=2, temperature=0)


async def _drop_before_the_first_token(client, content: str) -> list[str]:
    """Streams a request and goes away at its first keep-alive: before any token came."""
    async with client.chat.completions.with_streaming_response.create(
            model="tiny", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0,
            stream=True) as response:
        lines = []
        async for line in response.iter_lines():
            lines.append(line)
            if line.startswith(":"):  # a keep-alive: the prompt is still waiting or being processed
                break
    return lines  # leaving the block closes the connection


async def test_clients_gone_before_their_first_token_cancel_their_requests(ckpt):
    # One slot, held by a long stream: the two long prompts wait behind it, so no token can reach
    # them before their first keep-alive (a prompt's prefill alone is now too fast to wait for).
    with ServerProcess(ckpt, "--model-name", "tiny", "--max-batch-size", "1", "--keepalive", "0.2",
                       "--max-context", "4096") as srv:
        client = srv.client()
        await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=2, temperature=0)  # warm up
        before = _cancelled(srv)
        busy = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Go on."}], max_tokens=4000, temperature=0,
            stream=True)
        async for chunk in busy:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # it runs, holding the slot
        dropped = await asyncio.gather(*(_drop_before_the_first_token(client, LONG_PROMPT + str(i)) for i in range(2)))
        for lines in dropped:
            assert lines[-1].startswith(":") and not any('"content":"' in ln and '"content":""' not in ln
                                                         for ln in lines)
        await busy.close()
        await _idle(srv)
        after = _cancelled(srv)
        assert after["prefill"] - before["prefill"] == 2 and after["decode"] - before["decode"] == 1
        # the slot is free again and the server answers
        r = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason == "length"


async def test_non_streaming_disconnect_cancels(server):
    client = server.client(timeout=0.5)
    before = _cancelled(server)
    with pytest.raises(openai.APITimeoutError):  # the client gives up and closes the connection
        await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=3000, temperature=0)
    await _idle(server)
    after = _cancelled(server)
    assert after["prefill"] + after["decode"] - before["prefill"] - before["decode"] == 1


async def test_load_64_streams_3_rounds(server):
    client = server.client()
    ttfts: list[float] = []

    async def one(i: int) -> int:
        start = time.perf_counter()
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Story {i}"}], max_tokens=16, temperature=0.7,
            seed=i, stream=True)
        tokens, first = 0, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content is not None and first is None:
                first = time.perf_counter() - start
            tokens += bool(chunk.choices and chunk.choices[0].finish_reason is None)
        ttfts.append(first)
        return tokens

    start = time.perf_counter()
    for _ in range(3):
        await asyncio.gather(*(one(i) for i in range(64)))
    wall = time.perf_counter() - start
    ttfts.sort()
    print(f"\n64 streams x 3 rounds: {wall:.1f} s, TTFT p50 {ttfts[len(ttfts) // 2] * 1000:.0f} ms, "
          f"p99 {ttfts[int(len(ttfts) * 0.99)] * 1000:.0f} ms")
    assert len(ttfts) == 192 and server.alive()


async def test_queue_full_gives_429_with_retry_after(ckpt):
    with ServerProcess(ckpt, "--model-name", "tiny", "--max-batch-size", "1", "--max-queue", "1",
                       "--max-context", "4096") as srv:
        client = srv.client()
        msgs = [{"role": "user", "content": "Hi"}]
        streams = [await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3000, temperature=0,
                                                        stream=True) for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
        assert info.value.status_code == 429 and info.value.response.headers["retry-after"] == "1"
        assert info.value.body["code"] == "queue_full"
        # a request the engine refuses is a 400 with the queue full too (it was a 429 first,
        # whose Retry-After had the client send it again, only to get its 400 later)
        with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
            await client.completions.create(model="tiny", prompt=[1, 10 ** 6], max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="regex"):
            await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, extra_body={"regex": "(a"})
        for s in streams:
            await s.close()
        await _idle(srv)
        r = await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason == "length"
        assert srv.metrics()["amlx_requests_rejected_total"] == 1


async def test_a_stalled_reader_holds_up_no_one(server, ckpt):
    """A client that stops reading holds up no one: the others finish, exactly. (Its own request
    is paused once the socket buffers are full and it has max_buffer unread tokens; with this tiny
    model the OS buffers may well hold its whole reply, so that part is the engine's tests' job.)"""
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(6)]
    with amlx.load_sync(ckpt, max_context=4096) as model:
        solo = [(await model.complete(p, max_tokens=48)).text for p in prompts]
    client = server.client()
    async with client.chat.completions.with_streaming_response.create(
            model="tiny", messages=[{"role": "user", "content": "Never read me."}], max_tokens=1000,
            temperature=0, stream=True) as stalled:
        await stalled.http_response.aiter_raw().__anext__()  # one piece, then nothing is read

        async def full(p) -> str:
            stream = await client.chat.completions.create(model="tiny", messages=p, max_tokens=48, temperature=0,
                                                          stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        assert await asyncio.gather(*(full(p) for p in prompts)) == solo
    await _idle(server)


def test_shutdown_with_open_streams(ckpt):
    """SIGTERM with a stream open: the server stops within its grace period and exits cleanly."""
    import signal

    import httpx

    with ServerProcess(ckpt, "--model-name", "tiny", "--max-context", "4096") as srv:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 4000,
                "stream": True}
        with httpx.Client(timeout=60) as h, h.stream("POST", srv.base_url + "/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            srv.proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            assert srv.proc.wait(30) == 0
            assert time.monotonic() - start < 20
