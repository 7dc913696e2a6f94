"""amlx against mlx-lm, side by side in one run, on the same checkpoints and the same libmlx.

Measures, per model: single-stream decode tokens/s (256 tokens after a 128-token
prompt), prefill tokens/s (a 2,048-token prompt), aggregate decode tokens/s with
N concurrent streams (amlx's continuous batching against mlx-lm's
`batch_generate`), time to first token under load, and peak MLX memory. Writes
JSON, a markdown table and a PNG plot of throughput against concurrency.

    python benchmarks/speed.py --out benchmarks/results [--models qwen3-0.6b gemma3-1b] [--streams 16 64 128]

Random weights may emit EOS early; every throughput counts the tokens each side
actually generated. With AMLX_STEP_TIMING=1, amlx's JSON adds `step_ms_1`: the single
stream's milliseconds a decode step in each phase of the engine's rounds (wall and CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bandwidth import copy_bandwidth, step_bytes  # noqa: E402
from checkpoints import write_benchmark_checkpoint  # noqa: E402


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Ordinary tokens only (ids past the first few hundred are regular pieces in our
    # tokenizers; a small test vocabulary has its specials at the start too).
    low = min(1000, vocab // 2)
    return [rng.integers(low, min(vocab, 30000), size=length).tolist() for _ in range(n)]


# Each measurement runs REPEATS times and keeps its best run, on both sides alike:
# the lent machines' hosts are shared and a single run can lose a third to noise.
REPEATS = 3
COPY_BYTES = 4 << 30  # array size of the bandwidth measurement (--small: 64 MiB)


def _best(into: dict, **run) -> None:
    """Keeps `run` (the first keyword is its rate) if it beats what `into` holds."""
    rate = next(iter(run))
    if run[rate] > into.get(rate, float("-inf")):
        into.update(run)


# -- amlx ------------------------------------------------------------------------

def _per_step(before: dict, after: dict, steps: int) -> dict:
    """{"seconds"|"cpu": {phase: ms a decode step}} between two StepTiming snapshots."""
    return {kind: {k: round(1e3 * (v - before[kind].get(k, 0.0)) / max(steps, 1), 3)
                   for k, v in after[kind].items()} for kind in ("seconds", "cpu")}


def bench_amlx(path: Path, streams: list[int], decode_tokens: int, batch_tokens: int) -> dict:
    import amlx

    out: dict = {}
    model = amlx.load_sync(path, max_batch_size=max(streams + [1]))
    out["active_after_load"] = amlx.memory()["active"]  # weights (and the KV pool's first blocks)
    vocab = model.tokenizer.vocab_size

    def pool_bytes() -> int:  # the KV block pools' arrays (blocks allocated, every layer)
        return model.stats()["kv_cache"]["blocks_allocated"] * model.engine.scheduler.block_bytes()
    try:
        # the device's copy bandwidth, for the % of bandwidth rows (on the engine's worker)
        out["copy_bytes_per_s"] = model.engine.run_sync(lambda: copy_bandwidth(COPY_BYTES))
        # warm-up: compile the shapes used below
        model.complete_sync(_prompts(1, 128, vocab, 0)[0], max_tokens=32)

        prompt = _prompts(1, 128, vocab, 1)[0]
        from amlx._mlx import memory as mlx_memory

        timing = model.engine.scheduler.timing  # (AMLX_STEP_TIMING=1: which phase set the peak)

        def reset_peak() -> None:
            mlx_memory.reset_peak()
            timing.forget_peaks()

        def peaks() -> dict:  # MLX's peak (MB) credited to the phase of the engine's rounds that set it
            return {k: round(v / 1e6, 1) for k, v in timing.peak_bytes.items()}

        reset_peak()  # the single stream's peak: weights, its cache, one step's temporaries
        before = timing.snapshot()
        steps_before = model.engine.scheduler.decode_steps
        for _ in range(REPEATS):
            times = []
            t0 = time.perf_counter()
            for _ in model.generate_sync(prompt, max_tokens=decode_tokens):
                times.append(time.perf_counter())
            _best(out, decode_tps=(len(times) - 1) / (times[-1] - times[0]), decode_tokens=len(times),
                  single_ttft_s=times[0] - t0)
        if timing.enabled:  # where a single stream's time per decode step goes (ms, wall and CPU)
            out["step_ms_1"] = _per_step(before, timing.snapshot(), model.engine.scheduler.decode_steps - steps_before)

        out["peak_memory_1"] = amlx.memory()["peak"]
        out["kv_pool_bytes_1"] = pool_bytes()
        if timing.enabled:
            out["peak_by_phase_1"] = peaks()
        # A new prompt for every run: the same one again would be served from the prefix cache
        # (2,032 of its 2,048 tokens), and time a cached request instead of a prefill.
        model.complete_sync(_prompts(1, 2048, vocab, 2)[0], max_tokens=1)  # warm-up of the prefill shapes
        for r in range(REPEATS):
            long_prompt = _prompts(1, 2048, vocab, 3 + r)[0]
            t0 = time.perf_counter()
            model.complete_sync(long_prompt, max_tokens=1)
            _best(out, prefill_tps=2048 / (time.perf_counter() - t0))

        reset_peak()
        out["batch"] = {}
        for n in streams:
            prompts = _prompts(n, 128, vocab, 10 + n)

            async def run():
                ttft = []

                async def one(p):
                    start = time.perf_counter()
                    count = 0
                    async for _ in model.generate(p, max_tokens=batch_tokens, max_buffer=batch_tokens):
                        if count == 0:
                            ttft.append(time.perf_counter() - start)
                        count += 1
                    return count

                t = time.perf_counter()
                counts = await asyncio.gather(*(one(p) for p in prompts))
                return sum(counts), time.perf_counter() - t, ttft

            asyncio.run(run())  # warm-up: traces the batch sizes
            out["batch"][n] = {}
            for _ in range(REPEATS):
                total, elapsed, ttft = asyncio.run(run())
                _best(out["batch"][n], tps=total / elapsed, tokens=total, seconds=elapsed,
                      ttft_mean_s=float(np.mean(ttft)), ttft_p50_s=float(np.median(ttft)))
        out["peak_memory"] = amlx.memory()["peak"]
        out["kv_pool_bytes"] = pool_bytes()
        if timing.enabled:
            out["peak_by_phase"] = peaks()
            out["timing_counts"] = dict(timing.counts)
    finally:
        model.close()
    return out


# -- mlx-lm --------------------------------------------------------------------------

def bench_mlx_lm(path: Path, streams: list[int], decode_tokens: int, batch_tokens: int) -> dict:
    import mlx.core as mx
    from mlx_lm import batch_generate, load, stream_generate

    out: dict = {}
    model, tokenizer = load(str(path))
    vocab = model.args.vocab_size if hasattr(model, "args") else 32000
    list(stream_generate(model, tokenizer, _prompts(1, 128, vocab, 0)[0], max_tokens=32))
    mx.reset_peak_memory()
    for _ in range(REPEATS):
        last = None
        times = []
        t0 = time.perf_counter()
        for r in stream_generate(model, tokenizer, _prompts(1, 128, vocab, 1)[0], max_tokens=decode_tokens):
            times.append(time.perf_counter())
            last = r
        _best(out, decode_tps=(len(times) - 1) / (times[-1] - times[0]), decode_tps_reported=last.generation_tps,
              decode_tokens=len(times), single_ttft_s=times[0] - t0)
    out["peak_memory_1"] = mx.get_peak_memory()
    list(stream_generate(model, tokenizer, _prompts(1, 2048, vocab, 2)[0], max_tokens=1))
    for r in range(REPEATS):
        long_prompt = _prompts(1, 2048, vocab, 3 + r)[0]  # the prompts amlx's side gets
        t0 = time.perf_counter()
        list(stream_generate(model, tokenizer, long_prompt, max_tokens=1))
        _best(out, prefill_tps=2048 / (time.perf_counter() - t0))
    mx.reset_peak_memory()
    out["batch"] = {}
    for n in streams:
        prompts = _prompts(n, 128, vocab, 10 + n)
        batch_generate(model, tokenizer, prompts, max_tokens=batch_tokens)  # warm-up
        out["batch"][n] = {}
        for _ in range(REPEATS):
            t = time.perf_counter()
            resp = batch_generate(model, tokenizer, prompts, max_tokens=batch_tokens, return_token_ids=True)
            elapsed = time.perf_counter() - t
            total = sum(len(ids) for ids in resp.token_ids)
            _best(out["batch"][n], tps=total / elapsed, tokens=total, seconds=elapsed)
    out["peak_memory"] = mx.get_peak_memory()
    del model
    gc.collect()
    mx.clear_cache()
    return out


def _table(results: dict) -> str:
    lines = ["| model | metric | amlx | mlx-lm | ratio |", "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        a, m = r["amlx"], r.get("mlx_lm")

        def row(metric, av, mv, fmt="{:.0f}"):
            ratio = f"{av / mv:.2f}×" if mv else "–"
            lines.append(f"| {name} | {metric} | {fmt.format(av)} | {fmt.format(mv) if mv else '–'} | {ratio} |")

        row("decode tok/s (1 stream)", a["decode_tps"], m and m["decode_tps"])
        row("prefill tok/s (2048)", a["prefill_tps"], m and m["prefill_tps"])
        for n, b in a["batch"].items():
            mb = m and m["batch"].get(n)
            row(f"aggregate tok/s ({n} streams)", b["tps"], mb and mb["tps"])
            lines.append(f"| {name} | TTFT p50 under load ({n}) | {b['ttft_p50_s'] * 1000:.0f} ms | – | |")
        if "peak_memory_1" in a:
            row("peak memory, 1 stream (MB)", a["peak_memory_1"] / 1e6, m and m.get("peak_memory_1", 0) / 1e6)
        row(f"peak memory, {max(a['batch'], default=1)} streams (MB)", a["peak_memory"] / 1e6,
            m and m["peak_memory"] / 1e6)
        bw = a.get("copy_bytes_per_s")
        if bw and r.get("step_bytes"):
            def pct(side, n):
                if not side:
                    return None
                tps = side["decode_tps"] if n == 1 else side["batch"][n]["tps"]
                return 100 * r["step_bytes"][n] * tps / n / bw

            for n in [1] + list(a["batch"]):
                row(f"% of bandwidth, decode ({n} stream{'s' if n > 1 else ''})", pct(a, n), pct(m, n), "{:.1f}%")
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ns = sorted(int(n) for n in r["amlx"]["batch"])
        xs = [1] + ns
        ax.plot(xs, [r["amlx"]["decode_tps"]] + [r["amlx"]["batch"][n]["tps"] for n in ns], "o-",
                label=f"amlx {name}")
        if r.get("mlx_lm"):
            ax.plot(xs, [r["mlx_lm"]["decode_tps"]] + [r["mlx_lm"]["batch"][n]["tps"] for n in ns], "s--",
                    label=f"mlx-lm {name}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title("Throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    global REPEATS, COPY_BYTES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen3-0.6b", "gemma3-1b"])
    ap.add_argument("--streams", nargs="+", type=int, default=[16, 64, 128])
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--checkpoints", default=None, help="directory to keep checkpoints in (default: a temp dir)")
    ap.add_argument("--no-mlx-lm", action="store_true")
    ap.add_argument("--small", action="store_true",
                    help="instead of --models, the small random Qwen3 of async_overhead.py (hidden 512, 8 layers, "
                         "float32): the same measurements at a size a CPU runs in minutes")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="runs per measurement; the best is kept")
    args = ap.parse_args(argv)
    REPEATS = max(1, args.repeats)
    if args.small:
        COPY_BYTES = 64 << 20
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import amlx

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.checkpoints or tmp)
        for name in ["qwen3-small"] if args.small else args.models:
            if args.small:
                from async_overhead import bench_checkpoint

                path = bench_checkpoint(root / name)
            else:
                path = write_benchmark_checkpoint(root / name, name)
            print(f"== {name}", flush=True)
            r = {"amlx": bench_amlx(path, args.streams, args.decode_tokens, args.batch_tokens)}
            print(json.dumps(r["amlx"], default=str), flush=True)
            if not args.no_mlx_lm:
                try:
                    r["mlx_lm"] = bench_mlx_lm(path, args.streams, args.decode_tokens, args.batch_tokens)
                    print(json.dumps(r["mlx_lm"], default=str), flush=True)
                except ImportError as exc:
                    print(f"mlx-lm not available ({exc}); its column is left empty")
            # bytes a decode step reads (weights + KV at the mean context), for % of bandwidth
            r["step_bytes"] = {n: step_bytes(path, n, 128 + (args.decode_tokens if n == 1 else args.batch_tokens) / 2)
                               for n in [1] + args.streams}
            results[name] = r
    meta = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "python": sys.version.split()[0],
            "mlx": amlx._mlx.version(), "device": amlx._mlx.device.default_device()}
    try:
        import mlx_lm

        meta["mlx_lm"] = mlx_lm.__version__
    except ImportError:
        pass
    (out / "speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    table = _table(results)
    (out / "speed.md").write_text(f"{meta}\n\n{table}\n")
    print(table)
    try:
        _plot(results, out / "speed.png")
    except ImportError:
        print("matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
