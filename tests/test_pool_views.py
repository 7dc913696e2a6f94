"""Reading a KV pool through `ops.buffer_view` handles (amlx.kv.paged.read_views):
what the CUDA decode kernel reads, so that the step's write into the pool happens
in place instead of copying the layer's whole pool (benchmarks/pool_write.py).

The kernel itself runs only on CUDA (tests/test_decode_kernels.py); here the
handles' use is checked on the CPU (their contents and None cases are in
tests/test_ops.py): no copy, all or nothing, and a read through one before the
write leaves MLX free to write the pool in place (which a read of the array
itself does not)."""

from __future__ import annotations

import numpy as np
import pytest

from amlx._mlx import array, float32, memory, ops
from amlx.kv import paged
from amlx.kv.paged import PagedLayer, Tables, read_views

BLOCKS, HEADS, BS, DIM = 64, 2, 16, 32


def _pool(seed: int = 0):
    rng = np.random.default_rng(seed)
    pool = array(rng.standard_normal((2, BLOCKS, HEADS, BS, DIM)).astype(np.float32))
    ops.eval(pool)
    return pool


def _write(pool, slots: np.ndarray, value: float):
    """One decode step's write: `slots` (flat positions in the pool) of every head."""
    flat = ops.reshape(pool, (2, BLOCKS * HEADS * BS, DIM))
    at = ops.broadcast_to(ops.reshape(array(slots.astype(np.int32)), (1, len(slots), 1)), (2, len(slots), DIM))
    new = ops.full((2, len(slots), DIM), value, float32)
    return ops.reshape(ops.put_along_axis(flat, at, new, 1), pool.shape)


def test_a_view_allocates_nothing():
    pool = _pool()
    before = memory.active()
    views = [ops.buffer_view(pool) for _ in range(8)]
    ops.eval(*views)
    assert memory.active() == before


def test_read_views_are_all_or_nothing(monkeypatch):
    pools = [_pool(i) for i in range(3)]
    views = read_views(pools)  # (taken in one C call for every layer)
    assert len(views) == 3 and all(np.array_equal(v.numpy(), p.numpy()) for v, p in zip(views, pools))
    pending = ops.arange(4, dtype=float32)  # not computed: no view, so the kernel reads the arrays
    assert read_views(pools + [pending]) == [] == read_views([pending] + pools) == read_views([])
    monkeypatch.setattr(paged, "READ_VIEWS", False)
    assert read_views(pools) == []


@pytest.mark.parametrize("through_view", [False, True])
def test_a_read_through_a_view_before_the_write_lets_it_happen_in_place(through_view):
    """A read of the pool still pending when the write into it runs (as the decode
    kernel's read is). Read as the array itself, the write copies the pool (twice its
    bytes in memory at the peak); read through a view, the pool is written where it
    lies. (The write is evaluated first so that the read is pending for certain:
    evaluated together, whether the read's task has let go of the pool by the time the
    write runs is up to MLX's CPU stream, and a CI run once saw no copy.)"""
    pool = _pool()
    nbytes = pool.nbytes
    source = ops.buffer_view(pool) if through_view else pool
    read = ops.sum(ops.take(source, array(np.arange(1, 9, dtype=np.int32)), axis=1))
    slots = np.array([5, 300, 2047], dtype=np.int64)
    expected = pool.numpy().reshape(2, -1, DIM).copy()
    expected[:, slots] = 3.0
    memory.reset_peak()
    start = memory.active()
    new = _write(pool, slots, 3.0)
    del pool, source
    ops.eval(new)
    np.testing.assert_array_equal(new.numpy().reshape(2, -1, DIM), expected)
    grew = memory.peak() - start
    ops.eval(read)
    if through_view:
        assert grew < nbytes / 4, f"the write copied the pool ({grew} bytes over {nbytes})"
    else:  # (the behaviour the views are there to avoid: if MLX stops copying here, this test says so)
        assert grew >= nbytes


def test_the_decode_kernel_input_is_the_view_where_given():
    pool = _pool()
    view = ops.buffer_view(pool)
    table = array(np.zeros((1, 2), np.int32))
    tables = Tables(array(np.zeros(4, np.int32)), array(np.zeros(1, np.int32)), 1, 2, BS, table)
    kv, got_table, quant = PagedLayer(pool, tables, reads=[view]).kernel_input()
    assert kv is view and got_table is table and quant is None
    kv, _, _ = PagedLayer(pool, tables).kernel_input()
    assert kv is pool
