"""KV memory of a long Gemma-3 row: the windowed layers' own pool against one pool of every layer.

    python benchmarks/window_pool.py                               # CPU: a small Gemma-3-patterned checkpoint
    python benchmarks/window_pool.py --preset gemma3-1b --prompt 8000 --tokens 256   # GPU (random weights)

One request of `--prompt` random tokens generating `--tokens`; while it streams, the
engine's `stats()["kv_cache"]` is read after every token. Reported: the most blocks the
row held in the full-attention layers' pool (`blocks_used`) and in the windowed layers'
own pool (`window_blocks_used`), both pools' arrays (blocks allocated), and the KV bytes
held and allocated against what one pool of every layer (the layout before the split)
would have held for the same blocks. (docs/architecture.md, "KV block pool and prefix cache".)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def _checkpoint(args, root: Path) -> Path:
    if args.model:
        return Path(args.model)
    if args.preset:
        from checkpoints import write_benchmark_checkpoint

        return write_benchmark_checkpoint(root / args.preset, args.preset)
    from tests.helpers.checkpoints import make_checkpoint

    # five windowed layers to one, as Gemma 3's releases; a window of 512 as Gemma-3-1B's
    return make_checkpoint(root / "gemma3-small", "gemma3_text", seed=3, sliding_window=512, num_hidden_layers=12,
                           max_position_embeddings=16384,
                           layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 2)


async def measure(path: Path, prompt: int, tokens: int) -> dict:
    import amlx

    async with await amlx.load(path) as model:
        kv = model.engine.scheduler.shards[0].kv
        if kv.local is None:
            raise SystemExit("this model has no windowed layers' pool of their own")
        ids = [int(x) for x in np.random.default_rng(0).integers(10, 200, prompt)]
        peak: dict[str, int] = {}
        start, n = time.perf_counter(), 0
        async for _ in model.generate(ids, max_tokens=tokens):
            n += 1
            counts = model.stats()["kv_cache"]
            for key in ("blocks_used", "window_blocks_used"):
                peak[key] = max(peak.get(key, 0), counts[key])
        counts = model.stats()["kv_cache"]
        full_b, local_b = kv.pool.bytes_per_block(), kv.local.bytes_per_block()
    held_one = peak["blocks_used"] * (full_b + local_b)
    held_split = peak["blocks_used"] * full_b + peak["window_blocks_used"] * local_b
    alloc_one = counts["blocks_allocated"] * (full_b + local_b)
    alloc_split = counts["blocks_allocated"] * full_b + counts["window_blocks_allocated"] * local_b
    return {"prompt": prompt, "tokens": n, "seconds": round(time.perf_counter() - start, 2),
            "window": kv.window, "windowed_layers": sum(kv.layer_local), "layers": len(kv.layer_local),
            "peak_blocks_full_pool": peak["blocks_used"], "peak_blocks_window_pool": peak["window_blocks_used"],
            "allocated_full_pool": counts["blocks_allocated"],
            "allocated_window_pool": counts["window_blocks_allocated"],
            "held_mib_one_pool": round(held_one / 2**20, 2), "held_mib_split": round(held_split / 2**20, 2),
            "held_ratio": round(held_split / held_one, 3),
            "allocated_mib_one_pool": round(alloc_one / 2**20, 2), "allocated_mib_split": round(alloc_split / 2**20, 2),
            "allocated_ratio": round(alloc_split / alloc_one, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint directory")
    ap.add_argument("--preset", default=None, help="a benchmarks/checkpoints.py Gemma 3 shape (random weights)")
    ap.add_argument("--prompt", type=int, default=3000)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        row = asyncio.run(measure(_checkpoint(args, Path(tmp)), args.prompt, args.tokens))
    print(json.dumps(row, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
