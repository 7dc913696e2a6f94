"""One rank of tests/test_distributed.py: runs collectives over the ring
backend (MLX_RANK / MLX_HOSTFILE set by the test) and prints their results as
one JSON line for the test to check against numpy."""

from __future__ import annotations

import json
import sys

import numpy as np

from amlx._mlx import distributed as dist
from amlx._mlx import float32, int32, ops, array


def rank_data(rank: int) -> np.ndarray:
    """What rank `rank` contributes (the test computes the expected results from it)."""
    return (np.arange(12, dtype=np.float32).reshape(3, 4) * (rank + 1) - rank).astype(np.float32)


def main() -> None:
    try:
        g = dist.init("ring")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        sys.exit(2)
    x = array(rank_data(g.rank))
    out = {"rank": g.rank, "size": g.size,
           "sum": np.asarray(dist.all_sum(x, g)).tolist(),
           "sum_int": np.asarray(dist.all_sum(array(np.array([g.rank + 1, 7], np.int32)), g)).tolist(),
           "gather": np.asarray(dist.all_gather(x, g)).tolist()}
    right, left = (g.rank + 1) % g.size, (g.rank - 1) % g.size
    # even ranks send first, odd ranks receive first: no rank waits on itself
    if g.rank % 2 == 0:
        ops.eval(dist.send(x, right, g))
        got = dist.recv((3, 4), float32, left, g)
    else:
        got = dist.recv((3, 4), float32, left, g)
        ops.eval(got)
        ops.eval(dist.send(x, right, g))
    out["recv"] = np.asarray(got).tolist()
    out["dtype_kept"] = dist.all_sum(array(np.zeros(2, np.int32)), g).dtype is int32
    g.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
