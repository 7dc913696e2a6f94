"""First-request latency of a 4-bit model on MLX's CUDA backend, with and without
the load-time warm-ups: the quantized matmuls' kernels (amlx/models/warmup.py), the
extend pass's, and the first requests' one-time setup (amlx/engine/warm.py).

    python benchmarks/first_request.py --out OUT [--model gemma3-4b-4bit] [--timeout 500]
    python benchmarks/first_request.py --small --out /tmp/fr    # the same steps on a CPU

MLX compiles each multi-row quantized-matmul variant (NVRTC, 20-50 s on an H200)
the first time it runs and caches it in MLX_PTX_CACHE_DIR. Three processes, in order:

  cold      fresh cache dir, AMLX_WARMUP=0: the compiles and the setup land in the requests
  warmup    fresh cache dir, warm-up at load, its variants compiled side by side in
            child processes (parallel=True): the compiles land in the load
  cached    the warmup case's cache dir again: what every later load costs
  (--serial: a fourth, fresh cache dir, the warm-up compiling one variant at a time)
  (--cases picks some of them; --profile: the cached case's first requests under cProfile)

Each process loads the model (max_batch_size 8), warms up unless AMLX_WARMUP=0 (an
explicit call, in case the engine's load does not already: then it finds the kernels
in memory and takes milliseconds), then times one request (a 100-token prompt,
8 tokens: prefill rows reach the 128-row tile), then 4 concurrent requests (20-token
prompts prefilled together: the 32-row tile; decode rows 2-4: the 16-row tile), then
both again, now compiled. Writes first_request.json
and first_request.md into OUT; each process has a timeout, so the script ends.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _prompt(n: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(1000, 30000, size=n).tolist()


def _requests(model, seed: int) -> tuple[float, float]:
    """Seconds for one request, then for 4 concurrent ones."""
    import asyncio

    t0 = time.perf_counter()
    model.complete_sync(_prompt(100, seed), max_tokens=8)
    one = time.perf_counter() - t0

    async def four():
        await asyncio.gather(*(model.complete(_prompt(20, seed + i), max_tokens=16) for i in range(1, 5)))

    t0 = time.perf_counter()
    asyncio.run(four())
    return one, time.perf_counter() - t0


def child(path: str) -> int:
    import amlx
    from amlx.engine.scheduler import PREFILL_CHUNK
    from amlx.models.warmup import needs_warmup, warm_quantized_matmuls

    out: dict = {}
    t0 = time.perf_counter()
    model = amlx.load_sync(path, max_batch_size=8)
    out["load_s"] = time.perf_counter() - t0
    engine = model.engine
    if needs_warmup(engine.model, model.info.device):
        parallel = os.environ.get("AMLX_WARMUP_PARALLEL", "1") == "1"
        report = engine.run_sync(lambda: warm_quantized_matmuls(engine.model, max(8, PREFILL_CHUNK),
                                                                parallel=parallel))
        out["warmup_s"] = report.seconds
        out["compiled"] = [[label, round(s, 1)] for label, s in report.slow]
    if os.environ.get("AMLX_FIRST_PROFILE") == "1":  # (--profile: where the first requests' time goes)
        import cProfile
        import pstats

        # (on the engine's worker, where the MLX work runs; from 3.12 cProfile sees every thread)
        prof = cProfile.Profile()
        engine.run_sync(prof.enable)
        out["first_request_s"], out["first_batch_s"] = _requests(model, 1)
        engine.run_sync(prof.disable)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    else:
        out["first_request_s"], out["first_batch_s"] = _requests(model, 1)
    out["later_request_s"], out["later_batch_s"] = _requests(model, 11)
    model.close()
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def _case(path: Path, cache: Path, warm: bool, timeout: float, parallel: bool = True,
          profile: bool = False) -> dict:
    env = dict(os.environ, MLX_PTX_CACHE_DIR=str(cache), AMLX_WARMUP="1" if warm else "0",
               AMLX_WARMUP_PARALLEL="1" if parallel else "0", AMLX_FIRST_PROFILE="1" if profile else "0")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(path)], env=env,
                              stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]) | {"process_s": wall}
    return {"error": f"exit status {proc.returncode}, no result"}


def _table(results: dict) -> str:
    cols = [("load_s", "load"), ("warmup_s", "warm-up"), ("first_request_s", "1st request"),
            ("first_batch_s", "1st batch of 4"), ("later_request_s", "later request"),
            ("later_batch_s", "later batch of 4")]
    lines = ["| case | " + " | ".join(c for _, c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for case, r in results.items():
        if "error" in r:
            lines.append(f"| {case} | {r['error']} |" + " |" * (len(cols) - 1))
            continue
        lines.append(f"| {case} | " + " | ".join(f"{r[k]:.2f} s" if k in r else "–" for k, _ in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-4b-4bit",
                    help="a benchmarks/checkpoints.py name (the compiles do not depend on the size; a small "
                         "model loads fast)")
    ap.add_argument("--timeout", type=float, default=500,
                    help="seconds for all cases: cold 35%%, warmup 50%%, cached 15%% (a serial case: as warmup; on "
                         "the H200 gemma3-4b-4bit took 139 s cold and 192 s with the warm-up, 2026-12-03), "
                         "of the cases run")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--small", action="store_true", help="qwen3-tiny-4bit, for a CPU")
    ap.add_argument("--serial", action="store_true",
                    help="a fourth case: the warm-up compiling one variant after another in this process")
    ap.add_argument("--profile", action="store_true",
                    help="the cached case's first requests under cProfile: the 25 functions with the most own "
                         "time, on stderr (what the first request still waits for when no kernel compiles)")
    ap.add_argument("--cases", nargs="+", choices=["cold", "warmup", "cached"], default=["cold", "warmup", "cached"],
                    help="the cases to run (default all three; cached needs warmup before it, which fills its "
                         "kernel cache); --timeout is shared among them in the proportions above")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    from checkpoints import write_benchmark_checkpoint

    if "cached" in args.cases and "warmup" not in args.cases:
        ap.error("--cases: cached reuses the kernel cache the warmup case fills; run warmup too")
    name = "qwen3-tiny-4bit" if args.small else args.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_benchmark_checkpoint(Path(tmp) / name, name)
        cases = [("cold", "cold", False, True, 0.35), ("warmup", "warm", True, True, 0.50),
                 ("cached", "warm", True, True, 0.15)]
        cases = [c for c in cases if c[0] in args.cases]
        if args.serial:
            cases.append(("warmup, serial", "serial", True, False, 0.50))
        shares = sum(c[4] for c in cases)
        for case, cache, warm, parallel, share in cases:
            results[case] = _case(path, Path(tmp) / f"ptx-{cache}", warm, share / shares * args.timeout, parallel,
                                  args.profile and case == "cached")
            print(case, json.dumps(results[case]), flush=True)
    table = _table(results)
    (out / "first_request.json").write_text(json.dumps({"model": name, "results": results}, indent=2))
    (out / "first_request.md").write_text(f"{name}, MLX_PTX_CACHE_DIR fresh per case (cached: reused)\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
