"""A long prefill pass launched in segments of layers (amlx.engine.pacing).

Pacing is on by default only on a GPU, whose encoders keep a launched pass's
activations until it completes (what it saves there is measured on the H200,
benchmarks/README.md). Here it is forced on in the CPU engine to check what must
hold wherever it runs: the segments are launched and waited for as said, greedy
outputs are those of the unpaced pass for every architecture, and a launched
segment's pool writes still happen in place (the pool is not copied)."""
from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amlx
from amlx._mlx import array, memory, ops
from amlx.errors import MLXError
from amlx.engine import pacing, scheduler
from amlx.engine.pacing import PassPacer, pacer_for, segment_layers, segment_setting
from tests.helpers.checkpoints import make_checkpoint

LAYERS = 6
PROMPTS = 6
GUARD = 60  # seconds the worker waits for the prompts at most (a guard, never reached)
PROMPT_LEN = 48


@pytest.fixture(scope="module")
def ckpts():
    root = Path(tempfile.mkdtemp(prefix="amlx-pacing-"))
    paths = {arch: make_checkpoint(root / arch, arch, seed=4, num_hidden_layers=LAYERS)
             for arch in ("qwen3", "gemma3", "llama")}
    # keys and values far wider than the activations, so that a copied pool shows in the peak
    paths["wide-kv"] = make_checkpoint(root / "wide-kv", "qwen3", seed=4, num_hidden_layers=LAYERS,
                                       num_attention_heads=8, num_key_value_heads=8, head_dim=128)
    yield paths
    shutil.rmtree(root, ignore_errors=True)


def test_segment_setting(monkeypatch):
    monkeypatch.delenv("AMLX_PREFILL_SEGMENT", raising=False)
    assert segment_setting() == pacing.SEGMENT_BYTES
    for text, value in (("0", 0), ("32M", 32 << 20), ("1000", 1000)):
        monkeypatch.setenv("AMLX_PREFILL_SEGMENT", text)
        assert segment_setting() == value
    for bad in ("x", "-1", "12Q"):
        monkeypatch.setenv("AMLX_PREFILL_SEGMENT", bad)
        with pytest.raises(ValueError, match="AMLX_PREFILL_SEGMENT"):
            segment_setting()


@given(layers=st.integers(1, 80), tokens=st.integers(1, 1 << 16), token_bytes=st.integers(1, 1 << 18),
       segment_bytes=st.integers(0, 1 << 30))
@settings(max_examples=300, deadline=None)
def test_segments_stay_under_the_target_and_short_passes_run_whole(layers, tokens, token_bytes, segment_bytes):
    every = segment_layers(layers, tokens, token_bytes, segment_bytes)
    layer_bytes = tokens * token_bytes
    if segment_bytes == 0 or layers < 2 or layers * layer_bytes <= 2 * segment_bytes:
        assert every is None and pacer_for(layers, tokens, token_bytes, segment_bytes) is None
        return
    assert every is not None and every >= 1
    assert every == 1 or every * layer_bytes <= segment_bytes  # (a layer over the target is a segment alone)
    assert (every + 1) * layer_bytes > segment_bytes  # the most layers that fit
    assert pacer_for(layers, tokens, token_bytes, segment_bytes).every == every


def test_the_pacer_launches_every_segment_and_waits_for_the_one_before():
    """Each launch is preceded by `before_launch`; after the launch of segment k,
    segment k - lag is finished (it was waited for), and the last layer is never
    launched early (the caller evaluates the pass's end)."""
    events: list[str] = []
    pacer = PassPacer(layers=10, every=2, before_launch=lambda: events.append("before"))
    assert pacer.every == 2
    x = array(np.ones((64, 64), dtype=np.float32))
    outs = []
    for i in range(10):
        x = ops.matmul(x, x) * (1 / 64)
        outs.append(x)
        pacer(i, x)
        launched = (i + 1) // 2 if i + 1 < 10 else 4
        assert pacer.launches == launched
        if i % 2 == 1 and i + 1 < 10:
            events.append(f"launch {i}")
            if launched > pacer.lag:  # the segment `lag` back is done now
                assert outs[i - 2 * pacer.lag].is_ready()
    assert events == ["before", "launch 1", "before", "launch 3", "before", "launch 5", "before", "launch 7"]
    assert pacer.waited > 0  # three waits, timed (the engine's step timing reports them)
    assert PassPacer(layers=10, every=2).waited == 0
    assert not outs[-1].is_ready()  # (not launched by the pacer)
    ops.eval(outs[-1])
    np.testing.assert_allclose(outs[-1].numpy(), np.ones((64, 64)), rtol=1e-6)


def _serve(path, monkeypatch, segment_bytes: int | None, prompt_len: int = PROMPT_LEN, hook: bool = True,
           first_len: int | None = None):
    """Greedy outputs of two rounds of PROMPTS new prompts sent together (one
    prefill group each), the pacers the scheduler made, the most MLX memory the
    second round's prefill groups added (the pool has grown by then), and the
    pool's bytes. `segment_bytes`: the pacing target (0: off; None: each layer a
    segment of its own; on a GPU it is AMLX_PREFILL_SEGMENT). `hook=False` drops the scheduler's `before_launch`; `first_len`:
    the first round's prompt length (the pool grows to hold it)."""
    monkeypatch.setenv("AMLX_SHARDS", "1")
    monkeypatch.setenv("AMLX_PREFILL_CHUNK", "4096")  # every prompt fits one group
    made: list[PassPacer] = []

    def recording(*args, **kw):
        if not hook:
            args, kw = args[:4], {}
        p = pacer_for(*args, **kw)
        if p is not None:
            made.append(p)
        return p

    monkeypatch.setattr(scheduler, "pacer_for", recording)
    model = amlx.load_sync(path, max_batch_size=PROMPTS, prefix_cache=False)  # (round 2 reuses the blocks: no growth)
    sched = model.engine.scheduler
    sched.segment_bytes = 1 if segment_bytes is None else segment_bytes  # (the CPU's default is 0: pacing is for a GPU)
    grew = []
    group = sched._prefill_group

    def measured(reqs):
        start = memory.active()
        memory.reset_peak()
        group(reqs)
        grew.append(memory.peak() - start)

    sched._prefill_group = measured
    rng = np.random.default_rng(11)
    try:
        async def run(n):
            async def one(p):
                return [t.id async for t in model.generate(p, max_tokens=5)]
            prompts = [rng.integers(10, 200, n).tolist() for _ in range(PROMPTS)]
            # The worker waits in a job until all the prompts are queued, so they make one prefill
            # group: sent "together" they could still come apart on a busy machine (a CI run
            # prefilled them in groups of four or fewer, which no segment target paces).
            started, gate = threading.Event(), threading.Event()
            model.engine.submit_job(lambda: started.set() or gate.wait(GUARD))
            try:
                with anyio.fail_after(GUARD):  # (a guard)
                    while not started.is_set():
                        await asyncio.sleep(0.001)
                    tasks = [asyncio.create_task(one(p)) for p in prompts]
                    while sched.counts()["waiting"] < PROMPTS:
                        await asyncio.sleep(0.001)
            finally:
                gate.set()
            return await asyncio.gather(*tasks)
        out = [asyncio.run(run(first_len or prompt_len))]
        grew.clear()
        out.append(asyncio.run(run(prompt_len)))
        pool_bytes = sum(a.nbytes for a in sched.shards[0].kv.state())
        return out, made, max(grew), pool_bytes
    finally:
        model.close()


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "llama"])
def test_paced_passes_give_the_unpaced_tokens(ckpts, monkeypatch, arch):
    plain, none_made, _, _ = _serve(ckpts[arch], monkeypatch, 0)
    assert none_made == []
    model = amlx.load_sync(ckpts[arch])
    token_bytes = model.engine.scheduler.pass_budget.token_bytes
    model.close()
    # a segment of two layers for a pass of all the prompts (shorter passes: more layers, or none)
    paced, made, _, _ = _serve(ckpts[arch], monkeypatch, 2 * PROMPTS * PROMPT_LEN * token_bytes)
    # (a group of 5 or 6 prompts: 6 layers in 3 segments, 2 launched early; smaller groups take more layers)
    assert any(p.launches >= 1 for p in made)
    assert all(p.launches == (LAYERS - 1) // p.every for p in made)
    assert paced == plain
    each, made, _, _ = _serve(ckpts[arch], monkeypatch, None)
    assert made and all(p.every == 1 and p.launches == LAYERS - 1 for p in made)
    assert each == plain


def test_a_launched_segment_writes_the_pool_in_place(ckpts, monkeypatch):
    """Before each launch the scheduler points the pool's holder at the arrays
    written so far, so that only the graph holds the old ones and MLX writes them
    in place. Without that hook every written layer's pool would be copied while
    the holder kept the old one: the peak would grow by about the pool's size."""
    path = ckpts["wide-kv"]
    # a first round of long prompts grows the pool to about 3x what the second round's pass writes
    _, made, grew, pool_bytes = _serve(path, monkeypatch, None, prompt_len=128, first_len=512)
    _, _, grew_unhooked, _ = _serve(path, monkeypatch, None, prompt_len=128, first_len=512, hook=False)
    assert made and made[-1].launches == LAYERS - 1
    assert pool_bytes > 100 << 20
    # (the pass's own activations differ by device: on a GPU more of them are alive at once)
    assert grew_unhooked - grew > pool_bytes / 2, (
        f"the hook saved {grew_unhooked - grew} bytes of a {pool_bytes}-byte pool: the written layers were copied")


def test_a_segment_that_fails_to_launch_is_retried_alone_and_the_engine_goes_on(ckpts, monkeypatch):
    """MLX failing inside a paced pass of several prompts (here: its first segment's launch)
    fails that pass as any failed prefill does: the prompts are retried one by one, and
    every request still gets the tokens of an undisturbed run. (A lone prompt's failed pass
    fails its request: tests/test_errors.py.)"""
    plain, _, _, _ = _serve(ckpts["qwen3"], monkeypatch, 0)
    launch = PassPacer.__call__
    failed = []

    def failing(self, layer, *outputs):
        # (the first pacer made for more than one prompt's tokens: the group's pass)
        if not failed and self.tokens > PROMPT_LEN and (layer + 1) % self.every == 0:
            failed.append(layer)
            raise MLXError("async_eval", "injected failure")
        return launch(self, layer, *outputs)

    made_for = pacer_for

    def with_tokens(layers, tokens, *args, **kw):
        p = made_for(layers, tokens, *args, **kw)
        if p is not None:
            p.tokens = tokens
        return p

    monkeypatch.setattr(PassPacer, "__call__", failing)
    monkeypatch.setattr(pacing, "pacer_for", with_tokens)
    monkeypatch.setattr(sys.modules[__name__], "pacer_for", with_tokens)  # (what _serve wraps)
    paced, made, _, _ = _serve(ckpts["qwen3"], monkeypatch, None)
    assert failed == [0]  # (the group's pass failed at its first launch)
    assert sum(p.tokens <= PROMPT_LEN for p in made) >= 2  # then its prompts went alone
    assert paced == plain
