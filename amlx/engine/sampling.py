"""Sampling state of requests in a batch, kept on the device between steps.

Each request owns a `RowSampling`: its options, its PRNG key and its token
history, on the host. A `BatchSampling` stacks the rows' state into device
arrays when the batch is formed and evolves it step by step on the device (keys
advance, sampled tokens join the history) with no host sync; `sync_back`
returns the keys to the rows before the batch changes, so a request's random
stream depends only on its seed and how many tokens it has drawn, whatever it
was batched with.
"""

from __future__ import annotations

import numpy as np

from amlx._mlx import Array, array, ops
from amlx.sample import BatchParams, SamplingParams, key_from_seed, make_history, sample
from amlx.types import GenerationOptions


class RowSampling:
    def __init__(self, options: GenerationOptions, prompt: list[int]):
        self.params = SamplingParams(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                                     min_p=options.min_p, repetition_penalty=options.repetition_penalty,
                                     seed=options.seed, logprobs=options.logprobs)
        self.key = key_from_seed(options.seed)
        self.history = list(prompt)  # prompt and generated ids (repetition penalty)

    def observe(self, token_id: int) -> None:
        self.history.append(token_id)


class BatchSampling:
    """The device-side sampling state of an ordered list of rows."""

    def __init__(self, rows: list[RowSampling]):
        self.rows = rows
        self.params = BatchParams.build([r.params for r in rows])
        self.keys = array(np.stack([r.key for r in rows]))
        self.history: Array | None = None  # made on the first step, when the vocabulary size is known

    def __call__(self, logits: Array, selected: list[int] | None = None) -> tuple[Array, Array]:
        """Samples one token per row of logits (B, V). Rows not in `selected`
        (paused rows) keep their state; their tokens are to be ignored."""
        if self.params.any_penalty and self.history is None:
            self.history = make_history([r.history for r in self.rows], logits.shape[1])
        out = sample(logits, self.params, self.keys, self.history)
        keys, history = out.keys, out.history
        if selected is not None and len(selected) < len(self.rows):
            mask = np.zeros(len(self.rows), dtype=np.bool_)
            mask[selected] = True
            m = array(mask)
            keys = ops.where(ops.reshape(m, (-1, 1)), keys, self.keys)
            if history is not None:
                history = ops.where(ops.reshape(m, (-1, 1)), history, self.history)
        self.keys, self.history = keys, history
        return out.tokens, out.logprobs

    def state(self) -> list[Array]:
        return [self.keys] + ([self.history] if self.history is not None else [])

    def snapshot(self) -> tuple:
        """The state as it is now, for `rewind` (before a step that may fail to launch)."""
        return self.keys, self.history

    def rewind(self, snapshot: tuple) -> None:
        """Back to a `snapshot`: a step that never ran must not advance the rows' keys."""
        self.keys, self.history = snapshot

    def sync_back(self) -> None:
        """Stores each row's current key on its request (reads the device)."""
        for row, key in zip(self.rows, self.keys.numpy()):
            row.key = key

    def close(self) -> None:
        for a in self.state():
            a.close()
        for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
            getattr(self.params, name).close()
        self.history = None
