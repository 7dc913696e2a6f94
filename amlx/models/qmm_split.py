"""Quantized products of 8 or more rows on CUDA with K split over more thread blocks
(opt-in, being measured: AMLX_QMM_SPLIT=copy or =interleave; off by default).

Why: MLX's quantized matmul for 8+ rows on CUDA (its sm80 CUTLASS kernel, also on sm90
with grouped scales) tiles the output in blocks of up to 64 rows x 128 columns and never
splits K, so a product of 8-64 rows gets n / 128 blocks. At Qwen3-8B's shapes that is 48
for q/k/v, 32 for o and for down (K = 12,288), on 132 SMs. A decode step runs its products
one after another, so most of the GPU idles: on an H100 a 64-stream step of Qwen3-8B 4-bit
spent 24.0 of its 29.0 ms in that kernel, where the same products as independent calls
(which MLX's CUDA graph runs side by side) take 10.2 ms (benchmarks/README.md, "GPU,
2026-12-05 (morning, an H100)"). Splitting K s ways gives s times the blocks, each doing
1/s of the work; the s partial outputs are added in float32.

Two ways, for `benchmarks/run_gpu.sh` to compare end to end (benchmarks/qmm_chain.py
compares the products alone):
- copy: MLX's batched quantized matmul over the weight laid out as (s, n, k / s), one launch.
  That layout is a second copy of the weight, made once by `QuantizedLinear.prepare` (its
  derived arrays), so the split products' weights take twice their memory: fine for
  measuring, not as a default.
- interleave: the weight as stored, read as (s n, k / s) (a free reshape: row s i + j holds
  slice j of output i's K range), against x's K slices stacked as (s rows, k / s): one
  launch giving every slice against every slice, s times the products needed but s * s
  times the blocks, and no second copy.

End to end on an H100 (benchmarks/README.md, "GPU, 2026-12-06"): a 64-stream step of Qwen3-8B
4-bit took 28.6 ms off, 17.1 with `copy`, 21.5 with `interleave`. Still opt-in: `copy`'s
second copy of the split weights, and the GPU engine test's failure that run (NaN scores at
the test model's one-group slices, which `splits` no longer makes) awaits a GPU run.

Only in an engine's pass with its kernels on (`dense_rows.within`): training passes keep
MLX's product (and its gradient)."""

from __future__ import annotations

from amlx._mlx import Array, bfloat16, device, fast, float16, float32, ops
from amlx.env import env_choice
from amlx.models import dense_rows
from amlx.models.quantized_gemv import SMS

MODES = ("off", "copy", "interleave")
MIN_ROWS = 8  # below this MLX computes a quantized product with its one-row kernels (qmv)
TILE_N = 128  # MLX's sm80 kernel's block width: a product has n / TILE_N blocks a tile of rows


def _mode() -> str:
    return env_choice("AMLX_QMM_SPLIT", MODES, "off")


MODE = _mode()


def blocks(rows: int, n: int) -> int:
    """The thread blocks MLX's kernel runs a (rows, k) x (k, n) product in: tiles of
    16-64 rows (the power of two at or above `rows`) by TILE_N columns."""
    tile = min(64, max(16, 1 << max(0, rows - 1).bit_length()))
    return -(-rows // tile) * -(-n // TILE_N)


def splits(n: int, k: int, group: int, mode: str | None = None) -> int:
    """How many ways to split K for an (n, k) weight, for products of up to 64 rows (one
    tile of rows): the fewest (a power of two) that
    give MLX's kernel 90% of the SMs' worth of blocks or more, each slice whole groups and
    a multiple of MLX's K tile (64 values), and at least two of either. (A slice of one
    group goes to MLX's sm90 kernel on an H100/H200, which takes K <= group size, and one
    K tile leaves the sm80 kernel's pipeline prefetching past K: the engine test's NaN
    scores on an H100 came with a 4-way split of a 256-wide K into such slices. MLX's
    product for K <= group size was then probed wrong on an H200, and the engine test
    passed on an H100 with this rule, both 2026-12-06; see
    `quantized_gemv.mlx_product_is_wrong`.) At most 8 for `copy` and 2 for `interleave`
    (whose products grow with the split). 1: no split (the product already has the blocks,
    or its K does not divide, or MLX's kernel does not take its n)."""
    mode = mode or MODE
    if mode == "off" or n % TILE_N:
        return 1
    most = 2 if mode == "interleave" else 8
    step = max(64, group)
    s = 1
    while (s < most and (n // TILE_N) * s < 0.9 * SMS and k % (2 * s * step) == 0
           and k // (2 * s) >= 2 * step):
        s *= 2
    return s


def _layer_splits(layer, mode: str | None = None) -> int:
    k = layer.weight.shape[1] * 32 // layer._bits
    return splits(layer.weight.shape[0], k, layer._group_size, mode)


def _on_cuda() -> bool:
    return device.default_device() == "gpu" and fast.cuda_available()


def _rows(x: Array) -> int:
    return x.size // x.shape[-1] if x.ndim >= 2 else 0


def applies(x: Array, layer) -> bool:
    """Whether `nn.quantized_dense` should split this product: a mode is on (MODE), inside
    an engine's pass with its kernels on, MLX computing on CUDA, x of 16-bit floats with
    MIN_ROWS rows or more (over all its leading axes), a weight that `splits` splits, too
    few blocks unsplit, and for `copy` the split copy built (by `prepare`: never inside a
    compiled trace, whose arrays would not outlive it)."""
    rows = _rows(x)
    return (MODE != "off" and dense_rows.in_inference() and rows >= MIN_ROWS
            and x.dtype in (bfloat16, float16) and _on_cuda() and _layer_splits(layer) > 1
            and blocks(rows, layer.weight.shape[0]) < 0.9 * SMS  # (a long prompt's product has them)
            and (MODE != "copy" or _copied(layer)))


def _sliced(a: Array, s: int) -> Array:
    """(n, c) -> (s, n, c / s), made contiguous: slice j of every row's c values."""
    n, c = a.shape
    return ops.contiguous(ops.transpose(ops.reshape(a, (n, s, c // s)), (1, 0, 2)))


_NAMES = ("weight", "scales", "biases")


def _split_copy(layer, s: int) -> list[Array]:
    """The layer's weight, scales and biases sliced s ways (`_sliced`), made once per array."""
    return [layer.derive(f"ksplit_{name}", getattr(layer, name), lambda a: _sliced(a, s)) for name in _NAMES]


def derived(layer) -> list[Array]:
    """The layer's K-split copy (`copy` mode, on CUDA, where it splits), built once per weight
    array (QuantizedLinear.derived_arrays: `prepare` evaluates them outside any compiled
    trace); [] otherwise."""
    if MODE != "copy" or not _on_cuda():
        return []
    s = _layer_splits(layer)
    return _split_copy(layer, s) if s > 1 else []


def _copied(layer) -> bool:
    """Whether `prepare` built the layer's K-split copy from its current arrays."""
    return all(layer.has_derived(f"ksplit_{name}", getattr(layer, name)) for name in _NAMES)


def product(x: Array, layer, mode: str | None = None) -> Array:
    """x (..., k) @ dequantize(layer)^T -> (..., n) in x's dtype, K split as `mode` (default
    MODE) says; the partial products are added in float32."""
    if x.ndim != 2:
        y = product(ops.reshape(x, (_rows(x), x.shape[-1])), layer, mode)
        return ops.reshape(y, (*x.shape[:-1], y.shape[-1]))
    mode = mode or MODE
    s = _layer_splits(layer, mode)
    rows, k = x.shape
    q = (True, layer._group_size, layer._bits)
    xs = ops.transpose(ops.reshape(x, (rows, s, k // s)), (1, 0, 2))  # (s, rows, k / s): x's K slices
    if mode == "copy":
        parts = ops.quantized_matmul(xs, *_split_copy(layer, s), *q)  # (s, rows, n)
        return ops.astype(ops.sum(ops.astype(parts, float32), axis=0), x.dtype)
    n = layer.weight.shape[0]
    w, scales, biases = (ops.reshape(a, (s * n, a.shape[1] // s)) for a in (layer.weight, layer.scales, layer.biases))
    xs = ops.reshape(xs, (s * rows, k // s))
    y = ops.quantized_matmul(xs, w, scales, biases, *q)  # (s rows, s n): block j's rows against every slice
    total = None
    for j in range(s):  # rows of x's slice j against column s i + j: output i's slice j
        part = ops.astype(ops.slice(y, (j * rows, j), (j * rows + rows, s * n), (1, s)), float32)
        total = part if total is None else ops.add(total, part)
    return ops.astype(total, x.dtype)
