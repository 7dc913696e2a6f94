"""Single-stream decode tok/s of one checkpoint through amlx's public API only, so that
any commit's amlx can run it (`run_gpu.sh bisect` puts trees of earlier commits first
on PYTHONPATH, one process each, alternating).

    python benchmarks/single_stream.py CHECKPOINT --label NAME [--runs 4] [--tokens 256] [--same-prompt]

Prints one line, `RESULT {json}`: the label, the best and every run's tok/s (a
128-token random prompt, then `--tokens` tokens; a warm-up request first), the load's
seconds, and with AMLX_STEP_TIMING=1 (where the commit has it) the milliseconds a
decode step spends in each phase of the engine's rounds (wall and CPU).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--label", default="")
    ap.add_argument("--runs", type=int, default=4, help="requests timed (default 4); the best is reported")
    ap.add_argument("--tokens", type=int, default=256, help="tokens a request decodes (default 256)")
    ap.add_argument("--same-prompt", action="store_true",
                    help="one prompt for every timed request, as speed.py sends it (from the second on, served "
                         "from the prefix cache where the commit has one); default: a new prompt each time")
    a = ap.parse_args()
    import amlx

    t0 = time.perf_counter()
    model = amlx.load_sync(a.checkpoint, max_batch_size=64)  # (as speed.py loads it)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = model.tokenizer.vocab_size
    low, high = min(1000, vocab // 2), min(vocab, 30000)  # ordinary tokens, as speed.py's prompts
    model.complete_sync(rng.integers(low, high, size=128).tolist(), max_tokens=32)
    sched = model.engine.scheduler
    timing = getattr(sched, "timing", None)  # (older commits have none)
    before = timing.snapshot() if timing is not None and timing.enabled else None
    steps = getattr(sched, "decode_steps", 0)
    runs = []
    same = rng.integers(low, high, size=128).tolist()
    for _ in range(a.runs):
        prompt = same if a.same_prompt else rng.integers(low, high, size=128).tolist()
        times = [time.perf_counter() for _ in model.generate_sync(prompt, max_tokens=a.tokens)]
        runs.append(round((len(times) - 1) / (times[-1] - times[0]), 1))
    out = {"label": a.label, "best": max(runs), "runs": runs, "load_s": round(load_s, 1)}
    if before is not None:
        after, n = timing.snapshot(), max(sched.decode_steps - steps, 1)
        out["steps"] = n
        for kind in ("seconds", "cpu"):
            out[f"ms_{kind}"] = {k: round(1e3 * (v - before[kind].get(k, 0.0)) / n, 3)
                                 for k, v in after[kind].items() if v > before[kind].get(k, 0.0)}
    print("RESULT " + json.dumps(out), flush=True)
    model.close()


if __name__ == "__main__":
    main()
