"""Attention's view of the block pool for one forward pass.

`PagedLayer` stands where a contiguous `KVCache` stands for `Attention`: it
writes the pass's new keys and values into the layer's pool array and hands
back keys and values to attend over, gathered through the rows' block tables.
`Tables` is what every layer of the pass shares, made on the host once per
pass (`amlx.kv.rows`): which pool rows to gather and where the new tokens go.

Layout: a layer's pool is (2, blocks, kv_heads, block_size, head_dim), so one
head of one block, (block_size, head_dim), is contiguous. Reading gathers those
pieces in (keys/values, row, head, block) order with one `take` on the first
axis of the pool seen as (2 * blocks * kv_heads, block_size * head_dim): the
result is already (2, B, kv_heads, span, head_dim), contiguous, position p of
a row at index p, which attention (and the decode kernel, `kv`) reads as
it read the old contiguous cache. Slots a row has not filled are masked
(decode) or lie past the causal diagonal (prefill). benchmarks/kv_gather.py
compares this with the other forms measured on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from amlx._mlx import Array, ops
from amlx._mlx import int32 as _int32
from amlx.cache import decode_mask, memoized, window_mask

__all__ = ["PagedLayer", "Tables", "layer_views", "read_views", "verify_mask", "written"]

# Whether the decode kernel reads a quantized pool itself (dequantizing in
# registers) or gets the gathered, dequantized keys: on by default;
# benchmarks/kv_bits.py and tests/test_decode_kernels.py turn it off to compare.
QUANTIZED_KERNEL = True

# Whether the decode kernel reads the pool through `ops.buffer_view` handles
# (`read_views`), which leave the pool's data held by the pool alone, so that the
# step's write into it happens in place. Read as the arrays themselves, the
# kernel's read (before the write, in the same step) and the previous step's (in
# flight when the next is launched) made MLX's scatter copy each layer's whole
# pool every step: the pool twice in memory, and read and written once more per
# step. On by default; AMLX_POOL_VIEWS=0 is the benchmarks' way back (pool_write.py).
READ_VIEWS = os.environ.get("AMLX_POOL_VIEWS", "1") != "0"

# Whether the CUDA decode kernel, reading the pool through those views, writes a step's
# new keys and values into it itself (decode_attention's `write_pool`) instead of handing
# them to a scatter: a scatter and two reshapes fewer a layer in every decode step, whose
# host time (graph nodes) bounds small models' single stream. On by default;
# AMLX_KERNEL_WRITES=0 keeps the scatter (benchmarks compare the two).
KERNEL_WRITES = os.environ.get("AMLX_KERNEL_WRITES", "1") != "0"


def read_views(arrays: Sequence[Array]) -> list[Array]:
    """Handles on `arrays`' buffers for the decode kernel to read (`PagedLayer.reads`),
    or [] (read the arrays) when READ_VIEWS is off or one of them is not a whole
    launched buffer. Only for a pass on the stream that wrote `arrays`: a handle
    carries no dependency on its array, so stream order alone orders the reads."""
    if not READ_VIEWS:
        return []
    return ops.buffer_views(arrays) or []


@dataclass
class Tables:
    """One forward pass's reading and writing plan, shared by every layer:

    - `rows` (2 * B * kv_heads * width,) int32: the pool pieces to gather, in
      (keys/values, row, head, table entry) order (unused entries: the null block);
    - `writes` (N * kv_heads,) int32: for each new token n (row by row, then
      position) and head, its slot in the pool seen as (2, blocks * kv_heads *
      block_size, head_dim);
    - `batch`, `width` (table entries per row), `block_size`;
    - `table` (B, width) int32, the block ids themselves, in decode passes;
    - `window`, `window_rows`, `window_start`, `window_width`: where layers with a
      sliding window of at most `window` read (decode passes, when shorter);
    - `local`: with a pool of their own for the windowed layers (`ShardKV.local`),
      those layers' tables (the window ones among them)."""

    rows: Array
    writes: Array
    batch: int
    width: int
    block_size: int
    table: Array | None = None  # (B, width) int32 block ids (what the decode kernel reads)
    # decode passes of models with sliding-window layers: those layers gather only the
    # `window_width` blocks that can hold a row's window, starting at position window_start[b]
    window: int | None = None
    window_rows: Array | None = None
    window_start: Array | None = None
    window_width: int = 0
    local: "Tables | None" = None  # the windowed layers' tables, in their own pool

    @property
    def span(self) -> int:
        """Positions one row's gathered keys cover."""
        return self.width * self.block_size


class PagedLayer:
    """One layer's pool arrays seen through the pass's tables: one array (2,
    blocks, kv_heads, block_size, head_dim), or with `bits` three (packed values,
    scales, biases, each (2, blocks, kv_heads, block_size, n); amlx.kv.pool).
    `parts` are the updated arrays after the pass; `reads`, where given, handles
    on the same buffers (`read_views`) that the decode kernel reads instead."""

    def __init__(self, parts: Array | Sequence[Array], tables: Tables, window: int | None = None,
                 bits: int | None = None, group: int = 0, reads: Sequence[Array] | None = None):
        self.parts = [parts] if isinstance(parts, Array) else list(parts)
        self.reads = list(reads) if reads else None
        self.tables = tables
        self.window = window
        self.bits, self.group = bits, group
        # a pass of several new tokens per row at per-row positions (`update_verify`): False,
        # a verify pass, whose tokens (with `bits`) attend their own keys and values as computed,
        # as decode steps do; True, a prompt's extend pass (`ShardPools.extend_pass` sets it),
        # a prefill: its tokens attend as the pool holds them, and its products are a prefill's
        # (CausalLM: not the CPU's int8 ones of decode steps)
        self.as_stored = False

    @property
    def pool(self) -> Array:
        """The (first) pool array."""
        return self.parts[0]

    def _write(self, new: Array, memo: dict | None) -> None:
        """Writes `new` (2, N * kv_heads, head_dim), N positions' heads in order, at the
        tables' write slots: one scatter per array (quantized first, with `bits`)."""
        _, nb, h, bs, _ = self.parts[0].shape
        n, d = new.shape[1], new.shape[-1]
        if self.bits:
            packed = ops.quantize(ops.reshape(new, (2 * n, d)), self.group, self.bits)
            values = [ops.reshape(x, (2, n, x.shape[-1])) for x in packed]
        else:
            values = [new]
        writes = self.tables.writes
        for i, (part, value) in enumerate(zip(self.parts, values)):
            w = value.shape[-1]
            # (per tables: the windowed layers' own pool has slots of its own)
            at = memoized(memo, ("writes", id(self.tables), n, w),
                          lambda w=w: ops.broadcast_to(ops.reshape(writes, (1, n, 1)), (2, n, w)))
            flat = ops.put_along_axis(ops.reshape(part, (2, nb * h * bs, w)), at, value, 1)
            self.parts[i] = ops.reshape(flat, (2, nb, h, bs, w))

    def gathered(self, rows: Array | None = None, width: int | None = None) -> Array:
        """(2, B, kv_heads, span, head_dim): each row's blocks in table order
        (dequantized, with `bits`); or the pieces `rows` of `width` blocks per row."""
        t = self.tables
        rows = t.rows if rows is None else rows
        span = t.span if width is None else width * t.block_size
        pieces = []
        for part in self.parts:
            _, nb, h, bs, w = part.shape
            got = ops.take(ops.reshape(part, (2 * nb * h, bs * w)), rows, 0)
            pieces.append(ops.reshape(got, (2, t.batch, h, span, w)))
        if self.bits:
            return ops.dequantize(pieces[0], pieces[1], pieces[2], self.group, self.bits)
        return pieces[0]

    @property
    def kv(self) -> Array:
        """The gathered keys and values (2, B, kv_heads, span, head_dim), laid
        out as the contiguous cache held them."""
        return self.gathered()

    def kernel_input(self) -> tuple[Array, Array | None, tuple[Array, Array, int, int] | None]:
        """What the decode kernel (CUDA or CPU) reads: (kv, table, quant). The pool itself
        and the (B, width) table, which it reads through (nothing gathered); with
        `bits`, the packed pool and quant = (scales, biases, bits, group), which
        it dequantizes as it reads (unless QUANTIZED_KERNEL is off: then the
        dequantized gathered keys, as where the pass has no table)."""
        if self.tables.table is None or (self.bits and not QUANTIZED_KERNEL):
            return self.gathered(), None, None
        pool = self.reads or self.parts  # (read before this pass's write: the views, where given)
        if self.bits:
            return pool[0], self.tables.table, (pool[1], pool[2], self.bits, self.group)
        return pool[0], self.tables.table, None

    def kernel_may_write(self) -> bool:
        """Whether the decode kernel may write this pass's new keys and values into the
        pool it reads (`kernel_input`) in place of `write_decode`: a decode pass (a
        table) of an unquantized pool given its `reads` (the scheduler's step: `read_views`
        of the pool's buffers, or the pool arrays themselves where a view cannot be made),
        where KERNEL_WRITES is on. Either way the kernel's input is the pool's own
        buffer, so the pool's arrays stay as they are (`parts`, `written`)."""
        return KERNEL_WRITES and self.reads is not None and not self.bits and self.tables.table is not None

    @staticmethod
    def _halves(kv: Array, end: int) -> tuple[Array, Array]:
        _, b, h, _, d = kv.shape
        keys, values = (ops.reshape(ops.slice(kv, (i, 0, 0, 0, 0), (i + 1, b, h, end, d)), (b, h, end, d))
                        for i in (0, 1))
        return keys, values

    def update_prefill(self, k: Array, v: Array, start: int, memo: dict | None = None):
        """Writes k, v (B, H, L, D) at positions [start, start+L) of each row and returns
        (keys, values, mask) over positions [0, start+L), as KVCache.update_prefill."""
        if v.shape != k.shape:
            raise ValueError(f"PagedLayer: keys {k.shape} and values {v.shape} differ in shape")
        b, h, length, d = k.shape
        end = start + length
        rows = [ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (1, b * length * h, d)) for x in (k, v)]
        self._write(ops.concatenate(rows, axis=0), memo)
        keys, values = self._halves(self.gathered(), end)
        if self.window is None or end <= self.window:
            return keys, values, "causal"
        return keys, values, memoized(memo, ("prefill", start, end, self.window),
                                   lambda: window_mask(start, end, self.window))

    def update_verify(self, k: Array, v: Array, positions: Array, memo: dict | None = None):
        """Writes W positions per row (k, v (B, H, W, D) at positions[b] .. positions[b] + W - 1,
        through the tables' writes: a speculative verify pass) and returns (keys,
        values, mask (B, 1, W, span)) over the tables' span."""
        b, h, width, d = k.shape
        rows = [ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (1, b * width * h, d)) for x in (k, v)]
        self._write(ops.concatenate(rows, axis=0), memo)
        span = self.tables.span
        keys, values = self._halves(self.gathered(), span)
        window = self.window
        return keys, values, memoized(memo, ("verify", span, width, window),
                                      lambda: verify_mask(span, positions, width, window))

    def update_decode(self, k: Array, v: Array, positions: Array, memo: dict | None = None):
        """Writes one position per row (k, v (B, H, 1, D) at `positions` (B,) int32) and
        returns (keys, values, mask (B, 1, 1, span)) as KVCache.update_decode. With `bits`,
        each row's own slot holds its k, v as given, the earlier ones as the pool holds them:
        as the decode kernel attends (it quantizes the new token only in the cache)."""
        b, h, _, d = k.shape
        new = ops.concatenate([ops.reshape(k, (1, b * h, d)), ops.reshape(v, (1, b * h, d))], axis=0)
        pos = self.write_decode(new, positions, memo)
        t, window = self.tables, self.window
        if window is not None and t.window is not None and window <= t.window and t.window_start is not None:
            span = t.window_width * t.block_size  # only the blocks that can hold the window
            first = t.window_start
            start = memoized(memo, ("wstart", t.batch), lambda: ops.reshape(first, (t.batch, 1, 1, 1)))
            kv = self._own(self.gathered(t.window_rows, t.window_width), new, pos - start, ("wown", span), memo)
            return (*self._halves(kv, span), memoized(memo, ("wmask", span, window),
                                                      lambda: decode_mask(span, pos - start, window)))
        span = t.span
        kv = self._own(self.gathered(), new, pos, ("own", span), memo)
        return (*self._halves(kv, span), memoized(memo, ("mask", span, window), lambda: decode_mask(span, pos, window)))

    def _own(self, kv: Array, new: Array, slot: Array, key: tuple, memo: dict | None) -> Array:
        """The gathered kv (2, B, H, span, D) with, for a quantized pool, each row's slot `slot`
        (B, 1, 1, 1) holding `new` (2, B * H, D) as given, not as quantized and read back."""
        if not self.bits:
            return kv
        _, b, h, span, d = kv.shape
        own = memoized(memo, key, lambda: ops.reshape(ops.arange(span, dtype=_int32), (1, 1, 1, span, 1))
                       == ops.reshape(slot, (1, b, 1, 1, 1)))
        return ops.where(own, ops.reshape(new, (2, b, h, 1, d)).astype(kv.dtype), kv)

    def write_decode(self, new: Array, positions: Array, memo: dict | None = None) -> Array:
        """Writes one position per row, keys and values in one scatter: `new`
        (2, B * H, D) as the decode kernel hands it (no reshape: a node less a layer).
        Returns the positions as (B, 1, 1, 1)."""
        b = positions.shape[0]
        self._write(new, memo)
        return memoized(memo, ("rows", b), lambda: ops.reshape(positions, (b, 1, 1, 1)))


def verify_mask(span: int, positions: Array, width: int, window: int | None) -> Array:
    """(B, 1, W, span) boolean: slot s is visible to new token j of row b iff s <=
    positions[b] + j (and, with a window, s > positions[b] + j - window). The causal
    order among the new tokens comes from the same comparison."""
    b = positions.shape[0]
    query = ops.reshape(positions, (b, 1, 1, 1)) + ops.reshape(ops.arange(width, dtype=_int32), (1, 1, width, 1))
    slots = ops.reshape(ops.arange(span, dtype=_int32), (1, 1, 1, span))
    mask = slots <= query
    if window is not None:
        mask = ops.logical_and(mask, slots > query - window)
    return mask


def layer_views(arrays: Sequence[Array], tables: Tables, windows: Sequence[int | None], bits: int | None = None,
                group: int = 0, reads: Sequence[Array] | None = None) -> list[PagedLayer]:
    """Each layer's view of a pool's arrays (`BlockPool.arrays`: `parts` arrays per
    layer), with `reads` (`read_views` of them, in the same order) where given."""
    parts = 3 if bits else 1
    local = tables.local or tables  # (windowed layers read their own pool's tables, where they have one)
    return [PagedLayer(arrays[i * parts:(i + 1) * parts], tables if w is None else local, w, bits, group,
                       reads[i * parts:(i + 1) * parts] if reads else None)
            for i, w in enumerate(windows)]


def written(views: Sequence[PagedLayer]) -> list[Array]:
    """The pool's arrays after a pass through `views` (in `BlockPool.arrays` order)."""
    return [a for v in views for a in v.parts]
