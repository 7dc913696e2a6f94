"""The KV block pool (amlx/kv): attention through block tables against the
contiguous cache, the allocator's reference counts, and the prefix index
(hits, misses, least-recently-used eviction, clearing), and the windowed layers'
own pool (blocks going back as a row advances, the reuse rule, rollback)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx._mlx import array, fast, float32, ops
from amlx.cache import KVCache
from amlx.kv import PADDING_ROW, BlockPool, KeyChain, PagedLayer, PoolFull, ShardKV, block_keys, copy_blocks

SCALE = 0.5


def _attend(q: np.ndarray, keys, values, mask) -> np.ndarray:
    out = fast.scaled_dot_product_attention(array(q), keys, values, scale=SCALE, mask=mask)
    ops.eval(out)
    return out.numpy()


def _scatter_history(history: np.ndarray, tables: list[list[int]], rng, total: int, bs: int) -> np.ndarray:
    """A pool (2, total, H, bs, D) of noise holding row r's positions of `history`
    (2, B, H, cap, D) in the blocks tables[r]: position p at (tables[r][p // bs], :, p % bs)."""
    _, b, h, cap, d = history.shape
    pool = rng.standard_normal((2, total, h, bs, d)).astype(np.float32)
    for r, blocks in enumerate(tables):
        for j, blk in enumerate(blocks):
            for o in range(bs):
                if j * bs + o < cap:
                    pool[:, blk, :, o] = history[:, r, :, j * bs + o]
    return pool


def _shard(h: int, d: int, bs: int, total: int, span_step: int = 1, window: int | None = None) -> ShardKV:
    """Bookkeeping of a pool of `total` blocks, all grown (its arrays are the test's own)."""
    pool = BlockPool([(h, d)], float32, bs, total, initial_blocks=total)
    pool.allocate(total - 1)
    return ShardKV(pool, span_step, window)


def _random_tables(rng, needs: list[int], spare: int) -> tuple[list[list[int]], int]:
    """Distinct random blocks (never the null block) for rows needing `needs` blocks."""
    total = sum(needs) + spare + 1
    ids = [int(x) for x in rng.permutation(np.arange(1, total))]
    tables, at = [], 0
    for n in needs:
        tables.append(ids[at:at + n])
        at += n
    return tables, total


# Both sides run MLX's attention over the same values, but over spans of different
# lengths and masks. On the CPU that sums in the same order; MLX's CUDA attention
# (float32 inputs in reduced-precision tensor-core products) differed by up to 8e-4
# on the H200 (values of magnitude ~2).
TOL = 2e-3 if fast.cuda_available() else 1e-5

shapes = st.fixed_dictionaries({
    "bs": st.sampled_from([1, 2, 4, 8, 16]),
    "kv_heads": st.sampled_from([1, 2]),
    "groups": st.sampled_from([1, 2, 3]),  # query heads per KV head (GQA)
    "d": st.sampled_from([4, 8]),
    "window": st.one_of(st.none(), st.integers(1, 12)),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=60, deadline=None)
@given(shape=shapes, pos=st.lists(st.integers(0, 40), min_size=1, max_size=4), step=st.integers(1, 4))
def test_decode_through_block_tables_matches_the_contiguous_cache(shape, pos, step):
    """A decode step's write and attention over blocks scattered at random in a
    pool of noise equal the contiguous cache's, for any block size, lengths,
    window and GQA; the tables may be wider than the rows need (`step`), and a
    windowed layer reads only the blocks that can hold its window when that is
    narrower."""
    rng = np.random.default_rng(shape["seed"])
    bs, h, d, window = shape["bs"], shape["kv_heads"], shape["d"], shape["window"]
    b, heads = len(pos), shape["kv_heads"] * shape["groups"]
    cap = max(pos) + 1
    history = rng.standard_normal((2, b, h, cap, d)).astype(np.float32)
    new = rng.standard_normal((2, b, h, 1, d)).astype(np.float32)
    q = rng.standard_normal((b, heads, 1, d)).astype(np.float32)
    positions = array(np.asarray(pos, np.int32))

    contiguous = KVCache(window=window)
    contiguous.kv = array(history)
    ref = _attend(q, *contiguous.update_decode(array(new[0]), array(new[1]), positions))

    tables, total = _random_tables(rng, [p // bs + 1 for p in pos], spare=3)
    owners = [SimpleNamespace(blocks=t, pos=p) for t, p in zip(tables, pos)]
    kv = _shard(h, d, bs, total, step, window)
    tabs = kv.decode_tables(owners)
    assert tabs.width % step == 0 and tabs.width >= max(len(t) for t in tables)
    assert (tabs.window is not None) == (window is not None and kv.window_width < tabs.width)
    layer = PagedLayer(array(_scatter_history(history, tables, rng, total, bs)), tabs, window)
    got = _attend(q, *layer.update_decode(array(new[0]), array(new[1]), positions))
    np.testing.assert_allclose(got, ref, rtol=TOL, atol=TOL)
    # the new token landed in its row's block, at its offset
    pool = layer.pool.numpy()
    for r, p in enumerate(pos):
        np.testing.assert_array_equal(pool[:, tables[r][p // bs], :, p % bs], new[:, r, :, 0])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, rows=st.integers(1, 3), start=st.integers(0, 30), length=st.integers(1, 12),
       data=st.data())
def test_prefill_through_block_tables_matches_the_contiguous_cache(shape, rows, start, length, data):
    """A prefill chunk at `start` over rows of different real lengths (right
    padding, written to the null block) attends as the contiguous cache does at
    every real position; its tables come from ShardKV.prefill_tables."""
    rng = np.random.default_rng(shape["seed"])
    bs, h, d, window = shape["bs"], shape["kv_heads"], shape["d"], shape["window"]
    heads = h * shape["groups"]
    ends = [start + data.draw(st.integers(1, length)) for _ in range(rows)]
    ends[0] = start + length  # the longest row sets the chunk's length
    end = start + length
    history = rng.standard_normal((2, rows, h, max(start, 1), d)).astype(np.float32)
    k, v = (rng.standard_normal((rows, h, length, d)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((rows, heads, length, d)).astype(np.float32)

    contiguous = KVCache(window=window)
    contiguous.kv = array(history)
    ref = _attend(q, *contiguous.update_prefill(array(k), array(v), start))

    tables, total = _random_tables(rng, [-(-e // bs) for e in ends], spare=2)
    owners = [SimpleNamespace(blocks=t, pos=0) for t in tables]
    tabs = _shard(h, d, bs, total).prefill_tables(owners, start, length, ends)
    assert tabs.width == -(-end // bs) and tabs.batch == rows
    hist = history if start else history[:, :, :, :0]
    layer = PagedLayer(array(_scatter_history(hist, tables, rng, total, bs)), tabs, window)
    got = _attend(q, *layer.update_prefill(array(k), array(v), start))
    for r in range(rows):
        real = ends[r] - start
        np.testing.assert_allclose(got[r, :, :real], ref[r, :, :real], rtol=1e-5, atol=1e-5)


def _pool(blocks: int = 6, prefix: bool = True, initial: int = 2) -> BlockPool:
    return BlockPool([(1, 4)], float32, 2, blocks, prefix_cache=prefix, initial_blocks=initial)


def test_allocator_counts_references_and_grows_only_for_held_blocks():
    pool = _pool()
    assert pool.available() == 5 and pool.capacity == 0  # the null block is never handed out
    a = pool.allocate(1)
    assert pool.capacity == 2 and a == [1]  # grown to its first size on demand
    b = pool.allocate(3)
    assert pool.capacity == 5 and sorted(b) == [2, 3, 4]  # grown by what was asked for (more than 25%)
    assert pool.available() == 1 and pool.used() == 4
    with pytest.raises(PoolFull):
        pool.allocate(2)
    pool.hold(b[:1])  # a second request shares a block
    pool.release(b)
    assert pool.used() == 2 and pool.available() == 3
    pool.release(b[:1])
    assert pool.used() == 1
    # idle cached blocks are evicted before the arrays grow: the prefix cache lives in
    # the room held blocks already made
    grown = _pool(blocks=6)
    kv = ShardKV(grown)
    row = SimpleNamespace(blocks=[], pos=0)
    kv.reserve(row, [1, 2, 3], headroom=0)
    kv.cache_filled(row, [1, 2, 3], 3)
    kv.release(row)
    assert grown.capacity == 3 and grown.prefix.idle == 1  # (the null block, one cached, one free)
    kv.reserve(row, [5, 6, 7, 8], headroom=0)
    assert grown.capacity == 3 and grown.prefix.idle == 0  # evicted, not grown
    grown.close()
    assert all(a.shape == (2, 5, 1, 2, 4) for a in pool.arrays)
    pool.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(2, 64), st.integers(60, 2000))
def test_pool_growth_stays_within_a_quarter_of_what_is_held(asks, initial, ceiling):
    """The arrays grow only when held blocks need room, and then to at most a quarter
    more than the blocks held after the allocation (or the first size), never past the
    ceiling; every block handed out lies inside them."""
    pool = BlockPool([(1, 4)], float32, 2, ceiling, initial_blocks=initial)
    held = 0
    for n in asks:
        if n > pool.available():
            with pytest.raises(PoolFull):
                pool.allocate(n)
            break
        before = pool.capacity
        got = pool.allocate(n)
        held += n
        assert max(got) < pool.capacity <= ceiling and pool.used() == held
        if pool.capacity != before:  # grew: (held + the null block) plus at most a quarter
            assert pool.capacity <= max(pool.initial_blocks, int((held + 1) * 1.25) + 1)
        assert all(a.shape[1] == pool.capacity for a in pool.arrays)
    pool.close()


def test_a_large_pool_grows_by_an_eighth():
    """Past LARGE_POOL_BYTES the arrays grow by an eighth (their unused tail is what
    costs there), below by a quarter; always at least by what is asked for."""
    from amlx.kv.pool import GROWTH, LARGE_GROWTH, LARGE_POOL_BYTES

    pool = BlockPool([(8, 128)] * 4, float32, 16, 1 << 20)  # 256 KiB a block (host numbers only)
    large = LARGE_POOL_BYTES // pool.bytes_per_block()
    for capacity, factor in ((64, GROWTH), (large - 1, GROWTH), (large, LARGE_GROWTH), (4 * large, LARGE_GROWTH)):
        pool.capacity = capacity
        assert pool.grown_size(1) == int(capacity * factor) + 1
        assert pool.grown_size(capacity) == 2 * capacity
    assert LARGE_GROWTH == 1.125 and GROWTH == 1.25
    pool.capacity = 0
    assert pool.grown_size(3) == pool.initial_blocks == 16


def test_prefix_index_hits_misses_lru_eviction_and_clear():
    pool = _pool(blocks=6, initial=6)  # at its full size (cached blocks never make it grow)
    row = SimpleNamespace(blocks=[], pos=0)
    kv = ShardKV(pool)
    prompt = [1, 2, 3, 4, 5]  # two full blocks of 2, then one token
    assert kv.reserve(row, prompt) == 0 and len(row.blocks) == 3
    kv.cache_filled(row, prompt, len(prompt))
    first = list(row.blocks)
    kv.release(row)
    assert pool.prefix.idle == 2 and pool.used() == 0  # the full blocks stay cached
    # the same prefix: two blocks from the cache, one computed
    other = SimpleNamespace(blocks=[], pos=0)
    assert kv.reserve(other, [1, 2, 3, 4, 9]) == 4 and other.blocks[:2] == first[:2]
    assert pool.prefix.hits == 2 and pool.prefix.idle == 0
    kv.release(other)
    # a prefix ending mid-block reuses only the full blocks before it
    assert kv.peek([1, 2, 3, 7, 7]) == 2 and kv.peek([1, 9, 3, 4, 5]) == 0
    # one token must always be computed: an exact two-block prompt reuses one block
    assert kv.peek([1, 2, 3, 4]) == 2
    # a different prompt that needs one block more than is free evicts a cached
    # one: the least recently used, which is the tail of the chain
    big = SimpleNamespace(blocks=[], pos=0)
    assert kv.reserve(big, [7] * 8, headroom=0) == 0 and len(big.blocks) == 4
    assert pool.prefix.idle == 1 and kv.peek([1, 2, 3, 4, 5]) == 2  # block (3, 4) went first
    kv.release(big)
    pool.clear_prefix()
    assert kv.peek([1, 2, 3, 4, 5]) == 0 and pool.available() == 5
    pool.close()


def test_block_keys_chain_the_whole_prefix():
    a = block_keys([1, 2, 3, 4, 5, 6], 2)
    b = block_keys([9, 2, 3, 4, 5, 6], 2)
    assert len(a) == 3 and len(block_keys([1, 2, 3], 2)) == 1
    assert a[1] != b[1]  # same block tokens, different prefix: different key
    assert block_keys([1, 2, 3, 4], 2) == a[:2]


@given(tokens=st.lists(st.integers(0, 1000), max_size=60), cuts=st.lists(st.integers(0, 60), max_size=5),
       bs=st.sampled_from([1, 2, 4, 16]))
def test_a_key_chain_hashes_incrementally_what_block_keys_hashes_at_once(tokens, cuts, bs):
    chain = KeyChain(bs)
    for n in sorted(cuts) + [len(tokens)]:
        ids = tokens[:n]
        assert chain.keys(tokens, len(ids) // bs) == block_keys(ids, bs)


def test_copy_blocks_moves_a_rows_blocks_between_pools():
    src, dst = _pool(), _pool()
    got = src.allocate(2)
    data = np.arange(2 * 6 * 1 * 2 * 4, dtype=np.float32).reshape(2, 6, 1, 2, 4)
    src.arrays = [array(data)]
    dst.allocate(1)
    new = copy_blocks(src, dst, got)
    out = dst.arrays[0].numpy()
    for s, t in zip(got, new):
        np.testing.assert_array_equal(out[:, t], data[:, s])
    src.close()
    dst.close()


def test_padded_batch_sizes():
    from amlx.engine.placement import padded_batch

    sizes = {padded_batch(n) for n in range(1, 129)}
    assert sizes == {1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128}
    for n in range(1, 129):
        assert n <= padded_batch(n) <= n + (7 if n <= 64 else 15)


def test_windowed_layers_pool_keeps_only_their_window():
    """A ShardKV whose windowed layers have a pool of their own (window 6, blocks
    of 4): a row holds every block in the full layers' pool but only those its
    window still sees in the local one as it advances (the others go back, its
    table holding the null block there); its full blocks are cached in both pools,
    and a later prompt reuses a prefix only as far as the local blocks its first
    computed token sees are cached; a verify pass's draft blocks are trimmed from both."""
    bs, window = 4, 6
    full = BlockPool([(1, 4)], float32, bs, 40)
    local = BlockPool([(1, 4)], float32, bs, 40)
    kv = ShardKV(full, 1, window, local, [True, False])
    ids = list(range(100, 140))
    row = SimpleNamespace(blocks=[], local=[], pos=0, created=0.0)
    assert kv.reserve(row, ids[:23], headroom=0) == 0
    assert len(row.blocks) == 6 and row.local == []  # local blocks come with the passes that write them
    kv.prefill_tables([row], 0, 23, [23])
    assert len(row.local) == 6 and local.used() == 6
    kv.cache_filled(row, ids, 23)
    for pos in range(23, 40):  # decode: each step's next position
        row.pos = pos
        kv.extend([row])
        first = (pos - window + 1) // bs  # the first block the window sees
        assert row.local[:first] == [0] * first and 0 not in row.local[first:]
        assert local.used() == len(row.local) - first <= 3 and full.used() == pos // bs + 1
    row.pos = 40
    kv.release(row, ids)  # its full blocks cached, in both pools where it held them
    assert full.used() == local.used() == 0
    # the whole first turn: 10 full blocks, and the local ones of its last window (8, 9)
    again = SimpleNamespace(blocks=[], local=[], pos=0, created=0.0)
    assert kv.reserve(again, ids + [7, 8], headroom=0) == 40
    assert again.local[:8] == [0] * 8 and 0 not in again.local[8:] and local.used() == 2
    kv.release(again)
    # a prefix of the prompt's 5 full blocks: their local blocks were cached before they
    # went back (the output's, 5-7, were not: nothing cached them here), so position 20's
    # window (blocks 3, 4) is found
    short = SimpleNamespace(blocks=[], local=[], pos=0, created=0.0)
    assert kv.reserve(short, ids[:21] + [1], headroom=0) == 20
    assert short.local[:3] == [0] * 3 and 0 not in short.local[3:]
    kv.release(short)
    # ... but not behind block 7: its window's local blocks (5, 6) went back uncached,
    # so the longest prefix whose window is cached is the prompt's 5 blocks
    assert kv.reserve(short, ids[:30] + [1], headroom=0) == 20
    kv.release(short)
    local.clear_prefix()  # without the windowed layers' blocks no prefix is reused
    assert kv.reserve(short, ids[:21] + [1], headroom=0) == 0
    kv.release(short)
    # speculative rollback: draft blocks go back from both tables
    spec = SimpleNamespace(blocks=[], local=[], pos=0, created=0.0)
    kv.reserve(spec, [1, 2, 3, 4, 5], headroom=0)
    kv.prefill_tables([spec], 0, 5, [5])
    spec.pos = 5
    assert kv.extend_to(spec, 5 + 9) == 16 and len(spec.local) == 4
    kv.trim(spec)
    assert len(spec.blocks) == len(spec.local) == 2
    kv.release(spec)
    assert full.used() == local.used() == 0


@settings(max_examples=60, deadline=None)
@given(bs=st.sampled_from([1, 2, 4, 16]), kv_heads=st.sampled_from([1, 2, 8]), window=st.one_of(st.none(),
       st.integers(1, 12)), pos=st.lists(st.integers(0, 40), min_size=1, max_size=5), pad=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_decode_kernel_write_slot_is_the_tables_write_slot(bs, kv_heads, window, pos, pad, seed):
    """The CUDA decode kernel, writing a step's new key and value into the pool itself
    (decode_attention's write_pool), finds each row's slot from the table and the
    position: (table[b, pos // bs] * kv_heads + head) * bs + pos % bs. That is the slot
    the decode tables' `writes` hand the scatter, for every row (padding rows: the null
    block), head, block size and window, in the full layers' pool and in the windowed
    layers' own pool (its table holds the null block where the window no longer looks)."""
    rng = np.random.default_rng(seed)
    needs = [p // bs + 1 for p in pos]
    tables, total = _random_tables(rng, needs + needs, spare=2)
    full, local = tables[:len(pos)], tables[len(pos):]
    if window is not None:  # the local blocks a row's window no longer sees went back
        local = [[0 if j < max(0, p - window + 1) // bs else blk for j, blk in enumerate(t)]
                 for t, p in zip(local, pos)]
    rows = [SimpleNamespace(blocks=f, local=lo, pos=p) for f, lo, p in zip(full, local, pos)]
    rows += [PADDING_ROW] * pad
    pools = [BlockPool([(kv_heads, 4)], float32, bs, total, initial_blocks=total) for _ in range(2)]
    for p in pools:
        p.allocate(total - 1)
    kv = ShardKV(pools[0], 1, window, pools[1] if window is not None else None,
                 [True] if window is not None else None)
    tabs = kv.decode_tables(rows)
    for t in [tabs] + ([tabs.local] if window is not None else []):
        table = t.table.numpy()
        at = np.asarray([r.pos for r in rows])
        kernel = ((table[np.arange(len(rows)), at // bs][:, None] * kv_heads + np.arange(kv_heads)[None, :]) * bs
                  + (at % bs)[:, None])
        np.testing.assert_array_equal(kernel.reshape(-1), t.writes.numpy())


def test_decode_kernel_writes_the_pool_only_given_its_reads(monkeypatch):
    """PagedLayer.kernel_may_write: a decode pass (a table) of an unquantized pool whose
    step hands the kernel its `reads` (the scheduler's read_views, or the arrays where a
    view cannot be made), and AMLX_KERNEL_WRITES not 0 (paged.KERNEL_WRITES)."""
    from amlx.kv import paged

    pool = array(np.zeros((2, 3, 1, 2, 4), np.float32))
    decode = SimpleNamespace(table=array(np.zeros((1, 1), np.int32)))
    assert PagedLayer(pool, decode, reads=[pool]).kernel_may_write()
    assert not PagedLayer(pool, decode).kernel_may_write()  # no reads: a pass outside the engine's step
    assert not PagedLayer(pool, SimpleNamespace(table=None), reads=[pool]).kernel_may_write()  # no table
    assert not PagedLayer([pool, pool, pool], decode, bits=8, group=32, reads=[pool] * 3).kernel_may_write()
    monkeypatch.setattr(paged, "KERNEL_WRITES", False)
    assert not PagedLayer(pool, decode, reads=[pool]).kernel_may_write()
    assert not KVCache().kernel_may_write()
