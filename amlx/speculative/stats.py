"""Counters of speculative decoding, per engine: what `Model.stats()` and the server's
metrics report.

The worker records each verify step's rows; any thread may take a `snapshot`.
The counters only grow (Prometheus counters), so rates come from differences.
"""

from __future__ import annotations

import threading
from typing import TypedDict

__all__ = ["SpeculativeStats", "SpeculativeCounters"]


class SpeculativeCounters(TypedDict):
    """A snapshot of `SpeculativeStats` (the `speculative` entry of `Model.stats()`)."""

    drafted_tokens: int  # tokens proposed by the draft model or prompt lookup
    accepted_tokens: int  # drafted tokens the target accepted
    verified_rows: int  # rows verified with at least one draft (one per row per verify step)
    acceptance_rate: float  # accepted_tokens / drafted_tokens (0.0 before any draft)
    accepted_per_verify: float  # accepted_tokens / verified_rows (0.0 before any)


class SpeculativeStats:
    """Drafted and accepted token counts of one engine (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drafted = 0
        self._accepted = 0
        self._rows = 0

    def record(self, drafted: int, accepted: int) -> None:
        """One row's verify step: `drafted` tokens proposed, `accepted` of them kept.
        A row that drafted nothing (a plain step) records nothing."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"need 0 <= accepted <= drafted, got accepted={accepted}, drafted={drafted}")
        if drafted == 0:
            return
        with self._lock:
            self._drafted += drafted
            self._accepted += accepted
            self._rows += 1

    def record_batch(self, drafted: list[int], accepted: list[int]) -> None:
        """A verify step's rows at once (the lists pair up row by row)."""
        if len(drafted) != len(accepted):
            raise ValueError(f"{len(drafted)} drafted counts for {len(accepted)} accepted counts")
        for d, a in zip(drafted, accepted):
            self.record(d, a)

    def snapshot(self) -> SpeculativeCounters:
        with self._lock:
            drafted, accepted, rows = self._drafted, self._accepted, self._rows
        return SpeculativeCounters(drafted_tokens=drafted, accepted_tokens=accepted, verified_rows=rows,
                                   acceptance_rate=accepted / drafted if drafted else 0.0,
                                   accepted_per_verify=accepted / rows if rows else 0.0)
