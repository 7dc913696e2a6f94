"""Automatic prefix caching: full KV blocks found again by the tokens they hold.

A full block of a prompt (or of a finished request's prompt and output) is
keyed by a hash of its tokens chained to the key of the block before it, so a
key names the whole prefix up to the block's end, not only the block's own
tokens: two prompts share a cached block only if they agree on everything
before it too. A new request looks its prompt's keys up in order and reuses
the longest run of blocks found (`BlockPool.match`).

This module is host bookkeeping only (no MLX): which block holds which key,
and which cached blocks no request references (those are evicted least
recently used first when the pool needs room).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

__all__ = ["KeyChain", "PrefixIndex", "block_keys"]


def block_keys(tokens: Sequence[int], block_size: int, prev: bytes = b"") -> list[bytes]:
    """The chained keys of the full blocks of `tokens` (a partial last block has none)."""
    keys: list[bytes] = []
    ids = np.asarray(tokens[:len(tokens) // block_size * block_size], dtype=np.int64)
    for start in range(0, len(ids), block_size):
        prev = hashlib.blake2b(prev + ids[start:start + block_size].tobytes(), digest_size=16).digest()
        keys.append(prev)
    return keys


class KeyChain:
    """The keys of one request's full blocks, each hashed once: its token
    sequence (prompt, then generated tokens) only grows, and every sequence the
    request is asked about is a prefix of it."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._keys: list[bytes] = []

    def keys(self, ids: Sequence[int], n: int) -> list[bytes]:
        """The keys of the first `n` full blocks of `ids`."""
        bs = self.block_size
        if n > len(self._keys):
            prev = self._keys[-1] if self._keys else b""
            self._keys += block_keys(ids[len(self._keys) * bs:n * bs], bs, prev)
        return self._keys[:n]


class PrefixIndex:
    """Key <-> block maps of the cached blocks, and the least-recently-used order
    of those no request references (the only ones that may be evicted)."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, oldest first
        self.hits = 0  # blocks reused
        self.misses = 0  # full prompt blocks looked up and not found

    def __len__(self) -> int:
        return len(self._key_of)

    @property
    def idle(self) -> int:
        """Cached blocks no request references (evictable)."""
        return len(self._idle)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The blocks of the longest cached run of `keys` from the first."""
        found: list[int] = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def block(self, key: bytes) -> int | None:
        """The cached block of one key (None if not cached)."""
        return self._block_of.get(key)

    def count(self, found: int, looked: int) -> None:
        self.hits += found
        self.misses += looked - found

    def cached(self, block: int) -> bool:
        return block in self._key_of

    def add(self, key: bytes, block: int) -> bool:
        """Registers `block` (now holding the prefix `key`); False if the key is
        already cached in another block (the caller keeps its block uncached)."""
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def drop(self, block: int) -> bool:
        """Forgets one cached block (idle or held); returns whether it was idle."""
        idle = block in self._idle
        self._idle.pop(block, None)
        self._forget(block)
        return idle

    def referenced(self, block: int) -> None:
        """A request holds the cached block again: it may not be evicted."""
        self._idle.pop(block, None)

    def released(self, block: int) -> None:
        """No request holds the cached block any more: it is the most recently used idle one."""
        self._idle[block] = None
        self._idle.move_to_end(block)

    def evict(self) -> int | None:
        """Forgets the least recently used idle block and returns it (None if none is idle)."""
        if not self._idle:
            return None
        block, _ = self._idle.popitem(last=False)
        self._forget(block)
        return block

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block)
        del self._block_of[key]

    def clear(self) -> tuple[list[int], list[int]]:
        """Forgets every key; returns (idle blocks, now free, and blocks still referenced,
        which stay with their requests but are no longer cached)."""
        idle = list(self._idle)
        held = [b for b in self._key_of if b not in self._idle]
        self._idle.clear()
        self._block_of.clear()
        self._key_of.clear()
        return idle, held
