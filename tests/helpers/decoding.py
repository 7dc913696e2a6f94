"""Logits of a model decoding one cached token at a time (used by the tests and by
benchmarks/cpu_int8.py)."""

from __future__ import annotations

import numpy as np

from amlx import _mlx as mx


def step_logits(model, ids) -> np.ndarray:
    """Logits (L, V), one cached decode step per token (one row each: on the CPU, the few-row kernels)."""
    cache = model.make_cache()
    try:
        outs = []
        for pos, t in enumerate(ids):
            at = pos if pos == 0 else mx.array(np.array([pos], np.int32))
            with mx.array(np.array([[t]], np.int32)) as x, model(x, cache, at) as out:
                outs.append(out.astype(mx.float32).numpy()[0, -1])
            if pos:
                at.close()
        return np.stack(outs)
    finally:
        for c in cache:
            c.close()
