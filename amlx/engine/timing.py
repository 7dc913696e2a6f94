"""Host time per phase of the scheduler's rounds, for finding where a decode step's time goes.

Off unless AMLX_STEP_TIMING=1 (read once, when an engine is built): an off timer's `lap` does
nothing. On, each `lap(name)` charges the wall time since the previous lap (or since the
round began) to `name`, so the phases of a round add up to the round's wall time. Phases
that wait for the device (`wait`: a step's tokens read back) show as host time too: a step
whose time goes mostly to `wait` is bound by the device, one whose time goes elsewhere is
bound by the host. `Engine.stats()["step_timing"]` reports the totals (seconds, cumulative:
subtract two snapshots to time one run). `add` records work done beside the rounds (another
thread's, or part of a phase): those totals go under "background" and are not part of the
rounds' sum; `count` counts events (prefill groups, drained steps) under "counts". "cpu"
holds the same phases' CPU time on the timing thread (time.thread_time): the host's own work,
without its waits for the device, the GIL or other threads, and, on the CPU backend, without
the compute that MLX runs on its streams' threads, so it stays comparable on a loaded machine.
"""

from __future__ import annotations

import os
import time

__all__ = ["StepTiming", "step_timing_enabled"]


def step_timing_enabled() -> bool:
    return os.environ.get("AMLX_STEP_TIMING", "").strip() in ("1", "true", "yes", "on")


class StepTiming:
    """Cumulative host seconds per phase, and the rounds and decode steps they cover."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self.background: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self.rounds = 0
        self._last = 0.0
        self._last_cpu = 0.0

    def begin(self) -> None:
        """A round starts: the clock of its first phase starts now."""
        if self.enabled:
            self.rounds += 1
            self._last = time.perf_counter()
            self._last_cpu = time.thread_time()

    def lap(self, name: str) -> None:
        """Charges the time since the last lap (or `begin`) to `name`."""
        if self.enabled:
            now, cpu = time.perf_counter(), time.thread_time()
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu - self._last_cpu
            self._last, self._last_cpu = now, cpu

    def add(self, name: str, seconds: float) -> None:
        """Charges `seconds` to the background total `name` (no lap: the round's clock runs on)."""
        if self.enabled:
            self.background[name] = self.background.get(name, 0.0) + seconds

    def count(self, name: str) -> None:
        """One more `name` event."""
        if self.enabled:
            self.counts[name] = self.counts.get(name, 0) + 1

    def snapshot(self) -> dict:
        """{"rounds": n, "seconds": {phase: total seconds}, "cpu": {phase: CPU seconds},
        "background": {name: total seconds}, "counts": {event: n}} so far."""
        return {"rounds": self.rounds, "seconds": dict(self.seconds), "cpu": dict(self.cpu),
                "background": dict(self.background), "counts": dict(self.counts)}
