"""Per-request sampling state and the batched sampling call of a decode step.
(Provisional: greedy only, until amlx.sample lands.)"""

from __future__ import annotations

from amlx._mlx import Array, ops
from amlx._mlx import float32 as _f32
from amlx.types import GenerationOptions


class RowSampling:
    def __init__(self, options: GenerationOptions, prompt: list[int]):
        self.options = options
        self.history = list(prompt)

    def observe(self, token_id: int) -> None:
        self.history.append(token_id)


def sample_rows(logits: Array, rows: list[RowSampling]) -> tuple[Array, Array]:
    logits = logits.astype(_f32)
    tokens = ops.argmax(logits, axis=-1)
    logprobs = ops.take_along_axis(logits - ops.logsumexp(logits, axis=-1, keepdims=True),
                                   ops.reshape(tokens, (-1, 1)), 1)
    return tokens, ops.reshape(logprobs, (-1,))
