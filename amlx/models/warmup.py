"""Compiling the quantized-matmul kernels a model needs at load, once (MLX on CUDA).

MLX's CUDA backend compiles its multi-row quantized matmul (the Hopper kernel
behind `quantized_matmul` for two rows or more) with NVRTC the first time each
variant runs: one variant per activation dtype, bits, group size and tile,
and the tile follows the number of rows (up to 16, 32, 64, 128, more). Each
compile takes 20-50 s (seen on an H200); a one-row matmul uses a precompiled
kernel. Without a warm-up the user's first prompt, or the first time the batch
grows past a tile, stalls for that long. MLX keeps the compiled kernels on disk
(`MLX_PTX_CACHE_DIR`, by default under the system's temp directory), so only
the first load on a machine pays; later warm-ups read the cache and take
milliseconds.

`warm_quantized_matmuls(model, max_rows)` runs every quantized layer shape of
the model once for one row count per tile up to `max_rows` (the engine passes
the most rows one forward pass can have: its batch size or prefill chunk). A
notice ("compiling GPU kernels, once ...") goes to stderr only when the warm-up
is still running after a couple of seconds, i.e. when something is compiled.
It is called on the engine's worker, inside the engine's placement (MLX calls
belong to that thread). With `parallel=True` the variants first compile side by
side in child processes (`python -m amlx.models.warmup ...`, one per variant),
which fill MLX's on-disk cache: minutes become the time of the slowest compile.
Set AMLX_WARMUP=0 to skip the warm-up.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from amlx._mlx import Array, fast, ops
from amlx._mlx import eval as mx_eval
from amlx.models import quantized_gemv
from amlx.models.nn import Module, QuantizedEmbedding, QuantizedLinear
from amlx.notices import notice

__all__ = ["ROW_TILES", "SlowNotice", "WarmupReport", "warmup_enabled", "needs_warmup", "precompile", "quantized_shapes", "rows_to_warm",
           "warm_quantized_matmuls"]

log = logging.getLogger("amlx.warmup")

Quantized = QuantizedLinear | QuantizedEmbedding

# MLX's Hopper quantized matmul picks its tile by rows: <=16, <=32, <=64, <=128, more
ROW_TILES = (16, 32, 64, 128)
NOTICE_AFTER_S = 2.0  # a warm-up that reads cached kernels is done well before this


@dataclass
class WarmupReport:
    """What a warm-up did: matmuls run, seconds in all, and the steps that took long
    (label, seconds): those compiled a kernel."""

    matmuls: int = 0
    seconds: float = 0.0
    slow: list[tuple[str, float]] = field(default_factory=list)


def warmup_enabled() -> bool:
    """Whether load-time warm-ups run: AMLX_WARMUP not set to 0."""
    return os.environ.get("AMLX_WARMUP", "1").strip().lower() not in ("0", "false", "no", "off")


def needs_warmup(model: Module, device: str) -> bool:
    """Whether loading `model` on `device` should warm its quantized matmuls: MLX on
    CUDA, a quantized layer in the model, and AMLX_WARMUP not set to 0."""
    if not warmup_enabled():
        return False
    if device != "gpu" or not fast.cuda_available():
        return False
    return any(True for _ in _quantized(model))


def rows_to_warm(max_rows: int) -> list[int]:
    """One row count per kernel variant that forward passes of up to `max_rows`
    rows can reach (a single row needs no compile). MLX's first tile (up to 16
    rows) is warmed with 5 rows where passes can have that many: on CUDA, 2..4
    rows go to amlx's own kernel (quantized_gemv, compiled in about a second),
    not to MLX's."""
    if max_rows < 2:
        return []
    rows = [min(max_rows, quantized_gemv.USE_ROWS + 1)]
    for tile in ROW_TILES:
        if max_rows > tile:
            rows.append(tile + 1)
    return rows


def _quantized(model: Module) -> Iterator[Quantized]:
    for _, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            yield m


def _in_features(layer: Quantized) -> int:
    """Input width of a quantized layer, read off the shape of a lazy graph node
    (never evaluated): the packed width alone does not say it without the bits."""
    if isinstance(layer, QuantizedLinear):
        probe = layer.dequantized_weight()
    else:
        probe = layer(ops.zeros((1,), "int32"))
    try:
        return int(probe.shape[-1])
    finally:
        probe.close()


def quantized_shapes(model: Module) -> list[tuple[int, int, Quantized]]:
    """(in, out, a layer) for each distinct quantized shape and activation dtype."""
    seen: dict[tuple, tuple[int, int, Quantized]] = {}
    for layer in _quantized(model):
        k, n = _in_features(layer), int(layer.weight.shape[0])
        key = (k, n, layer.scales.dtype.name, int(layer.weight.shape[1]))
        seen.setdefault(key, (k, n, layer))
    return list(seen.values())


QUANTIZED_NOTICE = ("amlx: compiling GPU kernels for the quantized layers, once (MLX keeps them in "
                    "MLX_PTX_CACHE_DIR); the first load on this machine takes a few minutes")


class SlowNotice:
    """Prints `message` once (to `write`) if the warm-up outlives `after` seconds;
    from then on each slow step is reported as well (`shown`)."""

    def __init__(self, write: Callable[[str], None], after: float, message: str = QUANTIZED_NOTICE):
        self.write = write
        self.message = message
        self.shown = threading.Event()
        self._timer = threading.Timer(after, self._show)
        self._timer.daemon = True

    def _show(self) -> None:
        self.shown.set()
        self.write(self.message)

    def __enter__(self) -> "SlowNotice":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def warm_quantized_matmuls(model: Module, max_rows: int, *, write: Callable[[str], None] = notice,
                           notice_after: float = NOTICE_AFTER_S, parallel: bool = False) -> WarmupReport:
    """Runs each quantized layer shape of `model` for every row count of
    `rows_to_warm(max_rows)`, so the kernels MLX compiles at first use are compiled
    now. Call it on the thread that owns the model's MLX work. `write` receives the
    progress lines (stderr by default). `parallel`: first compile the variants side by
    side in child processes (`precompile`), which fill MLX's on-disk kernel cache;
    the runs here then only load them (what a child missed is compiled here)."""
    report = WarmupReport()
    shapes = quantized_shapes(model)
    rows = rows_to_warm(max_rows)
    total = len(shapes) * len(rows)
    start = time.perf_counter()
    with SlowNotice(write, notice_after) as notice:
        if parallel:
            precompile(shapes, rows)
        for r in rows:
            for k, n, layer in shapes:
                label = f"{r} rows x {k}->{n} {layer.scales.dtype.name}"
                t0 = time.perf_counter()
                _run(layer, r, k)
                took = time.perf_counter() - t0
                report.matmuls += 1
                log.debug("warm-up %s: %.3f s", label, took)
                if took > 1.0:
                    report.slow.append((label, took))
                    log.info("compiled the quantized matmul for %s in %.1f s", label, took)
                    if notice.shown.is_set():
                        write(f"amlx:   [{report.matmuls}/{total}] {label}: {took:.1f} s")
    report.seconds = time.perf_counter() - start
    if notice.shown.is_set():
        write(f"amlx: kernels compiled in {report.seconds:.0f} s; later loads reuse them")
    return report


def _run(layer: Quantized, rows: int, k: int) -> None:
    x = ops.zeros((rows, k), layer.scales.dtype)
    y: Array = layer(x) if isinstance(layer, QuantizedLinear) else layer.as_linear(x)
    try:
        mx_eval(y)
    finally:
        y.close()
        x.close()


# -- compiling side by side -------------------------------------------------------
# NVRTC compiles on the calling thread and MLX's table of compiled modules is not
# guarded for threads, so the variants compile in child processes instead, one per
# (activation dtype, bits, group size, row tile), all at once; each writes its
# kernel into MLX's on-disk cache (the same MLX_PTX_CACHE_DIR: the environment is
# inherited), where this process then finds it.

PRECOMPILE_TIMEOUT_S = 300.0


def _variants(shapes: list[tuple[int, int, Quantized]], rows: list[int]) -> list[list[str]]:
    """Child arguments (dtype, bits, group, rows, in, out) per kernel variant, each
    with the smallest layer shape of its kind."""
    smallest: dict[tuple, tuple[int, int]] = {}
    for k, n, layer in shapes:
        bits = int(layer.weight.shape[1]) * 32 // k
        group = k // int(layer.scales.shape[1])
        key = (layer.scales.dtype.name, bits, group)
        if key not in smallest or k * n < smallest[key][0] * smallest[key][1]:
            smallest[key] = (k, n)
    return [[dt, str(bits), str(group), str(r), str(k), str(n)]
            for (dt, bits, group), (k, n) in smallest.items() for r in rows]


def precompile(shapes: list[tuple[int, int, Quantized]], rows: list[int],
               timeout: float = PRECOMPILE_TIMEOUT_S) -> int:
    """Compiles the kernel variants of `shapes` x `rows` in child processes at once;
    returns how many finished. Best effort: a child that fails or runs out of time
    only leaves its variant to the caller's own run."""
    procs = []
    for args in _variants(shapes, rows):
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "amlx.models.warmup", *args],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        except OSError as exc:
            log.info("could not start a kernel compile: %s", exc)
    deadline = time.monotonic() + timeout
    done = 0
    for p in procs:
        try:
            done += p.wait(timeout=max(0.1, deadline - time.monotonic())) == 0
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return done


def _compile_one(argv: list[str]) -> int:
    """In a child: one quantized matmul of the given kind, evaluated (compiling its kernel)."""
    from amlx._mlx import random

    dtype, bits, group, rows, k, n = argv[0], *map(int, argv[1:])
    w = random.normal((n, k)).astype(dtype)
    wq, scales, biases = ops.quantize(w, group, bits)
    layer = QuantizedLinear(wq, scales, biases, group, bits)
    _run(layer, rows, k)
    return 0


if __name__ == "__main__":
    sys.exit(_compile_one(sys.argv[1:]))
