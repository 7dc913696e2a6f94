"""A batched decode step's quantized products as the step runs them: one after another,
each product's input the previous one's output, at Qwen3-8B's shapes (36 layers of q/k/v,
o, gate/up and down), for several ways of computing a product of 8-128 rows.

    python benchmarks/qmm_chain.py --out OUT [--rows 16 64] [--variants mlx rows16 splitk bf16]

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
  - splitk / splitkS: K split S ways through MLX's batched quantized matmul, the weight
    laid out as (S, n, k / S) (what a load would store), partial sums added in float32;
    `splitk` picks S per shape: the fewest (1, 2, 4, 8) giving 132 blocks or more;
  - ilvS: K split S ways with the weight as stored (`interleaved`): S times the products, S * S
    times the blocks, no second copy of the weights;
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
SMS = 132


def auto_split(n: int, k: int, group: int) -> int:
    """The fewest K splits (a power of two, at most 8, each slice whole groups of 64 or more
    values) that give MLX's kernel 0.9 x 132 blocks or more (n / 128 of them a split)."""
    s = 1
    while s < 8 and (n // 128) * s < 0.9 * SMS and (k // (2 * s)) % max(64, group) == 0:
        s *= 2
    return s


def _layer(k: int, n: int, bits: int, group: int, seed: int, splits: set[int], dense: bool) -> dict:
    from amlx._mlx import bfloat16, ops, random

    w = random.normal((n, k), key=random.key(seed)).astype(bfloat16) * (1.0 / math.sqrt(k))
    layer = {"q": ops.quantize(w, group, bits)}
    for s in splits:  # the same weight, its K range as s slices: (s, n, k / s)
        ws = ops.transpose(ops.reshape(w, (n, s, k // s)), (1, 0, 2))
        layer[s] = ops.quantize(ops.contiguous(ws), group, bits)
    if dense:
        layer["dense"] = w
    ops.eval(*[a for v in layer.values() for a in (v if isinstance(v, tuple) else (v,))])
    return layer


def product(variant: str, x, layer: dict, n: int, k: int, group: int, bits: int):
    from amlx._mlx import bfloat16, float32, ops

    rows = x.shape[0]
    if variant == "bf16":
        return ops.matmul(x, ops.transpose(layer["dense"]))
    narrow = n // 128 < SMS // 2  # (MLX's kernel gives such a product fewer blocks than half the SMs)
    grouped = variant.startswith("rows") or (variant.startswith("nrows") and narrow)
    if grouped and rows > int(variant.lstrip("nrows")):
        r = int(variant.lstrip("nrows"))
        parts = [ops.quantized_matmul(ops.slice(x, (i, 0), (min(i + r, rows), k)), *layer["q"], True, group, bits)
                 for i in range(0, rows, r)]
        return ops.concatenate(parts, axis=0)
    if variant.startswith("ilv"):
        return interleaved(x, layer["q"], int(variant[3:]), group, bits)
    s = 1
    if variant == "splitk":
        s = auto_split(n, k, group)
    elif variant.startswith("splitk"):
        s = int(variant[6:])
    if s == 1:
        return ops.quantized_matmul(x, *layer["q"], True, group, bits)
    xs = ops.transpose(ops.reshape(x, (rows, s, k // s)), (1, 0, 2))  # (s, rows, k / s)
    parts = ops.quantized_matmul(xs, *layer[s], True, group, bits)     # (s, rows, n)
    return ops.sum(parts.astype(float32), axis=0).astype(bfloat16)


def interleaved(x, packed: tuple, s: int, group: int, bits: int):
    """x @ W^T with K split s ways and no new weight layout: the packed (n, words) weight read
    as (s n, words / s) (a free reshape: row s i + j holds slice j of output i's K range; the
    scales and biases alike), times x's K slices stacked as (s rows, k / s) rows. One call
    gives every slice against every slice, s times the products needed but s * s times the
    blocks: output i is the sum over j of row block j, column s i + j."""
    from amlx._mlx import float32, ops

    rows, k = x.shape
    w, scales, biases = packed
    n = w.shape[0]
    wr = ops.reshape(w, (s * n, w.shape[1] // s))
    sr = ops.reshape(scales, (s * n, scales.shape[1] // s))
    br = ops.reshape(biases, (s * n, biases.shape[1] // s))
    xs = ops.reshape(ops.transpose(ops.reshape(x, (rows, s, k // s)), (1, 0, 2)), (s * rows, k // s))
    y = ops.quantized_matmul(xs, wr, sr, br, True, group, bits)  # (s rows, s n)
    parts = [ops.slice(y, (j * rows, j), (j * rows + rows, s * n), (1, s)).astype(float32) for j in range(s)]
    total = parts[0]
    for p in parts[1:]:
        total = ops.add(total, p)
    return total.astype(x.dtype)


def splits_of(variants: list[str], group: int) -> set[int]:
    out = set()
    for v in variants:
        if v == "splitk":
            out |= {auto_split(n, k, group) for k, n in SHAPES.values()}
        elif v.startswith("splitk"):
            out.add(int(v[6:]))
    return out - {1}


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
    ap.add_argument("--variants", nargs="+", default=["mlx", "rows16", "nrows16", "splitk", "splitk2", "ilv2", "bf16"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--depth", type=int, default=36, help="layers a step (Qwen3-8B: 36)")
    ap.add_argument("--distinct", type=int, default=10, help="distinct layers' weights cycled through")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--check", action="store_true", help="also each variant's largest difference from the first one's, relative to its largest value")
    args = ap.parse_args(argv)

    import numpy as np

    from amlx._mlx import bfloat16, device, float32, ops, random

    splits = splits_of(args.variants, args.group)
    layers = [{name: _layer(k, n, args.bits, args.group, 10 * i + j, splits, "bf16" in args.variants)
               for j, (name, (k, n)) in enumerate(SHAPES.items())} for i in range(args.distinct)]
    print("splits per shape (splitk): " + ", ".join(f"{name} {auto_split(n, k, args.group)}"
                                                   for name, (k, n) in SHAPES.items()), flush=True)
    results: dict = {"rows": args.rows, "depth": args.depth, "bits": args.bits, "group": args.group, "ms": {},
                     "splits": {name: auto_split(n, k, args.group) for name, (k, n) in SHAPES.items()}}
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
