"""MLX's collective communication (mlx::core::distributed) over the C layer.

A `Group` is the set of processes that run one model together (tensor
parallelism: `amlx.tp`). Collectives are lazy ops like any other: the
communication happens when their result is evaluated, and every process of
the group must evaluate the same collectives in the same order.

Backends: "ring" (TCP between processes, also on one CPU machine; MLX reads
its rank from MLX_RANK and the addresses of every rank from the JSON file
named by MLX_HOSTFILE), "nccl" (CUDA), "mpi", "jaccl" (Apple), or "any".
"""

from __future__ import annotations

from typing import Sequence

from amlx._mlx import dtypes as _dt
from amlx._mlx._lib import error, ffi, lib
from amlx._mlx.array import Array, _adopt
from amlx._mlx.ops import zeros

BACKENDS = ("any", "ring", "nccl", "mpi", "jaccl")
_ARRAY_OUT = ffi.typeof("mlxc_array*")
_GROUP_OUT = ffi.typeof("mlxc_group*")


def _raise(op: str):
    return error(op, lib.mlxc_distributed_last_error)


def _call(fn, op: str, *args) -> Array:
    out = ffi.new(_ARRAY_OUT)
    if fn(*args, out):
        raise _raise(op)
    return _adopt(out[0])


def _backend(name: str) -> bytes:
    if name not in BACKENDS:
        raise ValueError(f"unknown distributed backend {name!r} (known: {', '.join(BACKENDS)})")
    return name.encode()


def is_available(backend: str = "any") -> bool:
    """Whether the installed libmlx was built with `backend`."""
    return bool(lib.mlxc_distributed_is_available(_backend(backend)))


class Group:
    """The processes taking part in collectives (an owned handle; `close()` it)."""

    def __init__(self, handle) -> None:
        self._h = handle
        self.rank: int = lib.mlxc_group_rank(handle)
        self.size: int = lib.mlxc_group_size(handle)

    @property
    def handle(self):
        if self._h is None:
            raise ValueError("the distributed group is closed")
        return self._h

    def close(self) -> None:
        """Drops this handle; MLX keeps the backend's connections for the process."""
        h, self._h = self._h, None
        if h is not None:
            lib.mlxc_group_free(h)

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, size={self.size})"


def init(backend: str = "any", strict: bool = True) -> Group:
    """A new group of every process the backend finds (MLXError when it cannot
    start and `strict`; without `strict`, a group of one process). The ring
    backend waits for every peer to connect: a launcher must bound that wait.

    MLX caches one group per backend name; amlx forgets it before and after,
    so each call connects anew (a model loaded again meets its new worker
    processes) and groups held by earlier callers stay theirs."""
    name = _backend(backend)
    out = ffi.new(_GROUP_OUT)
    try:
        if lib.mlxc_distributed_clear_backends() or lib.mlxc_distributed_init(name, int(bool(strict)), out):
            raise _raise("distributed.init")
    finally:
        lib.mlxc_distributed_clear_backends()
    return Group(out[0])


def all_sum(x: Array, group: Group) -> Array:
    """The elementwise sum of `x` over every process of the group."""
    return _call(lib.mlxc_all_sum, "distributed.all_sum", x.handle, group.handle)


def all_gather(x: Array, group: Group) -> Array:
    """Every process's `x`, concatenated along axis 0 in rank order."""
    return _call(lib.mlxc_all_gather, "distributed.all_gather", x.handle, group.handle)


def send(x: Array, dst: int, group: Group) -> Array:
    """Sends `x` to rank `dst` once the returned array is evaluated (the ring
    backend reaches its neighbours only: ranks r-1 and r+1)."""
    return _call(lib.mlxc_send, "distributed.send", x.handle, int(dst), group.handle)


def recv_like(like: Array, src: int, group: Group) -> Array:
    """An array of `like`'s shape and dtype received from rank `src`."""
    return _call(lib.mlxc_recv_like, "distributed.recv", like.handle, int(src), group.handle)


def recv(shape: Sequence[int], dtype: _dt.Dtype, src: int, group: Group) -> Array:
    """An array of `shape` and `dtype` received from rank `src`."""
    like = zeros(tuple(shape), dtype)
    try:
        return recv_like(like, src, group)
    finally:
        like.close()
