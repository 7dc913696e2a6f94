"""Structured outputs under continuous batching: aggregate decode tokens/s of N concurrent
streams all constrained to one JSON schema, against the same N streams unconstrained, on one
model in one run.

    python benchmarks/structured.py [--model qwen3-0.6b] [--streams 64] [--max-tokens 128]
    python benchmarks/structured.py --small      # a CPU-sized random Qwen3 (709-token vocabulary)

The schema's array of strings has no length limit, so a constrained stream may run to
max_tokens like a free one (random weights emit gibberish; only the mask makes it JSON), but
a stream may also close its JSON early, and then the batch runs on with fewer rows. Each side
counts the tokens its streams actually produced (a free stream may meet EOS early) over the
wall time from the first submit to the last token: "ratio" is constrained / free tok/s. A
third side, "free_matched", runs the free streams again, each stopped at the length its
constrained twin reached (max_tokens per stream), so that both sides decode the same tokens
per stream and the batch shrinks alike: "ratio_matched" is what the constraints themselves
cost. Each measurement runs --repeats times, the sides alternating run by run; the best is kept.

That batch shrinks as streams end (a JSON may close after 36 of 128 tokens), so it does not
hold N streams for long. `--steady K` adds a steady-state measurement (the output above is
kept; the new one goes under "steady"): N closed-loop clients, each submitting a new request
(a fresh 32-token prompt) as soon as its previous one ends, K requests each, so N requests
stay in flight until the first client is done. Three sides, as above: "constrained" (every
request constrained to the schema), "free" (unconstrained, max_tokens each) and
"free_matched" (unconstrained, request k of client c stopped at the length request k of
client c reached constrained: the same tokens per slot sequence, hence the same joins and
leaves). Each side reports aggregate tok/s over the whole run and over its steady window
(from the first submit until the first client has finished all its requests: N in flight
throughout, but for the joins), the ratios of both, and with AMLX_STEP_TIMING=1 host ms per
decode step per phase over the whole run.

    python benchmarks/structured.py --model qwen3-vocab --streams 64 --steady 4 [--orders forward]

`--orders forward,read` then repeats the steady measurement with the constrained shards' order
pinned (AMLX_MASK_ORDER; by default the engine picks it from what it measures), under
"steady_pinned".
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}},
    },
    "required": ["title", "score", "tags"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "bench", "schema": SCHEMA}}
# `--schema long`: the same object, its array at least 64 strings long, so that no stream can close
# its JSON within 128 tokens: both sides decode every stream to max_tokens, and "ratio" compares
# the same work without free_matched
LONG_SCHEMA = {**SCHEMA, "properties": {**SCHEMA["properties"], "tags": {**SCHEMA["properties"]["tags"], "minItems": 64}}}
SCHEMAS = {"default": RESPONSE_FORMAT,
           "long": {"type": "json_schema", "json_schema": {"name": "bench", "schema": LONG_SCHEMA}}}
_response_format = RESPONSE_FORMAT  # (main sets it from --schema)


def _prompts(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ids = np.arange(min(tokenizer.vocab_size, 30000))
    ordinary = ids[~np.isin(ids, list(tokenizer.special_token_ids))]
    return [[int(x) for x in rng.choice(ordinary, size=length)] for _ in range(n)]


async def _run(model, prompts: list[list[int]], max_tokens: int | list[int],
               constrained: bool) -> tuple[list[int], float]:
    """(tokens each stream produced, seconds) for all prompts decoded concurrently;
    `max_tokens` one for all or one per prompt."""
    options = {"response_format": _response_format} if constrained else {}
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)

    async def one(prompt: list[int], limit: int) -> int:
        result = await model.complete(prompt, max_tokens=limit, **options)
        if constrained and result.finish_reason == "stop":
            json.loads(result.text)  # a finished constrained stream is JSON
        return len(result.token_ids)

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, limits)))
    return list(counts), time.perf_counter() - t0


def _phases(before: dict | None, after: dict | None) -> dict | None:
    """Host milliseconds per decode step in each phase of the engine's rounds between two
    `step_timing` snapshots (AMLX_STEP_TIMING=1; amlx/engine/timing.py), None when off."""
    if not before or not after:
        return None
    steps = max(1, after["decode_steps"] - before["decode_steps"])
    ms = {k: round(1000 * (v - before["seconds"].get(k, 0.0)) / steps, 3) for k, v in after["seconds"].items()
          if v > before["seconds"].get(k, 0.0)}
    out = {"steps": steps, "rounds": after["rounds"] - before["rounds"], **ms,
           "total": round(sum(v for v in ms.values()), 3)}
    # work beside the rounds' phases (llguidance filling the masks, on whichever thread)
    for k, v in after.get("background", {}).items():
        out[f"background_{k}"] = round(1000 * (v - before.get("background", {}).get(k, 0.0)) / steps, 3)
    cpu = {k: v - before.get("cpu", {}).get(k, 0.0) for k, v in after.get("cpu", {}).items()}
    if cpu:  # the worker's CPU time per step: its own work, not its waits (stable on a loaded machine)
        out["cpu"] = {k: round(1000 * v / steps, 3) for k, v in cpu.items() if v > 0}
        out["cpu"]["total"] = round(1000 * sum(cpu.values()) / steps, 3)
    for k, v in after.get("counts", {}).items():  # events over the run (prefill groups, drained steps)
        out[f"count_{k}"] = v - before.get("counts", {}).get(k, 0)
    return out


async def _closed_loop(model, streams: int, per_client: int, max_tokens: int | list[list[int]],
                       constrained: bool, seed: int) -> dict:
    """`streams` clients, each running `per_client` requests one after the other (a new one
    as soon as the last ended), all at once. `max_tokens`: one for every request, or per
    client the limit of each of its requests. Returns each client's request lengths, the
    wall time, and the tokens and seconds of the steady window (until the first client is
    done)."""
    options = {"response_format": _response_format} if constrained else {}
    prompts = _prompts(model.tokenizer, streams * per_client, 32, seed=seed)
    stamps: list[float] = []  # arrival time of every token
    done: list[float] = []  # when each client finished its last request

    async def client(c: int) -> list[int]:
        lengths = []
        for k in range(per_client):
            limit = max_tokens if isinstance(max_tokens, int) else max_tokens[c][k]
            n, text, reason = 0, [], None
            async for tok in model.generate(prompts[c * per_client + k], max_tokens=limit, **options):
                stamps.append(time.perf_counter())
                n += 1
                text.append(tok.text)
                reason = tok.finish_reason
            if constrained and reason == "stop":
                json.loads("".join(text))  # a finished constrained stream is JSON
            lengths.append(n)
        done.append(time.perf_counter())
        return lengths

    t0 = time.perf_counter()
    lengths = await asyncio.gather(*(client(c) for c in range(streams)))
    end, window_end = time.perf_counter(), min(done)
    window_tokens = sum(1 for t in stamps if t <= window_end)
    return {"lengths": list(lengths), "seconds": end - t0, "tokens": len(stamps),
            "window_seconds": window_end - t0, "window_tokens": window_tokens}


def bench_steady(model, streams: int, per_client: int, max_tokens: int, repeats: int) -> dict:
    """The steady-state measurement (`--steady`): see the module's docstring."""
    out: dict = {"streams": streams, "requests_per_client": per_client, "max_tokens": max_tokens}
    lengths: list[list[int]] = []
    seed = 100
    for name in ("free", "constrained", "free_matched"):
        constrained = name == "constrained"
        limit = lengths if name == "free_matched" else max_tokens
        # untimed: one request a client at this side's lengths, so that the batch sizes its timed
        # runs meet are traced already (see `bench`); other prompts than the timed runs'
        warm = limit if isinstance(limit, int) else [[client[0]] for client in limit]
        asyncio.run(_closed_loop(model, streams, 1, warm, constrained, seed + 1000))
        best = None
        for _ in range(repeats):
            seed += 1  # fresh prompts every run: each side prefills as much (no prefix cache hits)
            before = model.stats().get("step_timing")
            run = asyncio.run(_closed_loop(model, streams, per_client, limit, constrained, seed))
            run["phases"] = _phases(before, model.stats().get("step_timing"))
            if best is None or run["window_tokens"] / run["window_seconds"] > best["window_tokens"] / best["window_seconds"]:
                best = run
        if constrained:
            lengths = best["lengths"]
        flat = [n for client in best["lengths"] for n in client]
        out[name] = {"requests": len(flat), "tokens": best["tokens"], "seconds": round(best["seconds"], 3),
                     "tok_s": round(best["tokens"] / best["seconds"], 1),
                     "window_tokens": best["window_tokens"], "window_seconds": round(best["window_seconds"], 3),
                     "window_tok_s": round(best["window_tokens"] / best["window_seconds"], 1),
                     "request_tokens_min_max": [min(flat), max(flat)]}
        if best["phases"] is not None:
            out[name]["host_ms_per_step"] = best["phases"]
        print("steady", name, out[name], flush=True)
    for key in ("tok_s", "window_tok_s"):
        out[f"ratio_{key}"] = round(out["constrained"][key] / out["free"][key], 3)
        out[f"ratio_matched_{key}"] = round(out["constrained"][key] / out["free_matched"][key], 3)
    return out


def bench(path: Path, streams: int, max_tokens: int, repeats: int, steady: int = 0, old: bool = True) -> dict:
    import amlx

    model = amlx.load_sync(path, max_batch_size=streams)
    try:
        prompts = _prompts(model.tokenizer, streams, 32, seed=1)
        out: dict = {"streams": streams, "max_tokens": max_tokens}
        names = ("free", "constrained", "free_matched") if old else ("free", "constrained")
        limits: dict[str, int | list[int]] = {"free": max_tokens, "constrained": max_tokens}
        for name in names:
            # warm-up: builds the grammar and traces the (masked) steps. At the measured lengths
            # where timed runs follow: the compiled step is traced once per batch size, and a
            # batch whose rows leave one by one meets a new size at nearly every leave (the
            # constrained side first, which left its timed run paying every trace that
            # free_matched then reused: 2x its forward's build on the CPU). Greedy decoding
            # makes the constrained streams' lengths the same in every run: free_matched's.
            counts, _ = asyncio.run(_run(model, prompts, limits[name] if old else 4, name == "constrained"))
            if name == "constrained":
                limits["free_matched"] = counts
        if not old:
            names = ()
        # the sides alternate run by run, and each keeps its best: a shared host's slow spells
        # (seconds long) then fall on every side alike instead of on one side's runs
        best: dict[str, tuple] = {}
        for _ in range(repeats):
            for name in names:
                before = model.stats().get("step_timing")
                counts, seconds = asyncio.run(_run(model, prompts, limits[name], name == "constrained"))
                phases = _phases(before, model.stats().get("step_timing"))
                if name not in best or sum(counts) / seconds > sum(best[name][0]) / best[name][1]:
                    best[name] = (counts, seconds, phases)
        for name in names:
            counts, seconds, phases = best[name]
            out[name] = {"tokens": sum(counts), "seconds": round(seconds, 3), "tok_s": round(sum(counts) / seconds, 1),
                         "stream_tokens_min_max": [min(counts), max(counts)]}
            if phases is not None:
                out[name]["host_ms_per_step"] = phases
            print(name, out[name], flush=True)
        if old:
            out["ratio"] = round(out["constrained"]["tok_s"] / out["free"]["tok_s"], 3)
            out["ratio_matched"] = round(out["constrained"]["tok_s"] / out["free_matched"]["tok_s"], 3)
        if steady:
            out["steady"] = bench_steady(model, streams, steady, max_tokens, repeats)
            print("steady", {k: v for k, v in out["steady"].items() if k.startswith("ratio")}, flush=True)
        return out
    finally:
        model.close()


def bench_orders(path: Path, streams: int, max_tokens: int, repeats: int, steady: int, orders: list[str]) -> dict:
    """The steady-state measurement again for each constrained-step order pinned by
    AMLX_MASK_ORDER ("forward", "read"; amlx/engine/scheduler.py), a model loaded per order
    from the same checkpoint, after warm-ups."""
    import os

    import amlx

    out = {}
    for order in orders:
        os.environ["AMLX_MASK_ORDER"] = order  # read when the model's scheduler is built
        model = amlx.load_sync(path, max_batch_size=streams)
        try:
            prompts = _prompts(model.tokenizer, streams, 32, seed=1)
            for constrained in (False, True):
                asyncio.run(_run(model, prompts, 4, constrained))
            # one request per client on every side first: traces the batch and group sizes a
            # steady run meets (the main run's best of --repeats leaves them out too)
            bench_steady(model, streams, 1, max_tokens, 1)
            out[order] = bench_steady(model, streams, steady, max_tokens, repeats)
            print("steady", order, {k: v for k, v in out[order].items() if k.startswith("ratio")}, flush=True)
        finally:
            model.close()
            del os.environ["AMLX_MASK_ORDER"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b", help="a benchmarks/checkpoints.py model (real vocabulary size)")
    ap.add_argument("--small", action="store_true", help="the small random float32 Qwen3 of async_overhead.py")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steady", type=int, default=0, metavar="K",
                    help="also the steady-state measurement: closed-loop clients, K requests each")
    ap.add_argument("--steady-only", action="store_true", help="only the steady-state measurement (warm-ups kept)")
    ap.add_argument("--orders", default="", metavar="forward,read",
                    help="then the steady measurement again with the constrained order pinned (AMLX_MASK_ORDER), "
                         "one repeat each")
    ap.add_argument("--switch-interval", type=float, default=None, metavar="SECONDS",
                    help="sys.setswitchinterval for the run (CPython's default 0.005): how long a thread that "
                         "wants the GIL back (the mask thread, after llguidance's fill) may wait for its holder")
    ap.add_argument("--schema", choices=sorted(SCHEMAS), default="default",
                    help="default: streams may close their JSON early (then see ratio_matched); long: its array "
                         "needs 64 strings, so every stream runs to --max-tokens (up to 128) on both sides")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    global _response_format
    _response_format = SCHEMAS[args.schema]
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    with tempfile.TemporaryDirectory() as tmp:
        if args.small:
            from async_overhead import bench_checkpoint

            name, path = "qwen3-small", bench_checkpoint(Path(tmp) / "qwen3-small")
        else:
            from checkpoints import write_benchmark_checkpoint

            name, path = args.model, write_benchmark_checkpoint(Path(tmp) / args.model, args.model)
        result = {name: bench(path, args.streams, args.max_tokens, args.repeats, args.steady,
                                old=not args.steady_only)}
        result[name]["switch_interval"] = sys.getswitchinterval()
        orders = [o for o in args.orders.split(",") if o]
        if orders and args.steady:
            if args.out:  # (written now too: a run cut off by a time limit keeps what it measured)
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            result[name]["steady_pinned"] = bench_orders(path, args.streams, args.max_tokens, 1, args.steady, orders)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
