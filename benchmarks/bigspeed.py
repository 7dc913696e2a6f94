"""amlx against mlx-lm at 4B-27B, bf16 and 4-bit, with the bandwidth limit beside each figure.

    python benchmarks/bigspeed.py --budget 480 --out OUT [--models qwen3-8b qwen3-8b-4bit ...]
    python benchmarks/bigspeed.py --small --out /tmp/bigspeed   # a tiny shape, for a CPU

Per model (random weights, the releases' shapes; benchmarks/checkpoints.py):
single-stream decode (tokens/s between the first and the last token after a
128-token prompt) and the aggregate of 64 concurrent streams (amlx's continuous
batching against mlx-lm's `batch_generate`, prompts and prefill included), each
side best of N, the two sides alternating run by run. Each side runs in a
process of its own holding its model, driven over a pipe, so the models load once,
a crash or a hang stays in its process, and every wait has a deadline. (Above 40 GB,
27B in bf16, one side runs after the other: two copies would crowd the GPU.)

Bandwidth: bytes a decode step reads (weights + the KV cache at the mean context;
benchmarks/bandwidth.py) divided by the time per step, over the device's copy
bandwidth measured in the same run (a 4 GiB bf16 `x + 1`, read + write, best of 5).
At 64 streams the time per step is 64 / aggregate tokens/s, so prefill time counts
against it: a lower bound.

Checkpoints: bf16 ones are written (numpy, at the disk's speed); a 4-bit one is made
from its bf16 twin with `amlx convert SRC DST -q 4` when that twin is on disk, else
written directly in the same format (checkpoints.py). Each is deleted once measured,
and one is written only if the disk has room (27B in bf16 is 54 GB).

Time budget: --budget seconds in all. A model starts only if its estimated time
fits in what is left; no wait runs past the budget (children are killed, what was
measured is kept). Results go to OUT/bigspeed.json and OUT/bigspeed.md after every
model, and the table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bandwidth import kv_bytes, weight_bytes  # noqa: E402
from child_process import Child as ChildProcess, run_meta, serve  # noqa: E402
from checkpoints import checkpoint_bytes, split_variant, write_benchmark_checkpoint  # noqa: E402

DEFAULT_MODELS = ["qwen3-8b", "qwen3-8b-4bit", "gemma3-27b-4bit", "gemma3-27b", "gemma3-4b", "gemma3-4b-4bit"]
SMALL_MODELS = ["qwen3-tiny", "qwen3-tiny-4bit"]
SIDES = ("amlx", "mlx_lm")
# --qgemv-off: amlx once more with its few-row quantized matmul kernel off (MLX's instead)
QGEMV_OFF = "amlx_qgemv_off"
SIDE_ENV = {QGEMV_OFF: {"AMLX_QGEMV": "0"}}


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 30000, size=length).tolist() for _ in range(n)]


# -- the children: one model each, commands as JSON lines on stdin ----------------

def _amlx_side(path: str, max_batch: int):
    import asyncio

    import amlx

    t0 = time.perf_counter()
    model = amlx.load_sync(path, max_batch_size=max_batch)  # AMLX_WARMUP=0: see Child
    ready = {"load_s": time.perf_counter() - t0}
    engine = model.engine

    def single(prompt, tokens):
        times = [time.perf_counter()]
        for _ in model.generate_sync(prompt, max_tokens=tokens):
            times.append(time.perf_counter())
        return times

    def batch(prompts, tokens):
        async def run():
            async def one(p):
                return sum([1 async for _ in model.generate(p, max_tokens=tokens, max_buffer=tokens)])
            return sum(await asyncio.gather(*(one(p) for p in prompts)))
        return asyncio.run(run())

    def bandwidth(nbytes):
        from bandwidth import copy_bandwidth

        return engine.run_sync(lambda: copy_bandwidth(nbytes))

    return ready, single, batch, bandwidth, model.close


def _mlx_lm_side(path: str, max_batch: int):
    from mlx_lm import batch_generate, load, stream_generate

    t0 = time.perf_counter()
    model, tokenizer = load(path)
    ready = {"load_s": time.perf_counter() - t0}

    def single(prompt, tokens):
        times = [time.perf_counter()]
        for _ in stream_generate(model, tokenizer, prompt, max_tokens=tokens):
            times.append(time.perf_counter())
        return times

    def batch(prompts, tokens):
        resp = batch_generate(model, tokenizer, prompts, max_tokens=tokens, return_token_ids=True)
        return sum(len(ids) for ids in resp.token_ids)

    return ready, single, batch, None, lambda: None


def child(side: str, path: str, max_batch: int) -> int:
    """Serves commands for one side (child_process.serve): single, batch, bandwidth."""

    def start():
        ready, single, batch, bandwidth, close = (_mlx_lm_side if side == "mlx_lm" else _amlx_side)(path, max_batch)

        def handle(cmd: dict) -> dict:
            t0 = time.perf_counter()
            if cmd["op"] == "single":
                times = single(_prompts(1, cmd["prompt"], cmd["seed"])[0], cmd["tokens"])
                n = len(times) - 1
                res = {"tokens": n, "ttft_s": times[1] - times[0],
                       "decode_tps": (n - 1) / (times[-1] - times[1]) if n > 1 else 0.0}
            elif cmd["op"] == "batch":
                n = batch(_prompts(cmd["streams"], cmd["prompt"], cmd["seed"]), cmd["tokens"])
                res = {"tokens": n, "tps": n / (time.perf_counter() - t0)}
            else:
                res = {"copy_bytes_per_s": bandwidth(cmd["nbytes"])}
            res["seconds"] = time.perf_counter() - t0
            return res  # (serve hands MLX's cached buffers back before the next command)

        return ready, handle, close

    return serve(start)


class Child(ChildProcess):
    """A child process serving one side (child_process.Child)."""

    def __init__(self, side: str, path: Path, max_batch: int):
        super().__init__(side, Path(__file__).resolve(), ["--path", str(path), "--max-batch", str(max_batch)],
                         env=SIDE_ENV.get(side))


# -- the parent -------------------------------------------------------------------

class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def estimate_s(name: str, compiled: bool, root: Path) -> float:
    """Rough seconds one model takes on an H200 (checkpoint, two loads, measurements);
    converting reads the bf16 twin; the first 4-bit model pays MLX's kernel compiles
    (20-50 s each, side by side: precompile_kernels)."""
    gb = checkpoint_bytes(name) / 1e9
    base, bits = split_variant(name)
    convert = 2 * checkpoint_bytes(base) / 1e9 if bits and (root / base / "config.json").exists() else 0
    return 25 + 5 * gb + convert + (0 if bits is None or compiled else 75)


def _disk_ok(root: Path, nbytes: int) -> bool:
    return shutil.disk_usage(root).free > nbytes * 1.05 + (2 << 30)


def make_checkpoint(root: Path, name: str, budget: Budget, log: list, convert: bool = True) -> Path | None:
    """The checkpoint of `name` under `root`: converted from its bf16 twin when that is
    on disk, else written; None (noted in `log`) when the disk has no room."""
    path = root / name
    if (path / "config.json").exists():
        return path
    need = checkpoint_bytes(name)
    if not _disk_ok(root, need):
        log.append(f"{name}: skipped, {need / 1e9:.1f} GB do not fit on the disk "
                   f"({shutil.disk_usage(root).free / 1e9:.1f} GB free)")
        return None
    base, bits = split_variant(name)
    t0 = time.perf_counter()
    if convert and bits is not None and (root / base / "config.json").exists():
        cmd = [sys.executable, "-m", "amlx", "convert", str(root / base), str(path), "-q", str(bits)]
        try:
            subprocess.run(cmd, check=True, timeout=max(1.0, budget.left() - 5), stdout=sys.stderr)
            how = "amlx convert -q"
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(path, ignore_errors=True)
            log.append(f"{name}: amlx convert failed ({exc}); written directly instead")
            write_benchmark_checkpoint(path, name)
            how = "written directly"
    else:
        write_benchmark_checkpoint(path, name)
        how = "written directly" if bits else "written"
    print(f"== {name}: checkpoint {how} in {time.perf_counter() - t0:.0f} s "
          f"({need / 1e9:.1f} GB)", flush=True)
    return path


def _start(path: Path, sides: list[str], max_batch: int, budget: Budget, parallel: bool, notes: list) -> dict:
    """The children that came up (loaded their model); one that failed is noted and
    left out, so the other side is still measured."""
    children: dict = {}
    started: list[Child] = []

    def ready(c: Child) -> None:
        try:
            c.ready = c.wait_for("READY", time.monotonic() + budget.left())
            children[c.side] = c
        except RuntimeError as exc:
            notes.append(f"{path.name}: {exc}")
            c.proc.kill()
    try:
        for side in sides:
            started.append(Child(side, path, max_batch))
            if not parallel:
                ready(started[-1])
        if parallel:
            for c in started:
                ready(c)
    except BaseException:
        for c in started:
            c.proc.kill()
        raise
    return children


def measure(path: Path, sides: list[str], args, budget: Budget, results: dict, run: dict) -> None:
    """Fills `results` (per side: ready info, best single and batch runs) as it goes;
    the device's copy bandwidth goes into `run` the first time."""
    big = checkpoint_bytes(path.name) > 20e9  # two such loads at once would strain host memory
    children = _start(path, sides, args.streams, budget, not big, run["notes"])
    try:
        for side, c in children.items():
            results[side] = {"ready": c.ready}
        if "bandwidth" not in run and "amlx" in children:
            bw = children["amlx"].ask(time.monotonic() + budget.left(), op="bandwidth", nbytes=args.copy_bytes)
            run["bandwidth"] = bw["copy_bytes_per_s"]
        plan = [("single", "decode_tps", dict(tokens=args.decode_tokens, prompt=args.prompt, seed=1)),
                ("batch", "tps", dict(tokens=args.batch_tokens, prompt=args.prompt, streams=args.streams, seed=2))]
        if args.single_only:
            plan = plan[:1]
        for op, key, cmd in plan:
            for side, c in children.items():  # untimed: traces and compiles the shapes
                c.ask(time.monotonic() + budget.left(), op=op, **cmd)
            for _ in range(args.repeats):
                for side, c in children.items():  # alternating, run by run
                    r = c.ask(time.monotonic() + budget.left(), op=op, **cmd)
                    best = results[side].get(op)
                    if best is None or r[key] > best[key]:
                        results[side][op] = r
    finally:
        for c in children.values():
            c.stop(min(20.0, max(0.0, budget.left())))


def bandwidth_fractions(path: Path, side: dict, args, copy_bw: float | None) -> None:
    """Adds bytes per step and the fraction of the copy bandwidth to `side`'s runs."""
    w = weight_bytes(path)
    single = side.get("single")
    if single and single["decode_tps"]:
        ctx = args.prompt + single["tokens"] / 2
        step = w + kv_bytes(path, int(ctx))
        single["step_bytes"] = step
        single["bytes_per_s"] = step * single["decode_tps"]
        if copy_bw:
            single["bw_fraction"] = single["bytes_per_s"] / copy_bw
    batch = side.get("batch")
    if batch and batch["tps"]:
        ctx = args.prompt + batch["tokens"] / args.streams / 2
        step = w + args.streams * kv_bytes(path, int(ctx))
        batch["step_bytes"] = step
        batch["bytes_per_s"] = step * batch["tps"] / args.streams
        if copy_bw:
            batch["bw_fraction"] = batch["bytes_per_s"] / copy_bw


def table(results: dict, streams: int) -> str:
    off = any(QGEMV_OFF in r for n, r in results.items() if not n.startswith("_"))
    lines = ["| model | streams | amlx tok/s | mlx-lm tok/s | ratio | amlx % of bw | mlx-lm % of bw |"
             + (" amlx, qgemv off: tok/s | % of bw |" if off else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if off else "")]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        for op, key, n in (("single", "decode_tps", 1), ("batch", "tps", streams)):
            a, m = r.get("amlx", {}).get(op), r.get("mlx_lm", {}).get(op)
            if not a and not m:
                continue

            def rate(x):
                return f"{x[key]:,.0f}" if x else "–"

            def frac(x):
                return f"{100 * x['bw_fraction']:.0f}%" if x and "bw_fraction" in x else "–"
            ratio = f"{a[key] / m[key]:.2f}×" if a and m and m[key] else "–"
            extra = ""
            if off:
                o = r.get(QGEMV_OFF, {}).get(op)
                extra = f" {rate(o)} | {frac(o)} |"
            lines.append(f"| {name} | {n} | {rate(a)} | {rate(m)} | {ratio} | {frac(a)} | {frac(m)} |" + extra)
    bw = results.get("_run", {}).get("bandwidth")
    if bw:
        lines.append(f"\nCopy bandwidth measured in this run: {bw / 1e9:,.0f} GB/s (bytes read + written per "
                     f"second); % of bw = bytes a decode step reads / time per step / that.")
    notes = results.get("_run", {}).get("notes")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines)


def _save(out: Path, results: dict, args) -> str:
    text = table(results, args.streams)
    (out / "bigspeed.json").write_text(json.dumps({"meta": run_meta(), "args": vars(args), "results": results},
                                                  indent=2, default=str))
    (out / "bigspeed.md").write_text(f"{run_meta()}\n\n{text}\n")
    return text


def precompile_kernels(path: Path, budget: Budget) -> float:
    """Compiles MLX's quantized-matmul variants (one per row tile) side by side in
    child processes (amlx.models.warmup's), filling the on-disk kernel cache both
    sides then read: the first 4-bit model's compiles cost the slowest one, not their
    sum. Returns the seconds it took."""
    cfg = json.loads((path / "config.json").read_text())
    q, h = cfg["quantization"], cfg["hidden_size"]
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "amlx.models.warmup", "bfloat16", str(q["bits"]),
                               str(q["group_size"]), str(rows), str(h), str(h)], stdout=sys.stderr)
             for rows in (5, 17, 33, 65, 129)]  # 2..4 rows: amlx's quantized_gemv
    for p in procs:
        try:
            p.wait(timeout=max(0.1, min(300.0, budget.left() - 60)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return time.monotonic() - t0


def run_model(name: str, root: Path, args, budget: Budget, results: dict) -> None:
    notes = results["_run"]["notes"]
    path = make_checkpoint(root, name, budget, notes, convert=not args.direct_4bit)
    if path is None:
        return
    if split_variant(name)[1] is not None and "precompile_s" not in results["_run"]:
        results["_run"]["precompile_s"] = precompile_kernels(path, budget)
        print(f"== kernels compiled side by side in {results['_run']['precompile_s']:.0f} s", flush=True)
    sides = (["amlx"] if args.no_mlx_lm else list(SIDES)) + ([QGEMV_OFF] if args.qgemv_off else [])
    results[name] = {"checkpoint_bytes": checkpoint_bytes(name), "weight_bytes_per_step": weight_bytes(path)}
    # Both sides hold their model at once, so runs alternate without reloading; above
    # 40 GB (27B in bf16) two copies would crowd the GPU's 141 GB, so one side after the other.
    groups = [sides] if checkpoint_bytes(name) < 40e9 else [[side] for side in sides]
    for group in groups:
        try:
            measure(path, group, args, budget, results[name], results["_run"])
        except (TimeoutError, RuntimeError) as exc:
            notes.append(f"{name}: stopped: {exc}")
            print(f"== {name}: {exc}", flush=True)
    for side in sides:
        if side in results[name]:
            bandwidth_fractions(path, results[name][side], args, results["_run"].get("bandwidth"))


def _prune(root: Path, still: list[str], twins: bool = False) -> None:
    """Deletes checkpoints under `root` that no model in `still` needs (as itself or,
    with `twins`, as the bf16 twin it is converted from)."""
    needed = set(still) | ({split_variant(n)[0] for n in still} if twins else set())
    for d in root.iterdir() if root.exists() else []:
        if d.is_dir() and d.name not in needed:
            shutil.rmtree(d, ignore_errors=True)


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_MODELS)}")
    ap.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side and measurement; best kept")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--copy-bytes", type=int, default=4 << 30, help="array size of the bandwidth measurement")
    ap.add_argument("--root", default=None, help="where checkpoints are written (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-mlx-lm", action="store_true")
    ap.add_argument("--qgemv-off", action="store_true",
                    help="also amlx with AMLX_QGEMV=0 (MLX's quantized matmul for few rows), a third side")
    ap.add_argument("--single-only", action="store_true", help="single-stream decode only (no 64-stream runs)")
    ap.add_argument("--direct-4bit", action="store_true",
                    help="write 4-bit checkpoints directly instead of converting their bf16 twin")
    ap.add_argument("--small", action="store_true", help="tiny shapes and few tokens: the whole script on a CPU")
    ap.add_argument("--child", choices=[*SIDES, QGEMV_OFF], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.small:
        args.models = args.models or SMALL_MODELS
        args.decode_tokens, args.batch_tokens, args.prompt = 16, 8, 16
        args.streams, args.copy_bytes = min(args.streams, 4), 64 << 20
    args.models = args.models or DEFAULT_MODELS
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        return child(args.child, args.path, args.max_batch)
    budget = Budget(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.root or os.environ.get("TMPDIR", "/tmp")) / "amlx-bigspeed"
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {"_run": {"notes": []}}
    compiled = False
    try:
        for i, name in enumerate(args.models):
            _prune(root, args.models[i:], twins=not args.direct_4bit)
            need = estimate_s(name, compiled, root)
            if budget.left() < need:
                results["_run"]["notes"].append(f"{name}: not started, about {need:.0f} s needed and "
                                                f"{budget.left():.0f} s left of the budget")
                continue
            print(f"== {name} ({budget.left():.0f} s left)", flush=True)
            run_model(name, root, args, budget, results)
            compiled = compiled or split_variant(name)[1] is not None
            print(_save(out, results, args), flush=True)
    finally:
        _prune(root, [])
        text = _save(out, results, args)
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
