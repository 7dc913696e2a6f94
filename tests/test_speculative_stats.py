"""Counters of drafted and accepted tokens (amlx.speculative.stats)."""

from __future__ import annotations

import threading

import pytest

from amlx.speculative.stats import SpeculativeStats


def test_counts_and_rates():
    stats = SpeculativeStats()
    assert stats.snapshot() == {"drafted_tokens": 0, "accepted_tokens": 0, "verified_rows": 0,
                                "acceptance_rate": 0.0, "accepted_per_verify": 0.0}
    stats.record(4, 3)
    stats.record_batch([4, 0, 2], [1, 0, 2])  # the plain step (0 drafted) counts nothing
    snap = stats.snapshot()
    assert (snap["drafted_tokens"], snap["accepted_tokens"], snap["verified_rows"]) == (10, 6, 3)
    assert snap["acceptance_rate"] == pytest.approx(0.6)
    assert snap["accepted_per_verify"] == pytest.approx(2.0)


def test_bad_records_are_refused_and_count_nothing():
    stats = SpeculativeStats()
    with pytest.raises(ValueError, match="accepted"):
        stats.record(2, 3)
    with pytest.raises(ValueError, match="accepted"):
        stats.record(2, -1)
    with pytest.raises(ValueError, match="drafted counts"):
        stats.record_batch([1, 2], [1])
    assert stats.snapshot()["drafted_tokens"] == 0


def test_records_from_several_threads_all_count():
    stats = SpeculativeStats()

    def work():
        for _ in range(2000):
            stats.record(3, 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert (snap["drafted_tokens"], snap["accepted_tokens"], snap["verified_rows"]) == (24000, 8000, 8000)
