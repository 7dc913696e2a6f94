"""The cost side of speculative decoding (issue 17): what a verify pass and a draft step cost
against a plain decode step, and the speedups the cost model then predicts.

For each batch size, on the target's and the draft's KV caches filled to --context positions:
  plain     a decode step (one token per row at per-row positions, compiled as the engine's),
            steps chained on the device as the engine pipelines them: time per step
  verify k  a pass of k + 1 tokens per row through the target plus `amlx.speculative.verify`
            (compiled, greedy rows), waited for: a verify round cannot be pipelined, since the
            next round's inputs depend on what was accepted
  draft     the draft model's decode step, chained (a round's k draft steps are)
and from them `CostModel(verify_cost, draft_cost)` (amlx.speculative.adaptive): the cost of
k draft steps plus one verify pass against k + 1 plain steps, and the speedup
E(alpha, k) / cost(k) at acceptance 0.5, 0.7 and 0.9 for every k (best k marked), with the
draft model and with prompt lookup (draft cost 0).

The verify pass writes its k + 1 positions at one start for every row (the contiguous cache's
prefill write); the block-table verify pass of docs/speculative.md writes per-row positions,
the same amount of work. Random weights: acceptance itself is meaningless here, so it is the
parameter of the table, not a measurement.

    python benchmarks/speculative_cost.py [--target qwen3-8b] [--draft qwen3-0.6b] [--batch 1,8,32]
    python benchmarks/speculative_cost.py --small        # tiny shapes, for a CPU
    (--root DIR keeps the checkpoints there and reuses them: benchmarks/speculative.py's draft
    part writes the same qwen3-8b into /tmp/amlx-spec)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoints import write_benchmark_checkpoint  # noqa: E402

ALPHAS = (0.5, 0.7, 0.9)


def filled_cache(lm, batch: int, context: int):
    """The model's caches with `context` positions of random tokens for every row."""
    from amlx._mlx import array, eval as mx_eval

    cache = lm.make_cache()
    ids = np.random.default_rng(0).integers(100, 20000, size=(batch, context)).astype(np.int32)
    out = lm(array(ids), cache, 0, last=array(np.full(batch, context - 1, np.int32)))
    # room past the context for the steps and verify passes that write there (a write past the
    # capacity is out of bounds for the CUDA decode kernel)
    for c in cache:
        c.reserve(context + 64)
    mx_eval(out, *[c.kv for c in cache])
    return cache


def compiled_pass(lm, windows, start: int | None):
    """A forward as a pure function of arrays, compiled: (tokens, positions, buffers) ->
    (logits, buffers). `start` None: one token per row at per-row positions (a decode
    step); an int: every row's tokens written from there (a verify pass)."""
    from amlx._mlx import transforms
    from amlx.cache import KVCache

    def fn(tokens, positions, buffers):
        caches = []
        for window, kv in zip(windows, buffers):
            c = KVCache(window=window)
            c.kv = kv
            caches.append(c)
        logits = lm(tokens, caches, positions if start is None else start)
        return logits, [c.kv for c in caches]

    return transforms.compile(fn)


def time_chained(lm, cache, batch: int, context: int, steps: int) -> float:
    """Seconds per decode step, steps chained on the device (the engine's pipelining)."""
    from amlx._mlx import array, async_eval, eval as mx_eval, ops

    step = compiled_pass(lm, [c.window for c in cache], None)
    positions = array(np.full(batch, context, np.int32))
    tokens = array(np.full((batch, 1), 7, np.int32))
    buffers = [c.kv for c in cache]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, buffers = step(tokens, positions, buffers)
            tokens = ops.reshape(ops.argmax(logits[:, -1], axis=-1).astype(tokens.dtype), (batch, 1))
            async_eval(tokens, *buffers)
        mx_eval(tokens)
        best = min(best, (time.perf_counter() - t0) / steps)
    for c, kv in zip(cache, buffers):
        c.kv = kv
    return best


def time_verify(lm, cache, batch: int, context: int, k: int, steps: int) -> float:
    """Seconds per verify round: the (k + 1)-token pass and the acceptance rule, waited for."""
    from amlx._mlx import array, eval as mx_eval
    from amlx.sample import BatchParams, SamplingParams, make_keys
    from amlx.speculative.verify import CompiledVerify, Drafts, VerifyParams, verify

    fwd = compiled_pass(lm, [c.window for c in cache], context)
    params = VerifyParams.build(BatchParams.build([SamplingParams()] * batch), k + 1)
    keys, compiled = make_keys([0] * batch), CompiledVerify()
    rng = np.random.default_rng(k)
    buffers = [c.kv for c in cache]
    best = float("inf")
    for _ in range(steps + 1):  # the first round traces
        ids = rng.integers(100, 20000, size=(batch, k + 1)).astype(np.int32)
        t0 = time.perf_counter()
        logits, buffers = fwd(array(ids), array(np.full(batch, context, np.int32)), buffers)
        drafts = Drafts(array(ids[:, 1:]), array(np.full(batch, k, np.int32)))
        out = verify(logits, drafts, params, keys, compiled=compiled)
        mx_eval(*out.arrays(), *buffers)
        out.read()
        best = min(best, time.perf_counter() - t0)
    for c, kv in zip(cache, buffers):
        c.kv = kv
    compiled.close()
    params.close()
    return best


def cost_table(plain: float, draft: float, verify: dict[int, float]) -> dict:
    """The cost model from the timings, and its speedups."""
    from amlx.speculative.adaptive import CostModel

    ks = sorted(verify)
    verify_cost = tuple([1.0] + [verify[k] / plain for k in ks])
    out = {"verify_cost": verify_cost, "draft_cost": draft / plain, "rows": []}
    for label, d in (("draft model", draft / plain), ("prompt lookup", 0.0)):
        model = CostModel(tuple(max(verify_cost[:i + 1]) for i in range(len(verify_cost))), d)
        for alpha in ALPHAS:
            best = model.best_length(alpha, model.max_tokens)
            out["rows"].append({"drafter": label, "alpha": alpha, "best_k": best,
                                "speedup": {k: round(model.speedup(alpha, k), 3) for k in range(1, len(ks) + 1)}})
    return out


def measure(target, draft, batch: int, context: int, max_k: int, steps: int) -> dict:
    t_cache = filled_cache(target, batch, context)
    d_cache = filled_cache(draft, batch, context)
    plain = time_chained(target, t_cache, batch, context, steps)
    drafting = time_chained(draft, d_cache, batch, context, steps)
    verify = {k: time_verify(target, t_cache, batch, context, k, steps) for k in range(1, max_k + 1)}
    for c in t_cache + d_cache:
        c.close()
    result = {"batch": batch, "plain_ms": plain * 1e3, "draft_ms": drafting * 1e3,
              "verify_ms": {k: v * 1e3 for k, v in verify.items()},
              "round_vs_plain": {k: (k * drafting + verify[k]) / ((k + 1) * plain) for k in verify}}
    result.update(cost_table(plain, drafting, verify))
    return result


def report(r: dict) -> None:
    print(f"\nbatch {r['batch']}: plain step {r['plain_ms']:.2f} ms, draft step {r['draft_ms']:.2f} ms "
          f"(draft_cost {r['draft_cost']:.3f})")
    for k, v in r["verify_ms"].items():
        print(f"  k={k}: verify round {v:.2f} ms = {r['verify_cost'][k]:.3f} plain steps; "
              f"{k} draft steps + verify = {r['round_vs_plain'][k]:.3f} x ({k}+1) plain steps")
    for row in r["rows"]:
        cells = "  ".join(f"k={k}: {s:.2f}x" for k, s in row["speedup"].items())
        print(f"  {row['drafter']:13s} alpha {row['alpha']}: best k={row['best_k']}  {cells}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="qwen3-8b")
    ap.add_argument("--draft", default="qwen3-0.6b")
    ap.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--context", type=int, default=1024, help="positions already in every row's cache")
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--small", action="store_true", help="tiny shapes and few steps: the whole script on a CPU")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as json here")
    ap.add_argument("--root", type=Path, default=None,
                    help="keep the checkpoints in this directory (reused when there; default: a temporary one)")
    args = ap.parse_args(argv)
    if args.small:
        args.target, args.draft, args.batch, args.context, args.max_k, args.steps = (
            "qwen3-tiny", "qwen3-tiny", "1,4", 64, 3, 4)
    from amlx.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) if args.root is None else args.root
        paths = []
        for name, where, seed in ((args.target, root / args.target, 0), (args.draft, root / f"{args.draft}-seed1", 1)):
            if not (where / "config.json").exists():
                write_benchmark_checkpoint(where, name, seed=seed)
            paths.append(where)
        target = load_model(paths[0]).model
        draft = load_model(paths[1]).model
        print(f"target {args.target}, draft {args.draft}, context {args.context}", flush=True)
        results = []
        for b in args.batch.split(","):  # (each batch size reported and saved as it is measured)
            results.append(measure(target, draft, int(b), args.context, args.max_k, args.steps))
            report(results[-1])
            sys.stdout.flush()
            if args.out is not None:
                args.out.write_text(json.dumps(results, indent=2) + "\n")
        target.close()
        draft.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
