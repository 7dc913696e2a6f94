"""The engine's recent decoding rate, for `stats()["tokens_per_second"]`.

The worker records, after each scheduler round that did work, how many tokens
it produced and how long the round took. The rate is the tokens of the rounds
within the last `window` seconds over the time those rounds took: time with
nothing to do is not counted (an engine that sat idle for an hour and then
decoded at 300 tok/s reports 300, not an average over the hour), and once no
round has run for `window` seconds the rate is 0.
"""

from __future__ import annotations

import threading
import time
from collections import deque


class RateMeter:
    def __init__(self, window: float = 10.0, resolution: float = 0.25):
        self.window = window
        self._resolution = resolution  # rounds are summed into buckets this long
        self._lock = threading.Lock()
        self._buckets: deque[list[float]] = deque()  # [bucket start, tokens, busy seconds]

    def add(self, tokens: int, busy: float, now: float | None = None) -> None:
        """A round that ended at `now` (default: now), made `tokens` and took `busy` seconds."""
        now = time.monotonic() if now is None else now
        start = now - now % self._resolution
        with self._lock:
            if self._buckets and self._buckets[-1][0] == start:
                bucket = self._buckets[-1]
                bucket[1] += tokens
                bucket[2] += busy
            else:
                self._buckets.append([start, tokens, busy])
            self._expire(now)

    def rate(self, now: float | None = None) -> float:
        """Tokens per second of busy time over the last `window` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(now)
            tokens = sum(b[1] for b in self._buckets)
            busy = sum(b[2] for b in self._buckets)
        return tokens / busy if busy > 0 else 0.0

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + self._resolution <= now - self.window:
            self._buckets.popleft()
