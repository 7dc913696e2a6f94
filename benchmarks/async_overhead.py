"""What the async API costs: one stream's tokens/s through `async for` against the
engine's own single-request loop, same checkpoint, same process, same run.

Three ways to decode the same greedy request (so the same tokens, checked):

  model loop    the model driven directly, as one job on the worker thread
                (`Engine.run_sync`): prefill, then greedy step/read per token;
                no scheduler, no channel, no event loop
  generate_sync the engine proper (scheduler + channel) read by a blocking
                consumer thread
  async for     the engine read by `async for tok in model.generate(...)` on an
                asyncio event loop (uvloop too, with --uvloop)

Decode rate = (tokens - 1) / (time of last token - time of first token), so the
prompt and the first token (prefill) are left out; the runs alternate, and the
median of --repeats runs of each is reported with the ratio async / model loop
(the target is >= 0.97).

    python benchmarks/async_overhead.py [--model DIR] [--tokens 128] [--repeats 3] [--uvloop]

Without --model a random Qwen3 (hidden 512, 8 layers, 8 heads / 4 kv heads,
intermediate 1536, float32, the tests' tiny BPE tokenizer) is written to a temp
dir with tests/helpers/checkpoints.py (needs torch + transformers).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCH_SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=64)


def bench_checkpoint(dirpath: Path, dtype: str = "float32") -> Path:
    """A random Qwen3 big enough that a decode step is not trivially small."""
    from tests.helpers.checkpoints import make_checkpoint

    # std/embed_std small enough for a realistic (not saturated) softmax on 8 layers
    return make_checkpoint(dirpath, "qwen3", dtype=dtype, seed=0, std=0.05, embed_std=0.3, **BENCH_SHAPE)


def ordinary_ids(tokenizer) -> np.ndarray:
    """Token ids to draw random prompts from: no special tokens, at most the first 30k."""
    ids = np.arange(min(tokenizer.vocab_size, 30000))
    return ids[~np.isin(ids, list(tokenizer.special_token_ids))]


def pick_prompt(model, n_tokens: int, seed: int = 0, length: int = 32) -> list[int]:
    """A prompt whose greedy continuation runs the full n_tokens (no EOS on the way)."""
    rng = np.random.default_rng(seed)
    ordinary = ordinary_ids(model.tokenizer)
    best, best_len = None, -1
    for _ in range(20):
        prompt = [int(x) for x in rng.choice(ordinary, size=length)]
        n = len(model.complete_sync(prompt, max_tokens=n_tokens).token_ids)
        if n == n_tokens:
            return prompt
        if n > best_len:
            best, best_len = prompt, n
    print(f"(no EOS-free prompt found; using one that gives {best_len} tokens)")
    return best


def run_model_loop(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy decoding of one request straight through the model, as one job on the
    worker thread (the thread that owns MLX): uncompiled, unpipelined steps."""
    from amlx._mlx import array, int32, ops

    lm = model.engine.model

    def job():
        ids, times = [], []
        cache = lm.make_cache()
        try:
            logits = lm(array(np.asarray([prompt], np.int32)), cache, 0,
                        last=array(np.asarray([len(prompt) - 1], np.int32)))
            pos = len(prompt)
            while True:
                token = ops.argmax(ops.reshape(logits, (1, logits.shape[2])), -1)
                for c in cache:
                    c.reserve(pos + 1)
                ids.append(int(token.item()))
                times.append(time.perf_counter())
                if len(ids) == n or ids[-1] in model.engine.eos_ids:
                    return ids, times
                logits = lm(ops.reshape(token.astype(int32), (1, 1)), cache, array(np.array([pos], np.int32)))
                pos += 1
        finally:
            for c in cache:
                c.close()

    return model.engine.run_sync(job)


def run_sync(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    ids, times = [], []
    for tok in model.generate_sync(prompt, max_tokens=n):
        times.append(time.perf_counter())
        ids.append(tok.id)
    return ids, times


def run_async(model, prompt: list[int], n: int, use_uvloop: bool = False) -> tuple[list[int], list[float]]:
    async def main():
        ids, times = [], []
        async for tok in model.generate(prompt, max_tokens=n):
            times.append(time.perf_counter())
            ids.append(tok.id)
        return ids, times

    if use_uvloop:
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a generated one)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uvloop", action="store_true", help="also time async for on uvloop")
    args = ap.parse_args(argv)

    import amlx

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or bench_checkpoint(Path(tmp) / "qwen3-512x8")
        model = amlx.load_sync(path)
        try:
            print(f"model: {model.info.architecture} {model.info.parameters / 1e6:.1f}M params "
                  f"{model.info.dtype} on {model.info.device}; {args.tokens} tokens, {args.repeats} repeats")
            prompt = pick_prompt(model, args.tokens)
            ways = {"model loop (no engine)": lambda: run_model_loop(model, prompt, args.tokens),
                    "engine, generate_sync": lambda: run_sync(model, prompt, args.tokens),
                    "engine, async for (asyncio)": lambda: run_async(model, prompt, args.tokens)}
            if args.uvloop:
                ways["engine, async for (uvloop)"] = lambda: run_async(model, prompt, args.tokens, True)
            rates: dict[str, list[float]] = {k: [] for k in ways}
            reference = None
            for k, fn in ways.items():  # warm-up: compiles every shape used below
                ids, _ = fn()
                if reference is None:
                    reference = ids
                if ids != reference:
                    raise AssertionError(f"{k} gave other tokens than the model loop")
            for _ in range(args.repeats):
                for k, fn in ways.items():
                    ids, times = fn()
                    assert ids == reference, k
                    rates[k].append(decode_rate(times))
        finally:
            model.close()

    base = statistics.median(rates["model loop (no engine)"])
    width = max(map(len, rates))
    print(f"{'':{width}}  {'tok/s (median)':>14}  {'min':>8}  {'max':>8}  {'ratio':>6}")
    for k, r in rates.items():
        med = statistics.median(r)
        print(f"{k:{width}}  {med:14.1f}  {min(r):8.1f}  {max(r):8.1f}  {med / base:6.3f}")
    ratio = statistics.median(rates["engine, async for (asyncio)"]) / base
    layer = statistics.median(rates["engine, async for (asyncio)"]) / statistics.median(rates["engine, generate_sync"])
    print(f"\nasync for / model loop = {ratio:.3f}  (target >= 0.97)")
    print(f"async for / generate_sync = {layer:.3f}  (the event-loop hand-over alone: same scheduler, same steps)")
    print("(the model loop runs uncompiled, unpipelined steps; the engine's scheduler\n"
          " compiles its step and launches step t+1 before reading step t)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
