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
`lag + 1` segments' activations are alive. A segment takes as many layers as
stay under AMLX_PREFILL_SEGMENT bytes of activations (default SEGMENT_BYTES; 0:
no pacing, the whole pass launched at once), estimated per layer and token from
the model's shapes (`PassBudget.token_bytes`, an upper bound). A pass whose
estimate is under two segments is not paced at all: its activations are small
and each wait would cost the host a wake-up.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

from amlx._mlx import Array, ops
from amlx.engine.prefill_budget import env_bytes

SEGMENT_BYTES = 64 << 20  # estimated activations of one segment (lag + 1 segments alive)
LAG = 1  # segments launched ahead of the one waited for


def segment_setting() -> int:
    """AMLX_PREFILL_SEGMENT in bytes (K/M/G suffixes; 0: off), or SEGMENT_BYTES."""
    return env_bytes("AMLX_PREFILL_SEGMENT", SEGMENT_BYTES)


class PassPacer:
    """Called by the decoder after each layer with that layer's outputs: every
    `every` layers (not after the last: the caller evaluates the pass's end) it
    calls `before_launch` (which drops the caller's other holds on arrays the
    pass writes, so that MLX may still write them in place), launches the
    outputs, and waits for the launch `lag` segments back."""

    def __init__(self, layers: int, every: int, before_launch: Callable[[], None] | None = None, lag: int = LAG):
        self.every = max(1, every)
        self.layers, self.lag = layers, lag
        self._before = before_launch
        self._launched: deque[Array] = deque()
        self.launches = 0  # (for tests: how many segments were launched early)
        self.waited = 0.0  # seconds the host spent waiting for earlier segments (step timing)

    def __call__(self, layer: int, *outputs: Array) -> None:
        if (layer + 1) % self.every or layer + 1 >= self.layers:
            return
        if self._before is not None:
            self._before()
        ops.async_eval(*outputs)
        self.launches += 1
        self._launched.append(outputs[0])
        if len(self._launched) > self.lag:
            start = time.perf_counter()
            ops.eval(self._launched.popleft())  # (launched already: this waits for it)
            self.waited += time.perf_counter() - start


def segment_layers(layers: int, tokens: int, token_bytes: int, segment_bytes: int) -> int | None:
    """Layers per segment for a pass of `tokens` tokens through `layers` layers
    whose activations are about `token_bytes` per token and layer, or None where
    it runs unpaced (pacing off, or an estimate under two segments)."""
    layer_bytes = tokens * max(1, token_bytes)
    if segment_bytes <= 0 or layers < 2 or layers * layer_bytes <= 2 * segment_bytes:
        return None
    return max(1, segment_bytes // layer_bytes)


def pacer_for(layers: int, tokens: int, token_bytes: int, segment_bytes: int,
              before_launch: Callable[[], None] | None = None) -> PassPacer | None:
    """A pacer for the pass (`segment_layers`), or None where it runs unpaced."""
    every = segment_layers(layers, tokens, token_bytes, segment_bytes)
    return None if every is None else PassPacer(layers, every, before_launch)
