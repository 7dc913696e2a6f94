"""Where a decode step's time goes: host work against device work.

For batch sizes 1, 16 and 64 on one checkpoint it times, per decode step of the
engine's own compiled step (amlx.engine.scheduler):
  nodes   primitives MLX evaluates per step (after compile's fusion)
  host    building and launching the step, split into
          call (replaying the compiled graph), sample (sampling ops) and
          launch (async_eval: MLX walks the graph and queues the kernels)
  sync    a step launched and waited for at once (host + device, no overlap)
  piped   steady-state time per step with the next step launched before reading
          the current one (what the engine does)
device time is about sync - host; piped close to max(host, device) means the
overlap works. --compare-kernel runs each batch size with the CUDA
decode-attention kernel (amlx.models.decode_attention) on and off.

    python benchmarks/profile_step.py [--model qwen3-0.6b] [--steps 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoints import write_benchmark_checkpoint  # noqa: E402


def _rows_in_pool(model, sched, batch: int):
    """A batch of rows with 128 positions each in the first shard's KV block pool
    (amlx.kv; contents do not matter for timing): (the shard's ShardKV, the rows)."""
    from amlx._mlx import array
    from amlx.kv import written

    kv = sched.shards[0].kv
    vocab = model.tokenizer.vocab_size
    prompt = np.random.default_rng(0).integers(vocab // 4, vocab // 2, size=(batch, 128)).astype(np.int32)
    reqs = [SimpleNamespace(blocks=kv.pool.allocate(128 // kv.block_size), pos=128, created=0.0) for _ in range(batch)]
    views = sched.pools.views(0, kv.prefill_tables(reqs, 0, 128, [128] * batch))
    model.engine.model(array(prompt), views, 0, last=array(np.full(batch, 127, np.int32)))
    kv.pool.arrays = written(views)
    return kv, reqs


def profile(model, batch: int, steps: int) -> dict:
    from amlx._mlx import array, ops
    from amlx.sample import BatchSampling, RowSampling
    from amlx.engine.scheduler import Scheduler
    from amlx.types import GenerationOptions

    sched = Scheduler(model.engine.model, batch, lambda: None, shards=1)
    kv, reqs = _rows_in_pool(model, sched, batch)
    opts = GenerationOptions()
    rows = [RowSampling(opts, []) for _ in range(batch)]
    sampling = BatchSampling(rows)
    pos = 128

    split = {"call": [], "sample": [], "launch": []}
    nodes = [0]
    kinds = [{}]

    def launch(tokens, count=False):
        nonlocal pos
        t0 = time.perf_counter()
        for r in reqs:
            r.pos = pos
        kv.extend(reqs)
        tables = kv.decode_tables(reqs)
        logits, state = sched._batched_logits(tokens, array(np.full(batch, pos, np.int32)), tables, kv.pool.arrays)
        kv.pool.arrays = state
        t1 = time.perf_counter()
        new, lps = sampling(logits)[:2]
        outs = [new, lps, *sampling.state(), *kv.pool.state()]
        if count:
            nodes[0], kinds[0] = ops.graph_summary(*outs)
        t2 = time.perf_counter()
        ops.async_eval(*outs)
        t3 = time.perf_counter()
        for k, v in zip(split, (t1 - t0, t2 - t1, t3 - t2)):
            split[k].append(v)
        pos += 1
        return new

    first = array(np.zeros((batch, 1), np.int32))
    sched.model.prepare()
    for _ in range(8):  # warm-up: trace and compile
        launch(first).tolist()
    launch(first, count=True).tolist()
    for v in split.values():
        v.clear()
    host, sync = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        new = launch(first)
        t1 = time.perf_counter()
        new.tolist()
        t2 = time.perf_counter()
        host.append(t1 - t0)
        sync.append(t2 - t0)
    parts = {k: 1e3 * float(np.median(v)) for k, v in split.items()}
    prev = launch(first)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = launch(ops.reshape(prev, (batch, 1)))
        prev.tolist()
        prev = nxt
    prev.tolist()
    piped = (time.perf_counter() - t0) / steps
    sampling.close()
    kv.close()
    if sched._step_fn is not None:
        sched._step_fn.close()
    return {"batch": batch, "nodes": nodes[0], "kinds": kinds[0], **{f"{k}_ms": v for k, v in parts.items()},
            "host_ms": 1e3 * float(np.median(host)), "sync_ms": 1e3 * float(np.median(sync)),
            "device_ms": 1e3 * float(np.median(sync) - np.median(host)), "piped_ms": 1e3 * piped,
            "piped_tok_s": batch / piped}


def prefill_speed(model, length: int, repeats: int = 5) -> dict:
    """One prompt of `length` tokens through the model in one chunk, as the engine prefills."""
    from amlx._mlx import array, ops

    lm = model.engine.model
    vocab = model.tokenizer.vocab_size
    ids = array(np.random.default_rng(1).integers(vocab // 4, vocab // 2, size=(1, length)).astype(np.int32))
    last = array(np.asarray([length - 1], np.int32))
    times, nodes = [], 0
    for i in range(repeats + 1):
        cache = lm.make_cache()
        t0 = time.perf_counter()
        out = lm(ids, cache, 0, last=last)
        if i == 0:
            nodes = ops.graph_summary(out, *[a for c in cache for a in c.state()])[0]
        ops.eval(out, *[a for c in cache for a in c.state()])
        if i:
            times.append(time.perf_counter() - t0)
        for c in cache:
            c.close()
    t = float(np.median(times))
    return {"ms": 1e3 * t, "tok_s": length / t, "nodes": nodes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=2048, help="also time a prompt of this length (0: skip)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per batch size; the fastest is shown")
    ap.add_argument("--kinds", action="store_true", help="also list the step's nodes by primitive")
    ap.add_argument("--compare-kernel", action="store_true",
                    help="each batch size with the CUDA decode-attention kernel on and off (AMLX_DECODE_KERNEL)")
    args = ap.parse_args(argv)
    import amlx

    with tempfile.TemporaryDirectory() as tmp:
        path = write_benchmark_checkpoint(Path(tmp) / args.model, args.model)
        model = amlx.load_sync(path)
        try:
            print(f"{args.model} on {model.info.device}")
            print("| batch | nodes | call ms | sample ms | launch ms | host ms | sync ms | device ms (≈) | "
                  "pipelined ms | pipelined tok/s |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            settings = ["1", "0"] if args.compare_kernel else [os.environ.get("AMLX_DECODE_KERNEL", "1")]
            for b in args.batches:
                best: dict[str, dict] = {}
                for _ in range(args.repeats):  # alternating, so drifts of a shared host hit both alike
                    for k in settings:
                        os.environ["AMLX_DECODE_KERNEL"] = k  # read once, when profile() builds its Scheduler
                        r = model.engine.run_sync(lambda b=b: profile(model, b, args.steps))
                        if k not in best or r["piped_ms"] < best[k]["piped_ms"]:
                            best[k] = r
                for k in settings:
                    r = best[k]
                    label = f"{b} (kernel {'on' if k == '1' else 'off'})" if args.compare_kernel else str(b)
                    print(f"| {label} | {r['nodes']} | {r['call_ms']:.2f} | {r['sample_ms']:.2f} | "
                          f"{r['launch_ms']:.2f} | {r['host_ms']:.2f} | {r['sync_ms']:.2f} | {r['device_ms']:.2f} | "
                          f"{r['piped_ms']:.2f} | {r['piped_tok_s']:.0f} |", flush=True)
                    if args.kinds:
                        print("   nodes by primitive:", ", ".join(f"{n} {c}" for n, c in sorted(
                            r["kinds"].items(), key=lambda kv: -kv[1])), flush=True)
            if args.prefill:
                r = model.engine.run_sync(lambda: prefill_speed(model, args.prefill))
                print(f"prefill {args.prefill} tokens: {r['ms']:.1f} ms, {r['tok_s']:.0f} tok/s, "
                      f"{r['nodes']} nodes", flush=True)
        finally:
            model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
