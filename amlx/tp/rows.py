"""The KV rows of a rank other than 0, kept by request id.

Rank 0's scheduler arranges its batch as it likes (rows join, leave, pause
and come back); it tells the other ranks only which requests each forward
pass runs, in which row order. A rank keeps the rows that last ran together
as one group of caches and re-arranges them only when the order changes, as
rank 0 does: its own attention heads need the same rows, not the same layout.
"""

from __future__ import annotations

import copy

from amlx._mlx import ops
from amlx.cache import KVCache


class RowCaches:
    def __init__(self, make_cache):
        self._make = make_cache  # () -> list[KVCache], one per layer
        self._groups: list[tuple[list[int], list[KVCache]]] = []

    def __len__(self) -> int:
        return sum(len(ids) for ids, _ in self._groups)

    def fresh(self, ids: list[int]) -> list[KVCache]:
        """Empty caches for new requests `ids` (a prefill fills them)."""
        self.free(ids)  # a request id is never reused while alive; be safe anyway
        caches = self._make()
        self._groups.append((list(ids), caches))
        return caches

    def batch(self, ids: list[int]) -> list[KVCache]:
        """The caches holding exactly the rows of `ids`, in that order."""
        for group_ids, caches in self._groups:
            if group_ids == ids:
                return caches
        rows = [self._take_out(i) for i in ids]
        caches = rows[0]
        for row in rows[1:]:
            for mine, theirs in zip(caches, row):
                mine.append_rows(theirs)
        ops.eval(*[a for c in caches for a in c.state()])
        self._groups.append((list(ids), caches))
        return caches

    def _take_out(self, rid: int) -> list[KVCache]:
        """Request `rid`'s row as caches of its own, removed from its group."""
        for n, (ids, caches) in enumerate(self._groups):
            if rid in ids:
                i = ids.index(rid)
                row = [copy.copy(c) for c in caches]  # the same buffers until take_rows copies
                for c in row:
                    c.take_rows([i])
                self._drop(n, [i])
                return row
        raise ValueError(f"tensor parallelism: rank 0 ran request {rid}, which this rank does not hold")

    def _drop(self, n: int, rows: list[int]) -> None:
        ids, caches = self._groups[n]
        keep = [i for i in range(len(ids)) if i not in rows]
        if not keep:
            for c in caches:
                c.close()
            del self._groups[n]
            return
        for c in caches:
            c.take_rows(keep)
        self._groups[n] = ([ids[i] for i in keep], caches)

    def free(self, ids: list[int]) -> None:
        """Drops the rows of finished requests (unknown ids are ignored)."""
        gone = set(ids)
        for n in range(len(self._groups) - 1, -1, -1):
            group_ids = self._groups[n][0]
            rows = [i for i, rid in enumerate(group_ids) if rid in gone]
            if rows:
                self._drop(n, rows)

    def close(self) -> None:
        for _, caches in self._groups:
            for c in caches:
                c.close()
        self._groups = []
