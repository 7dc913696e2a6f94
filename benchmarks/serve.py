"""The same OpenAI-client load against `amlx serve` and `mlx_lm.server`, one checkpoint, one run.

    python benchmarks/serve.py --small --clients 1 16 64 --max-tokens 64        # CPU-sized
    python benchmarks/serve.py --preset qwen3-0.6b --clients 1 16 64 --max-tokens 256   # GPU

For each server (a subprocess on 127.0.0.1) and each client count, that many AsyncOpenAI
clients stream chat completions at once (greedy, `max_tokens` each, distinct prompts), for
`--rounds` rounds. Reported: aggregate generated tokens/s (all tokens / wall time of the
round), TTFT p50/p99 (request sent -> first content chunk), how many tokens arrived and how
many requests failed (a server that drops connections under load shows it here).
Both servers decode up to 64 requests together (`--max-batch-size` / `--decode-concurrency`).
Random weights: both servers see the same checkpoint, prompts and greedy decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, path: Path, port: int, batch: int, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`amlx serve` or `mlx_lm.server` on 127.0.0.1:`port`, once it answers; `extra`: more amlx flags."""
    if kind == "amlx":
        cmd = [sys.executable, "-m", "amlx", "serve", str(path), "--port", str(port), "--model-name", "default_model",
               "--max-batch-size", str(batch), "--log-level", "warning", *extra]
    else:
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--port", str(port),
               "--decode-concurrency", str(batch), "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited: {proc.stderr.read().decode()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


async def one_request(client: openai.AsyncOpenAI, i: int, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": f"Write story number {i} about a fox."}],
        max_tokens=max_tokens, temperature=0.0, stream=True, stream_options={"include_usage": True})
    ttft, chunks, usage = None, 0, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for ch in chunk.choices:
            if ch.delta.content:
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    return (ttft if ttft is not None else time.perf_counter() - start), (usage if usage is not None else chunks)


async def load(base_url: str, clients: int, rounds: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=1800,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=clients + 8)))
    # warm up at this concurrency (MLX compiles kernels per shape on first use; not measured)
    await asyncio.gather(*(one_request(client, -1 - i, 4) for i in range(clients)), return_exceptions=True)
    rates, ttfts, tokens, errors = [], [], 0, 0
    for r in range(rounds):
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, r * clients + i, max_tokens) for i in range(clients)),
                                       return_exceptions=True)
        wall = time.perf_counter() - start
        ok = [x for x in results if not isinstance(x, BaseException)]
        errors += len(results) - len(ok)  # e.g. refused connections; reported, not hidden
        n = sum(t for _, t in ok)
        tokens += n
        rates.append(n / wall)
        ttfts += [t for t, _ in ok] or [float("nan")]
    ttfts.sort()
    return {"clients": clients, "tok_s": round(statistics.median(rates), 1), "tokens": tokens, "errors": errors,
            "ttft_p50_ms": round(ttfts[len(ttfts) // 2] * 1000, 1),
            "ttft_p99_ms": round(ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000, 1)}


def checkpoint(args, root: Path) -> Path:
    if args.model:
        return Path(args.model)
    if args.small:
        from async_overhead import bench_checkpoint

        return bench_checkpoint(root / "qwen3-small")
    from checkpoints import write_benchmark_checkpoint

    return write_benchmark_checkpoint(root / args.preset, args.preset)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: a random one, see --preset)")
    ap.add_argument("--preset", default="qwen3-0.6b", help="benchmarks/checkpoints.py shape (random weights)")
    ap.add_argument("--small", action="store_true", help="the small float32 Qwen3 of async_overhead.py (CPU)")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--servers", nargs="+", default=["amlx", "mlx_lm"], choices=["amlx", "mlx_lm"])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(args, Path(tmp))
        for kind in args.servers:
            port = _port()
            proc = start_server(kind, path, port, max(args.clients))
            try:
                results[kind] = []
                for n in args.clients:
                    row = asyncio.run(load(f"http://127.0.0.1:{port}/v1", n, args.rounds, args.max_tokens))
                    print(kind, json.dumps(row), flush=True)
                    results[kind].append(row)
            finally:
                proc.terminate()
                proc.wait(30)
    print(f"\n| clients | {' | '.join(f'{k} tok/s | {k} TTFT p50/p99 ms | {k} errors' for k in results)} |")
    for i, n in enumerate(args.clients):
        cells = [f"{results[k][i]['tok_s']} | {results[k][i]['ttft_p50_ms']}/{results[k][i]['ttft_p99_ms']} | "
                 f"{results[k][i]['errors']}" for k in results]
        print(f"| {n} | {' | '.join(cells)} |")
    if "amlx" in results and "mlx_lm" in results:
        print("amlx/mlx_lm tok/s: " + ", ".join(
            f"{n}: {a['tok_s'] / max(m['tok_s'], 1e-9):.2f}x" for n, a, m in
            zip(args.clients, results["amlx"], results["mlx_lm"])))
    if args.out:
        Path(args.out).write_text(json.dumps({"max_tokens": args.max_tokens, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
