"""A prefill pass's temporaries stay under a bound (amlx.engine.prefill_budget):
a group of prompts admitted together is split into passes whose estimated bytes
fit, a lone prompt's chunk is not, and greedy outputs are those of the
uncapped engine."""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amlx
from amlx.engine.prefill_budget import MIN_PASS_TOKENS, PassBudget, prefill_memory
from tests.helpers.checkpoints import make_checkpoint

PROMPTS = 12
PROMPT_LEN = 40
ROWS_PER_PASS = 3  # the bound below lets a pass take this many of the prompts


@given(token_bytes=st.integers(1, 1 << 20), row_bytes=st.integers(0, 1 << 24), limit=st.integers(1, 1 << 34),
       rows=st.integers(2, 256))
@settings(max_examples=200, deadline=None)
def test_max_tokens_is_the_largest_pass_that_fits(token_bytes, row_bytes, limit, rows):
    b = PassBudget(token_bytes, row_bytes, limit)
    n = b.max_tokens(rows)
    assert n >= MIN_PASS_TOKENS and b.fits(n, rows)
    if n > MIN_PASS_TOKENS:
        assert not b.fits(n + 1, rows)


def test_no_bound_fits_everything_and_one_row_always_fits():
    b = PassBudget(10 ** 6, 10 ** 6, 0)
    assert b.fits(10 ** 9, 10 ** 4) and b.max_tokens(2) is None
    b = PassBudget(10 ** 6, 10 ** 6, 1)
    assert b.fits(10 ** 9, 1) and b.max_tokens(1) is None and not b.fits(10 ** 3, 2)


@pytest.mark.parametrize("text,value", [("", 256 << 20), ("0", 0), ("1000", 1000), ("64M", 64 << 20),
                                        ("1.5g", 3 << 29), ("8k", 8192)])
def test_prefill_memory_from_the_environment(monkeypatch, text, value):
    monkeypatch.setenv("AMLX_PREFILL_MEMORY", text)
    assert prefill_memory() == value
    assert prefill_memory(64 << 30) == (8 << 30 if text == "" else value)  # (an eighth of large weights)


@pytest.mark.parametrize("text", ["lots", "-5", "12X"])
def test_prefill_memory_rejects_nonsense(monkeypatch, text):
    monkeypatch.setenv("AMLX_PREFILL_MEMORY", text)
    with pytest.raises(ValueError):
        prefill_memory()


@pytest.fixture(scope="module")
def ckpt():
    root = Path(tempfile.mkdtemp(prefix="amlx-prefcap-"))
    yield make_checkpoint(root / "gemma3", "gemma3", seed=3)
    shutil.rmtree(root, ignore_errors=True)


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(10, 500, PROMPT_LEN).tolist() for _ in range(PROMPTS)]


def _serve(ckpt, monkeypatch, memory: str | None):
    """Greedy outputs of the prompts sent together, and the prefill passes seen
    (rows, tokens padded) by the scheduler's fault hook, and the budget used."""
    monkeypatch.setenv("AMLX_SHARDS", "1")
    monkeypatch.setenv("AMLX_PREFILL_CHUNK", "2048")  # the GPU's default: every prompt fits one group
    if memory is not None:
        monkeypatch.setenv("AMLX_PREFILL_MEMORY", memory)
    model = amlx.load_sync(ckpt, max_batch_size=PROMPTS)
    sched = model.engine.scheduler
    passes = []

    def watch(rows, chained):
        if rows and all(r.pos < len(r.fill) for r in rows):  # (a prefill pass: nothing decoded yet)
            passes.append((len(rows), max(len(r.fill) for r in rows) - rows[0].prefilled))

    sched.fault = watch
    try:
        async def run():
            async def one(p):
                return [t.id async for t in model.generate(p, max_tokens=6)]
            return await asyncio.gather(*(one(p) for p in _prompts()))
        return asyncio.run(run()), passes, sched.pass_budget, sched.prefill_chunk
    finally:
        model.close()


def test_a_big_group_is_split_into_passes_under_the_bound_with_the_same_tokens(ckpt, monkeypatch):
    free, free_passes, budget, _ = _serve(ckpt, monkeypatch, "0")
    assert sum(r for r, _ in free_passes) == PROMPTS and len(free_passes) <= 2  # (the first may come alone)
    limit = ROWS_PER_PASS * (PROMPT_LEN * budget.token_bytes + budget.row_bytes)
    capped, passes, capped_budget, chunk = _serve(ckpt, monkeypatch, str(limit))
    assert capped_budget.limit == limit
    assert capped == free
    assert sum(r for r, _ in passes) == PROMPTS
    assert len(passes) >= PROMPTS // ROWS_PER_PASS
    for rows, tokens in passes:
        assert rows <= ROWS_PER_PASS
        assert capped_budget.fits(rows * tokens, rows)
    # a lone prompt's chunk is not capped (its time to first token stays as it was)
    assert chunk == 2048
