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

It also says which phase set MLX's peak memory: at each lap, if the peak counter rose during
the phase, the phase is credited with the new peak (`peak_bytes`, the highest per phase), so
a benchmark that resets the peak and reads it later can tell a prefill's activations from a
decode step's temporaries or the KV pool's growth (growth in admission counts to `admit`, in
a decode step's block extension to `plan`). Work launched in one phase and computed during a
later one is credited to the phase that allocated its buffers (on a GPU, where it is encoded).
"""

from __future__ import annotations

import os
import time

from amlx._mlx import memory

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
        self.peak_bytes: dict[str, int] = {}
        self._peak = 0  # MLX's peak counter at the last lap

    def begin(self) -> None:
        """A round starts: the clock of its first phase starts now."""
        if self.enabled:
            self.rounds += 1
            self._last = time.perf_counter()
            self._last_cpu = time.thread_time()

    def lap(self, name: str) -> float:
        """Charges the time since the last lap (or `begin`) to `name`; returns it (0.0 when off)."""
        spent = 0.0
        if self.enabled:
            now, cpu = time.perf_counter(), time.thread_time()
            spent = now - self._last
            self.seconds[name] = self.seconds.get(name, 0.0) + spent
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu - self._last_cpu
            peak = memory.peak()
            if peak > self._peak:  # (lower: someone reset the counter meanwhile)
                self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)
            self._peak = peak
            # (reading the counter is not the phase's time)
            self._last, self._last_cpu = time.perf_counter(), time.thread_time()
        return spent

    def add(self, name: str, seconds: float) -> None:
        """Charges `seconds` to the background total `name` (no lap: the round's clock runs on)."""
        if self.enabled:
            self.background[name] = self.background.get(name, 0.0) + seconds

    def add_over(self, name: str, seconds: float, limit: float) -> None:
        """Where `seconds` exceeds `limit`: one more `name` event, and `seconds` charged to the
        background total `name` (whether a mean comes from every round or from a few)."""
        if self.enabled and seconds > limit:
            self.count(name)
            self.add(name, seconds)

    def count(self, name: str, n: int = 1) -> None:
        """`n` more `name` events."""
        if self.enabled:
            self.counts[name] = self.counts.get(name, 0) + n

    def forget_peaks(self) -> None:
        """Starts the peaks per phase afresh (a benchmark that resets MLX's peak counter)."""
        self.peak_bytes.clear()

    def snapshot(self) -> dict:
        """{"rounds": n, "seconds": {phase: total seconds}, "cpu": {phase: CPU seconds},
        "background": {name: total seconds}, "counts": {event: n}, "peak_bytes": {phase: the
        highest MLX peak it set}} so far."""
        return {"rounds": self.rounds, "seconds": dict(self.seconds), "cpu": dict(self.cpu),
                "background": dict(self.background), "counts": dict(self.counts),
                "peak_bytes": dict(self.peak_bytes)}
