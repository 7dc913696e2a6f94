"""Loading a model with `tensor_parallel=N` (rank 0's side; see amlx.tp)."""

from __future__ import annotations

import os
import shutil

from amlx._mlx import Array
from amlx._mlx import distributed as dist
from amlx.tp import launch as _launch
from amlx.tp.join import join
from amlx.tp.leader import Leader
from amlx.tp.shard import head_mode, shard_model


def check_tensor_parallel(size) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel must be an integer >= 1, not {size!r}")


class TensorParallelLoad:
    """Starts the other ranks (they load their parts meanwhile), shards rank 0's
    model as it is built, then joins the group: `connect()` returns the Leader
    the engine drives. `abort()` stops everything if the load fails."""

    def __init__(self, path: str | os.PathLike, size: int, device: str, dtype: str | None,
                 kv_bits: int | None = None):
        self.size = size
        hostfile = os.environ.get("AMLX_TP_HOSTFILE") or None
        self.head = head_mode()  # read once: the followers are told the same
        # (refused before any rank starts, not once they have loaded)
        _launch.join_timeout()
        _launch.step_timeout()
        self.launch = _launch.start(str(path), size, device, dtype, hostfile, kv_bits, self.head)
        self._group: dist.Group | None = None

    def reduce(self, x: Array) -> Array:
        return dist.all_sum(x, self._group)

    def gather(self, x: Array) -> Array:
        return dist.all_gather(x, self._group)

    def shard(self, model) -> None:
        """Cuts rank 0's model to its part (the builder's `shard` hook)."""
        shard_model(model, 0, self.size, self.reduce, self.gather if self.head == "vocab" else None)

    def connect(self) -> Leader:
        self._group = join(self.launch)
        return Leader(self.launch, self._group)

    def abort(self) -> None:
        for r in self.launch.ranks:
            _launch.stop_rank(r)
        if self._group is not None:
            self._group.close()
        shutil.rmtree(self.launch.workdir, ignore_errors=True)
