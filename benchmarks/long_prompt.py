"""One long prompt in a busy batch (issue 12.3): aggregate tokens/s of N
streams before, while and after one long request runs, the longest pause a
running stream sees meanwhile, and prefill time by prompt length.

    python benchmarks/long_prompt.py [--streams 12] [--long 1500] [--prefill 512 2048 4096] [--phase 3]

Checkpoint: the tiny random Qwen3 of the tests (tests/helpers/checkpoints.py),
float32. Streams are greedy; one that ends (EOS or max_tokens) is replaced at
once, so N stay running. Phases: `--phase` seconds before the long request;
while it is in flight (prefill and its 8 tokens); `--phase` seconds after it
ended. Prefill time: `complete(ids, max_tokens=1)` of a prompt alone.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import amlx  # noqa: E402
from tests.helpers.checkpoints import make_checkpoint  # noqa: E402


class Load:
    """N streams kept running; token arrival times, and the longest gap of stream 0."""

    def __init__(self, model, n: int, vocab: int):
        self.model, self.n, self.vocab = model, n, vocab
        self.times: list[float] = []
        self.gaps: list[tuple[float, float]] = []  # (at, gap) of slot 0's tokens
        self.stop = False

    async def slot(self, k: int) -> None:
        rng = np.random.default_rng(k)
        while not self.stop:
            prompt = rng.integers(0, self.vocab, 32).tolist()
            last = time.perf_counter()
            async for _ in self.model.generate(prompt, max_tokens=400):
                now = time.perf_counter()
                self.times.append(now)
                if k == 0:
                    self.gaps.append((now, now - last))
                last = now
                if self.stop:
                    break

    def rate(self, t0: float, t1: float) -> float:
        return sum(1 for t in self.times if t0 <= t < t1) / max(t1 - t0, 1e-9)

    def longest_gap(self, t0: float, t1: float) -> float:
        return max((g for at, g in self.gaps if t0 <= at <= t1 + 5), default=0.0)


async def busy_batch(model, streams: int, long: int, phase: float, vocab: int) -> dict:
    load = Load(model, streams, vocab)
    tasks = [asyncio.create_task(load.slot(k)) for k in range(streams)]
    await asyncio.sleep(phase)  # warm: shapes compiled, batch full
    t0 = time.perf_counter()
    await asyncio.sleep(phase)
    t1 = time.perf_counter()
    prompt = np.random.default_rng(99).integers(0, vocab, long).tolist()
    result = await model.complete(prompt, max_tokens=8)
    t2 = time.perf_counter()
    await asyncio.sleep(0.5)  # its row leaves the batch
    t3 = time.perf_counter()
    await asyncio.sleep(phase)
    t4 = time.perf_counter()
    load.stop = True
    await asyncio.gather(*tasks)
    return {"before": load.rate(t0, t1), "while": load.rate(t1, t2), "after": load.rate(t3, t4),
            "long_s": t2 - t1, "long_first_token_s": result.usage.time_to_first_token
            if hasattr(result.usage, "time_to_first_token") else None,
            "longest_gap_s": load.longest_gap(t1, t2)}


async def prefill_times(model, lengths: list[int], vocab: int) -> dict:
    rng = np.random.default_rng(5)
    await model.complete(rng.integers(0, vocab, 64).tolist(), max_tokens=1)
    out = {}
    for n in lengths:
        prompt = rng.integers(0, vocab, n).tolist()
        t = time.perf_counter()
        await model.complete(prompt, max_tokens=1)
        out[n] = time.perf_counter() - t
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=12)
    ap.add_argument("--long", type=int, default=1500)
    ap.add_argument("--phase", type=float, default=3.0)
    ap.add_argument("--prefill", type=int, nargs="*", default=[512, 2048, 4096])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "qwen3", "qwen3", seed=0)
        async with await amlx.load(path, max_batch_size=args.streams + 1) as model:
            vocab = model.tokenizer.vocab_size
            r = await busy_batch(model, args.streams, args.long, args.phase, vocab)
            print(f"{args.streams} streams, tok/s before {r['before']:.0f}, while a {args.long}-token request "
                  f"{r['while']:.0f} ({r['long_s']:.2f} s), after {r['after']:.0f}; "
                  f"longest pause of a running stream {r['longest_gap_s']:.2f} s", flush=True)
            if args.prefill:
                times = await prefill_times(model, args.prefill, vocab)
                print("prefill alone: " + ", ".join(f"{n} tokens {s:.2f} s" for n, s in times.items()), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
