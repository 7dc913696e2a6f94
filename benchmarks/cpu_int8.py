"""The CPU's int8 path for quantized decode (AMLX_CPU_INT8) against the float kernels.

    python benchmarks/cpu_int8.py kernels                  # the few-row kernels alone, ms
    python benchmarks/cpu_int8.py accuracy CKPT [CKPT...]  # decode-step logits, int8 vs float
    python benchmarks/cpu_int8.py decode CKPT              # one process's decode / 8-stream tok/s

`kernels` times cpu_kernels.gemv with int8 off and on (one thread, bf16 scales, group 64,
alternating, best of N) on Qwen3-0.6B's projection shapes and its 151,936 x 1024 head.
`accuracy` feeds 24 tokens one cached decode step at a time (one row: the few-row kernels)
through a quantized checkpoint with the float kernels, then with int8, and prints the
relative error (max |a - b| / max |b| of each step's logits) and the argmax agreement.
`decode` is benchmarks/cpu.py's amlx measurement without prefill (which int8 does not
touch); run it in alternating processes with AMLX_CPU_INT8=0 and 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def kernels(repeats: int) -> None:
    from amlx import _mlx as mx
    from amlx._mlx import cpu_kernels as ck
    from amlx._mlx import ops as O

    rng = np.random.default_rng(0)
    ck.set_threads(1)
    print(f"int8 kernels: {ck.int8_isa()}")

    def best(f, n):
        t_best = 1e9
        for _ in range(n):
            t = time.perf_counter()
            mx.eval(f())
            t_best = min(t_best, time.perf_counter() - t)
        return t_best * 1e3

    for bits in (8, 4):
        for n, k in ((3072, 1024), (1024, 3072), (151936, 1024)):
            w = O.astype(mx.array(rng.standard_normal((n, k)).astype(np.float32)), mx.bfloat16)
            wq, s, b = O.quantize(w, 64, bits)
            mx.eval(wq, s, b)
            for m in (1, 4):
                x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
                reps = max(3, repeats // 3) if n > 100_000 else repeats
                t = {False: 1e9, True: 1e9}
                for int8 in (False, True, False, True):
                    t[int8] = min(t[int8], best(lambda: ck.gemv(x, wq, s, b, group_size=64, bits=bits,
                                                                 int8=int8), reps))
                print(f"{bits}-bit {n} x {k}, {m} row(s): float {t[False]:.3f} ms, int8 {t[True]:.3f} ms, "
                      f"{t[False] / t[True]:.2f}x")


def accuracy(paths: list[str]) -> None:
    from amlx.models import cpu_matmul, load_model

    sys.path.insert(0, str(HERE.parent))
    from tests.helpers.decoding import step_logits

    rng = np.random.default_rng(0)
    for path in paths:
        lm = load_model(path)
        try:
            vocab = int(lm.config.get("vocab_size") or 1000)
            ids = [int(i) for i in rng.integers(3, min(vocab, 30000), 24)]
            cpu_matmul.INT8 = False
            want = step_logits(lm.model, ids)
            cpu_matmul.INT8 = True
            got = step_logits(lm.model, ids)
        finally:
            lm.model.close()
        rel = np.abs(got - want).max(-1) / np.abs(want).max(-1)
        agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
        print(f"{path}: rel error median {np.median(rel):.4f}, max {rel.max():.4f}; argmax agreement {agree:.2f}")


def decode(path: str) -> None:
    import amlx

    sys.path.insert(0, str(HERE))
    import cpu

    async def run() -> dict:
        async with await amlx.load(path, device="cpu", max_batch_size=cpu.STREAMS) as model:
            await model.complete(cpu._prompts(1, 8, 9)[0], max_tokens=4)
            dec, agg = [], []
            for r in range(2):
                stamps = []
                async for _ in model.generate(cpu._prompts(1, cpu.DECODE_PROMPT, r)[0], max_tokens=cpu.DECODE_TOKENS):
                    stamps.append(time.perf_counter())
                dec.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
                t = time.perf_counter()
                done = await asyncio.gather(*(model.complete(p, max_tokens=cpu.STREAM_TOKENS)
                                              for p in cpu._prompts(cpu.STREAMS, cpu.DECODE_PROMPT, 200 + r)))
                agg.append(sum(c.usage.completion_tokens for c in done) / (time.perf_counter() - t))
            return {"decode": round(max(dec), 2), "aggregate": round(max(agg), 2)}

    print(json.dumps(asyncio.run(run())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["kernels", "accuracy", "decode"])
    ap.add_argument("paths", nargs="*")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    if args.mode == "kernels":
        kernels(args.repeats)
    elif args.mode == "accuracy":
        accuracy(args.paths)
    else:
        decode(args.paths[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
