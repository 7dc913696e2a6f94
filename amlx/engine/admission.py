"""When waiting requests join a running batch (the scheduler's admission policy).

Every join costs the running batch more than its prompt's compute: the host waits for the
prompts' prefill pass (and the decode step in flight) before it launches the next step, so
the device idles while the host builds that step; on a GPU the pass's own host work
(building the uncompiled forward op by op) is about the same for 2 prompts as for 16; and
where joins cannot chain (EngineOptions.chain_changes off, penalised requests) the step in
flight is drained first. Under churn (short requests, e.g. JSON answers that close after
35-128 tokens, with closed-loop clients) rows leave and new requests arrive nearly every
step, and joining each as soon as it arrives pays those costs nearly every step.

So while the batch is busy, joins are coalesced: a waiting request may wait a few decode
steps for others, and they join together, one prefill pass (and at most one drain) for the group.
Bounds, so that no request is held up for long and a quiet engine never waits:
- never while the batch is less than half full (or idle, or nothing is in flight);
- never beyond `wait_steps` decode steps for the oldest waiting request;
- never once `group` requests wait (or as many as there are free slots).
`wait_steps` 0 turns coalescing off (every join at once, as before).
"""

from __future__ import annotations

__all__ = ["JoinPolicy", "DEFAULT_JOIN_WAIT"]

# Decode steps the oldest waiting request may wait for others (EngineOptions.join_wait).
DEFAULT_JOIN_WAIT = 4


class JoinPolicy:
    """Decides, once per round, whether the waiting requests join now (worker thread)."""

    def __init__(self, wait_steps: int, capacity: int):
        self.wait_steps = wait_steps
        self.capacity = capacity
        # a group this large joins at once: an eighth of the batch (8 of 64), at least 2
        self.group = max(2, capacity // 8)
        self._since: int | None = None  # the decode step when the oldest waiting request was first held
        self.held = 0  # rounds that held joins back (tests, stats)

    def due(self, *, waiting: int, free: int, running: int, chained: bool, step: int) -> bool:
        """Whether `waiting` requests (with `free` batch slots, `running` rows, a decode step
        in flight or not, at decode step number `step`) should join this round."""
        if not waiting or free <= 0:
            self._since = None if not waiting else self._since
            return False
        if (not self.wait_steps or not chained or running * 2 < self.capacity
                or waiting >= min(free, self.group)):
            return True
        if self._since is None:
            self._since = step
        if step - self._since >= self.wait_steps:
            return True
        self.held += 1
        return False

    def joined(self, left_waiting: int) -> None:
        """A group joined; `left_waiting` still wait (they keep the oldest's clock, so none
        waits beyond the bound)."""
        if not left_waiting:
            self._since = None
