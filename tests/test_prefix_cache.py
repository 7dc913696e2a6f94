"""Prefix caching and the KV pool through the public API: greedy outputs equal
with the cache on and off for every architecture (Gemma's and Mistral's windows
shorter than the prompts, a prefix ending mid-block, a multi-turn follow-up),
`usage.cached_tokens`, invalidation when the weights change, a pool filled
past its size (requests wait, none fails or is lost), preemption with each
stream going on exactly, ContextLengthError up front, and memory back after
close."""

from __future__ import annotations

import gc

import anyio
import numpy as np
import pytest

import amlx
from amlx.kv import DEFAULT_BLOCK_SIZE
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.faults import failing_array

BS = DEFAULT_BLOCK_SIZE
ARCHS = ["qwen3", "qwen2", "llama", "gemma3_text", "gemma3", "mistral"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    built: dict = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = make_checkpoint(tmp_path_factory.mktemp(arch), arch, seed=1)
        return built[arch]

    return get


def _ids(seed: int, n: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(10, 200, n)]


def _run(fn, *args):
    return anyio.run(fn, *args)


async def _complete(model, prompt, n=12):
    c = await model.complete(prompt, max_tokens=n)
    return c.token_ids, c.usage.cached_tokens


@pytest.mark.parametrize("extend", ["0", "1"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_outputs_equal_with_and_without_the_prefix_cache(ckpt, arch, extend, monkeypatch):
    """`extend`: the cached requests' short prefills run as the compiled extend pass
    (the GPU's default) or as the plain prefill (the CPU's)."""
    monkeypatch.setenv("AMLX_EXTEND_PASS", extend)
    base = _ids(1, 40)  # two full blocks and 8 tokens

    async def body():
        async with await amlx.load(ckpt(arch), prefix_cache=False) as off, await amlx.load(ckpt(arch)) as on:
            first, _ = await _complete(off, base, 20)
            cases = [
                (base, 0),  # nothing cached yet
                (base, 2 * BS),  # the same prompt: its full blocks (one token is always computed)
                (base[:37] + _ids(2, 9), 2 * BS),  # a prefix ending mid-block: its full blocks
                (base[:20] + _ids(3, 30), BS),  # diverges inside the second block
                (_ids(4, 40), 0),  # nothing in common
                # a follow-up turn: the prompt, the reply (cached when the first request
                # ended) and more; 40 + 20 tokens were computed, so three full blocks
                (base + first + _ids(5, 7), 3 * BS),
            ]
            for i, (prompt, cached) in enumerate(cases):
                if i == len(cases) - 1:
                    await _complete(on, base, 20)  # the first turn, on the cached model
                want, none = await _complete(off, prompt)
                got, hit = await _complete(on, prompt)
                assert got == want, (arch, i)
                assert none == 0 and hit == cached, (arch, i, hit)

    _run(body)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_model_decodes_alike_with_and_without_the_prefix_cache(ckpt, tmp_path, bits):
    """A 4- or 8-bit model on the CPU: a prompt's rows behind a cached prefix are computed as in
    a whole prefill. (The CPU's int8 products took any product of at most 64 rows, so a short
    remainder behind the cache was rounded to int8 and a whole prompt was not: greedy tokens
    parted. They now take decode steps and verify passes only: cpu_matmul.decode_pass.) A chat's
    next turn holds the last reply, whose keys and values decode steps wrote, int8-rounded: those
    blocks are not cached (ShardPools.decoded_reusable), so the turn is computed as without the
    cache too."""
    path = amlx.convert(ckpt("qwen2"), tmp_path / f"q{bits}", quantize=bits, group_size=32, progress=False)
    base = _ids(1, 40)

    async def body():
        async with await amlx.load(path, prefix_cache=False) as off, await amlx.load(path) as on:
            for prompt in (base, base, base[:37] + _ids(2, 9), base[:20] + _ids(3, 30), base[:34] + _ids(6, 3)):
                want, _ = await _complete(off, prompt)
                got, _ = await _complete(on, prompt)
                assert got == want
            # turns of a chat: each prompt is the last one, its reply and a new message
            prompt = base[:24]
            for turn in range(3):
                want, _ = await _complete(off, prompt, n=40)
                got, cached = await _complete(on, prompt, n=40)
                assert got == want, turn
                assert turn == 0 or cached >= 16  # (the earlier prompts' blocks still serve)
                prompt = prompt + got + _ids(20 + turn, 7)
            # prompts prefilled together, each as alone
            together = await _complete_all(off, [base[:30], base[:12] + _ids(7, 5), _ids(8, 20)])
            alone = [(await _complete(off, p))[0] for p in (base[:30], base[:12] + _ids(7, 5), _ids(8, 20))]
            assert together == alone

    _run(body)


async def _complete_all(model, prompts) -> list:
    out: list = [None] * len(prompts)

    async def one(i):
        out[i] = (await _complete(model, prompts[i]))[0]

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return out


def test_the_extend_pass_matches_the_plain_prefill(ckpt, monkeypatch):
    """A cached request's short prefill as the compiled extend pass (per-row
    positions, padded to 16 tokens and to a wider span) gives the plain pass's
    tokens and log-probabilities, and is what the scheduler ran; requests arriving
    together too (batched, with padded batches as on a GPU: three rows run as four)."""
    from amlx.engine import scheduler

    used = []
    real = scheduler.Scheduler._extend_pass
    monkeypatch.setattr(scheduler.Scheduler, "_extend_pass",
                        lambda self, *a: used.append(len(a[1])) or real(self, *a))
    base = _ids(7, 70)
    prompts = [base + _ids(8, 5), base + _ids(9, 20), base[:50] + _ids(10, 3)]
    trio = [base + _ids(11, 5), base + _ids(12, 9), base + _ids(13, 2)]  # all behind 4 cached blocks

    async def run(extend: str):
        monkeypatch.setenv("AMLX_EXTEND_PASS", extend)
        monkeypatch.setenv("AMLX_PAD_BATCHES", extend)  # (as on a GPU: three rows run as four, one padding)
        async with await amlx.load(ckpt("qwen3")) as m:
            await m.complete(base, max_tokens=1)
            out = [await m.complete(p, max_tokens=6, logprobs=True) for p in prompts]
            # submitted at once (usually one batched pass: the worker takes what has arrived)
            streams = [m.generate(p, max_tokens=6, logprobs=True) for p in trio]
            together = [[(t.id, t.logprob) async for t in st] for st in streams]
            return out, together

    (plain, plain_together), (extended, together) = _run(run, "0"), _run(run, "1")
    assert used  # the extend pass ran (only with AMLX_EXTEND_PASS=1)
    for p, e in zip(plain, extended):
        assert p.usage.cached_tokens == e.usage.cached_tokens > 0
        assert e.token_ids == p.token_ids
        np.testing.assert_allclose(e.logprobs, p.logprobs, atol=1e-4)
    for p, e in zip(plain_together, together):
        assert [i for i, _ in e] == [i for i, _ in p]
        np.testing.assert_allclose([lp for _, lp in e], [lp for _, lp in p], atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_the_extend_pass_warm_up_leaves_the_cache_as_it_was(ckpt, arch, monkeypatch):
    """`Scheduler.warm_extend` (run at load on a GPU) runs the compiled extend pass once
    per token width and batch over rows holding only the null block: it takes no block,
    and greedy outputs after it (cached ones through the extend pass) equal a model's
    without the cache. Gemma's windowed layers have a pool of their own."""
    monkeypatch.setenv("AMLX_EXTEND_PASS", "1")
    base = _ids(1, 40)

    async def body():
        async with await amlx.load(ckpt(arch), prefix_cache=False) as off, await amlx.load(ckpt(arch)) as on:
            scheduler = on.engine.scheduler
            runs = await on.engine.run(scheduler.warm_extend)
            assert runs == 2 * len(scheduler.extend_widths()) and scheduler.extend_widths()[0] == 16
            assert on.stats()["kv_cache"]["blocks_used"] == 0
            for prompt, cached in ((base, 0), (base, 2 * BS), (base[:37] + _ids(2, 9), 2 * BS)):
                want, _ = await _complete(off, prompt)
                got, hit = await _complete(on, prompt)
                assert (got, hit) == (want, cached)

    _run(body)


def test_a_warm_up_out_of_time_leaves_longer_prompts_to_the_plain_pass(ckpt, monkeypatch):
    """With no time left after its first width, `warm_extend` stops there (smallest widths
    first): the extend pass then takes only what that width holds, longer prompts behind a
    cached prefix take the plain pass, and both give a model's tokens without the cache."""
    from amlx.engine import scheduler as scheduler_module

    monkeypatch.setenv("AMLX_EXTEND_PASS", "1")
    widths = []
    real = scheduler_module.Scheduler._extend_pass
    monkeypatch.setattr(scheduler_module.Scheduler, "_extend_pass",
                        lambda self, *a: widths.append(max(a[3]) - a[2]) or real(self, *a))
    base = _ids(1, 40)

    async def body():
        async with await amlx.load(ckpt("qwen3"), prefix_cache=False) as off, await amlx.load(ckpt("qwen3")) as on:
            scheduler = on.engine.scheduler
            first = scheduler.extend_widths()
            runs = await on.engine.run(lambda: scheduler.warm_extend(budget_s=0.0))
            assert runs == 2 and scheduler.extend_max == first[0] == 16 and scheduler.extend_widths() == [16]
            await _complete(on, base)
            for tail, through_extend in ((_ids(2, 9), True), (_ids(3, 30), False)):
                widths.clear()
                prompt = base[:2 * BS] + tail  # two cached blocks, then 9 or 30 new tokens
                want, _ = await _complete(off, prompt)
                got, hit = await _complete(on, prompt)
                assert (got, hit) == (want, 2 * BS)
                assert bool(widths) == through_extend

    _run(body)


def test_the_extend_warm_up_budget_comes_from_the_environment(monkeypatch):
    from amlx.model import EXTEND_WARMUP_S, extend_warmup_budget

    monkeypatch.delenv("AMLX_EXTEND_WARMUP_S", raising=False)
    assert extend_warmup_budget() == EXTEND_WARMUP_S == 30.0
    monkeypatch.setenv("AMLX_EXTEND_WARMUP_S", "2.5")
    assert extend_warmup_budget() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("AMLX_EXTEND_WARMUP_S", bad)
        with pytest.raises(ValueError, match="AMLX_EXTEND_WARMUP_S"):
            extend_warmup_budget()


def test_a_cut_short_extend_warm_up_tells_the_user(monkeypatch, capsys):
    """On a GPU a warm-up that ran out of its budget says which prompts keep the compiled
    pass; one that finished, or one that failed (the plain pass for all), says no such thing."""
    from types import SimpleNamespace

    from amlx import model as model_module

    class Scheduler:
        extend_max = 256

        def __init__(self, reach):
            self.reach = reach

        def warm_extend(self, budget_s):
            assert budget_s == 7.0
            if self.reach is None:
                raise RuntimeError("compile failed")
            self.extend_max = self.reach
            return 1

    monkeypatch.setenv("AMLX_EXTEND_WARMUP_S", "7")
    monkeypatch.delenv("AMLX_WARMUP", raising=False)
    for reach, said in ((32, True), (256, False)):
        engine = SimpleNamespace(placement=SimpleNamespace(device="gpu"), scheduler=Scheduler(reach))
        model_module._warm_extend(engine)
        err = capsys.readouterr().err
        assert ("up to 32 new tokens" in err) == said and engine.scheduler.extend_max == reach
    engine = SimpleNamespace(placement=SimpleNamespace(device="gpu"), scheduler=Scheduler(None))
    with pytest.warns(RuntimeWarning, match="extend pass is off"):
        model_module._warm_extend(engine)
    assert engine.scheduler.extend_max == 0 and "new tokens" not in capsys.readouterr().err


def test_the_extend_pass_is_on_by_default_on_a_gpu_only(monkeypatch):
    from amlx.engine.placement import EngineOptions

    monkeypatch.delenv("AMLX_EXTEND_PASS", raising=False)
    assert EngineOptions(device="gpu").resolved().extend_pass
    assert not EngineOptions(device="cpu").resolved().extend_pass
    assert EngineOptions(device="cpu", extend_pass=True).resolved().extend_pass
    monkeypatch.setenv("AMLX_EXTEND_PASS", "0")
    assert not EngineOptions(device="gpu").resolved().extend_pass


def test_extend_spans_come_in_two_sizes_per_octave():
    """The extend pass's gathered span (ShardKV.extend_width): a power of two or three
    quarters of one, then a multiple of the decode span step; never short."""
    from amlx.kv.rows import extend_bucket

    sizes = {extend_bucket(n) for n in range(1, 4097)}
    assert sizes == {1, 2, 3} | {k << j for j in range(11) for k in (4, 6) if k << j <= 4096}
    for n in range(1, 700):
        for step in (1, 4, 16):
            got = extend_bucket(n, step)
            assert got >= n and got % step == 0 and got < max(2 * n, 2 * step)


def test_concurrent_requests_sharing_a_prefix_match_solo_runs(ckpt):
    """Rows sharing cached blocks (held by reference, several at once) decode as alone."""
    system = _ids(6, 3 * BS)
    prompts = [system + _ids(10 + k, 5 + k) for k in range(6)]

    async def body():
        async with await amlx.load(ckpt("qwen3"), prefix_cache=False) as off, await amlx.load(ckpt("qwen3")) as on:
            solo = [(await _complete(off, p, 16))[0] for p in prompts]
            await _complete(on, prompts[0], 16)  # caches the system prompt
            results: dict = {}

            async def one(k):
                results[k] = await _complete(on, prompts[k], 16)

            async with anyio.create_task_group() as tg:
                for k in range(len(prompts)):
                    tg.start_soon(one, k)
            for k in range(len(prompts)):
                assert results[k][0] == solo[k]
                assert results[k][1] == 3 * BS  # every one reused the cached system prompt
            assert on.stats()["kv_cache"]["prefix_hits"] >= 6 * 3

    _run(body)


def test_changed_weights_invalidate_the_cache(ckpt):
    """weights_changed (what adapters and training call) empties the prefix cache:
    the next request computes its prompt with the new weights."""
    prompt = _ids(7, 50)

    async def body():
        async with await amlx.load(ckpt("llama")) as on, await amlx.load(ckpt("llama"), prefix_cache=False) as off:
            await _complete(on, prompt)
            assert (await _complete(on, prompt))[1] == 3 * BS
            for m in (on, off):
                lm = m.engine.model
                name = next(n for n, _ in lm.named_parameters() if n.endswith("self_attn.o_proj.weight"))
                await m.engine.run(lambda lm=lm, name=name: lm.update({name: _scaled(dict(lm.named_parameters())[name])}))
                m.engine.weights_changed()
            got, hit = await _complete(on, prompt)
            want, _ = await _complete(off, prompt)
            assert hit == 0 and got == want
            assert on.stats()["kv_cache"]["blocks_cached"] >= 3  # cached again, with the new weights
            assert (await _complete(on, prompt))[1] == 3 * BS

    _run(body)


def test_least_recently_used_prefixes_are_evicted_when_the_pool_needs_room(ckpt, monkeypatch):
    """A pool of 8 blocks: three prompts of 3 full blocks each cannot all stay
    cached; blocks of the least recently used go (a chain's tail first), the
    others still hit."""
    monkeypatch.setenv("AMLX_SHARDS", "1")
    a, b, c = (_ids(70 + k, 3 * BS + 4) for k in range(3))

    async def body():
        async with await amlx.load(ckpt("qwen3"), prefix_cache=False) as off:
            per_block = _block_bytes(off)
        async with await amlx.load(ckpt("qwen3"), kv_cache_memory=8 * per_block) as m:
            for p in (a, b):
                await _complete(m, p, 4)  # each holds 4 blocks while running; 3 stay cached
            assert (await _complete(m, a, 4))[1] == 3 * BS  # a is now the most recently used
            await _complete(m, c, 4)  # needs 2 blocks more than are free: b's last two go
            assert (await _complete(m, a, 4))[1] == 3 * BS
            assert (await _complete(m, c, 4))[1] == 3 * BS
            assert (await _complete(m, b, 4))[1] == BS  # (evicted tail first: its first block stayed)
            stats = m.stats()["kv_cache"]
            assert stats["prefix_hits"] >= 9 and stats["prefix_misses"] >= 9

    _run(body)


def _scaled(p):
    from amlx._mlx import ops

    out = ops.multiply(p, 1.5)
    ops.eval(out)
    return out


def _block_bytes(model) -> int:
    return model.engine.scheduler.block_bytes()


def test_a_pool_filled_past_its_size_makes_requests_wait(ckpt, monkeypatch):
    """A pool of 12 blocks and 8 requests of 3-4 blocks each: they take turns,
    every one completes with its solo tokens, and none fails or is lost."""
    monkeypatch.setenv("AMLX_SHARDS", "1")
    prompts = [_ids(20 + k, 30 + k) for k in range(8)]

    async def body():
        async with await amlx.load(ckpt("qwen3"), prefix_cache=False) as off:
            solo = [(await _complete(off, p, 24))[0] for p in prompts]
            per_block = _block_bytes(off)
        async with await amlx.load(ckpt("qwen3"), kv_cache_memory=12 * per_block) as small:
            results: dict = {}
            peak = 0

            async def one(k):
                results[k] = await _complete(small, prompts[k], 24)

            async def watch():
                nonlocal peak
                while len(results) < len(prompts):
                    peak = max(peak, small.stats()["kv_cache"]["blocks_used"])
                    await anyio.sleep(0.002)

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                for k in range(len(prompts)):
                    tg.start_soon(one, k)
            assert [results[k][0] for k in range(len(prompts))] == solo
            assert peak <= 12
            assert small.stats()["kv_cache"]["blocks_allocated"] <= 12

    _run(body)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_preemption_continues_each_stream_exactly(ckpt, monkeypatch, arch):
    """Rows that outgrow the pool while decoding: the youngest is preempted and
    recomputed from its prompt and its tokens so far; every stream's tokens are
    those of an unpreempted run, with no gap and no duplicate (seeded sampling
    and penalties included). Gemma 3 (a window of 8) with its windowed layers'
    own pool, which its rows give back too."""
    monkeypatch.setenv("AMLX_SHARDS", "1")
    if arch == "gemma3_text":
        # Gemma's first stream ends after 13 tokens; where leaves do not drain the step in
        # flight (the default, EngineOptions.chain_changes), its blocks come back a round
        # later, after the running row took its next block, so the waiting request joins
        # only once the pool can hold it and no row ever outgrows the pool. Draining on
        # leaves keeps the scenario that preempts (Qwen3's below preempts either way).
        monkeypatch.setenv("AMLX_CHAIN_CHANGES", "0")
    prompts = [_ids(30 + k, 20) for k in range(3)]
    n = 60  # each needs 5 blocks at the end; three of them need 15 > 10
    # greedy, and seeded sampling with a repetition penalty (its key and history go on exactly)
    options = [{}, {"temperature": 1.0, "seed": 5, "repetition_penalty": 1.3}, {}]

    async def body():
        async with await amlx.load(ckpt(arch), prefix_cache=False) as off:
            solo = [(await off.complete(p, max_tokens=n, **o)).token_ids for p, o in zip(prompts, options)]
            per_block = _block_bytes(off)
        for prefix in (False, True):
            # (Gemma's first streams end early: its pool is smaller, so the rows still outgrow it)
            async with await amlx.load(ckpt(arch), kv_cache_memory=(10 if arch == "qwen3" else 5) * per_block,
                                       prefix_cache=prefix) as small:
                streams = [small.generate(p, max_tokens=n, **o) for p, o in zip(prompts, options)]
                got: dict = {}

                async def read(k):
                    got[k] = [t.id async for t in streams[k]]

                async with anyio.create_task_group() as tg:
                    for k in range(len(prompts)):
                        tg.start_soon(read, k)
                assert [got[k] for k in range(len(prompts))] == solo
                assert small.stats()["kv_cache"]["preemptions"] > 0

    _run(body)


def test_a_request_that_cannot_fit_fails_up_front(ckpt):
    """A prompt that alone cannot fit in the pool gets ContextLengthError at once,
    saying how much memory it needs; the context is capped to what the pool holds."""
    async def body():
        async with await amlx.load(ckpt("qwen3"), prefix_cache=False) as m:
            per_block = _block_bytes(m)
        async with await amlx.load(ckpt("qwen3"), kv_cache_memory=4 * per_block) as m:
            shards = len(m.engine.scheduler.shards)
            room = m.engine.scheduler.pool_tokens()
            assert room == (4 // shards) * BS == m.info.context_length  # what one request can hold
            with pytest.raises(amlx.ContextLengthError, match="MiB of KV cache"):
                m.generate(_ids(40, room), max_tokens=8)
            ok = await m.complete(_ids(40, room - 8), max_tokens=100)
            assert len(ok.token_ids) == 8 and ok.finish_reason == "length"  # capped by what fits

    _run(body)


def test_bad_kv_options_are_refused():
    for bad in (0, -5, 1.5, 0.0, "1GB", True):
        with pytest.raises(ValueError, match="kv_cache_memory"):
            amlx.load_sync("/nonexistent", kv_cache_memory=bad)
    with pytest.raises(ValueError, match="prefix_cache"):
        amlx.load_sync("/nonexistent", prefix_cache="yes")


def test_memory_is_back_after_close(ckpt):
    async def body():
        gc.collect()
        before = amlx.memory()["active"]
        async with await amlx.load(ckpt("gemma3_text")) as m:
            for k in range(3):
                await _complete(m, _ids(50, 40) + _ids(51 + k, 10), 10)
            assert m.stats()["kv_cache"]["blocks_cached"] > 0
        gc.collect()
        assert amlx.memory()["active"] == before

    _run(body)


def _poison_pool(sched) -> None:
    """Makes shard 0's first pool array fail when evaluated (worker thread)."""
    from amlx._mlx import ops

    pool = sched.shards[0].kv.pool
    pool.arrays[0] = ops.add(pool.arrays[0], ops.astype(failing_array(), pool.arrays[0].dtype))


def test_a_pool_that_cannot_be_computed_fails_its_requests_not_the_engine(ckpt, monkeypatch):
    """A failure in writing a shard's pool (what running out of memory there looks
    like) ends the requests holding blocks in it with MLXError; the pool starts
    again empty and later requests give their usual tokens."""
    monkeypatch.setenv("AMLX_SHARDS", "1")
    prompt = _ids(60, 30)

    async def body():
        async with await amlx.load(ckpt("qwen3")) as m:
            want, _ = await _complete(m, prompt, 12)
            stream = m.generate(_ids(61, 20), max_tokens=500, max_buffer=2)
            got = [await stream.__anext__()]
            await m.engine.run(lambda: _poison_pool(m.engine.scheduler))
            with pytest.raises(amlx.MLXError):
                async for t in stream:
                    got.append(t)
            assert len(got) < 500
            again, hit = await _complete(m, prompt, 12)
            assert again == want and hit == 0  # (the cache went with the pool)
            with anyio.fail_after(10):  # (a finished row leaves on the worker's next round)
                while m.stats()["active_requests"]:
                    await anyio.sleep(0.001)

    _run(body)


@pytest.mark.parametrize("chunk", [None, "8"])
def test_a_busy_small_pool_keeps_its_books(ckpt, monkeypatch, chunk):
    """Many requests through a pool of 10 blocks: shared prefixes, parked readers,
    cancellations, preemptions (with a prefill chunk of 8, also of prompts still
    being prefilled). Every finished stream equals its solo run, and afterwards no
    block is held and every block is either free or cached."""
    monkeypatch.setenv("AMLX_SHARDS", "1")
    if chunk:
        monkeypatch.setenv("AMLX_PREFILL_CHUNK", chunk)
    rng = np.random.default_rng(5)
    system = _ids(80, 20)
    specs = []
    for k in range(12):
        body_len = int(rng.integers(1, 20))
        prompt = (system if k % 2 else []) + _ids(90 + k, body_len)
        specs.append((prompt, int(rng.integers(5, 40)), k % 4 == 3, k % 5 == 4))  # prompt, n, slow, cancel

    async def body():
        async with await amlx.load(ckpt("qwen3"), prefix_cache=False) as off:
            solo = [(await _complete(off, p, n))[0] for p, n, _, _ in specs]
            per_block = _block_bytes(off)
        for _ in range(3):  # (whether rows outgrow the pool depends on timing: again until one did)
            if await busy(per_block, solo):
                return
        raise AssertionError("no preemption in three runs of the busy pool")

    async def busy(per_block, solo) -> bool:
        """One run: every stream and the pool's books checked; whether a row was preempted."""
        async with await amlx.load(ckpt("qwen3"), kv_cache_memory=10 * per_block) as m:
            got: dict = {}

            async def one(k):
                prompt, n, slow, cancel = specs[k]
                out = []
                async with m.generate(prompt, max_tokens=n, max_buffer=1 if slow else 16) as stream:
                    async for t in stream:
                        out.append(t.id)
                        if slow:
                            await anyio.sleep(0.01)
                        if cancel and len(out) == 3:
                            break
                got[k] = out

            async with anyio.create_task_group() as tg:
                for k in range(len(specs)):
                    tg.start_soon(one, k)
            for k, (_, n, _, cancel) in enumerate(specs):
                assert got[k] == (solo[k][:3] if cancel and len(solo[k]) > 3 else solo[k]), k
            with anyio.fail_after(10):
                while m.stats()["active_requests"]:
                    await anyio.sleep(0.001)
            pool = m.engine.scheduler.shards[0].kv.pool
            counts = m.stats()["kv_cache"]
            assert pool.used() == 0 and counts["blocks_used"] == 0
            assert counts["blocks_free"] + counts["blocks_cached"] == counts["blocks_allocated"]
            assert pool.free + pool.prefix.idle == pool.capacity - 1
            return counts["preemptions"] > 0

    _run(body)


def test_a_prompt_being_prefilled_is_preempted_for_a_running_row(ckpt, monkeypatch):
    """A lone running row needs a block while a long prompt, prefilled in small
    chunks, holds the rest of the pool: the prompt gives its blocks back (the full
    ones it wrote stay cached) and waits; both streams are their solo runs, and
    the prompt reuses what it had written."""
    monkeypatch.setenv("AMLX_SHARDS", "1")
    monkeypatch.setenv("AMLX_PREFILL_CHUNK", "4")
    a, b = _ids(110, 12), _ids(111, 90)

    async def body():
        async with await amlx.load(ckpt("qwen3"), prefix_cache=False) as off:
            solo_a, solo_b = (await _complete(off, a, 100))[0], (await _complete(off, b, 8))[0]
            per_block = _block_bytes(off)
        async with await amlx.load(ckpt("qwen3"), kv_cache_memory=8 * per_block) as m:
            got: dict = {}
            started = anyio.Event()

            async def run_a():
                out = []
                # (two tokens unread pause it: it holds its first block alone until the prompt
                # has been taken in, however late the other task submits it; taken in only once
                # the running row held two blocks, the prompt waited instead of being preempted)
                async for t in m.generate(a, max_tokens=100, max_buffer=2):
                    out.append(t.id)
                    if len(out) == 2:
                        started.set()
                        with anyio.fail_after(30):
                            while m.stats()["kv_cache"]["blocks_used"] < 2:  # the prompt holds blocks
                                await anyio.sleep(0.001)
                got["a"] = out

            async def run_b():
                await started.wait()
                got["b"] = await m.complete(b, max_tokens=8)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_a)
                tg.start_soon(run_b)
            assert got["a"] == solo_a and got["b"].token_ids == solo_b
            assert m.stats()["kv_cache"]["preemptions"] >= 1
            assert got["b"].usage.cached_tokens > 0  # its own blocks, written before it was preempted

    _run(body)


def test_windowed_layers_switch_to_their_narrow_tables_mid_stream(tmp_path):
    """Gemma 3 with a window of 40: a short prompt decodes with full-width tables
    for every layer, then, once a row's span outgrows the window's blocks, the
    windowed layers read narrower tables of their own (the compiled step takes
    both forms); the tokens are transformers' greedy ones throughout."""
    from tests.helpers.checkpoints import load_reference, reference_greedy

    path = make_checkpoint(tmp_path / "g", "gemma3_text", seed=2, sliding_window=40)
    prompts = [_ids(120, 10), _ids(121, 30)]
    ref = load_reference(path)
    want = [reference_greedy(ref, p, 90) for p in prompts]

    async def body():
        async with await amlx.load(path) as m:
            assert m.engine.scheduler.shards[0].kv.window == 40
            got = [(await _complete(m, p, 90))[0] for p in prompts]
            both: dict = {}

            async def one(k):
                both[k] = (await _complete(m, prompts[k], 90))[0]

            async with anyio.create_task_group() as tg:
                for k in range(2):
                    tg.start_soon(one, k)
            return got, [both[0], both[1]]

    got, batched = _run(body)
    for k in range(2):
        n = len(got[k])
        assert got[k] == want[k][:n] and batched[k] == got[k]


@pytest.mark.parametrize("arch", ["gemma3_text", "gemma3"])
def test_windowed_layers_keep_only_the_blocks_inside_their_window(tmp_path, arch):
    """Gemma 3 with a window of 16 (one block): a row of 100 prompt tokens and 80
    generated holds every block in the full-attention layers' pool but at most
    three in the windowed layers' own pool once it decodes (the others went back
    as it advanced); its tokens are transformers' greedy ones. A follow-up turn
    behind the whole first turn reuses it from the cache (the windowed layers'
    blocks it needs were cached before they went back) with the tokens of a run
    without the cache."""
    from tests.helpers.checkpoints import load_reference, reference_greedy

    path = make_checkpoint(tmp_path / arch, arch, seed=3, sliding_window=16)
    prompt, n = _ids(140, 100), 80
    want = reference_greedy(load_reference(path), prompt, n)

    async def body():
        async with await amlx.load(path) as m:
            kv = m.engine.scheduler.shards[0].kv
            assert kv.local is not None and kv.window == 16
            got, seen = [], []
            async for t in m.generate(prompt, max_tokens=n):
                got.append(t.id)
                seen.append(dict(m.stats()["kv_cache"]))
            # (the first readings may come before the first decode step gave the prompt's blocks back)
            late = seen[5:]
            assert max(s["window_blocks_used"] for s in late) <= 3
            assert max(s["blocks_used"] for s in late) >= (100 + 60) // BS
            follow = prompt + got + _ids(141, 5)
            again = await m.complete(follow, max_tokens=12)
        async with await amlx.load(path, prefix_cache=False) as off:
            plain = await off.complete(follow, max_tokens=12)
        return got, again, plain

    got, again, plain = _run(body)
    assert got == want[:len(got)] and len(got) == n
    assert again.token_ids == plain.token_ids
    assert again.usage.cached_tokens == (100 + n - 1) // BS * BS  # every full block of the first turn


def test_prefix_hits_count_once_for_a_request_that_waits_a_round(ckpt, monkeypatch):
    """Four prompts arrive in one round: two fresh ones are prefilled together, the two
    behind a cached prefix (another start position) wait for the next round's pass. Their
    lookup is counted once, when they start: hits are the blocks reused (2 + 2), misses
    the fresh prompts' full blocks (1 + 1). (Each waiting request's lookup was counted
    again every round it was placed and put back: 8 hits, 3 misses.)"""
    import threading

    monkeypatch.setenv("AMLX_SHARDS", "1")
    base = _ids(150, 40)
    prompts = [_ids(151, 20), base[:32] + _ids(152, 5), _ids(153, 21), base[:33] + _ids(154, 4)]

    async def body():
        async with await amlx.load(ckpt("qwen3")) as m:
            await _complete(m, base, 2)
            before = dict(m.stats()["kv_cache"])
            gate = threading.Event()
            m.engine.submit_job(gate.wait)  # (the worker waits: all four arrive before its next round)
            streams = [m.generate(p, max_tokens=3) for p in prompts]
            gate.set()
            for st in streams:
                assert len([t async for t in st]) == 3
            after = m.stats()["kv_cache"]
            assert after["prefix_hits"] - before["prefix_hits"] == 4
            assert after["prefix_misses"] - before["prefix_misses"] == 2

    _run(body)


def test_a_quantized_model_s_extend_pass_takes_the_prefill_s_products(ckpt, tmp_path, monkeypatch):
    """A 4-bit model on the CPU with the extend pass on (AMLX_EXTEND_PASS=1; the CPU's default
    is off): a prompt behind a cached prefix is prefilled as without the cache. The extend
    pass has per-row positions, so CausalLM counted it as a decode pass, whose products round
    activations to int8 (cpu_matmul.decode_pass): the prompt's rows were int8-rounded and the
    first token's log-probability came 0.05 off. Found by tests/test_engine_stateful_variants.py
    (its quantized-model machine)."""
    from amlx.engine import scheduler

    used = []
    real = scheduler.Scheduler._extend_pass
    monkeypatch.setattr(scheduler.Scheduler, "_extend_pass", lambda self, *a: used.append(1) or real(self, *a))
    monkeypatch.setenv("AMLX_EXTEND_PASS", "1")
    path = amlx.convert(ckpt("qwen3"), tmp_path / "q4", quantize=4, group_size=32, progress=False)
    base = _ids(1, 40)
    prompts = [base + _ids(2, 9), base + _ids(3, 3), base[:33] + _ids(4, 12)]

    async def body():
        async with await amlx.load(path, prefix_cache=False) as off, await amlx.load(path) as on:
            await on.complete(base, max_tokens=1)
            for p in prompts:
                want = await off.complete(p, max_tokens=6, logprobs=True)
                got = await on.complete(p, max_tokens=6, logprobs=True)
                assert got.usage.cached_tokens == 2 * BS
                assert got.token_ids == want.token_ids
                np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)

    _run(body)
    assert used  # (the extend pass ran)
