"""llguidance's mask fill for structured.py's JSON schema: its default slices against amlx's.

    python benchmarks/mask_fill.py [--rows 64] [--steps 60] [--repeats 3]

Writes the qwen3-vocab checkpoint (Qwen3's 151,936-token vocabulary) once, then walks `rows`
matchers of structured.py's schema (strings with maxLength 24 and 12) with random allowed
tokens, as a random-weight model under the mask does, for `steps` steps. Every step fills
each row's mask twice, with a tokenizer built with llguidance's default slices and with amlx's
(`amlx.constrain.matcher.mask_slices`), timing each row alone on one thread, then all rows in
one parallel call per side (what the engine does each step), and checks the masks are equal.
Prints microseconds a row (mean, p99, max) and milliseconds a step, per side; best of
`repeats` walks (each from the same seed).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoints import write_benchmark_checkpoint  # noqa: E402
from structured import RESPONSE_FORMAT  # noqa: E402


def walk(tokenizers: dict, grammar: str, rows: int, steps: int, seed: int) -> dict:
    import llguidance
    import llguidance.numpy as llnp

    rng = np.random.default_rng(seed)
    pool = llguidance.LLExecutor()
    sides = {}
    for name, t in tokenizers.items():
        template = llguidance.LLMatcher(t, grammar, log_level=0)
        # (two sets of matchers in step: a matcher keeps the mask it computed, so a second
        # fill in the same state would time nothing)
        sides[name] = {"m": [template.deep_copy() for _ in range(rows)],
                       "alone": [template.deep_copy() for _ in range(rows)], "row_us": [], "step_ms": [],
                       "masks": llnp.allocate_token_bitmask(rows, 151936),
                       "row_masks": llnp.allocate_token_bitmask(rows, 151936)}
    names = list(sides)
    for _ in range(steps):
        live = [i for i in range(rows) if not sides[names[0]]["m"][i].is_stopped()]
        if not live:
            break
        for name in names:
            s = sides[name]
            t0 = time.perf_counter()
            llnp.fill_next_token_bitmask_par(pool, [(s["m"][i], i) for i in live], s["masks"])
            s["step_ms"].append((time.perf_counter() - t0) * 1e3)
            for i in live:
                t0 = time.perf_counter()
                llnp.fill_next_token_bitmask(s["alone"][i], s["row_masks"], i)
                s["row_us"].append((time.perf_counter() - t0) * 1e6)
        first = sides[names[0]]["masks"]
        for name in names:
            for other in ("masks", "row_masks"):
                if not np.array_equal(first[live], sides[name][other][live]):
                    raise SystemExit(f"masks differ between {names[0]} and {name} ({other})")
        for i in live:
            bits = np.unpackbits(first[i].view(np.uint8), bitorder="little")[:151936]
            token = int(rng.choice(np.flatnonzero(bits)))
            for name in names:
                assert sides[name]["m"][i].consume_token(token) and sides[name]["alone"][i].consume_token(token)
    return {name: {"row_us_mean": float(np.mean(s["row_us"])), "row_us_p99": float(np.percentile(s["row_us"], 99)),
                   "row_us_max": float(np.max(s["row_us"])), "step_ms_mean": float(np.mean(s["step_ms"])),
                   "rows_filled": len(s["row_us"])}
            for name, s in sides.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", help="keep the checkpoint in ROOT/qwen3-vocab (written once)")
    args = ap.parse_args()
    import llguidance

    from amlx.constrain.matcher import mask_slices
    from amlx.constrain.spec import parse_constraint
    from amlx.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.root or tmp) / "qwen3-vocab"
        if not (path / "tokenizer.json").exists():
            write_benchmark_checkpoint(path, "qwen3-vocab")
        tok = Tokenizer.from_dir(path)
        text, eos = tok.backend.to_str(), sorted(tok.eos_token_ids) or None
        tokenizers = {"llguidance default slices": llguidance.LLTokenizer(text, n_vocab=151936, eos_token=eos),
                      "amlx slices": llguidance.LLTokenizer(text, n_vocab=151936, eos_token=eos, slices=mask_slices())}
        grammar = parse_constraint(response_format=RESPONSE_FORMAT).grammar
        best: dict = {}
        for _ in range(args.repeats):
            for name, r in walk(tokenizers, grammar, args.rows, args.steps, seed=1).items():
                if name not in best or r["step_ms_mean"] < best[name]["step_ms_mean"]:
                    best[name] = r
        print(json.dumps({"rows": args.rows, "steps": args.steps, "masks_equal": True, "results": best}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
