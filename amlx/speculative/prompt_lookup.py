"""Drafting by prompt lookup: n-gram matches in a row's own tokens, no model.

A row's history is its prompt followed by the tokens generated so far. To draft,
take the last n tokens of the history, find their most recent earlier
occurrence, and propose the tokens that followed it (llama.cpp's "lookup" and
vLLM's n-gram proposer work the same way). Longer matches are tried first
(n = max_ngram down to min_ngram): a longer match is better evidence that the
text is being copied.

Cost: the history only grows by accepted tokens (drafts never enter it), so an
index mapping each n-gram to the position right after its latest occurrence is
updated in O(max_ngram) per token, and a proposal costs O(max_ngram + k): no
rescan of the history per step.

When the match ends close to the end of the history, the proposal runs into
itself: proposal[i] = history[e + i] where that exists, else the proposal's own
earlier token (the periodic continuation: "a b a b" drafts "a b a b ...").
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PromptLookup"]


class PromptLookup:
    """The n-gram index of one row's history, and its drafts.

    `extend` adds tokens as they are accepted (the prompt first); `propose(k)`
    drafts up to k tokens (fewer, or none, when no n-gram of the history's end
    occurred before)."""

    def __init__(self, tokens: Iterable[int] = (), *, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self._history: list[int] = []
        # per n: n-gram -> the position just after its latest occurrence that has a follower
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self._history)

    def extend(self, tokens: Iterable[int]) -> None:
        """Appends accepted tokens to the history and indexes them."""
        history = self._history
        for token in tokens:
            end = len(history)  # the new token's position: the n-grams ending just before it get a follower
            history.append(int(token))
            for n, index in self._index.items():
                if end >= n:
                    index[tuple(history[end - n:end])] = end

    def match(self) -> int | None:
        """The position just after the most recent earlier occurrence of the history's
        longest matching suffix (n from max_ngram down to min_ngram), or None."""
        history = self._history
        length = len(history)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            end = self._index[n].get(tuple(history[length - n:]))
            if end is not None:
                return end
        return None

    def propose(self, k: int) -> list[int]:
        """Up to k drafted tokens (empty when there is no match or k is 0)."""
        if k <= 0:
            return []
        end = self.match()
        if end is None:
            return []
        history = self._history
        length = len(history)
        drafts: list[int] = []
        for i in range(k):
            pos = end + i
            drafts.append(history[pos] if pos < length else drafts[pos - length])
        return drafts
