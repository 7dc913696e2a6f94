"""Prompt-lookup drafting (amlx.speculative.prompt_lookup) against a brute-force reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx.speculative.prompt_lookup import PromptLookup


def reference(history: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Rescans the whole history: the longest suffix n-gram's latest earlier occurrence,
    then the k tokens after it (continuing periodically into the proposal itself)."""
    length = len(history)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= length:
            continue
        suffix = history[length - n:]
        for end in range(length - 1, n - 1, -1):  # an occurrence ending at `end` (exclusive), end < length
            if history[end - n:end] == suffix:
                seq = list(history)
                for i in range(k):
                    seq.append(seq[end + i])
                return seq[length:]
    return []


tokens = st.lists(st.integers(0, 3), max_size=40)


@settings(max_examples=300, deadline=None)
@given(prompt=tokens, chunks=st.lists(tokens, max_size=5), k=st.integers(0, 6),
       ngrams=st.tuples(st.integers(1, 4), st.integers(0, 3)))
def test_proposals_match_a_full_rescan_as_tokens_arrive(prompt, chunks, k, ngrams):
    min_ngram, extra = ngrams
    max_ngram = min_ngram + extra
    lookup = PromptLookup(prompt, max_ngram=max_ngram, min_ngram=min_ngram)
    history = list(prompt)
    assert lookup.propose(k) == reference(history, k, max_ngram, min_ngram)
    for chunk in chunks:
        lookup.extend(chunk)
        history += chunk
        assert len(lookup) == len(history)
        assert lookup.propose(k) == reference(history, k, max_ngram, min_ngram)


def test_copies_what_followed_the_latest_longest_match():
    # "1 2 3" occurred at the start followed by 4 5 6; "2 3" alone later, followed by 9
    lookup = PromptLookup([1, 2, 3, 4, 5, 6, 7, 2, 3, 9, 1, 2, 3])
    assert lookup.propose(3) == [4, 5, 6]
    lookup = PromptLookup([1, 2, 3, 4, 5, 6, 7, 2, 3, 9, 1, 2, 3], max_ngram=2)
    assert lookup.propose(3) == [9, 1, 2]  # the latest "2 3"


def test_a_repeating_pattern_continues_periodically():
    assert PromptLookup([7, 8, 7, 8]).propose(5) == [7, 8, 7, 8, 7]


def test_no_match_drafts_nothing():
    assert PromptLookup([1, 2, 3]).propose(4) == []
    assert PromptLookup([]).propose(4) == []
    assert PromptLookup([5]).propose(4) == []
    assert PromptLookup([5, 5]).propose(0) == []


def test_bad_ngram_bounds_are_refused():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup([], max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup([], min_ngram=0)
