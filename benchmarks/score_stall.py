"""How long a stream decoding beside a `score` call waits for its next token.

    python benchmarks/score_stall.py [--model qwen3-tiny] [--prompt 4000] [--continuations 8]

One stream decodes (greedy, long) while a score call of a `--prompt`-token prompt and
`--continuations` two-token continuations runs, twice: as one worker job (what `score` was
before it ran in steps: `engine.run(score_continuations(...))`) and through `model.score` (a
prefill chunk or a batch of continuations a job). Reported for each: the score call's wall
time and the stream's longest gap between two tokens while it ran (ms), best of `--repeats`
(the least gap, the least wall time). Checkpoints: `benchmarks/checkpoints.py` presets.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import anyio
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from checkpoints import MODELS, write_benchmark_checkpoint  # noqa: E402


async def _one(model, way: str, prompt: list[int], conts: list[list[int]]) -> tuple[float, float]:
    """(score wall s, longest token gap s during it) for one score call beside one stream."""
    from amlx.engine.score import score_continuations

    engine = model.engine
    stamps: list[float] = []
    spans: list[float] = []
    started = anyio.Event()

    async def stream() -> None:
        async for _ in model.generate([5, 6, 7], max_tokens=60_000, max_buffer=65_536):
            stamps.append(time.perf_counter())
            if len(stamps) == 20:
                started.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stream)
        await started.wait()
        t0 = time.perf_counter()
        if way == "one job":
            chunk = engine.scheduler.prefill_chunk
            await engine.run(lambda: score_continuations(engine.model, prompt, conts, chunk=chunk))
        else:
            await model.score(prompt, conts)
        t1 = time.perf_counter()
        spans.append(t1 - t0)
        await anyio.sleep(0.05)  # a token or two after the call
        tg.cancel_scope.cancel()
    during = [b - a for a, b in zip(stamps, stamps[1:]) if b > t0 and a < t1]
    return spans[0], max(during) if during else t1 - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-tiny", choices=sorted(MODELS))
    ap.add_argument("--prompt", type=int, default=4000, help="prompt tokens scored (default 4000)")
    ap.add_argument("--continuations", type=int, default=8, help="two-token continuations (default 8)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import amlx

    with tempfile.TemporaryDirectory() as tmp:
        path = write_benchmark_checkpoint(Path(tmp) / a.model, a.model)
        rng = np.random.default_rng(0)

        async def body() -> dict:
            async with await amlx.load(path, max_context=a.prompt + 64) as model:
                vocab = model.engine.vocab_size
                prompt = rng.integers(3, min(vocab, 30000), size=a.prompt).tolist()
                conts = [rng.integers(3, min(vocab, 30000), size=2).tolist() for _ in range(a.continuations)]
                await model.score(prompt[:64], conts)  # warm
                out: dict = {}
                for _ in range(a.repeats):
                    for way in ("one job", "steps"):
                        wall, gap = await _one(model, way, prompt, conts)
                        best = out.setdefault(way, {"score_ms": 1e30, "longest_gap_ms": 1e30})
                        best["score_ms"] = min(best["score_ms"], round(wall * 1e3, 1))
                        best["longest_gap_ms"] = min(best["longest_gap_ms"], round(gap * 1e3, 1))
                return out

        print(json.dumps({"model": a.model, "prompt": a.prompt, "continuations": a.continuations,
                          **anyio.run(body)}, indent=1))


if __name__ == "__main__":
    main()
