"""Does a decode step's KV write copy the whole pool? (issue 15's 64-stream peak)

A block pool's layer array is written with one scatter per step. MLX writes in
place only when the scatter's input is donatable: held by nothing else. On a GPU
every op of a command buffer keeps its inputs alive until the buffer completes,
so an op that *reads* the pool before the write, in the same step or in the
previous step still in flight, makes the write copy the whole layer's pool.

This probe builds a pool of LAYERS arrays (2, blocks, 8, 16, 128) and runs
steps of: read some blocks of each layer, write one slot per row, either
reading before the write (what the CUDA decode kernel does: it reads the old
pool and hands back the new key and value for the write) or after it, and
reading the pool array itself or `ops.buffer_view` of it (a handle that does
not hold the pool's data: what the decode kernel reads now), with the
next step launched before the previous one is waited for (as the engine does)
or not. It reports ms per step and the peak memory over the pool's bytes.

    python benchmarks/pool_write.py [--blocks 1024] [--layers 28] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from amlx._mlx import bfloat16, memory, ops
from amlx._mlx.array import array


def run(order: str, pipelined: bool, blocks: int, layers: int, steps: int, rows: int, read: str) -> dict:
    heads, bs, dim = 8, 16, 128
    pools = [ops.zeros((2, blocks, heads, bs, dim), bfloat16) for _ in range(layers)]
    ops.eval(*pools)
    pool_bytes = sum(p.nbytes for p in pools)
    read_blocks = array(np.arange(1, 1 + min(64, blocks - 1), dtype=np.int32))
    new = ops.full((2, rows * heads, dim), 1.0, bfloat16)
    memory.reset_peak()
    base = memory.active()
    pending = None
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        slots = (np.arange(rows, dtype=np.int32) * 7 + step) % (blocks * bs)
        flat_slots = (slots[:, None] // bs * heads * bs + np.arange(heads)[None, :] * bs + slots[:, None] % bs)
        at = ops.broadcast_to(ops.reshape(array(flat_slots.reshape(-1).astype(np.int32)), (1, rows * heads, 1)),
                              (2, rows * heads, dim))
        outs = []
        for i, pool in enumerate(pools):
            def written(p):
                flat = ops.put_along_axis(ops.reshape(p, (2, blocks * heads * bs, dim)), at, new, 1)
                return ops.reshape(flat, p.shape)
            if order == "read_first":
                source = pool
                if read == "view":
                    source = ops.buffer_view(pool)
                    assert source is not None, "the pool array is not a whole evaluated buffer"
                outs.append(ops.sum(ops.take(source, read_blocks, axis=1)))
                pools[i] = written(pool)
            else:
                pools[i] = written(pool)
                outs.append(ops.sum(ops.take(pools[i], read_blocks, axis=1)))
            del pool
        total = outs[0]
        for o in outs[1:]:
            total = total + o
        if pipelined:
            ops.async_eval(total, *pools)
            if pending is not None:
                ops.eval(pending)
            pending = total
        else:
            ops.eval(total, *pools)
        times.append(time.perf_counter() - t0)
    if pending is not None:
        ops.eval(pending)
    ops.eval(*pools)
    warm = times[5:] or times
    return {"order": order, "pipelined": pipelined, "read": read, "ms_per_step": 1e3 * float(np.median(warm)),
            "pool_mb": pool_bytes / 1e6, "peak_over_start_mb": (memory.peak() - base) / 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1024, help="blocks per layer (default 1024: 67 MB a layer)")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=64, help="rows written per step")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    results = []
    for order, read in (("read_first", "array"), ("write_first", "array"), ("read_first", "view")):
        for pipelined in (True, False):
            r = run(order, pipelined, args.blocks, args.layers, args.steps, args.rows, read)
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
