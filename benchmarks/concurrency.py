"""Aggregate tokens/s with 1, 4, 16 and 64 concurrent streams: amlx's continuous
batching (each stream an `async for` on one asyncio loop) beside mlx-lm's
`batch_generate`, on the same checkpoint, in the same process, same libmlx.

Each stream gets its own random 32-token prompt and --tokens greedy tokens
(random weights may hit EOS sooner: each side counts the tokens it actually
produced). Aggregate tokens/s = all streams' tokens / wall time from the first
request to the last token, prefill included, after one untimed warm-up run of
the same workload (compiles the shapes). Both sides may decode all streams in
one batch (amlx max_batch_size, mlx-lm completion_batch_size = max streams).

On the CPU, MLX computes on one core per stream (the Linux wheels' BLAS is
single-threaded). mlx-lm uses one stream; amlx splits its batch into one shard
per core, each on a stream of its own, and a lone request's matmuls over all of
them (amlx/engine/scheduler.py), so the ratio grows with the cores.

    python benchmarks/concurrency.py [--model DIR] [--tokens 64] [--streams 1 4 16 64] [--no-mlx-lm]

Without --model the benchmark checkpoint of async_overhead.py is generated in a
temp dir (random Qwen3, hidden 512, 8 layers, float32).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from async_overhead import bench_checkpoint  # noqa: E402


def prompts_for(n: int, ordinary: np.ndarray, length: int = 32, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed + n)
    return [[int(x) for x in rng.choice(ordinary, size=length)] for _ in range(n)]


def bench_amlx(path: Path, streams: list[int], tokens: int, ordinary: np.ndarray) -> dict[int, dict]:
    import amlx

    model = amlx.load_sync(path, max_batch_size=max(streams))
    out = {}
    try:
        for n in streams:
            prompts = prompts_for(n, ordinary)

            async def workload():
                async def one(p):
                    count = 0
                    async for _ in model.generate(p, max_tokens=tokens, max_buffer=tokens):
                        count += 1
                    return count

                t0 = time.perf_counter()
                counts = await asyncio.gather(*(one(p) for p in prompts))
                return sum(counts), time.perf_counter() - t0

            asyncio.run(workload())  # warm-up
            total, seconds = asyncio.run(workload())
            out[n] = {"tokens": total, "seconds": seconds, "tps": total / seconds}
            print(f"  amlx    {n:3d} streams: {total:6d} tokens in {seconds:7.2f} s = {total / seconds:8.1f} tok/s",
                  flush=True)
    finally:
        model.close()
    return out


def bench_mlx_lm(path: Path, streams: list[int], tokens: int, ordinary: np.ndarray) -> dict[int, dict]:
    import mlx.core as mx
    from mlx_lm import batch_generate, load

    model, tokenizer = load(str(path))
    out = {}
    for n in streams:
        prompts = prompts_for(n, ordinary)
        kw = dict(max_tokens=tokens, completion_batch_size=max(streams), return_token_ids=True)
        batch_generate(model, tokenizer, prompts, **kw)  # warm-up
        t0 = time.perf_counter()
        resp = batch_generate(model, tokenizer, prompts, **kw)
        seconds = time.perf_counter() - t0
        total = sum(len(ids) for ids in resp.token_ids)
        out[n] = {"tokens": total, "seconds": seconds, "tps": total / seconds}
        print(f"  mlx-lm  {n:3d} streams: {total:6d} tokens in {seconds:7.2f} s = {total / seconds:8.1f} tok/s",
              flush=True)
    del model
    gc.collect()
    mx.clear_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a generated one)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--no-mlx-lm", action="store_true")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or bench_checkpoint(Path(tmp) / "qwen3-512x8")
        from async_overhead import ordinary_ids
        from amlx.tokenizer import Tokenizer

        ordinary = ordinary_ids(Tokenizer.from_dir(path))
        print(f"checkpoint {path}; {args.tokens} tokens per stream", flush=True)
        amlx_r = bench_amlx(path, args.streams, args.tokens, ordinary)
        mlx_r: dict | None = None
        note = ""
        if args.no_mlx_lm:
            note = "mlx-lm skipped (--no-mlx-lm)"
        else:
            try:
                mlx_r = bench_mlx_lm(path, args.streams, args.tokens, ordinary)
            except Exception as exc:  # noqa: BLE001 - ImportError, or a checkpoint it cannot load
                note = f"mlx-lm column skipped: {type(exc).__name__}: {exc}"

    print()
    print("| streams | amlx tok/s | mlx-lm tok/s | amlx / mlx-lm |")
    print("|--------:|-----------:|-------------:|--------------:|")
    for n in args.streams:
        a = amlx_r[n]["tps"]
        m = mlx_r[n]["tps"] if mlx_r else None
        mcol = "–" if m is None else f"{m:.1f}"
        rcol = "–" if m is None else f"{a / m:.2f}"
        print(f"| {n:7d} | {a:10.1f} | {mcol:>12} | {rcol:>13} |")
    if note:
        print(f"\n{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
