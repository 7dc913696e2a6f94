"""The decode step's small CUDA kernels alone, one call after another: what a call of the
attention kernel (`amlx.models.decode_attention`) and of the residual-add + RMSNorm kernel
(`amlx.models.step_kernels`) costs at Qwen3-8B's shapes, and how that splits into a fixed
part and a part per key read.

    MLX_USE_CUDA_GRAPHS=0 python benchmarks/step_kernel_micro.py --out OUT [--lengths 1 64 200 1024 4096]
        [--batch 1 8] [--warps 4 8 16] [--keys 1 2 4] [--threads 128 256 512] [--reps 200] [--cupti]

`kernel_profile.py` measured, on the H200, 16.7 us a call of the attention kernel at one
stream and about 200 positions (mlx-lm's sdpa kernel: 8.5 us) and 7.2 us of the residual
norm (MLX's RMSNorm alone: 2.9 us). With the calls run one at a time (MLX_USE_CUDA_GRAPHS=0
and every call reading the previous one's output, so none overlaps the next), this times:

- attention at each history length and batch size, for each number of warps a block
  (`decode_attention.WARPS`, a template constant; the default is 16) and of keys a warp reads
  a round (`decode_attention.KEYS_PER_ROUND`, capped by `round_keys`; the default is 1): a
  call's cost against the length tells the fixed part (prologue, merge, launch) from the part
  per key, which more keys a round should cut;
- the residual norm at C = 4,096 for each block size (`step_kernels.residual_launch`), beside
  MLX's add + `fast.rms_norm` (two kernels).

Wall microseconds per call over `--reps` chained calls (best of `--trials`); with `--cupti`
(torch on the machine) each kernel's own device time as well. Writes OUT/step_kernel_micro.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

HEADS, KV_HEADS, DIM, HIDDEN, BLOCK = 32, 8, 128, 4096, 16  # Qwen3-8B


def _attention_inputs(batch: int, length: int):
    """A paged pool holding `length` positions per row, each row's blocks its own; the
    fused qkv, positions (length - 1: the new token is the last), table, frequencies, norms."""
    import numpy as np

    from amlx import _mlx as mx

    rng = np.random.default_rng(0)
    width = -(-length // BLOCK)
    blocks = 1 + batch * width
    pool = mx.array(rng.standard_normal((2, blocks, KV_HEADS, BLOCK, DIM)).astype(np.float32)).astype(mx.bfloat16)
    table = mx.array((1 + np.arange(batch * width, dtype=np.int32)).reshape(batch, width))
    qkv = mx.array(rng.standard_normal((batch, (HEADS + 2 * KV_HEADS) * DIM)).astype(np.float32)).astype(mx.bfloat16)
    pos = mx.array(np.full(batch, length - 1, dtype=np.int32))
    inv_freq = mx.array((1.0 / 1e6 ** (np.arange(0, DIM, 2) / DIM)).astype(np.float32))
    norm = mx.array(np.ones(DIM, np.float32)).astype(mx.bfloat16)
    return pool, table, qkv, pos, inv_freq, norm


def _attention_chain(inputs, reps: int):
    """`reps` attention calls, each taking the previous call's output as its q (so they
    run one after another); the last output."""
    from amlx._mlx import ops
    from amlx.models import decode_attention as da

    pool, table, qkv, pos, inv_freq, norm = inputs
    kv_part = ops.slice(qkv, (0, HEADS * DIM), (qkv.shape[0], qkv.shape[1]))
    x = qkv
    for _ in range(reps):
        out, _new = da.decode_attention(x, pool, pos, heads=HEADS, scale=DIM ** -0.5, window=None,
                                        inv_freq=inv_freq, q_norm=norm, k_norm=norm, eps=1e-6, table=table)
        x = ops.concatenate([out, kv_part], axis=1)
    return x


def _norm_chain(x, y, w, reps: int, plain: bool):
    from amlx._mlx import fast
    from amlx.models import step_kernels

    for _ in range(reps):
        if plain:
            total = x + y
            x = fast.rms_norm(total, w, 1e-6)
        else:
            total, x = step_kernels.residual_norm(x, y, w, 1e-6)
    return x


def _timed(make, trials: int, reps: int) -> float:
    from amlx._mlx import device, ops

    best = float("inf")
    for _ in range(trials + 1):  # (the first: compiles)
        device.synchronize()
        t0 = time.perf_counter()
        out = make()
        ops.eval(out)
        device.synchronize()
        best = min(best, time.perf_counter() - t0)
        out.close()
    return best / reps * 1e6


def _device(make, match: str) -> float | None:
    """Mean device microseconds of the kernels whose name contains `match` (CUPTI)."""
    try:
        from qgemv import _profiled_kernels
    except ImportError:
        return None
    from amlx._mlx import ops

    def body():
        out = make()
        ops.eval(out)
        out.close()
    kernels = _profiled_kernels(body)
    times = [d for name, t in kernels.items() if match in name for _, d in t]
    return sum(times) / len(times) if times else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1, 64, 200, 1024, 4096])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--keys", type=int, nargs="+", default=[1], help="keys a warp reads a round (1, 2, 4)")
    ap.add_argument("--threads", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--cupti", action="store_true", help="each kernel's device time (torch.profiler)")
    args = ap.parse_args(argv)

    import numpy as np

    from amlx import _mlx as mx
    from amlx.models import decode_attention as da
    from amlx.models import step_kernels

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for warps, keys in ((w, k) for w in args.warps for k in args.keys):
        da.WARPS, da.KEYS_PER_ROUND = warps, keys
        for batch in args.batch:
            for length in args.lengths:
                inputs = _attention_inputs(batch, length)

                def make(inputs=inputs):
                    return _attention_chain(inputs, args.reps)
                row = {"kernel": "attention", "warps": warps, "keys": da.round_keys(DIM), "batch": batch,
                       "length": length, "wall_us": _timed(make, args.trials, args.reps)}
                if args.cupti:
                    row["device_us"] = _device(make, "decode_attention")
                rows.append(row)
                print(json.dumps(row), flush=True)
                for a in inputs:
                    a.close()
    da.WARPS, da.KEYS_PER_ROUND = 16, 1
    rng = np.random.default_rng(1)
    for batch in args.batch:
        x, y = (mx.array(rng.standard_normal((batch, HIDDEN)).astype(np.float32)).astype(mx.bfloat16)
                for _ in range(2))
        w = mx.array(np.ones(HIDDEN, np.float32)).astype(mx.bfloat16)
        default = step_kernels.residual_launch
        for threads in [None, *args.threads]:
            plain = threads is None
            if not plain:
                step_kernels.residual_launch = lambda c, t=threads: (t, -(-c // t))

            def make(plain=plain):
                return _norm_chain(x, y, w, args.reps, plain)
            row = {"kernel": "add + fast.rms_norm" if plain else "residual_norm", "threads": threads,
                   "batch": batch, "wall_us": _timed(make, args.trials, args.reps)}
            if args.cupti:
                row["device_us"] = _device(make, "rms_norm" if plain else "residual_norm")
            rows.append(row)
            print(json.dumps(row), flush=True)
            step_kernels.residual_launch = default
    (args.out / "step_kernel_micro.json").write_text(json.dumps(rows, indent=1))
    lines = ["| kernel | warps / threads | keys a round | batch | length | wall us a call | device us a call |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dev = r.get("device_us")
        lines.append(f"| {r['kernel']} | {r.get('warps', r.get('threads')) or '-'} | {r.get('keys', '-')} | {r['batch']} | "
                     f"{r.get('length', '-')} | {r['wall_us']:.1f} | {'-' if dev is None else f'{dev:.1f}'} |")
    (args.out / "step_kernel_micro.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
