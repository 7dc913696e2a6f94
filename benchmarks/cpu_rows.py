"""CPU linear layers at 9..64 rows: the few-row kernels in chunks of rows against MLX's
matmul on a float32 copy of the weight (the path before, `cpu_matmul.ROWS` at 8).

    python benchmarks/cpu_rows.py [--rows 9 12 16 24 32 64] [--kinds bf16 q8 q4 f32] [--repeats 5] [--threads N]

Qwen3-0.6B's shapes: gate/up (3,072 x 1,024), down (1,024 x 3,072), and the tied output head
(151,936 x 1,024); quantized ones in MLX's affine format, group 64 (against x rounded to
int8, the default; AMLX_CPU_INT8=0: the float kernels). Per kind, shape and row
count, each path's best time of --repeats calls (evaluated one by one) and its peak memory
above what was live before the call (MLX's counters). The paths alternate call by call.
Writes one JSON line per measurement to stdout and a markdown table to stderr at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from amlx import _mlx as mx
from amlx._mlx import cpu_kernels, device, memory
from amlx._mlx import ops as O
from amlx.models import cpu_matmul, nn

SHAPES = {"gate_up": (3072, 1024), "down": (1024, 3072), "head": (151936, 1024)}
FORMAT = {"bf16": "f16", "f32": "f32", "q8": "q", "q4": "q"}


def _layer(kind: str, out: int, inp: int, rng) -> nn.Module:
    w = mx.array((rng.standard_normal((out, inp)) * 0.02).astype(np.float32))
    if kind == "f32":
        layer = nn.Linear(w)
    elif kind == "bf16":
        layer = nn.Linear(O.astype(w, mx.bfloat16))
    else:
        q = O.quantize(O.astype(w, mx.bfloat16), 64, int(kind[1]))
        layer = nn.QuantizedLinear(*q, 64, int(kind[1]))
    mx.eval(*[a for a in vars(layer).values() if isinstance(a, mx.Array)])
    return layer


def _once(layer, x) -> tuple[float, int]:
    memory.clear_cache()
    base = memory.active()
    memory.reset_peak()
    t = time.perf_counter()
    y = layer(x)
    mx.eval(y)
    dt = time.perf_counter() - t
    peak = memory.peak() - base
    del y
    return dt, peak


def measure(kind: str, shape: str, rows: int, repeats: int, rng) -> dict:
    out, inp = SHAPES[shape]
    layer = _layer(kind, out, inp, rng)
    x = O.astype(mx.array(rng.standard_normal((rows, inp)).astype(np.float32)), mx.float32 if kind == "f32"
                 else mx.bfloat16)
    mx.eval(x)
    fmt = ("int8" if cpu_matmul.INT8 else "quantized") if kind[0] == "q" else FORMAT[kind]
    saved = cpu_matmul.ROWS[fmt], cpu_matmul.BIG_ROWS
    res = {"kernels": [], "mlx": []}
    try:
        for _ in range(repeats):
            for path, limit in (("kernels", cpu_kernels.MAX_ROWS), ("mlx", cpu_kernels.BLOCK_ROWS)):
                cpu_matmul.ROWS[fmt] = cpu_matmul.BIG_ROWS = limit
                res[path].append(_once(layer, x))
    finally:
        cpu_matmul.ROWS[fmt], cpu_matmul.BIG_ROWS = saved
    row = {"kind": kind, "shape": shape, "rows": rows}
    for path, runs in res.items():
        row[f"{path}_ms"] = round(min(t for t, _ in runs) * 1e3, 2)
        row[f"{path}_peak_mb"] = round(max(p for _, p in runs) / 2**20, 1)
    row["speedup"] = round(row["mlx_ms"] / row["kernels_ms"], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[9, 12, 16, 24, 32, 64])
    ap.add_argument("--kinds", nargs="+", default=["bf16", "q8", "q4"], choices=list(FORMAT))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="the kernels' threads (default: one per core; 1 is what each shard of a sharded "
                         "engine gets while another holds the pool)")
    args = ap.parse_args(argv)
    if args.threads:
        cpu_kernels.set_threads(args.threads)
    rng = np.random.default_rng(0)
    rows_out = []
    if device.default_device() != "cpu":
        raise SystemExit("cpu_rows.py measures the CPU: run it where MLX's default device is the CPU")
    for kind in args.kinds:
        for shape in args.shapes:
            for rows in args.rows:
                r = measure(kind, shape, rows, args.repeats, rng)
                print(json.dumps(r), flush=True)
                rows_out.append(r)
    print("| kind | shape | rows | kernels ms | MLX ms | speedup | kernels peak MB | MLX peak MB |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows_out:
        print(f"| {r['kind']} | {r['shape']} | {r['rows']} | {r['kernels_ms']} | {r['mlx_ms']} | {r['speedup']} | "
              f"{r['kernels_peak_mb']} | {r['mlx_peak_mb']} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
