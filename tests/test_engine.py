"""The engine through the public API: concurrency, cancellation, backpressure,
failure isolation, event-loop responsiveness, closing and option checks.

Every behaviour test is an `async def _..._body(...)` written with anyio
primitives only and run by a plain test function through `anyio.run` on the
backend named by the `backend` fixture: "asyncio" here;
tests/test_engine_trio.py imports the same test functions and overrides
`backend` with "trio". (Plain `anyio.run` rather than anyio's pytest plugin,
which pytest-asyncio's auto mode would fight over `async def` tests.)

Checkpoint: a tiny random Qwen3 (tests/helpers/checkpoints.py, hidden 64, 2
layers, byte-level BPE tokenizer of 709 ids) built once per session. Greedy
results are checked against transformers (PyTorch CPU) on the same checkpoint.
The reference cases are chosen so that the comparison can fail and cannot
flake: no EOS on the reference path (an amlx stream must then run to
`max_tokens`; stopping early at a wrong EOS fails the length check) and a gap
of at least 1e-3 between the best and second-best logit at every step (so
float noise between batch sizes cannot flip a greedy token).
"""

from __future__ import annotations

import atexit
import functools
import gc
import math
import random
import shutil
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import numpy as np
import pytest

import amlx
from amlx.engine.request import Request
from amlx.engine.worker import Worker

try:
    from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_greedy, reference_logits
    from tests.helpers.faults import failing_array
except ImportError:  # run from inside tests/
    from helpers.checkpoints import load_reference, make_checkpoint, reference_greedy, reference_logits
    from helpers.faults import failing_array

N_STREAMS = 64
MIN_MARGIN = 1e-3  # smallest top-1/top-2 logit gap accepted on a reference path


# ----------------------------------------------------------------------------- running bodies


@pytest.fixture(scope="module")
def backend() -> str:
    """The event loop the shared bodies run on (test_engine_trio.py overrides it)."""
    return "asyncio"


def run(backend: str, fn, *args):
    """Runs `await fn(*args)` in a fresh event loop of `backend` ("asyncio", "uvloop", "trio")."""
    if backend == "uvloop":
        return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(fn, *args, backend=backend)


# ----------------------------------------------------------------------------- checkpoint and references


@functools.lru_cache(maxsize=None)
def checkpoint_dir() -> Path:
    """One tiny random Qwen3 for the session (both test modules share it)."""
    root = Path(tempfile.mkdtemp(prefix="amlx-engine-"))
    atexit.register(shutil.rmtree, root, True)
    return make_checkpoint(root / "qwen3", "qwen3", seed=0)


@functools.lru_cache(maxsize=None)
def _hf():
    """(transformers model, transformers tokenizer) of the checkpoint."""
    from transformers import AutoTokenizer

    path = checkpoint_dir()
    return load_reference(path), AutoTokenizer.from_pretrained(str(path))


class _torch_threads:
    """One torch thread while computing references: the machine is small and shared,
    and OpenMP's spinning threads make tiny forwards 1000x slower under contention."""

    def __enter__(self):
        import torch

        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.n)


@dataclass
class RefPath:
    ids: list[int]  # greedy tokens after the prompt
    logprobs: list[float]  # log_softmax of the raw logits at each of them
    margin: float  # smallest top-1/top-2 gap along the path


def reference_path(prompt_ids: list[int], n: int) -> RefPath:
    """transformers' greedy continuation (exactly n tokens, EOS not special) with logprobs and margins."""
    ref, _ = _hf()
    with _torch_threads():
        ids = reference_greedy(ref, prompt_ids, n)
        logits = reference_logits(ref, list(prompt_ids) + ids[:-1])[len(prompt_ids) - 1:].astype(np.float64)
    assert logits.shape[0] == n
    assert list(logits.argmax(-1)) == ids  # the cached and the full forward agree
    top2 = np.sort(logits, axis=-1)[:, -2:]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    lps = [float(logits[j, t] - lse[j]) for j, t in enumerate(ids)]
    return RefPath(ids, lps, float((top2[:, 1] - top2[:, 0]).min()))


def eos_ids() -> set[int]:
    _, tok = _hf()
    return {702, 700} | {tok.eos_token_id}


def special_floor() -> int:
    """Ids below this are ordinary BPE pieces."""
    _, tok = _hf()
    return min(tok.all_special_ids)


_WORDS = ("the quick brown fox jumps over a lazy dog while seven bright owls watch from old oak trees "
          "under cold silver moon light and river stones hum quiet songs").split()


@dataclass
class Case:
    """One request of the concurrency test and what it must give."""

    index: int
    prompt: str | list[int]
    prompt_ids: list[int]
    options: dict
    greedy: bool
    expect_ids: list[int] | None = None  # greedy: the exact tokens
    expect_text: str | None = None  # greedy: the exact joined text
    expect_finish: str | None = None
    expect_logprobs: list[float] | None = None
    stop: str | None = None
    extra: dict = field(default_factory=dict)


def _pick_stop(ids: list[int]) -> tuple[str, int, str] | None:
    """A stop string taken from the middle of the greedy text: (stop, tokens until it
    completes, text before it), or None if the text has no ASCII word there."""
    _, tok = _hf()
    text = tok.decode(ids)
    start = len(text) // 3
    for i in range(start, len(text) - 1):
        if text[i].isascii() and text[i].isalpha() and text[i + 1].isascii() and text[i + 1].isalpha():
            stop = text[i:i + 2]
            for k in range(1, len(ids) + 1):
                prefix = tok.decode(ids[:k])
                if stop in prefix:
                    return stop, k, prefix[:prefix.index(stop)]
    return None


@functools.lru_cache(maxsize=None)
def concurrency_cases() -> tuple[Case, ...]:
    """64 requests: token-id and text prompts of 1..40 tokens, max_tokens 4..40,
    max_buffer 1..64, some with stop strings, some with logprobs, 8 seeded sampled ones.
    Greedy ones are kept only if their reference path is EOS-free with a clear margin."""
    _, tok = _hf()
    rng = np.random.default_rng(20240611)
    floor = special_floor()
    eos = eos_ids()
    cases: list[Case] = []
    while len(cases) < N_STREAMS:
        i = len(cases)
        if i % 4 == 2:
            words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(1, 12)))]
            prompt: str | list[int] = " ".join(words)
            prompt_ids = tok.encode(prompt, add_special_tokens=False)
        else:
            prompt_ids = [int(x) for x in rng.integers(0, floor, size=int(rng.integers(1, 41)))]
            prompt = prompt_ids
        n = int(rng.integers(4, 41))
        options = dict(max_tokens=n, max_buffer=int(rng.choice([1, 2, 3, 16, 64])))
        if i % 3 == 0:
            options["logprobs"] = True
        if i % 8 == 7:  # seeded sampling: must equal its solo run whatever it is batched with
            options.update(temperature=float(rng.choice([0.7, 1.0, 1.3])), seed=1000 + i,
                           top_k=int(rng.choice([0, 5, 50])), top_p=float(rng.choice([1.0, 0.9])),
                           min_p=float(rng.choice([0.0, 0.05])),
                           repetition_penalty=float(rng.choice([1.0, 1.2])))
            cases.append(Case(i, prompt, prompt_ids, options, greedy=False))
            continue
        path = reference_path(prompt_ids, n)
        if path.margin < MIN_MARGIN or eos & set(path.ids):
            continue  # could flake on float noise, or would end early: draw another
        case = Case(i, prompt, prompt_ids, options, greedy=True)
        stop = _pick_stop(path.ids) if i % 5 == 1 else None
        if stop is not None:
            case.stop, k, before = stop
            options["stop"] = [case.stop, "never-in-this-text-XYZ"]
            case.expect_ids, case.expect_text, case.expect_finish = path.ids[:k], before, "stop"
            case.expect_logprobs = path.logprobs[:k]
        else:
            case.expect_ids, case.expect_text, case.expect_finish = path.ids, tok.decode(path.ids), "length"
            case.expect_logprobs = path.logprobs
        cases.append(case)
    assert sum(c.stop is not None for c in cases) >= 4
    return tuple(cases)


@functools.lru_cache(maxsize=None)
def greedy_cases(count: int, n: int, seed: int) -> tuple[tuple[list[int], list[int]], ...]:
    """`count` (prompt ids, reference greedy ids of length n) with EOS-free, clear-margin paths
    (cached: treat as read-only)."""
    rng = np.random.default_rng(seed)
    floor, eos = special_floor(), eos_ids()
    out = []
    while len(out) < count:
        prompt = [int(x) for x in rng.integers(0, floor, size=int(rng.integers(2, 24)))]
        path = reference_path(prompt, n)
        if path.margin >= MIN_MARGIN and not eos & set(path.ids):
            out.append((prompt, path.ids))
    return tuple(out)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return checkpoint_dir()


@pytest.fixture(scope="module")
def model(ckpt):
    """The shared model (loaded on the worker thread by load_sync; usable from any event loop)."""
    m = amlx.load_sync(ckpt)
    yield m
    m.close()


@pytest.fixture
def idle(model):
    """Asserts the shared model is left without requests and without a test hook."""
    yield model
    model.engine.scheduler.fault = None
    deadline = time.monotonic() + 10  # finished rows leave the batch on the worker's next round
    while model.stats()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.001)
    assert model.stats()["active_requests"] == 0
    assert model.stats()["waiting_requests"] == 0


def _active_bytes() -> int:
    gc.collect()
    return amlx.memory()["active"]


async def _warm_sampler(model) -> None:
    """Uses the greedy sampling step at every batch size 1..8, with and without logprobs,
    before a memory check: the checks then also cover a process that has decoded
    before. (The compiled sampling and decode steps belong to the engine that traced
    them and are closed with it, so nothing is left to pay per process: see
    test_close_returns_every_byte_from_a_cold_start.)"""
    for logprobs in (False, True):
        for n in range(1, 9):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(functools.partial(model.complete, [11 + i, 12, 13], max_tokens=3,
                                                    logprobs=logprobs))
    # finished rows (and with the last of them the batch's KV cache) go on the worker's next round
    await _wait_until(lambda: model.stats()["active_requests"] == 0, 10)


async def _read_all(stream) -> list:
    return [t async for t in stream]


async def _wait_until(pred, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.001)


# ============================================================================= 1. 64 concurrent streams


async def _concurrency_body(model, cases: tuple[Case, ...]) -> None:
    # Each request alone first (sequentially: the batch holds one row).
    solo = {}
    for c in cases:
        solo[c.index] = await model.complete(c.prompt, **c.options)

    results: dict[int, tuple[list, int]] = {}

    async def client(c: Case) -> None:
        r = random.Random(c.index)
        await anyio.sleep(r.uniform(0, 0.03))  # staggered arrival
        stream = model.generate(c.prompt, **c.options)
        toks = []
        async for t in stream:
            toks.append(t)
            if r.random() < 0.08:  # an occasionally slow consumer (its small buffer fills: paused)
                await anyio.sleep(r.uniform(0, 0.004))
        results[c.index] = (toks, stream.prompt_tokens)

    async with anyio.create_task_group() as tg:
        for c in cases:
            tg.start_soon(client, c)

    assert len(results) == len(cases)
    for c in cases:
        toks, prompt_tokens = results[c.index]
        ids = [t.id for t in toks]
        text = "".join(t.text for t in toks)
        alone = solo[c.index]
        where = f"stream {c.index} options={c.options}"
        assert prompt_tokens == len(c.prompt_ids), where
        assert alone.usage.prompt_tokens == len(c.prompt_ids), where
        # batched == alone (greedy and seeded sampling alike)
        assert ids == alone.token_ids, where
        assert text == alone.text, where
        assert toks[-1].finish_reason == alone.finish_reason, where
        assert all(t.finish_reason is None for t in toks[:-1]), where
        assert len(ids) <= c.options["max_tokens"], where
        if c.options.get("logprobs"):
            assert all(t.logprob is not None and t.logprob <= 1e-6 for t in toks), where
            np.testing.assert_allclose([t.logprob for t in toks], alone.logprobs, atol=1e-4, err_msg=where)
        else:
            assert all(t.logprob is None for t in toks), where
        if not c.greedy:
            continue
        # greedy == transformers
        assert ids == c.expect_ids, where
        assert text == c.expect_text, where
        assert toks[-1].finish_reason == c.expect_finish, where
        if c.stop is not None:
            assert c.stop not in text, where
        else:
            assert len(ids) == c.options["max_tokens"], where  # no early (wrong) EOS
        if c.options.get("logprobs"):
            np.testing.assert_allclose([t.logprob for t in toks], c.expect_logprobs, atol=2e-4, err_msg=where)
    # some rows must actually have run together for this to prove anything
    assert model.stats()["decode_steps"] > 0


def test_64_concurrent_streams_match_solo_and_transformers(backend, idle):
    cases = concurrency_cases()
    run(backend, _concurrency_body, idle, cases)


@pytest.mark.parametrize("shards", [1, 3])
def test_sharded_batch_matches_solo_and_transformers(backend, ckpt, monkeypatch, shards):
    """On the CPU the running batch is split into shards, each decoding on its own
    MLX stream (one per core by default). With one shard and with three (rows
    spread over them, moved between them as requests finish) every stream is
    still its solo and transformers path."""
    monkeypatch.setenv("AMLX_SHARDS", str(shards))  # read once, when the engine is built
    model = amlx.load_sync(ckpt)
    try:
        assert len(model.engine.scheduler.shards) == shards
        run(backend, _concurrency_body, model, concurrency_cases()[:24])
    finally:
        model.close()


def test_padded_batches_match_solo_and_transformers(backend, ckpt, monkeypatch):
    """Batches padded to bucket sizes (the GPU's default, forced on here): the padding
    rows write only the null block, so every stream is still its solo and transformers
    path while rows join and finish and the batch moves between sizes."""
    monkeypatch.setenv("AMLX_PAD_BATCHES", "1")  # read once, when the engine is built
    monkeypatch.setenv("AMLX_SHARDS", "1")
    model = amlx.load_sync(ckpt)
    try:
        assert model.engine.scheduler.options.pad_batches
        run(backend, _concurrency_body, model, concurrency_cases()[:24])
    finally:
        model.close()


# ============================================================================= 2. cancellation


CANCEL_MEANS = ["break", "aclose", "cancel_scope", "cancel_in_body", "fail_after", "asyncio_task_cancel",
                "asyncio_wait_for"]


async def _buffered_cancel_body(model) -> None:
    want = await model.complete([11, 12, 13], max_tokens=6)
    stream = model.generate([11, 12, 13], max_tokens=6)
    first = await stream.__anext__()
    assert first.id == want.token_ids[0]
    await _wait_until(lambda: model.stats()["active_requests"] == 0)  # every token produced, the rest buffered
    with anyio.CancelScope() as scope:
        scope.cancel()
        await stream.__anext__()  # a cancelled reader: no token, however ready
        raise AssertionError("a cancelled reader was handed a buffered token")
    assert scope.cancelled_caught
    assert [t async for t in stream] == []  # the reader went away: its stream ended


def test_a_cancelled_reader_takes_no_buffered_token(backend, idle):
    """Reading a stream whose tokens are all buffered inside a cancelled scope raises the
    cancellation and hands out no token (under trio one more token went out: a read that
    found a token ready was no checkpoint); the stream then ends, as for any reader that
    went away."""
    run(backend, _buffered_cancel_body, idle)


async def _cancel_body(ckpt: Path, means: str, shared) -> None:
    others_spec = greedy_cases(3, 50, seed=7)
    victim_prompt = greedy_cases(1, 4, seed=8)[0][0]
    await _warm_sampler(shared)
    before = _active_bytes()
    model = await amlx.load(ckpt, max_batch_size=8)
    sched = model.engine.scheduler
    cancelled = anyio.Event()
    got_first = [anyio.Event() for _ in others_spec]
    other_tokens: list[list[int]] = [[] for _ in others_spec]

    async def other(k: int) -> None:
        # Reads one token, then holds back until the victim is cancelled (its tiny buffer
        # pauses it), so every one of its remaining tokens is decoded after the cancellation.
        stream = model.generate(others_spec[k][0], max_tokens=50, max_buffer=2)
        async for t in stream:
            other_tokens[k].append(t.id)
            if len(other_tokens[k]) == 1:
                got_first[k].set()
                await cancelled.wait()

    box: dict = {}

    def make_victim():
        # Never pauses (huge buffer) and would run for 2000 steps unless removed.
        s = model.generate(victim_prompt, max_tokens=2000, max_buffer=65_536)
        box["req"] = s._stream.request
        box["ref"] = weakref.ref(s)
        return s

    def mark_cancelled() -> None:
        # Any read after the cancellation: at most one more step may follow it.
        box.setdefault("steps_after_cancel", box["req"].steps)
        box.setdefault("decode_steps_at_cancel", sched.decode_steps)
        cancelled.set()

    async def victim() -> None:
        for e in got_first:
            await e.wait()
        got: list = []
        if means == "break":
            async for t in make_victim():  # the loop holds the only reference to the stream
                got.append(t)
                if len(got) == 3:
                    break
            assert box["ref"]() is None, "the stream outlived the loop"
            mark_cancelled()
        elif means == "aclose":
            stream = make_victim()
            async for t in stream:
                got.append(t)
                if len(got) == 3:
                    break
            await stream.aclose()
            mark_cancelled()
            await stream.aclose()  # idempotent
            assert [t async for t in stream] == []
        elif means == "cancel_scope":
            stream = make_victim()

            async def consume(task_status=anyio.TASK_STATUS_IGNORED):
                with anyio.CancelScope() as scope:
                    task_status.started(scope)
                    async for t in stream:
                        got.append(t)
                mark_cancelled()

            async with anyio.create_task_group() as tg:
                scope = await tg.start(consume)
                await _wait_until(lambda: len(got) >= 3)
                scope.cancel()
        elif means == "cancel_in_body":
            # Cancelled while awaiting something else inside the loop body: the stream is
            # dropped as the exception unwinds the loop, and that cancels the request.
            async def consume(task_status=anyio.TASK_STATUS_IGNORED):
                with anyio.CancelScope() as scope:
                    task_status.started(scope)
                    async for t in make_victim():
                        got.append(t)
                        await anyio.sleep(0 if len(got) < 3 else 60)
                assert box["ref"]() is None and box["req"].channel.cancelled
                mark_cancelled()

            async with anyio.create_task_group() as tg:
                scope = await tg.start(consume)
                await _wait_until(lambda: len(got) >= 3)
                await anyio.sleep(0.005)
                scope.cancel()
        elif means == "fail_after":
            stream = make_victim()
            async for t in stream:
                got.append(t)
                if len(got) == 3:
                    break
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.01):
                    async for t in stream:
                        got.append(t)
            mark_cancelled()
        elif means == "asyncio_task_cancel":
            import asyncio

            stream = make_victim()

            async def consume():
                async for t in stream:
                    got.append(t)

            task = asyncio.create_task(consume())
            await _wait_until(lambda: len(got) >= 3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            mark_cancelled()
        elif means == "asyncio_wait_for":
            import asyncio

            stream = make_victim()
            async for t in stream:
                got.append(t)
                if len(got) == 3:
                    break

            async def consume():
                async for t in stream:
                    got.append(t)

            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(consume(), 0.01)
            mark_cancelled()
        else:  # pragma: no cover
            raise AssertionError(means)
        assert 3 <= len(got) < 2000 and got[-1].finish_reason is None  # it was cancelled mid-stream
        box["victim_read"] = len(got)

    try:
        async with anyio.create_task_group() as tg:
            for k in range(len(others_spec)):
                tg.start_soon(other, k)
            tg.start_soon(victim)

        req = box["req"]
        # The others decoded ~48 more steps after the cancellation...
        assert sched.decode_steps - box["decode_steps_at_cancel"] >= 40
        # ...and the cancelled request took part in at most one of them.
        assert req.steps <= box["steps_after_cancel"] + 1, (req.steps, box["steps_after_cancel"])
        assert req.channel.done and req not in sched.rows and req not in sched.waiting
        # (finished rows leave the batch on the worker's next round)
        await _wait_until(lambda: model.stats()["active_requests"] == 0, 10)
        # The others are exactly what they give alone (and what transformers gives).
        for k, (prompt, ref_ids) in enumerate(others_spec):
            alone = await model.complete(prompt, max_tokens=50)
            assert other_tokens[k] == alone.token_ids == ref_ids
    finally:
        await model.aclose()
    assert _active_bytes() == before, "closing the model did not give back its MLX memory"


@pytest.mark.parametrize("means", CANCEL_MEANS)
def test_cancellation(backend, ckpt, idle, means):
    if means.startswith("asyncio_") and backend not in ("asyncio", "uvloop"):
        pytest.skip("asyncio-only way of cancelling")
    run(backend, _cancel_body, ckpt, means, idle)


# ============================================================================= 3. backpressure


async def _backpressure_body(model) -> None:
    spec = greedy_cases(3, 120, seed=11)
    lengths = [40, 120, 120]
    solo = [(await model.complete(p, max_tokens=n)).token_ids for (p, _), n in zip(spec, lengths)]
    for (p, ref_ids), n, s in zip(spec, lengths, solo):
        assert s == ref_ids[:n]

    max_buffer = 4
    streams = [model.generate(p, max_tokens=n, max_buffer=max_buffer) for (p, _), n in zip(spec, lengths)]
    reqs = [s._stream.request for s in streams]
    read = [[] for _ in streams]
    stalled, resume = anyio.Event(), anyio.Event()

    async def slow_reader():
        async for t in streams[0]:
            read[0].append(t.id)
            if len(read[0]) == 2:
                stalled.set()
                await resume.wait()

    async def reader(k: int):
        async for t in streams[k]:
            read[k].append(t.id)

    observations = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(slow_reader)
        tg.start_soon(reader, 1)
        tg.start_soon(reader, 2)
        await stalled.wait()
        # While the slow consumer holds still, watch its buffer and the others' progress.
        start_others = None
        while min(len(read[1]), len(read[2])) < 110:
            unread = len(reqs[0].channel._items)
            made = reqs[0].assembler.count
            observations.append((unread, made, len(read[1]), len(read[2])))
            assert unread <= max_buffer, f"{unread} unread tokens > max_buffer {max_buffer}"
            assert made <= len(read[0]) + max_buffer
            if start_others is None and unread == max_buffer:
                start_others = (made, len(read[1]), len(read[2]))
            await anyio.sleep(0.0005)
        end_made = reqs[0].assembler.count
        assert start_others is not None, "the slow consumer's buffer never filled"
        # Paused: not one more token for the slow request while the others made dozens.
        assert end_made == start_others[0] == 2 + max_buffer
        assert len(read[1]) - start_others[1] >= 50 and len(read[2]) - start_others[2] >= 50
        resume.set()
    for k in range(3):
        assert read[k] == solo[k], f"stream {k}"
    assert len(observations) > 10


def test_backpressure(backend, idle):
    run(backend, _backpressure_body, idle)


# ============================================================================= 3b. paused streams leave the batch


async def _paused_rows_cost_nothing_body(ckpt: Path) -> None:
    """8 streams that are never read (max_buffer=1) beside 8 readers: the paused ones
    leave the batch (parked, their KV in a cache of their own) before any decode step,
    so no step computes them, and the readers give exactly their solo paths."""
    model = await amlx.load(ckpt, max_batch_size=32)
    sched = model.engine.scheduler
    readers = greedy_cases(8, 40, seed=57)
    idle_prompts = [p for p, _ in greedy_cases(8, 4, seed=58)]
    steps: list[list[Request]] = []

    def watch(rows, chained):
        if all(r.pos > 0 for r in rows):  # a decode step (prefill: pos 0)
            steps.append(list(rows))

    sched.fault = watch
    try:
        stuck = [model.generate(p, max_tokens=200, max_buffer=1) for p in idle_prompts]
        stuck_reqs = [s._stream.request for s in stuck]
        await _wait_until(lambda: all(r in sched.parked for r in stuck_reqs))
        got = [None] * len(readers)

        async def reader(k):
            got[k] = [t.id for t in await _read_all(model.generate(readers[k][0], max_tokens=40))]

        async with anyio.create_task_group() as tg:
            for k in range(len(readers)):
                tg.start_soon(reader, k)
        for k, (_, ref) in enumerate(readers):
            assert got[k] == ref, k
        assert steps and not any(r in rows for rows in steps for r in stuck_reqs)
        assert all(r.steps == 0 and r.assembler.count == 1 for r in stuck_reqs)
        for s in stuck:
            await s.aclose()
    finally:
        sched.fault = None
        await model.aclose()


def test_paused_streams_cost_the_batch_nothing(backend, ckpt, idle):
    run(backend, _paused_rows_cost_nothing_body, ckpt)


async def _parked_slots_body(ckpt: Path) -> None:
    """max_batch_size=2 and two streams that are never read: after the idle limit
    they give up their slots and a new request completes; a stream paused past the
    idle limit and read again resumes with its solo output (seeded sampling
    included), and so do the two once they are read."""
    model = await amlx.load(ckpt, max_batch_size=2)
    sched = model.engine.scheduler
    sched.slot_idle_limit = 0.2
    spec = greedy_cases(3, 30, seed=59)
    sampled = dict(max_tokens=30, temperature=1.0, seed=5)
    try:
        solo_sampled = (await model.complete(spec[2][0], **sampled)).token_ids
        stuck = [model.generate(spec[k][0], max_tokens=30, max_buffer=1) for k in (0, 1)]
        stuck_reqs = [s._stream.request for s in stuck]
        await _wait_until(lambda: all(r in sched.parked for r in stuck_reqs))
        with anyio.fail_after(60):  # before parking, the paused rows held the batch for good
            fresh = await model.complete(spec[2][0], max_tokens=30)
        assert fresh.token_ids == spec[2][1]
        stream = model.generate(spec[2][0], max_buffer=2, **sampled)
        first = await stream.__anext__()
        req = stream._stream.request
        await _wait_until(lambda: req in sched.parked)
        await anyio.sleep(0.3)  # past the idle limit: its slot is given up
        rest = [t.id for t in await _read_all(stream)]
        assert [first.id] + rest == solo_sampled
        for k, s in enumerate(stuck):
            assert [t.id for t in await _read_all(s)] == spec[k][1]
        assert model.stats()["active_requests"] == 0 or await _wait_until(
            lambda: model.stats()["active_requests"] == 0, 10) is None
    finally:
        await model.aclose()


def test_parked_streams_give_up_their_slots_and_resume(backend, ckpt, idle):
    run(backend, _parked_slots_body, ckpt)


# ============================================================================= 4. failure isolation


_failing_array = failing_array  # (tests/helpers/faults.py; test_prefix_cache.py poisons a KV pool with it)


FAULTS = ["raise", "raise_chained", "mlx_eval_chained"]


async def _failure_body(model, kind: str) -> None:
    """Request 0 fails at a decode step >= 3 (the injected fault: an exception raised
    while its step is built, or an array whose MLX evaluation fails; "_chained": the
    first fault waits for a pipelined step, built while the previous one is in
    flight). Request 0 ends with MLXError after exactly the tokens before that step;
    the others give exactly their solo (transformers) paths; the worker goes on."""
    n, j = 30, 3
    spec = greedy_cases(4, n, seed=40)
    paths = [ref for _, ref in spec]
    sched = model.engine.scheduler
    fresh_prompt, fresh_ref = greedy_cases(1, 12, seed=99)[0]
    victim = None
    fired: dict = {}

    def fault(rows, chained):
        if victim not in rows:
            return None
        if not fired:
            if victim.steps < j or (kind.endswith("_chained") and not chained):
                return None
            fired.update(steps=victim.steps, chained=chained)
        fired["calls"] = fired.get("calls", 0) + 1
        if kind.startswith("mlx_eval"):
            return _failing_array()
        raise amlx.MLXError("injected", "poison step")

    sched.fault = fault
    # (the streams decode at once, unread: the hook is in place before they start)
    streams = [model.generate(spec[k][0], max_tokens=n, max_buffer=64) for k in range(4)]
    victim = streams[0]._stream.request
    worker = Worker.get()
    try:
        outcome: dict = {}

        async def client(k: int) -> None:
            got = []
            try:
                async for t in streams[k]:
                    got.append(t.id)
            except amlx.MLXError as exc:
                outcome[k] = (got, exc)
                return
            outcome[k] = (got, None)

        async with anyio.create_task_group() as tg:
            for k in range(4):
                tg.start_soon(client, k)
        assert fired, "the fault never fired"
        if kind.endswith("_chained"):
            assert fired["chained"]
        got0, exc0 = outcome[0]
        assert isinstance(exc0, amlx.MLXError), exc0
        assert ("without a primitive" if kind.startswith("mlx_eval") else "poison") in str(exc0)
        assert got0 == paths[0][:fired["steps"] + 1], (outcome, fired)  # up to the step that failed
        for k in (1, 2, 3):
            got, exc = outcome[k]
            assert exc is None, f"request {k} failed with {exc!r}"
            assert got == paths[k]
        # The worker survived and serves new requests (still with the hook in place).
        assert worker.thread.is_alive()
        again = await model.complete(fresh_prompt, max_tokens=12)
        assert again.token_ids == fresh_ref
    finally:
        sched.fault = None
    after = await model.complete(fresh_prompt, max_tokens=12)
    assert after.token_ids == fresh_ref


@pytest.mark.parametrize("kind", FAULTS)
def test_failure_in_one_request_is_isolated(backend, idle, kind):
    run(backend, _failure_body, idle, kind)


# ============================================================================= 4b. a failure that fails every request


async def _failure_everywhere_body(ckpt: Path) -> None:
    """A Python exception (not an MLX one, so not isolated) while a prompt, taken off
    the waiting queue, is prefilled: the worker's failure path ends every request it
    holds -- running, paused, taken for prefill, still waiting -- and none hangs.
    The engine serves new requests afterwards."""
    model = await amlx.load(ckpt, max_batch_size=3)
    sched = model.engine.scheduler
    spec = greedy_cases(5, 12, seed=47)
    victim = None
    fired = []

    def fault(rows, chained):
        if victim is not None and victim in rows and victim.pos == 0:  # the victim's prefill
            fired.append([r.prompt for r in rows])
            raise OverflowError("injected: Python int too large to convert to C int")

    sched.fault = fault
    try:
        # one decodes on (a buffer it never fills), one is paused at once (parked, unread)
        running = [model.generate(spec[0][0], max_tokens=2000, max_buffer=4000),
                   model.generate(spec[1][0], max_tokens=2000, max_buffer=1)]
        await _wait_until(lambda: len(sched.rows) == 1 and len(sched.parked) == 1, 30)
        victim_stream = model.generate(spec[2][0], max_tokens=20)
        victim = victim_stream._stream.request
        waiting = [model.generate(spec[k][0], max_tokens=20) for k in (3, 4)]  # no free slot for them
        ends: dict = {}

        async def read(name, stream):
            try:
                ends[name] = ("finished", len(await _read_all(stream)))
            except amlx.MLXError as exc:
                ends[name] = ("error", str(exc))

        with anyio.fail_after(60):  # before the fix the victim (taken for prefill) never ended
            async with anyio.create_task_group() as tg:
                for name, s in [("run0", running[0]), ("run1", running[1]), ("victim", victim_stream),
                                ("wait0", waiting[0]), ("wait1", waiting[1])]:
                    tg.start_soon(read, name, s)
        assert fired and fired[0][0] == spec[2][0]
        assert ends["victim"][0] == "error" and "OverflowError" in ends["victim"][1]
        for name in ("run0", "run1"):
            assert ends[name][0] == "error", ends
        for name in ("wait0", "wait1"):  # taken for prefill after the failure, or failed with it
            assert ends[name][0] == "error" or ends[name] == ("finished", 20), ends
        # (rows that finished leave the batch on the worker's next round)
        await _wait_until(lambda: not model.stats()["active_requests"] and not model.stats()["waiting_requests"], 10)
        sched.fault = None
        again = await model.complete(spec[0][0], max_tokens=12)
        assert again.token_ids == spec[0][1]
    finally:
        sched.fault = None
        await model.aclose()


def test_a_failure_outside_isolation_ends_every_request(backend, ckpt, idle):
    run(backend, _failure_everywhere_body, ckpt)


# ============================================================================= 5. event-loop responsiveness


def _blocking_calls_on_this_thread():
    """A profiler for the calling thread (sys.setprofile is per thread) that records each call
    which would make the event loop wait on MLX or on the worker: any call into MLX (the cffi
    module amlx._mlxc, Array's C core amlx._arraytype, a C method of an Array) and any wait
    for a worker job (Worker.run_sync, a concurrent future's result()). Returns the list it
    fills and the profile function."""
    import concurrent.futures

    from amlx._mlx.array import Array
    from amlx.engine.worker import Worker

    waits = {Worker.run_sync.__code__, concurrent.futures.Future.result.__code__}
    seen: list[str] = []

    def profile(frame, event, arg):
        if event == "c_call":
            owner = getattr(arg, "__self__", None)
            if getattr(arg, "__module__", None) in ("amlx._mlxc", "amlx._arraytype") or isinstance(owner, Array):
                seen.append(f"MLX: {getattr(arg, '__qualname__', arg)!s} from {frame.f_code.co_name}")
        elif event == "call" and frame.f_code in waits:
            seen.append(f"wait: {frame.f_code.co_name} from {frame.f_back.f_code.co_name}")

    return seen, profile


async def _loop_thread_body(model) -> list[str]:
    """16 streams decoding while the event loop's thread records every call that would make
    it wait on MLX or on the worker thread."""
    spec = greedy_cases(16, 4, seed=21)
    counts = [0] * len(spec)
    ends = [None] * len(spec)

    async def client(k):
        async for t in model.generate(spec[k][0], max_tokens=150):
            counts[k] += 1
            ends[k] = t.finish_reason

    seen, profile = _blocking_calls_on_this_thread()
    sys.setprofile(profile)
    try:
        async with anyio.create_task_group() as clients:
            for k in range(len(spec)):
                clients.start_soon(client, k)
    finally:
        sys.setprofile(None)
    assert all(e is not None for e in ends) and sum(counts) >= 16 * 50  # (random weights may hit EOS)
    return seen


def test_the_event_loop_never_waits_on_mlx(backend, idle):
    """The event loop's thread makes no MLX call and waits for no worker job while 16 streams
    decode (submitting, streaming and finishing them): it never stalls for a decode step, on
    any machine. (Checked call by call, not by timing the loop's lag, which other processes
    on a shared machine can raise too.)"""
    seen = run(backend, _loop_thread_body, idle)
    assert not seen, "\n".join(sorted(set(seen))[:20])


def test_the_loop_thread_probe_sees_mlx_calls_and_waits(idle):
    """The probe above can fail: an MLX call and a wait for the worker made on the loop's
    thread are both recorded."""
    import numpy as np_

    from amlx._mlx import array, ops

    async def body():
        seen, profile = _blocking_calls_on_this_thread()
        sys.setprofile(profile)
        try:
            ops.eval(ops.add(array(np_.ones(3, dtype=np_.float32)), 1.0))
            idle.engine.run_sync(lambda: None)
        finally:
            sys.setprofile(None)
        return seen

    seen = anyio.run(body)
    assert any(s.startswith("MLX: ") for s in seen) and any(s.startswith("wait: ") for s in seen), seen


# ============================================================================= 6. closing


async def _close_body(ckpt: Path, shared) -> None:
    await _warm_sampler(shared)
    before = _active_bytes()
    model = await amlx.load(ckpt, max_batch_size=1)  # one running row: the others wait
    prompts = [p for p, _ in greedy_cases(3, 4, seed=31)]
    streams = [model.generate(p, max_tokens=5000, max_buffer=2) for p in prompts]
    never_read = model.generate(prompts[0], max_tokens=10)
    outcome: dict = {}
    first = anyio.Event()

    async def reader(k):
        got = []
        try:
            async for t in streams[k]:
                got.append(t)
                if k == 0 and len(got) == 2:
                    first.set()
        except amlx.ClosedError as exc:
            outcome[k] = (len(got), exc)
            return
        outcome[k] = (len(got), None)

    async with anyio.create_task_group() as tg:
        for k in range(3):
            tg.start_soon(reader, k)
        await first.wait()
        await model.aclose()
    for k in range(3):
        n, exc = outcome[k]
        assert isinstance(exc, amlx.ClosedError), f"stream {k}: {exc!r} after {n} tokens"
    assert outcome[0][0] >= 2
    with pytest.raises(amlx.ClosedError):
        await _read_all(never_read)
    with pytest.raises(amlx.ClosedError):
        model.generate("hello")
    with pytest.raises(amlx.ClosedError):
        await model.complete("hello")
    with pytest.raises(amlx.ClosedError):
        model.generate_sync("hello")
    assert model.closed
    await model.aclose()  # idempotent, both ways
    model.close()
    assert _active_bytes() == before

    async with await amlx.load(ckpt) as m2:
        c = await m2.complete(prompts[0], max_tokens=3)
        assert len(c.token_ids) == 3 and not m2.closed
    assert m2.closed
    with pytest.raises(amlx.ClosedError):
        m2.generate("x")
    m2.close()
    assert _active_bytes() == before


def test_close(backend, ckpt, idle):
    run(backend, _close_body, ckpt, idle)


# ============================================================================= 7. options, prompts, results


BAD_OPTIONS = [
    dict(max_tokens=0), dict(max_tokens=-3), dict(max_tokens=1.5), dict(max_tokens=True), dict(max_tokens="8"),
    dict(temperature=-0.1), dict(temperature="hot"), dict(temperature=float("nan")),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.5), dict(min_p=-0.1), dict(min_p=1.1),
    dict(repetition_penalty=0), dict(repetition_penalty=-1.0), dict(seed="x"), dict(seed=1.0),
    dict(logprobs="yes"), dict(logprobs=1), dict(max_buffer=0), dict(max_buffer=2.0),
    dict(stop=[""]), dict(stop=5), dict(stop=["ok", 3]),
]


async def _options_body(model, ckpt: Path) -> None:
    vocab = model.tokenizer.vocab_size
    # bad values: ValueError at the call itself, before anything is queued
    for bad in BAD_OPTIONS:
        with pytest.raises(ValueError):
            model.generate("hello", **bad)
        with pytest.raises(ValueError):
            await model.complete("hello", **bad)
    with pytest.raises(TypeError, match="max_new_tokens"):
        model.generate("hello", max_new_tokens=5)
    with pytest.raises(TypeError):
        model.generate("hello", temprature=0.5)
    # token ids outside the vocabulary, empty prompts
    for ids in ([vocab], [-1], [3, vocab + 10, 4]):
        with pytest.raises(ValueError) as info:
            model.generate(ids)
        assert not isinstance(info.value, amlx.ContextLengthError)
    with pytest.raises(ValueError):
        model.generate([])
    with pytest.raises(ValueError):
        model.generate("")
    assert model.stats()["waiting_requests"] == 0 and model.stats()["active_requests"] == 0

    # context length: the prompt must leave room for one generated token
    assert model.info.context_length == 40960
    with pytest.raises(amlx.ContextLengthError):
        model.generate([5] * 40960)
    small = await amlx.load(ckpt, max_context=16)
    try:
        with pytest.raises(amlx.ContextLengthError):
            small.generate(list(range(10, 26)))  # 16 tokens
        with pytest.raises(amlx.ContextLengthError):
            small.generate(list(range(10, 40)))
        c = await small.complete(list(range(10, 25)), max_tokens=50)  # 15 tokens: room for one
        assert len(c.token_ids) == 1 and c.finish_reason == "length"
        c = await small.complete(list(range(10, 20)), max_tokens=50)
        assert len(c.token_ids) <= 6
    finally:
        await small.aclose()

    # chat messages are rendered with the checkpoint's template (as transformers renders it)
    _, hf_tok = _hf()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there, owl"}]
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = hf_tok.encode(text, add_special_tokens=False)
    stream = model.generate(messages, max_tokens=8)
    via_messages = [t.id for t in await _read_all(stream)]
    assert stream.prompt_tokens == len(ids)
    assert via_messages == (await model.complete(ids, max_tokens=8)).token_ids
    assert via_messages == (await model.complete(text, max_tokens=8)).token_ids

    # stop strings end the stream and are never emitted; joined text == completion text
    prompt, ref_ids = greedy_cases(1, 40, seed=41)[0]
    found = _pick_stop(ref_ids)
    assert found is not None
    stop, k, before_stop = found
    for max_buffer in (1, 16):
        toks = await _read_all(model.generate(prompt, max_tokens=40, stop=stop, max_buffer=max_buffer))
        joined = "".join(t.text for t in toks)
        assert stop not in joined and joined == before_stop
        assert [t.id for t in toks] == ref_ids[:k]
        assert toks[-1].finish_reason == "stop"
        comp = await model.complete(prompt, max_tokens=40, stop=(stop,))
        assert comp.text == joined and comp.finish_reason == "stop" and comp.token_ids == ref_ids[:k]

    # complete(): usage counts, finish reason, logprobs
    comp = await model.complete(prompt, max_tokens=25, logprobs=True)
    assert comp.token_ids == ref_ids[:25] and comp.finish_reason == "length"
    assert comp.usage.prompt_tokens == len(prompt)
    assert comp.usage.completion_tokens == 25
    assert comp.usage.total_tokens == len(prompt) + 25
    assert comp.usage.time_to_first_token > 0 and comp.usage.tokens_per_second > 0
    assert comp.logprobs is not None and len(comp.logprobs) == 25
    np.testing.assert_allclose(comp.logprobs, reference_path(prompt, 25).logprobs, atol=2e-4)
    assert comp.text == "".join(t.text for t in await _read_all(model.generate(prompt, max_tokens=25)))
    plain = await model.complete(prompt, max_tokens=1)
    assert plain.token_ids == ref_ids[:1] and plain.logprobs is None and plain.usage.completion_tokens == 1
    text_prompt = "the quick brown fox"
    assert (await model.complete(text_prompt, max_tokens=3)).usage.prompt_tokens == len(
        hf_tok.encode(text_prompt, add_special_tokens=False))


def test_options_prompts_and_results(backend, ckpt, idle):
    run(backend, _options_body, idle, ckpt)


# ============================================================================= 7b. heavy prompts off the loop


class _Ticks:
    """Counts the event loop's 1 ms ticks while a block runs."""

    def __init__(self):
        self.count = 0
        self._on = False

    async def run(self) -> None:
        while True:
            await anyio.sleep(0.001)
            if self._on:
                self.count += 1


async def _heavy_prompts_body(model) -> None:
    """Long texts and chat messages are tokenized on a thread as the stream's first
    read: the event loop keeps ticking meanwhile (the tokenizer releases the GIL for
    long texts), a text that cannot fit is refused before it is tokenized, and the
    results equal the same prompt given as ids."""
    import amlx.prompt as prompt_module

    encoded: list[int] = []
    tok = model.tokenizer
    real_encode = tok.encode

    def spy(text, *a, **kw):
        encoded.append(len(text))
        return real_encode(text, *a, **kw)

    tok.encode = spy
    ticks = _Ticks()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticks.run)
            words = (" ".join(_WORDS) + " ") * 40
            # 5 MB: more tokens than the context holds whatever the tokens -> refused untokenized
            huge = (words * (5_000_000 // len(words) + 1))[:5_000_000]
            stream = model.generate(huge, max_tokens=3)  # returns at once
            with pytest.raises(amlx.ContextLengthError, match="at least"):
                await _read_all(stream)
            assert encoded == []
            # a long text that must be tokenized to find out: the loop ticks meanwhile
            cap = model.info.context_length * prompt_module.SHRINK * model._prompts.longest_piece()
            long_text = (words * (cap // len(words) + 1))[:min(cap, 120_000)]  # ~50k tokens
            assert len(long_text) > prompt_module.INLINE_CHARS
            ticks._on, ticks.count = True, 0
            with pytest.raises(amlx.ContextLengthError):
                await _read_all(model.generate(long_text, max_tokens=3))
            ticks._on = False
            assert encoded == [len(long_text)] and ticks.count >= 5, ticks.count
            # 20,000 chat messages: rendered and tokenized off the loop
            messages = [{"role": ("user", "assistant")[i % 2], "content": f"message {i}: {_WORDS[i % 20]}"}
                        for i in range(20_000)]
            ticks._on, ticks.count = True, 0
            with pytest.raises((amlx.ContextLengthError, amlx.ChatTemplateError)):
                await model.complete(messages, max_tokens=3)
            ticks._on = False
            assert ticks.count >= 5, ticks.count
            # chat messages that fit give what their ids give (the same thread path as long text)
            short = [{"role": "user", "content": "hello there, owl"}]
            ids = real_encode(tok.apply_chat_template(short, add_generation_prompt=True), add_special_tokens=False)
            stream = model.generate(short, max_tokens=4)
            assert stream.prompt_tokens is None  # not tokenized yet
            got = [t.id for t in await _read_all(stream)]
            assert stream.prompt_tokens == len(ids)
            assert got == (await model.complete(ids, max_tokens=4)).token_ids
            # cancelled while it is tokenized: the request, once made, is cancelled too
            with anyio.CancelScope() as scope:
                scope.cancel()
                await _read_all(model.generate(short, max_tokens=200))
            await _wait_until(lambda: not model.stats()["active_requests"] and not model.stats()["waiting_requests"])
            tg.cancel_scope.cancel()
    finally:
        tok.encode = real_encode


def test_heavy_prompts_are_tokenized_off_the_loop(backend, idle):
    run(backend, _heavy_prompts_body, idle)


# ============================================================================= asyncio-only / backend-free tests
# (not imported by test_engine_trio.py)


def test_uvloop(ckpt, idle):
    pytest.importorskip("uvloop")

    async def body():
        import asyncio

        import uvloop

        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        await _concurrency_body(idle, concurrency_cases()[:24])
        await _backpressure_body(idle)

    run("uvloop", body)
    run("uvloop", _cancel_body, ckpt, "break", idle)
    run("uvloop", _cancel_body, ckpt, "asyncio_task_cancel", idle)


def test_sync_api_from_plain_threads(ckpt, idle):
    """load_sync / generate_sync / complete_sync on threads with no event loop, at the same time."""
    spec = greedy_cases(4, 20, seed=51)
    errors: list[BaseException] = []
    results: dict = {}
    run("asyncio", _warm_sampler, idle)
    before = _active_bytes()

    def own_model():
        try:
            m = amlx.load_sync(ckpt, max_batch_size=2)
            try:
                results["own"] = [[t.id for t in m.generate_sync(p, max_tokens=20)] for p, _ in spec[:2]]
                results["own_complete"] = m.complete_sync(spec[2][0], max_tokens=20).token_ids
                it = m.generate_sync(spec[3][0], max_tokens=1000, max_buffer=2)
                first = next(it)
                it.close()  # early exit from a blocking stream cancels it
                results["own_cancelled"] = (first.id, it._stream.request)
            finally:
                m.close()
                m.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def shared(k):
        try:
            toks = list(idle.generate_sync(spec[k][0], max_tokens=20, max_buffer=1))
            results[f"shared{k}"] = [t.id for t in toks]
            assert toks[-1].finish_reason == "length"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=own_model)] + [threading.Thread(target=shared, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results["own"] == [spec[0][1], spec[1][1]]
    assert results["own_complete"] == spec[2][1]
    first, req = results["own_cancelled"]
    assert first == spec[3][1][0] and req.channel.done and req.steps < 50
    for k in range(4):
        assert results[f"shared{k}"] == spec[k][1]
    assert _active_bytes() == before


_COLD_CLOSE = r'''
import gc, sys
import anyio
import amlx

async def main(path):
    gc.collect()
    before = amlx.memory()["active"]
    m = await amlx.load(path, max_batch_size=8)
    opts = [dict(), dict(temperature=1.0, seed=3), dict(logprobs=True, top_logprobs=3),
            dict(repetition_penalty=1.2), dict(presence_penalty=0.5, frequency_penalty=0.3, temperature=0.7, seed=4),
            dict(logit_bias={5: 2.0}), dict(top_k=5, top_p=0.9, min_p=0.05, temperature=1.0)]
    async with anyio.create_task_group() as tg:
        for i in range(14):
            tg.start_soon(lambda i=i: m.complete([11 + i, 12, 13] * (1 + i), max_tokens=8 + i, **opts[i % len(opts)]))
    s = m.generate([5] * 10, max_tokens=500, max_buffer=1)  # paused (parked), then cancelled
    await s.__anext__()
    await anyio.sleep(0.2)
    await s.aclose()
    await m.complete(list(range(10, 600)) * 5, max_tokens=3)  # longer than a prefill chunk
    await m.aclose()
    gc.collect()
    print("ACTIVE", before, amlx.memory()["active"])

anyio.run(main, sys.argv[1])
'''


def test_close_returns_every_byte_from_a_cold_start(ckpt):
    """In a fresh process (no compiled step of any earlier test around): load, batched
    requests with every sampling option, a parked and cancelled stream, a prompt over
    one prefill chunk, close -> MLX active memory is back to the byte. (The engine
    owns everything it compiles -- decode steps and sampling steps, traced per batch
    shape, each holding a few bytes of constants -- and closes it with the model.)"""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _COLD_CLOSE, str(ckpt)], capture_output=True, text=True,
                         cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("ACTIVE")][-1]
    before, after = map(int, line.split()[1:])
    assert after == before, f"{after - before} bytes of MLX memory outlived the model"


# ----------------------------------------------------------------------------- sampling


def _first_token_distribution_prompt() -> tuple[list[int], np.ndarray]:
    """A prompt whose first-token distribution (temperature 1) is spread out."""
    ref, _ = _hf()
    rng = np.random.default_rng(61)
    floor = special_floor()
    for _ in range(200):
        prompt = [int(x) for x in rng.integers(0, floor, size=int(rng.integers(3, 12)))]
        with _torch_threads():
            logits = reference_logits(ref, prompt)[-1].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        if 0.2 <= p.max() <= 0.5:
            return prompt, p
    raise AssertionError("no prompt with a spread-out first token")


def test_sampling_first_token_matches_softmax(idle):
    """300 seeded requests (batched together) sample their first token from softmax(logits / T)."""
    prompt, p = _first_token_distribution_prompt()
    n = 300

    async def body():
        ids = [0] * n

        async def one(i):
            c = await idle.complete(prompt, max_tokens=1, temperature=1.0, seed=i)
            ids[i] = c.token_ids[0]

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        k3 = []

        async def topk(i):
            c = await idle.complete(prompt, max_tokens=1, temperature=1.0, top_k=3, seed=5000 + i)
            k3.append(c.token_ids[0])

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(topk, i)
        return ids, k3

    ids, k3 = run("asyncio", body)
    top = int(p.argmax())
    freq = ids.count(top) / n
    sigma = math.sqrt(p[top] * (1 - p[top]) / n)
    assert abs(freq - p[top]) < 4.5 * sigma, (freq, p[top])
    # chi-square over the 5 likeliest tokens and the rest lumped together
    order = np.argsort(-p)
    bins = [int(t) for t in order[:5]]
    expected = [p[t] * n for t in bins] + [(1 - p[bins].sum()) * n]
    observed = [ids.count(t) for t in bins] + [n - sum(ids.count(t) for t in bins)]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    assert chi2 < 25.0, (observed, expected)  # 5 dof: p(chi2 > 25) ~ 1e-4
    assert len(set(ids)) >= 4
    assert set(k3) <= {int(t) for t in order[:3]} and len(set(k3)) >= 2


def test_seeded_sampling_same_alone_and_batched(idle):
    """Seeded sampled requests give the same tokens alone, batched with others, and twice in one batch."""
    prompts = [p for p, _ in greedy_cases(6, 4, seed=71)]
    variants = [
        dict(temperature=1.0), dict(temperature=0.8, top_k=20), dict(temperature=1.2, top_p=0.9),
        dict(temperature=1.0, min_p=0.05), dict(temperature=0.9, repetition_penalty=1.3, logprobs=True),
        dict(temperature=1.0, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.1),
    ]
    reqs = [(prompts[i % len(prompts)], dict(max_tokens=30, seed=100 + i, **variants[i % len(variants)]))
            for i in range(12)]

    async def body():
        alone = [await idle.complete(p, **o) for p, o in reqs]
        batched: dict = {}

        async def one(key, p, o):
            await anyio.sleep(random.Random(str(key)).uniform(0, 0.01))
            batched[key] = await idle.complete(p, **o)

        async with anyio.create_task_group() as tg:
            for i, (p, o) in enumerate(reqs):
                tg.start_soon(one, i, p, o)
                tg.start_soon(one, ("twice", i), p, o)
            for i in range(6):  # greedy neighbours with other lengths
                tg.start_soon(one, ("greedy", i), prompts[i], dict(max_tokens=5 + 7 * i))
        return alone, batched

    alone, batched = run("asyncio", body)
    for i in range(len(reqs)):
        assert batched[i].token_ids == alone[i].token_ids, reqs[i]
        assert batched[("twice", i)].token_ids == alone[i].token_ids, reqs[i]
        assert batched[i].text == alone[i].text
    # and sampling is sampling: seeds matter, and it is not the greedy path
    sequences = {tuple(a.token_ids) for a in alone}
    assert len(sequences) >= 10


def test_sampling_seeds_and_unseeded(idle):
    prompt, ref_ids = greedy_cases(1, 30, seed=81)[0]

    async def body():
        seeded = [await idle.complete(prompt, max_tokens=30, temperature=1.0, seed=s) for s in range(8)]
        again = await idle.complete(prompt, max_tokens=30, temperature=1.0, seed=3)
        unseeded = [await idle.complete(prompt, max_tokens=30, temperature=1.0) for _ in range(2)]
        greedy_k1 = await idle.complete(prompt, max_tokens=30, temperature=1.0, top_k=1, seed=4)
        return seeded, again, unseeded, greedy_k1

    seeded, again, unseeded, greedy_k1 = run("asyncio", body)
    assert again.token_ids == seeded[3].token_ids
    assert len({tuple(c.token_ids) for c in seeded}) >= 6
    assert any(c.token_ids != ref_ids for c in seeded)
    assert unseeded[0].token_ids != unseeded[1].token_ids
    assert greedy_k1.token_ids == ref_ids  # top_k=1 is greedy whatever the temperature


# ----------------------------------------------------------------------------- stats


def test_rate_meter_counts_busy_time_over_a_window():
    """tokens_per_second = tokens of the last `window` seconds over the time the
    engine worked in them: idle time between rounds does not dilute it."""
    from amlx.engine.rate import RateMeter

    m = RateMeter(window=10.0, resolution=0.25)
    assert m.rate(now=1000.0) == 0.0
    m.add(100, 0.5, now=1000.1)
    m.add(100, 1.0, now=1000.6)
    assert m.rate(now=1001.0) == pytest.approx(200 / 1.5)
    assert m.rate(now=1009.0) == pytest.approx(200 / 1.5)  # 8 idle seconds later: the same rate
    assert m.rate(now=1010.6) == pytest.approx(100.0)  # the first round left the window
    assert m.rate(now=1011.0) == 0.0  # nothing in the last 10 s
    m.add(30, 0.1, now=2000.0)
    m.add(0, 0.1, now=2000.05)  # a round that made no token still took time
    assert m.rate(now=2000.1) == pytest.approx(150.0)


def test_stats_tokens_per_second_is_recent_and_ignores_idle(ckpt):
    """An engine that idled before and after a request reports the rate it decoded
    at (above what counting the idle time before it would give), and the same rate after idling."""
    model = amlx.load_sync(ckpt)
    try:
        time.sleep(0.5)  # idle since load: must not count
        assert model.stats()["tokens_per_second"] == 0.0
        prompt = greedy_cases(1, 4, seed=7)[0][0]
        t0 = time.perf_counter()
        made0 = model.stats()["tokens_generated"]
        c = model.complete_sync(prompt, max_tokens=60)
        wall = time.perf_counter() - t0
        made = model.stats()["tokens_generated"] - made0
        assert made == len(c.token_ids)
        deadline = time.monotonic() + 10
        while model.stats()["active_requests"] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # the worker's last round (dropping the finished row) is over
        rate = model.stats()["tokens_per_second"]
        # Idle time would have counted: at most made / (wall + 0.5) then. The rounds' own busy
        # time may run a little past `wall` (the round that drops the finished row), so the
        # request's wall-clock rate itself is no bound on a loaded machine.
        assert rate > made / (wall + 0.5)
        time.sleep(0.5)
        assert model.stats()["tokens_per_second"] == rate
    finally:
        model.close()
