"""Tensor-parallel decode: one model on 1 rank against N ranks (issue 19).

    # the run of issue 19: Qwen3-32B's shape in bf16 on 1 GPU, then on 2 GPUs over NCCL
    python benchmarks/tensor_parallel.py --model qwen3-32b --device gpu --tp 1 2 --dir /tmp/tp-bench
    # one H200 only (the tensor_parallel=1 half; the script runs the same way)
    python benchmarks/tensor_parallel.py --model qwen3-32b --device gpu --tp 1 --dir /tmp/tp-bench
    # this CPU machine: a tiny shape, two CPU processes over MLX's ring backend
    python benchmarks/tensor_parallel.py --small

Measures, for each tensor_parallel value (each in a fresh process, so memory and
devices start clean): prefill of a 2,048-token prompt (time to first token),
single-stream decode (tokens/s of one request), 64-stream decode (tokens/s of
64 concurrent requests, wall clock from the first submit), and peak memory per
GPU (nvidia-smi's used memory, polled; on the CPU: rank 0's MLX peak). The
greedy tokens of every run are compared with the first run's: the share of
requests whose tokens are identical and the first position where any differ
(bf16 sums in a different order differ by rounding, so long greedy runs of a
random model may part ways; the report says where).

Weights: the release's shapes in bf16. Qwen3-32B is 65 GB: the checkpoint
written here holds random embeddings, head and first DENSE_LAYERS layers, and
leaves the other layers' bytes as holes of a sparse file (zeros when read;
about 7 GB on disk, 11 GB while it is written), so it fits the device
machines' disks while every rank still loads and multiplies a whole model's
worth of arrays: decode speed
depends on shapes and bytes moved, not on the values (an all-zero layer
leaves the residual stream as it is, so greedy tokens still depend on the
random layers and the head, in bf16). NCCL's
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, set for every rank).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from checkpoints import MODELS, write_benchmark_checkpoint  # noqa: E402

# Qwen/Qwen3-32B's config.json shapes (on Qwen3-8B's layout of the other keys)
_SHAPES = {
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, max_window_layers=64,
                      num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "qwen3-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, max_window_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False),
}
PREFILL = 2048
DENSE_LAYERS = 4  # layers with random values; the rest are all-zero holes (see _expand_layers)
STREAMS = 64


def write_shared_checkpoint(root: Path, name: str) -> Path:
    """The model `name` with one layer's bytes shared by all its layers (see the docstring)."""
    shape = _SHAPES[name]
    layers = shape["num_hidden_layers"]
    one = f"{name}-1layer"
    spec = json.loads(json.dumps(MODELS["qwen3-8b"], default=sorted))
    spec["tokenizer"] = MODELS["qwen3-8b"]["tokenizer"]
    spec["config"].update(shape, num_hidden_layers=1, max_window_layers=1)
    MODELS[one] = spec
    out = root / name
    if (out / "config.json").is_file():
        return out
    src = write_benchmark_checkpoint(root / one, one)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(num_hidden_layers=layers, max_window_layers=layers)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _expand_layers(src / "model.safetensors", out / "model.safetensors", layers)
    shutil.rmtree(src)
    return out


def _expand_layers(src: Path, dst: Path, layers: int, dense: int = DENSE_LAYERS) -> None:
    """dst: src's one-layer model with `layers` layers. Layers below `dense` repeat
    layer 0's random values; the others are holes of the file (zeros on read,
    no disk): an all-zero layer adds nothing to the residual stream, and costs a
    forward pass exactly what a random one costs (same shapes, same bytes read)."""
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        start = 8 + n
    meta = header.pop("__metadata__", None)
    entries: dict[str, tuple[dict, str | None]] = {}  # name -> (entry, source tensor or None for a hole)
    for key, entry in header.items():
        if not key.startswith("model.layers.0."):
            entries[key] = (entry, key)
            continue
        for i in range(layers):
            entries[key.replace("model.layers.0.", f"model.layers.{i}.", 1)] = (entry, key if i < dense else None)
    out_header: dict = {} if meta is None else {"__metadata__": meta}
    offset = 0
    for name in sorted(entries):
        entry, _ = entries[name]
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        out_header[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(out_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(src, "rb") as f, open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for name in sorted(entries):
            entry, source = entries[name]
            lo, hi = entry["data_offsets"]
            if source is None:
                out.seek(hi - lo, os.SEEK_CUR)
                continue
            f.seek(start + lo)
            out.write(f.read(hi - lo))
        out.truncate()


class GpuPeak:
    """Peak used memory per GPU (MiB), from nvidia-smi polled every 0.5 s."""

    def __init__(self):
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None
        if self.available:
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            for line in out.strip().splitlines():
                i, used = (int(x) for x in line.split(","))
                self.peak[i] = max(self.peak.get(i, 0), used)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        return dict(self.peak)


async def measure(path: Path, device: str, tp: int, decode_tokens: int, vocab: int) -> dict:
    import amlx

    t0 = time.perf_counter()
    async with await amlx.load(path, device=device, tensor_parallel=tp, max_batch_size=STREAMS) as model:
        result: dict = {"tensor_parallel": tp, "load_s": round(time.perf_counter() - t0, 1)}
        long_prompt = [(i * 7919) % (vocab - 300) + 100 for i in range(PREFILL)]
        await model.complete(long_prompt[:64], max_tokens=4)  # warm-up: kernels, compiled steps
        ttft = []
        for _ in range(2):
            c = await model.complete(long_prompt, max_tokens=1)
            ttft.append(c.usage.time_to_first_token)
        result["prefill_2048_s"] = round(min(ttft), 3)
        single = await model.complete([100, 200, 300, 400], max_tokens=decode_tokens)
        result["single_stream_tok_s"] = round(single.usage.tokens_per_second, 2)
        prompts = [[100 + i, 200 + 3 * i, 300 + 7 * i] for i in range(STREAMS)]
        start = time.perf_counter()
        many = await asyncio.gather(*[model.complete(p, max_tokens=decode_tokens) for p in prompts])
        wall = time.perf_counter() - start
        result[f"{STREAMS}_stream_tok_s"] = round(sum(c.usage.completion_tokens for c in many) / wall, 1)
        result["rank0_mlx_peak_gb"] = round(amlx.memory()["peak"] / 1e9, 2)
        result["tokens"] = [single.token_ids] + [c.token_ids for c in many]
    return result


def child(args: argparse.Namespace) -> int:
    peak = GpuPeak()
    cfg = json.loads((Path(args.path) / "config.json").read_text())
    result = asyncio.run(measure(Path(args.path), args.device, args.child_tp, args.decode_tokens, cfg["vocab_size"]))
    result["gpu_peak_mib"] = peak.stop() if peak.available else None
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def compare(base: list[list[int]], other: list[list[int]]) -> dict:
    same = sum(a == b for a, b in zip(base, other))
    firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(base, other)]
    diverged = [f for f in firsts if f is not None]
    return {"identical_requests": f"{same}/{len(base)}", "first_divergence": min(diverged) if diverged else None}


def run_one(path: Path, device: str, tp: int, decode_tokens: int) -> dict:
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-tp", str(tp), "--path", str(path),
           "--device", device, "--decode-tokens", str(decode_tokens)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"tensor_parallel={tp} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(results: list[dict]) -> str:
    cols = ["tensor_parallel", "load_s", "prefill_2048_s", "single_stream_tok_s", f"{STREAMS}_stream_tok_s",
            "rank0_mlx_peak_gb", "gpu_peak_mib", "identical_requests", "first_divergence", "speedup_single"]
    base = results[0]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        r.update(compare(base["tokens"], r["tokens"]))
        r["speedup_single"] = round(r["single_stream_tok_s"] / base["single_stream_tok_s"], 2)
        lines.append("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3-32b", choices=sorted(_SHAPES))
    p.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dir", default="/tmp/amlx-tp-bench", help="where the checkpoint is written (kept)")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--small", action="store_true", help="qwen3-tiny on the CPU, tensor_parallel 1 and 2 (ring)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child-tp", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_tp is not None:
        return child(args)
    if args.small:
        args.model, args.device, args.tp, args.decode_tokens = "qwen3-tiny", "cpu", [1, 2], min(args.decode_tokens, 16)
    path = write_shared_checkpoint(Path(args.dir), args.model)
    results = [run_one(path, args.device, tp, args.decode_tokens) for tp in args.tp]
    table = report(results)
    print(f"{args.model} bf16, device {args.device}, {time.strftime('%Y-%m-%d')}\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "tokens"} for r in results],
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
