"""The scheduler's KV block pools, one per shard, and what ties a request to
them: which shard's pool takes it (the one holding most of its prefix), giving
its blocks back (its full blocks staying in the prefix cache), caching what it
has prefilled, the weights' epoch, and each layer's view of a pool for a pass.
(amlx/kv/ holds the pools themselves; docs/architecture.md, "KV block pool and
prefix cache".)"""

from __future__ import annotations

import numpy as np

from amlx._mlx import Array, array, ops
from amlx.engine.request import Request
from amlx.kv import KeyChain, PagedLayer, ShardKV, Tables, layer_views, make_pools, written
from amlx.models.cpu_matmul import rounds_decode

__all__ = ["ShardPools", "extend_arrays", "table_arrays"]


class ShardPools:
    """`kv[i]` is shard i's pool and bookkeeping. `epoch` counts weight changes:
    blocks filled under older weights are never cached."""

    def __init__(self, model, options, shards: int, split_windows: bool = False):
        """`split_windows`: the windowed layers get a pool of their own (see make_pools;
        not for a tensor-parallel model, whose other ranks mirror one pool)."""
        self.kv: list[ShardKV] = make_pools(model, options, shards, split_windows)
        self.windows = model.windows()  # per layer
        self.block_size = self.kv[0].block_size
        self.epoch = 0
        # Where decode steps write other keys and values than a prefill of the same tokens, only
        # prompt blocks (prefilled) are cached, so that a prompt behind the cache (a chat's next
        # turn, holding the last reply) is computed as without it; a reply's blocks are
        # prefilled, and cached, with the turn that holds it. So it is where decode steps round
        # activations to int8 (a quantized model on the CPU's kernels, amlx/models/cpu_matmul.py)
        # and with kv_bits: a decode step attends its own key and value as computed, a prefill
        # every position as stored, so from the second layer on they differ (Gemma 3 at 4 bits:
        # a next turn's log-probabilities 0.1-1.5 off, greedy tokens parting).
        self.decoded_reusable = not ((options.device == "cpu" and rounds_decode(model)) or options.kv_bits)

    def counters(self) -> dict[str, int]:
        """The pools' counters, summed (stats; any thread)."""
        total: dict[str, int] = {}
        for kv in self.kv:
            for k, v in kv.pool.counters().items():
                total[k] = v if k == "block_size" else total.get(k, 0) + v
            if kv.local is not None:  # the windowed layers' pool: its blocks in use and its arrays' size
                counts = kv.local.counters()
                for k in ("blocks_used", "blocks_allocated"):
                    total["window_" + k] = total.get("window_" + k, 0) + counts[k]
        return total

    def pool_tokens(self) -> int:
        """The most positions one request can hold (its shard's whole pool)."""
        return self.kv[0].pool.usable * self.block_size

    def block_bytes(self) -> int:
        kv = self.kv[0]  # (a block of every layer: both pools' where the windowed layers have their own)
        return kv.pool.bytes_per_block() + (kv.local.bytes_per_block() if kv.local is not None else 0)

    def _chain(self, req: Request) -> KeyChain:
        """The request's block keys, hashed once as its tokens grow."""
        if req.keys is None:
            req.keys = KeyChain(self.block_size)
        return req.keys

    def fits(self, req: Request) -> bool:
        """Whether some pool has room for the request's prefill now."""
        return any(kv.fits(req.fill, self._chain(req)) for kv in self.kv)

    def place(self, req: Request, load: list[int], busy: list[bool]) -> int | None:
        """Gives a request the blocks for what it prefills in the shard holding the
        longest cached prefix of it, else the one with the least `load`; returns
        the shard, or None if no pool has room. A `busy` shard (rows running)
        keeps one block of room for their next positions."""
        chain = self._chain(req)
        order = sorted(range(len(self.kv)), key=lambda i: (-self.kv[i].peek(req.fill, chain), load[i]))
        for i in order:
            cached = self.kv[i].reserve(req, req.fill, 1 if busy[i] else 0, chain)
            if cached is not None:
                req.shard, req.prefilled, req.pos, req.epoch = i, cached, 0, self.epoch
                if req.recompute is None:
                    req.cached_tokens = cached
                return i
        return None

    def unplace(self, req: Request) -> None:
        """Undoes `place` for a request that waits for a later round after all: its blocks
        go back uncached and its prefix lookup is not counted (it counts when placed again)."""
        if req.blocks:
            self.kv[req.shard].unreserve(req, req.fill, req.prefilled, self._chain(req))

    def release(self, req: Request, cache: bool = True) -> None:
        """A request lets go of its blocks; with `cache`, its full blocks stay in the
        prefix cache (unless the weights changed since they were computed)."""
        if req.blocks:
            ids = self._cacheable(req) if cache and req.epoch == self.epoch else None
            self.kv[req.shard].release(req, ids, self._chain(req))

    def _cacheable(self, req: Request) -> list[int]:
        """The tokens whose blocks the request may leave in the prefix cache."""
        return req.prompt + req.generated if self.decoded_reusable else req.prompt

    def cache_filled(self, req: Request) -> None:
        """Caches the request's full blocks prefilled so far."""
        if req.epoch == self.epoch:
            self.kv[req.shard].cache_filled(req, req.fill, req.prefilled, self._chain(req))

    def cache_decoded(self, rows: list[Request]) -> None:
        """Before a decode step: rows about to give a local block back (past their
        window, `ShardKV.sheds`) cache their full blocks so far, prompt and output."""
        for req in rows:
            kv = self.kv[req.shard]
            if req.epoch == self.epoch and kv.sheds(req):
                ids = self._cacheable(req)
                kv.cache_filled(req, ids, min(req.pos, len(ids)), self._chain(req))

    def views(self, shard: int, tables: Tables, arrays: list[Array] | None = None,
              reads: list[Array] | None = None) -> list[PagedLayer]:
        """Each layer's view of a shard's pool (or of `arrays` in its layout: a
        compiled step's inputs) for one forward pass; `reads`: `read_views` of them."""
        kv = self.kv[shard]
        return layer_views(kv.arrays if arrays is None else arrays, tables, self.windows, kv.pool.bits, kv.pool.group,
                           reads)

    def decode_pass(self, model, tokens: Array, positions: Array, tabs: list[Array],
                    arrays: list[Array], reads: list[Array] | None = None) -> tuple[Array, list[Array]]:
        """One decode forward as a pure function of arrays (what the scheduler
        compiles; a tensor-parallel model's other ranks run the same): tokens
        (B, 1), positions (B,), the pass's `table_arrays`, each layer's pool
        array (and `read_views` of them for the decode kernel, or none) ->
        (logits (B, V), the pool arrays written). Every shard's pool has the
        same layout, so shard 0's describes them all."""
        rows, writes, table, window_rows, window_start, *local = tabs
        b, bs = tokens.shape[0], self.block_size
        tables = windowed = Tables(rows, writes, b, table.shape[1], bs, table)
        if local:  # the windowed layers' own pool's tables (ShardKV.local)
            windowed = tables.local = Tables(local[0], local[1], b, local[2].shape[1], bs, local[2])
        if window_rows.shape[0]:  # (a shape, not a flag: each form is traced apart)
            kv = self.kv[0]
            windowed.window, windowed.window_width = kv.window, kv.window_width
            windowed.window_rows, windowed.window_start = window_rows, window_start
        views = self.views(0, tables, arrays, reads)
        logits = model(tokens, views, positions)
        logits = ops.reshape(logits, (tokens.shape[0], logits.shape[2]))
        return logits, written(views)

    def pass_views(self, batch: int, tabs: list[Array], arrays: list[Array]) -> list[PagedLayer]:
        """Each layer's view of `arrays` (in a shard's pool layout: a compiled pass's
        inputs) for a pass of `batch` rows whose tables come as `extend_arrays` gives
        them (an extend pass, a verify pass); every shard's pool has the same layout,
        so shard 0's describes them all."""
        rows, writes, *local = tabs
        width = rows.shape[0] // (2 * batch * self.kv[0].pool.kv_heads)
        tables = Tables(rows, writes, batch, width, self.block_size)
        if local:
            tables.local = Tables(local[0], local[1], batch, width, self.block_size)
        return self.views(0, tables, arrays)

    def extend_pass(self, model, tokens: Array, positions: Array, last: Array, tabs: list[Array],
                    arrays: list[Array]) -> tuple[Array, list[Array]]:
        """A short prefill behind a cached prefix as a pure function of arrays (what
        the scheduler compiles): tokens (B, W) written at positions[b] .. + W - 1
        through the tables `tabs` ([gather pieces, write slots] of
        `ShardKV.extend_tables`), attended as a verify pass does (per-row positions,
        `verify_mask`) -> (logits (B, V) at each row's token `last[b]`, the pool
        arrays written)."""
        b = tokens.shape[0]
        views = self.pass_views(b, tabs, arrays)
        for view in views:
            # a prefill: over a quantized pool its tokens attend every position as the pool
            # holds it, their own included, as the plain prefill it stands in for does (not
            # as a verify pass does: then the prefix cache changed outputs with kv_bits)
            view.as_stored = True
        logits = model(tokens, views, positions, last=last)
        return ops.reshape(logits, (b, logits.shape[2])), written(views)

    def weights_changed(self) -> None:
        """Empties the prefix caches; blocks of requests running now are not cached later."""
        self.epoch += 1
        for kv in self.kv:
            kv.pool.clear_prefix()
            if kv.local is not None:
                kv.local.clear_prefix()

    def close(self) -> None:
        for kv in self.kv:
            kv.close()


def table_arrays(tables: Tables) -> list[Array]:
    """A decode pass's tables as the compiled step takes them (always the same
    arrays: a compiled function takes the same structure each call): gather
    pieces, write slots, block table, the windowed layers' narrow pieces and
    starts (empty where the pass has none), and with a pool of their own for the
    windowed layers, its pieces, slots and table."""
    local = tables.local
    windowed = local if local is not None else tables
    if windowed.window is not None:
        out = [tables.rows, tables.writes, tables.table, windowed.window_rows, windowed.window_start]
    else:
        empty = array(np.zeros(0, np.int32))
        out = [tables.rows, tables.writes, tables.table, empty, empty]
    return out if local is None else out + [local.rows, local.writes, local.table]


def extend_arrays(tables: Tables) -> list[Array]:
    """An extend or verify pass's tables as its compiled function takes them (`ShardPools.extend_pass`,
    `Speculator._forward`): gather pieces and write slots, then the windowed layers' own pool's."""
    out = [tables.rows, tables.writes]
    return out if tables.local is None else out + [tables.local.rows, tables.local.writes]
