"""llguidance's parallel mask fill when a step's rows come from G separately compiled copies of
one grammar (amlx.constrain.matcher's MASK_LEXERS) instead of one.

    python benchmarks/mask_lexers.py [--rows 64] [--steps 40] [--groups 1 2 4 8 16 64] [--threads 0 1]

Writes the qwen3-vocab checkpoint (Qwen3's 151,936-token vocabulary) once, compiles structured.py's
JSON schema G times, gives `rows` matchers out in turn from the copies, and walks them along random
allowed tokens for `steps` steps, filling every live row's mask in one parallel call per step (what
the engine does each step). Prints, per pool size (0: llguidance's default, 80% of the cores) and G,
milliseconds a step (mean and median, best of two walks) and milliseconds a compile. Matchers copied
from one compiled grammar share its lexer, behind a lock every mask takes: their rows fill one after
another whatever the pool's size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoints import write_benchmark_checkpoint  # noqa: E402
from structured import RESPONSE_FORMAT  # noqa: E402

VOCAB = 151936


def walk(llguidance, llnp, pool, tokenizer, grammar: str, groups: int, rows: int, steps: int) -> dict:
    """One walk: (mean ms a step, median ms a step, steps, ms a compile)."""
    t0 = time.perf_counter()
    templates = [llguidance.LLMatcher(tokenizer, grammar, log_level=0) for _ in range(groups)]
    compile_ms = (time.perf_counter() - t0) * 1e3 / groups
    matchers = [templates[i % groups].deep_copy() for i in range(rows)]
    masks = llnp.allocate_token_bitmask(rows, VOCAB)
    rng = np.random.default_rng(1)
    times = []
    for _ in range(steps):
        live = [i for i in range(rows) if not matchers[i].is_stopped()]
        if not live:
            break
        t0 = time.perf_counter()
        llnp.fill_next_token_bitmask_par(pool, [(matchers[i], i) for i in live], masks)
        times.append((time.perf_counter() - t0) * 1e3)
        for i in live:
            bits = np.unpackbits(masks[i].view(np.uint8), bitorder="little")[:VOCAB]
            assert matchers[i].consume_token(int(rng.choice(np.flatnonzero(bits))))
    return {"step_ms_mean": float(np.mean(times)), "step_ms_median": float(np.median(times)), "steps": len(times),
            "compile_ms": compile_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--threads", type=int, nargs="+", default=[0], help="llguidance pool sizes (0: its default)")
    ap.add_argument("--root", default="/tmp/amlx-mask-lexers", help="where the checkpoint is written (once)")
    args = ap.parse_args()
    import llguidance
    import llguidance.numpy as llnp

    from amlx.constrain.matcher import mask_slices
    from amlx.constrain.spec import parse_constraint
    from amlx.tokenizer import Tokenizer

    path = Path(args.root) / "qwen3-vocab"
    if not (path / "tokenizer.json").exists():
        write_benchmark_checkpoint(path, "qwen3-vocab")
    tok = Tokenizer.from_dir(path)
    tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=VOCAB, eos_token=sorted(tok.eos_token_ids) or None,
                                       slices=mask_slices())
    grammar = parse_constraint(response_format=RESPONSE_FORMAT).grammar
    print(json.dumps({"cpus": len(os.sched_getaffinity(0)), "rows": args.rows}), flush=True)
    for threads in args.threads:
        pool = llguidance.LLExecutor(threads) if threads else llguidance.LLExecutor()
        for groups in args.groups:
            best = min((walk(llguidance, llnp, pool, tokenizer, grammar, groups, args.rows, args.steps) for _ in range(2)),
                       key=lambda r: r["step_ms_mean"])
            print(json.dumps({"threads": threads or "default", "groups": groups,
                              **{k: round(v, 3) if isinstance(v, float) else v for k, v in best.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
