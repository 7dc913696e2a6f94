"""A rank other than 0 of a tensor-parallel model: `python -m amlx.tp.follower`.

Rank 0 (amlx.tp.leader) starts it with MLX's launcher environment (MLX_RANK,
MLX_HOSTFILE or NCCL's variables). It loads its part of the model, joins the
group, says it is ready, then runs rank 0's forward passes in the same order
until told to stop: "receive the step's description, run the same forward on
my shard, join its collectives". It exits when rank 0 goes away (its lifeline
pipe closes, or a collective fails).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import numpy as np

from amlx._mlx import array, int32, ops, transforms
from amlx._mlx import distributed as dist
from amlx.engine.placement import EngineOptions, Placement
from amlx.models import build_model, prepare
from amlx.models.base import decode_on_buffers
from amlx.tp import keeper, protocol
from amlx.tp.rows import RowCaches
from amlx.tp.shard import shard_model


class Follower:
    """Runs rank 0's forward passes on this rank's shard of `model`."""

    def __init__(self, model, group: dist.Group, block: int):
        self.model, self.group, self.block = model, group, block
        self.rows = RowCaches(lambda: model.make_cache(block))
        self._windows = [c.window for c in model.make_cache(block)]
        # the decode step compiled as rank 0's scheduler compiles it (once per batch size
        # and capacity), so this rank's host work per step stays as small as rank 0's
        self._step = transforms.compile(self._forward)

    def serve(self, heartbeat: int | None = None) -> None:
        """Handles messages until STOP; after each, one byte on `heartbeat` (rank
        0's watchdog counts them)."""
        while True:
            msg = protocol.receive(self.group)
            self.rows.free(msg.frees)
            if msg.kind == protocol.STOP:
                return
            if msg.kind == protocol.PREFILL:
                self._prefill(msg.body)
            elif msg.kind == protocol.CHUNK:
                self._chunk(msg.body)
            else:
                self._decode(msg.body)
            if heartbeat is not None:
                os.write(heartbeat, b".")

    def _prefill(self, body: list[int]) -> None:
        b, length = body[0], body[1]
        ids, lengths = body[2:2 + b], np.asarray(body[2 + b:2 + 2 * b], np.int32)
        caches = self.rows.fresh(ids)
        logits = self.model(ops.zeros((b, length), int32), caches, 0, last=array(lengths - 1))
        ops.eval(logits, *[a for c in caches for a in c.state()])

    def _chunk(self, body: list[int]) -> None:
        rid, start, length, last = body
        caches = self.rows.fresh([rid]) if start == 0 else self.rows.batch([rid])
        at = array(np.asarray([length - 1], np.int32)) if last else None
        logits = self.model(ops.zeros((1, length), int32), caches, start, last=at)
        # as on rank 0: a middle chunk evaluates the caches only, the last one its logits too
        ops.eval(*([logits] if last else []), *[a for c in caches for a in c.state()])

    def _decode(self, body: list[int]) -> None:
        b = body[0]
        ids, positions = body[1:1 + b], body[1 + b:1 + 2 * b]
        caches = self.rows.batch(ids)
        for c in caches:
            c.reserve(max(positions) + 1)
        logits, state = self._step(ops.zeros((b, 1), int32), array(np.asarray(positions, np.int32)),
                                   [c.kv for c in caches])
        for c, kv in zip(caches, state):
            c.kv = kv
        # launched, not awaited: the next message's collective waits for it on the stream,
        # and meanwhile this thread is back in `receive`
        ops.async_eval(logits, *state)

    def _forward(self, tokens, positions, buffers):
        return decode_on_buffers(self.model, self._windows, self.block, tokens, positions, buffers)

    def close(self) -> None:
        self._step.close()
        self.rows.close()
        self.model.close()
        self.group.close()


def _exit_with_parent(lifeline: int) -> None:
    """Rank 0's process holds the other end: EOF means it is gone."""
    def watch() -> None:
        while os.read(lifeline, 1):
            pass
        os._exit(3)
    threading.Thread(target=watch, name="amlx-tp-lifeline", daemon=True).start()


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m amlx.tp.follower")
    p.add_argument("model")
    p.add_argument("--backend", default="ring")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--heartbeat-fd", type=int, default=None)
    p.add_argument("--lifeline-fd", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.lifeline_fd is not None:
        _exit_with_parent(args.lifeline_fd)
    options = EngineOptions(device=args.device, shards=1).resolved()
    placement = Placement(options)
    rank, size = int(os.environ["MLX_RANK"]), int(os.environ["MLX_WORLD_SIZE"])
    joined: list[dist.Group] = []
    with placement.on():
        # Load first, then join, as rank 0 does: whoever loads faster waits in the
        # join (NCCL's bootstrap gives up after 300 s; rank 0 bounds its own wait).
        loaded = build_model(prepare(args.model, args.dtype), args.dtype, progress=False,
                             shard=lambda m: shard_model(m, rank, size, lambda x: dist.all_sum(x, joined[0])))
        loaded.model.use_decode_kernel(options.decode_kernel)
        joined.append(dist.init(args.backend))
        if (joined[0].rank, joined[0].size) != (rank, size):
            raise SystemExit(f"the {args.backend} backend made this rank {joined[0].rank} of {joined[0].size}, "
                             f"not {rank} of {size}")
        # stands in for this process if it dies mid-step (amlx.tp.keeper); the ring's only
        alive = keeper.start(args.lifeline_fd) if args.backend == "ring" and size == 2 else None
        follower = Follower(loaded.model, joined[0], options.kv_block)
        if args.heartbeat_fd is not None:
            os.write(args.heartbeat_fd, b"R")  # ready
        follower.serve(args.heartbeat_fd)
        follower.close()
    if alive is not None:
        os.write(alive, keeper.CLEAN_EXIT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
