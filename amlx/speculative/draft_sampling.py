"""How a draft model draws its drafts: each row with its own sampling options and key.

Rejection sampling keeps the target's distribution whatever q the drafts were
drawn from, but acceptance is best when q is close to p, so a draft step
applies the row's own transforms (`amlx.sample.sampling_logits`: bias,
penalties, temperature, filters) to the draft model's logits: q is softmax of
them, and a greedy row drafts their argmax. Penalties see the drafts before
(the caller passes the history and counts each step returns).

The draft's random numbers must not be the target's: `verify` draws its final
token with the row key's Gumbel noise, and a draft drawn with that same noise
would be correlated with it. So a verify step's drafts use keys derived from
the row keys (`draft_keys`, at counters neither the noise, the acceptance
tests nor `advance_keys` use) and advanced once per draft step.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from amlx import _mlx as mx
from amlx._mlx import Array, ops
from amlx.sample import BatchParams, advance_keys, gumbel_noise, keyed_hash, sampling_logits

__all__ = ["DraftStep", "draft_keys", "draft_step", "fit_vocab"]

# Far below verify's acceptance counters (2**32 - 3 downwards, one per draft position).
DRAFT_KEY_COUNTERS = (0xFFFFFF00, 0xFFFFFF01)


class DraftStep(NamedTuple):
    """One draft step's results (device arrays)."""

    tokens: Array  # (B,) int32: the drafts
    probs: Array | None  # (B, V) float32: q, the distribution each sampling row drew from (None: not asked)
    keys: Array  # (B, 2) uint32: the draft keys for the next draft step
    history: Array | None  # the history with the drafts added (None if none given)
    counts: Array | None  # the counts with the drafts added (None if none given)


def draft_keys(keys: Array) -> Array:
    """(B, 2) uint32: the first draft step's keys, derived from the rows' keys (not consumed)."""
    return keyed_hash(keys, mx.array(np.array([DRAFT_KEY_COUNTERS], dtype=np.uint32)))


def draft_step(logits: Array, params: BatchParams, keys: Array, history: Array | None = None,
               counts: Array | None = None, probs: bool = True) -> DraftStep:
    """Draws one draft per row from the draft model's logits (B, V) (padded with -inf to the
    target's vocabulary when the draft's is smaller), with the rows' params and draft `keys`.
    `probs` False: q is not computed (a batch of greedy rows, which `verify` judges by argmax)."""
    x = sampling_logits(logits, params, history, counts)
    greedy = ops.argmax(x, axis=-1).astype(mx.int32)
    if params.all_greedy:  # no noise to draw, and the keys stay as they are (never read by greedy rows)
        tokens = greedy
    else:
        drawn = ops.argmax(x + gumbel_noise(keys, x.shape[1]), axis=-1).astype(mx.int32)
        tokens = ops.where(ops.less_equal(params.temperature, 0.0), greedy, drawn)
    col = tokens[:, None]
    if history is not None:
        history = ops.put_along_axis(history, col, mx.array(True), -1)
    if counts is not None:
        counts = ops.put_along_axis(counts, col, ops.take_along_axis(counts, col, -1) + 1, -1)
    return DraftStep(tokens, ops.softmax(x, axis=-1) if probs else None,
                     keys if params.all_greedy else advance_keys(keys), history, counts)


def fit_vocab(logits: Array, vocab: int) -> Array:
    """The draft's logits (B, V_draft) as (B, vocab), the target's width: cut, or padded with
    -inf (ids past the draft's embedding rows are ids without a token, never drafted). Two
    checkpoints of one tokenizer often pad their embeddings to different sizes."""
    b, v = logits.shape
    if v == vocab:
        return logits
    if v > vocab:
        return ops.slice(logits, (0, 0), (b, vocab))
    pad = ops.full((b, vocab - v), float("-inf"), logits.dtype)
    return ops.concatenate([logits, pad], axis=1)
