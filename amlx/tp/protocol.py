"""What rank 0 tells the other ranks before each forward pass, sent through
MLX's own collectives: an all_sum of a fixed-size int32 buffer that is zero on
every rank but rank 0, so all ranks read rank 0's words. (Token ids travel
inside the forward itself: see amlx.tp.shard.IdsFromRankZero.)

A message is `[MAGIC, kind, nfrees, nbody, frees..., body...]`: `frees` lists
the request ids whose block tables the other ranks forget first, `body` the
forward to run (amlx.tp.leader says its words). Messages longer than one
buffer continue in more buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amlx._mlx import Array, array, int32, ops
from amlx._mlx import distributed as dist

WORDS = 256  # int32 words per collective: one small all_sum for a step of up to ~120 rows
MAGIC = 0x414D4C58  # "AMLX": a buffer that is not a message means the ranks lost step

STOP, PREFILL, DECODE = 1, 2, 4
KINDS = {STOP: "stop", PREFILL: "prefill", DECODE: "decode"}


@dataclass(frozen=True)
class Message:
    kind: int
    frees: list[int]
    body: list[int]


def encode(kind: int, frees: list[int], body: list[int]) -> np.ndarray:
    words = [MAGIC, kind, len(frees), len(body), *frees, *body]
    n = -(-len(words) // WORDS) * WORDS
    out = np.zeros(n, np.int32)
    out[:len(words)] = words
    return out


def send(group: dist.Group, kind: int, frees: list[int], body: list[int]) -> list[Array]:
    """Rank 0: launches the message's collectives (not waiting for them);
    returns the arrays to keep alive until they are done."""
    words = encode(kind, frees, body)
    outs = []
    for start in range(0, len(words), WORDS):
        out = dist.all_sum(array(words[start:start + WORDS]), group)
        ops.async_eval(out)
        outs.append(out)
    return outs


def post(group: dist.Group) -> tuple[Array, Array]:
    """The other ranks: launches the collective that reads the first buffer of
    rank 0's next message (not waiting for it); `receive` reads it."""
    zeros = ops.zeros((WORDS,), int32)
    out = dist.all_sum(zeros, group)
    ops.async_eval(out)
    return zeros, out


def receive(group: dist.Group, posted: tuple[Array, Array] | None = None) -> Message:
    """The other ranks: waits for rank 0's next message, whose first buffer's
    collective `posted` launched if given (MLXError if a peer is gone;
    ValueError if the ranks lost step)."""
    first = _block(group) if posted is None else _read(posted)
    if first[0] != MAGIC or first[1] not in KINDS:
        raise ValueError("tensor parallelism: the ranks lost step (a message was not one)")
    nfree, nbody = int(first[2]), int(first[3])
    if nfree < 0 or nbody < 0:  # (a negative count read the wrong words as the body)
        raise ValueError("tensor parallelism: the ranks lost step (a message's counts were negative)")
    words = list(first)
    while len(words) < 4 + nfree + nbody:
        words += list(_block(group))
    frees = [int(w) for w in words[4:4 + nfree]]
    return Message(int(first[1]), frees, [int(w) for w in words[4 + nfree:4 + nfree + nbody]])


def _block(group: dist.Group) -> np.ndarray:
    return _read(post(group))


def _read(posted: tuple[Array, Array]) -> np.ndarray:
    zeros, out = posted
    try:
        return out.numpy()
    finally:
        out.close()
        zeros.close()
