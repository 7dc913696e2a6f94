"""The KV block pool of one scheduler shard: fixed-size blocks of keys and
values for every layer, and the host-side allocator that hands them out.

Device side, one array per layer of shape (2, blocks, kv_heads, block_size,
head_dim) (keys at [0], values at [1]); a decode step writes every row's new
token with one scatter per layer at slot indices computed on the host once
per step and shared by all layers, and attention gathers through the tables
(`amlx.kv.paged`). The arrays grow (by GROWTH, LARGE_GROWTH past a gigabyte, layer by layer)
up to `max_blocks` as rows need blocks, and never shrink while the model is
open: a pool at its high-water mark costs nothing more, and the blocks it
keeps are the prefix cache.

Host side: a free list, a reference count per block (a block of a cached
prefix may be held by several requests at once), and the prefix index
(`amlx.kv.prefix`): full blocks stay cached when their last request lets go
and are evicted least recently used when the pool has no other room.

Block 0 is never handed out: unused block-table entries point at it and the
padded positions of a batched prefill write into it (every read of it is
masked), so tables and writes need no per-row special cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amlx._mlx import Array, array, ops, uint32
from amlx.kv.prefix import PrefixIndex

__all__ = ["NULL_BLOCK", "BlockPool", "PoolFull", "block_bytes", "copy_blocks"]

NULL_BLOCK = 0
# First size of the device arrays, in blocks (256 positions at the default block size): a
# short chat holds no more, and a pool at 64 blocks held 1.1-1.15x mlx-lm's single-stream
# peak memory on the GPU (benchmarks/README.md) for cache its row never used.
INITIAL_BLOCKS = 16
# Then grown by GROWTH (at least by what is asked for), and by LARGE_GROWTH once the arrays
# hold LARGE_POOL_BYTES: a large pool's unused tail costs the most (64 streams of Qwen3-0.6B
# held up to a fifth of their 2 GB pool unused at 1.25), while each growth copies the arrays
# and is a new shape for the compiled passes (a trace on the host), so small pools, where
# the tail is cheap, grow in fewer, larger steps.
GROWTH = 1.25
LARGE_GROWTH = 1.125
LARGE_POOL_BYTES = 1 << 30


class PoolFull(Exception):
    """The pool has no block left to hand out (callers check `available` first)."""


def quant_group(head_dim: int) -> int:
    """The quantization group of a quantized KV cache: 64 values, or 32 for head dims
    that 64 does not divide (ValueError when 32 does not either)."""
    for group in (64, 32):
        if head_dim % group == 0:
            return group
    raise ValueError(f"kv_bits needs a head dimension divisible by 32, not {head_dim}")


class BlockPool:
    """`layout`: (kv_heads, head_dim) per layer; `max_blocks`: the most blocks
    the arrays may hold (block 0, the null block, included). `bits` (8 or 4):
    keys and values are stored quantized (MLX's affine quantization, per group
    of `quant_group(head_dim)` values): each layer then has three arrays, the
    packed values (uint32), the scales and the biases, each (2, blocks,
    kv_heads, block_size, n); `parts` says how many arrays a layer has."""

    def __init__(self, layout: Sequence[tuple[int, int]], dtype, block_size: int, max_blocks: int,
                 prefix_cache: bool = True, initial_blocks: int = INITIAL_BLOCKS, bits: int | None = None):
        if max_blocks < 2:
            raise ValueError(f"a KV block pool needs at least 2 blocks, not {max_blocks}")
        if len(set(layout)) != 1:
            raise ValueError(f"a KV block pool needs every layer's keys alike (kv heads, head dim), not {layout}")
        self.layout = list(layout)
        self.kv_heads = layout[0][0]
        self.bits = int(bits) if bits else None  # (a numpy integer from the options: plain int shapes)
        self.group = quant_group(layout[0][1]) if bits else 0
        self.parts = 3 if bits else 1
        self.dtype = dtype
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.initial_blocks = max(2, min(initial_blocks, max_blocks))
        self.arrays: list[Array] = []  # per layer, once the first block is handed out
        self.capacity = 0  # blocks the arrays hold
        self._refs: list[int] = []
        self._free: list[int] = []
        self.prefix = PrefixIndex() if prefix_cache else None

    # -- host bookkeeping ---------------------------------------------------------
    @property
    def usable(self) -> int:
        """Blocks a single request could ever hold (all but the null block)."""
        return self.max_blocks - 1

    def available(self) -> int:
        """Blocks `allocate` can hand out now: free, evictable, or still to grow into."""
        idle = self.prefix.idle if self.prefix is not None else 0
        return len(self._free) + idle + (self.max_blocks - max(self.capacity, 1))

    def used(self) -> int:
        """Blocks some request holds."""
        return sum(1 for r in self._refs[1:] if r > 0)

    @property
    def free(self) -> int:
        """Blocks of the arrays that hold nothing (neither held nor cached)."""
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks, each held once: free ones first, then idle cached
        blocks evicted (least recently used first), then growing the arrays. So
        the arrays grow only for blocks requests hold at once, never for the
        prefix cache, which lives in the room the pool has already."""
        if n > self.available():
            raise PoolFull(f"{n} KV blocks asked for, {self.available()} available")
        while len(self._free) < n:
            block = self.prefix.evict() if self.prefix is not None else None
            if block is None:
                break
            self._free.append(block)
        if len(self._free) < n:  # (available() said there was room)
            self._grow(n - len(self._free))
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def hold(self, blocks: Sequence[int]) -> None:
        """Another request holds these (cached) blocks."""
        for b in blocks:
            if self._refs[b] == 0 and self.prefix is not None:
                self.prefix.referenced(b)
            self._refs[b] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """A request lets go of its blocks: cached ones become idle (evictable),
        the others free."""
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self.prefix is not None and self.prefix.cached(b):
                    self.prefix.released(b)
                else:
                    self._free.append(b)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `keys` (not held: see `hold`)."""
        return [] if self.prefix is None else self.prefix.lookup(keys)

    def find(self, keys: Sequence[bytes]) -> list[int] | None:
        """The cached blocks of every one of `keys` (not held), or None if one is missing."""
        if self.prefix is None:
            return None if keys else []
        found = [self.prefix.block(k) for k in keys]
        return None if None in found else found

    def unheld(self, blocks: Sequence[int]) -> int:
        """How many of these (cached) blocks no request holds: holding them takes
        them out of `available()`."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def register(self, keys: Sequence[bytes], blocks: Sequence[int]) -> None:
        """Caches full blocks under their prefix keys (blocks already cached, or
        keys cached in another block, stay as they are)."""
        if self.prefix is not None:
            for key, block in zip(keys, blocks):
                self.prefix.add(key, block)

    def claim(self, key: bytes, block: int) -> None:
        """Caches `block` under `key` in place of the block cached there now, if another
        (that one is forgotten: free if no request holds it, else uncached)."""
        if self.prefix is None:
            return
        old = self.prefix.block(key)
        if old == block or self.prefix.cached(block):
            return
        if old is not None and self.prefix.drop(old):
            self._free.append(old)
        self.prefix.add(key, block)

    def clear_prefix(self) -> None:
        """Forgets every cached prefix (the weights changed): idle blocks are free again."""
        if self.prefix is not None:
            idle, _ = self.prefix.clear()
            self._free.extend(idle)

    def counters(self) -> dict[str, int]:
        used = self.used()
        idle = self.prefix.idle if self.prefix is not None else 0
        return {"blocks_used": used, "blocks_cached": idle, "blocks_free": self.free,
                "blocks_allocated": max(self.capacity - 1, 0), "block_size": self.block_size,
                "prefix_hits": self.prefix.hits if self.prefix is not None else 0,
                "prefix_misses": self.prefix.misses if self.prefix is not None else 0}

    # -- device arrays ------------------------------------------------------------
    def bytes_per_block(self) -> int:
        return block_bytes(self.layout, self.dtype, self.block_size, self.bits)

    def _part_shapes(self, dim: int) -> list[tuple[int, object]]:
        """(last dimension, dtype) of each array of a layer."""
        if not self.bits:
            return [(dim, self.dtype)]
        return [(dim * self.bits // 32, uint32), (dim // self.group, self.dtype), (dim // self.group, self.dtype)]

    def _grow(self, short: int) -> None:
        """Grows the arrays by GROWTH (at least by `short` blocks; up to max_blocks);
        the new blocks go on the free list. Layer by layer, each copy evaluated
        before the next, so the old and new arrays coexist for one layer at a
        time: growing all layers in one graph held the old pool, the new one and
        the zero blocks at once (peak memory 1.5-2x the final pool). A modest
        factor keeps the unused tail small, at the cost of a few more growths
        (each one a new shape for the compiled decode step)."""
        self.grow_to(self.grown_size(short))

    def grown_size(self, short: int) -> int:
        """The arrays' size (blocks) after growing for `short` more blocks than they
        have free: by GROWTH (LARGE_GROWTH for a pool of LARGE_POOL_BYTES or more), at
        least by `short`, at least the first size, at most `max_blocks`."""
        old = self.capacity
        factor = LARGE_GROWTH if old * self.bytes_per_block() >= LARGE_POOL_BYTES else GROWTH
        return min(self.max_blocks, max(int(old * factor) + 1, max(old, 1) + short, self.initial_blocks))

    def grow_to(self, new: int) -> None:
        """Grows the arrays to `new` blocks (nothing if they hold as many): `_grow`'s
        step, and how a tensor-parallel rank's pool follows rank 0's size (amlx.tp.rows)."""
        old = self.capacity
        if new <= old:
            return
        self.max_blocks = max(self.max_blocks, new)
        parts = [(heads, width, dtype) for heads, dim in self.layout for width, dtype in self._part_shapes(dim)]
        arrays: list[Array | None] = list(self.arrays) or [None] * len(parts)
        self.arrays = []
        for i, (heads, width, dtype) in enumerate(parts):
            extra = ops.zeros((2, new - old, heads, self.block_size, width), dtype)
            before = arrays[i]
            grown = extra if before is None else ops.concatenate([before, extra], axis=1)
            ops.eval(grown)
            arrays[i] = grown  # the old array goes with its last reference
            if before is not None:
                extra.close()
        self.arrays = [a for a in arrays if a is not None]
        self._refs.extend([0] * (new - old))
        # handed out lowest first (pop from the end), so the used part of the arrays stays dense
        self._free = list(range(new - 1, max(old, 1) - 1, -1)) + self._free
        self.capacity = new

    def state(self) -> list[Array]:
        return list(self.arrays)

    def close(self) -> None:
        for a in self.arrays:
            a.close()
        self.arrays = []
        self.capacity = 0
        self._refs, self._free = [], []
        if self.prefix is not None:
            self.prefix.clear()


def block_bytes(layout: Sequence[tuple[int, int]], dtype, block_size: int, bits: int | None = None) -> int:
    """Bytes of one block across every layer (keys and values; with `bits`, the
    packed values and each group's scale and bias)."""
    if not bits:
        return sum(2 * block_size * heads * dim * dtype.size for heads, dim in layout)
    return sum(2 * block_size * heads * (dim * bits // 8 + 2 * (dim // quant_group(dim)) * dtype.size)
               for heads, dim in layout)


def copy_blocks(src: BlockPool, dst: BlockPool, blocks: Sequence[int]) -> list[int]:
    """Copies blocks of `src` into fresh blocks of `dst` (a row moving to another
    shard); returns the new block ids. The caller checked `dst.available()`."""
    new = dst.allocate(len(blocks))
    if not blocks:
        return new
    src_ids, dst_ids = array(np.asarray(blocks, np.int32)), array(np.asarray(new, np.int32))
    out = []
    for a, b in zip(src.arrays, dst.arrays):
        data = ops.take(a, src_ids, 1)  # (2, n, heads, block_size, dim)
        at = ops.broadcast_to(ops.reshape(dst_ids, (1, len(new), 1, 1, 1)), data.shape)
        out.append(ops.put_along_axis(b, at, data, 1))
    dst.arrays = out
    return new
