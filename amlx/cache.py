"""Key/value caches for attention layers.

A `KVCache` holds the keys and values of one attention layer for a batch of
rows in fixed-capacity buffers of shape (B, kv_heads, capacity, head_dim),
grown in blocks of `BLOCK` positions. Two ways to write:

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


def _window_mask(start: int, end: int, window: int) -> Array:
    """Queries start..end-1 against keys 0..end-1: causal and at most `window` back."""
    q_pos = np.arange(start, end)[:, None]
    k_pos = np.arange(end)[None, :]
    return array((k_pos <= q_pos) & (k_pos > q_pos - window), _bool)


class KVCache:
    def __init__(self, window: int | None = None, block: int = BLOCK):
        self.window = window
        # Growth step of the buffers. Where attention reads the whole capacity
        # (the masked path), a small block saves attention work; where it reads
        # only filled slots (the CUDA decode kernel), a large one saves retraces
        # of the compiled step, one per capacity.
        self.block = block
        self.keys: Array | None = None
        self.values: Array | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, needed: int, like_k: Array | None = None, like_v: Array | None = None) -> None:
        """Grows the buffers (in blocks) to hold at least `needed` positions; the
        first call needs k/v examples for shapes and dtype."""
        if needed <= self.capacity:
            return
        like_k = self.keys if like_k is None else like_k
        like_v = self.values if like_v is None else like_v
        b, h, _, d = like_k.shape
        dv = like_v.shape[3]
        new_cap = round_up(needed, self.block)
        if self.keys is None:
            self.keys = ops.zeros((b, h, new_cap, d), like_k.dtype)
            self.values = ops.zeros((b, h, new_cap, dv), like_v.dtype)
            return
        extra = new_cap - self.capacity
        self.keys = ops.concatenate([self.keys, ops.zeros((b, h, extra, d), self.keys.dtype)], axis=2)
        self.values = ops.concatenate([self.values, ops.zeros((b, h, extra, dv), self.values.dtype)], axis=2)

    def update_prefill(self, k: Array, v: Array, start: int, memo: dict | None = None):
        """Writes k, v (B, H, L, D) at [start, start+L) and returns (keys, values, mask)
        to attend over: the buffers cut to start+L and a mask ("causal" or a
        boolean (L, start+L) array). `memo` shares the mask between the layers
        of one forward pass."""
        length = k.shape[2]
        end = start + length
        self.reserve(end, k, v)
        b, h, _, d = self.keys.shape
        self.keys = ops.slice_update(self.keys, k, (0, 0, start, 0), (b, h, end, d))
        self.values = ops.slice_update(self.values, v, (0, 0, start, 0), (b, h, end, self.values.shape[3]))
        keys = ops.slice(self.keys, (0, 0, 0, 0), (b, h, end, d))
        values = ops.slice(self.values, (0, 0, 0, 0), (b, h, end, self.values.shape[3]))
        if self.window is None or end <= self.window:
            return keys, values, "causal"
        return keys, values, memoized(memo, ("prefill", start, end, self.window),
                                   lambda: _window_mask(start, end, self.window))

    def update_decode(self, k: Array, v: Array, positions: Array, memo: dict | None = None):
        """Writes one position per row: k, v (B, H, 1, D) at `positions` (B,) int32.

        The caller keeps the capacity sufficient (`reserve`). Returns the full
        buffers and a boolean mask (B, 1, 1, capacity) of the visible slots.
        `memo` shares the write indices and masks between the layers of one
        forward pass."""
        pos = self.write_decode(k, v, positions, memo)
        cap, window = self.capacity, self.window

        def visible() -> Array:
            slots = ops.arange(cap, dtype=_int32)
            mask = slots <= pos
            if window is not None:
                mask = ops.logical_and(mask, slots > pos - window)
            return mask

        return self.keys, self.values, memoized(memo, ("mask", cap, window), visible)

    def write_decode(self, k: Array, v: Array, positions: Array, memo: dict | None = None) -> Array:
        """The write of `update_decode` alone (for attention that reads the
        cache itself); returns the positions as (B, 1, 1, 1)."""
        b, h, _, d = k.shape
        dv = v.shape[3]
        pos = memoized(memo, ("rows", b), lambda: ops.reshape(positions, (b, 1, 1, 1)))
        self.keys = ops.put_along_axis(self.keys, memoized(memo, ("at", b, h, d), lambda: ops.broadcast_to(
            pos, (b, h, 1, d))), k, 2)
        self.values = ops.put_along_axis(self.values, memoized(memo, ("at", b, h, dv), lambda: ops.broadcast_to(
            pos, (b, h, 1, dv))), v, 2)
        return pos

    def take_rows(self, rows: list[int]) -> None:
        """Keeps only the given batch rows (in that order)."""
        if self.keys is not None:
            idx = array(np.asarray(rows, dtype=np.int32))
            self.keys = ops.take(self.keys, idx, 0)
            self.values = ops.take(self.values, idx, 0)

    def append_rows(self, other: "KVCache") -> None:
        """Adds the rows of `other` (e.g. a freshly prefilled request) after ours."""
        if other.keys is None:
            return
        if self.keys is None:
            self.keys, self.values = other.keys, other.values
            return
        cap = max(self.capacity, other.capacity)
        self.reserve(cap)
        other.reserve(cap)
        self.keys = ops.concatenate([self.keys, other.keys], axis=0)
        self.values = ops.concatenate([self.values, other.values], axis=0)

    def state(self) -> list[Array]:
        return [] if self.keys is None else [self.keys, self.values]

    def close(self) -> None:
        for a in self.state():
            a.close()
        self.keys = self.values = None
