"""kv_bits at a long context: decode speed, KV memory, and the logit error of a
quantized KV cache (kv_bits=8 / 4) against the full-precision one.

    python benchmarks/kv_bits.py --out DIR            # GPU: Qwen3-0.6B shape, bf16, 4 streams of 32k tokens
    python benchmarks/kv_bits.py --small              # CPU-sized: the tests' tiny Qwen3, 2 streams of 1k

For each kv_bits (none = the activations' precision, 8, 4):

1. Speed and memory, through the engine (`amlx.load(kv_bits=...)`): `--streams`
   requests of `--context` random tokens start together (greedy, `--steps`
   tokens each). Decode tok/s of the whole batch over the window in which every
   stream has its first token and none has finished (mean over the window, and
   from the median step time of stream 0); KV pool bytes (the blocks the pool
   holds, times bytes per block); peak MLX memory of load plus run (weights
   included). With `--gather`, kv_bits 8 and 4 run again with the CUDA decode
   kernel fed gathered, dequantized keys (what ran before the kernel read a
   quantized pool itself: amlx.kv.paged.QUANTIZED_KERNEL off).
2. Logit error (on the engine's worker, model level, one row): a prompt of
   `--context` tokens prefilled into a block pool of each kv_bits in chunks,
   then `--error-steps` decode steps fed the same tokens; the logits of every
   step against the full-precision pool's: max |error| / max |logit|, mean
   |error| / mean |logit|, and how often the top token agrees.

The checkpoint has random weights (benchmarks/checkpoints.py: real shapes, no
download), so the logit error is that of an untrained model, whose logits move
more for a small change of keys and values than a trained model's (see
tests/test_kv_bits.py); speed and memory depend on shapes only. `--model PATH`
takes a real checkpoint instead.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import amlx  # noqa: E402
from amlx._mlx import array, float32, ops  # noqa: E402
from amlx._mlx import memory as mlx_memory  # noqa: E402
from amlx.kv import BlockPool, ShardKV, layer_views, paged, written  # noqa: E402

BITS = [None, 8, 4]


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(10, min(vocab, 30000), length)] for _ in range(n)]


async def _decode_run(model, prompts: list[list[int]], steps: int) -> dict:
    """All prompts at once; token arrival times per stream."""
    times: list[list[float]] = [[] for _ in prompts]

    async def one(i: int, p: list[int]) -> None:
        async for _ in model.generate(p, max_tokens=steps, max_buffer=steps):
            times[i].append(time.perf_counter())

    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    all_started = max(t[0] for t in times)
    first_done = min(t[-1] for t in times)
    window = [x for t in times for x in t if all_started < x <= first_done]
    span = first_done - all_started
    mine = np.diff([x for x in times[0] if all_started <= x <= first_done])
    return {"tokens": sum(len(t) for t in times), "seconds": time.perf_counter() - start,
            "prefill_s": all_started - start, "window_tokens": len(window),
            "decode_tps": len(window) / span if span > 0 else float("nan"),
            "median_step_tps": len(prompts) / float(np.median(mine)) if len(mine) else float("nan")}


def speed(path: Path, bits: int | None, streams: int, context: int, steps: int, quantized_kernel: bool) -> dict:
    paged.QUANTIZED_KERNEL = quantized_kernel  # read when the decode step is traced
    gc.collect()
    mlx_memory.reset_peak()
    before = amlx.memory()["active"]
    model = amlx.load_sync(path, max_batch_size=streams, kv_bits=bits, prefix_cache=False,
                           max_context=context + steps + 16)
    try:
        vocab = model.tokenizer.vocab_size
        model.complete_sync(_prompts(1, 64, vocab, 0)[0], max_tokens=8)  # warm-up: first traces
        out = asyncio.run(_decode_run(model, _prompts(streams, context, vocab, 1), steps))
        sched = model.engine.scheduler
        counters = sched.kv_counters()
        out["block_bytes"] = sched.block_bytes()
        out["pool_bytes"] = counters["blocks_allocated"] * out["block_bytes"]
        out["kv_bytes_needed"] = streams * -(-(context + steps) // counters["block_size"]) * out["block_bytes"]
        out["peak_bytes"] = amlx.memory()["peak"] - before
        out["decode_kernel"] = bool(sched.options.decode_kernel)
    finally:
        model.close()
        paged.QUANTIZED_KERNEL = True
    return out


def _logits(lm, bits: int | None, ids: list[int], context: int, chunk: int) -> np.ndarray:
    """(steps, V) float32 logits of decode steps after a prefill of ids[:context]
    through a block pool quantized with `bits` (the engine's worker thread)."""
    layout, dtype = lm.kv_layout(), lm.activation_dtype()
    bs = 16
    n_blocks = -(-len(ids) // bs) + 1
    pool = BlockPool(layout, dtype, bs, n_blocks, prefix_cache=False, initial_blocks=n_blocks, bits=bits)
    windows = {w for w in lm.windows() if w}
    kv = ShardKV(pool, 1, windows.pop() if len(windows) == 1 else None)
    row = SimpleNamespace(blocks=pool.allocate(n_blocks - 1), pos=0, created=0.0)
    out = []
    try:
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            views = layer_views(pool.arrays, kv.prefill_tables([row], start, n, [start + n]), lm.windows(), bits,
                                pool.group)
            y = lm(array(np.asarray([ids[start:start + n]], np.int32)), views, start,
                   array(np.asarray([n - 1], np.int32)))
            pool.arrays = written(views)
            ops.eval(y, *pool.arrays)
        for t in range(context, len(ids)):
            row.pos = t
            views = layer_views(pool.arrays, kv.decode_tables([row]), lm.windows(), bits, pool.group)
            y = lm(array(np.asarray([[ids[t]]], np.int32)), views, array(np.asarray([t], np.int32)))
            pool.arrays = written(views)
            ops.eval(y, *pool.arrays)
            out.append(np.asarray(y.astype(float32).numpy()[0, 0], np.float32))
        return np.stack(out)
    finally:
        kv.close()


def logit_error(path: Path, context: int, steps: int, chunk: int) -> dict:
    model = amlx.load_sync(path, max_batch_size=1, prefix_cache=False, max_context=context + steps + 16)
    try:
        lm = model.engine.model
        ids = _prompts(1, context + steps, model.tokenizer.vocab_size, 7)[0]
        full = model.engine.run_sync(lambda: _logits(lm, None, ids, context, chunk)).astype(np.float64)
        out = {}
        for bits in BITS[1:]:
            got = model.engine.run_sync(lambda bits=bits: _logits(lm, bits, ids, context, chunk)).astype(np.float64)
            err = np.abs(got - full)
            out[bits] = {"max_rel": float(err.max() / np.abs(full).max()),
                         "mean_rel": float(err.mean() / np.abs(full).mean()),
                         "top1_agree": float(np.mean(got.argmax(-1) == full.argmax(-1))),
                         "logit_abs_max": float(np.abs(full).max())}
        return out
    finally:
        model.close()


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-0.6b", help="a shape of benchmarks/checkpoints.py (GPU)")
    ap.add_argument("--model", type=Path, help="a checkpoint directory instead of --preset")
    ap.add_argument("--small", action="store_true", help="CPU-sized: the tests' tiny Qwen3 (head dim 64)")
    ap.add_argument("--context", type=int)
    ap.add_argument("--streams", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--error-steps", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk of the logit-error runs")
    ap.add_argument("--gather", action="store_true", help="also kv_bits 8/4 with the kernel fed gathered keys")
    ap.add_argument("--skip-error", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    context = a.context or (1024 if a.small else 32768)
    streams = a.streams or (2 if a.small else 4)
    steps = a.steps or (32 if a.small else 128)
    with tempfile.TemporaryDirectory() as tmp:
        if a.model:
            path, name = a.model, a.model.name
        elif a.small:
            from tests.helpers.checkpoints import make_checkpoint
            path, name = make_checkpoint(Path(tmp) / "qwen3", "qwen3", seed=3, head_dim=64), "tiny qwen3 (float32)"
        else:
            from checkpoints import write_benchmark_checkpoint
            t = time.perf_counter()
            path, name = write_benchmark_checkpoint(Path(tmp) / a.preset, a.preset), a.preset
            print(f"checkpoint {a.preset} written in {time.perf_counter() - t:.1f} s", flush=True)
        print(f"{name}: {streams} streams x {context} tokens, {steps} decode tokens each", flush=True)
        runs = []

        def run(bits: int | None, kernel: bool) -> None:
            t = time.perf_counter()
            r = speed(path, bits, streams, context, steps, kernel)
            r.update(kv_bits=bits, quantized_kernel=kernel)
            runs.append(r)
            print(json.dumps(r), f"({time.perf_counter() - t:.1f} s)", flush=True)

        for bits in BITS:
            run(bits, True)
        errors = {} if a.skip_error else logit_error(path, context, a.error_steps, a.chunk)
        for bits, e in errors.items():
            print(f"kv_bits={bits}: logit error max {e['max_rel']:.4f}, mean {e['mean_rel']:.4f} (of |logit|), "
                  f"top-1 agreement {e['top1_agree']:.3f} over {a.error_steps} steps after {context} tokens",
                  flush=True)
        if a.gather:  # last: the comparison with the path before, the first thing to go when time is short
            for bits in BITS[1:]:
                run(bits, False)
    base = runs[0]
    lines = [f"## kv_bits: {name}, {streams} streams x {context} tokens, {steps} tokens each", "",
             "| kv_bits | decode attention reads | decode tok/s (window) | tok/s (median step) | KV pool MB "
             "| KV needed MB | peak MB | max logit err | mean logit err | top-1 agree |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        e = errors.get(r["kv_bits"], {})
        if not r["decode_kernel"]:
            reads = "gathered (no CUDA kernel)"
        elif not r["kv_bits"]:
            reads = "kernel: pool"
        else:
            reads = "kernel: quantized pool" if r["quantized_kernel"] else "kernel: gathered, dequantized"
        lines.append(f"| {r['kv_bits'] or 'none'} | {reads} | {r['decode_tps']:.0f} "
                     f"({r['decode_tps'] / base['decode_tps']:.2f}x) | {r['median_step_tps']:.0f} | "
                     f"{_mb(r['pool_bytes'])} ({r['pool_bytes'] / base['pool_bytes']:.2f}x) | "
                     f"{_mb(r['kv_bytes_needed'])} | {_mb(r['peak_bytes'])} | "
                     f"{e.get('max_rel', 0):.4f} | {e.get('mean_rel', 0):.4f} | {e.get('top1_agree', 1):.3f} |")
    table = "\n".join(lines)
    print(table, flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "kv_bits.json").write_text(json.dumps({"model": name, "context": context, "streams": streams,
                                                        "steps": steps, "runs": runs,
                                                        "logit_error": {str(k): v for k, v in errors.items()}},
                                                       indent=1))
        (a.out / "kv_bits.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
