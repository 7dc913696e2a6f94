"""MLX's quantized matmul at 8-128 rows (a batched decode step of a 4-bit model) against
dequantizing the weight and multiplying in bf16 (cuBLAS), at Qwen3-8B's projection shapes.

    python benchmarks/qmm_rows.py --out OUT [--rows 8 16 32 64 128] [--bits 4] [--group 64]

Why: Qwen3-8B 4-bit decodes 64 streams at about a third of bf16's aggregate tok/s on the
H200 (2,455 against 8,607 tok/s in issue 16's run of 2026-12-05), a step of 26 ms where its
weights take about 1.4 ms to read. This says whether the quantized products are the cause
and what the other path would cost: per shape and row count, microseconds a call for
  - mlx: `quantized_matmul` (on sm90 with group 64: MLX's sm80 CUTLASS kernel, 64-row tiles);
  - dequant: `dequantize` then `matmul` (one bf16 weight written and read per call);
  - bf16: `matmul` with the dense bf16 weight (what cuBLAS takes for the same product),
and the sum over one Qwen3-8B step (36 layers and the head). Independent calls of a trial
cycle through copies of the weights larger than the L2 cache (qgemv.py's method); best of
`--trials`. Writes OUT/qmm_rows.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from qgemv import L2_BYTES, PER_STEP, SHAPES, _timed  # noqa: E402

SIDES = ("mlx", "dequant", "bf16")


def _weights(k: int, n: int, bits: int, group: int) -> list[tuple]:
    """Copies of one random (n, k) weight, each as (packed, scales, biases, dense bf16)."""
    from amlx._mlx import bfloat16, ops, random

    copies = max(2, math.ceil(L2_BYTES / (n * k * 2)) + 1)  # the dense copies exceed the L2
    out = []
    for i in range(copies):
        w = random.normal((n, k), key=random.key(i)).astype(bfloat16)
        packed = ops.quantize(w, group, bits)
        ops.eval(w, *packed)
        out.append((*packed, w))
    return out


def _call(side: str, x, layer, group: int, bits: int):
    from amlx._mlx import ops

    wq, scales, biases, dense = layer
    if side == "mlx":
        return ops.quantized_matmul(x, wq, scales, biases, True, group, bits)
    if side == "dequant":
        w = ops.dequantize(wq, scales, biases, group, bits)
        return ops.matmul(x, ops.transpose(w))
    return ops.matmul(x, ops.transpose(dense))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--reps", type=int, default=16, help="independent calls a trial (each dequant call "
                    "holds a bf16 weight until its product is done)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    args = ap.parse_args(argv)

    from amlx._mlx import bfloat16, random

    results: dict = {"rows": args.rows, "bits": args.bits, "group": args.group, "us": {}}
    for name, k, n in SHAPES:
        if name not in args.shapes:
            continue
        layers = _weights(k, n, args.bits, args.group)
        for rows in args.rows:
            x = random.normal((rows, k), key=random.key(99)).astype(bfloat16)
            row = {side: round(_timed(side, x, layers, args.group, args.bits, args.reps, args.trials, _call) * 1e6, 1)
                   for side in SIDES}
            results["us"].setdefault(name, {})[str(rows)] = row
            print(f"{name:8} {rows:4} rows  " + "  ".join(f"{s} {v:9.1f} us" for s, v in row.items()), flush=True)
        for layer in layers:
            for a in layer:
                a.close()
    step = {str(r): {s: round(sum(PER_STEP[name] * results["us"][name][str(r)][s] for name in results["us"]) / 1e3, 2)
                     for s in SIDES} for r in args.rows if all(str(r) in v for v in results["us"].values())}
    results["qwen3_8b_step_ms"] = step
    for r, row in step.items():
        print(f"Qwen3-8B step, {r:>4} rows: " + "  ".join(f"{s} {v:7.2f} ms" for s, v in row.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qmm_rows.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
