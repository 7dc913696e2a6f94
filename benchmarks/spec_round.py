"""Host cost of a speculative round against a plain decode step (prompt lookup, one stream).

A model whose step is pure host time (the embedded demo model, or the copy model that
speculative.py's lookup part trains) decodes the same greedy request plainly and with
`draft="prompt_lookup"`; the worker's rounds are timed one by one (`Scheduler.step`
wrapped in the worker thread) and sorted into verify rounds (the speculator's
verified-row count moved) and plain ones. Reported: ms per plain step of the plain
engine, ms per verify round and tokens per verify round of the speculative one, the
decode rate of both, and (--profile) where a verify round's host time goes (cProfile
of the verify rounds, in the worker thread, cumulative time per function).

    python benchmarks/spec_round.py [--model DIR] [--k 4] [--tokens 256] [--repeats 5] [--profile]

Runs alternate plain and lookup, best of --repeats each. On a CPU by default (--device gpu: the worker's
CPU time then includes any spinning while it waits for the GPU).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class RoundTimer:
    """Wraps a scheduler's `step` (called by the worker thread) to time each round and,
    when asked, profile the verify rounds."""

    def __init__(self, sched, profile: bool):
        self.sched, self.rounds = sched, []  # (seconds, was a verify round, tokens made)
        self.profiler = cProfile.Profile() if profile else None
        self._step = sched.step
        sched.step = self._timed

    def _verified(self) -> int:
        spec = self.sched.speculator
        return 0 if spec is None else spec.stats.snapshot()["verified_rows"]

    def _timed(self) -> None:
        before, made = self._verified(), self.sched.tokens_generated
        prof = self.profiler if self.sched.speculator is not None else None
        t0, c0 = time.perf_counter(), time.thread_time()
        if prof is not None:
            prof.enable()
        try:
            self._step()
        finally:
            if prof is not None:
                prof.disable()
            # wall time, and the worker thread's CPU time (its host work: Python, graph building,
            # launching; MLX computes in threads of its own), less sensitive to a busy machine
            self.rounds.append((time.perf_counter() - t0, self._verified() > before,
                                self.sched.tokens_generated - made, time.thread_time() - c0))


def decode(model, prompt, tokens: int) -> dict:
    sched = model.engine.scheduler
    timer = RoundTimer(sched, False)
    try:
        times, ids = [time.perf_counter()], []
        for tok in model.generate_sync(prompt, max_tokens=tokens, temperature=0.0, max_buffer=tokens + 32):
            times.append(time.perf_counter())
            ids.append(tok.id)
    finally:
        sched.step = timer._step
    rounds = [r for r in timer.rounds if r[2] > 0]
    verify = [r for r in rounds if r[1]]
    plain = [r for r in rounds if not r[1]]
    ms = lambda rs, i=0: 1e3 * sum(r[i] for r in rs) / len(rs) if rs else None  # noqa: E731
    return {"ids": ids, "decode_tps": (len(ids) - 1) / (times[-1] - times[1]),
            "plain_ms": ms(plain[1:]),  # (the first: the prefill's round)
            "plain_host_ms": ms(plain[1:], 3), "verify_host_ms": ms(verify, 3),
            "verify_ms": ms(verify), "verify_rounds": len(verify),
            "tokens_per_verify": sum(r[2] for r in verify) / len(verify) if verify else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the embedded demo model)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true", help="print where the verify rounds' host time goes")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("AMLX_MEASURE_DRAFT_COSTS", "0")  # the fixed constants: lengths do not vary by timing
    import amlx
    from amlx.demo import default_model_dir

    path = args.model or default_model_dir()
    opts = {"device": args.device, "max_batch_size": 4}
    plain = amlx.load_sync(path, **opts)
    spec = amlx.load_sync(path, draft="prompt_lookup", num_draft_tokens=args.k, **opts)
    from speculative import copy_records

    # the first passage of speculative.py's lookup part (what its copy model learned)
    prompt = copy_records(1, seed=12345, lo=12, hi=12)[0]["messages"][:1]
    best: dict[str, dict] = {}
    host: dict[str, list[dict]] = {}  # every run (host CPU time: the least of them)
    try:
        for _ in range(2):  # untimed: traces and compiles
            decode(plain, prompt, args.tokens)
            decode(spec, prompt, args.tokens)
        for _ in range(args.repeats):
            for name, model in (("plain", plain), ("lookup", spec)):
                r = decode(model, prompt, args.tokens)
                host.setdefault(name, []).append(r)
                if name not in best or r["decode_tps"] > best[name]["decode_tps"]:
                    best[name] = r
        if args.profile:
            timer = RoundTimer(spec.engine.scheduler, True)
            try:
                for _ in range(3):
                    for _ in spec.generate_sync(prompt, max_tokens=args.tokens, temperature=0.0,
                                                max_buffer=args.tokens + 32):
                        pass
            finally:
                spec.engine.scheduler.step = timer._step
            out = io.StringIO()
            pstats.Stats(timer.profiler, stream=out).sort_stats("cumulative").print_stats(45)
            print(out.getvalue())
    finally:
        plain.close()
        spec.close()
    p, s = best["plain"], best["lookup"]
    rows = {"plain step ms": p["plain_ms"], "verify round ms": s["verify_ms"],
            "plain step host cpu ms": min(r["plain_host_ms"] for r in host["plain"]),
            "verify round host cpu ms": min(r["verify_host_ms"] for r in host["lookup"]),
            "verify round / plain step": s["verify_ms"] / p["plain_ms"] if s["verify_ms"] else None,
            "tokens per verify round": s["tokens_per_verify"], "verify rounds": s["verify_rounds"],
            "plain tok/s": p["decode_tps"], "lookup tok/s": s["decode_tps"],
            "lookup vs plain": s["decode_tps"] / p["decode_tps"]}
    rows["tokens"] = len(p["ids"])
    rows["output equals plain"] = p["ids"] == s["ids"]  # (greedy: it must)
    rows["amlx"] = str(Path(amlx.__file__).parent)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows.items()}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
