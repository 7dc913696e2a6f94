"""Speculative decoding end to end (issue 17): single-stream greedy decode through the public
API, `amlx.load(path, draft=..., num_draft_tokens=k)`, against the same model without a draft,
and against mlx-lm's speculative decoding on the same pair.

Two parts, each one call (about 4 minutes or less on an H200; run_gpu.sh spec-all bounds them):

  draft   a random-weight Qwen3-8B target (bf16, benchmarks/checkpoints.py) with the drafts
          --modes names, "<draft>-k<k>[-every|-fixed]": q4 is the target's own 4-bit copy
          (`amlx convert -q 4`: it agrees with the target as far as 4-bit rounding lets it;
          random weights: the acceptance is whatever it is, and is reported and checked), a
          checkpoints.py shape (qwen3-0.6b) a random draft of that shape (acceptance ~0: the
          cost of the rounds). Length policy: none, the engine's adaptive length with the cost
          model it measures; -every, k drafts every round (AMLX_ADAPTIVE_DRAFT=0), as mlx-lm
          drafts, which runs only these modes (`stream_generate(draft_model=...,
          num_draft_tokens=k)`); -fixed, adaptive with the fixed cost constants. Each side
          runs in a process of its own holding its models (amlx: one engine per mode, the
          target in each; mlx-lm: the target and the drafts), driven over a pipe; a short
          untimed run of each mode first, then runs alternating, best of --repeats. Every call
          to a side is bounded by --call-timeout: a side that overruns is stopped and left out,
          the other goes on; each result is printed as it comes. After the first round, for
          each -every mode (benchmarks/spec_checks.py): the draft's teacher-forced greedy
          agreement with the target's output, the (drafted, accepted) it predicts beside the
          engine's counts, and the first greedy divergence from plain with both runs' top-2
          logprobs against the logprob noise between them (a rounding flip, or a bug).
  lookup  prompt lookup (`draft="prompt_lookup"`) on a task that copies its input: the
          embedded demo model (amlx/embedded, a 0.9M-parameter Qwen3 amlx trained) fine-tuned
          here by amlx (`Model.train`, full fine-tuning) to answer "Repeat this text:\\n<P>"
          with P (P: corpus sentences in random order; half the training records are the
          benchmark's own passages, which it learns by heart, half fresh ones), then decoded
          plain against prompt lookup at k = 4 and 8, alternating, best of --repeats; how well
          it copies passages it never saw is reported beside. mlx-lm has no prompt lookup.
          Each k runs with the measured cost model and with the fixed constants (-fixed).

Reported per mode: decode tok/s (first to last token, single stream), the speedup over the
same side's plain decode, tokens from drafts, acceptance (accepted / drafted; mlx-lm does not
report drafted tokens, so its acceptance is estimated as from_draft / (k x verify rounds),
a round being a token that did not come from the draft), and whether the greedy output equals
the plain run's (it must for amlx). The lookup part also reports how much of the passage the
model reproduced (its copy fidelity), so acceptance can be read against it.

    python benchmarks/speculative.py draft  --out OUT [--target qwen3-8b] [--modes q4-k4,q4-k4-every] [--tokens 256]
    python benchmarks/speculative.py lookup --out OUT [--train-steps 400]
    python benchmarks/speculative.py draft --small --out /tmp/spec    # tiny shapes, for a CPU
    python benchmarks/speculative.py lookup --small --out /tmp/spec

Writes OUT/speculative_<part>.json and .md after every round of runs (what was measured is kept
if the budget runs out), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from checkpoints import write_benchmark_checkpoint  # noqa: E402
from child_process import Child as ChildProcess, run_meta, serve  # noqa: E402

KV_MEMORY = 2 << 30  # bytes per engine: a few hundred positions of one stream need far less


def _timing(times: list[float], ids: list[int]) -> dict:
    """Decode rate between the first and the last token (prefill excluded), and overall."""
    n = len(ids)
    decode = (n - 1) / (times[-1] - times[1]) if n > 1 and times[-1] > times[1] else 0.0
    return {"tokens": n, "ttft_s": times[1] - times[0] if n else None, "decode_tps": decode,
            "total_s": times[-1] - times[0], "ids": ids}


# -- the children: models held in a process of their own, commands as JSON lines --------

def load_costs(measure: bool, load, *args, **kwargs):
    """`load` with the adaptive draft length's cost model measured by the engine (the GPU's
    default) or its fixed constants (the CPU's default), whatever the device."""
    old = os.environ.get("AMLX_MEASURE_DRAFT_COSTS")
    os.environ["AMLX_MEASURE_DRAFT_COSTS"] = "1" if measure else "0"
    try:
        return load(*args, **kwargs)
    finally:
        if old is None:
            del os.environ["AMLX_MEASURE_DRAFT_COSTS"]
        else:
            os.environ["AMLX_MEASURE_DRAFT_COSTS"] = old


MODE = re.compile(r"(?P<label>.+)-k(?P<k>\d+)(?P<length>-every|-fixed)?")


def draft_modes(names: list[str]) -> dict[str, tuple[str, int, str]]:
    """The draft part's speculative modes, "<draft>-k<k>[-every|-fixed]" -> (draft label, k,
    length policy): "adaptive" (the engine's default: the adaptive length with the cost
    model it measures), "every" (k drafts every round, AMLX_ADAPTIVE_DRAFT=0: what mlx-lm
    does, and what the agreement check predicts), "fixed" (adaptive, fixed cost constants)."""
    modes = {}
    for name in names:
        m = MODE.fullmatch(name)
        if m is None:
            raise ValueError(f"a mode is <draft>-k<k>[-every|-fixed], e.g. q4-k4-every, not {name!r}")
        modes[name] = (m["label"], int(m["k"]), (m["length"] or "-adaptive")[1:])
    return modes


def _load_spec(target: str, draft: str, k: int, length: str, **opts):
    """`amlx.load_sync(target, draft=draft, num_draft_tokens=k)` with a mode's length policy."""
    import amlx

    env = {"AMLX_MEASURE_DRAFT_COSTS": "1" if length == "adaptive" else "0",
           "AMLX_ADAPTIVE_DRAFT": "0" if length == "every" else "1"}
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return amlx.load_sync(target, draft=draft, num_draft_tokens=k, **opts)
    finally:
        for key, value in old.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def _amlx_side(target: str, drafts: dict[str, str], modes: list[str]):
    import amlx

    t0 = time.perf_counter()
    opts = {"max_batch_size": 8, "kv_cache_memory": KV_MEMORY}
    models = {"plain": amlx.load_sync(target, **opts)}
    for mode, (label, k, length) in draft_modes(modes).items():
        models[mode] = _load_spec(target, drafts[label], k, length, **opts)
    ready = {"load_s": time.perf_counter() - t0}

    def handle(cmd: dict) -> dict:
        if cmd["op"] == "check":
            return amlx_check(models["plain"], models[cmd["mode"]], drafts[cmd["label"]], cmd["prompt"],
                              cmd["tokens"], cmd["k"], opts)
        return amlx_run(models[cmd["mode"]], cmd["prompt"], cmd["tokens"])

    def close() -> None:
        for m in models.values():
            m.close()
    return ready, handle, close


def amlx_check(plain, spec, draft_path: str, prompt: list[int], tokens: int, k: int, opts: dict) -> dict:
    """Why the acceptance is what it is, and whether greedy output left the plain one by
    rounding (benchmarks/spec_checks.py): the plain and speculative runs with their top-2
    logprobs, the first divergence's margins against the measured noise, the draft's
    teacher-forced agreement with the target's output, and the (drafted, accepted) a run
    drafting k every round would then see, beside the engine's own counts."""
    import amlx
    from spec_checks import agreement, divergence, expected_counts, greedy_with_top2, teacher_forced

    t0 = time.perf_counter()
    before = spec.stats()["speculative"]
    p_run, s_run = greedy_with_top2(plain, prompt, tokens), greedy_with_top2(spec, prompt, tokens)
    after = spec.stats()["speculative"]
    ids = [t[0] for t in p_run]
    with amlx.load_sync(draft_path, **opts) as draft:
        agree = agreement(teacher_forced(draft, prompt, ids), ids)
    target_agree = agreement(teacher_forced(plain, prompt, ids), ids)  # the target's own prefill vs its decode
    drafted, accepted = expected_counts(agree, len(ids), k)
    return {"divergence": divergence(p_run, s_run), "tokens": len(ids),
            "agreement": round(sum(agree[1:]) / max(1, len(agree) - 1), 4),
            "target_prefill_agrees_with_decode": round(sum(target_agree) / max(1, len(target_agree)), 4),
            "every_round_k": {"k": k, "drafted": drafted, "accepted": accepted,
                              "acceptance": round(accepted / drafted, 4) if drafted else None},
            "engine": {key: after[key] - before[key] for key in ("drafted_tokens", "accepted_tokens")},
            "seconds": round(time.perf_counter() - t0, 1)}


def amlx_run(model, prompt, tokens: int) -> dict:
    """One greedy generation; with a draft, the drafted and accepted tokens it added to stats()."""
    before = model.stats().get("speculative") or {}
    times, ids = [time.perf_counter()], []
    for tok in model.generate_sync(prompt, max_tokens=tokens, temperature=0.0):
        times.append(time.perf_counter())
        ids.append(tok.id)
    res = _timing(times, ids)
    after = model.stats().get("speculative")
    if after:
        for key in ("drafted_tokens", "accepted_tokens", "verified_rows"):
            res[key] = after[key] - before.get(key, 0)
        res["from_draft"] = res["accepted_tokens"]
        # the adaptive length's cost model as the engine measured it (per batch size; empty
        # when it uses the fixed constants)
        speculator = model.engine.scheduler.speculator
        res["cost_seconds"] = {str(b): {"plain": t["plain"], "draft": t["draft"],
                                        "verify": {str(w): v for w, v in t["verify"].items()}}
                               for b, t in speculator.cost_seconds.items()}
        res["cost_models"] = {str(b): {"verify_cost": c.verify_cost, "draft_cost": c.draft_cost}
                              for b, c in speculator.cost_models.items()}
    return res


def _mlx_lm_side(target: str, drafts: dict[str, str], modes: list[str]):
    from mlx_lm import load, stream_generate

    t0 = time.perf_counter()
    model, tokenizer = load(target)
    draft_models = {label: load(path)[0] for label, path in drafts.items()}
    ready = {"load_s": time.perf_counter() - t0}
    modes = draft_modes(modes)

    def handle(cmd: dict) -> dict:
        mode, prompt, tokens = cmd["mode"], cmd["prompt"], cmd["tokens"]
        kw = {}
        if mode != "plain":
            label, k, _ = modes[mode]
            kw = {"draft_model": draft_models[label], "num_draft_tokens": k}
        times, ids, from_draft = [time.perf_counter()], [], 0
        for r in stream_generate(model, tokenizer, prompt, max_tokens=tokens, **kw):
            times.append(time.perf_counter())
            ids.append(int(r.token))
            from_draft += bool(r.from_draft)
        res = _timing(times, ids)
        if kw:
            rounds = len(ids) - from_draft  # each verify round emits one token of the target's own
            res["from_draft"] = from_draft
            res["drafted_tokens"] = rounds * kw["num_draft_tokens"]  # an estimate: see the docstring
            res["accepted_tokens"] = from_draft
        return res
    return ready, handle, lambda: None


def child(side: str, target: str, drafts: dict[str, str], modes: list[str]) -> int:
    """Serves one side (child_process.serve): one decode run (or check) per command."""

    def start():
        if side == "amlx":
            return _amlx_side(target, drafts, modes)
        return _mlx_lm_side(target, drafts, [m for m in modes if mlx_lm_runs(m)])

    return serve(start)


def _pairs(drafts: dict[str, Path]) -> str:
    return ",".join(f"{label}={path}" for label, path in drafts.items())


def _unpairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(","))


class Child(ChildProcess):
    """A child process serving one side (child_process.Child); precompile() filled the
    quantized kernels' cache beforehand."""

    def __init__(self, side: str, target: Path, drafts: dict[str, Path], modes: list[str]):
        super().__init__(side, Path(__file__).resolve(), ["--target", str(target), "--draft", _pairs(drafts),
                                                          "--modes", ",".join(modes)])


def mlx_lm_runs(mode: str) -> bool:
    """mlx-lm drafts k tokens every round: it runs the plain and the "-every" modes."""
    return mode == "plain" or draft_modes([mode])[mode][2] == "every"


# -- shared bookkeeping ---------------------------------------------------------------

def _record(results: dict, side: str, mode: str, r: dict) -> None:
    """Keeps the best run (decode tok/s) of (side, mode), and every run's output for the checks."""
    slot = results.setdefault(side, {}).setdefault(mode, {"runs": 0, "outputs_differ": False})
    ids = r.pop("ids")
    if "ids" in slot and slot["ids"] != ids:
        slot["outputs_differ"] = True  # greedy runs of one mode must repeat exactly
    slot["ids"] = ids
    slot["runs"] += 1
    if "best" not in slot or r["decode_tps"] > slot["best"]["decode_tps"]:
        slot["best"] = r


def _summary(results: dict, extra=None) -> list[dict]:
    """One row per (side, mode): best decode tok/s, speedup over the side's plain mode,
    acceptance, and whether the output equals the plain one."""
    rows = []
    for side, modes in results.items():
        plain = modes.get("plain")
        for mode, slot in modes.items():
            if "best" not in slot:
                continue
            b = slot["best"]
            row = {"side": side, "mode": mode, "decode_tps": round(b["decode_tps"], 1), "tokens": b["tokens"],
                   "ttft_ms": round(1e3 * b["ttft_s"], 1) if b.get("ttft_s") is not None else None,
                   "runs": slot["runs"], "repeatable": not slot["outputs_differ"]}
            if plain and "best" in plain and plain["best"]["decode_tps"]:
                row["speedup"] = round(b["decode_tps"] / plain["best"]["decode_tps"], 3)
                n = min(len(plain["ids"]), len(slot["ids"]))
                row["equals_plain"] = plain["ids"] == slot["ids"]
                row["same_prefix"] = next((i for i in range(n) if plain["ids"][i] != slot["ids"][i]), n)
            if "drafted_tokens" in b:
                row["drafted"] = b["drafted_tokens"]
                row["accepted"] = b["accepted_tokens"]
                drafted = b["drafted_tokens"]
                row["acceptance"] = round(b["accepted_tokens"] / drafted, 3) if drafted else None
                row["from_draft_share"] = round(b["from_draft"] / b["tokens"], 3) if b["tokens"] else None
            if extra:
                row.update(extra(side, mode, slot))
            rows.append(row)
    return rows


def _markdown(title: str, rows: list[dict], notes: list[str], cols: list[tuple[str, str]]) -> str:
    lines = [f"## {title}", "", "| " + " | ".join(h for _, h in cols) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            plain_float = key in ("decode_tps", "ttft_ms")
            cells.append("–" if v is None else (f"{v:.3f}" if isinstance(v, float) and not plain_float else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


COLS = [("side", "side"), ("mode", "mode"), ("decode_tps", "decode tok/s"), ("speedup", "vs plain"),
        ("acceptance", "acceptance"), ("from_draft_share", "tokens from drafts"), ("equals_plain", "= plain"),
        ("same_prefix", "same prefix"), ("tokens", "tokens"), ("ttft_ms", "TTFT ms"), ("runs", "runs")]


def _cost_notes(results: dict) -> list[str]:
    """The cost models amlx's engines measured (from each mode's best run)."""
    notes = []
    for mode, slot in results.get("amlx", {}).items():
        for b, c in (slot.get("best", {}).get("cost_models") or {}).items():
            notes.append(f"amlx {mode}: cost model measured at batch {b}: verify_cost "
                         f"{', '.join(f'{x:.2f}' for x in c['verify_cost'])}, draft_cost {c['draft_cost']:.3f} "
                         f"(plain decode steps)")
    return notes


def _save(out: Path, part: str, payload: dict, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speculative_{part}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / f"speculative_{part}.md").write_text(md)


# -- part 1: the target's 4-bit copy as its draft ---------------------------------------

def _gpu() -> bool:
    """Whether MLX sees a GPU, asked in a child (the parent holds no MLX state)."""
    probe = "import sys; from amlx._mlx import device; sys.exit(0 if device.gpu_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", probe], timeout=120, cwd=ROOT).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def precompile(bits: int, group: int, hidden: int, timeout: float) -> list[subprocess.Popen]:
    """MLX's multi-row quantized-matmul variants (one per row tile), compiled side by side in
    child processes into the on-disk kernel cache both sides then read (20-50 s each on an
    H200, the first time on a machine). Started here, waited for by the caller."""
    return [subprocess.Popen([sys.executable, "-m", "amlx.models.warmup", "bfloat16", str(bits), str(group),
                              str(rows), str(hidden), str(hidden)], stdout=sys.stderr, cwd=ROOT)
            for rows in (2, 17, 33, 65, 129)]


def _draft_checkpoints(args, target: Path, labels: list[str], deadline: float, notes: list[str]) -> dict[str, Path]:
    """The drafts the modes name, written where missing: "q4" is the target's 4-bit copy
    (`amlx convert -q 4`), any other name a random checkpoint of that shape (seed 1, as
    speculative_cost.py writes it, so the two scripts share it under --root)."""
    out = {}
    for label in labels:
        t0 = time.perf_counter()
        if label == "q4":
            path = args.root / f"{args.target}-q4-copy"
            if not (path / "config.json").exists():
                subprocess.run([sys.executable, "-m", "amlx", "convert", str(target), str(path), "-q", "4"],
                               check=True, cwd=ROOT, stdout=sys.stderr,
                               timeout=max(1.0, deadline - time.monotonic()))
                notes.append(f"draft q4: `amlx convert {args.target} -q 4` in {time.perf_counter() - t0:.0f} s")
        else:
            path = args.root / f"{label}-seed1"
            if not (path / "config.json").exists():
                write_benchmark_checkpoint(path, label, seed=1)
                notes.append(f"draft {label}: random weights (seed 1) written in {time.perf_counter() - t0:.0f} s")
        out[label] = path
    return out


def _print_result(side: str, mode: str, r: dict) -> None:
    """One line per run as it comes (the call may end before the tables are written)."""
    extra = ""
    if r.get("drafted_tokens"):
        extra = f", acceptance {r['accepted_tokens'] / r['drafted_tokens']:.3f} ({r['accepted_tokens']}/" \
                f"{r['drafted_tokens']})"
    print(f"   {side} {mode}: {r['decode_tps']:.1f} tok/s over {r['tokens']} tokens{extra}", flush=True)


def part_draft(args) -> dict:
    began = time.monotonic()
    deadline = began + args.budget
    notes: list[str] = []
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    target = root / args.target
    t0 = time.perf_counter()
    if not (target / "config.json").exists():
        write_benchmark_checkpoint(target, args.target)
        notes.append(f"target {args.target} written in {time.perf_counter() - t0:.0f} s")
    spec_modes = draft_modes(args.modes.split(","))
    labels = list(dict.fromkeys(label for label, _, _ in spec_modes.values()))
    procs = []
    if not args.small and "q4" in labels and _gpu():
        cfg = json.loads((target / "config.json").read_text())
        procs = precompile(4, 64, cfg["hidden_size"], deadline - time.monotonic())
    drafts = _draft_checkpoints(args, target, labels, deadline, notes)
    t0 = time.perf_counter()
    for p in procs:
        try:
            p.wait(timeout=max(0.1, min(300.0, deadline - time.monotonic() - 60)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if procs:
        notes.append(f"quantized-matmul kernels compiled side by side, {time.perf_counter() - t0:.0f} s "
                     f"after the drafts were ready")
    print("== checkpoints ready", *notes, sep="\n   ", flush=True)

    sides = ["amlx"] if args.no_mlx_lm else ["amlx", "mlx_lm"]
    modes = ["plain", *spec_modes]
    import numpy as np

    prompt = np.random.default_rng(1).integers(1000, 30000, size=args.prompt).tolist()
    results: dict = {}
    checks: dict = {}
    payload = {"meta": run_meta(), "args": {k: str(v) for k, v in vars(args).items()}, "notes": notes,
               "results": results, "checks": checks}

    def save() -> str:
        payload["rows"] = _summary(results)
        md = _markdown(f"Speculative decoding, {args.target} bf16 with drafts {', '.join(drafts)} (q4: its own "
                       f"4-bit copy; single stream, greedy, {args.prompt}-token prompt, {args.tokens} tokens)",
                       payload["rows"], notes + _cost_notes(results) + _check_notes(checks), COLS)
        _save(args.out, "draft", payload, md)
        return md

    children = {side: Child(side, target, drafts, list(spec_modes)) for side in sides}

    def ask(side: str, **cmd) -> dict | None:
        """A command to one side within --call-timeout (and the budget); a side that does
        not answer in time is stopped and left out from then on, the other goes on."""
        c = children.get(side)
        if c is None:
            return None
        try:
            return c.ask(min(deadline, time.monotonic() + args.call_timeout), **cmd)
        except (TimeoutError, RuntimeError) as exc:
            notes.append(f"{side} stopped at {cmd.get('op')} {cmd.get('mode')} ({cmd.get('tokens')} tokens): {exc}")
            print(f"== {notes[-1]}", flush=True)
            children.pop(side).stop(grace=0)
            return None

    def runs(side: str, mode: str) -> bool:
        return side == "amlx" or mlx_lm_runs(mode)

    try:
        for side in list(children):
            try:
                payload.setdefault("load", {})[side] = children[side].wait_for("READY", deadline)
                print(f"== {side} loaded: {payload['load'][side]}", flush=True)
            except (TimeoutError, RuntimeError) as exc:
                notes.append(f"{side} did not load: {exc}")
                children.pop(side).stop(grace=0)
        for mode in modes:  # untimed, short: traces, compiles, fills kernel caches
            for side in list(children):
                if runs(side, mode):
                    t0 = time.monotonic()
                    if ask(side, op="run", mode=mode, prompt=prompt, tokens=args.warmup_tokens) is not None:
                        print(f"   warm-up {side} {mode}: {time.monotonic() - t0:.1f} s", flush=True)
        for rep in range(args.repeats):
            for mode in modes:
                for side in list(children):  # alternating, run by run
                    if runs(side, mode):
                        r = ask(side, op="run", mode=mode, prompt=prompt, tokens=args.tokens)
                        if r is not None:
                            _print_result(side, mode, r)
                            _record(results, side, mode, r)
            save()
            print(f"== round {rep + 1} of {args.repeats} done, {time.monotonic() - began:.0f} s", flush=True)
            if rep == 0 and args.check:
                # (the "-every" modes: their counts are what the agreement predicts)
                for mode, (label, k, length) in spec_modes.items():
                    if length == "every":
                        checks[mode] = ask("amlx", op="check", mode=mode, label=label, k=k, prompt=prompt,
                                           tokens=args.check_tokens)
                        print(f"== check {mode}: {json.dumps(checks[mode])}", flush=True)
                save()
    except (TimeoutError, RuntimeError) as exc:
        notes.append(f"stopped early: {exc}")
    finally:
        for c in children.values():
            c.stop()
    print(save())
    return payload


def _check_notes(checks: dict) -> list[str]:
    """The draft part's checks (amlx_check) in words."""
    notes = []
    for mode, c in checks.items():
        if not c:
            continue
        e, every = c["engine"], c["every_round_k"]
        notes.append(f"check {mode}: the draft's teacher-forced greedy agreement with the target's output "
                     f"{c['agreement']:.3f} over {c['tokens']} tokens; drafting k={every['k']} every round that "
                     f"gives {every['accepted']}/{every['drafted']} accepted; the engine's run: "
                     f"{e['accepted_tokens']}/{e['drafted_tokens']}; the target's own prefill argmax equals its "
                     f"decode {c['target_prefill_agrees_with_decode']:.3f} of the time")
        d = c["divergence"]
        noise = d["logprob_noise"]
        if d["first_divergence"] is None:
            notes.append(f"check {mode}: greedy output equal to plain over {d['compared']} tokens (largest move of "
                         f"a token's logprob between the plain and speculative runs: {noise['max']})")
        else:
            notes.append(f"check {mode}: output left plain at token {d['first_divergence']}: plain top-2 "
                         f"{d['plain_top2']}, speculative top-2 {d['spec_top2']} (margins {d['plain_margin']:.4f} / "
                         f"{d['spec_margin']:.4f}); a token's logprob moved by up to {noise['max']:.4f} (median "
                         f"{noise['median']:.4f}) between the runs over the {noise['positions']} tokens before: "
                         f"{'a near-tie flipped by rounding' if d['near_tie'] else 'NOT explained by rounding'}")
    return notes


# -- part 2: prompt lookup on a model fine-tuned to copy ------------------------------------

def _sentences() -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "scripts" / "demo_corpus.jsonl").read_text().splitlines()
            if line.strip()]
    found = {s.strip() for r in rows for m in r["messages"] if m["role"] == "assistant"
             for s in re.split(r"(?<=[.!?])\s+", m["content"])}
    return sorted(s for s in found if len(s) > 10)


def copy_records(n: int, seed: int, lo: int, hi: int) -> list[dict]:
    """Chat records: "Repeat this text:\\n<P>" -> P, P a random run of lo..hi corpus sentences."""
    sents, rng = _sentences(), random.Random(seed)
    out = []
    for _ in range(n):
        p = " ".join(rng.sample(sents, rng.randint(lo, hi)))
        out.append({"messages": [{"role": "user", "content": "Repeat this text:\n" + p},
                                 {"role": "assistant", "content": p}]})
    return out


def train_copy_model(dst: Path, steps: int, batch: int, device: str, fixed: list[dict]) -> dict:
    """Fine-tunes the embedded demo model to repeat its input (all weights, AdamW, cosine):
    half the records are `fixed` (the benchmark's passages, learned by heart: a model this
    small learns to copy unseen text only after far more steps than a benchmark call has),
    half fresh random passages."""
    import asyncio

    import amlx
    from amlx.demo import default_model_dir

    fresh = copy_records(steps * batch, seed=0, lo=3, hi=12)
    data = [fixed[i % len(fixed)] if i % 2 else fresh[i] for i in range(steps * batch)]
    losses: list[float] = []

    async def run() -> float:
        t0 = time.perf_counter()
        async with await amlx.load(default_model_dir(), device=device) as model:
            async for ev in model.train(data, iters=steps, batch_size=batch, learning_rate=2e-3,
                                        lr_schedule="cosine", warmup=min(20, steps // 5), min_lr=1e-4,
                                        grad_clip=1.0, seed=0, save_path=dst, save_every=steps):
                if ev.kind == "step":
                    losses.append(ev.loss)
                    if ev.step % 50 == 0 or ev.step == steps:
                        print(f"   step {ev.step} loss {ev.loss:.3f}", flush=True)
        return time.perf_counter() - t0
    seconds = asyncio.run(run())
    return {"steps": steps, "batch": batch, "seconds": round(seconds, 1),
            "first_loss": round(losses[0], 3) if losses else None,
            "last_loss": round(losses[-1], 3) if losses else None}


def _copied(text: str, want: str) -> float:
    """Share of `want` reproduced before the first character that differs."""
    same = next((i for i, (x, y) in enumerate(zip(text, want)) if x != y), min(len(text), len(want)))
    return same / len(want)


def part_lookup(args) -> dict:
    import amlx

    began = time.monotonic()
    notes: list[str] = []
    device = "cpu" if args.small else "auto"
    model_dir = args.copy_model or (args.root / "copy-model")
    # the benchmark's passages (12 sentences each; seed apart from the fresh training passages)
    tests = copy_records(args.passages, seed=12345, lo=12, hi=12)
    training = None
    if not (model_dir / "config.json").exists():
        print(f"== fine-tuning the embedded model to copy, {args.train_steps} steps", flush=True)
        try:
            training = train_copy_model(model_dir, args.train_steps, args.train_batch, device, tests)
        except Exception as exc:  # noqa: BLE001 - a benchmark goes on with what it can measure
            if device == "cpu":
                raise
            notes.append(f"training on the GPU failed ({type(exc).__name__}: {exc}); trained on the CPU instead")
            print(f"== {notes[-1]}", flush=True)
            shutil.rmtree(model_dir, ignore_errors=True)
            training = train_copy_model(model_dir, min(args.train_steps, 120), 8, "cpu", tests)
        notes.append(f"copy model: the embedded demo model fine-tuned by amlx for {training['steps']} steps of "
                     f"{training['batch']} records in {training['seconds']} s, loss {training['first_loss']} -> "
                     f"{training['last_loss']}; the passages decoded here were half of its training records")
    ks = [int(k) for k in args.lookup_k.split(",")]
    opts = {"device": device, "kv_cache_memory": KV_MEMORY, "max_batch_size": 8}
    modes = {"plain": amlx.load_sync(model_dir, **opts)}
    for k in ks:
        modes[f"lookup{k}"] = load_costs(True, amlx.load_sync, model_dir, draft="prompt_lookup",
                                         num_draft_tokens=k, **opts)
        # the same with the fixed cost constants
        modes[f"lookup{k}-fixed"] = load_costs(False, amlx.load_sync, model_dir, draft="prompt_lookup",
                                               num_draft_tokens=k, **opts)
    unseen = copy_records(args.passages, seed=54321, lo=12, hi=12)
    prompts = [r["messages"][:1] for r in tests]
    passages = [r["messages"][1]["content"] for r in tests]
    results: dict = {}
    texts: dict = {}
    payload = {"meta": run_meta(), "args": {k: str(v) for k, v in vars(args).items()}, "training": training,
               "notes": notes, "results": results, "passages": passages}
    tok = modes["plain"].tokenizer

    def fidelity(side, mode, slot):
        got = texts.get(mode, [])
        return {"copied": round(sum(_copied(t, w) for t, w in zip(got, passages)) / len(passages), 3)}

    def save() -> str:
        payload["rows"] = _summary(results, fidelity)
        payload["texts"] = texts
        md = _markdown(f"Prompt lookup on a copy task: the embedded model fine-tuned by amlx to repeat a passage "
                       f"({args.passages} passages of 12 sentences, greedy, single stream)",
                       payload["rows"], notes + _cost_notes(results), COLS + [("copied", "passage copied")])
        _save(args.out, "lookup", payload, md)
        return md

    def run(mode: str) -> dict:
        # the passages one after another: decode rate over all of them, tokens concatenated
        total = {"tokens": 0, "decode_s": 0.0, "ids": [], "drafted_tokens": 0, "accepted_tokens": 0,
                 "from_draft": 0, "ttft_s": 0.0}
        got = []
        for p in prompts:
            r = amlx_run(modes[mode], p, args.tokens)
            total["tokens"] += r["tokens"]
            total["decode_s"] += (r["tokens"] - 1) / r["decode_tps"] if r["decode_tps"] else 0.0
            total["ttft_s"] += r["ttft_s"] / len(prompts)
            total["ids"] += r["ids"]
            for key in ("drafted_tokens", "accepted_tokens", "from_draft"):
                total[key] += r.get(key, 0)
            for key in ("cost_seconds", "cost_models"):
                if key in r:
                    total[key] = r[key]
            got.append(tok.decode(r["ids"]).removesuffix("<|im_end|>"))
        texts[mode] = got
        total["decode_tps"] = (total["tokens"] - len(prompts)) / total["decode_s"] if total["decode_s"] else 0.0
        if mode == "plain":
            for key in ("drafted_tokens", "accepted_tokens", "from_draft"):
                total.pop(key)
        return total

    deadline = began + args.budget
    try:
        t0 = time.monotonic()
        for mode in modes:  # untimed: traces and compiles
            run(mode)
        took = time.monotonic() - t0
        for rep in range(args.repeats):
            if rep and time.monotonic() + took > deadline:  # (a round takes about what the untimed one did)
                notes.append(f"stopped after {rep} rounds: the budget ({args.budget:.0f} s) ran out")
                break
            for mode in modes:
                _record(results, "amlx", mode, run(mode))
            save()
            print(f"== round {rep + 1} of {args.repeats} done, {time.monotonic() - began:.0f} s", flush=True)
        # passages it was not trained on: does it copy unseen text (a general copier) or only
        # what it learned? Plain decode, fidelity only.
        payload["unseen_copied"] = round(sum(
            _copied(tok.decode(amlx_run(modes["plain"], r["messages"][:1], args.tokens)["ids"]).removesuffix(
                "<|im_end|>"), r["messages"][1]["content"]) for r in unseen) / len(unseen), 3)
        notes.append(f"on {len(unseen)} passages it was not trained on, the plain model copied "
                     f"{payload['unseen_copied']:.3f} of the text before its first error")
    finally:
        for m in modes.values():
            m.close()
    print(save())
    return payload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", nargs="?", choices=["draft", "lookup"])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/amlx-bench")))
    ap.add_argument("--root", type=Path, default=Path("/tmp/amlx-spec"), help="where checkpoints are written")
    ap.add_argument("--target", default="qwen3-8b")
    ap.add_argument("--draft", default=None, help=argparse.SUPPRESS)  # the children's
    ap.add_argument("--modes", default="q4-k4,q4-k4-every",
                    help="draft part: speculative modes <draft>-k<k>[-every|-fixed], comma-separated; <draft> is q4 "
                    "(the target's 4-bit copy) or a checkpoints.py shape (random weights, e.g. qwen3-0.6b); "
                    "-every: k drafts every round (as mlx-lm, which runs only these), -fixed: fixed cost constants")
    ap.add_argument("--warmup-tokens", type=int, default=16, help="draft part: tokens of each untimed first run")
    ap.add_argument("--call-timeout", type=float, default=120, help="draft part: seconds a side may take for one "
                    "run before it is stopped (the other side goes on)")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="draft part: agreement and divergence checks (benchmarks/spec_checks.py)")
    ap.add_argument("--check-tokens", type=int, default=64, help="draft part: tokens the checks look at")
    ap.add_argument("--lookup-k", default="4,8", help="num_draft_tokens for prompt lookup, comma-separated")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (draft part)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens generated per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=230, help="seconds for the part in all (the lookup part: "
                    "for its timed rounds, which stop early rather than pass it)")
    ap.add_argument("--no-mlx-lm", action="store_true")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--passages", type=int, default=4)
    ap.add_argument("--copy-model", type=Path, default=None, help="a copy model already trained (lookup part)")
    ap.add_argument("--small", action="store_true", help="tiny shapes, few steps: for a CPU")
    ap.add_argument("--child", choices=["amlx", "mlx_lm"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.target, _unpairs(args.draft), args.modes.split(","))
    if args.part is None:
        ap.error("say which part: draft or lookup")
    if args.small:
        args.target, args.tokens, args.repeats, args.prompt = "qwen3-tiny", 32, 2, 16
        args.train_steps, args.train_batch, args.passages, args.budget = 40, 8, 1, 600
        args.root = args.root.with_name(args.root.name + "-small")
        args.check_tokens = 16
        args.modes = ",".join(m.replace("qwen3-0.6b", "qwen3-tiny") for m in args.modes.split(","))
    (part_draft if args.part == "draft" else part_lookup)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
