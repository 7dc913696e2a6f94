"""Soak: many requests at a fixed concurrency, a share of them cancelled at random
points, and every ending checked.

Each request draws a prompt (mostly short, a share ~2k tokens), max_tokens,
a stop string or none, and greedy or seeded sampling. A cancelled request is
ended one of five ways at a random point (a token count or a delay):

  task           the consuming task is cancelled (`task.cancel()`)
  fail_after     `anyio.fail_after(t)` around the read: TimeoutError expected
  move_on_after  `anyio.move_on_after(t)` around the read
  break          `break` out of the `async for` after k tokens
  aclose         `await stream.aclose()` after k tokens read by hand

Checks (the exit status is 1 when any fails):
  - every request ends before its deadline (`--deadline` seconds): nothing hangs;
  - a request that is not cancelled ends with a finish_reason ("stop"/"length") on
    its last token only, within max_tokens; a cancelled one ends with the expected
    cancellation or completes first; no other exception leaks, and the event loop
    reports no unhandled error;
  - after the run the engine holds no active or waiting request;
  - a sample of the non-cancelled seeded or greedy requests, re-run alone, gives
    the same tokens.

Reports: event-loop lag (a ticker measuring its own oversleep) percentiles,
tokens per 10-s window, throughput in the first and last part of the run while
the pool was full (the target: last within 20% of first), MLX active memory
(`amlx.memory()`) and RSS at idle and after `model.aclose()`, outcome counts.

    python benchmarks/soak.py [--model DIR] [--requests 1000] [--concurrency 48]
        [--cancel 0.3] [--long-share 0.02] [--long-len 2048] [--out soak.json]

Without --model a random Qwen3 is written to a temp dir (`--shape bench`: the
hidden-512, 8-layer one of async_overhead.py; `--shape tiny`: the tests' 2-layer one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CANCEL_KINDS = ("task", "fail_after", "move_on_after", "break", "aclose")
TICK = 0.01  # seconds the lag ticker sleeps
WINDOW = 10.0  # seconds per throughput window


@dataclass
class Spec:
    """One request: what it asks for and how (and whether) it is cut short."""

    index: int
    prompt: list[int]
    options: dict[str, Any]
    cancel: str | None = None  # one of CANCEL_KINDS
    after_tokens: int = 0  # break / aclose / task: cut after this many tokens
    after_seconds: float = 0.0  # fail_after / move_on_after / task: cut after this delay


@dataclass
class Outcome:
    index: int
    kind: str  # "completed", "cancelled", or "failed"
    detail: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


# -- request plans -------------------------------------------------------------
def ordinary_ids(tokenizer) -> np.ndarray:
    """Token ids to draw prompts and stop strings from: no special tokens."""
    ids = np.arange(min(tokenizer.vocab_size, 30000))
    return ids[~np.isin(ids, list(tokenizer.special_token_ids))]


def _options(rng: random.Random, tokenizer, ordinary: np.ndarray, max_tokens: int) -> dict[str, Any]:
    opts: dict[str, Any] = {"max_tokens": rng.randint(1, max_tokens), "max_buffer": rng.choice([1, 4, 16])}
    if rng.random() < 0.5:
        opts.update(temperature=rng.choice([0.7, 1.0]), seed=rng.randrange(2**31),
                    top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 20]))
    if rng.random() < 0.3:  # a stop string made of one ordinary token's text, so it can occur
        text = tokenizer.decode([int(rng.choice(list(ordinary[:2000])))])
        if text.strip():
            opts["stop"] = [text]
    return opts


def plan(args, tokenizer) -> list[Spec]:
    """The requests of a run, all drawn from one seed."""
    rng = random.Random(args.seed)
    ordinary = ordinary_ids(tokenizer)
    specs = []
    for i in range(args.requests):
        long = rng.random() < args.long_share
        n = rng.randint(args.long_len // 2, args.long_len) if long else rng.randint(4, 128)
        prompt = [int(x) for x in np.random.default_rng(args.seed * 100003 + i).choice(ordinary, size=n)]
        spec = Spec(i, prompt, _options(rng, tokenizer, ordinary, args.max_tokens))
        if rng.random() < args.cancel:
            spec.cancel = rng.choice(CANCEL_KINDS)
            spec.after_tokens = rng.randint(0, spec.options["max_tokens"])
            spec.after_seconds = rng.uniform(0.0, args.cancel_within)
        specs.append(spec)
    return specs


# -- running one request ---------------------------------------------------------
class Run:
    """What the whole run records: token arrival times and outcomes."""

    def __init__(self) -> None:
        self.token_times: list[float] = []
        self.outcomes: list[Outcome] = []
        self.admitted: list[float] = []


def _check_tokens(spec: Spec, out: Outcome, tokens) -> None:
    """A finished stream: finish_reason on the last token only, within max_tokens."""
    out.token_ids = [t.id for t in tokens]
    out.finish_reason = tokens[-1].finish_reason if tokens else None
    if out.finish_reason not in ("stop", "length"):
        out.kind, out.detail = "failed", f"stream ended without finish_reason ({len(tokens)} tokens)"
    elif any(t.finish_reason for t in tokens[:-1]):
        out.kind, out.detail = "failed", "finish_reason before the last token"
    elif len(tokens) > spec.options["max_tokens"]:
        out.kind, out.detail = "failed", f"{len(tokens)} tokens > max_tokens {spec.options['max_tokens']}"


async def _read(model, spec: Spec, run: Run, tokens: list, limit: int | None = None) -> None:
    """Reads the stream into `tokens` (stopping after `limit` tokens: `break`)."""
    async for tok in model.generate(spec.prompt, **spec.options):
        tokens.append(tok)
        run.token_times.append(time.perf_counter())
        if limit is not None and len(tokens) >= limit:
            break


async def _read_then_aclose(model, spec: Spec, run: Run, tokens: list) -> bool:
    """Reads `after_tokens` tokens by hand, then `aclose()`s; True if it ended first."""
    stream = model.generate(spec.prompt, **spec.options)
    try:
        while len(tokens) < spec.after_tokens:
            try:
                tok = await stream.__anext__()
            except StopAsyncIteration:
                return True
            tokens.append(tok)
            run.token_times.append(time.perf_counter())
            if tok.finish_reason:
                return True
    finally:
        await stream.aclose()
    return False


async def _cancel_task(model, spec: Spec, run: Run, tokens: list) -> bool:
    """Cancels the reading task after a delay or a token count; True if it ended first."""
    task = asyncio.get_running_loop().create_task(_read(model, spec, run, tokens))
    deadline = time.perf_counter() + spec.after_seconds
    while not task.done() and len(tokens) < max(spec.after_tokens, 1) and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    if task.done():
        task.result()  # raises what the read raised
        return True
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return False
    return True  # it finished between the check and the cancel


async def _one_cancelled(model, spec: Spec, run: Run, tokens: list) -> bool:
    """Runs a request that is meant to be cut short; True if it completed anyway."""
    if spec.cancel == "task":
        return await _cancel_task(model, spec, run, tokens)
    if spec.cancel == "aclose":
        return await _read_then_aclose(model, spec, run, tokens)
    if spec.cancel == "break":
        await _read(model, spec, run, tokens, limit=max(spec.after_tokens, 1))
        return bool(tokens and tokens[-1].finish_reason)
    if spec.cancel == "fail_after":
        try:
            with anyio.fail_after(spec.after_seconds):
                await _read(model, spec, run, tokens)
        except TimeoutError:
            return False
        return True
    with anyio.move_on_after(spec.after_seconds) as scope:
        await _read(model, spec, run, tokens)
    return not scope.cancelled_caught


async def one_request(model, spec: Spec, run: Run, deadline: float) -> Outcome:
    """One request under its deadline; every ending is classified, none escapes."""
    out = Outcome(spec.index, "completed")
    tokens: list = []
    run.admitted.append(time.perf_counter())
    try:
        with anyio.move_on_after(deadline) as scope:
            completed = True
            if spec.cancel is None:
                await _read(model, spec, run, tokens)
            else:
                completed = await _one_cancelled(model, spec, run, tokens)
        if scope.cancelled_caught:
            return Outcome(spec.index, "failed", f"deadline {deadline}s passed after {len(tokens)} tokens")
        if completed:
            _check_tokens(spec, out, tokens)
        else:
            out.kind, out.detail = "cancelled", spec.cancel or ""
    except Exception as exc:  # noqa: BLE001 - a leaked exception is exactly what the soak reports
        return Outcome(spec.index, "failed", f"{spec.cancel or 'plain'}: {type(exc).__name__}: {exc}")
    return out


# -- instruments -----------------------------------------------------------------
async def lag_ticker(lags: list[float], stop: asyncio.Event) -> None:
    """Sleeps TICK at a time and records how much longer each sleep took (ms)."""
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(TICK)
        lags.append((time.perf_counter() - t0 - TICK) * 1000.0)


def rss_bytes() -> int:
    """The process's resident set size now (Linux /proc), else its peak (getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_now() -> dict[str, int]:
    import amlx

    return {"mlx_active": amlx.memory()["active"], "mlx_cache": amlx.memory()["cache"], "rss": rss_bytes()}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
            "max": float(arr.max()), "n": len(values)}


def throughput(run: Run, t0: float, t_end: float, concurrency: int) -> dict[str, Any]:
    """Tokens per 10-s window, and the first against the last part of the full-pool phase
    (from the start until the last request was admitted; after that the pool drains)."""
    times = np.asarray(run.token_times) - t0
    n_windows = max(1, int(np.ceil((t_end - t0) / WINDOW)))
    per_window = np.histogram(times, bins=n_windows, range=(0, n_windows * WINDOW))[0]
    full_end = (sorted(run.admitted)[-1] - t0) if run.admitted else 0.0
    part = min(60.0, full_end / 4) if full_end > 0 else 0.0
    first = float(((times >= 0) & (times < part)).sum() / part) if part else 0.0
    last = float(((times >= full_end - part) & (times < full_end)).sum() / part) if part else 0.0
    return {"window_s": WINDOW, "tokens_per_window": per_window.tolist(), "full_pool_s": full_end,
            "part_s": part, "first_tok_s": first, "last_tok_s": last,
            "last_over_first": last / first if first else 0.0, "total_tokens": int(times.size),
            "run_s": t_end - t0, "mean_tok_s": times.size / (t_end - t0) if t_end > t0 else 0.0}


# -- the run -------------------------------------------------------------------------
async def run_all(model, specs: list[Spec], args) -> tuple[Run, float, float]:
    """Every request, at most `concurrency` at a time, in the order planned."""
    run = Run()
    limiter = anyio.CapacityLimiter(args.concurrency)

    async def worker(spec: Spec) -> None:
        async with limiter:
            run.outcomes.append(await one_request(model, spec, run, args.deadline))

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for spec in specs:
            tg.start_soon(worker, spec)
    return run, t0, time.perf_counter()


async def solo_reruns(model, specs: list[Spec], run: Run, sample: int, seed: int) -> dict[str, Any]:
    """Re-runs a sample of the completed, deterministic (greedy or seeded) requests alone."""
    by_index = {s.index: s for s in specs}
    eligible = [o for o in run.outcomes if o.kind == "completed" and by_index[o.index].cancel is None
                and (by_index[o.index].options.get("seed") is not None
                     or by_index[o.index].options.get("temperature", 0.0) == 0.0)]
    chosen = random.Random(seed).sample(eligible, min(sample, len(eligible)))
    mismatches = []
    for out in chosen:
        spec = by_index[out.index]
        solo = [t.id async for t in model.generate(spec.prompt, **spec.options)]
        if solo != out.token_ids:
            mismatches.append({"index": out.index, "options": spec.options, "prompt_len": len(spec.prompt),
                               "batched": out.token_ids, "solo": solo})
    return {"checked": len(chosen), "eligible": len(eligible), "mismatches": mismatches}


async def settle(model, timeout: float = 10.0) -> dict[str, Any]:
    """Waits until the engine holds no request (or the timeout) and returns its stats."""
    end = time.perf_counter() + timeout
    while True:
        stats = model.stats()
        if (stats["active_requests"] == 0 and stats["waiting_requests"] == 0) or time.perf_counter() > end:
            return dict(stats)
        await asyncio.sleep(0.05)


def checks(report: dict[str, Any], n_requests: int) -> dict[str, bool]:
    """The pass/fail checks of a run."""
    counts = report["outcomes"]
    idle = report["engine_at_idle"]
    return {
        "every request ended": sum(counts.values()) == n_requests,
        "no failed ending": counts.get("failed", 0) == 0,
        "no unhandled loop error": not report["loop_errors"],
        "engine idle after the run": idle["active_requests"] == 0 and idle["waiting_requests"] == 0,
        "solo re-runs identical": not report["solo"]["mismatches"],
    }


async def soak(model, args) -> dict[str, Any]:
    """Runs the soak on a loaded model (closing it at the end) and returns the report."""
    loop_errors: list[str] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda _loop, ctx: loop_errors.append(str(ctx.get("exception") or ctx.get("message"))))
    specs = plan(args, model.tokenizer)
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.get_running_loop().create_task(lag_ticker(lags, stop))
    loaded = memory_now()
    run, t0, t_end = await run_all(model, specs, args)
    stop.set()
    await ticker
    idle_stats = await settle(model)
    idle = memory_now()
    solo = await solo_reruns(model, specs, run, args.solo, args.seed)
    await model.aclose()
    closed = memory_now()
    counts: dict[str, int] = {}
    for out in run.outcomes:
        counts[out.kind] = counts.get(out.kind, 0) + 1
    kinds = {k: sum(1 for s in specs if s.cancel == k) for k in CANCEL_KINDS}
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "outcomes": counts, "cancel_kinds_planned": kinds,
        "long_prompts": sum(1 for s in specs if len(s.prompt) > 256),
        "failures": [asdict(o) for o in run.outcomes if o.kind == "failed"][:50],
        "loop_errors": loop_errors[:50], "lag_ms": percentiles(lags),
        "throughput": throughput(run, t0, t_end, args.concurrency), "solo": solo,
        "engine_at_idle": {k: idle_stats[k] for k in ("active_requests", "waiting_requests", "tokens_generated")},
        "memory": {"loaded": loaded, "idle": idle, "closed": closed},
    }
    report["checks"] = checks(report, len(specs))
    return report


def summary(report: dict[str, Any]) -> str:
    """The report as a few lines of text."""
    lag, tp, mem = report["lag_ms"], report["throughput"], report["memory"]
    mib = 1 << 20
    lines = [
        f"requests {sum(report['outcomes'].values())}: {report['outcomes']} "
        f"(cancel kinds planned {report['cancel_kinds_planned']}, {report['long_prompts']} long prompts)",
        f"event-loop lag ms: p50 {lag['p50']:.2f}  p99 {lag['p99']:.2f}  max {lag['max']:.1f}  ({lag['n']} ticks)",
        f"throughput: {tp['total_tokens']} tokens in {tp['run_s']:.1f} s ({tp['mean_tok_s']:.1f} tok/s); "
        f"full pool {tp['full_pool_s']:.1f} s: first {tp['part_s']:.1f} s {tp['first_tok_s']:.1f} tok/s, "
        f"last {tp['part_s']:.1f} s {tp['last_tok_s']:.1f} tok/s, ratio {tp['last_over_first']:.2f}",
        f"tokens per {tp['window_s']:.0f}-s window: {tp['tokens_per_window']}",
    ]
    for when in ("loaded", "idle", "closed"):
        m = mem[when]
        lines.append(f"memory {when:>6}: MLX active {m['mlx_active']} B ({m['mlx_active'] / mib:.1f} MiB), "
                     f"MLX cache {m['mlx_cache'] / mib:.1f} MiB, RSS {m['rss'] / mib:.1f} MiB")
    solo = report["solo"]
    lines.append(f"solo re-runs: {solo['checked']} of {solo['eligible']} eligible, "
                 f"{len(solo['mismatches'])} differ")
    for failure in report["failures"][:10]:
        lines.append(f"FAILED request {failure['index']}: {failure['detail']}")
    for err in report["loop_errors"][:10]:
        lines.append(f"LOOP ERROR: {err}")
    lines += [f"[{'ok' if ok else 'FAIL'}] {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines)


def make_model_dir(shape: str, dirpath: Path) -> Path:
    """A random Qwen3 checkpoint: the benchmark shape or the tests' tiny one."""
    if shape == "bench":
        from benchmarks.async_overhead import bench_checkpoint

        return bench_checkpoint(dirpath)
    from tests.helpers.checkpoints import make_checkpoint

    return make_checkpoint(dirpath, "qwen3", seed=0, std=0.05, embed_std=0.3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint directory (default: a random Qwen3)")
    p.add_argument("--shape", choices=("bench", "tiny"), default="bench", help="random model's size")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--cancel", type=float, default=0.3, help="share of requests cut short")
    p.add_argument("--cancel-within", type=float, default=3.0, help="latest delay of a timed cancel (s)")
    p.add_argument("--long-share", type=float, default=0.02, help="share of long prompts")
    p.add_argument("--long-len", type=int, default=2048, help="long prompts have len/2..len tokens")
    p.add_argument("--max-tokens", type=int, default=96, help="each request draws max_tokens in 1..this")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds any one request may take")
    p.add_argument("--solo", type=int, default=100, help="completed requests to re-run alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    import amlx

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or make_model_dir(args.shape, Path(tmp))
        model = await amlx.load(str(path), max_batch_size=args.concurrency)
        try:
            return await soak(model, args)
        finally:
            await model.aclose()


def main(argv: list[str] | None = None) -> int:
    """Runs the soak; prints the summary, writes --out; 1 if a check failed."""
    args = parse_args(argv)
    report = asyncio.run(amain(args))
    print(summary(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
