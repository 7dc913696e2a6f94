"""Key/value caches for attention layers.

A `KVCache` holds the keys and values of one attention layer for a batch of
rows in one fixed-capacity buffer of shape (2, B, kv_heads, capacity,
head_dim) (keys at [0], values at [1]), grown in blocks of `block` positions.
One buffer, so that a decode step writes a layer's new key and value with one
scatter: every graph node costs host time in a step. Two ways to write:

* `update_prefill(k, v, start)`: L new positions at the same host-known `start`
  for every row (prompt processing, in chunks).
* `update_decode(k, v, positions)`: one new position per row, at per-row offsets
  given as a device array, so a batch of requests at different lengths decodes
  in one shape-stable step; unfilled slots are masked out.

A `window` (Gemma 3's local layers) restricts each query to the last `window`
positions; the buffers still hold every position, so prompts plus generation
longer than the window stay exact.
"""

from __future__ import annotations

import numpy as np

from amlx._mlx import Array, array, ops
from amlx._mlx import bool_ as _bool
from amlx._mlx import int32 as _int32

BLOCK = 256  # the default; see KVCache.block


def round_up(n: int, block: int = BLOCK) -> int:
    return max(block, -(-n // block) * block)


def memoized(memo: dict | None, key, build):
    """memo[key], built once by build(); without a memo, build() each time."""
    if memo is None:
        return build()
    if key not in memo:
        memo[key] = build()
    return memo[key]


def window_mask(start: int, end: int, window: int) -> Array:
    """Queries start..end-1 against keys 0..end-1: causal and at most `window` back."""
    q_pos = np.arange(start, end)[:, None]
    k_pos = np.arange(end)[None, :]
    return array((k_pos <= q_pos) & (k_pos > q_pos - window), _bool)


def decode_mask(span: int, pos: Array, window: int | None) -> Array:
    """(B, 1, 1, span) boolean: the slots each row's new token sees, at `pos`
    (B, 1, 1, 1): its own and earlier ones, at most `window` back."""
    slots = ops.arange(span, dtype=_int32)
    mask = slots <= pos
    if window is not None:
        mask = ops.logical_and(mask, slots > pos - window)
    return mask


class KVCache:
    def __init__(self, window: int | None = None, block: int = BLOCK):
        self.window = window
        # Growth step of the buffer. Where attention reads the whole capacity
        # (the masked path), a small block saves attention work; where it reads
        # only filled slots (the decode kernel), a large one saves retraces
        # of the compiled step, one per capacity.
        self.block = block
        self.kv: Array | None = None  # (2, B, kv_heads, capacity, head_dim)

    @property
    def capacity(self) -> int:
        return 0 if self.kv is None else self.kv.shape[3]

    def _half(self, i: int, end: int | None = None) -> Array:
        """Keys (i = 0) or values (1) as (B, H, end, D): a view, no copy."""
        _, b, h, cap, d = self.kv.shape
        end = cap if end is None else end
        part = ops.slice(self.kv, (i, 0, 0, 0, 0), (i + 1, b, h, end, d))
        return ops.reshape(part, (b, h, end, d))

    @property
    def keys(self) -> Array:
        return self._half(0)

    @property
    def values(self) -> Array:
        return self._half(1)

    def reserve(self, needed: int, like: Array | None = None) -> None:
        """Grows the buffer (in blocks) to hold at least `needed` positions; the
        first call needs a key example (B, H, L, D) for shape and dtype."""
        if needed <= self.capacity:
            return
        new_cap = round_up(needed, self.block)
        if self.kv is None:
            b, h, _, d = like.shape
            self.kv = ops.zeros((2, b, h, new_cap, d), like.dtype)
            return
        _, b, h, cap, d = self.kv.shape
        self.kv = ops.concatenate([self.kv, ops.zeros((2, b, h, new_cap - cap, d), self.kv.dtype)], axis=3)

    def shrink(self, needed: int) -> bool:
        """Gives back capacity the rows no longer use (see `_fit`); returns whether it cut."""
        cap = self._fit(needed)
        if cap is not None:
            # a copy, not a view: the old buffer's memory goes once it is released
            self.kv = ops.contiguous(self._cut(cap))
        return cap is not None

    def _fit(self, needed: int) -> int | None:
        """The capacity to cut to when the rows need only `needed` positions:
        `needed` rounded up to a block, if that is at most half the capacity (so
        a batch that moves around one size does not cut and grow in turn); else
        None. Where attention reads the whole capacity, a long request that has
        left would otherwise slow every later step of the rows that stay."""
        if self.kv is None:
            return None
        cap = round_up(max(needed, 1), self.block)
        return cap if cap * 2 <= self.capacity else None

    def _cut(self, cap: int) -> Array:
        _, b, h, _, d = self.kv.shape
        return ops.slice(self.kv, (0, 0, 0, 0, 0), (2, b, h, cap, d))

    def update_prefill(self, k: Array, v: Array, start: int, memo: dict | None = None):
        """Writes k, v (B, H, L, D) at [start, start+L) and returns (keys, values, mask)
        to attend over: the buffers cut to start+L and a mask ("causal" or a
        boolean (L, start+L) array). `memo` shares the mask between the layers
        of one forward pass."""
        if v.shape != k.shape:
            raise ValueError(f"KVCache: keys {k.shape} and values {v.shape} differ in shape")
        b, h, length, d = k.shape
        end = start + length
        self.reserve(end, k)
        for i, new in enumerate((k, v)):
            self.kv = ops.slice_update(self.kv, ops.reshape(new, (1, b, h, length, d)), (i, 0, 0, start, 0),
                                       (i + 1, b, h, end, d))
        keys, values = self._half(0, end), self._half(1, end)
        if self.window is None or end <= self.window:
            return keys, values, "causal"
        return keys, values, memoized(memo, ("prefill", start, end, self.window),
                                   lambda: window_mask(start, end, self.window))

    def update_decode(self, k: Array, v: Array, positions: Array, memo: dict | None = None):
        """Writes one position per row: k, v (B, H, 1, D) at `positions` (B,) int32.

        The caller keeps the capacity sufficient (`reserve`). Returns the full
        buffers and a boolean mask (B, 1, 1, capacity) of the visible slots.
        `memo` shares the write indices and masks between the layers of one
        forward pass."""
        b, h, _, d = k.shape
        new = ops.concatenate([ops.reshape(k, (1, b, h, 1, d)), ops.reshape(v, (1, b, h, 1, d))], axis=0)
        pos = self.write_decode(new, positions, memo)
        cap, window = self.capacity, self.window
        return self.keys, self.values, memoized(memo, ("mask", cap, window), lambda: decode_mask(cap, pos, window))

    def write_decode(self, new: Array, positions: Array, memo: dict | None = None) -> Array:
        """Writes one position per row, keys and values in one scatter: `new`
        (2, B, H, 1, D), or (2, B * H, D) as the decode kernel hands it, at `positions`
        (B,) int32. Returns the positions as (B, 1, 1, 1)."""
        if new.ndim == 3:
            b = positions.shape[0]
            new = ops.reshape(new, (2, b, new.shape[1] // b, 1, new.shape[2]))
        _, b, h, _, d = new.shape
        pos = memoized(memo, ("rows", b), lambda: ops.reshape(positions, (b, 1, 1, 1)))
        at = memoized(memo, ("at", b, h, d), lambda: ops.broadcast_to(ops.reshape(positions, (1, b, 1, 1, 1)),
                                                                       (2, b, h, 1, d)))
        self.kv = ops.put_along_axis(self.kv, at, new, 3)
        return pos

    def take_rows(self, rows: list[int], needed: int | None = None) -> None:
        """Keeps only the given batch rows (in that order). With `needed` (the
        positions those rows use), the capacity shrinks too where `shrink`
        would cut it, in the same copy."""
        if self.kv is not None:
            cap = None if needed is None else self._fit(needed)
            src = self.kv if cap is None else self._cut(cap)
            self.kv = ops.take(src, array(np.asarray(rows, dtype=np.int32)), 1)

    def append_rows(self, other: "KVCache") -> None:
        """Adds the rows of `other` (e.g. a freshly prefilled request) after ours."""
        if other.kv is None:
            return
        if self.kv is None:
            self.kv = other.kv
            return
        cap = max(self.capacity, other.capacity)
        self.reserve(cap)
        other.reserve(cap)
        self.kv = ops.concatenate([self.kv, other.kv], axis=1)

    def kernel_input(self) -> tuple[Array | None, None, None]:
        """What the decode kernel reads: the buffer (2, B, H, capacity, D), no
        table, not quantized (see PagedLayer.kernel_input)."""
        return self.kv, None, None

    def kernel_may_write(self) -> bool:
        """False: the contiguous cache takes the kernel's new keys and values through
        `write_decode` (see PagedLayer.kernel_may_write)."""
        return False

    def state(self) -> list[Array]:
        return [] if self.kv is None else [self.kv]

    def close(self) -> None:
        if self.kv is not None:
            self.kv.close()
        self.kv = None
