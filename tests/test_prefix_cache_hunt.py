"""A bug hunt on the paged KV cache and automatic prefix caching: one engine per
hypothesis example (tiny random Qwen3, or Gemma 3 with its windowed layers' own pool;
Qwen3 also with `kv_bits=8`), driven through the public API by waves of concurrent
requests whose prompts share prefixes in the ways that matter to the block chain:

- a fresh prompt of a length on, just before or just after a block boundary;
- the same prompt again (alone or concurrently, with other sampling);
- an earlier prompt plus its output plus 0, 1 or a few tokens (a chat's next turn);
- an earlier prompt (or prompt + output) cut at a block boundary, one token before or
  one after it, then a new tail;

with greedy and seeded sampling, slow readers (parked rows keeping their blocks),
cancellation during prefill (prompts prefilled in chunks of 8) and mid-decode, a small
pool (rows preempted, cached prefixes evicted) or a large one, one shard or two (rows
copied between them), chained or drained leaves, the compiled extend pass and padded
batches on or off, and the weights changed between waves (the prefix cache must forget
them).

Checked:
- every request that ran to its end equals the same request run alone on a fresh engine
  (no prefix cache, one request at a time, the same weights): its tokens exactly, its
  log-probabilities within 1e-5 (what tests/test_engine_stateful.py holds them to); a
  cancelled one is a prefix of it. With kv_bits=8 a last-bit difference can move a stored
  value a quantization level (README, docs/architecture.md "Quantized KV"): there,
  log-probabilities within 0.02 up to the first different token, and a greedy request's
  tokens equal up to a near-tie;
- on every call into a pool (`allocate`, `hold`, `release`, clearing, growing): no
  reference count below zero, the null block never held, and every block exactly one of
  held, free or cached-and-idle, the prefix index's two maps each other's inverse;
- after each wave, with the engine idle: no block held, every block free or cached (the
  counters `stats()` reports agree), no finished request holding a block;
- `usage.cached_tokens` (the stream's `cached_tokens`) never claims more than any earlier
  request of the same weights could have left in the cache (its prompt and at most its
  solo output), never anything across a weights change; with one shard and a pool large
  enough that nothing is evicted, at least what the finished requests left there; the
  pools' hit and miss counters move by exactly what the requests report when no request
  was cancelled or preempted;
- after close: the pools hold no arrays and MLX active memory is back to where it was
  before the load.

A host-side walk of the scheduler's calls into one shard's pools (no engine: thousands of
rounds a second) goes where the engine rarely gets: the windowed layers' pool must never
need more blocks than the full one, whose room alone admission and preemption count
(`test_the_windowed_layers_pool_never_needs_more_blocks_than_the_full_one`, a bug it found).

The pools' private books (`_refs`, `_free`, the prefix index's maps) are read here: this
test belongs with amlx/kv/. AMLX_HUNT_EXAMPLES sets the examples per configuration (a
longer hunt), AMLX_HUNT_REPORT=1 prints what they reached (preemptions, cache hits,
evictions, cancellations in prefill, rows moved between shards), AMLX_KV_BLOCK_SIZE runs
the hunt with another block size.
"""

from __future__ import annotations

import functools
import gc
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import amlx
from amlx._mlx import float32
from amlx.kv import DEFAULT_BLOCK_SIZE, BlockPool, PoolFull, ShardKV, preemption_order
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.environment import environ

BS = int(os.environ.get("AMLX_KV_BLOCK_SIZE") or DEFAULT_BLOCK_SIZE)  # (a hunt may run with other sizes)
SMALL_POOL = 8  # blocks per shard: rows are preempted and prefixes evicted
LARGE_POOL = 256  # blocks per shard (grown to it at load): nothing is evicted in an example
GUARD = 60.0  # seconds: only a guard against a hang, never a timing
LENGTHS = [3, BS - 1, BS, BS + 1, 2 * BS - 1, 2 * BS, 2 * BS + 1, 3 * BS + 5, 4 * BS + 12]
SAMPLING = {"greedy": {}, "seeded": {"temperature": 0.8, "seed": 3}, "seeded2": {"temperature": 1.1, "seed": 9,
                                                                                "top_k": 20}}
KV_LOGPROB_TOL = 0.02  # kv_bits=8 on the test's Qwen3 (tests/test_engine_stateful_variants.py, LOGPROB_TOL)
KV_TIE = 0.5  # a near-tie there (that file's TIE for 8 bits)


# ----------------------------------------------------------------------------- the pools' books

_VIOLATIONS: list[str] = []
# what the examples reached (printed with AMLX_HUNT_REPORT=1: is the hunt reaching the scenes it means to?)
_TALLY: Counter = Counter()


def _check_books(pool: BlockPool, where: str) -> None:
    """The allocator's invariants, recorded (not raised: this runs on the worker, where an
    exception would become a failed request and hide what went wrong)."""
    if not pool.capacity:
        return
    refs, free = pool._refs, pool._free
    idle = set(pool.prefix._idle) if pool.prefix is not None else set()
    cached = set(pool.prefix._key_of) if pool.prefix is not None else set()
    problems = []
    if len(refs) != pool.capacity:
        problems.append(f"{len(refs)} reference counts for {pool.capacity} blocks")
    if min(refs) < 0:
        problems.append(f"negative reference counts at {[b for b, r in enumerate(refs) if r < 0]}")
    if refs[0] != 0 or 0 in free or 0 in cached:
        problems.append(f"the null block handed out: refs {refs[0]}, free {0 in free}, cached {0 in cached}")
    if len(set(free)) != len(free):
        problems.append(f"a block twice on the free list: {sorted(free)}")
    held = {b for b in range(1, len(refs)) if refs[b] > 0}
    if held & set(free) or held & idle or idle & set(free):
        problems.append(f"a block in two states: held&free {held & set(free)}, held&idle {held & idle}, "
                        f"idle&free {idle & set(free)}")
    if held | set(free) | idle != set(range(1, pool.capacity)):
        problems.append(f"blocks lost: {set(range(1, pool.capacity)) - held - set(free) - idle}")
    if not idle <= cached or cached & set(free):
        problems.append(f"idle blocks not cached {idle - cached}, free blocks cached {cached & set(free)}")
    if pool.prefix is not None:
        if {b: k for k, b in pool.prefix._block_of.items()} != pool.prefix._key_of:
            problems.append("the prefix index's maps disagree")
    if problems:
        _VIOLATIONS.append(f"after {where}: " + "; ".join(problems))


@pytest.fixture(scope="module")
def books():
    """Every BlockPool call that changes the books is followed by `_check_books`; rows copied
    between shards and placements undone are counted (AMLX_HUNT_REPORT)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("allocate", "hold", "release", "claim", "clear_prefix", "grow_to"):
            real = getattr(BlockPool, name)

            def checked(self, *args, _real=real, _name=name, **kwargs):
                out = _real(self, *args, **kwargs)
                _check_books(self, _name)
                return out

            mp.setattr(BlockPool, name, functools.wraps(real)(checked))
        for name in ("copy_in", "unreserve"):  # (counted only: rows moved between shards, placements undone)
            real = getattr(ShardKV, name)

            def counted(self, *args, _real=real, _name=name, **kwargs):
                _TALLY[_name] += 1
                return _real(self, *args, **kwargs)

            mp.setattr(ShardKV, name, functools.wraps(real)(counted))
        _VIOLATIONS.clear()
        yield _VIOLATIONS


# ----------------------------------------------------------------------------- reference runs


def _scale_o_proj(lm, original):
    """Weights version 1: one layer's attention output projection scaled by 1.5 (version 0:
    `original` put back)."""
    from amlx._mlx import ops

    name = next(n for n, _ in lm.named_parameters() if n.endswith("self_attn.o_proj.weight"))
    if original is None:
        original = dict(lm.named_parameters())[name]
        new = ops.multiply(original, 1.5)
        ops.eval(new)
        lm.update({name: new})
    else:
        lm.update({name: original})
    return original


class _World:
    """The checkpoints, and reference engines (no prefix cache, one request at a time) per
    (arch, kv_bits, weights version), with their solo runs cached."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="amlx-hunt-"))
        self.paths: dict[str, Path] = {}
        self.refs: dict[tuple, amlx.Model] = {}
        self.solos: dict[tuple, amlx.Completion] = {}
        self.block_bytes: dict[tuple, int] = {}

    def path(self, arch: str, bits: int | None) -> Path:
        """The checkpoint (with kv_bits: a head dimension of 64, which quantization groups need)."""
        name = f"{arch}-{bits}" if bits else arch
        if name not in self.paths:
            extra = {"head_dim": 64} if bits else {}
            self.paths[name] = make_checkpoint(self.root / name, arch, seed=0, **extra)
        return self.paths[name]

    def ref(self, arch: str, bits: int | None, version: int) -> amlx.Model:
        key = (arch, bits, version)
        if key not in self.refs:
            m = amlx.load_sync(self.path(arch, bits), prefix_cache=False, max_batch_size=1, kv_bits=bits)
            if version:
                m.engine.run_sync(lambda: _scale_o_proj(m.engine.model, None))
                m.engine.weights_changed()
            self.refs[key] = m
            self.block_bytes[(arch, bits)] = m.engine.scheduler.block_bytes()
        return self.refs[key]

    def solo(self, arch: str, bits: int | None, version: int, prompt: list[int], options: dict) -> amlx.Completion:
        key = (arch, bits, version, tuple(prompt), tuple(sorted(options.items())))
        if key not in self.solos:
            self.solos[key] = self.ref(arch, bits, version).complete_sync(prompt, logprobs=True, top_logprobs=3,
                                                                           **options)
        return self.solos[key]

    def wait_idle(self) -> None:
        """Until no reference engine holds a request (a finished one leaves on the worker's
        next round, and its arrays with it: MLX memory is measured after)."""
        async def idle():
            for m in self.refs.values():
                await _idle(m)

        anyio.run(idle)

    def close(self) -> None:
        for m in self.refs.values():
            m.close()
        shutil.rmtree(self.root, True)


@pytest.fixture(scope="module")
def world():
    w = _World()
    yield w
    w.close()


# ----------------------------------------------------------------------------- one example


@dataclass
class Req:
    prompt: list[int]
    sampling: str
    max_tokens: int
    cancel: str | None  # None, "prefill" or "decode"
    slow: bool  # read with max_buffer=1 and a pause per token: parked (keeping its blocks) meanwhile
    wave: int
    epoch: int  # weights changes before it (the prefix cache is emptied at each)
    version: int  # the weights it ran on (0 or 1)
    tokens: list = field(default_factory=list)
    finished: bool = False
    cached: int = 0
    request: object = None  # the engine's Request (test-visible: its blocks)

    @property
    def options(self) -> dict:
        return {"max_tokens": self.max_tokens, **SAMPLING[self.sampling]}

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]


def _fresh(rng: np.random.Generator, n: int) -> list[int]:
    return [int(x) for x in rng.integers(10, 200, n)]


def _draw_prompt(data, rng, history: list[Req]) -> list[int]:
    """A prompt related to an earlier request's in one of the ways the block chain cares about."""
    kinds = ["fresh"] + (["same", "extend", "cut"] if history else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "fresh":
        return _fresh(rng, data.draw(st.sampled_from(LENGTHS), label="length"))
    base = history[data.draw(st.integers(0, len(history) - 1), label="base")]
    if kind == "same":
        return list(base.prompt)
    if kind == "extend":  # a chat's next turn: prompt, reply, a few new tokens
        return base.prompt + base.ids + _fresh(rng, data.draw(st.sampled_from([0, 1, 4]), label="extra"))
    seq = base.prompt + (base.ids if data.draw(st.booleans(), label="with output") else [])
    blocks = data.draw(st.integers(1, 4), label="blocks")
    cut = max(1, min(len(seq), blocks * BS + data.draw(st.sampled_from([-1, 0, 1]), label="delta")))
    return seq[:cut] + _fresh(rng, data.draw(st.sampled_from([0, 1, 5, BS]), label="tail"))


async def _consume(m: amlx.Model, req: Req) -> None:
    stream = m.generate(req.prompt, logprobs=True, top_logprobs=3, max_buffer=1 if req.slow else 16, **req.options)
    req.request = stream._stream.request  # (as tests/test_engine_stateful.py reaches it)
    try:
        if req.cancel == "prefill":  # (a prompt prefilled in chunks: usually still in prefill)
            await anyio.sleep(0.0005)
            return
        async for tok in stream:
            req.tokens.append(tok)
            if req.slow:
                await anyio.sleep(0.003)
            if req.cancel == "decode" and len(req.tokens) == 2:
                return
        req.finished = True
    finally:
        await stream.aclose()
        req.cached = stream.cached_tokens


def _matched_blocks(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return (int(diff[0]) if len(diff) else n) // BS


def _reusable_blocks(prompt: list[int]) -> int:
    return (len(prompt) - 1) // BS  # (at least one token is always computed)


async def _idle(m: amlx.Model) -> None:
    """Until the scheduler holds no request (asked on the worker, between rounds)."""
    sched = m.engine.scheduler
    with anyio.fail_after(GUARD):
        while await m.engine.run(lambda: any(sched.counts().values())):
            await anyio.sleep(0.002)


def _pools(m: amlx.Model) -> list[BlockPool]:
    return [p for shard in m.engine.scheduler.shards for p in (shard.kv.pool, shard.kv.local) if p is not None]


def _check_idle_books(m: amlx.Model, reqs: list[Req], log: str) -> None:
    kv = m.stats()["kv_cache"]
    assert kv["blocks_used"] == 0, (kv, log)
    assert kv["blocks_free"] + kv["blocks_cached"] == kv["blocks_allocated"], (kv, log)
    for pool in _pools(m):
        if pool.capacity:
            assert pool.used() == 0 and pool.free + pool.prefix.idle == pool.capacity - 1, (kv, log)
    for r in reqs:
        assert r.request.blocks == [] and r.request.local == [], (r, log)


def _run_example(world: _World, data, arch: str, bits: int | None) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    large = data.draw(st.booleans(), label="large pool")
    env = {"AMLX_SHARDS": data.draw(st.sampled_from(["1", "1", "2"]), label="shards"),
           "AMLX_PREFILL_CHUNK": data.draw(st.sampled_from([None, "8"]), label="chunk"),
           "AMLX_CHAIN_CHANGES": data.draw(st.sampled_from(["0", "1"]), label="chain"),
           # (the GPU's defaults: a cached prompt's prefill as the compiled extend pass, decode
           # batches padded with rows writing the null block)
           "AMLX_EXTEND_PASS": data.draw(st.sampled_from(["0", "1"]), label="extend"),
           "AMLX_PAD_BATCHES": data.draw(st.sampled_from(["0", "1"]), label="pad")}
    shards = int(env["AMLX_SHARDS"])
    blocks = LARGE_POOL if large else SMALL_POOL
    world.ref(arch, bits, 0)
    per_block = world.block_bytes[(arch, bits)]
    log = [f"{arch} bits={bits} blocks={blocks} {env}"]

    reqs: list[Req] = []
    version = epoch = 0
    original = None
    world.wait_idle()
    gc.collect()
    before = amlx.memory()["active"]
    with environ(env):
        m = amlx.load_sync(world.path(arch, bits), kv_cache_memory=blocks * shards * per_block, kv_bits=bits,
                           max_batch_size=4)
    try:
        room = m.engine.scheduler.pool_tokens()  # what one request can hold (its shard's whole pool)
        assert room // BS >= blocks
        if large:
            # The cache lives in the room the arrays have: a pool evicts idle cached blocks before
            # it grows (BlockPool.allocate). Grown to its ceiling up front, a large pool evicts
            # nothing in an example, so every prefix a finished request left must be found.
            m.engine.run_sync(lambda: [p.grow_to(p.max_blocks) for p in _pools(m)])
        for wave in range(data.draw(st.integers(2, 4), label="waves")):
            if reqs and data.draw(st.integers(0, 4), label="change weights") == 0:
                original = m.engine.run_sync(lambda: _scale_o_proj(m.engine.model, original if version else None))
                m.engine.weights_changed()
                version, epoch = 1 - version, epoch + 1
                log.append(f"weights -> version {version}")
            wave_reqs = []
            history = [r for r in reqs if r.tokens or r.finished]
            # a wave under pressure: several rows that outgrow a small pool as they decode (the
            # youngest preempted, recomputed behind what it left in the cache)
            pressure = data.draw(st.booleans(), label="pressure")
            for _ in range(data.draw(st.integers(3 if pressure else 1, 4), label="requests")):
                prompt = _draw_prompt(data, rng, history)
                if pressure:
                    prompt, max_tokens = prompt[:2 * BS + 1], 60
                else:
                    max_tokens = data.draw(st.sampled_from([1, 5, 12, 30, 60]), label="max_tokens")
                prompt = prompt[:max(1, room - max_tokens)]  # (the pool must hold it whole)
                cancel = data.draw(st.sampled_from([None, None, None, "prefill", "decode"]), label="cancel")
                sampling = data.draw(st.sampled_from(list(SAMPLING)), label="sampling")
                slow = data.draw(st.sampled_from([False, False, True]), label="slow")
                wave_reqs.append(Req(prompt, sampling, max_tokens, cancel, slow, wave, epoch, version))
            log.append(f"wave {wave}: " + "; ".join(f"{len(r.prompt)} tokens {r.sampling} n={r.max_tokens} "
                                                     f"cancel={r.cancel} slow={r.slow}" for r in wave_reqs))
            kv0 = m.stats()["kv_cache"]

            async def wave_body():
                with anyio.fail_after(GUARD):
                    async with anyio.create_task_group() as tg:
                        for r in wave_reqs:
                            tg.start_soon(_consume, m, r)
                await _idle(m)

            anyio.run(wave_body)
            reqs += wave_reqs
            kv1 = m.stats()["kv_cache"]
            _TALLY.update(requests=len(wave_reqs), hit=sum(r.cached > 0 for r in wave_reqs),
                          preempted=kv1["preemptions"] - kv0["preemptions"],
                          cancelled_in_prefill=sum(r.cancel == "prefill" and r.request.prefilled > 0
                                                   for r in wave_reqs),
                          evictions=max(0, kv0["blocks_cached"] + sum(len(r.prompt) // BS for r in wave_reqs)
                                        - kv1["blocks_cached"]) if not large else 0)
            log.append("  got " + "; ".join(f"{len(r.tokens)} tokens, cached {r.cached}" for r in wave_reqs))
            text = "\n".join(log)
            assert not _VIOLATIONS, _VIOLATIONS[:5] + [text]
            _check_idle_books(m, wave_reqs, text)
            if kv1["preemptions"] == kv0["preemptions"] and not any(r.cancel for r in wave_reqs):
                # every request placed once: the counters move by what the requests report
                hits = sum(r.cached // BS for r in wave_reqs)
                looked = sum(_reusable_blocks(r.prompt) for r in wave_reqs)
                assert kv1["prefix_hits"] - kv0["prefix_hits"] == hits, (kv0, kv1, text)
                assert kv1["prefix_misses"] - kv0["prefix_misses"] == looked - hits, (kv0, kv1, text)
            if large and shards == 1:
                # nothing was evicted: what earlier requests of these weights left is found
                for r in wave_reqs:
                    if r.cancel == "prefill" and not r.tokens:
                        continue  # (cancelled before it was placed, maybe: it reports nothing)
                    left = [p.prompt + p.ids[:-1] for p in reqs if p.epoch == r.epoch and p.wave < r.wave
                            and p.tokens]
                    floor = max([min(_matched_blocks(r.prompt, s), _reusable_blocks(r.prompt)) for s in left],
                                default=0)
                    assert r.cached >= floor * BS, f"{r.prompt}: cached {r.cached}, at least {floor} blocks\n{text}"
        m.close()
        original = None  # (version 0's weight, held here while version 1 ran)
        for pool in _pools(m):
            assert pool.capacity == 0 and pool.arrays == [] and pool.used() == 0
        gc.collect()
        assert amlx.memory()["active"] == before, "\n".join(log)
    finally:
        m.close()

    text = "\n".join(log)
    for r in reqs:
        solo = world.solo(arch, bits, r.version, r.prompt, r.options)
        where = f"{r.prompt} {r.options} cancel={r.cancel} wave {r.wave}: got {r.ids}, solo {solo.token_ids}\n{text}"
        if r.finished:
            assert len(r.ids) == len(solo.token_ids), where
        _check_tokens(r, solo, bits, where)
        # what the cache could hold: prompts and (at most) solo outputs of requests of the
        # same weights epoch up to this wave (a concurrent one's too), never another epoch's
        ceiling = 0
        for p in reqs:
            if p is not r and p.epoch == r.epoch and p.wave <= r.wave:
                seq = p.prompt + world.solo(arch, bits, p.version, p.prompt, p.options).token_ids
                ceiling = max(ceiling, min(_matched_blocks(r.prompt, seq), _reusable_blocks(r.prompt)))
        assert r.cached % BS == 0 and r.cached <= ceiling * BS, (r.cached, ceiling, where)


def _check_tokens(r: Req, solo: amlx.Completion, bits: int | None, where: str) -> None:
    ids = r.ids
    got_lp = [t.logprob for t in r.tokens]
    if bits is None:
        assert ids == solo.token_ids[:len(ids)], where
        np.testing.assert_allclose(got_lp, solo.logprobs[:len(ids)], rtol=1e-5, atol=1e-5, err_msg=where)
        return
    # a quantized pool: equal up to a near-tie, log-probabilities close up to there
    n = next((i for i, (a, b) in enumerate(zip(ids, solo.token_ids)) if a != b), min(len(ids), len(solo.token_ids)))
    np.testing.assert_allclose(got_lp[:n], solo.logprobs[:n], atol=KV_LOGPROB_TOL, err_msg=where)
    if n < min(len(ids), len(solo.token_ids)) and r.sampling == "greedy":
        # (a seeded draw may part anywhere the noise moves its token's interval past the draw)
        tops = dict(solo.top_logprobs[n])
        assert ids[n] in tops and tops[solo.token_ids[n]] - tops[ids[n]] <= KV_TIE, (n, tops, where)


# (no shrinking: each example's log says what it ran, and shrinking an engine run takes minutes)
SETTINGS = settings(max_examples=int(os.environ.get("AMLX_HUNT_EXAMPLES", "8")), deadline=None, derandomize=True,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


@pytest.mark.parametrize("arch,bits", [("qwen3", None), ("gemma3_text", None), ("qwen3", 8)])
def test_prefix_cache_hunt(world, books, arch, bits):
    @SETTINGS
    @given(data=st.data())
    def run(data):
        _run_example(world, data, arch, bits)

    run()
    if os.environ.get("AMLX_HUNT_REPORT"):
        print("REPORT", arch, bits, dict(_TALLY))
    _TALLY.clear()


# ----------------------------------------------------------------------------- regressions


class _Row:
    """A row of the host-side walk: what the scheduler's Request carries for the pools."""

    def __init__(self, ids: list[int], created: int):
        self.ids, self.created = list(ids), created
        self.blocks: list[int] = []
        self.local: list[int] = []
        self.pos = 0


def _walk(seed: int, ceiling: int, steps: int = 300) -> None:
    """The scheduler's calls into one shard's pools, host side, for a model with windowed
    layers in a pool of their own (a window of 8, as the tests' Gemma 3): prompts from three
    shared prefixes admitted (`reserve` with a block of headroom while rows run) and
    prefilled in one pass (`prefill_tables`, `cache_filled`), some parked, rows ended
    (`release` with their tokens), and decode rounds: the youngest row holding blocks
    preempted while the full pool is short (`_preempt_for_blocks`), rows about to give a
    local block back cached first (`cache_decoded`), then `extend`."""
    rnd = random.Random(seed)
    pool = BlockPool([(1, 32)], float32, 16, ceiling)
    local = BlockPool([(1, 32)], float32, 16, ceiling)
    kv = ShardKV(pool, 1, window=8, local=local, layer_local=[False, True])
    prefixes = [[rnd.randrange(10, 200) for _ in range(48)] for _ in range(3)]
    rows: list[_Row] = []
    parked: list[_Row] = []
    for step in range(steps):
        act = rnd.random()
        where = f"seed {seed}, ceiling {ceiling}, step {step}"
        try:
            if act < 0.3 and len(rows) < 6:
                ids = rnd.choice(prefixes)[:rnd.choice([1, 8, 16, 17, 20, 33, 40])]
                ids += [rnd.randrange(10, 200) for _ in range(rnd.choice([0, 1, 3]))]
                row = _Row(ids, step)
                cached = kv.reserve(row, ids, 1 if rows else 0)
                if cached is None:
                    continue
                kv.prefill_tables([row], cached, len(ids) - cached, [len(ids)])
                row.pos = len(ids)
                kv.cache_filled(row, ids, row.pos)
                rows.append(row)
                if rnd.random() < 0.4:
                    parked.append(row)
            elif act < 0.45 and rows:
                row = rnd.choice(rows)
                rows.remove(row)
                if row in parked:
                    parked.remove(row)
                kv.release(row, row.ids)
            else:
                running = [r for r in rows if r not in parked]
                while kv.short_of_blocks(running) > pool.available():
                    held = preemption_order(running)[:-1] + parked
                    if not held:
                        break
                    victim = preemption_order(held)[0]
                    for group in (rows, parked, running):
                        if victim in group:
                            group.remove(victim)
                    kv.release(victim, victim.ids)
                if kv.short_of_blocks(running) > pool.available():
                    continue
                for r in running:
                    if kv.sheds(r):
                        kv.cache_filled(r, r.ids, min(r.pos, len(r.ids)))
                kv.extend(running)
                for r in running:
                    r.ids.append(rnd.randrange(10, 200))
                    r.pos += 1
        except PoolFull as exc:
            raise AssertionError(f"{where}: {exc} (full pool {pool.used()} held, windowed pool "
                                 f"{local.used()}; rows {[(len(r.blocks), r.local, r.pos) for r in rows]})") from None
        assert not _VIOLATIONS, (where, _VIOLATIONS[:3])
    kv.close()


def test_the_windowed_layers_pool_never_needs_more_blocks_than_the_full_one(books):
    """A prompt whose full block was cached while another local block was cached under its
    key (its full block evicted first, the local one not) left the two pools' caches out of
    pairs: a later prompt took this prompt's full block and that other local block, so the
    local pool held more blocks than the full pool, whose room alone admission and
    preemption count, and a decode round's `extend` raised PoolFull (which would have ended
    every request of the engine). Seeds 276 (a pool of 8 blocks) and 57 (7) reached it;
    `ShardKV.cache_filled` now caches a row's local block with its full block."""
    for seed, ceiling in [(276, 8), (57, 7)] + [(s, c) for s in range(12) for c in (6, 8)]:
        _walk(seed, ceiling)
