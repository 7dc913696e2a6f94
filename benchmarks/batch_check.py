"""One process runs the sequence bigspeed.py's amlx side runs, to check that it completes:
two single-stream generations of the same prompt (the second served from the prefix cache),
then N concurrent streams of fresh prompts, twice. Prints what each phase produced, or the
error that ended it (the process exits non-zero).

Made for the Gemma-3-27B 4-bit 64-stream failure of 2026-12-03 (an illegal memory access on
the H200, benchmarks/README.md): a checkpoint with the release's shapes and only a few layers
(`checkpoints.py --layers N`) loads and compiles in seconds, and the run can go under
compute-sanitizer (`bash benchmarks/run_gpu.sh shape-check`).

    python benchmarks/batch_check.py CHECKPOINT [--streams 64] [--tokens 32] [--prompt 128]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--streams", type=int, default=64, help="concurrent streams (default 64)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per stream (default 32)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    args = ap.parse_args(argv)
    import amlx

    rng = np.random.default_rng(0)
    model = amlx.load_sync(args.checkpoint, max_batch_size=args.streams)
    try:
        single = rng.integers(1000, 30000, size=args.prompt).tolist()
        for run in (1, 2):
            t0 = time.perf_counter()
            n = len(list(model.generate_sync(single, max_tokens=args.tokens)))
            print(f"single {run}: {n} tokens in {time.perf_counter() - t0:.2f} s", flush=True)

        async def batch(prompts):
            async def one(p):
                return sum([1 async for _ in model.generate(p, max_tokens=args.tokens, max_buffer=args.tokens)])
            return sum(await asyncio.gather(*(one(p) for p in prompts)))

        for run in (1, 2):
            prompts = [rng.integers(1000, 30000, size=args.prompt).tolist() for _ in range(args.streams)]
            t0 = time.perf_counter()
            n = asyncio.run(batch(prompts))
            print(f"{args.streams} streams {run}: {n} tokens in {time.perf_counter() - t0:.2f} s", flush=True)
    except Exception as exc:  # (reported, then the exit status says it failed)
        print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
        return 1
    finally:
        model.close()
    print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
