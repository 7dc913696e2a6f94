"""Peak memory of a group of prompts admitted together (issue 15's 64-stream peak).

    python benchmarks/prefill_memory.py [--preset gemma3-wide] [--streams 64] [--prompt 128]

Writes a random checkpoint of the preset (benchmarks/checkpoints.py), loads it with
max_batch_size = streams, sends `streams` prompts of `prompt` tokens at once (new
prompts, then the same ones again: the second round is served behind their cached
prefix) and prints MLX's memory counters: active after load, the peak of each round
(reset before it), the KV pools' bytes, and the prefill passes' token counts (the
scheduler's `prefill_tokens` timing counter, with AMLX_STEP_TIMING=1).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import write_benchmark_checkpoint  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gemma3-wide")
    ap.add_argument("--path", help="an existing checkpoint instead of a preset")
    ap.add_argument("--root", help="keep the preset's checkpoint in ROOT/PRESET (written once) instead of a temp dir")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--dtype", help="e.g. float32: no 16-bit widening on the CPU (its products run in float32)")
    ap.add_argument("--out")
    args = ap.parse_args()
    import amlx
    from amlx._mlx import memory as mlx_memory

    with tempfile.TemporaryDirectory() as tmp:
        kept = Path(args.root) / args.preset if args.root else None
        if args.path:
            path = Path(args.path)
        elif kept is not None and (kept / "model.safetensors").exists():
            path = kept
        else:
            path = write_benchmark_checkpoint(kept or Path(tmp) / args.preset, args.preset)
        model = amlx.load_sync(path, max_batch_size=args.streams, dtype=args.dtype)
        sched = model.engine.scheduler
        out = {"preset": args.preset, "streams": args.streams, "prompt": args.prompt,
               "active_after_load_mb": amlx.memory()["active"] / 1e6,
               "prefill_chunk": sched.prefill_chunk, "device": str(amlx._mlx.device.default_device()),
               "pass_budget": {"limit": sched.pass_budget.limit, "token_bytes": sched.pass_budget.token_bytes,
                               "row_bytes": sched.pass_budget.row_bytes}}
        vocab = model.tokenizer.vocab_size
        rng = np.random.default_rng(7)
        low = min(1000, vocab // 2)
        prompts = [rng.integers(low, min(vocab, 30000), size=args.prompt).tolist() for _ in range(args.streams)]

        async def run():
            async def one(p):
                return [t async for t in model.generate(p, max_tokens=args.tokens, max_buffer=args.tokens)]
            return await asyncio.gather(*(one(p) for p in prompts))

        rounds = []
        try:
            for name in ("uncached", "cached"):
                before = amlx.memory()["active"]
                mlx_memory.reset_peak()
                sched.timing.forget_peaks()
                groups = dict(sched.timing.counts)
                t = time.perf_counter()
                outs = asyncio.run(run())
                seconds = time.perf_counter() - t
                pool = model.stats()["kv_cache"]["blocks_allocated"] * sched.block_bytes()
                rounds.append({"round": name, "active_before_mb": before / 1e6,
                               "peak_mb": amlx.memory()["peak"] / 1e6, "kv_pool_mb": pool / 1e6,
                               "seconds": round(seconds, 3),
                               "prefill_groups": sched.timing.counts.get("prefill_groups", 0) - groups.get("prefill_groups", 0),
                               "peak_by_phase_mb": {k: round(v / 1e6, 1) for k, v in sched.timing.peak_bytes.items()},
                               "tokens_sum": sum(t.id * (i + 1) for o in outs for i, t in enumerate(o))})
        finally:
            model.close()
        out["rounds"] = rounds
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
