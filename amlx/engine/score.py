"""`Model.score`: each continuation's total log-probability after one prompt (worker thread).

The prompt is prefilled once, in chunks, into a cache of its own. Its last position gives
the distribution of every continuation's first token. For the rest, the prompt's cache rows
are copied once per continuation and the continuations run as one right-padded batch at the
prompt's offset (exact: causal attention never lets a real position see a padded one). Log-
probabilities are computed in float32 on the device; only one float per continuation comes back.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from amlx._mlx import Array, array, ops
from amlx._mlx import float32 as _float32
from amlx.cache import KVCache
from amlx.models.base import CausalLM

__all__ = ["score_continuations"]

# The logits of one scoring batch, rows * length * vocabulary float32 values, stay under this
# (256 MB); more continuations are scored in several batches that share the prompt's cache.
LOGITS_BUDGET = 64 * 1024 * 1024


def score_continuations(model: CausalLM, prompt: Sequence[int], continuations: Sequence[Sequence[int]], *,
                        chunk: int = 512, budget: int = LOGITS_BUDGET) -> list[float]:
    """Sum over each continuation's tokens of log p(token | prompt, earlier tokens), float32.

    `model` is a CausalLM; `prompt` holds at least one id; an empty continuation scores 0.0.
    Runs MLX: call it on the engine's worker thread."""
    if not prompt:
        raise ValueError("score needs a prompt of at least one token")
    scores = [0.0] * len(continuations)
    todo = [i for i, c in enumerate(continuations) if len(c)]
    if not todo:
        return scores
    cache = model.make_cache()
    try:
        first = _prefill(model, list(prompt), cache, chunk)
        for group in _groups(todo, continuations, first.shape[-1], budget):
            values = _score_group(model, cache, len(prompt), first, [list(continuations[i]) for i in group])
            for i, v in zip(group, values):
                scores[i] = float(v)
    finally:
        for c in cache:
            c.close()
    return scores


def _prefill(model: CausalLM, prompt: list[int], cache: list[KVCache], chunk: int) -> Array:
    """Writes the prompt into `cache`; returns the log-probabilities (V,) of the next token."""
    for start in range(0, len(prompt), chunk):
        part = prompt[start:start + chunk]
        ids = array(np.asarray([part], dtype=np.int32))
        if start + chunk < len(prompt):
            model(ids, cache, start)
            ops.eval(*[a for c in cache for a in c.state()])
            continue
        logits = model(ids, cache, start, last=array(np.asarray([len(part) - 1], dtype=np.int32)))
    logits = ops.astype(ops.reshape(logits, (-1,)), _float32)
    logprobs: Array = ops.subtract(logits, ops.logsumexp(logits, axis=-1, keepdims=True))
    ops.eval(logprobs, *[a for c in cache for a in c.state()])
    return logprobs


def _groups(todo: list[int], continuations: Sequence[Sequence[int]], vocab: int, budget: int) -> list[list[int]]:
    """Batches of continuation indices whose padded logits fit `budget` values (at least one each).
    Shortest first, so each batch pads to its last (longest) member."""
    groups: list[list[int]] = [[]]
    for i in sorted(todo, key=lambda i: len(continuations[i])):
        width = max(len(continuations[i]) - 1, 1)
        if groups[-1] and (len(groups[-1]) + 1) * width * vocab > budget:
            groups.append([])
        groups[-1].append(i)
    return groups


def _score_group(model: CausalLM, cache: list[KVCache], offset: int, first: Array, conts: list[list[int]]) -> list[float]:
    """Scores of continuations (each at least one token) after the prompt in `cache`."""
    n = len(conts)
    total = ops.take(first, array(np.asarray([c[0] for c in conts], dtype=np.int32)))
    longest = max(len(c) for c in conts) - 1
    if longest == 0:
        ops.eval(total)
        return [float(v) for v in total.numpy()]
    inputs = np.zeros((n, longest), dtype=np.int32)
    targets = np.zeros((n, longest), dtype=np.int32)
    valid = np.zeros((n, longest), dtype=np.bool_)
    for i, ids in enumerate(conts):
        inputs[i, :len(ids) - 1] = ids[:-1]
        targets[i, :len(ids) - 1] = ids[1:]
        valid[i, :len(ids) - 1] = True
    rows = [copy.copy(layer) for layer in cache]  # the prompt's buffers until take_rows copies them out
    try:
        for layer in rows:
            layer.take_rows([0] * n)
        logits = ops.astype(model(array(inputs), rows, offset), _float32)
        picked = ops.reshape(ops.take_along_axis(logits, array(targets.reshape(n, longest, 1)), -1), (n, longest))
        logprobs = ops.subtract(picked, ops.logsumexp(logits, axis=-1))
        rest = ops.sum(ops.where(array(valid), logprobs, array(0.0, _float32)), axis=-1)
        total = ops.add(total, rest)
        ops.eval(total)
        return [float(v) for v in total.numpy()]
    finally:
        for layer in rows:
            layer.close()
