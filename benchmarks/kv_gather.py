"""How a decode step's attention should read the KV block pool on the CPU.

One layer's decode attention read (every row's keys and values, masked
attention) for a batch, in four forms:

- contiguous:   the old per-batch buffer (2, B, H, capacity, D), no pool (baseline);
- take5d+view:  pool (2, blocks, bs, H, D), `take` of the table's blocks on axis 1,
                a reshape and a transposed view handed to attention;
- blocks+copy:  pool (2, blocks, H, bs, D) as (2 * blocks, H * bs * D), `take` of
                whole blocks on axis 0, then a transposing copy to (B, H, span, D);
- head pieces:  pool (2, blocks, H, bs, D) as (2 * blocks * H, bs * D), `take` of
                one (block, head) piece per row on axis 0, in (k/v, row, head, block)
                order: the result is (2, B, H, span, D) already (what amlx does).

Usage: python benchmarks/kv_gather.py [--batch 8] [--span 512] [--bs 16]
Prints the best and median milliseconds per call and the ratio to contiguous.
(MLX's `take` on the first axis copies whole rows; on other axes, or a
transposed copy, it goes element by element, several times slower.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from amlx._mlx import array, fast, ops
from amlx._mlx import int32 as i32


def _time(fn, reps: int) -> tuple[float, float]:
    ops.eval(fn())  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        ops.eval(fn())
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3, statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--span", type=int, default=512)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    b, s, bs, h, d = a.batch, a.span, a.bs, a.kv_heads, a.dim
    mb = s // bs
    nb = b * mb + 1
    q = array(rng.standard_normal((b, a.heads, 1, d)).astype(np.float32))
    pos = array(rng.integers(s // 2, s, b).astype(np.int32))
    mask = ops.less_equal(ops.arange(s, dtype=i32), ops.reshape(pos, (b, 1, 1, 1)))
    table_np = (1 + rng.permutation(b * mb)).astype(np.int32).reshape(b, mb)
    flat_table = array(table_np.reshape(-1))
    blocks2 = array(np.concatenate([table_np.reshape(-1), table_np.reshape(-1) + nb]))
    pieces_np = (table_np[:, None, :] * h + np.arange(h)[None, :, None]).reshape(-1)
    pieces = array(np.concatenate([pieces_np, pieces_np + nb * h]).astype(np.int32))
    scale = d ** -0.5
    contiguous = array(rng.standard_normal((2, b, h, s, d)).astype(np.float32))
    token_major = array(rng.standard_normal((2, nb, bs, h, d)).astype(np.float32))
    head_major = array(rng.standard_normal((2, nb, h, bs, d)).astype(np.float32))
    ops.eval(q, pos, mask, flat_table, blocks2, pieces, contiguous, token_major, head_major)

    def attend(kv):
        keys = ops.reshape(ops.slice(kv, (0, 0, 0, 0, 0), (1, b, h, s, d)), (b, h, s, d))
        values = ops.reshape(ops.slice(kv, (1, 0, 0, 0, 0), (2, b, h, s, d)), (b, h, s, d))
        return fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)

    # The reads only: in the engine the write is one scatter of B tokens into an array
    # the graph owns alone (donated, no copy); here the inputs are held, so a write
    # would time a copy of the whole buffer instead.
    def run_contiguous():
        return attend(contiguous)

    def run_take5d_view():
        rows = ops.reshape(ops.take(token_major, flat_table, 1), (2, b, s, h, d))
        return attend(ops.transpose(rows, (0, 1, 3, 2, 4)))

    def run_blocks_copy():
        rows = ops.reshape(ops.take(ops.reshape(head_major, (2 * nb, h * bs * d)), blocks2, 0), (2, b, mb, h, bs, d))
        return attend(ops.reshape(ops.transpose(rows, (0, 1, 3, 2, 4, 5)), (2, b, h, s, d)))

    def run_head_pieces():
        rows = ops.take(ops.reshape(head_major, (2 * nb * h, bs * d)), pieces, 0)
        return attend(ops.reshape(rows, (2, b, h, s, d)))

    print(f"batch {b}, span {s}, block {bs}, kv heads {h}, heads {a.heads}, dim {d} (float32, CPU)")
    base = None
    for name, fn in (("contiguous", run_contiguous), ("take5d+view", run_take5d_view),
                     ("blocks+copy", run_blocks_copy), ("head pieces", run_head_pieces)):
        best, median = _time(fn, a.reps)
        base = base or best
        print(f"  {name:<12} best {best:8.3f} ms  median {median:8.3f} ms  x{best / base:.2f}")


if __name__ == "__main__":
    main()
