"""The rows' side of the block pool: which blocks each request holds, what a
request needs to be admitted, and the block tables of each forward pass.

A request holds `req.blocks`, its block table: block i holds its positions
[i * block_size, (i + 1) * block_size). Joining or leaving a batch changes no
other row's cache, only which tables the next pass stacks. Everything here is
host work on small lists; the only arrays made are a pass's table and slots.

Models with sliding-window layers (one window size) keep those layers' keys and
values in a second pool, `local`, with a table of its own per request,
`req.local`: entry i holds the same positions as `req.blocks[i]`, but entries
wholly before the window of the row's next position are given back (the null
block takes their place), so a long row holds about a window of blocks there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from amlx._mlx import Array, array
from amlx.kv.paged import Tables
from amlx.kv.pool import NULL_BLOCK, BlockPool, copy_blocks
from amlx.kv.prefix import KeyChain, block_keys

__all__ = ["KVRow", "PADDING_ROW", "ShardKV", "blocks_for", "preemption_order"]


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class KVRow(Protocol):
    """What a row (an engine Request) carries for the pool."""

    blocks: list[int]
    local: list[int]  # its table in the windowed layers' pool (with one: `ShardKV.local`)
    pos: int
    created: float


class PaddingRow:
    """A row that pads a decode batch to a bucket size: it holds only the null
    block, at position 0, so its writes land in the null block and it reads nothing."""

    blocks: list[int] = [NULL_BLOCK]
    local: list[int] = [NULL_BLOCK]
    pos: int = 0
    created: float = 0.0


PADDING_ROW = PaddingRow()


def preemption_order(rows: Sequence[KVRow]) -> list:
    """Rows in the order they are preempted: the youngest (latest submitted) first."""
    return sorted(rows, key=lambda r: r.created, reverse=True)


class ShardKV:
    """One shard's pool and the bookkeeping of its rows' blocks.

    `span_step`: decode tables are as wide as the longest row's blocks rounded
    up to this many blocks, so the compiled decode step (traced per table
    width) is traced again only every `span_step` blocks of growth. `window`:
    the sliding window of the model's windowed layers (one size, or None):
    decode passes longer than it give those layers narrower tables of their own.
    `local`: with a window, the windowed layers' own pool (`layer_local` says
    which layers), in which a row keeps only the blocks its window can still
    see; `pool` then holds the other layers. Both have the same ceiling in
    blocks and a row holds a local block only where it holds a block of `pool`,
    so whatever `pool` admits, `local` has room for."""

    def __init__(self, pool: BlockPool, span_step: int = 1, window: int | None = None,
                 local: BlockPool | None = None, layer_local: Sequence[bool] = ()):
        self.pool = pool
        self.block_size = pool.block_size
        self.span_step = max(1, span_step)
        self.window = window
        self.local = local if window else None
        self.layer_local = list(layer_local) if self.local is not None else []
        # blocks that can hold a window ending anywhere in a block
        self.window_width = blocks_for(window - 1, pool.block_size) + 1 if window else 0
        # (key, pieces to gather, block table) of the last decode pass, as device arrays, per table
        self._tables: dict[str, tuple[tuple, Array, Array]] = {}
        self._window: tuple[tuple, Array, Array] | None = None  # the same for the windowed layers
        self._version = 0  # bumped whenever any row's blocks change: part of the table's key

    # -- the pools' arrays, layer by layer ---------------------------------------------
    @property
    def arrays(self) -> list[Array]:
        """Every layer's pool arrays in layer order (`pool`'s, and `local`'s for the windowed layers)."""
        if self.local is None:
            return self.pool.arrays
        parts, out = self.pool.parts, []
        full, local = iter(self.pool.arrays), iter(self.local.arrays)
        for is_local in self.layer_local:
            src = local if is_local else full
            out.extend(next(src) for _ in range(parts))
        return out

    @arrays.setter
    def arrays(self, arrays: Sequence[Array]) -> None:
        if self.local is None:
            self.pool.arrays = list(arrays)
            return
        parts, full, local = self.pool.parts, [], []
        for i, is_local in enumerate(self.layer_local):
            (local if is_local else full).extend(arrays[i * parts:(i + 1) * parts])
        self.pool.arrays, self.local.arrays = full, local

    def state(self) -> list[Array]:
        """Every array of the shard's pools (what a pass's evaluation includes)."""
        return self.pool.state() + (self.local.state() if self.local is not None else [])

    def _pools(self) -> list[BlockPool]:
        return [self.pool] if self.local is None else [self.pool, self.local]

    # -- admission ------------------------------------------------------------------
    # (`chain`, where given, is the request's KeyChain: its keys are hashed once)
    def _keys(self, ids: Sequence[int], n: int, chain: KeyChain | None) -> list[bytes]:
        """The keys of the first `n` full blocks of `ids`."""
        return block_keys(ids[:n * self.block_size], self.block_size) if chain is None else chain.keys(ids, n)

    def _reusable(self, ids: Sequence[int], chain: KeyChain | None) -> list[bytes]:
        """Keys of the blocks of `ids` a request may take from the cache: full
        blocks, leaving at least one token to compute (its logits are needed)."""
        return self._keys(ids, (len(ids) - 1) // self.block_size, chain)

    def _first_block(self, pos: int) -> int:
        """The first block the windowed layers' queries at `pos` and later can see."""
        return max(0, pos - (self.window or 1) + 1) // self.block_size

    def _hit(self, ids: Sequence[int], chain: KeyChain | None) -> tuple[list[bytes], list[int], list[int]]:
        """(the reusable keys, the cached blocks of the longest usable prefix, and
        with a local pool its cached blocks from the window before that prefix's
        end): a prefix is usable only where the windowed layers' blocks that the
        first computed token sees are cached too."""
        reusable = self._reusable(ids, chain) if self.pool.prefix is not None else []
        found = self.pool.lookup(reusable)
        if self.local is None or not found or self.local.prefix is None:
            return reusable, found, []
        have = [self.local.prefix.block(k) for k in reusable[:len(found)]]
        runs, run = [], 0  # runs[i]: cached local blocks in a row ending at block i
        for b in have:
            run = run + 1 if b is not None else 0
            runs.append(run)
        for m in range(len(found), 0, -1):
            first = self._first_block(m * self.block_size)
            if runs[m - 1] >= m - first:
                return reusable, found[:m], have[first:m]
        return reusable, [], []

    def peek(self, ids: Sequence[int], chain: KeyChain | None = None) -> int:
        """Positions of `ids` the prefix cache holds now (nothing is held)."""
        if self.pool.prefix is None:
            return 0
        return len(self._hit(ids, chain)[1]) * self.block_size

    def fits(self, ids: Sequence[int], chain: KeyChain | None = None) -> bool:
        """Whether `reserve` would find room for `ids` now (with no headroom): its
        very test. The cached blocks it would take count in `available()` while no
        one holds them, but holding them takes them out of it; counting them as
        room too made `Scheduler.has_work` see a request `_admit` cannot place, and
        the worker ran rounds without sleeping while parked requests held the rest."""
        _, found, _ = self._hit(ids, chain)
        need = blocks_for(len(ids), self.block_size) - len(found)
        return need <= self.pool.available() - self.pool.unheld(found)

    def reserve(self, row: KVRow, ids: Sequence[int], headroom: int = 1,
                chain: KeyChain | None = None) -> int | None:
        """Gives `row` the blocks to prefill `ids`: the longest cached prefix of
        full blocks (always leaving at least one token to compute, for its logits)
        and fresh blocks for the rest. Returns the number of positions served
        from the cache, or None (nothing held) when the pool cannot hold the rest
        plus `headroom` blocks for the decoding that follows. (With a local pool
        the row takes the cached local blocks of its prefix's last window now, and
        local blocks for what it computes as its passes write them: `_cover`.)"""
        bs = self.block_size
        reusable, found, local = self._hit(ids, chain)
        need = blocks_for(len(ids), bs) - len(found)
        if need + headroom > self.pool.available() - self.pool.unheld(found):
            return None  # (nothing touched: the cached blocks keep their place in the eviction order)
        if self.pool.prefix is not None:
            self.pool.prefix.count(len(found), len(reusable))
        self.pool.hold(found)
        row.blocks = found + self.pool.allocate(need)
        if self.local is not None:
            if not self.local.capacity:  # (every pass takes both pools' arrays)
                self.local.grow_to(min(self.local.max_blocks, self.local.initial_blocks))
            self.local.hold(local)
            row.local = [NULL_BLOCK] * (len(found) - len(local)) + local
        self._version += 1
        return len(found) * bs

    def unreserve(self, row: KVRow, ids: Sequence[int], cached: int, chain: KeyChain | None = None) -> None:
        """Undoes `reserve(row, ids)`, which returned `cached`, for a row that does not start
        after all (it reserves again in a later round): its blocks go back uncached, and the
        prefix hits and misses that reserve counted are taken back. (Without this a request
        that waited a round for its pass counted its lookup twice or more in the stats'
        prefix_hits and prefix_misses.)"""
        if self.pool.prefix is not None:
            self.pool.prefix.count(-(cached // self.block_size), -len(self._reusable(ids, chain)))
        self.release(row)

    def _cover(self, row: KVRow, start: int, end: int) -> None:
        """With a local pool: the row's local blocks for a pass writing [start, end):
        those wholly before the window of `start` go back (cached, if registered),
        and blocks up to the one holding `end - 1` are taken (where it holds blocks
        of `pool`)."""
        if self.local is None or row is PADDING_ROW:
            return
        local = row.local
        i = min(self._first_block(start), len(local)) - 1
        while i >= 0 and local[i] != NULL_BLOCK:  # (given back from the front: nulls come first)
            self.local.release([local[i]])
            local[i] = NULL_BLOCK
            i -= 1
            self._version += 1
        n = min(blocks_for(end, self.block_size), len(row.blocks))
        if n > len(local):
            local.extend(self.local.allocate(n - len(local)))
            self._version += 1

    def sheds(self, row: KVRow) -> bool:
        """Whether the row's next decode step gives a local block back (`extend`):
        its caller caches the row's full blocks first (`cache_filled`), so a later
        prompt behind this row's tokens finds the windowed layers' blocks too."""
        return self.local is not None and 0 < self._first_block(row.pos) <= len(row.local) and \
            row.local[self._first_block(row.pos) - 1] != NULL_BLOCK

    def cache_filled(self, row: KVRow, ids: Sequence[int], filled: int, chain: KeyChain | None = None) -> None:
        """Caches the row's full blocks whose positions [0, filled) hold `ids`
        (and its local blocks among them that it still holds)."""
        if self.pool.prefix is None:
            return
        n = min(filled, len(ids)) // self.block_size
        keys = self._keys(ids, n, chain)
        self.pool.register(keys, row.blocks[:n])
        if self.local is not None:
            # Where this row's full block is the one cached under a key, its local block is
            # cached with it, in place of another local block cached there (one whose full
            # block was evicted first). Kept as it was, a later prompt took this row's full
            # block and that other local block: the pools' blocks were then shared unevenly,
            # the local pool could need more blocks than the full one (whose room alone
            # admission and preemption count), and `extend` raised PoolFull in `_cover`
            # (found by tests/test_prefix_cache_hunt.py's host-side walk of the pools).
            for key, full, local in zip(keys, row.blocks[:n], row.local[:n]):
                if local == NULL_BLOCK:
                    continue
                if self.pool.prefix.block(key) == full:
                    self.local.claim(key, local)
                else:
                    self.local.register([key], [local])

    def release(self, row: KVRow, ids: Sequence[int] | None = None, chain: KeyChain | None = None) -> None:
        """The row lets go of its blocks; with `ids` (the tokens at its positions
        so far) its full blocks stay cached for later prompts."""
        if ids is not None:
            self.cache_filled(row, ids, row.pos, chain)
        self.pool.release(row.blocks[::-1])  # the tail first: evicted before the prefix it extends
        row.blocks = []
        if self.local is not None:
            self.local.release([b for b in row.local[::-1] if b != NULL_BLOCK])
            row.local = []
        self._version += 1

    # -- decoding -------------------------------------------------------------------
    def short_of_blocks(self, rows: Sequence[KVRow]) -> int:
        """Blocks the rows need before their next position can be written, beyond what they hold."""
        return sum(1 for r in rows if r.pos // self.block_size >= len(r.blocks))

    def extend(self, rows: Sequence[KVRow]) -> None:
        """A block for each row whose next position starts one (the caller made sure
        there is room); with a local pool, the row's local blocks follow its window."""
        for r in rows:
            while r.pos // self.block_size >= len(r.blocks):
                r.blocks.extend(self.pool.allocate(1))
                self._version += 1
            self._cover(r, r.pos, r.pos + 1)

    def extend_to(self, row: KVRow, end: int) -> int:
        """Blocks for the row's positions up to `end` (exclusive) as far as the pool has
        room (a verify pass writing drafts ahead); returns the positions the row holds."""
        while len(row.blocks) * self.block_size < end and self.pool.available() > 0:
            row.blocks.extend(self.pool.allocate(1))
            self._version += 1
        held = len(row.blocks) * self.block_size
        self._cover(row, row.pos, min(end, held))
        return held

    def trim(self, row: KVRow) -> None:
        """Gives back the blocks past the one holding the row's next position: after a
        verify pass they hold only rejected drafts (never cached: the prefix cache
        registers only full blocks below `pos`)."""
        keep = row.pos // self.block_size + 1
        if len(row.blocks) > keep:
            self.pool.release(row.blocks[keep:][::-1])
            del row.blocks[keep:]
            self._version += 1
        if self.local is not None and len(row.local) > keep:
            self.local.release([b for b in row.local[keep:][::-1] if b != NULL_BLOCK])
            del row.local[keep:]
            self._version += 1

    def _with_local(self, tables: Tables, rows: Sequence[KVRow], width: int, blocks: np.ndarray,
                    offsets: np.ndarray) -> Tables:
        """Adds the local pool's tables of a pass to `tables` (same positions, the
        rows' `local` tables; `blocks` are the written positions' entries)."""
        if self.local is not None:
            gather = self._gather_rows(_table(rows, width, "local"), self.local)
            tables.local = Tables(array(gather), array(self._writes(blocks, offsets, self.local)), len(rows),
                                  width, self.block_size)
        return tables

    def _written(self, rows: Sequence[KVRow], pos: np.ndarray, real: np.ndarray, attr: str) -> np.ndarray:
        """The table entries (block ids) of the positions `pos` (B, N) each row writes
        (where `real`; the null block elsewhere), from its table `attr`."""
        blocks = np.full(pos.shape, NULL_BLOCK, dtype=np.int64)
        for i, r in enumerate(rows):
            if real[i].any():
                blocks[i, real[i]] = np.asarray(getattr(r, attr), dtype=np.int64)[pos[i, real[i]] // self.block_size]
        return blocks.reshape(-1)

    def verify_tables(self, rows: Sequence[KVRow], width: int, lengths: Sequence[int]) -> Tables:
        """The tables of a verify pass writing `width` tokens per row at positions
        pos .. pos + width - 1: row b's token j is written for j <= lengths[b] (its
        last token and its drafts, in blocks it holds: `extend_to`), to the null
        block past it. The span covers every row's last written position, rounded up
        to `span_step` blocks as a decode pass's (a compiled verify pass is traced
        again only when it grows past that)."""
        bs = self.block_size
        blocks_wide = max(blocks_for(r.pos + n + 1, bs) for r, n in zip(rows, lengths))
        blocks_wide = -(-blocks_wide // self.span_step) * self.span_step
        pos = np.asarray([r.pos for r in rows], dtype=np.int64)[:, None] + np.arange(width)[None, :]
        real = np.arange(width)[None, :] <= np.asarray(lengths)[:, None]
        return self._written_tables(rows, pos, real, blocks_wide)

    def span(self, rows: Sequence[KVRow]) -> int:
        """Positions a decode pass over `rows` gathers per row."""
        if not rows:
            return 0
        width = max(r.pos // self.block_size + 1 for r in rows)
        return -(-width // self.span_step) * self.span_step * self.block_size

    def _stacked(self, rows: Sequence[KVRow], width: int, attr: str) -> tuple[Array, Array]:
        """The pieces to gather and the block table of a decode pass over the rows'
        tables `attr`, made again only when some row's blocks or the pool's size changed."""
        pool = self.pool if attr == "blocks" else self.local
        key = (width, self._version, pool.capacity, tuple(id(r) for r in rows))
        cached = self._tables.get(attr)
        if cached is None or cached[0] != key:
            table = _table(rows, width, attr)
            cached = self._tables[attr] = (key, array(self._gather_rows(table, pool)), array(table))
        return cached[1], cached[2]

    def decode_tables(self, rows: Sequence[KVRow]) -> Tables:
        """The tables of a decode pass writing each row's position `pos`."""
        bs = self.block_size
        width = self.span(rows) // bs
        offsets = np.fromiter((r.pos % bs for r in rows), np.int64, len(rows))
        tables = self._decode_tables(rows, width, "blocks", offsets)
        windowed = tables
        if self.local is not None:
            windowed = tables.local = self._decode_tables(rows, width, "local", offsets)
        if self.window and self.window_width < width:
            self._window_tables(rows, windowed)
        return tables

    def _decode_tables(self, rows: Sequence[KVRow], width: int, attr: str, offsets: np.ndarray) -> Tables:
        pool = self.pool if attr == "blocks" else self.local
        gather, table = self._stacked(rows, width, attr)
        blocks = np.fromiter((getattr(r, attr)[r.pos // self.block_size] for r in rows), np.int64, len(rows))
        return Tables(gather, array(self._writes(blocks, offsets, pool)), len(rows), width, self.block_size, table)

    def _window_tables(self, rows: Sequence[KVRow], tables: Tables) -> None:
        """Adds the windowed layers' narrower tables: from the block holding each
        row's first visible position, `window_width` blocks (of the local pool, with one)."""
        bs, wb, window = self.block_size, self.window_width, self.window or 1
        attr, pool = ("blocks", self.pool) if self.local is None else ("local", self.local)
        first = [max(0, r.pos - window + 1) // bs for r in rows]
        key = (self._version, pool.capacity, tuple(id(r) for r in rows), tuple(first))
        if self._window is None or self._window[0] != key:
            table = np.full((len(rows), wb), NULL_BLOCK, dtype=np.int32)
            for i, (r, f) in enumerate(zip(rows, first)):
                part = getattr(r, attr)[f:f + wb]
                table[i, :len(part)] = part
            start = np.asarray(first, dtype=np.int32) * bs
            self._window = (key, array(self._gather_rows(table, pool)), array(start))
        tables.window, tables.window_width = self.window, wb
        tables.window_rows, tables.window_start = self._window[1], self._window[2]

    def prefill_tables(self, rows: Sequence[KVRow], start: int, length: int, lengths: Sequence[int]) -> Tables:
        """The tables of a prefill pass writing positions [start, start + length) of
        each row; row b's positions from `lengths[b]` on are padding (written to the
        null block). With a local pool the rows' local blocks are updated for it (`_cover`)."""
        return self.extend_tables(rows, [start] * len(rows), length, lengths, blocks_for(start + length,
                                                                                         self.block_size))

    def extend_width(self, end: int) -> int:
        """Blocks an extend pass gathers per row to cover positions [0, end): a
        multiple of the decode step's span step, rounded up to a power of two or
        one and a half times one (two sizes per octave), so the compiled pass is
        traced for few widths (each new one is a trace on the host, which a server
        would otherwise meet for hours). The padding costs little: the pass's new
        tokens are few, and the slots past each row's end are masked."""
        return extend_bucket(blocks_for(end, self.block_size), self.span_step)

    def extend_tables(self, rows: Sequence[KVRow], starts: Sequence[int], width: int,
                      lengths: Sequence[int], blocks_wide: int) -> Tables:
        """The tables of a pass where row b writes `width` tokens at positions
        starts[b] .. starts[b] + width - 1, those below lengths[b] (an end
        position) into its blocks, the rest (padding) into the null block; each
        row gathers `blocks_wide` blocks. A prefill pass (one start), and the
        scheduler's compiled extend pass (padded; attended as a verify pass is,
        with `verify_mask`; `extend_width`)."""
        pos = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(width)[None, :]
        real = pos < np.asarray(lengths, dtype=np.int64)[:, None]
        for r, s, end in zip(rows, starts, lengths):
            if end > s:
                self._cover(r, s, end)
        return self._written_tables(rows, pos, real, blocks_wide)

    def _written_tables(self, rows: Sequence[KVRow], pos: np.ndarray, real: np.ndarray, blocks_wide: int) -> Tables:
        """A pass's tables (both pools' where there are two): `blocks_wide` table entries
        gathered per row, and the positions `pos` (B, N) written where `real` (the null
        block elsewhere)."""
        offsets = (pos % self.block_size).reshape(-1)
        gather = self._gather_rows(_table(rows, blocks_wide))
        tables = Tables(array(gather), array(self._writes(self._written(rows, pos, real, "blocks"), offsets)),
                        len(rows), blocks_wide, self.block_size)
        if self.local is None:
            return tables
        return self._with_local(tables, rows, blocks_wide, self._written(rows, pos, real, "local"), offsets)

    def _gather_rows(self, table: np.ndarray, pool: BlockPool | None = None) -> np.ndarray:
        """(2 * B * kv_heads * width,) pieces of the pool's (2 * blocks * kv_heads,
        block_size * head_dim) view, in (keys/values, row, head, entry) order."""
        pool = pool or self.pool
        h, nb = pool.kv_heads, pool.capacity
        rows = (table[:, None, :].astype(np.int64) * h + np.arange(h)[None, :, None]).reshape(-1)
        return np.concatenate([rows, rows + nb * h]).astype(np.int32)

    def _writes(self, blocks: np.ndarray, offsets: np.ndarray, pool: BlockPool | None = None) -> np.ndarray:
        """(N * kv_heads,) slots of new tokens (block, offset) in the pool's
        (2, blocks * kv_heads * block_size, head_dim) view, token by token, head by head."""
        h, bs = (pool or self.pool).kv_heads, self.block_size
        return ((blocks[:, None] * h + np.arange(h)[None, :]) * bs + offsets[:, None]).reshape(-1).astype(np.int32)

    # -- moving, resetting --------------------------------------------------------------
    def room_for(self, rows: Sequence[KVRow]) -> bool:
        """Whether this shard's pools can take copies of the rows' blocks (`copy_in`)."""
        if sum(len(r.blocks) for r in rows) > self.pool.available():
            return False
        return self.local is None or sum(_held(r.local) for r in rows) <= self.local.available()

    def copy_in(self, src: "ShardKV", row: KVRow) -> tuple[list[int], list[int] | None]:
        """Copies a row's blocks from another shard's pools into fresh blocks of these
        (see `room_for`); returns its new tables (`adopt` them once it left `src`)."""
        blocks = copy_blocks(src.pool, self.pool, row.blocks)
        if self.local is None:
            return blocks, None
        held = [b for b in row.local if b != NULL_BLOCK]
        new = iter(copy_blocks(src.local, self.local, held))
        return blocks, [NULL_BLOCK if b == NULL_BLOCK else next(new) for b in row.local]

    def adopt(self, row: KVRow, blocks: list[int], local: list[int] | None = None) -> None:
        """The row's table is now `blocks` of this shard's pool (moved in from another
        shard; `local`: its table in the local pool)."""
        row.blocks = blocks
        if local is not None:
            row.local = local
        self._version += 1

    def forget_table(self) -> None:
        """Drops the last decode tables (device arrays)."""
        self._tables = {}
        self._window = None

    def close(self) -> None:
        self.forget_table()
        for pool in self._pools():
            pool.close()

    def reset(self) -> None:
        """Empties the pools (their arrays could not be computed); no row may hold blocks."""
        self.close()
        self._version += 1


def extend_bucket(blocks: int, step: int = 1) -> int:
    """`blocks` rounded up to a power of two or three quarters of one (two sizes per
    octave), then to a multiple of `step` (ShardKV.extend_width)."""
    size = 1 << max(0, blocks - 1).bit_length()  # the power of two at or above
    if size >= 4 and blocks <= size * 3 // 4:
        size = size * 3 // 4
    return -(-size // step) * step


def _held(table: Sequence[int]) -> int:
    return sum(1 for b in table if b != NULL_BLOCK)


def _table(rows: Sequence[KVRow], width: int, attr: str = "blocks") -> np.ndarray:
    """(B, width) int32: each row's table `attr` (`blocks` or `local`), padded with the null block."""
    table = np.full((len(rows), width), NULL_BLOCK, dtype=np.int32)
    for i, r in enumerate(rows):
        blocks = getattr(r, attr)
        n = min(len(blocks), width)
        table[i, :n] = blocks[:n]
    return table
