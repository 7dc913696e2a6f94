"""Aggregate decode tokens/s and peak memory of N concurrent streams on the CPU, one
process per measurement (for A/B runs of two checkouts, alternating).

    PYTHONPATH=CHECKOUT python benchmarks/cpu_batch.py MODEL_DIR [--streams 16] [--tokens 32] [--prompt 16]

Each stream gets its own random --prompt-token prompt and decodes --tokens greedy
tokens; all streams start together, after one untimed warm-up of the same workload.
Prints one JSON line: tokens, seconds (first request to last token, prefill included),
tok/s, and MLX's peak memory above the loaded model during the timed run (MLX's
counters, read between runs on the main thread while the engine is idle).
AMLX_SHARDS=1 decodes the batch as one shard (all rows in one matmul per layer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    args = ap.parse_args(argv)

    import amlx
    from amlx._mlx import memory

    model = amlx.load_sync(args.model, device="cpu", max_batch_size=args.streams)
    rng = np.random.default_rng(0)
    # ordinary token ids (the checkpoints' special tokens sit at the top of the vocabulary)
    prompts = [[int(t) for t in rng.integers(1000, 100000, args.prompt)] for _ in range(args.streams)]

    async def workload() -> tuple[int, float]:
        async def one(p):
            count = 0
            async for _ in model.generate(p, max_tokens=args.tokens, max_buffer=args.tokens):
                count += 1
            return count

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return sum(counts), time.perf_counter() - t0

    try:
        asyncio.run(workload())  # warm-up: compiles the shapes, fills the KV pool
        base = memory.active()
        memory.reset_peak()
        total, seconds = asyncio.run(workload())
        peak = memory.peak() - base
    finally:
        model.close()
    print(json.dumps({"streams": args.streams, "tokens": total, "seconds": round(seconds, 2),
                      "tok_s": round(total / seconds, 1), "peak_above_model_mb": round(peak / 2**20)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
