"""A batched decode step's quantized products as the step runs them: one after another,
each product's input the previous one's output, at Qwen3-8B's shapes (36 layers of q/k/v,
o, gate/up and down), for several ways of computing a product of 8-128 rows.

    python benchmarks/qmm_chain.py --out OUT [--rows 16 64] [--variants mlx copy interleave rows16 bf16]

Why: on the H100 (2026-12-05) `kernel_profile.py --streams 64` of Qwen3-8B 4-bit spent
24.0 ms of a 29 ms step in MLX's quantized matmul (145 launches), where `qmm_rows.py`,
which times independent calls that MLX's CUDA graph runs side by side, sums the same
products to 10.2 ms. MLX's sm80 kernel tiles the output in 64 x 128 blocks and never
splits K, so a 64-row product has only n / 128 blocks: 48 for q/k/v, 32 for o and down
(down with K = 12,288), on 132 SMs. Run one at a time, most of the GPU idles. Variants:
  - mlx: `quantized_matmul` as the model calls it;
  - rowsR: the rows in groups of R, one call a group (independent calls: the graph may
    run them side by side; each reads the whole weight, mostly from L2); nrowsR: only where
    the product has fewer than 66 blocks (q/k/v, o, down);
  - copy, interleave: K split over more blocks, as `AMLX_QMM_SPLIT` has the engine do it
    (amlx/models/qmm_split.py): through MLX's batched quantized matmul over a (S, n, k / S)
    copy of the weight, or over the weight as stored read as (S n, k / S) at S times the
    products; S per shape as `qmm_split.splits` picks it (1: the plain product);
  - bf16: the dense bf16 weight through `matmul` (cuBLAS), for scale.
Ten distinct layers' weights (about 1.1 GB at 4 bits) cycle through the 36, so no layer's
read is served by the L2 cache of the one before. Best of `--trials` whole chains;
writes OUT/qmm_chain.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}
SPLITS = ("copy", "interleave")  # amlx.models.qmm_split's ways, as AMLX_QMM_SPLIT names them


def _layer(k: int, n: int, bits: int, group: int, seed: int, dense: bool) -> dict:
    from amlx._mlx import bfloat16, ops, random
    from amlx.models.nn import QuantizedLinear

    w = random.normal((n, k), key=random.key(seed)).astype(bfloat16) * (1.0 / math.sqrt(k))
    layer = {"q": QuantizedLinear(*ops.quantize(w, group, bits), group, bits)}
    if dense:
        layer["dense"] = w
    ops.eval(*[a for v in layer.values() for a in (v.parameters().values() if isinstance(v, QuantizedLinear) else (v,))])
    return layer


def product(variant: str, x, layer: dict, n: int, k: int, group: int, bits: int):
    """One product as `variant` computes it (the split ways through amlx's own `qmm_split.product`,
    whatever the row count: the engine splits only where MLX's kernel has too few blocks)."""
    from amlx._mlx import ops
    from amlx.models import qmm_split

    q = layer["q"]
    rows = x.shape[0]
    if variant == "bf16":
        return ops.matmul(x, ops.transpose(layer["dense"]))
    if variant in SPLITS:
        if qmm_split.splits(n, k, group, variant) == 1:
            return ops.quantized_matmul(x, q.weight, q.scales, q.biases, True, group, bits)
        return qmm_split.product(x, q, variant)
    narrow = qmm_split.blocks(rows, n) < qmm_split.SMS // 2  # (fewer blocks than half the SMs)
    grouped = variant.startswith("rows") or (variant.startswith("nrows") and narrow)
    if grouped and rows > int(variant.lstrip("nrows")):
        r = int(variant.lstrip("nrows"))
        parts = [ops.quantized_matmul(ops.slice(x, (i, 0), (min(i + r, rows), k)), q.weight, q.scales, q.biases, True,
                                      group, bits) for i in range(0, rows, r)]
        return ops.concatenate(parts, axis=0)
    return ops.quantized_matmul(x, q.weight, q.scales, q.biases, True, group, bits)


def step(variant: str, h, layers: list[dict], depth: int, group: int, bits: int):
    """`depth` layers' products over h (rows, 4096), each fed by the one before."""
    from amlx._mlx import ops

    for i in range(depth):
        lay = layers[i % len(layers)]
        qkv = product(variant, h, lay["qkv"], 6144, 4096, group, bits)
        a = ops.slice(qkv, (0, 0), (h.shape[0], 4096))
        h = ops.add(h, product(variant, a, lay["o"], 4096, 4096, group, bits))
        gu = product(variant, h, lay["gate_up"], 24576, 4096, group, bits)
        g = ops.slice(gu, (0, 0), (h.shape[0], 12288))
        u = ops.slice(gu, (0, 12288), (h.shape[0], 24576))
        act = ops.multiply(ops.multiply(g, ops.sigmoid(g)), u)
        h = ops.add(h, product(variant, act, lay["down"], 4096, 12288, group, bits))
    return h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--variants", nargs="+", default=["mlx", "copy", "interleave", "rows16", "nrows16", "bf16"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--depth", type=int, default=36, help="layers a step (Qwen3-8B: 36)")
    ap.add_argument("--distinct", type=int, default=10, help="distinct layers' weights cycled through")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--check", action="store_true", help="also each variant's largest difference from the first one's, relative to its largest value")
    args = ap.parse_args(argv)

    import numpy as np

    from amlx._mlx import bfloat16, device, float32, ops, random

    from amlx.models import qmm_split

    layers = [{name: _layer(k, n, args.bits, args.group, 10 * i + j, "bf16" in args.variants)
               for j, (name, (k, n)) in enumerate(SHAPES.items())} for i in range(args.distinct)]
    splits = {mode: {name: qmm_split.splits(n, k, args.group, mode) for name, (k, n) in SHAPES.items()} for mode in SPLITS}
    print(f"K splits per shape: {splits}", flush=True)
    results: dict = {"rows": args.rows, "depth": args.depth, "bits": args.bits, "group": args.group, "ms": {},
                     "splits": splits}
    for rows in args.rows:
        h0 = random.normal((rows, 4096), key=random.key(7)).astype(bfloat16)
        ref = None
        for variant in args.variants:
            out = step(variant, h0, layers, 2, args.group, args.bits)  # warm: compiles what it needs
            ops.eval(out)
            if args.check:  # (the first variant is the reference)
                ref = out.astype(float32) if ref is None else ref
                diff = float(np.abs(np.asarray(out.astype(float32)) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())
            best = math.inf
            for _ in range(args.trials):
                y = step(variant, h0, layers, args.depth, args.group, args.bits)
                device.synchronize()
                t0 = time.perf_counter()
                ops.eval(y)
                device.synchronize()
                best = min(best, time.perf_counter() - t0)
                y.close()
            results["ms"].setdefault(str(rows), {})[variant] = round(best * 1e3, 3)
            extra = f"  max |diff| / max |{args.variants[0]}| {diff:.3g}" if args.check else ""
            print(f"{rows:4} rows  {variant:8} {best * 1e3:8.2f} ms a step ({args.depth} layers){extra}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qmm_chain.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
