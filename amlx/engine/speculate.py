"""Speculative decoding inside continuous batching: the scheduler's verify step.

A model loaded with `draft="prompt_lookup"` asks, each round, every running row
for drafts: up to `num_draft_tokens` tokens that followed the latest earlier
occurrence of the row's last n-gram in its own prompt and output
(`amlx.speculative.prompt_lookup`). When some row drafts, the round is a verify
step instead of a decode step: per shard one forward of K + 1 tokens per row
(the row's last token and its drafts, padded to the shard's widest row) at
per-row positions through the block tables (`ShardKV.verify_tables`,
`PagedLayer.update_verify`), then `amlx.speculative.verify` decides per row how
many drafts the target accepts and which token follows (greedy rows: exactly
what plain steps would emit; sampling rows: rejection sampling). Rows that
drafted nothing take a plain step inside the same pass (bit-identical to one).

The accepted tokens go out one by one through the scheduler's own emit path, so
EOS, stop strings, max_tokens and cancellation cut a row's stream exactly where
a plain run would; the row's position then moves on by the tokens emitted.
Rollback of rejected drafts is a position: their slots lie past the row's
position, unseen by every mask, and the next pass writes over them; blocks that
held only drafts go back to the pool (`ShardKV.trim`).

Limits, for now: a round holding a constrained row (amlx.constrain) takes a
plain step; a draft model (`draft=PATH`) is refused at load; the draft length
is the load option's (no adaptive length). See docs/speculative.md.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from amlx._mlx import Array, array, ops
from amlx.engine.request import Request
from amlx.kv import written
from amlx.speculative.draft import DraftSpec
from amlx.speculative.prompt_lookup import PromptLookup
from amlx.speculative.stats import SpeculativeStats
from amlx.speculative.verify import CompiledVerify, Drafts, Verified, VerifyParams, verify

__all__ = ["Speculator"]


class _Lookup:
    """A row's n-gram index and how many of its tokens (prompt, then output) it holds."""

    def __init__(self, prompt: list[int]):
        self.index = PromptLookup(prompt)
        self.seen = 0  # tokens of the request's output indexed

    def propose(self, req: Request, k: int) -> list[int]:
        if self.seen < len(req.generated):
            self.index.extend(req.generated[self.seen:])
            self.seen = len(req.generated)
        return self.index.propose(k)


@dataclass(eq=False)
class _Pass:
    """One shard's verify pass, launched and not yet read."""

    shard: object  # the scheduler's shard (index, kv, rows, sampling)
    rows: list[Request]
    lengths: list[int]
    result: Verified
    params: VerifyParams


class Speculator:
    """Drafting and verify steps for one scheduler (worker thread), and their counters.

    `views(shard_index, tables)`: each layer's view of a shard's pool for a pass
    (`ShardPools.views`); `on(index)`: a block running on a shard's stream;
    `emit(req, token, logprob, top)`: hands one token to its request."""

    def __init__(self, spec: DraftSpec, model, views: Callable, on: Callable,
                 emit: Callable[[Request, int, float, list | None], None]):
        if spec.kind != "prompt_lookup":
            raise ValueError(f"draft models are not supported by the engine yet (draft={spec.path})")
        self.spec = spec
        self.model = model
        self._views, self._on, self._emit = views, on, emit
        self.stats = SpeculativeStats()
        self._compiled = CompiledVerify()
        self._lookups: weakref.WeakKeyDictionary[Request, _Lookup] = weakref.WeakKeyDictionary()

    def draft_length(self, req: Request) -> int:
        """How many tokens a row may draft now: the option's, less than the tokens its
        consumer can take (a step emits up to k + 1) and than the tokens it may still make."""
        if req.matcher is not None:
            return 0
        return max(0, min(self.spec.num_draft_tokens, req.channel.room() - 1, req.assembler.remaining - 1))

    def drafts(self, rows: Sequence[Request]) -> list[list[int]]:
        """Each row's drafts (host work: prompt lookup)."""
        out = []
        for req in rows:
            k = self.draft_length(req)
            lookup = self._lookups.get(req)
            if lookup is None:
                lookup = self._lookups[req] = _Lookup(req.prompt)
            out.append(lookup.propose(req, k) if k else [])
        return out

    def plan(self, shards: Sequence) -> list[list[list[int]]] | None:
        """The drafts of every shard's rows, or None when this round should be a plain
        decode step: no row drafts, or a row is constrained."""
        if any(r.matcher is not None for s in shards for r in s.rows):
            return None
        plan = [self.drafts(s.rows) for s in shards]
        return plan if any(d for rows in plan for d in rows) else None

    def step(self, shards: Sequence, plan: list[list[list[int]]]) -> None:
        """One verify step over the shards (their rows all take part), launched,
        evaluated and read: tokens emitted, positions moved on, draft blocks trimmed.
        Raises MLXError if the device work fails (nothing is emitted then)."""
        passes: list[_Pass] = []
        try:
            for shard, drafts in zip(shards, plan):
                passes.append(self._launch(shard, drafts))
            ops.eval(*[a for p in passes for a in (*p.result.arrays(), *p.shard.sampling.state(),
                                                   *p.shard.kv.pool.state())])
            results = [p.result.read() for p in passes]
        finally:
            for p in passes:
                p.params.close()
        for p, rows in zip(passes, results):
            self._accept(p, rows)

    def _launch(self, shard, drafts: list[list[int]]) -> _Pass:
        """Builds a shard's verify forward on its stream and the acceptance on the
        home stream; the shard's pool and sampling state become the pass's results."""
        rows, kv = list(shard.rows), shard.kv
        # blocks for the drafts' positions; a row the pool cannot hold drafts fewer
        drafts = [d[:max(0, kv.extend_to(r, r.pos + len(d) + 1) - r.pos - 1)] for r, d in zip(rows, drafts)]
        lengths = [len(d) for d in drafts]
        width = max(lengths) + 1
        tokens = np.zeros((len(rows), width), dtype=np.int32)
        for i, (r, d) in enumerate(zip(rows, drafts)):
            tokens[i, 0] = r.last
            tokens[i, 1:1 + len(d)] = d
        tables = kv.verify_tables(rows, width, lengths)
        with self._on(shard.index):
            views = self._views(shard.index, tables)
            positions = array(np.asarray([r.pos for r in rows], dtype=np.int32))
            logits = self.model(array(tokens), views, positions)
            # the old arrays' only holder is now the graph, so MLX may write them in place
            kv.pool.arrays = written(views)
        return _Pass(shard, rows, lengths, *self._accept_graph(shard, logits, tokens, lengths))

    def _accept_graph(self, shard, logits: Array, tokens: np.ndarray, lengths: list[int]):
        """`verify` of a shard's pass (the graph, not evaluated); the shard's sampling
        state takes its results."""
        sampling = shard.sampling
        params = VerifyParams.build(sampling.params, tokens.shape[1])
        history, counts = sampling.penalty_state(logits.shape[2])
        drafts = Drafts(array(np.ascontiguousarray(tokens[:, 1:])), array(np.asarray(lengths, dtype=np.int32)))
        result = verify(logits, drafts, params, sampling.keys, history, counts, compiled=self._compiled)
        sampling.adopt(result.keys, result.history, result.counts)
        return result, params

    def _accept(self, p: _Pass, results) -> None:
        """Emits each row's tokens one by one (a row that ends stops taking them) and
        moves its position on by the tokens emitted: its last token and the accepted
        drafts are in the cache, the rest is rolled back."""
        for req, n_drafts, res in zip(p.rows, p.lengths, results):
            emitted = 0
            for i, tok in enumerate(res.tokens):
                if not req.active:
                    break
                self._emit(req, tok, float(res.logprobs[i]), None if res.top is None else res.top[i])
                emitted += 1
            req.pos += emitted
            req.steps += 1
            p.shard.kv.trim(req)
            self.stats.record(n_drafts, res.accepted)

    def close(self) -> None:
        self._compiled.close()
