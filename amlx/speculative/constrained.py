"""Constraint masks for a verify step: one per position, each after the drafts before it.

Position j of a constrained row must be masked as a plain step after the row's
tokens plus d_1..d_j would mask it. The row's matcher is walked over its drafts
and a mask filled at each position, then rolled back to where it stood, so the
scheduler's `_emit` consumes the accepted tokens afterwards as usual. A draft the
grammar forbids could never be accepted (its target probability is 0), so the
row's drafts are cut there and the positions after it are left all-allowed
(never used). Each position's masks of every row are filled in one parallel
llguidance call (`GrammarVocab.fill_masks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amlx.constrain import GrammarVocab
from amlx.constrain.matcher import Matcher

__all__ = ["draft_masks"]


def _allows(masks: np.ndarray, row: int, token: int) -> bool:
    word, bit = divmod(int(token), 32)
    return word < masks.shape[1] and bool((int(masks[row, word]) >> bit) & 1)


def draft_masks(vocab: GrammarVocab, matchers: Sequence[Matcher | None], drafts: np.ndarray,
                lengths: Sequence[int]) -> tuple[np.ndarray | None, list[int]]:
    """The (B * (K + 1), words) masks of a verify step, row-major by position (None when no
    row has a matcher), and the rows' draft lengths cut at the first forbidden draft.

    `drafts` (B, K) and `lengths` as for `verify.Drafts`; rows without a matcher, or
    whose matcher failed, allow everything at every position. Matchers end where
    they started."""
    b, k = drafts.shape
    lengths = [int(n) for n in lengths]
    if all(m is None for m in matchers):
        return None, lengths
    masks = vocab.new_masks(b * (k + 1))
    live = [i for i, m in enumerate(matchers) if m is not None and not m.error]
    consumed = [0] * b
    for j in range(k + 1):
        rows = [(m, i * (k + 1) + j) for i in live if consumed[i] == j and (m := matchers[i]) is not None]
        if rows:  # (llguidance refuses an empty call)
            vocab.fill_masks(rows, masks)
        for i in live:
            if consumed[i] != j or j >= lengths[i]:
                continue
            matcher = matchers[i]
            assert matcher is not None
            if _allows(masks, i * (k + 1) + j, drafts[i, j]) and matcher.consume(int(drafts[i, j])):
                consumed[i] += 1
            else:
                lengths[i] = j
    for i in live:
        matcher = matchers[i]
        if consumed[i] and matcher is not None:
            matcher.rollback(consumed[i])
    return masks, lengths
