"""A draft model's side of speculative decoding (`draft=PATH`): its KV cache and its drafts.

The draft model has a block pool of its own per scheduler shard (its own layer
layout; no prefix cache) and, per request, a row in it: blocks and `pos`, the
positions of the request's tokens (prompt, then output) its cache holds. Each
verify round, before drafting, a row whose draft cache is behind the target's
(a new request: its whole prompt; after a round that accepted every draft: the
last draft, which the draft model never took as input) catches up with one
prefill pass of the missing tokens. Then k draft steps, chained on the device
without reading back: step i writes the row's token at `pos + i` and draws the
next draft with the row's own sampling options (`draft_sampling.draft_step`,
q kept for rejection sampling). After the verify step the row's draft cache is
valid up to the tokens the target accepted: `settle` moves `pos` there
(rollback is a position, as for the target).

A row that moves to another shard (rebalancing) starts its draft cache again
from its prompt; a request that has ended gives its draft blocks back
(`release`, from the scheduler's finish paths).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from amlx._mlx import Array, array, ops, transforms
from amlx.engine.pools import extend_arrays
from amlx.engine.request import Request
from amlx.errors import MLXError
from amlx.kv import ShardKV, Tables, layer_views, make_pools, written
from amlx.speculative.draft_sampling import draft_keys, draft_step, fit_vocab

__all__ = ["DraftModel"]


@dataclass(eq=False)
class _DraftRow:
    """A request's row in a draft pool (what amlx.kv.rows.KVRow asks)."""

    shard: int
    blocks: list[int] = field(default_factory=list)
    pos: int = 0  # positions of the request's tokens the draft cache holds
    created: float = 0.0


class DraftModel:
    """The draft model, its pools and its rows (worker thread). `vocab`: the target's
    vocabulary size (drafts' q is padded or cut to it)."""

    def __init__(self, model, options, shards: int, vocab: int, compile_step: bool = True):
        self.model = model
        self.vocab = vocab
        try:
            self.kv: list[ShardKV] = make_pools(model, replace(options, prefix_cache=False), shards)
        except ValueError as exc:  # e.g. kv_bits with the draft's head dimension: say whose it is
            raise ValueError(f"the draft model (draft={options.draft}): {exc}") from None
        self.windows = model.windows()
        self._rows: dict[Request, _DraftRow] = {}
        # a draft step is compiled as the target's decode step is: k of them per round, each
        # otherwise a whole model's graph built op by op in Python (host time that, for a
        # draft whose step is cheap on the device, costs more than the step itself); traced
        # per batch size, span (rounded as a decode pass's) and pool size
        self._step_fn = transforms.compile(self._step) if compile_step else None

    def _row(self, req: Request) -> _DraftRow:
        row = self._rows.get(req)
        if row is not None and row.shard != req.shard:  # moved: start again in the new shard
            self.kv[row.shard].release(row)
            row = None
        if row is None:
            row = self._rows[req] = _DraftRow(req.shard, created=req.created)
        return row

    def release(self, req: Request) -> None:
        """The request has ended: its draft blocks go back."""
        row = self._rows.pop(req, None)
        if row is not None:
            self.kv[row.shard].release(row)

    def sweep(self) -> None:
        """Gives back the draft blocks of requests that have ended (any the scheduler did not `release`)."""
        for req in [r for r in self._rows if not r.active]:
            self.release(req)

    def recover(self) -> None:
        """After a failed evaluation: a draft pool whose arrays cannot be computed starts
        again empty, and its rows with it (they catch up from their prompts)."""
        for shard, kv in enumerate(self.kv):
            try:
                ops.eval(*kv.pool.state())
            except MLXError:
                for req in [r for r, row in self._rows.items() if row.shard == shard]:
                    del self._rows[req]
                kv.reset()

    def blocks_used(self) -> int:
        """Blocks the draft rows hold, every shard together (stats, tests)."""
        return sum(kv.pool.used() for kv in self.kv)

    def room(self, req: Request, k: int) -> int:
        """The drafts (at most k) the row's draft pool has blocks for, its catch-up included."""
        row = self._row(req)
        held = self.kv[row.shard].extend_to(row, req.pos + k)
        return max(0, min(k, held - req.pos))

    def _views(self, shard: int, tables) -> list:
        pool = self.kv[shard].pool
        return layer_views(pool.arrays, tables, self.windows, pool.bits, pool.group)

    def _catch_up(self, shard: int, req: Request) -> bool:
        """One prefill pass of the request's tokens the draft cache lacks (before `req.last`);
        False where it lacks none."""
        row, kv = self._rows[req], self.kv[shard]
        ids = (req.prompt + req.generated)[row.pos:req.pos]
        if not ids:
            return False
        tables = kv.prefill_tables([row], row.pos, len(ids), [req.pos])
        views = self._views(shard, tables)
        out = self.model(array(np.asarray([ids], np.int32)), views, row.pos, last=array(np.zeros(1, np.int32)))
        kv.pool.arrays = written(views)
        out.close()  # (the writes stay in the pool's graph)
        row.pos = req.pos
        return True

    def _catch_up_one(self, shard: int, rows: Sequence[Request], one: Sequence[bool]) -> None:
        """The catch-up of rows that lack one token (`one`), as one draft step of the
        shard's rows (the compiled step, the draft steps' shapes: no trace of its own);
        its logits are not read, the other rows write the null block."""
        drow = [self._rows[r] if o else _DraftRow(shard, [0]) for r, o in zip(rows, one)]
        seq = [(r.prompt + r.generated)[self._rows[r].pos] if o else 0 for r, o in zip(rows, one)]
        tables = self.kv[shard].verify_tables(drow, 1, [0 if o else -1 for o in one])
        positions = array(np.asarray([row.pos for row in drow], dtype=np.int32))
        self._forward(shard, array(np.asarray(seq, np.int32).reshape(-1, 1)), positions, tables)
        for row, o in zip(drow, one):
            if o:
                row.pos += 1

    def propose(self, shard: int, rows: Sequence[Request], lengths: Sequence[int],
                sampling) -> tuple[Array, Array | None]:
        """Drafts (B, K) int32 and their q (B, K, vocab) for a shard's rows, K = max(lengths);
        row b's entries past lengths[b] are padding; q is None when every row is greedy.
        `sampling`: the shard's BatchSampling."""
        kv, k = self.kv[shard], max(lengths)
        one = [False] * len(rows)  # rows whose draft cache lacks one token: the last draft after a
        caught = False  # round that accepted all (the common case)
        for b, (req, n) in enumerate(zip(rows, lengths)):
            if n:
                one[b] = req.pos - self._rows[req].pos == 1
                if not one[b]:
                    caught = self._catch_up(shard, req) or caught
        if any(one):
            self._catch_up_one(shard, rows, one)
            caught = True
        if caught:
            ops.async_eval(*kv.pool.arrays)  # (the device starts while the drafts are built)
        # rows not drafting write and read only the null block
        drow = [self._rows[r] if n else _DraftRow(shard, [0]) for r, n in zip(rows, lengths)]
        params = sampling.params
        # (greedy rows draw no noise: their draft keys are never read)
        keys = sampling.keys if params.all_greedy else draft_keys(sampling.keys)
        history, counts = sampling.penalty_state(self.vocab)
        token = array(np.asarray([[r.last] for r in rows], dtype=np.int32))
        drafts, probs = [], []
        for i in range(k):
            for req, row in zip(rows, drow):
                row.pos = req.pos + i
            tables = kv.verify_tables(drow, 1, [0 if i < n else -1 for n in lengths])
            positions = array(np.asarray([row.pos for row in drow], dtype=np.int32))
            logits = self._forward(shard, token, positions, tables)
            logits = fit_vocab(ops.reshape(logits, (len(rows), logits.shape[2])), self.vocab)
            step = draft_step(logits, params, keys, history, counts, probs=not params.all_greedy)
            keys, history, counts = step.keys, step.history, step.counts
            drafts.append(step.tokens)
            probs.append(step.probs)
            token = ops.reshape(step.tokens, (len(rows), 1))
            # launched now, so the device runs draft step i while the host builds step i + 1
            # and the verify pass (built whole and evaluated at the end, the round's device
            # work only began after all of its host work)
            ops.async_eval(step.tokens, *([] if step.probs is None else [step.probs]), *kv.pool.arrays)
        for req, row in zip(rows, drow):
            row.pos = req.pos  # (until `settle`: the steps' writes are only drafts so far)
        # (greedy rows never read q: an all-greedy batch's drafts go to `verify` without it)
        return ops.stack(drafts, axis=1), None if params.all_greedy else ops.stack(probs, axis=1)

    def _forward(self, shard: int, tokens: Array, positions: Array, tables: Tables) -> Array:
        """One draft step through the shard's pool (compiled where it is): logits (B, 1, V)."""
        pool = self.kv[shard].pool
        if self._step_fn is None:
            views = self._views(shard, tables)
            logits = self.model(tokens, views, positions)
            pool.arrays = written(views)
            return logits
        logits, arrays = self._step_fn(tokens, positions, extend_arrays(tables), pool.arrays)
        pool.arrays = arrays  # (the old arrays' only holder is now the graph: written in place)
        return logits

    def _step(self, tokens: Array, positions: Array, tabs: list[Array], arrays: list[Array]) -> tuple[Array, list[Array]]:
        """A draft step as a pure function of arrays (what gets compiled): tokens (B, 1),
        positions (B,), the tables' gather pieces and write slots (`extend_arrays` of
        `ShardKV.verify_tables`), the pool's arrays -> (logits, the pool's arrays written)."""
        pool, b = self.kv[0].pool, tokens.shape[0]  # (every shard's pool has the same layout)
        rows, writes, *local = tabs
        width = rows.shape[0] // (2 * b * pool.kv_heads)
        tables = Tables(rows, writes, b, width, pool.block_size)
        if local:
            tables.local = Tables(local[0], local[1], b, width, pool.block_size)
        views = layer_views(arrays, tables, self.windows, pool.bits, pool.group)
        return self.model(tokens, views, positions), written(views)

    def has_pool(self, shard: int) -> bool:
        """Whether the shard's draft pool has its arrays (made with its first block)."""
        return bool(self.kv[shard].pool.arrays)

    def timing_step(self, shard: int, rows: Sequence) -> list[Array]:
        """A draft step's forward over `rows` that hold only the null block (the
        speculator's cost measurement), built, not evaluated: the arrays to evaluate."""
        kv = self.kv[shard]
        positions = array(np.asarray([r.pos for r in rows], dtype=np.int32))
        logits = self._forward(shard, array(np.zeros((len(rows), 1), np.int32)), positions,
                               kv.verify_tables(rows, 1, [0] * len(rows)))
        return [logits, *kv.pool.arrays]

    def settle(self, req: Request, old_pos: int, drafted: int, accepted: int) -> None:
        """After a verify step: the draft cache holds the row's last token and the drafts it
        took as input (all but the last) up to the first rejected one."""
        row = self._rows.get(req)
        if row is not None and drafted:
            row.pos = old_pos + min(accepted + 1, drafted)

    def close(self) -> None:
        self._rows.clear()
        if self._step_fn is not None:
            self._step_fn.close()
            self._step_fn = None
        for kv in self.kv:
            kv.close()
