"""Where a cached request's device time goes: the extend pass behind a cached prefix (issue 15).

A request of `--prefix` tokens is cached, then `--requests` requests of that prefix plus 16
new tokens each (max_tokens=1, so each is one extend pass and its first token) run with CUPTI
(torch.profiler) recording every CUDA kernel. Per request: wall ms, the kernels' device ms,
and each kernel's launches and device us. `--uncached` profiles requests without the cached
prefix beside them (a full prefill of the same length) for comparison.

    python benchmarks/extend_profile.py /tmp/ck/qwen3-8b [--prefix 2000] [--requests 4] [--serial]

`--serial` turns MLX's CUDA graphs off (MLX_USE_CUDA_GRAPHS=0), so that each kernel's time is
its own rather than stretched by kernels running beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernel_profile import kernel_rows  # noqa: E402


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(1000, 30000, size=n).tolist()


def profile(path: str, prefix: int, requests: int, uncached: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as record

    import amlx

    model = amlx.load_sync(path, max_batch_size=4)
    rng = np.random.default_rng(0)
    try:
        head = _tokens(rng, prefix)
        model.complete_sync(head, max_tokens=1)
        for _ in range(3):  # compiles the extend pass's shape and warms its kernels
            model.complete_sync(head + _tokens(rng, 16), max_tokens=1)
        prompts = [(head if not uncached else _tokens(rng, prefix)) + _tokens(rng, 16) for _ in range(requests)]
        if uncached:
            model.complete_sync(_tokens(rng, prefix + 16), max_tokens=1)  # the full prefill's shape
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.init()
        prof = record(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
        walls, cached = [], []
        prof.start()
        for p in prompts:
            start = time.perf_counter()
            result = model.complete_sync(p, max_tokens=1)
            walls.append(time.perf_counter() - start)
            cached.append(result.usage.cached_tokens)
        prof.stop()
    finally:
        model.close()
    rows = kernel_rows(prof, requests)
    return {"uncached": uncached, "wall_ms": [round(w * 1e3, 2) for w in walls], "cached_tokens": cached,
            "busy_ms": round(sum(r["us"] for r in rows) / 1e3, 3), "kernels": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory (benchmarks/checkpoints.py writes one)")
    ap.add_argument("--prefix", type=int, default=2000, help="cached prefix tokens (default 2000)")
    ap.add_argument("--requests", type=int, default=4, help="requests recorded (default 4)")
    ap.add_argument("--top", type=int, default=15, help="kernels listed (default 15)")
    ap.add_argument("--uncached", action="store_true", help="also profile uncached requests of the same length")
    ap.add_argument("--serial", action="store_true", help="MLX_USE_CUDA_GRAPHS=0 (each kernel's own time)")
    args = ap.parse_args(argv)
    if args.serial:
        os.environ["MLX_USE_CUDA_GRAPHS"] = "0"  # (read when MLX's CUDA backend starts: before amlx loads)
    results = [profile(args.checkpoint, args.prefix, args.requests, False)]
    if args.uncached:
        results.append(profile(args.checkpoint, args.prefix, args.requests, True))
    for r in results:
        kind = "uncached" if r["uncached"] else "cached"
        print(f"\n{kind}: wall ms {r['wall_ms']}, cached tokens {r['cached_tokens']}, "
              f"kernels' device ms a request {r['busy_ms']}")
        print("| kernel | launches | device us |\n|---|---:|---:|")
        for k in r["kernels"][:args.top]:
            print(f"| `{k['kernel'][:70]}` | {k['launches']:.1f} | {k['us']:.1f} |")
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
