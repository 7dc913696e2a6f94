"""The rows' side of the block pool: which blocks each request holds, what a
request needs to be admitted, and the block tables of each forward pass.

A request holds `req.blocks`, its block table: block i holds its positions
[i * block_size, (i + 1) * block_size). Joining or leaving a batch changes no
other row's cache, only which tables the next pass stacks. Everything here is
host work on small lists; the only arrays made are a pass's table and slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from amlx._mlx import Array, array
from amlx.kv.paged import Tables
from amlx.kv.pool import NULL_BLOCK, BlockPool
from amlx.kv.prefix import KeyChain, block_keys

__all__ = ["KVRow", "PADDING_ROW", "ShardKV", "blocks_for", "preemption_order"]


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class KVRow(Protocol):
    """What a row (an engine Request) carries for the pool."""

    blocks: list[int]
    pos: int
    created: float


class PaddingRow:
    """A row that pads a decode batch to a bucket size: it holds only the null
    block, at position 0, so its writes land in the null block and it reads nothing."""

    blocks: list[int] = [NULL_BLOCK]
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
    decode passes longer than it give those layers narrower tables of their own."""

    def __init__(self, pool: BlockPool, span_step: int = 1, window: int | None = None):
        self.pool = pool
        self.block_size = pool.block_size
        self.span_step = max(1, span_step)
        self.window = window
        # blocks that can hold a window ending anywhere in a block
        self.window_width = blocks_for(window - 1, pool.block_size) + 1 if window else 0
        # (key, pieces to gather, block table) of the last decode pass, as device arrays
        self._table: tuple[tuple, Array, Array] | None = None
        self._window: tuple[tuple, Array, Array] | None = None  # the same for the windowed layers
        self._version = 0  # bumped whenever any row's blocks change: part of the table's key

    # -- admission ------------------------------------------------------------------
    # (`chain`, where given, is the request's KeyChain: its keys are hashed once)
    def _keys(self, ids: Sequence[int], n: int, chain: KeyChain | None) -> list[bytes]:
        """The keys of the first `n` full blocks of `ids`."""
        return block_keys(ids[:n * self.block_size], self.block_size) if chain is None else chain.keys(ids, n)

    def _reusable(self, ids: Sequence[int], chain: KeyChain | None) -> list[bytes]:
        """Keys of the blocks of `ids` a request may take from the cache: full
        blocks, leaving at least one token to compute (its logits are needed)."""
        return self._keys(ids, (len(ids) - 1) // self.block_size, chain)

    def peek(self, ids: Sequence[int], chain: KeyChain | None = None) -> int:
        """Positions of `ids` the prefix cache holds now (nothing is held)."""
        if self.pool.prefix is None:
            return 0
        return len(self.pool.prefix.lookup(self._reusable(ids, chain))) * self.block_size

    def fits(self, ids: Sequence[int], chain: KeyChain | None = None) -> bool:
        """Whether `reserve` would find room for `ids` now (with no headroom)."""
        need = blocks_for(len(ids), self.block_size) - self.peek(ids, chain) // self.block_size
        return need <= self.pool.available()

    def reserve(self, row: KVRow, ids: Sequence[int], headroom: int = 1,
                chain: KeyChain | None = None) -> int | None:
        """Gives `row` the blocks to prefill `ids`: the longest cached prefix of
        full blocks (always leaving at least one token to compute, for its logits)
        and fresh blocks for the rest. Returns the number of positions served
        from the cache, or None (nothing held) when the pool cannot hold the rest
        plus `headroom` blocks for the decoding that follows."""
        bs = self.block_size
        reusable = self._reusable(ids, chain) if self.pool.prefix is not None else []
        found = self.pool.lookup(reusable)
        need = blocks_for(len(ids), bs) - len(found)
        if need + headroom > self.pool.available() - self.pool.unheld(found):
            return None  # (nothing touched: the cached blocks keep their place in the eviction order)
        if self.pool.prefix is not None:
            self.pool.prefix.count(len(found), len(reusable))
        self.pool.hold(found)
        row.blocks = found + self.pool.allocate(need)
        self._version += 1
        return len(found) * bs

    def cache_filled(self, row: KVRow, ids: Sequence[int], filled: int, chain: KeyChain | None = None) -> None:
        """Caches the row's full blocks whose positions [0, filled) hold `ids`."""
        if self.pool.prefix is None:
            return
        n = min(filled, len(ids)) // self.block_size
        self.pool.register(self._keys(ids, n, chain), row.blocks[:n])

    def release(self, row: KVRow, ids: Sequence[int] | None = None, chain: KeyChain | None = None) -> None:
        """The row lets go of its blocks; with `ids` (the tokens at its positions
        so far) its full blocks stay cached for later prompts."""
        if ids is not None:
            self.cache_filled(row, ids, row.pos, chain)
        self.pool.release(row.blocks[::-1])  # the tail first: evicted before the prefix it extends
        row.blocks = []
        self._version += 1

    # -- decoding -------------------------------------------------------------------
    def short_of_blocks(self, rows: Sequence[KVRow]) -> int:
        """Blocks the rows need before their next position can be written, beyond what they hold."""
        return sum(1 for r in rows if r.pos // self.block_size >= len(r.blocks))

    def extend(self, rows: Sequence[KVRow]) -> None:
        """A block for each row whose next position starts one (the caller made sure there is room)."""
        for r in rows:
            while r.pos // self.block_size >= len(r.blocks):
                r.blocks.extend(self.pool.allocate(1))
                self._version += 1

    def extend_to(self, row: KVRow, end: int) -> int:
        """Blocks for the row's positions up to `end` (exclusive) as far as the pool has
        room (a verify pass writing drafts ahead); returns the positions the row holds."""
        while len(row.blocks) * self.block_size < end and self.pool.available() > 0:
            row.blocks.extend(self.pool.allocate(1))
            self._version += 1
        return len(row.blocks) * self.block_size

    def trim(self, row: KVRow) -> None:
        """Gives back the blocks past the one holding the row's next position: after a
        verify pass they hold only rejected drafts (never cached: the prefix cache
        registers only full blocks below `pos`)."""
        keep = row.pos // self.block_size + 1
        if len(row.blocks) > keep:
            self.pool.release(row.blocks[keep:][::-1])
            del row.blocks[keep:]
            self._version += 1

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
        blocks = np.full((len(rows), width), NULL_BLOCK, dtype=np.int64)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            blocks[i, :n + 1] = np.asarray(r.blocks, dtype=np.int64)[pos[i, :n + 1] // bs]
        gather = self._gather_rows(_table(rows, blocks_wide))
        return Tables(array(gather), array(self._writes(blocks.reshape(-1), (pos % bs).reshape(-1))), len(rows),
                      blocks_wide, bs)

    def span(self, rows: Sequence[KVRow]) -> int:
        """Positions a decode pass over `rows` gathers per row."""
        if not rows:
            return 0
        width = max(r.pos // self.block_size + 1 for r in rows)
        return -(-width // self.span_step) * self.span_step * self.block_size

    def decode_tables(self, rows: Sequence[KVRow]) -> Tables:
        """The tables of a decode pass writing each row's position `pos`. What to
        gather is made again only when some row's blocks or the pool's size changed."""
        bs = self.block_size
        width = self.span(rows) // bs
        key = (width, self._version, self.pool.capacity, tuple(id(r) for r in rows))
        if self._table is None or self._table[0] != key:
            table = _table(rows, width)
            self._table = (key, array(self._gather_rows(table)), array(table))
        blocks = np.fromiter((r.blocks[r.pos // bs] for r in rows), np.int64, len(rows))
        offsets = np.fromiter((r.pos % bs for r in rows), np.int64, len(rows))
        tables = Tables(self._table[1], array(self._writes(blocks, offsets)), len(rows), width, bs, self._table[2])
        if self.window and self.window_width < width:
            self._window_tables(rows, tables)
        return tables

    def _window_tables(self, rows: Sequence[KVRow], tables: Tables) -> None:
        """Adds the windowed layers' narrower tables: from the block holding each
        row's first visible position, `window_width` blocks."""
        bs, wb, window = self.block_size, self.window_width, self.window or 1
        first = [max(0, r.pos - window + 1) // bs for r in rows]
        key = (self._version, self.pool.capacity, tuple(id(r) for r in rows), tuple(first))
        if self._window is None or self._window[0] != key:
            table = np.full((len(rows), wb), NULL_BLOCK, dtype=np.int32)
            for i, (r, f) in enumerate(zip(rows, first)):
                part = r.blocks[f:f + wb]
                table[i, :len(part)] = part
            start = np.asarray(first, dtype=np.int32) * bs
            self._window = (key, array(self._gather_rows(table)), array(start))
        tables.window, tables.window_width = self.window, wb
        tables.window_rows, tables.window_start = self._window[1], self._window[2]

    def prefill_tables(self, rows: Sequence[KVRow], start: int, length: int, lengths: Sequence[int]) -> Tables:
        """The tables of a prefill pass writing positions [start, start + length) of
        each row; row b's positions from `lengths[b]` on are padding (written to the null block)."""
        bs = self.block_size
        width = blocks_for(start + length, bs)
        pos = np.arange(start, start + length)
        blocks = np.full((len(rows), length), NULL_BLOCK, dtype=np.int64)
        for i, r in enumerate(rows):
            real = pos < lengths[i]
            blocks[i, real] = np.asarray(r.blocks, dtype=np.int64)[pos[real] // bs]
        offsets = np.broadcast_to(pos % bs, blocks.shape)
        gather = self._gather_rows(_table(rows, width))
        return Tables(array(gather), array(self._writes(blocks.reshape(-1), offsets.reshape(-1))), len(rows),
                      width, bs)

    def _gather_rows(self, table: np.ndarray) -> np.ndarray:
        """(2 * B * kv_heads * width,) pieces of the pool's (2 * blocks * kv_heads,
        block_size * head_dim) view, in (keys/values, row, head, entry) order."""
        h, nb = self.pool.kv_heads, self.pool.capacity
        rows = (table[:, None, :].astype(np.int64) * h + np.arange(h)[None, :, None]).reshape(-1)
        return np.concatenate([rows, rows + nb * h]).astype(np.int32)

    def _writes(self, blocks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """(N * kv_heads,) slots of new tokens (block, offset) in the pool's
        (2, blocks * kv_heads * block_size, head_dim) view, token by token, head by head."""
        h, bs = self.pool.kv_heads, self.block_size
        return ((blocks[:, None] * h + np.arange(h)[None, :]) * bs + offsets[:, None]).reshape(-1).astype(np.int32)

    def adopt(self, row: KVRow, blocks: list[int]) -> None:
        """The row's table is now `blocks` of this shard's pool (moved in from another shard)."""
        row.blocks = blocks
        self._version += 1

    def forget_table(self) -> None:
        """Drops the last decode tables (device arrays)."""
        self._table = self._window = None

    def close(self) -> None:
        self.forget_table()
        self.pool.close()

    def reset(self) -> None:
        """Empties the pool (its arrays could not be computed); no row may hold blocks."""
        self.close()
        self._version += 1


def _table(rows: Sequence[KVRow], width: int) -> np.ndarray:
    table = np.full((len(rows), width), NULL_BLOCK, dtype=np.int32)
    for i, r in enumerate(rows):
        n = min(len(r.blocks), width)
        table[i, :n] = r.blocks[:n]
    return table
