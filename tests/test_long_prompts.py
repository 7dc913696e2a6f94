"""One long prompt in a busy batch (issue 12.3).

- The KV capacity of a shard follows the rows that are there: once a long
  request has left, the rows that stay go back to a small cache (where
  attention reads the whole capacity, every later step would pay for it).
- A long prompt is prefilled one chunk per round, between the decode steps of
  the running streams, so they keep getting tokens while it is prefilled.
- Results stay exact: each stream is what it is alone, and the long prompt's
  first token is transformers' (where its margin is clear).

Checkpoint: the tiny random Qwen3 of tests/helpers/checkpoints.py."""

from __future__ import annotations

import asyncio
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

import amlx
from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_logits

LONG = 1500
SHORT = [[5, 17, 300, 42, 99, 7], [250, 3, 64, 11], [600, 1, 2, 700, 4, 9, 9]]  # EOS may end these early


@pytest.fixture(scope="module")
def ckpt():
    root = Path(tempfile.mkdtemp(prefix="amlx-long-"))
    yield make_checkpoint(root / "qwen3", "qwen3", seed=0)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def model(ckpt, monkeypatch):
    monkeypatch.setenv("AMLX_SHARDS", "1")  # every row in one shard: one capacity to watch
    m = amlx.load_sync(ckpt)
    yield m
    m.close()


def long_prompt() -> list[int]:
    return np.random.default_rng(12).integers(0, 700, LONG).tolist()


async def solo(model, prompt, **options) -> list[int]:
    return (await model.complete(prompt, **options)).token_ids


async def wait_for(predicate, timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


async def eos_free(model, count: int, n: int) -> list[list[int]]:
    """`count` short prompts whose greedy paths run `n` tokens without an EOS."""
    rng = np.random.default_rng(3)
    out = []
    while len(out) < count:
        prompt = rng.integers(0, 700, int(rng.integers(3, 12))).tolist()
        if len(await solo(model, prompt, max_tokens=n)) == n:
            out.append(prompt)
    return out


def test_capacity_shrinks_after_a_long_request_leaves(model):
    sched = model.engine.scheduler
    n = 300

    async def body():
        prompts = await eos_free(model, 3, n)
        streams = [model.generate(p, max_tokens=n) for p in prompts]
        got = [[] for _ in streams]

        async def read(k):
            async for t in streams[k]:
                got[k].append(t.id)

        readers = [asyncio.create_task(read(k)) for k in range(len(streams))]
        await wait_for(lambda: all(len(g) >= 2 for g in got))
        long_ids = await solo(model, long_prompt(), max_tokens=3)
        # the long row leaves on the worker's next round; the short rows keep decoding
        await wait_for(lambda: model.stats()["active_requests"] == len(streams))
        after = await model.engine.run(sched.kv_capacity)
        running = sum(1 for g in got if len(g) < n)
        assert running > 0, "the short streams ended before the check: make them longer"
        # the short rows are at most n + 12 positions long: a cache of a few blocks,
        # not the long request's 1,500+ positions
        assert 0 < after[0] <= n + 12 + sched.block, after
        await asyncio.gather(*readers)
        assert got == [await solo(model, p, max_tokens=n) for p in prompts]
        assert long_ids == await solo(model, long_prompt(), max_tokens=3)

    asyncio.run(body())


def test_running_streams_get_tokens_between_the_chunks_of_a_long_prefill(model, ckpt):
    sched = model.engine.scheduler
    chunks = math.ceil(LONG / sched.prefill_chunk)
    assert chunks >= 3, "a 1,500-token prompt should take several prefill chunks"
    log: list[object] = []
    emit = sched._emit

    def logged_emit(req, *args):  # worker thread: the order tokens are handed out
        log.append(req)
        emit(req, *args)

    sched._emit = logged_emit

    async def body():
        running = [model.generate(p, max_tokens=300) for p in SHORT]
        got = [[] for _ in running]

        async def read(k):
            async for t in running[k]:
                got[k].append(t.id)

        readers = [asyncio.create_task(read(k)) for k in range(len(running))]
        await wait_for(lambda: all(len(g) >= 2 for g in got))
        mark = len(log)
        long_stream = model.generate(long_prompt(), max_tokens=3)
        long_ids = [t.id async for t in long_stream]
        await asyncio.gather(*readers)
        long_req = next(r for r in log[mark:] if len(r.prompt) == LONG)
        first = log.index(long_req, mark)
        between = sum(1 for r in log[mark:first] if r is not long_req)
        # every round prefills one chunk, then decodes the running rows
        assert between >= chunks - 1, (between, chunks)
        alone = [await solo(model, p, max_tokens=300) for p in SHORT]
        assert got == alone
        return long_ids

    long_ids = asyncio.run(body())
    sched._emit = emit
    assert long_ids == asyncio.run(solo(model, long_prompt(), max_tokens=3))
    # transformers' first token, where the reference's margin makes it unambiguous
    ref = reference_logits(load_reference(ckpt), long_prompt())[-1]
    top2 = np.sort(ref)[-2:]
    if top2[1] - top2[0] > 1e-3:
        assert long_ids[0] == int(np.argmax(ref))


def test_a_prefill_chunk_attends_to_the_filled_slots_only():
    """However large the buffer has grown, a chunk written at `start` attends
    over start + L slots, not the capacity."""
    from amlx._mlx import array
    from amlx.cache import KVCache

    rng = np.random.default_rng(0)
    k = array(rng.standard_normal((1, 2, 32, 16)).astype(np.float32))
    cache = KVCache(block=64)
    cache.reserve(1024, k)
    keys, values, mask = cache.update_prefill(k, k, 100)
    assert cache.capacity == 1024
    assert keys.shape[2] == values.shape[2] == 132 and mask == "causal"


def test_shrink_keeps_the_rows_exactly():
    from amlx._mlx import array
    from amlx.cache import KVCache

    rng = np.random.default_rng(1)
    k = array(rng.standard_normal((3, 2, 40, 16)).astype(np.float32))
    cache = KVCache(block=64)
    cache.update_prefill(k, k, 0)
    cache.reserve(1500)
    full = cache.kv.numpy()
    assert not cache.shrink(1000)  # 1024 is more than half of 1536: kept
    cache.take_rows([2, 0], needed=41)
    assert cache.capacity == 64
    np.testing.assert_array_equal(cache.kv.numpy(), full[:, [2, 0], :, :64])
    cache.reserve(300)
    assert cache.shrink(41) and cache.capacity == 64
    np.testing.assert_array_equal(cache.kv.numpy(), full[:, [2, 0], :, :64])
