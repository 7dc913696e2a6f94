"""Single-stream decode at long contexts, amlx beside mlx-lm: tok/s of the tokens after the
first, behind a random prompt of each `--contexts` length, each side in a process of its own,
sides alternating, best of `--rounds`.

    python benchmarks/long_context.py CHECKPOINT [--contexts 1024 4096 16384] [--tokens 64] [--rounds 2]
        [--sides amlx amlx-unsplit mlx-lm amlx:VAR=VALUE[,VAR=VALUE...]]

`amlx-unsplit` is amlx with AMLX_SPLIT_KEYS=0: the CUDA decode kernel reads each row's slots in
one block, as before the split (decode_attention.SPLIT_KEYS), so the two show what the split
does as the context grows. `amlx:VAR=VALUE,...` is amlx with those environment variables, e.g.
`amlx:AMLX_ATTENTION_LANE_DIMS=0` (the attention kernel's one-key loop). Prints a table and `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np


def _side(side: str, path: str, contexts: list[int], tokens: int) -> dict[int, float]:
    rng = np.random.default_rng(0)
    if side.startswith("amlx"):
        import amlx

        model = amlx.load_sync(path, max_batch_size=4, prefix_cache=False)
        generate = lambda p: model.generate_sync(p, max_tokens=tokens, temperature=0.0)  # noqa: E731
        vocab = model.tokenizer.vocab_size
    else:
        from mlx_lm import load, stream_generate

        model, tokenizer = load(path)
        generate = lambda p: stream_generate(model, tokenizer, p, max_tokens=tokens)  # noqa: E731
        vocab = tokenizer.vocab_size
    low, high = min(1000, vocab // 2), min(vocab, 30000)
    for _ in generate(rng.integers(low, high, size=128).tolist()):  # warm-up: compiles the kernels
        pass
    out = {}
    for n in contexts:
        for _ in generate(rng.integers(low, high, size=n).tolist()):  # this length's shapes first
            pass
        times = [time.perf_counter() for _ in generate(rng.integers(low, high, size=n).tolist())]
        out[n] = round((len(times) - 2) / (times[-1] - times[1]), 1)  # (from the second token: no prefill)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded a request (default 64)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, sides alternating (default 2); best kept")
    ap.add_argument("--sides", nargs="+", default=["amlx", "amlx-unsplit", "mlx-lm"],
                    help="amlx, amlx-unsplit, mlx-lm, or amlx:VAR=VALUE[,VAR=VALUE...] (default: %(default)s)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    a = ap.parse_args()
    for side in a.sides:
        if side not in ("amlx", "amlx-unsplit", "mlx-lm") and not re.fullmatch(r"amlx:\w+=[^,]*(,\w+=[^,]*)*", side):
            ap.error(f"--sides: {side!r} is not amlx, amlx-unsplit, mlx-lm or amlx:VAR=VALUE[,VAR=VALUE...]")
    if a.side:
        print("RESULT " + json.dumps(_side(a.side, a.checkpoint, a.contexts, a.tokens)), flush=True)
        return 0
    best: dict[str, dict[int, float]] = {s: {} for s in a.sides}
    for r in range(a.rounds):
        for side in a.sides[r % len(a.sides):] + a.sides[:r % len(a.sides)]:  # (a different side first each round)
            env = dict(os.environ)
            if side == "amlx-unsplit":
                env["AMLX_SPLIT_KEYS"] = "0"
            elif side.startswith("amlx:"):
                env.update(kv.split("=", 1) for kv in side[len("amlx:"):].split(","))
            proc = subprocess.run([sys.executable, __file__, a.checkpoint, "--side", side, "--tokens", str(a.tokens),
                                   "--contexts", *map(str, a.contexts)], capture_output=True, text=True, env=env)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not found:
                print(f"{side} round {r + 1} failed (status {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            got = {int(k): v for k, v in json.loads(found[-1][7:]).items()}
            print(f"round {r + 1} {side}: {got}", flush=True)
            for n, v in got.items():
                best[side][n] = max(best[side].get(n, 0.0), v)
    print("\n| context | " + " | ".join(f"{s} tok/s" for s in a.sides) + " |")
    print("|---:|" + "---:|" * len(a.sides))
    for n in a.contexts:
        print(f"| {n} | " + " | ".join(str(best[s].get(n, "-")) for s in a.sides) + " |")
    print("RESULT " + json.dumps({"checkpoint": a.checkpoint, "best": best}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
