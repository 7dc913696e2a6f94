"""Attention's view of the block pool for one forward pass.

`PagedLayer` stands where a contiguous `KVCache` stands for `Attention`: it
writes the pass's new keys and values into the layer's pool array and hands
back keys and values to attend over, gathered through the rows' block tables.
`Tables` is what every layer of the pass shares: the (B, max_blocks) int32
block table and the flat slots of the new tokens, both made on the host once
per pass (`amlx.kv.rows`).

Reading: the table's blocks are gathered (`take` on the block axis) into
(B, kv_heads, max_blocks * block_size, head_dim), position p of a row at index
p, and slots a row has not filled are masked (decode) or lie past the causal
diagonal (prefill). See benchmarks/kv_gather.py for the forms measured on the
CPU. The gathered layout is also what the CUDA decode kernel reads (`kv`).
"""

from __future__ import annotations

from dataclasses import dataclass

from amlx._mlx import Array, ops
from amlx._mlx import int32 as _int32
from amlx.cache import memoized, window_mask

__all__ = ["PagedLayer", "Tables"]


@dataclass
class Tables:
    """One forward pass's block tables: `table` (B, max_blocks) int32 block ids
    (unused entries: the null block), `slots` the flat slot (block * block_size
    + offset) of each new token, row by row ((B,) in decode, (B*L,) in prefill)."""

    table: Array
    slots: Array
    block_size: int

    @property
    def span(self) -> int:
        """Positions one row's gathered keys cover."""
        return self.table.shape[1] * self.block_size


class PagedLayer:
    """One layer's pool array (2, blocks, block_size, kv_heads, head_dim) seen
    through the pass's tables; `pool` is the updated array after the pass."""

    def __init__(self, pool: Array, tables: Tables, window: int | None = None):
        self.pool = pool
        self.tables = tables
        self.window = window

    def _write(self, new: Array, memo: dict | None) -> None:
        """Writes `new` (2, N, kv_heads, head_dim), token n at slots[n]: one scatter."""
        _, nb, bs, h, d = self.pool.shape
        n = new.shape[1]
        slots = self.tables.slots
        at = memoized(memo, ("slots", n, h, d), lambda: ops.broadcast_to(ops.reshape(slots, (1, n, 1, 1)),
                                                                         (2, n, h, d)))
        flat = ops.put_along_axis(ops.reshape(self.pool, (2, nb * bs, h, d)), at, new, 1)
        self.pool = ops.reshape(flat, (2, nb, bs, h, d))

    def gathered(self, memo: dict | None = None) -> Array:
        """(2, B, kv_heads, span, head_dim): each row's blocks in table order."""
        table = self.tables.table
        b, mb = table.shape
        _, _, bs, h, d = self.pool.shape
        flat = memoized(memo, ("table", b, mb), lambda: ops.reshape(table, (b * mb,)))
        rows = ops.reshape(ops.take(self.pool, flat, 1), (2, b, mb * bs, h, d))
        return ops.transpose(rows, (0, 1, 3, 2, 4))

    @property
    def kv(self) -> Array:
        """The gathered keys and values (2, B, kv_heads, span, head_dim), as a
        contiguous cache holds them (what the CUDA decode kernel reads)."""
        return self.gathered()

    @staticmethod
    def _halves(kv: Array, end: int) -> tuple[Array, Array]:
        _, b, h, _, d = kv.shape
        return tuple(ops.reshape(ops.slice(kv, (i, 0, 0, 0, 0), (i + 1, b, h, end, d)), (b, h, end, d))
                     for i in (0, 1))  # type: ignore[return-value]

    def update_prefill(self, k: Array, v: Array, start: int, memo: dict | None = None):
        """Writes k, v (B, H, L, D) at positions [start, start+L) of each row and returns
        (keys, values, mask) over positions [0, start+L), as KVCache.update_prefill."""
        if v.shape != k.shape:
            raise ValueError(f"PagedLayer: keys {k.shape} and values {v.shape} differ in shape")
        b, h, length, d = k.shape
        end = start + length
        rows = [ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (1, b * length, h, d)) for x in (k, v)]
        self._write(ops.concatenate(rows, axis=0), memo)
        keys, values = self._halves(self.gathered(memo), end)
        if self.window is None or end <= self.window:
            return keys, values, "causal"
        return keys, values, memoized(memo, ("prefill", start, end, self.window),
                                   lambda: window_mask(start, end, self.window))

    def update_decode(self, k: Array, v: Array, positions: Array, memo: dict | None = None):
        """Writes one position per row (k, v (B, H, 1, D) at `positions` (B,) int32) and
        returns (keys, values, mask (B, 1, 1, span)) as KVCache.update_decode."""
        b, h, _, d = k.shape
        new = ops.concatenate([ops.reshape(k, (1, b, h, d)), ops.reshape(v, (1, b, h, d))], axis=0)
        pos = self.write_decode(new, positions, memo)
        kv = self.gathered(memo)
        span, window = kv.shape[3], self.window

        def visible() -> Array:
            slots = ops.arange(span, dtype=_int32)
            mask = slots <= pos
            if window is not None:
                mask = ops.logical_and(mask, slots > pos - window)
            return mask

        keys, values = self._halves(kv, span)
        return keys, values, memoized(memo, ("mask", span, window), visible)

    def write_decode(self, new: Array, positions: Array, memo: dict | None = None) -> Array:
        """Writes one position per row, keys and values in one scatter: `new`
        (2, B, H, 1, D) or (2, B, H, D). Returns the positions as (B, 1, 1, 1)."""
        b, h, d = new.shape[1], new.shape[2], new.shape[-1]
        self._write(ops.reshape(new, (2, b, h, d)), memo)
        return memoized(memo, ("rows", b), lambda: ops.reshape(positions, (b, 1, 1, 1)))
