"""amlx's tensor-core matmul of 2-64 rows (amlx.models.dense_rows) against MLX's matmul (cuBLASLt
for more than one row) at Qwen3-0.6B's and Qwen3-8B's projection shapes, bf16.

    MLX_USE_CUDA_GRAPHS=0 python benchmarks/dense_rows_micro.py [--rows 2 4 8 16 32 64] [--reps 50] [--cupti]

Per shape and row count: wall microseconds per call over `--reps` chained calls (each call's x
is the previous call's output sliced back to K columns, so they run one after another, as a
decode step's products do), best of `--trials`; with `--cupti` each side's kernels' mean device
time (torch.profiler; MLX's matmul may be more than one kernel). The weights cycle through
copies larger than the L2 cache, so every call reads its weight from memory. Wall time
includes each side's host cost a call (cuBLASLt's setup for MLX's), the point of the kernel.
Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

SHAPES = {"0.6b qkv": (1024, 4096), "0.6b o": (2048, 1024), "0.6b gate_up": (1024, 6144), "0.6b down": (3072, 1024),
          "8b qkv": (4096, 6144), "8b o": (4096, 4096), "8b gate_up": (4096, 24576), "8b down": (12288, 4096)}
L2_BYTES = 60 << 20


def _busiest(make) -> str:
    """The kernel of a chain with the most device time: its mean microseconds and name (CUPTI)."""
    from qgemv import _profiled_kernels

    from amlx._mlx import ops

    def body():
        out = make()
        ops.eval(out)
        out.close()
    kernels = _profiled_kernels(body)
    if not kernels:
        return "?"
    name, times = max(kernels.items(), key=lambda kv: sum(d for _, d in kv[1]))
    return f"{sum(d for _, d in times) / len(times):.1f} x{len(times)} {name[:40]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--cupti", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np

    from amlx._mlx import bfloat16, device, ops, random
    from amlx.models import dense_rows as dr
    from step_kernel_micro import _timed

    print("| shape | rows | MLX us (wall) | dense_rows us (wall) | MLX us (device) | dense_rows us (device) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.shapes:
        k, n = SHAPES[name]
        copies = max(2, -(-L2_BYTES // (n * k * 2)))
        ws = [random.normal((n, k)).astype(bfloat16) * 0.02 for _ in range(copies)]
        ops.eval(*ws)
        wts = [ops.transpose(w) for w in ws]
        for rows in args.rows:
            x0 = random.normal((rows, k)).astype(bfloat16)
            ops.eval(x0)

            def chain(kernel: bool):
                def make():
                    x = x0
                    for i in range(args.reps):
                        y = dr.dense_rows(x, ws[i % copies]) if kernel else ops.matmul(x, wts[i % copies])
                        # the next call's input: this output cut (or tiled) back to K columns
                        x = y if n >= k else ops.concatenate([y] * -(-k // n), axis=1)
                        x = ops.slice(x, (0, 0), (rows, k))
                    return x
                return make

            walls = [_timed(chain(kern), args.trials, args.reps) for kern in (False, True)]
            devs = ["", ""]
            if args.cupti:
                devs = [_busiest(chain(False)), _busiest(chain(True))]
            print(f"| {name} | {rows} | {walls[0]:.1f} | {walls[1]:.1f} | {devs[0]} | {devs[1]} |", flush=True)
        for w in ws:
            w.close()
    del np
    device.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
