"""The decode step's small CUDA kernels alone, one call after another: what a call of the
attention kernel (`amlx.models.decode_attention`) and of the residual-add + RMSNorm kernel
(`amlx.models.step_kernels`) costs at Qwen3-8B's shapes, and how that splits into a fixed
part and a part per key read.

    MLX_USE_CUDA_GRAPHS=0 python benchmarks/step_kernel_micro.py --out OUT [--lengths 1 64 200 1024 4096]
        [--batch 1 8] [--warps 4 8 16] [--keys 1 2 4] [--splits 512 256] [--lane-dims 0 4 8 16]
        [--lane-bytes 16 64 128] [--lane-one] [--shape qwen3-8b|gemma3-4b] [--sdpa]
        [--threads 128 256 512] [--no-norm] [--floor] [--reps 200] [--cupti]

`kernel_profile.py` measured, on the H200, 16.7 us a call of the attention kernel at one
stream and about 200 positions (mlx-lm's sdpa kernel: 8.5 us) and 7.2 us of the residual
norm (MLX's RMSNorm alone: 2.9 us). With the calls run one at a time (MLX_USE_CUDA_GRAPHS=0
and every call reading the previous one's output, so none overlaps the next), this times:

- attention at each history length and batch size, for each number of warps a block
  (`decode_attention.WARPS`, a template constant; the default is 16) and of keys a warp reads
  a round (`decode_attention.KEYS_PER_ROUND`, capped by `round_keys`; the default is 1): a
  call's cost against the length tells the fixed part (prologue, merge, launch) from the part
  per key, which more keys a round should cut;
- with `--splits`, each number of slots a block reads before a row is split
  (`decode_attention.SPLIT_KEYS`; 0: never split); with `--lane-dims 0 8 16` the one-key loop
  and the lane-group loop (`decode_attention.LANE_DIMS`; the default, 8, where --lane-dims is not given),
  with `--lane-bytes` each amount of keys a lane loads before using the first
  (`decode_attention.LANE_BYTES`), with `--lane-one` one group of 32 lanes where the dims give one
  key a round (`decode_attention.LANE_ONE`; else those rows are the one-key loop's); `--shape
  gemma3-4b` takes Gemma-3-4B's heads (8 of dim 256, 4 key heads) instead of Qwen3-8B's;
  `--sdpa` adds MLX's `fast.scaled_dot_product_attention` over a contiguous cache of the same
  length (what mlx-lm decodes with), the peer of the long-context rows;
- with `--floor`, the launch floor: an MLX custom kernel that copies one value a thread, in
  as many blocks of 512 threads as the attention kernel launches for one row (32) and one
  block, and the attention kernel at one position without head norms;
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

HEADS, KV_HEADS, DIM, HIDDEN, BLOCK = 32, 8, 128, 4096, 16  # Qwen3-8B (--shape gemma3-4b: 8, 4, 256)
SHAPES = {"qwen3-8b": (32, 8, 128), "gemma3-4b": (8, 4, 256)}  # heads, key heads, head dim


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


def _attention_chain(inputs, reps: int, norms: bool = True):
    """`reps` attention calls, each taking the previous call's output as its q (so they
    run one after another), with head norms or (`norms` False) without; the last output."""
    from amlx._mlx import ops
    from amlx.models import decode_attention as da

    pool, table, qkv, pos, inv_freq, norm = inputs
    norm = norm if norms else None
    kv_part = ops.slice(qkv, (0, HEADS * DIM), (qkv.shape[0], qkv.shape[1]))
    x = qkv
    for _ in range(reps):
        out, _new = da.decode_attention(x, pool, pos, heads=HEADS, scale=DIM ** -0.5, window=None,
                                        inv_freq=inv_freq, q_norm=norm, k_norm=norm, eps=1e-6, table=table)
        x = ops.concatenate([out, kv_part], axis=1)
    return x


def _sdpa_inputs(batch: int, length: int):
    """A contiguous cache (batch, KV_HEADS, length, DIM) of keys and of values, and q."""
    import numpy as np

    from amlx import _mlx as mx

    rng = np.random.default_rng(0)
    k, v = (mx.array(rng.standard_normal((batch, KV_HEADS, length, DIM)).astype(np.float32)).astype(mx.bfloat16)
            for _ in range(2))
    q = mx.array(rng.standard_normal((batch, HEADS, 1, DIM)).astype(np.float32)).astype(mx.bfloat16)
    return q, k, v


def _sdpa_chain(inputs, reps: int):
    """`reps` calls of MLX's fused attention, each call's output the next one's q."""
    from amlx._mlx import fast

    x, k, v = inputs
    for _ in range(reps):
        x = fast.scaled_dot_product_attention(x, k, v, scale=DIM ** -0.5)
    return x


_COPY = "out[blockIdx.x * blockDim.x + threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];"


def _copy_chain(x, blocks: int, reps: int):
    """`reps` launches of a trivial custom kernel (a value a thread), each reading the last's output."""
    from amlx._mlx import fast

    kernel = fast.CudaKernel("amlx_micro_copy", ["x"], ["out"], _COPY)
    for _ in range(reps):
        x = kernel([x], [x.shape], [x.dtype], grid=(blocks * 512, 1, 1), threadgroup=(512, 1, 1))[0]
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


def _device(make, match: str | tuple[str, ...], calls: int) -> float | None:
    """Device microseconds a call of the kernels whose name contains `match` (CUPTI): their
    sum over `calls` (a split call is two kernels, the blocks and the merge)."""
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
    matches = (match,) if isinstance(match, str) else match
    times = [d for name, t in kernels.items() if any(m in name for m in matches) for _, d in t]
    return sum(times) / calls if times else None


def _measure(rows: list, row: dict, make, match, args, inputs=()) -> None:
    """`row` with the wall microseconds a call of `make`'s chain and (--cupti) the device
    microseconds of its kernels matching `match`, appended to `rows` and printed; then
    `inputs` closed."""
    row["wall_us"] = _timed(make, args.trials, args.reps)
    if args.cupti:
        row["device_us"] = _device(make, match, args.reps)
    rows.append(row)
    print(json.dumps(row), flush=True)
    for a in inputs:
        a.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1, 64, 200, 1024, 4096])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--keys", type=int, nargs="+", default=[1], help="keys a warp reads a round (1, 2, 4)")
    ap.add_argument("--splits", type=int, nargs="+", default=None,
                    help="slots a block reads before a row is split (default: decode_attention.SPLIT_KEYS)")
    ap.add_argument("--lane-dims", type=int, nargs="+", default=None, choices=[0, 4, 8, 16],
                    help="dimensions a lane holds in the lane-group loop (0: the one-key loop)")
    ap.add_argument("--lane-bytes", type=int, nargs="+", default=None,
                    help="bytes of keys a lane loads ahead in the lane-group loop "
                         "(default: decode_attention.LANE_BYTES)")
    ap.add_argument("--lane-one", action="store_true",
                    help="one group of 32 lanes where the lane dims give one key a round (decode_attention.LANE_ONE)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b", help="whose attention heads (default: %(default)s)")
    ap.add_argument("--sdpa", action="store_true", help="also MLX's fused attention over a contiguous cache")
    ap.add_argument("--no-norm", action="store_true", help="skip the residual norm")
    ap.add_argument("--floor", action="store_true", help="a trivial custom kernel's launch (the floor)")
    ap.add_argument("--threads", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--cupti", action="store_true", help="each kernel's device time (torch.profiler)")
    args = ap.parse_args(argv)
    global HEADS, KV_HEADS, DIM
    HEADS, KV_HEADS, DIM = SHAPES[args.shape]

    import numpy as np

    from amlx import _mlx as mx
    from amlx.models import decode_attention as da
    from amlx.models import step_kernels

    if any(n not in da.LANE_BYTES_CHOICES for n in args.lane_bytes or []):
        ap.error(f"--lane-bytes: each one of {da.LANE_BYTES_CHOICES}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    saved = da.WARPS, da.KEYS_PER_ROUND, da.SPLIT_KEYS, da.LANE_DIMS, da.LANE_BYTES, da.LANE_ONE
    da.BUSY_BLOCKS = 1 << 30  # (each row at the warps it names: the lane-group loop halves none)
    da.LANE_ONE = args.lane_one or da.LANE_ONE
    for warps, keys, split, lanes, ahead in ((w, k, sp, ld, lb) for w in args.warps for k in args.keys
                                             for sp in (args.splits or [da.SPLIT_KEYS])
                                             for ld in (args.lane_dims or [da.LANE_DIMS])
                                             for lb in (args.lane_bytes or [da.LANE_BYTES])):
        if lanes and keys != 1 or not lanes and ahead != (args.lane_bytes or [da.LANE_BYTES])[0]:
            continue  # (the lane-group loop takes no whole keys a round; the one-key loop no bytes ahead)
        da.WARPS, da.KEYS_PER_ROUND, da.SPLIT_KEYS, da.LANE_DIMS, da.LANE_BYTES = warps, keys, split, lanes, ahead
        for batch in args.batch:
            for length in args.lengths:
                inputs = _attention_inputs(batch, length)

                def make(inputs=inputs):
                    return _attention_chain(inputs, args.reps)
                groups = da.lane_groups(DIM)
                kind = f"attention, {lanes} dims a lane, {ahead} B ahead" if groups else "attention"
                row = {"kernel": kind, "warps": warps,
                       "keys": groups or da.round_keys(DIM), "split": split,
                       "batch": batch, "length": length}
                _measure(rows, row, make, "decode_attention", args, inputs)
    da.WARPS, da.KEYS_PER_ROUND, da.SPLIT_KEYS, da.LANE_DIMS, da.LANE_BYTES, da.LANE_ONE = saved
    if args.floor:
        if not mx.fast.cuda_available():
            print("--floor: no CUDA, the copy kernel is skipped", file=sys.stderr)
        for blocks in (32, 1) if mx.fast.cuda_available() else ():
            x = mx.array(np.zeros(blocks * 512, np.float32))

            def make(x=x, blocks=blocks):
                return _copy_chain(x, blocks, args.reps)
            _measure(rows, {"kernel": f"copy, {blocks} blocks of 512", "batch": 1}, make, "amlx_micro_copy", args)
        inputs = _attention_inputs(1, 1)

        def make(inputs=inputs):
            return _attention_chain(inputs, args.reps, norms=False)
        _measure(rows, {"kernel": "attention, no head norms", "warps": da.WARPS, "batch": 1, "length": 1}, make,
                 "decode_attention", args, inputs)
    for batch in args.batch if args.sdpa else []:
        for length in args.lengths:
            inputs = _sdpa_inputs(batch, length)

            def make(inputs=inputs):
                return _sdpa_chain(inputs, args.reps)
            _measure(rows, {"kernel": "MLX sdpa (contiguous)", "batch": batch, "length": length}, make,
                     ("sdpa", "attention"), args, inputs)
    rng = np.random.default_rng(1)
    for batch in [] if args.no_norm else args.batch:
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
            _measure(rows, {"kernel": "add + fast.rms_norm" if plain else "residual_norm", "threads": threads,
                            "batch": batch}, make, "rms_norm" if plain else "residual_norm", args)
            step_kernels.residual_launch = default
    (args.out / "step_kernel_micro.json").write_text(json.dumps(rows, indent=1))
    lines = ["| kernel | warps / threads | keys a round | split | batch | length | wall us a call | device us a call |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dev = r.get("device_us")
        lines.append(f"| {r['kernel']} | {r.get('warps', r.get('threads')) or '-'} | {r.get('keys', '-')} | {r.get('split', '-')} | {r['batch']} | "
                     f"{r.get('length', '-')} | {r['wall_us']:.1f} | {'-' if dev is None else f'{dev:.1f}'} |")
    (args.out / "step_kernel_micro.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
