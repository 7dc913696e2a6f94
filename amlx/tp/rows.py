"""The block tables of a rank other than 0, mirrored from rank 0's.

Every rank holds its own shard of each layer's KV block pool (its key-value
heads) with the same block ids as rank 0's pool: rank 0 alone allocates,
caches prefixes and preempts, and each forward pass it describes carries the
block table of every row it runs (only what changed since the rank last saw
that row: `keep` entries of the old table, then the new ones) and the pool's
size. The other ranks run the same writes into the same blocks, so a block
that rank 0 reuses from its prefix cache holds the same positions' keys and
values (for their own heads) on every rank. A rank never allocates.

Rows are told as `[rid, keep, n, block...]` (rid 0: a padding row of a
decode batch, which holds only the null block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from amlx.kv import PADDING_ROW, ShardKV

__all__ = ["MirroredRows", "encode_rows", "shared_prefix"]


@dataclass(eq=False)
class _Row:
    """What the pool's tables read of a row (amlx.kv.rows.KVRow)."""

    blocks: list[int] = field(default_factory=list)
    pos: int = 0
    created: float = 0.0


def shared_prefix(old: Sequence[int], new: Sequence[int]) -> int:
    """How many leading entries `old` and `new` have in common."""
    n = 0
    for a, b in zip(old, new):
        if a != b:
            break
        n += 1
    return n


def encode_rows(ids: Sequence[int], tables: Sequence[list[int]], known: dict[int, list[int]]) -> list[int]:
    """Rank 0: the words telling each row's table (row id `ids[i]`, 0 for
    padding), given what the other ranks `known`ly hold (updated here)."""
    words: list[int] = []
    for rid, blocks in zip(ids, tables):
        if rid == 0:
            words += [0, 0, 0]
            continue
        old = known.get(rid, [])
        # (the usual case, a table that only grew, compared at C speed: this runs every step)
        keep = len(old) if blocks[:len(old)] == old else shared_prefix(old, blocks)
        new = blocks[keep:]
        words += [rid, keep, len(new), *new]
        known[rid] = list(blocks)
    return words


class MirroredRows:
    """The rows rank 0 has told this rank of, by id, over this rank's pool `kv`."""

    def __init__(self, kv: ShardKV):
        self.kv = kv
        self._rows: dict[int, _Row] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, words: Sequence[int], count: int) -> tuple[list, int]:
        """Applies `count` rows' tables from `words`; returns the rows (in order)
        and how many words they took."""
        rows, at = [], 0
        for _ in range(count):
            rid, keep, n = words[at], words[at + 1], words[at + 2]
            new = list(words[at + 3:at + 3 + n])
            at += 3 + n
            if rid == 0:
                rows.append(PADDING_ROW)
                continue
            row = self._rows.get(rid)
            if row is None:
                row = self._rows[rid] = _Row()
            if keep != len(row.blocks) or new:
                self.kv.adopt(row, row.blocks[:keep] + new)  # (a table changed: rebuilt on its next use)
            rows.append(row)
        return rows, at

    def free(self, ids: Sequence[int]) -> None:
        """Forgets finished requests (unknown ids are ignored); rank 0 gave their blocks back."""
        for rid in ids:
            self._rows.pop(rid, None)
