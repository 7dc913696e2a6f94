"""The acceptance rule of speculative decoding, for a batch of rows, on the device.

A verify step runs the target on each row's last token plus its K drafted
tokens d_1..d_K, which gives K + 1 logit vectors per row: position j holds the
target's view of the token after d_1..d_j (position 0: after the last emitted
token). Given those logits, `verify` decides per row how many drafts to accept
and which token follows them:

- greedy rows (temperature 0): accept while the target's choice at position j
  (the argmax of its processed logits) equals d_{j+1}; then emit the target's
  choice at the first mismatch (or after the last draft, the bonus token). The
  output is the tokens plain greedy decoding would give, exactly.
- sampling rows: speculative rejection sampling (Leviathan et al. 2023, Chen et
  al. 2023). Draft d_{j+1} was drawn from the draft's distribution q_j; accept
  it with probability min(1, p_j(d) / q_j(d)), where p_j is the target's
  distribution at j. At the first rejection, draw from norm(max(0, p_j - q_j));
  when every draft is accepted, draw the bonus token from p_K. Each emitted
  token is then distributed exactly as under p. With prompt lookup q_j is a
  point mass on d_{j+1}: accept with probability p_j(d), and on rejection draw
  from p_j with d removed.

The target's distribution p_j is `amlx.sample.sampling_logits` of position j:
logit_bias, the penalties, temperature, top-k, top-p and min-p, exactly as a
plain step. Penalties depend on the tokens so far: position j sees the row's
history and counts plus d_1..d_j (the tokens it would follow if they are
accepted), so an accepted token is judged as a plain step after the same
tokens would judge it. Constraint masks are the caller's, per position (each
computed by the row's matcher advanced over d_1..d_j), applied before anything
else, as in a plain step. Logprobs (and top logprobs) are those a plain step
reports: log_softmax of the (masked) raw logits at each emitted position.

Randomness is the row's own key: the final draw uses `gumbel_noise` of the key
as it stands (so a row with no drafts draws exactly the token a plain step
would), the acceptance tests use the same keyed hash at counters the noise
never uses, and the key advances once per verify step. A seeded row's tokens
therefore depend on its seed and its own drafts only, not on its batch.

Rows may draft fewer than K tokens (`Drafts.lengths`, 0 included): a row with
no drafts takes a plain step inside the verify step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from amlx import _mlx as mx
from amlx._mlx import Array, ops, transforms
from amlx.constrain.apply import masked_logits
from amlx.sample import BatchParams, advance_keys, gumbel_noise, keyed_hash, sampling_logits, token_logprobs

__all__ = ["Drafts", "Verified", "RowResult", "VerifyParams", "CompiledVerify", "verify", "uniforms"]

# The acceptance tests' counters, counting down from here: below `advance_keys`' two
# counters (2**32 - 1, 2**32 - 2) and far above any vocabulary's (the noise's 0..V-1).
UNIFORM_COUNTER = 0xFFFFFFFD


class Drafts(NamedTuple):
    """A batch's drafted tokens (device arrays)."""

    tokens: Array  # (B, K) int32; entries past a row's length are ignored (any value)
    lengths: Array  # (B,) int32: how many drafts each row has, 0..K
    probs: Array | None = None  # (B, K, V) float32: the draft's distribution q_j each d_{j+1}
    # was drawn from (a draft model); None: point masses (prompt lookup)


class RowResult(NamedTuple):
    """One row's new tokens, read back on the host."""

    accepted: int  # drafts accepted
    tokens: list[int]  # accepted + 1 tokens: the accepted drafts, then the corrected or bonus token
    logprobs: list[float]  # the target's log-probabilities of `tokens` (0.0 unless a row asked)
    top: list[list[tuple[int, float]]] | None  # per token, (id, logprob) pairs best first


class Verified(NamedTuple):
    """The result of `verify` (device arrays; nothing is evaluated)."""

    accepted: Array  # (B,) int32
    tokens: Array  # (B, K + 1) int32: row b's first accepted[b] + 1 entries are its new tokens
    logprobs: Array  # (B, K + 1) float32
    keys: Array  # (B, 2) uint32: the keys for the next step
    history: Array | None  # (B, V) bool: the history with the emitted tokens added
    counts: Array | None  # (B, V) int32: the counts with the emitted tokens added
    top_ids: Array | None  # (B, K + 1, n) int32, best first
    top_logprobs: Array | None  # (B, K + 1, n) float32

    def arrays(self) -> list[Array]:
        """The arrays to evaluate."""
        return [a for a in self if a is not None]

    def read(self) -> list[RowResult]:
        """Each row's new tokens (waits for the device)."""
        accepted = self.accepted.numpy().tolist()
        tokens, logprobs = self.tokens.numpy().tolist(), self.logprobs.numpy().tolist()
        tops: list[list[list[tuple[int, float]]]] | None = None
        if self.top_ids is not None and self.top_logprobs is not None:
            tops = [[list(zip(i, p)) for i, p in zip(ids, lps)]
                    for ids, lps in zip(self.top_ids.numpy().tolist(), self.top_logprobs.numpy().tolist())]
        out = []
        for b, a in enumerate(accepted):
            n = int(a) + 1
            out.append(RowResult(int(a), [int(t) for t in tokens[b][:n]], logprobs[b][:n],
                                 None if tops is None else tops[b][:n]))
        return out


@dataclass(eq=False)
class VerifyParams:
    """A batch's sampling parameters for verify steps of `width` = K + 1 positions:
    the rows' own (`rows`, owned by the caller) and each row's repeated once per position
    (`positions`, owned here, made on first use: a compiled `verify` repeats them inside
    its graph instead, so an engine's verify round builds no arrays for them on the host).
    Build it when the batch composition or K changes."""

    rows: BatchParams
    width: int
    _positions: BatchParams | None = field(default=None, repr=False)

    @classmethod
    def build(cls, rows: BatchParams, width: int) -> "VerifyParams":
        if width < 1:
            raise ValueError(f"a verify step has at least one position, got width={width}")
        return cls(rows, width)

    @property
    def positions(self) -> BatchParams:
        """Each row's parameters repeated once per position (B * width rows)."""
        if self._positions is None:
            self._positions = _per_position(self.rows, self.width)
        return self._positions

    def close(self) -> None:
        if self._positions is not None:
            self._positions.close()
            self._positions = None


def _per_position(rows: BatchParams, width: int) -> BatchParams:
    """`rows` with each row repeated `width` times (row-major: row b's positions together)."""

    def rep(a: Array) -> Array:
        shape = a.shape
        wide = ops.broadcast_to(ops.reshape(a, (shape[0], 1, *shape[1:])), (shape[0], width, *shape[1:]))
        return ops.reshape(wide, (shape[0] * width, *shape[1:]))

    return dataclasses.replace(
        rows, temperature=rep(rows.temperature), top_k=rep(rows.top_k), top_p=rep(rows.top_p),
        min_p=rep(rows.min_p), repetition_penalty=rep(rows.repetition_penalty),
        presence_penalty=rep(rows.presence_penalty), frequency_penalty=rep(rows.frequency_penalty),
        bias_ids=rep(rows.bias_ids), bias_values=rep(rows.bias_values), size=rows.size * width,
        top_k_values=tuple(k for k in rows.top_k_values for _ in range(width)))


def uniforms(keys: Array, k: int) -> Array:
    """(B, k) float32 uniforms in (0, 1), row b from keys[b] alone: the acceptance tests'."""
    counters = mx.array(np.array([[UNIFORM_COUNTER - j for j in range(k)]], dtype=np.uint32))
    u = keyed_hash(keys, counters).astype(mx.float32) * (2.0 ** -32) + (2.0 ** -33)
    return ops.minimum(u, 1.0 - 2.0 ** -24)


def _position_state(history: Array | None, counts: Array | None, drafts: Array,
                    vocab: int) -> tuple[Array | None, Array | None]:
    """Each position's history and counts (B, K + 1, V): the row's plus d_1..d_j at j."""
    if history is None and counts is None:
        return None, None
    b, k = drafts.shape
    seen = ops.zeros((b, 1, vocab), mx.int32)
    if k:
        hits = ops.equal(ops.reshape(drafts, (b, k, 1)), ops.arange(0, vocab, dtype=mx.int32)[None, None, :])
        seen = ops.concatenate([seen, ops.cumsum(hits.astype(mx.int32), axis=1)], axis=1)
    hist = None if history is None else ops.logical_or(history[:, None, :], seen > 0)
    cnt = None if counts is None else counts[:, None, :] + seen
    return hist, cnt


def _flat(a: Array | None) -> Array | None:
    return None if a is None else ops.reshape(a, (a.shape[0] * a.shape[1], a.shape[2]))


def _at(a: Array, pos: Array) -> Array:
    """a[b, pos[b]] for a (B, W, V) and pos (B,): (B, V)."""
    return ops.take_along_axis(a, ops.reshape(pos, (pos.shape[0], 1, 1)), 1)[:, 0]


def _acceptance(x: Array, drafts: Drafts, greedy_row: Array, keys: Array, all_greedy: bool) -> Array:
    """(B, K) bool: whether each draft passes its test (before the first failure is applied)."""
    b, k = drafts.tokens.shape
    d = drafts.tokens
    xk = x[:, :k]
    ok = ops.equal(ops.argmax(xk, axis=-1).astype(mx.int32), d)
    if not all_greedy:
        col = ops.reshape(d, (b, k, 1))
        p_d = ops.take_along_axis(ops.softmax(xk, axis=-1), col, -1)[:, :, 0]
        q_d = mx.array(1.0, mx.float32) if drafts.probs is None else ops.take_along_axis(drafts.probs, col, -1)[:, :, 0]
        # u < p / q without the division (q = 0 cannot be drawn; p = 0 never passes)
        sampled_ok = ops.less(uniforms(keys, k) * q_d, p_d)
        ok = ops.where(greedy_row[:, None], ok, sampled_ok)
    valid = ops.less(ops.arange(0, k, dtype=mx.int32)[None, :], drafts.lengths[:, None])
    return ops.logical_and(ok, valid)


def _rejected_q(drafts: Drafts, pos: Array, vocab: int) -> Array:
    """The draft's distribution (B, V) at each row's position `pos` (clamped to K - 1)."""
    k = drafts.tokens.shape[1]
    at = ops.minimum(pos, k - 1)
    if drafts.probs is not None:
        return _at(drafts.probs, at)
    d = ops.take_along_axis(drafts.tokens, at[:, None], 1)
    return ops.equal(d, ops.arange(0, vocab, dtype=mx.int32)[None, :]).astype(mx.float32)


def _final_token(x: Array, accepted: Array, drafts: Drafts, greedy_row: Array, keys: Array,
                 all_greedy: bool) -> Array:
    """(B,) int32: the token after the accepted drafts: the target's choice, drawn from the
    residual norm(max(0, p - q)) after a rejection, from p itself otherwise."""
    xa = _at(x, accepted)
    vocab = xa.shape[1]
    greedy_tok = ops.argmax(xa, axis=-1).astype(mx.int32)
    if all_greedy:
        return greedy_tok
    draw_from = xa
    if drafts.tokens.shape[1] > 0:
        rejected = ops.less(accepted, drafts.lengths)
        residual = ops.maximum(ops.softmax(xa, axis=-1) - _rejected_q(drafts, accepted, vocab), 0.0)
        # p == q up to rounding leaves nothing: then p itself (a rejection there has probability ~0)
        some = ops.greater(ops.sum(residual, axis=-1, keepdims=True), 0.0)
        draw_from = ops.where(ops.logical_and(rejected[:, None], some), ops.log(residual), xa)
    drawn = ops.argmax(draw_from + gumbel_noise(keys, vocab), axis=-1).astype(mx.int32)
    return ops.where(greedy_row, greedy_tok, drawn)


def _check(logits: Array, drafts: Drafts, params: VerifyParams, keys: Array) -> None:
    b, width, vocab = logits.shape
    k = width - 1
    if params.width != width or params.rows.size != b:
        raise ValueError(f"logits of shape {logits.shape} need VerifyParams of {b} rows and width {width}, "
                         f"got {params.rows.size} rows and width {params.width}")
    if drafts.tokens.shape != (b, k) or drafts.lengths.shape != (b,):
        raise ValueError(f"drafts must be ({b}, {k}) tokens and ({b},) lengths, got "
                         f"{drafts.tokens.shape} and {drafts.lengths.shape}")
    if drafts.probs is not None and drafts.probs.shape != (b, k, vocab):
        raise ValueError(f"draft probabilities must have shape ({b}, {k}, {vocab}), got {drafts.probs.shape}")
    if keys.shape != (b, 2):
        raise ValueError(f"keys must have shape ({b}, 2), got {keys.shape}")


def verify(logits: Array, drafts: Drafts, params: VerifyParams, keys: Array, history: Array | None = None,
           counts: Array | None = None, masks: np.ndarray | None = None, *,
           compiled: "CompiledVerify | None" = None) -> Verified:
    """Accepts or rejects each row's drafts given the target's logits (B, K + 1, V).

    `params`, `keys`, `history` and `counts` are the rows' sampling state as for
    `amlx.sample.sample` (history and counts as they stand before the drafts);
    `masks` the (B * (K + 1), words) constraint bitmasks, row-major by position,
    or None. Returns the accepted counts, the tokens to emit and their logprobs,
    and the rows' next keys, history and counts (with the emitted tokens).
    With `compiled` (an engine's `CompiledVerify`) the work runs as a compiled
    graph, traced once per configuration and shape; the results are the same."""
    _check(logits, drafts, params, keys)
    b, width, vocab = logits.shape
    raw = ops.reshape(logits.astype(mx.float32), (b * width, vocab))
    if masks is not None:
        raw = masked_logits(raw, masks)
    if compiled is not None:
        return compiled.run(raw, drafts, params, keys, history, counts)
    return _verify(raw, drafts, params, keys, history, counts)


def _verify(raw: Array, drafts: Drafts, params: VerifyParams, keys: Array, history: Array | None,
            counts: Array | None) -> Verified:
    """`verify` on the flattened (B * (K + 1), V) float32 logits, masks applied (traceable)."""
    b, width, vocab = drafts.lengths.shape[0], params.width, raw.shape[1]
    hist, cnt = _position_state(history, counts, drafts.tokens, vocab)
    rows = params.rows
    x = ops.reshape(sampling_logits(raw, params.positions, _flat(hist), _flat(cnt)), (b, width, vocab))
    greedy_row = ops.less_equal(rows.temperature, 0.0)
    if width > 1:
        passed = _acceptance(x, drafts, greedy_row, keys, rows.all_greedy).astype(mx.int32)
        accepted = ops.sum(ops.cumprod(passed, axis=1), axis=1).astype(mx.int32)
    else:  # no row drafted: a plain step
        accepted = ops.zeros((b,), mx.int32)
    final = _final_token(x, accepted, drafts, greedy_row, keys, rows.all_greedy)
    tokens = _emitted(drafts.tokens, accepted, final)
    lp, top_ids, top_lps = _emitted_logprobs(raw, tokens, rows)
    if hist is not None:
        hist = ops.put_along_axis(_at(hist, accepted), final[:, None], mx.array(True), -1)
    if cnt is not None:
        cnt = _at(cnt, accepted)
        cnt = ops.put_along_axis(cnt, final[:, None], ops.take_along_axis(cnt, final[:, None], -1) + 1, -1)
    next_keys = keys if rows.all_greedy else advance_keys(keys)
    return Verified(accepted, tokens, lp, next_keys, hist, cnt, top_ids, top_lps)


# BatchParams' arrays, in the order of BatchParams.arrays()
_PARAM_ARRAYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "bias_ids", "bias_values")


def _host_part(params: BatchParams) -> BatchParams:
    """`params` with its arrays taken out: the host flags a trace depends on."""
    none: dict[str, Any] = {name: None for name in _PARAM_ARRAYS}  # never read in a trace
    return dataclasses.replace(params, **none)


def _with_arrays(params: BatchParams, arrays: Sequence[Array]) -> BatchParams:
    given: dict[str, Any] = dict(zip(_PARAM_ARRAYS, arrays))
    return dataclasses.replace(params, **given)


class CompiledVerify:
    """Compiled verify graphs, one per configuration, owned by one engine (`close` drops
    MLX's traces with them). A configuration is what changes the graph: the width, the
    vocabulary, the batch's host flags, and which of q, history and counts are given."""

    def __init__(self) -> None:
        self._fns: dict[tuple[object, ...], Any] = {}

    def run(self, raw: Array, drafts: Drafts, params: VerifyParams, keys: Array, history: Array | None,
            counts: Array | None) -> Verified:
        rows = params.rows
        vocab = raw.shape[1]
        flags = (rows.all_greedy, rows.any_greedy, rows.any_top_p, rows.any_min_p, rows.any_penalty,
                 rows.any_counts, rows.any_logprobs, rows.bias_width, rows.top_n, rows.kmax(vocab))
        key = (params.width, vocab, flags, drafts.probs is not None, history is not None, counts is not None)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = transforms.compile(self._traced(params))
        out = fn(raw, drafts.tokens, drafts.lengths, drafts.probs, keys, history, counts, *rows.arrays())
        return Verified(*out)

    @staticmethod
    def _traced(params: VerifyParams) -> Callable[..., tuple[Array | None, ...]]:
        rows, width = _host_part(params.rows), params.width

        def fn(raw: Array, tokens: Array, lengths: Array, probs: Array | None, keys: Array, history: Array | None,
               counts: Array | None, *arrays: Array) -> tuple[Array | None, ...]:
            # (the per-position parameters are repeated inside the graph)
            vp = VerifyParams(_with_arrays(rows, arrays), width)
            return tuple(_verify(raw, Drafts(tokens, lengths, probs), vp, keys, history, counts))

        return fn

    def __len__(self) -> int:
        """How many configurations have a compiled graph."""
        return len(self._fns)

    def close(self) -> None:
        for fn in self._fns.values():
            fn.close()
        self._fns.clear()


def _emitted(drafts: Array, accepted: Array, final: Array) -> Array:
    """(B, K + 1): the accepted drafts, the final token at index `accepted`, zeros after."""
    b, k = drafts.shape
    pos = ops.arange(0, k + 1, dtype=mx.int32)[None, :]
    padded = ops.concatenate([drafts, ops.zeros((b, 1), mx.int32)], axis=1)
    a = accepted[:, None]
    return ops.where(ops.less(pos, a), padded, ops.where(ops.equal(pos, a), final[:, None], 0)).astype(mx.int32)


def _emitted_logprobs(raw: Array, tokens: Array, rows: BatchParams) -> tuple[Array, Array | None, Array | None]:
    """The log-probabilities a plain step reports, at every position (B, K + 1)."""
    b, width = tokens.shape
    if not (rows.any_logprobs or rows.top_n):
        return ops.zeros((b, width), mx.float32), None, None
    lp, ids, lps = token_logprobs(raw, ops.reshape(tokens, (b * width,)), rows.top_n)
    if ids is None or lps is None:
        return ops.reshape(lp, (b, width)), None, None
    n = ids.shape[1]
    return ops.reshape(lp, (b, width)), ops.reshape(ids, (b, width, n)), ops.reshape(lps, (b, width, n))
