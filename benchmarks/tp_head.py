"""Tensor-parallel output head: replicated against sharded by vocabulary
(AMLX_TP_HEAD=replicated|vocab), single-stream decode with tensor_parallel=N.

    # this CPU machine: qwen3-tiny (vocabulary 151,936, hidden 256: the head is
    # most of each step's weight reads), two CPU processes over MLX's ring
    python benchmarks/tp_head.py --device cpu --tp 2
    # a GPU host
    python benchmarks/tp_head.py --model qwen3-32b --device gpu --tp 2

Each run is a fresh process; the modes alternate (replicated, vocab, replicated,
...) for `--trials` rounds and the best of each is reported (and the median
step, the machine being shared): decode tokens/s of one request and the mean
time per step. The greedy tokens of the two modes
are compared (they are the same model, so they should agree).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from tensor_parallel import write_shared_checkpoint  # noqa: E402

MODES = ("replicated", "vocab")


async def measure(path: Path, device: str, tp: int, tokens: int) -> dict:
    import amlx

    async with await amlx.load(path, device=device, tensor_parallel=tp) as model:
        await model.complete([100, 200, 300], max_tokens=8)  # warm-up: compiled steps
        c = await model.complete([100, 200, 300, 400], max_tokens=tokens)
        rate = c.usage.tokens_per_second
        return {"tok_s": round(rate, 2), "step_ms": round(1000 / rate, 2), "tokens": c.token_ids}


def run_one(path: Path, device: str, tp: int, tokens: int, mode: str) -> dict:
    env = {**os.environ, "AMLX_TP_HEAD": mode, "NCCL_NVLS_ENABLE": "0", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--path", str(path), "--device", device,
           "--tp", str(tp), "--tokens", str(tokens)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"AMLX_TP_HEAD={mode} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3-tiny", choices=["qwen3-tiny", "qwen3-32b"])
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per run")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--dir", default="/tmp/amlx-tp-bench", help="where the checkpoint is written (kept)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = asyncio.run(measure(Path(args.path), args.device, args.tp, args.tokens))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    path = write_shared_checkpoint(Path(args.dir), args.model)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for trial in range(args.trials):
        for mode in MODES:
            r = run_one(path, args.device, args.tp, args.tokens, mode)
            runs[mode].append(r)
            print(f"trial {trial + 1} {mode}: {r['tok_s']} tok/s, {r['step_ms']} ms/step", flush=True)
    print(f"{args.model} bf16, device {args.device}, tensor_parallel={args.tp}, {args.tokens} tokens, "
          f"best of {args.trials}, {time.strftime('%Y-%m-%d')}")
    print("| head | best decode tok/s | best ms/step | median ms/step |\n|---|---|---|---|")
    for mode in MODES:
        best = max(runs[mode], key=lambda r: r["tok_s"])
        median = sorted(r["step_ms"] for r in runs[mode])[len(runs[mode]) // 2]
        print(f"| {mode} | {best['tok_s']} | {best['step_ms']} | {median} |")
    same = runs["replicated"][0]["tokens"] == runs["vocab"][0]["tokens"]
    print(f"greedy tokens identical across modes: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
