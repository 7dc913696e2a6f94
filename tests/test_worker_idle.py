"""The worker sleeps while the only request it could start waits for KV blocks
that parked requests (consumers that stopped reading) hold: `Scheduler.has_work`
must not call a waiting request admissible when `_admit` cannot place it. (A
request whose prompt has a cached, idle prefix once counted those blocks as room
twice: the worker then ran rounds without sleeping, a core at 100%, until the
parked consumer read again.)"""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import amlx
from amlx.kv import DEFAULT_BLOCK_SIZE
from tests.helpers.checkpoints import make_checkpoint

BS = DEFAULT_BLOCK_SIZE


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", seed=1)


def _ids(seed: int, n: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(10, 200, n)]


@pytest.mark.parametrize("resume", ["read", "cancel"])
def test_worker_sleeps_while_a_waiting_request_needs_blocks_parked_ones_hold(ckpt, monkeypatch, resume):
    """A pool of 8 blocks: 3 cached idle blocks of an earlier prompt, 4 held by a parked
    request, 1 free. A request of 5 blocks behind that cached prefix needs 2 fresh ones
    besides the 3 it reuses, so it waits; the worker does about nothing meanwhile
    (rounds counted, not timed), and the request completes with its solo tokens once
    the parked consumer reads on, or goes away."""
    monkeypatch.setenv("AMLX_SHARDS", "1")
    shared = _ids(1, 3 * BS + 4)
    waiting = shared[:3 * BS] + _ids(2, BS + 12)

    async def body():
        async with await amlx.load(ckpt, prefix_cache=False) as off:
            per_block = off.engine.scheduler.block_bytes()
            want = (await off.complete(waiting, max_tokens=4)).token_ids
        async with await amlx.load(ckpt, kv_cache_memory=8 * per_block) as m:
            sched = m.engine.scheduler
            # (the parked request holds its blocks throughout: once its slot lapsed, a waiting
            # request that needs them would take them, on a slow machine before the checks below)
            sched.slot_idle_limit = 3600.0
            pool = sched.shards[0].kv.pool
            await m.complete(shared, max_tokens=4)
            parked = m.generate(_ids(3, 4 * BS - 4), max_tokens=6, max_buffer=1)
            first = await parked.__anext__()  # then never read until the waiting one waits
            with anyio.fail_after(10):
                while not await m.engine.run(lambda: bool(sched.parked) and not sched.rows):
                    await anyio.sleep(0.005)
            assert (pool.free, pool.prefix.idle, pool.used()) == (1, 3, 4)

            rounds = [0]
            step = sched.step

            def counted():
                rounds[0] += 1
                step()

            sched.step = counted  # (the worker calls each scheduler's `step` once a round)
            result: dict = {}

            async def run_waiting():
                result["c"] = await m.complete(waiting, max_tokens=4)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_waiting)
                await anyio.sleep(0.3)
                # an idle worker: the round taking the request in (and maybe one when the
                # parked request's batch slot frees up); a spinning one ran thousands
                assert rounds[0] < 20, rounds[0]
                assert await m.engine.run(lambda: len(sched.waiting) == 1 and not sched.has_work())
                if resume == "read":
                    assert len([first.id] + [t.id async for t in parked]) == 6
                else:
                    await parked.aclose()
            assert result["c"].token_ids == want
            assert result["c"].usage.cached_tokens == 3 * BS

    anyio.run(body)


class _Faulty:
    """A scheduler stand-in whose has_work / wake_at raise until its fail_all is called."""

    def __init__(self, question: str):
        self.question, self.failed, self.steps = question, [], 0

    def has_work(self) -> bool:
        if self.question == "has_work" and not self.failed:
            raise RuntimeError("has_work broke (injected)")
        return False

    def wake_at(self):
        if self.question == "wake_at" and not self.failed:
            raise RuntimeError("wake_at broke (injected)")
        return None

    def step(self) -> None:
        self.steps += 1

    def fail_all(self, exc: BaseException) -> None:
        self.failed.append(exc)


@pytest.mark.parametrize("question", ["has_work", "wake_at"])
def test_a_scheduler_whose_question_raises_fails_its_requests_and_the_worker_goes_on(question):
    """The worker asks each scheduler has_work() and wake_at() outside any step. One that
    raises there fails its own requests (fail_all gets the error); the worker thread lives on
    and runs the next jobs (it died before, and every model's requests waited for good)."""
    from amlx.engine.worker import Worker

    worker = Worker()
    try:
        faulty = _Faulty(question)
        worker.add_scheduler(faulty)
        assert worker.submit(lambda: 41 + 1).result(timeout=30) == 42
        assert worker.thread.is_alive()
        assert len(faulty.failed) == 1 and "injected" in str(faulty.failed[0])
        assert worker.submit(lambda: "still here").result(timeout=30) == "still here"
    finally:
        worker.remove_scheduler(faulty)
        worker.stop()
        worker.thread.join(timeout=30)
