"""MLX memory counters (bytes) and limits."""

from __future__ import annotations

from amlx._mlx._lib import check, ffi, lib


def _get(fn, op: str) -> int:
    out = ffi.new("size_t*")
    check(fn(out), op)
    return int(out[0])


def active() -> int:
    """Bytes held by live arrays."""
    return _get(lib.mlxc_memory_active, "memory.active")


def peak() -> int:
    return _get(lib.mlxc_memory_peak, "memory.peak")


def cache() -> int:
    """Bytes kept in MLX's buffer cache for reuse."""
    return _get(lib.mlxc_memory_cache, "memory.cache")


def reset_peak() -> None:
    check(lib.mlxc_memory_reset_peak(), "memory.reset_peak")


def clear_cache() -> None:
    check(lib.mlxc_memory_clear_cache(), "memory.clear_cache")


def get_memory_limit() -> int:
    return _get(lib.mlxc_memory_get_limit, "memory.get_memory_limit")


def set_memory_limit(limit: int) -> int:
    """Sets the limit and returns the previous one. Evaluations that could go
    past it raise MLXError instead of allocating."""
    out = ffi.new("size_t*")
    check(lib.mlxc_memory_set_limit(int(limit), out), "memory.set_memory_limit")
    return int(out[0])


def set_cache_limit(limit: int) -> int:
    out = ffi.new("size_t*")
    check(lib.mlxc_memory_set_cache_limit(int(limit), out), "memory.set_cache_limit")
    return int(out[0])


def counters() -> dict:
    return {"active": active(), "peak": peak(), "cache": cache()}
