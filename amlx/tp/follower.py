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
import select
import shutil
import sys
import threading

import numpy as np

from amlx._mlx import array, int32, ops, transforms
from amlx._mlx import distributed as dist
from amlx.engine.placement import EngineOptions, Placement
from amlx.engine.pools import ShardPools, table_arrays
from amlx.kv import PADDING_ROW, written
from amlx.models import build_model, prepare
from amlx.tp import keeper, protocol
from amlx.tp.rows import MirroredRows
from amlx.tp.shard import HEADS, head_mode, shard_model


class Follower:
    """Runs rank 0's forward passes on this rank's shard of `model`, over this
    rank's shard of the KV block pool (its key-value heads; block tables
    mirrored from rank 0's: amlx.tp.rows)."""

    def __init__(self, model, group: dist.Group, options: EngineOptions):
        self.model, self.group = model, group
        self.pools = ShardPools(model, options, 1)  # (the same block size, span step and storage as rank 0's)
        self.kv = self.pools.kv[0]
        self.rows = MirroredRows(self.kv)
        # the decode step compiled as rank 0's scheduler compiles it (once per batch size,
        # table width and pool size), so this rank's host work per step stays as small as rank 0's
        self._step = transforms.compile(self._forward)

    def serve(self, heartbeat: int | None = None) -> None:
        """Handles messages until STOP; once each one's step is done, one byte on
        `heartbeat` (rank 0's watchdog counts them)."""
        posted = protocol.post(self.group)
        while True:
            msg = protocol.receive(self.group, posted)
            self.rows.free(msg.frees)
            if msg.kind == protocol.STOP:
                return
            launched = []
            if msg.kind == protocol.PREFILL:
                self._prefill(msg.body)  # (evaluated before it returns)
            else:
                launched = self._decode(msg.body)
            # The next message's collective is queued behind this step on the stream (as
            # before: no gap between them), but the heartbeat waits for the step itself. Sent
            # once the step was launched, it let a rank stuck inside the step look up to date:
            # rank 0, waiting on that step before sending more, then waited for good, the
            # watchdog seeing no rank behind.
            posted = protocol.post(self.group)
            if launched:
                ops.eval(*launched)
            if heartbeat is not None:
                os.write(heartbeat, b".")

    def _prefill(self, body: list[int]) -> None:
        capacity, b, start, length, logits_read = body[:5]
        ends = body[5:5 + b]
        rows, _ = self.rows.read(body[5 + b:], b)
        self.kv.pool.grow_to(capacity)
        views = self.pools.views(0, self.kv.prefill_tables(rows, start, length, ends))
        last = array(np.asarray(ends, np.int32) - start - 1)
        logits = self.model(ops.zeros((b, length), int32), views, start, last=last)
        self.kv.pool.arrays = written(views)
        # as on rank 0: a pass whose logits nobody reads evaluates the pool only (the
        # head's input is the last all_sum: evaluating it alone would join one more)
        ops.eval(*([logits] if logits_read else []), *self.kv.pool.state())

    def _decode(self, body: list[int]) -> list:
        capacity, b = body[0], body[1]
        positions = body[2:2 + b]
        rows, _ = self.rows.read(body[2 + b:], b)
        for row, pos in zip(rows, positions):
            if row is not PADDING_ROW:
                row.pos = pos
        self.kv.pool.grow_to(capacity)
        tables = self.kv.decode_tables(rows)
        logits, state = self._step(ops.zeros((b, 1), int32), array(np.asarray(positions, np.int32)),
                                   table_arrays(tables), self.kv.pool.arrays)
        self.kv.pool.arrays = state
        # launched, not awaited here: `serve` queues the next message's collective behind
        # it, then waits for it before the heartbeat
        ops.async_eval(logits, *state)
        return [logits, *state]

    def _forward(self, tokens, positions, tabs, arrays):
        return self.pools.decode_pass(self.model, tokens, positions, tabs, arrays)

    def close(self) -> None:
        self._step.close()
        self.pools.close()
        self.model.close()
        self.group.close()


def _exit_with_parent(lifeline: int, workdir: str | None) -> None:
    """Rank 0's process holds the other end: EOF means it is gone. A rank 0 that
    was killed outright could not remove the launch's work folder (its hostfile and
    the ranks' logs): the follower does, on its way out."""
    def watch() -> None:
        while os.read(lifeline, 1):
            pass
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        os._exit(3)
    threading.Thread(target=watch, name="amlx-tp-lifeline", daemon=True).start()


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m amlx.tp.follower")
    p.add_argument("model")
    p.add_argument("--backend", default="ring")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--kv-bits", type=int, default=None, choices=[8, 4])
    # rank 0 passes its AMLX_TP_HEAD; a rank started by hand on another host reads its own
    p.add_argument("--head", default=None, choices=HEADS)
    p.add_argument("--heartbeat-fd", type=int, default=None)
    p.add_argument("--lifeline-fd", type=int, default=None)
    # the launch's work folder (amlx.tp.launch), removed here if rank 0 dies without closing
    p.add_argument("--workdir", default=None)
    return p.parse_args(argv)


def _rank_zero_gone(lifeline: int | None) -> bool:
    """Whether rank 0 has gone: its end of the lifeline closed (it never writes to it, so
    the pipe is readable only at EOF). Does not read: the watch thread may be reading."""
    return lifeline is not None and bool(select.select([lifeline], [], [], 0)[0])


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.lifeline_fd is not None:
        _exit_with_parent(args.lifeline_fd, args.workdir)
    try:
        return _serve(args)
    finally:
        # rank 0's death also fails this rank's collectives, and that exception may end the
        # process before the lifeline's watch thread removes the work folder
        if args.workdir is not None and _rank_zero_gone(args.lifeline_fd):
            shutil.rmtree(args.workdir, ignore_errors=True)


def _serve(args: argparse.Namespace) -> int:
    options = EngineOptions(device=args.device, kv_bits=args.kv_bits, prefix_cache=False).resolved().for_rank()
    placement = Placement(options)
    rank, size = int(os.environ["MLX_RANK"]), int(os.environ["MLX_WORLD_SIZE"])
    joined: list[dist.Group] = []
    gather = (lambda x: dist.all_gather(x, joined[0])) if (args.head or head_mode()) == "vocab" else None
    with placement.on():
        # Load first, then join, as rank 0 does: whoever loads faster waits in the
        # join (NCCL's bootstrap gives up after 300 s; rank 0 bounds its own wait).
        loaded = build_model(prepare(args.model, args.dtype), args.dtype, progress=False,
                             shard=lambda m: shard_model(m, rank, size, lambda x: dist.all_sum(x, joined[0]), gather))
        loaded.model.use_decode_kernel(options.decode_kernel)
        joined.append(dist.init(args.backend))
        if (joined[0].rank, joined[0].size) != (rank, size):
            raise SystemExit(f"the {args.backend} backend made this rank {joined[0].rank} of {joined[0].size}, "
                             f"not {rank} of {size}")
        # stands in for this process if it dies mid-step (amlx.tp.keeper); the ring's only
        alive = keeper.start(args.lifeline_fd) if args.backend == "ring" and size == 2 else None
        follower = Follower(loaded.model, joined[0], options)
        if args.heartbeat_fd is not None:
            os.write(args.heartbeat_fd, b"R")  # ready
        follower.serve(args.heartbeat_fd)
        follower.close()
    if alive is not None:
        os.write(alive, keeper.CLEAN_EXIT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
