"""What the prefix cache saves: time to first token behind a cached prefix, and a multi-turn chat load.

    python benchmarks/prefix_cache.py --preset qwen3-0.6b          # GPU (random weights)
    python benchmarks/prefix_cache.py --small --prefix 500 --conversations 4 --turns 4   # CPU-sized
    bash benchmarks/run_gpu.sh ttft    # GPU: the TTFT part only (--ttft-only), qwen3-0.6b and qwen3-8b

1. TTFT (in-process, `amlx.load`): a request of `--prefix` random tokens plus a 16-token
   question, first with a prefix nobody computed (uncached), then another question behind
   the same prefix (cached); best of `--repeats`, each repeat with a fresh prefix. The same
   with `prefix_cache=False`. Reported: TTFT in ms and `usage.cached_tokens`; with the cache
   on also `cached_plain_ms`, the cached request with the compiled extend pass turned off
   (the scheduler's `extend_max` set to 0: the plain prefill pass, as before the extend
   pass, which is on by default on a GPU only: `AMLX_EXTEND_PASS=1` turns it on on the
   CPU), interleaved with the others in the same run; `cached_streamed_ms`, the first
   token of a cached request streamed with `generate` (8 tokens: a decode step follows its
   prefill); and `decode_ms`, one decode step (the target: a cached TTFT a small multiple
   of it). With AMLX_STEP_TIMING=1 also `host`: host ms per phase of a cached request's
   rounds and of a decode step, their host times (rounds minus device waits) and ratio.
2. Multi-turn chat through a server (subprocess, official `openai` client): `--conversations`
   conversations of `--turns` turns each run concurrently; every turn sends the whole history
   plus a new user message and appends the reply (`--max-tokens`, greedy). Reported: wall time,
   prompt tokens sent, prompt tokens the server says it served from cache
   (`usage.prompt_tokens_details.cached_tokens`, where the server reports it), for amlx with
   the cache, amlx with `--no-prefix-cache`, and `mlx_lm.server` (which keeps a prompt cache).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from serve import _port, checkpoint, start_server  # noqa: E402


def _tokens(tokenizer, n: int, rng: np.random.Generator) -> list[int]:
    ids = np.arange(min(tokenizer.vocab_size, 30000))
    ordinary = ids[~np.isin(ids, list(tokenizer.special_token_ids))]
    return [int(x) for x in rng.choice(ordinary, size=n)]


async def _ttft(model, prompt: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    result = await model.complete(prompt, max_tokens=1)
    return time.perf_counter() - start, result.usage.cached_tokens


async def _decode_ms(model, prompt: list[int], n: int = 33) -> float:
    """One decode step (ms): the time of n greedy tokens after the first, per token."""
    first, count = None, 0
    async for _ in model.generate(prompt, max_tokens=n, temperature=0.0):
        count += 1
        if first is None:
            first = time.perf_counter()
    return (time.perf_counter() - first) / max(count - 1, 1) * 1e3


async def _first_token(model, prompt: list[int], n: int = 8) -> float:
    """Time to the first token of a streamed request of n tokens (the rest is read too)."""
    start, first = time.perf_counter(), None
    async for _ in model.generate(prompt, max_tokens=n, temperature=0.0):
        if first is None:
            first = time.perf_counter() - start
    return first


def _timing(model) -> dict | None:
    """The engine's step timing (AMLX_STEP_TIMING=1), or None."""
    return model.stats().get("step_timing")


def _phases(before: dict, after: dict, per: int, key: str = "seconds") -> dict[str, float]:
    """ms per `per` (requests or steps) of each phase between two step-timing snapshots
    (`key` "cpu": the worker thread's CPU time instead of wall time)."""
    a, b = after.get(key, {}), before.get(key, {})
    return {k: round((a[k] - b.get(k, 0.0)) * 1e3 / max(per, 1), 3) for k in a if a[k] - b.get(k, 0.0) > 0}


async def host_split(model, tok, rng, prefix: int, n: int = 6) -> dict:
    """With AMLX_STEP_TIMING=1: host ms per phase of a cached request's rounds and of a
    decode step, and the host time of each (rounds minus waiting for the device)."""
    head = _tokens(tok, prefix, rng)
    await _ttft(model, head + _tokens(tok, 16, rng))
    before = _timing(model)
    walls = [(await _ttft(model, head + _tokens(tok, 16, rng)))[0] for _ in range(n)]
    after = _timing(model)
    cached, cached_cpu = _phases(before, after, n), _phases(before, after, n, "cpu")
    prompt = _tokens(tok, 64, rng)
    before = _timing(model)
    await _decode_ms(model, prompt, 65)
    after = _timing(model)
    steps = after["decode_steps"] - before["decode_steps"]

    def decode_only(phases: dict) -> dict:  # (the request's own prefill rounds are left out)
        return {k: v for k, v in phases.items() if k != "admit" and not k.startswith(("prefill", "extend"))}

    decode, decode_cpu = decode_only(_phases(before, after, steps)), decode_only(_phases(before, after, steps, "cpu"))
    host_cached = sum(v for k, v in cached.items() if k not in ("prefill_wait", "extend_wait"))
    host_decode = sum(v for k, v in decode.items() if k != "wait")
    out = {"cached_phases_ms": cached, "decode_phases_ms": decode, "cached_wall_ms": round(np.mean(walls) * 1e3, 2),
           "cached_rounds_ms": round(sum(cached.values()), 2),
           "host_cached_ms": round(host_cached, 3), "host_decode_ms": round(host_decode, 3),
           "host_ratio": round(host_cached / max(host_decode, 1e-9), 2)}
    if cached_cpu and decode_cpu:  # the worker thread's CPU time: the host's own work, without any waits
        out.update(cpu_cached_ms=round(sum(cached_cpu.values()), 3), cpu_decode_ms=round(sum(decode_cpu.values()), 3),
                   cpu_ratio=round(sum(cached_cpu.values()) / max(sum(decode_cpu.values()), 1e-9), 2),
                   cached_cpu_phases_ms=cached_cpu)
    return out


async def ttft(path: Path, prefix: int, repeats: int, cache: bool) -> dict:
    import amlx

    async with await amlx.load(path, prefix_cache=cache) as model:
        scheduler = model.engine.scheduler
        extend_max = scheduler.extend_max
        rng = np.random.default_rng(0)
        tok = model.tokenizer
        await _ttft(model, _tokens(tok, 64, rng))  # warm-up: compile the shapes
        try:
            for limit in (extend_max, 0):  # the cached request's pass, compiled and plain
                head = _tokens(tok, prefix, rng)
                await _ttft(model, head + _tokens(tok, 16, rng))
                scheduler.extend_max = limit
                await _ttft(model, head + _tokens(tok, 16, rng))
                scheduler.extend_max = extend_max
            cold, warm, plain, streamed = [], [], [], []
            for _ in range(repeats):
                head = _tokens(tok, prefix, rng)
                cold.append(await _ttft(model, head + _tokens(tok, 16, rng)))
                warm.append(await _ttft(model, head + _tokens(tok, 16, rng)))
                streamed.append(await _first_token(model, head + _tokens(tok, 16, rng)))
                if cache:
                    scheduler.extend_max = 0
                    plain.append(await _ttft(model, head + _tokens(tok, 16, rng)))
                    scheduler.extend_max = extend_max
        finally:
            scheduler.extend_max = extend_max
        decode = min([await _decode_ms(model, _tokens(tok, 64, rng)) for _ in range(2)])
        split = await host_split(model, tok, rng, prefix) if cache and _timing(model) is not None else None
    best_cold, best_warm = min(cold), min(warm)
    row = {"prefix_cache": cache, "prefix": prefix, "uncached_ms": round(best_cold[0] * 1e3, 1),
           "cached_ms": round(best_warm[0] * 1e3, 1), "cached_tokens": best_warm[1],
           "speedup": round(best_cold[0] / best_warm[0], 2), "decode_ms": round(decode, 2),
           "cached_streamed_ms": round(min(streamed) * 1e3, 1), "extend_pass": extend_max > 0}
    if split is not None:
        row["host"] = split
    if plain:
        row["cached_plain_ms"] = round(min(plain)[0] * 1e3, 1)
        row["speedup_plain"] = round(best_cold[0] / min(plain)[0], 2)
    return row


async def _conversation(client, i: int, turns: int, max_tokens: int, stats: dict) -> None:
    messages = [{"role": "system", "content": f"You are assistant number {i}. " + "Be helpful and brief. " * 40}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t} of conversation {i}: tell me about foxes."})
        reply = await client.chat.completions.create(model="default_model", messages=messages, max_tokens=max_tokens,
                                                     temperature=0.0)
        usage = reply.usage
        stats["prompt_tokens"] += usage.prompt_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        stats["cached_tokens"] += (getattr(details, "cached_tokens", None) or 0) if details else 0
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})


async def chat_load(port: int, conversations: int, turns: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=1800)
    warm = {"prompt_tokens": 0, "cached_tokens": 0}
    await _conversation(client, -1, 2, 4, warm)  # warm-up, not counted
    stats = {"prompt_tokens": 0, "cached_tokens": 0}
    start = time.perf_counter()
    await asyncio.gather(*(_conversation(client, i, turns, max_tokens, stats) for i in range(conversations)))
    stats["wall_s"] = round(time.perf_counter() - start, 2)
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: a random one, see --preset)")
    ap.add_argument("--preset", default="qwen3-0.6b", help="benchmarks/checkpoints.py shape (random weights)")
    ap.add_argument("--small", action="store_true", help="the small float32 Qwen3 of async_overhead.py (CPU)")
    ap.add_argument("--prefix", type=int, default=2000, help="cached prefix length of the TTFT test (tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--servers", nargs="+", default=["amlx", "amlx-nocache", "mlx_lm"],
                    choices=["amlx", "amlx-nocache", "mlx_lm"])
    ap.add_argument("--ttft-only", action="store_true",
                    help="only the TTFT part with the cache on (no cache-off row, no servers)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.ttft_only:
        args.servers = []
    out: dict = {"ttft": [], "chat": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(args, Path(tmp))
        for cache in (True,) if args.ttft_only else (True, False):  # (the cache-on row has uncached TTFT too)
            row = asyncio.run(ttft(path, args.prefix, args.repeats, cache))
            print("ttft", json.dumps(row), flush=True)
            out["ttft"].append(row)
        for name in args.servers:
            port = _port()
            extra = ("--no-prefix-cache",) if name == "amlx-nocache" else ()
            proc = start_server("mlx_lm" if name == "mlx_lm" else "amlx", path, port, args.conversations, extra)
            try:
                out["chat"][name] = asyncio.run(chat_load(port, args.conversations, args.turns, args.max_tokens))
                print("chat", name, json.dumps(out["chat"][name]), flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    print("\n| server | wall s | prompt tokens | served from cache |\n|---|---|---|---|")
    for name, s in out["chat"].items():
        print(f"| {name} | {s['wall_s']} | {s['prompt_tokens']} | {s['cached_tokens']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
