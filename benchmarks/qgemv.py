"""amlx's few-row quantized matmul kernel (amlx.models.quantized_gemv) against
MLX's `quantized_matmul` at Qwen3-8B's projection shapes, in GB/s of weights
read and as a share of the device's copy bandwidth (benchmarks/bandwidth.py).

    python benchmarks/qgemv.py --out OUT [--rows 1 2 4 8] [--bits 4] [--group 64] [--both] [--balanced]
                               [--sweep qkv o down] [--serial]

`--both` (or `--v2`) times the kernel's other version (quantized_gemv.quantized_gemv(...,
version=1): AMLX_QGEMV=1; version 2 is the default) beside the default one, as a third side. `--balanced`
adds each timed version with the "balanced" launch rule (`launch_shape`; opt-in:
AMLX_QGEMV_LAUNCH=balanced) beside the default "wave" one (bal columns). `--sweep SHAPE...`
times, at those shapes, every block shape (warps 2/4/8 a block, K split 1-8 over them) of
each timed version: which is fastest, and what the two rules and the cost model
(`quantized_gemv.estimate`) picked against it (the sweep table; data for the rule).

The `--reps` calls of a trial are independent (same x, other weights), and MLX's CUDA graphs
order kernels only by the arrays they share, so by default they run overlapped: a call's wall
time is then a throughput and its device time is stretched by its neighbours (the measured down
projection: 30.7 us device, 22.3 us wall a call). A decode step's products depend on each other
and run one at a time; `--serial` (MLX_USE_CUDA_GRAPHS=0: kernels launched in order on one
stream) measures that, each kernel's own time being its `--cupti` device time (the wall time may
then be MLX's host cost a launch). Tail and balance effects (a launch leaving SMs idle) show
only there: overlapped, the next call's blocks fill the idle SMs.

Shapes (in -> out): q/k/v fused 4096 -> 6144, o 4096 -> 4096, gate/up fused
4096 -> 24576, down 12288 -> 4096, head 4096 -> 151936; activations bf16.
Each call reads its weight, scales and biases once; the bytes counted are
those three arrays (x and the output are tiny). A timed trial evaluates
`--reps` calls at once, cycling through copies of the weight that together
exceed the GPU's L2 cache (so no call reads its weight from L2), after an
untimed warm-up that compiles the kernels; best of `--trials`. The figure is
wall time per call with MLX's graph recording pipelined behind the GPU, so
for the smallest shapes (a few microseconds of reading) it can be bound by
MLX's host cost per node (~4 us, benchmarks/README.md) rather than by the kernel.
With torch on the machine, `--cupti` adds the kernels' device time from
torch.profiler (CUPTI sees every CUDA kernel of the process, MLX's included).

The last table sums the shapes as one decode step of Qwen3-8B reads them
(36 layers of q/k/v, o, gate/up and down, plus the head): the step time of
the quantized matmuls alone and the tokens/s that bounds.
Writes OUT/qgemv.json and OUT/qgemv.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 24576), ("down", 12288, 4096),
          ("head", 4096, 151936)]
PER_STEP = {"qkv": 36, "o": 36, "gate_up": 36, "down": 36, "head": 1}  # Qwen3-8B: 36 layers
L2_BYTES = 64 << 20  # a little above the H200's 60 MB
SIDES = ("amlx", "mlx")  # amlx: the kernel's default version (quantized_gemv.VERSION) and launch rule
# the kernel's sides: label -> (version, launch) as quantized_gemv takes them (None: the defaults);
# --both adds the version that is not the default (amlx_v1 while VERSION is 2)
KERNEL_SIDES = {"amlx": (None, None), "amlx_v1": (1, None), "amlx_v2": (2, None), "amlx_bal": (None, "balanced"),
                "amlx_v1_bal": (1, "balanced"), "amlx_v2_bal": (2, "balanced")}
BLOCK_SHAPES = [(w, s) for s in (1, 2, 4, 8) for w in (8, 4, 2) if s <= w]  # (warps, split) for --sweep


def _layers(k: int, n: int, bits: int, group: int, copies: int):
    from amlx._mlx import bfloat16, ops, random

    out = []
    for i in range(copies):
        w = random.normal((n, k), key=random.key(i)).astype(bfloat16)
        packed = ops.quantize(w, group, bits)
        ops.eval(*packed)
        w.close()
        out.append(packed)
    return out


def _call(side: str, x, layer, group: int, bits: int):
    from amlx._mlx import ops
    from amlx.models import quantized_gemv as qg

    if side == "mlx":
        return ops.quantized_matmul(x, *layer, True, group, bits)
    version, launch = KERNEL_SIDES[side] if isinstance(side, str) else side  # a tuple: (version, (warps, split))
    return qg.quantized_gemv(x, *layer, group, bits, version, launch)


def _timed(side, x, layers, group, bits, reps, trials, call=None) -> float:
    """Best seconds per call (`call(side, x, layer, group, bits)`, default this module's `_call`)."""
    from amlx._mlx import device, ops

    call = call or _call
    warm = [call(side, x, layer, group, bits) for layer in layers]
    ops.eval(*warm)
    for y in warm:
        y.close()
    best = math.inf
    for _ in range(trials):
        ys = [call(side, x, layers[i % len(layers)], group, bits) for i in range(reps)]
        device.synchronize()
        t0 = time.perf_counter()
        ops.eval(*ys)
        device.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
        for y in ys:
            y.close()
    return best


def _profiled_kernels(body) -> dict[str, list[tuple[float, float]]]:
    """Runs `body` under torch.profiler (synchronized before and after): each CUDA kernel's
    name -> its (start, device microseconds), one a launch."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from amlx._mlx import device

    torch.cuda.init()
    device.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        body()
        device.synchronize()
    kernels: dict[str, list[tuple[float, float]]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(e.name, []).append((e.time_range.start, e.time_range.elapsed_us()))
    return kernels


def _run_calls(side, x, layers, group, bits, reps) -> None:
    """`reps` calls of one side, evaluated and synchronized, their results freed."""
    from amlx._mlx import device, ops

    ys = [_call(side, x, layers[i % len(layers)], group, bits) for i in range(reps)]
    ops.eval(*ys)
    device.synchronize()
    for y in ys:
        y.close()


def _device_times(x, layers, group, bits, reps, sides=SIDES) -> dict:
    """Device microseconds per call of each side's kernels, from torch.profiler."""
    out = {}
    for side in sides:
        kernels = _profiled_kernels(lambda: _run_calls(side, x, layers, group, bits, reps))
        # the side's matmul: the kernel name that ran `reps` times or more and took the most time
        busy = {n: sum(d for _, d in t) for n, t in kernels.items() if len(t) >= reps}
        if busy:
            name = max(busy, key=busy.get)
            out[side] = {"kernel": name[:120], "device_us": busy[name] / len(kernels[name])}
    return out


def _device_times_in_order(x, layers, group, bits, reps, sides) -> list[float]:
    """Device microseconds per call of each of `sides`, all running one kernel (one version, other
    launch shapes), in one torch.profiler session: each side's calls synchronized before the next
    side's, so that kernel's events, in order of start, are the sides' in turn."""
    kernels = _profiled_kernels(lambda: [_run_calls(side, x, layers, group, bits, reps) for side in sides])
    # the matmul: of the kernels that ran once a call, the one that took the most time
    runs = [sorted(t) for t in kernels.values() if len(t) == reps * len(sides)]
    if not runs:
        raise RuntimeError(f"no kernel ran {reps} x {len(sides)} times: {[len(t) for t in kernels.values()]}")
    run = max(runs, key=lambda t: sum(d for _, d in t))
    return [sum(d for _, d in run[i * reps:(i + 1) * reps]) / reps for i in range(len(sides))]


def _sweep(x, layers, k: int, n: int, rows: int, args, versions) -> dict:
    """Per version: microseconds of every block shape (wall, and with --cupti the kernel's device
    time, which then ranks them: a few-microsecond kernel's wall time can be MLX's host cost per
    node), the fastest, and what each launch rule and the cost model picked; printed as it goes."""
    from amlx.models import quantized_gemv as qg

    out = {}
    for version in versions:
        sides = {f"{w}x{s}": (version, (w, s)) for w, s in BLOCK_SHAPES}
        us = {key: 1e6 * _timed(side, x, layers, args.group, args.bits, args.reps, args.trials)
              for key, side in sides.items()}
        device = {}
        if args.cupti:
            try:
                got = _device_times_in_order(x, layers, args.group, args.bits, args.reps, list(sides.values()))
                device = dict(zip(sides, got))
            except Exception as exc:  # noqa: BLE001 - optional: rank by wall time
                print(f"  sweep: no device times ({type(exc).__name__}: {exc})"[:200], flush=True)
        rank = device if len(device) == len(us) else us
        picks = {}
        for rule in qg.LAUNCH_RULES:
            group = qg.launch_shape(rows, n, k, args.bits, version, rule)[1]
            picks[rule] = f"{group[0] * group[1] // 32}x{group[1]}"
        model = {f"{w}x{s}": qg.estimate(rows, n, k, args.bits, w, s, 2, version) for w, s in BLOCK_SHAPES}
        best = min(rank, key=rank.get)
        out[f"v{version}"] = {"us": us, "device_us": device, "ranked_by": "device" if rank is device else "wall",
                              "best": best, "picks": picks, "model_us": model}
        print(f"  sweep {k}->{n} v{version} rows={rows} ({out[f'v{version}']['ranked_by']} us): best {best} "
              f"{rank[best]:.1f}; wave {picks['wave']} {rank[picks['wave']]:.1f}; balanced {picks['balanced']} "
              f"{rank[picks['balanced']]:.1f}; all " + " ".join(f"{key}:{t:.1f}" for key, t in rank.items()),
              flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--reps", type=int, default=64)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    ap.add_argument("--cupti", action="store_true", help="device time per kernel through torch.profiler")
    ap.add_argument("--copy-bytes", type=int, default=4 << 30)
    ap.add_argument("--both", "--v2", dest="both", action="store_true",
                    help="the kernel's other version as a third side (amlx_v1 while version 2 is the default)")
    ap.add_argument("--balanced", action="store_true", help="each timed version with the balanced launch rule too")
    ap.add_argument("--sweep", nargs="*", default=[], help="shapes at which to time every block shape")
    ap.add_argument("--serial", action="store_true",
                    help="calls one after another, not overlapped (MLX_USE_CUDA_GRAPHS=0; rank by --cupti)")
    args = ap.parse_args(argv)
    if args.serial:  # read by MLX once, at its first CUDA command: before any below
        os.environ["MLX_USE_CUDA_GRAPHS"] = "0"

    import numpy as np

    from amlx._mlx import bfloat16, fast, float32, ops, random
    from amlx.models import quantized_gemv as qg
    from bandwidth import copy_bandwidth

    if not fast.cuda_available():
        print("needs MLX's CUDA backend", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    copy_bw = copy_bandwidth(args.copy_bytes)
    print(f"copy bandwidth {copy_bw / 1e9:,.0f} GB/s", flush=True)
    results = {"copy_bytes_per_s": copy_bw, "args": vars(args), "shapes": []}
    for name, k, n in [s for s in SHAPES if s[0] in args.shapes]:
        one = _layers(k, n, args.bits, args.group, 1)
        nbytes = sum(a.nbytes for a in one[0])
        copies = max(1, -(-L2_BYTES * 2 // nbytes))
        layers = one + (_layers(k, n, args.bits, args.group, copies - 1) if copies > 1 else [])
        for rows in args.rows:
            x = random.normal((rows, k), key=random.key(1000 + rows)).astype(bfloat16)
            ys = [_call(side, x, layers[0], args.group, args.bits) for side in SIDES]
            got, want = (ops.astype(y, float32).numpy().astype(np.float64) for y in ys)
            row = {"shape": name, "k": k, "n": n, "rows": rows, "bytes": nbytes,
                   "max_rel_diff": float(np.max(np.abs(got - want)) / np.max(np.abs(want)))}
            sides = SIDES + ((f"amlx_v{3 - qg.VERSION}",) if args.both else ())
            sides += tuple(s + "_bal" for s in sides if s != "mlx") if args.balanced else ()
            for side in sides:
                s = _timed(side, x, layers, args.group, args.bits, args.reps, args.trials)
                row[side] = {"us": s * 1e6, "gb_s": nbytes / s / 1e9, "bw_fraction": nbytes / s / copy_bw}
            if args.cupti:
                try:
                    for side, d in _device_times(x, layers, args.group, args.bits, args.reps, sides).items():
                        row[side].update(d, device_gb_s=nbytes / d["device_us"] / 1e3,
                                         device_bw_fraction=nbytes / (d["device_us"] * 1e-6) / copy_bw)
                except Exception as exc:  # noqa: BLE001 - optional: report and go on
                    row["cupti_error"] = f"{type(exc).__name__}: {exc}"[:300]
            results["shapes"].append(row)
            a, m = row["amlx"], row["mlx"]
            dev = "".join(f" | {side} device {row[side]['device_us']:.1f} us" for side in sides
                          if "device_us" in row[side])
            for side in sides[2:]:
                dev += f" | {side} {row[side]['us']:.1f} us ({100 * row[side]['bw_fraction']:.0f}%)"
            if name in args.sweep:
                row["sweep"] = _sweep(x, layers, k, n, rows, args, [v for v in (1, 2) if v == qg.VERSION or args.both])
            print(f"{name:8s} {k:6d}->{n:6d} rows={rows}: amlx {a['us']:8.1f} us {a['gb_s']:7.0f} GB/s "
                  f"({100 * a['bw_fraction']:.0f}%) | mlx {m['us']:8.1f} us {m['gb_s']:7.0f} GB/s "
                  f"({100 * m['bw_fraction']:.0f}%) | {m['us'] / a['us']:.2f}x | rel diff {row['max_rel_diff']:.1e}"
                  + dev, flush=True)
            for y in ys:
                y.close()
            x.close()
            (out / "qgemv.json").write_text(json.dumps(results, indent=2))  # as it goes: a crash keeps the rows
        for layer in layers:
            for arr in layer:
                arr.close()
    (out / "qgemv.json").write_text(json.dumps(results, indent=2))
    (out / "qgemv.md").write_text(table(results))
    print(table(results), flush=True)
    return 0


def table(results: dict) -> str:
    bw = results["copy_bytes_per_s"]
    extra = [side for side in KERNEL_SIDES if side != "amlx" and any(side in r for r in results["shapes"])]
    mode = ("calls one at a time (--serial)" if results["args"].get("serial") else
            "independent calls overlapped (no --serial)")
    lines = [f"Copy bandwidth: {bw / 1e9:,.0f} GB/s. Wall time per call (best of trials), {mode}; % of the copy "
             "bandwidth.",
             "", "| shape | k -> n | rows | MB | amlx us | amlx GB/s | amlx % | MLX us | MLX GB/s | MLX % | speedup "
             "| device us amlx / MLX |" + "".join(f" {side} us (wall / device) | {side} % |" for side in extra),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|" + "---:|---:|" * len(extra)]
    for r in results["shapes"]:
        a, m = r["amlx"], r["mlx"]
        dev = (f"{a['device_us']:.1f} / {m['device_us']:.1f}" if "device_us" in a and "device_us" in m else "–")
        lines.append(f"| {r['shape']} | {r['k']} -> {r['n']} | {r['rows']} | {r['bytes'] / 1e6:.1f} | {a['us']:.1f} | "
                     f"{a['gb_s']:,.0f} | {100 * a['bw_fraction']:.0f}% | {m['us']:.1f} | {m['gb_s']:,.0f} | "
                     f"{100 * m['bw_fraction']:.0f}% | {m['us'] / a['us']:.2f}x | {dev} |"
                     + "".join(f" {r[side]['us']:.1f}" + (f" / {r[side]['device_us']:.1f}" if "device_us" in r[side] else "")
                               + f" | {100 * r[side]['bw_fraction']:.0f}% |" if side in r else " – | – |" for side in extra))
    sweeps = [(r, v, sw) for r in results["shapes"] for v, sw in r.get("sweep", {}).items()]
    if sweeps:
        lines += ["", "Block shapes (warps a block x K split), us per call (device time with --cupti, else wall): "
                  "the fastest, each rule's pick, and the cost model's fastest (quantized_gemv.estimate):", "",
                  "| shape | rows | version | fastest | wave | balanced | model's pick | all |",
                  "|---|---:|---|---|---|---|---|---|"]
        for r, v, sw in sweeps:
            us = sw["device_us"] if sw["ranked_by"] == "device" else sw["us"]
            model = min(sw["model_us"], key=sw["model_us"].get)
            lines.append(f"| {r['shape']} | {r['rows']} | {v} | {sw['best']} {us[sw['best']]:.1f} | "
                         f"{sw['picks']['wave']} {us[sw['picks']['wave']]:.1f} | "
                         f"{sw['picks']['balanced']} {us[sw['picks']['balanced']]:.1f} | {model} {us[model]:.1f} | "
                         + " ".join(f"{key} {t:.1f}" for key, t in us.items()) + " |")
    lines += ["", "One Qwen3-8B decode step's quantized matmuls (36 layers + head), from the rows above:", "",
              "| rows | side | ms (wall) | tok/s bound | ms (device) |", "|---:|---|---:|---:|---:|"]
    for rows in sorted({r["rows"] for r in results["shapes"]}):
        got = [r for r in results["shapes"] if r["rows"] == rows]
        if {r["shape"] for r in got} != set(PER_STEP):
            continue
        for side in ("amlx", "mlx", *extra):
            if all(side in r for r in got):
                t = sum(PER_STEP[r["shape"]] * r[side]["us"] for r in got) / 1e3
                dev = (f"{sum(PER_STEP[r['shape']] * r[side]['device_us'] for r in got) / 1e3:.2f}"
                       if all("device_us" in r[side] for r in got) else "–")
                lines.append(f"| {rows} | {side} | {t:.2f} | {1e3 / t:,.0f} | {dev} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
