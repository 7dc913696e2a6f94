"""What a constrained batch's token masks cost one sampling step, host and device.

For B rows of logits over a V-token vocabulary (default: 64 x Qwen3's 151,936), each way of
sampling one step runs --steps times:
  free      the compiled sampling step, no masks (an unconstrained batch)
  fused     the masks uploaded packed (B x V/32 int32 words) and applied inside the compiled
            step (what the engine does)
  eager     the masks applied by separate ops before the compiled step (the engine before)
and reports milliseconds per step:
  host      building the step and launching it (async_eval), no waiting
  synced    built, launched and waited for, one step at a time (host + device, no overlap)
The masks change every step (random, about a third of the tokens allowed), as they do in
decoding; rows are greedy (the benchmark's setting) unless --temperature.

    python benchmarks/mask_cost.py [--rows 64] [--vocab 151936] [--steps 50] [--device gpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _masks(rng, rows: int, vocab: int) -> np.ndarray:
    words = (vocab + 31) // 32
    allowed = rng.random((rows, words * 32)) < 0.3
    return np.packbits(allowed, axis=1, bitorder="little").view(np.int32)


def measure(rows: int, vocab: int, steps: int, temperature: float, device: str) -> dict:
    from amlx._mlx import array, device as mxdevice, ops
    from amlx._mlx import bfloat16
    from amlx.constrain import masked_logits
    from amlx.sample import BatchSampling, CompiledSteps, RowSampling
    from amlx.types import GenerationOptions

    stream = mxdevice.new_stream(device)
    rng = np.random.default_rng(0)
    out = {}
    with mxdevice.on_stream(stream):
        logits = array(rng.standard_normal((rows, vocab)).astype(np.float32)).astype(bfloat16)
        ops.eval(logits)
        opts = GenerationOptions(temperature=temperature)
        steps_cache = CompiledSteps()
        batch = BatchSampling([RowSampling(opts, [1, 2, 3]) for _ in range(rows)], steps_cache)
        packed = [_masks(rng, rows, vocab) for _ in range(8)]

        def one(kind: str, i: int):
            if kind == "free":
                return batch(logits)
            if kind == "fused":
                return batch(logits, masks=packed[i % len(packed)])
            return batch(masked_logits(logits, packed[i % len(packed)]))

        for kind in ("free", "fused", "eager"):
            for i in range(5):  # warm-up: trace, compile kernels
                s = one(kind, i)
                ops.eval(*s.arrays(), *batch.state())
            host = 0.0
            t0 = time.perf_counter()
            for i in range(steps):
                h0 = time.perf_counter()
                s = one(kind, i)
                ops.async_eval(*s.arrays(), *batch.state())
                host += time.perf_counter() - h0
                s.read()
            synced = time.perf_counter() - t0
            out[kind] = {"host_ms": round(1000 * host / steps, 3), "synced_ms": round(1000 * synced / steps, 3)}
            print(kind, out[kind], flush=True)
        batch.close()
        steps_cache.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--device", default=None, help="gpu or cpu (default: gpu where MLX has one)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    from amlx._mlx import device as mxdevice

    device = args.device or ("gpu" if mxdevice.gpu_available() else "cpu")
    result = {"rows": args.rows, "vocab": args.vocab, "device": device,
              **measure(args.rows, args.vocab, args.steps, args.temperature, device)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
