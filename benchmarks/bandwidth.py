"""How close a decode runs to the memory-bandwidth limit.

A decode step reads every weight once (the embedding table only for the rows it
looks up, unless it doubles as the output projection) and, for every row of the
batch, the keys and values cached so far in each layer (a sliding-window layer
reads at most its window). `step_bytes` counts those bytes from the checkpoint's
safetensors headers and config.json; `copy_bandwidth` measures what the device
moves in a large elementwise copy (bytes read plus bytes written, best of
several); the fraction of the limit is then
    step_bytes / time per step / copy bandwidth.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

__all__ = ["copy_bandwidth", "kv_bytes", "step_bytes", "weight_bytes"]

_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "F64": 8, "I64": 8}


def _headers(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out.update(header)
    return out


def weight_bytes(path: Path) -> int:
    """Bytes of weights one decode step reads: every tensor, less the embedding
    table when a separate lm_head exists (then only looked-up rows are read)."""
    headers = _headers(path)
    sizes = {name: e["data_offsets"][1] - e["data_offsets"][0] for name, e in headers.items()}
    total = sum(sizes.values())
    if any(n.endswith("lm_head.weight") for n in sizes):
        total -= sum(s for n, s in sizes.items() if ".embed_tokens." in n)
    return total


def _text_config(path: Path) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg


def kv_bytes(path: Path, context: int, dtype_bytes: int = 2) -> int:
    """Bytes of cached keys and values one row reads in a decode step at `context`
    positions (all layers; a sliding layer reads at most its window)."""
    cfg = _text_config(path)
    layers = cfg["num_hidden_layers"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    window = cfg.get("sliding_window") if cfg.get("model_type", "").startswith("gemma3") else None
    pattern = cfg.get("sliding_window_pattern", 6)
    positions = 0
    for i in range(layers):
        local = window is not None and (i + 1) % pattern != 0
        positions += min(context, window) if local else context
    return positions * kv_heads * head_dim * 2 * dtype_bytes


def step_bytes(path: Path, rows: int, context: float) -> float:
    """Bytes a decode step of `rows` rows at mean context `context` reads."""
    return weight_bytes(path) + rows * kv_bytes(path, max(1, int(context)))


def copy_bandwidth(nbytes: int = 4 << 30, repeats: int = 5) -> float:
    """Bytes per second (read + written) of `y = x + 1` over a bf16 array of
    `nbytes`, best of `repeats`; amlx's array layer on the default device. Call it
    on the thread that owns MLX work (the engine's worker in a running process)."""
    from amlx._mlx import eval as mx_eval
    from amlx._mlx import ops

    x = ops.zeros((nbytes // 2,), "bfloat16")
    mx_eval(x)
    best = float("inf")
    try:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            y = x + 1
            mx_eval(y)
            took = time.perf_counter() - t0
            y.close()
            if i:  # the first run includes the kernel's first launch
                best = min(best, took)
    finally:
        x.close()
    return 2 * (nbytes // 2) * 2 / best
