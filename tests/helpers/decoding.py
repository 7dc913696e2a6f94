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


def prefill_logits(path, ids, dtype=None) -> np.ndarray:
    """Logits (L, V) float32 of one prefill pass over `ids` through the checkpoint at `path`
    (loaded with `dtype`, on the shared worker as the engine would, then closed)."""
    from amlx.engine.worker import Worker
    from amlx.models import load_model

    def run():
        lm = load_model(path, dtype=dtype, progress=False)
        try:
            with mx.array(np.asarray([ids], np.int32)) as x, lm.model(x) as out:
                return out.astype(mx.float32).numpy()[0]
        finally:
            lm.model.close()
    return Worker.get().run_sync(run)
