"""The load-time warm-up requests (amlx.engine.warm; run at load on a GPU): they run to
their end, leave the engine's counters and prefix cache as a fresh engine's, change no
user's tokens, and the load runs them only where it should, going on if they fail."""

from __future__ import annotations

from types import SimpleNamespace

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amlx
from amlx.engine.warm import WARM_BATCHES, WARM_NEW_TOKENS, warm_prompt, warm_requests
from tests.helpers.checkpoints import make_checkpoint


ARCHS = ("qwen3", "gemma3_text", "gemma3", "llama", "mistral")  # (Gemma's windowed layers keep a pool of their own)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    return {arch: make_checkpoint(tmp_path_factory.mktemp(arch), arch, seed=3) for arch in ARCHS}


def _counters(stats: dict) -> dict:
    kv = stats["kv_cache"]
    return {"tokens": stats["tokens_generated"], "steps": stats["decode_steps"], "active": stats["active_requests"],
            "waiting": stats["waiting_requests"], "used": kv["blocks_used"], "cached": kv["blocks_cached"],
            "hits": kv.get("prefix_hits"), "misses": kv.get("prefix_misses"), "preemptions": kv["preemptions"]}


@pytest.mark.parametrize("arch", ARCHS)
def test_warm_requests_leave_the_engine_as_a_fresh_one(ckpts, arch):
    prompts = [[int(x) for x in np.random.default_rng(s).integers(10, 200, n)] for s, n in ((1, 40), (2, 7))]

    async def body():
        async with await amlx.load(ckpts[arch]) as cold, await amlx.load(ckpts[arch]) as warm:
            fresh = _counters(cold.stats())
            ran = await warm.engine.run(lambda: warm_requests(warm.engine))
            assert ran == sum(min(b, warm.engine.max_batch_size) for b in WARM_BATCHES) == 5
            assert _counters(warm.stats()) == fresh
            for prompt in prompts:  # greedy, and seeded sampling: the same tokens either way
                for opts in ({}, {"temperature": 0.8, "seed": 5}):
                    want = await cold.complete(prompt, max_tokens=10, **opts)
                    got = await warm.complete(prompt, max_tokens=10, **opts)
                    assert got.token_ids == want.token_ids and got.usage.cached_tokens == want.usage.cached_tokens
            assert warm.stats()["tokens_generated"] == cold.stats()["tokens_generated"]

    anyio.run(body)


@settings(max_examples=60, deadline=None)
@given(block=st.integers(1, 64), vocab=st.integers(2, 300), eos=st.sets(st.integers(0, 299), max_size=5),
       index=st.integers(0, 8), context=st.integers(2, 64))
def test_a_warm_prompt_fits_in_a_block_and_the_context_and_holds_no_end_of_sequence_id(block, vocab, eos, index,
                                                                                       context):
    eos = frozenset(e for e in eos if e < vocab)
    if len(eos) == vocab:
        eos = frozenset(list(eos)[1:])
    engine = SimpleNamespace(scheduler=SimpleNamespace(block_size=block), vocab_size=vocab, eos_ids=eos,
                             max_context=context)
    ids = warm_prompt(engine, index)
    assert all(0 <= t < vocab and t not in eos for t in ids)
    assert not ids or len(ids) + WARM_NEW_TOKENS < context  # (room for its tokens: check_context)
    assert bool(ids) == (context > WARM_NEW_TOKENS + 1)
    if block > WARM_NEW_TOKENS + 1:  # (else no prompt fits: one token, and nothing to cache with 1-token blocks
        assert len(ids) + WARM_NEW_TOKENS < block  # is what a block that small caches anyway)


def test_a_context_too_short_for_a_warm_prompt_warms_nothing(ckpts):
    async def body():
        async with await amlx.load(ckpts["qwen3"], max_context=WARM_NEW_TOKENS + 1) as model:
            assert await model.engine.run(lambda: warm_requests(model.engine)) == 0
        async with await amlx.load(ckpts["qwen3"], max_context=WARM_NEW_TOKENS + 3) as model:
            assert await model.engine.run(lambda: warm_requests(model.engine)) == 5
            assert model.stats()["tokens_generated"] == 0

    anyio.run(body)


def test_the_load_runs_the_warm_up_on_a_gpu_only_and_goes_on_if_it_fails(monkeypatch):
    from amlx import model as model_module
    from amlx.engine import warm

    calls = []

    class Scheduler:
        def reset_counters(self):
            calls.append("reset")

    def fake(engine):
        calls.append(engine.placement.device)
        if engine.fail:
            raise RuntimeError("out of memory")
        return 5

    monkeypatch.setattr(warm, "warm_requests", fake)
    monkeypatch.delenv("AMLX_WARMUP", raising=False)

    def engine(device, fail=False, mirror=None):
        return SimpleNamespace(placement=SimpleNamespace(device=device), mirror=mirror, fail=fail,
                               scheduler=Scheduler())
    model_module._warm_first_requests(engine("cpu"))
    model_module._warm_first_requests(engine("gpu", mirror=object()))  # tensor parallel: every rank would run it
    assert calls == []
    model_module._warm_first_requests(engine("gpu"))
    assert calls == ["gpu"]
    with pytest.warns(RuntimeWarning, match="warm-up requests failed .out of memory."):
        model_module._warm_first_requests(engine("gpu", fail=True))
    assert calls == ["gpu", "gpu", "reset"]
    monkeypatch.setenv("AMLX_WARMUP", "0")
    model_module._warm_first_requests(engine("gpu"))
    assert calls == ["gpu", "gpu", "reset"]


def test_a_failing_warm_up_raises_and_leaves_no_request_behind(ckpts):
    """A step that fails mid-warm-up: warm_requests raises it, its requests are cancelled (none
    runs on after the load as if a user's), and the model serves as before."""
    prompt = [int(x) for x in np.random.default_rng(4).integers(10, 200, 20)]

    async def body():
        async with await amlx.load(ckpts["qwen3"]) as cold, await amlx.load(ckpts["qwen3"]) as model:
            scheduler = model.engine.scheduler
            real, calls = scheduler.step, []

            def failing():
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError("device lost")
                real()
            scheduler.step = failing
            try:
                with pytest.raises(RuntimeError, match="device lost"):
                    await model.engine.run(lambda: warm_requests(model.engine))
            finally:
                del scheduler.step
            made = model.stats()["tokens_generated"]
            await model.engine.run(lambda: [scheduler.step() for _ in range(3)])  # the cancelled ones leave
            stats = model.stats()
            assert stats["active_requests"] == stats["waiting_requests"] == 0 and stats["tokens_generated"] == made
            want = await cold.complete(prompt, max_tokens=8)
            got = await model.complete(prompt, max_tokens=8)
            assert got.token_ids == want.token_ids

    anyio.run(body)
