"""How big each shard's KV block pool may grow: the load option
`kv_cache_memory` (bytes, or a fraction of the device's memory) turned into
blocks.

The pools start small and grow (by 25%, or what is asked for) only as requests need blocks at
once, so the limit is a ceiling, not an allocation. The default ceiling is a
share of the device's memory: on the CPU, DEFAULT_CPU_FRACTION of the
machine's RAM; on a GPU, DEFAULT_GPU_FRACTION of MLX's memory limit. A CPU
engine's shards each get an equal part (a request lives in one shard's pool).
"""

from __future__ import annotations

import os
from numbers import Integral, Real

from amlx._mlx import memory
from amlx.kv.pool import BlockPool, block_bytes, quant_group
from amlx.kv.rows import ShardKV

__all__ = ["DEFAULT_BLOCK_SIZE", "check_kv_bits", "check_kv_cache_memory", "check_kv_head_dim", "kv_cache_bytes",
           "make_pools"]

DEFAULT_BLOCK_SIZE = 16  # positions per block
DEFAULT_CPU_FRACTION = 0.25
DEFAULT_GPU_FRACTION = 0.5


def check_kv_cache_memory(value: object) -> None:
    """ValueError unless `value` is None, a byte count >= 1, or a fraction in (0, 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"kv_cache_memory must be a number of bytes or a fraction of the device's memory, "
                         f"not {value!r}")
    # (Integral, not int: a numpy integer is a byte count too, not a fraction to refuse as over 1)
    if isinstance(value, Integral):
        if value < 1:
            raise ValueError(f"kv_cache_memory must be at least 1 byte, not {value}")
    elif not 0.0 < float(value) <= 1.0:
        raise ValueError(f"kv_cache_memory as a fraction of the device's memory must lie in (0, 1], not {value}")


def check_kv_bits(value: object) -> None:
    """ValueError unless `value` is None (full precision), or the integer 8 or 4."""
    # (8.0 compared equal to 8 and loaded: the pool's shapes and block bytes became floats)
    if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value not in (4, 8)):
        raise ValueError(f"kv_bits must be None, 8 or 4, not {value!r}")


def check_kv_head_dim(kv_bits: int | None, head_dim: int) -> None:
    """ValueError when a `kv_bits` cache cannot group a head dimension of `head_dim` (the pool's
    own error, `quant_group`): for a load to check from the config, before any weight is read."""
    if kv_bits:
        quant_group(head_dim)


def device_memory(device: str) -> int:
    """Bytes of memory the device has: the machine's RAM on the CPU, MLX's memory limit on a GPU."""
    if device == "gpu":
        return int(memory.get_memory_limit())
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def kv_cache_bytes(value: int | float | None, device: str) -> int:
    """The pool ceiling in bytes for a `kv_cache_memory` value (checked) on `device`."""
    check_kv_cache_memory(value)
    if isinstance(value, Integral):
        return int(value)
    fraction = value if value is not None else (DEFAULT_GPU_FRACTION if device == "gpu" else DEFAULT_CPU_FRACTION)
    return int(device_memory(device) * float(fraction))


def make_pools(model, options, shards: int, split_windows: bool = False) -> list[ShardKV]:
    """One ShardKV per shard for `model` (a CausalLM) under resolved EngineOptions.
    `split_windows`: a model with sliding-window layers (one window size) and
    full-attention ones keeps the windowed layers in a pool of their own, where
    rows hold only the blocks their window sees (`ShardKV.local`). Both pools
    get the same ceiling in blocks: together, what one pool of every layer had."""
    layout, dtype = model.kv_layout(), model.activation_dtype()
    bs = options.kv_block_size or DEFAULT_BLOCK_SIZE
    bits = options.kv_bits
    per_block = block_bytes(layout, dtype, bs, bits)
    if 2 * per_block > device_memory(options.device):  # (a pool holds 2 blocks at least, whatever its ceiling:
        # such blocks got the process killed for memory, or crashed MLX past int32 sizes)
        raise ValueError(f"a KV block of {bs} tokens (kv_block_size, AMLX_KV_BLOCK_SIZE) takes {per_block} bytes: "
                         f"the 2 a pool holds at least do not fit in the device's memory")
    total = kv_cache_bytes(options.kv_cache_memory, options.device)
    blocks = max(2, total // shards // max(per_block, 1) + 1)  # (+1: the null block)
    span_step = max(1, options.kv_block // bs)
    windows = {w for w in model.windows() if w}
    window = windows.pop() if len(windows) == 1 else None  # (several sizes: every layer reads the full span)
    local = [w is not None for w in model.windows()]
    if not (split_windows and window and any(local) and not all(local)):
        return [ShardKV(BlockPool(layout, dtype, bs, blocks, prefix_cache=options.prefix_cache, bits=bits),
                        span_step, window) for _ in range(shards)]
    full = [shape for shape, w in zip(layout, local) if not w]
    windowed = [shape for shape, w in zip(layout, local) if w]
    return [ShardKV(BlockPool(full, dtype, bs, blocks, prefix_cache=options.prefix_cache, bits=bits), span_step,
                    window, BlockPool(windowed, dtype, bs, blocks, prefix_cache=options.prefix_cache, bits=bits),
                    local) for _ in range(shards)]
