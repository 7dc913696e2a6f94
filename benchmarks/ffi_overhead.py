"""Per-op host overhead of amlx's array layer against MLX's own Python bindings.

Both run in one process over the same libmlx. The workload is a chain of small
elementwise ops on a tiny array (`x = x * 1.0001 + 0.5`, two ops per step), so
the time is almost all host work: argument conversion, the call into C++,
graph-node creation and wrapping the result. Two numbers per library:

- build: constructing the lazy graph only (the host overhead per op);
- build+eval: the same, then evaluating the result.

Most of that chain's op is MLX making the Python float's scalar array (about 430 of
the op's 718 ns in C++ alone, on a Zen 5), the same work on both sides, so more chains
show the bindings' own share: `x = x * y + y` (arrays only) and `x = -x` (the operators),
`x.reshape(...)`, `exp(x)`, `x.astype(...)`, `sum(x, -1, True)` and `x[None][0]` (which amlx
runs in its C core too: vendor/mlxc/arraytype.c).

Run: python benchmarks/ffi_overhead.py [--ops 1000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout

import mlx.core as mc  # noqa: E402
from amlx import _mlx as mx  # noqa: E402


def chain_amlx(x, steps: int):
    for _ in range(steps):
        x = x * 1.0001 + 0.5
    return x


def chain_mlx(x, steps: int):
    for _ in range(steps):
        x = x * 1.0001 + 0.5
    return x


def chain_arrays(x, y, steps: int):
    for _ in range(steps):
        x = x * y + y
    return x


def chain_negate(x, steps: int):
    for _ in range(2 * steps):
        x = -x
    return x


def chain_reshape(x, steps: int):
    for _ in range(steps):
        x = x.reshape(2, 2).reshape(4)
    return x


def chain_exp(exp, x, steps: int):  # a function op (exp, then its inverse's cost-alike: exp again)
    for _ in range(2 * steps):
        x = exp(x)
    return x


def chain_astype(x, f16, f32, steps: int):
    for _ in range(steps):
        x = x.astype(f16).astype(f32)
    return x


def chain_sum(total, x, steps: int):  # a reduction that keeps the shape: sum over a kept axis
    for _ in range(2 * steps):
        x = total(x, -1, True)
    return x


def chain_index(x, steps: int):  # basic indexing: a new axis, then an int index
    for _ in range(steps):
        x = x[None][0]
    return x


def best_of(fn, repeats: int) -> float:
    """Best wall time of `repeats` runs of fn(), in seconds (gc paused while timing)."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        finally:
            gc.enable()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=1000, help="ops per chain (two per step)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    steps = args.ops // 2
    n_ops = 2 * steps

    start = np.arange(4, dtype=np.float32)
    xa = mx.array(start)
    xm = mc.array(start)
    mx.eval(xa)
    mc.eval(xm)

    def amlx_build():
        chain_amlx(xa, steps)

    def mlx_build():
        chain_mlx(xm, steps)

    def amlx_full():
        mx.eval(chain_amlx(xa, steps))

    def mlx_full():
        mc.eval(chain_mlx(xm, steps))

    ya, ym = mx.array(np.full(4, 1.0001, np.float32)), mc.array(np.full(4, 1.0001, np.float32))
    mx.eval(ya)
    mc.eval(ym)

    # Same answer from both (and a warm-up of every path).
    got = chain_amlx(xa, steps).numpy()
    want = np.array(chain_mlx(xm, steps))
    np.testing.assert_allclose(got, want, rtol=1e-6)

    rows = []
    for label, fa, fm in [("build (host overhead)", amlx_build, mlx_build), ("build + eval", amlx_full, mlx_full),
                          ("build, x * y + y", lambda: chain_arrays(xa, ya, steps), lambda: chain_arrays(xm, ym, steps)),
                          ("build, -x", lambda: chain_negate(xa, steps), lambda: chain_negate(xm, steps)),
                          ("build, x.reshape", lambda: chain_reshape(xa, steps), lambda: chain_reshape(xm, steps)),
                          ("build, exp(x)", lambda: chain_exp(mx.ops.exp, xa, steps),
                           lambda: chain_exp(mc.exp, xm, steps)),
                          ("build, x.astype", lambda: chain_astype(xa, mx.float16, mx.float32, steps),
                           lambda: chain_astype(xm, mc.float16, mc.float32, steps)),
                          ("build, sum(x, -1, True)", lambda: chain_sum(mx.ops.sum, xa, steps),
                           lambda: chain_sum(mc.sum, xm, steps)),
                          ("build, x[None][0]", lambda: chain_index(xa, steps), lambda: chain_index(xm, steps))]:
        # Interleave the two libraries so drift in machine load hits both.
        ta = tm = float("inf")
        for _ in range(3):
            ta = min(ta, best_of(fa, args.repeats))
            tm = min(tm, best_of(fm, args.repeats))
        rows.append((label, ta / n_ops * 1e9, tm / n_ops * 1e9))

    print(f"chain of {n_ops} ops (x = x * 1.0001 + 0.5 on float32[4]), best of {3 * args.repeats}, "
          f"libmlx {mx.version()}, mlx.core {mc.__version__}")
    print(f"{'':24} {'amlx ns/op':>12} {'mlx ns/op':>12} {'amlx/mlx':>10}")
    for label, a, m in rows:
        print(f"{label:24} {a:12.0f} {m:12.0f} {a / m:9.2f}x")


if __name__ == "__main__":
    main()
