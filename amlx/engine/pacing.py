"""Launching a long prefill pass on a GPU in segments of layers (issue 15's 64-stream peak).

A GPU backend keeps each kernel's inputs allocated until the command buffer that
holds the kernel completes (MLX's CUDA and Metal encoders both do), and the host
builds and launches a whole pass long before the device has run it. So every
layer's activations of a prefill pass are allocated at once: a 2,048-token pass
of Gemma-3-1B added about 1.8 GB to the engine's peak on the H200, while on the
CPU, which frees each temporary as it goes, the same pass peaks at a tenth of it.

`PassPacer` launches the pass a segment of layers at a time and, before it
launches a segment, waits for the one `lag` segments back to finish. The device
always has the next segment queued, so it never waits for the host, and at most
`lag + 1` segments' activations are alive. Each wait costs the host one wake-up
per segment; a short pass (under `MIN_TOKENS`) is not paced at all, since its
activations are small and its pace is set by the host.

AMLX_PREFILL_SEGMENTS sets the number of segments (default `SEGMENTS`; 0 or 1:
no pacing, the whole pass launched at once as before).
"""
from __future__ import annotations

import math
import os
from collections import deque
from typing import Callable

from amlx._mlx import Array, ops

SEGMENTS = 8  # segments per pass: at most (lag + 1) / SEGMENTS of a pass's activations alive
LAG = 1  # segments launched ahead of the one waited for
MIN_TOKENS = 256  # passes with fewer tokens run unpaced


def segments_setting() -> int:
    """AMLX_PREFILL_SEGMENTS, or SEGMENTS."""
    text = os.environ.get("AMLX_PREFILL_SEGMENTS", "").strip()
    if not text:
        return SEGMENTS
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"AMLX_PREFILL_SEGMENTS must be a whole number of segments (0: off), not {text!r}") from None
    if value < 0:
        raise ValueError(f"AMLX_PREFILL_SEGMENTS must be >= 0, not {text!r}")
    return value


class PassPacer:
    """Called by the decoder after each layer with that layer's outputs: every
    `every` layers (not after the last: the caller evaluates the pass's end) it
    calls `before_launch` (which drops the caller's other holds on arrays the
    pass writes, so that MLX may still write them in place), launches the
    outputs, and waits for the launch `lag` segments back."""

    def __init__(self, layers: int, segments: int, before_launch: Callable[[], None] | None = None, lag: int = LAG):
        self.every = max(1, math.ceil(layers / max(1, segments)))
        self.layers, self.lag = layers, lag
        self._before = before_launch
        self._launched: deque[Array] = deque()
        self.launches = 0  # (for tests and timing: how many segments were launched early)

    def __call__(self, layer: int, *outputs: Array) -> None:
        if (layer + 1) % self.every or layer + 1 >= self.layers:
            return
        if self._before is not None:
            self._before()
        ops.async_eval(*outputs)
        self.launches += 1
        self._launched.append(outputs[0])
        if len(self._launched) > self.lag:
            ops.eval(self._launched.popleft())  # (launched already: this waits for it)


def pacer_for(layers: int, tokens: int, segments: int,
              before_launch: Callable[[], None] | None = None) -> PassPacer | None:
    """A pacer for a pass of `tokens` tokens through `layers` layers, or None
    where it runs unpaced (pacing off, a short pass, or too few layers)."""
    if segments <= 1 or tokens < MIN_TOKENS or layers < 2:
        return None
    return PassPacer(layers, segments, before_launch)
