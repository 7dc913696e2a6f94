"""Where a single-stream decode step's device time goes, amlx beside mlx-lm.

Each side runs in its own process on the same checkpoint: a prompt, then
`--tokens` decoded tokens with CUPTI (torch.profiler) recording every CUDA kernel
of the process between the `--skip`-th token and the last. Per side, per decoded
token:
  wall     the recording's time over its decode steps (argmax launches)
  busy     the sum of the kernels' device time
  idle     wall - busy: the device waiting for the host (or for the previous step)
and each kernel (name shortened to its function) with its launches and device
microseconds per token. Use it to tell kernel quality from host time when a
side is behind at one stream (issue 20: Qwen3-8B bf16, 0.84x mlx-lm).

    python benchmarks/kernel_profile.py /tmp/ck/qwen3-8b [--tokens 64] [--prompt 128] [--sides amlx mlx-lm] [--serial]
    python benchmarks/kernel_profile.py /tmp/ck/qwen3-8b-4bit --sides amlx --streams 64 --prompt 16

`--streams N` (amlx only) profiles a batched step instead: N greedy streams decoding together,
recorded whole (their one prefill pass included: keep the prompt short); per decode step,
counted by the sampler's argmax launches, one a step whatever the batch (issue 20: Qwen3-8B
4-bit decodes 64 streams at a third of bf16's tok/s on the H200).

In MLX's CUDA graphs, kernels without a dependency between them run side by side (a
layer's KV write beside the next projections), so a kernel's time is an upper bound of
its cost and the kernels' sum may exceed the step; `--serial` turns the graphs off.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _short(name: str) -> str:
    """A kernel's function name without its template arguments and parameters."""
    name = re.sub(r"\(.*$", "", name)
    depth, out = 0, []
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    short = "".join(out).split("::")[-1].strip()
    return short or name[:60]


def kernel_rows(prof, per: int) -> list[dict]:
    """Each CUDA kernel a torch.profiler recording saw, by its short name: launches and device
    microseconds per `per` (steps, requests), the busiest first."""
    import torch

    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(_short(e.name), []).append(e.time_range.elapsed_us())
    return sorted(({"kernel": k, "launches": len(t) / per, "us": sum(t) / per} for k, t in kernels.items()),
                  key=lambda r: -r["us"])


def _stream(side: str, path: str):
    """(generate(prompt, tokens) -> iterator of tokens, close) for one side."""
    if side == "amlx":
        import amlx

        model = amlx.load_sync(path, max_batch_size=4)
        return (lambda p, n: model.generate_sync(p, max_tokens=n)), model.close
    from mlx_lm import load, stream_generate

    model, tokenizer = load(path)
    return (lambda p, n: stream_generate(model, tokenizer, p, max_tokens=n)), (lambda: None)


def profile_side(side: str, path: str, tokens: int, skip: int, prompt_len: int = 128) -> dict:
    import numpy as np

    generate, close = _stream(side, path)
    prompt = np.random.default_rng(0).integers(1000, 30000, size=prompt_len).tolist()
    for _ in generate(prompt, 16):  # compiles and warms every kernel of the step
        pass
    prof = _recorder()
    stamps: list[float] = []
    for i, _ in enumerate(generate(prompt, tokens)):
        if i == skip:
            prof.start()
        if i >= skip:
            stamps.append(time.perf_counter())
    prof.stop()
    close()
    if len(stamps) < 2:
        raise RuntimeError(f"{side}: only {len(stamps)} tokens after the first {skip}")
    return _summary(side, prof, len(stamps) - 1, stamps[-1] - stamps[0])


def _recorder():
    """A torch.profiler recording of the process's CUDA kernels (not started). Without CUDA
    (a smoke test of the script on the CPU) it records nothing: busy is then 0."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.init()
    return profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])


def _summary(side: str, prof, counted_steps: int, seconds: float, tokens: int | None = None) -> dict:
    """A side's result from its recording: `seconds` of wall time in which `tokens` were
    decoded (None: one a step, a single stream). Steps are the launches of greedy sampling's argmax, one a step on both sides
    whatever the batch (`counted_steps` where none was recorded): tokens reach the consumer a
    few steps late when the engine runs ahead, so counting them miscounts the steps whose
    kernels fell inside the recording."""
    argmax = [r["launches"] for r in kernel_rows(prof, 1) if r["kernel"] == "arg_reduce_general"]
    steps = int(argmax[0]) if argmax else counted_steps
    wall_us = seconds / steps * 1e6
    rows = kernel_rows(prof, steps)
    # kernels of the step in flight at either end are counted whole: one step's worth of error over `steps`
    busy_us = sum(r["us"] for r in rows)
    return {"side": side, "steps": steps, "wall_us": wall_us, "busy_us": busy_us,
            "idle_us": wall_us - busy_us, "tok_s": 1e6 / wall_us if tokens is None else tokens / seconds,
            "kernels": rows}


def profile_batch(path: str, streams: int, tokens: int, prompt_len: int) -> dict:
    """`profile_side` for amlx's batched step: `streams` greedy requests decoding together."""
    import asyncio

    import numpy as np

    import amlx

    model = amlx.load_sync(path, max_batch_size=streams)
    rng = np.random.default_rng(0)

    def run(n: int) -> None:  # (fresh prompts each time: no prefix cache hits)
        prompts = [rng.integers(1000, 30000, size=prompt_len).tolist() for _ in range(streams)]

        async def all_of() -> None:
            await asyncio.gather(*(model.complete(p, max_tokens=n, temperature=0.0) for p in prompts))
        asyncio.run(all_of())

    try:
        run(16)  # compiles and warms every kernel of the batched step
        prof = _recorder()
        prof.start()
        t0 = time.perf_counter()
        run(tokens)
        seconds = time.perf_counter() - t0
        prof.stop()
    finally:
        model.close()
    return _summary(f"amlx x{streams}", prof, tokens, seconds, streams * tokens)


def table(results: list[dict], top: int) -> str:
    lines = ["| side | tok/s | wall us/token | kernels' device us | device idle us | launches/token |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        launches = sum(k["launches"] for k in r["kernels"])
        lines.append(f"| {r['side']} | {r['tok_s']:.1f} | {r['wall_us']:.0f} | {r['busy_us']:.0f} | "
                     f"{r['idle_us']:.0f} | {launches:.0f} |")
    for r in results:
        lines += ["", f"{r['side']}: top kernels, per token", "", "| kernel | launches | device us |",
                  "|---|---:|---:|"]
        lines += [f"| `{k['kernel'][:70]}` | {k['launches']:.1f} | {k['us']:.1f} |" for k in r["kernels"][:top]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory both sides load (benchmarks/checkpoints.py writes one)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per side (default 64)")
    ap.add_argument("--skip", type=int, default=8, help="tokens before recording starts (default 8)")
    ap.add_argument("--sides", nargs="+", default=["amlx", "mlx-lm"], choices=["amlx", "mlx-lm"])
    ap.add_argument("--prompt", type=int, default=128,
                    help="prompt tokens before the decode (default 128; e.g. 16384 for a long context's step)")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per side (default 12)")
    ap.add_argument("--serial", action="store_true",
                    help="MLX_USE_CUDA_GRAPHS=0 on both sides: kernels one after another, so each kernel's time is "
                         "its own (in CUDA graphs, kernels without a dependency run side by side and stretch)")
    ap.add_argument("--streams", type=int, default=1,
                    help="amlx only: profile a batched step of this many greedy streams (default 1)")
    ap.add_argument("--json", help="write the results here as well")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # a child: profile this side, print JSON
    args = ap.parse_args(argv)
    if args.streams > 1 and not args.side and args.sides != ["amlx"]:
        ap.error("--streams needs --sides amlx")
    if args.side:
        result = (profile_batch(args.checkpoint, args.streams, args.tokens, args.prompt) if args.streams > 1
                  else profile_side(args.side, args.checkpoint, args.tokens, args.skip, args.prompt))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    results = []
    for side in args.sides:
        env = dict(os.environ, AMLX_WARMUP=os.environ.get("AMLX_WARMUP", "0"))
        if args.serial:
            env["MLX_USE_CUDA_GRAPHS"] = "0"
        cmd = [sys.executable, __file__, args.checkpoint, "--side", side,
               "--tokens", str(args.tokens), "--skip", str(args.skip), "--prompt", str(args.prompt),
               "--streams", str(args.streams)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not found:
            print(f"{side} failed (status {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(found[-1][len("RESULT "):]))
    print(table(results, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if len(results) == len(args.sides) else 1


if __name__ == "__main__":
    sys.exit(main())
