"""Safetensors files: lazy loading (arrays read on first use) and saving."""

from __future__ import annotations

import json
import math
import os

from amlx._mlx._lib import error, ffi, lib
from amlx._mlx.array import Array, _call
from amlx.errors import MLXError

_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4,
             "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8}


def _bad(path, why: str) -> MLXError:
    return MLXError("load_safetensors", f"{path}: {why}")


def read_header(path) -> tuple[dict, dict]:
    """Validates a safetensors file's header against the file's size.

    Returns ({name: {dtype, shape, data_offsets}}, metadata). MLX reads the data
    lazily, so a truncated or inconsistent file is refused here, before any
    tensor is touched."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"file too short ({size} bytes) to be safetensors")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100_000_000:
                raise _bad(path, f"header length {n} exceeds the file size {size} (truncated or not safetensors)")
            raw = f.read(n)
    except OSError as exc:
        raise _bad(path, exc.strerror or str(exc)) from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as exc:
        raise _bad(path, f"corrupt header ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, f"__metadata__ must map strings to strings, not {metadata!r}")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            want = math.prod(shape) * _ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f"tensor {name!r} has a malformed entry {info!r}") from None
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
            raise _bad(path, f"tensor {name!r} has an invalid shape {shape}")
        if not all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end)):
            raise _bad(path, f"tensor {name!r} has non-integer offsets {info['data_offsets']!r}")
        if end - begin != want or begin < 0:
            raise _bad(path, f"tensor {name!r}: offsets {begin}..{end} do not hold {dtype}{shape}")
        if end > data_size:
            raise _bad(path, f"tensor {name!r} ends at byte {end} of data but the file holds only {data_size} "
                             f"(truncated)")
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise _bad(path, f"tensor {name!r} overlaps tensor {prev!r} (offsets {begin} < {prev_end})")
    return header, metadata


def load_safetensors(path) -> tuple[dict[str, Array], dict[str, str]]:
    """Loads a safetensors file lazily: ({name: Array}, metadata)."""
    path = os.fspath(path)
    read_header(path)
    out = ffi.new("mlxc_st*")
    if lib.mlxc_st_load(os.fsencode(path), out):  # (the path's own bytes: .encode() refused non-UTF-8 ones)
        raise _bad(path, error("load_safetensors").mlx_message)
    st = out[0]
    try:
        arrays = {}
        for i in range(lib.mlxc_st_count(st)):
            name = ffi.string(lib.mlxc_st_name(st, i)).decode()
            arrays[name] = _call(lib.mlxc_st_array, "load_safetensors", st, i)
        meta = {ffi.string(lib.mlxc_st_meta_key(st, i)).decode(): ffi.string(lib.mlxc_st_meta_value(st, i)).decode()
                for i in range(lib.mlxc_st_meta_count(st))}
    finally:
        lib.mlxc_st_free(st)
    return arrays, meta


def save_safetensors(path, arrays: dict[str, Array], metadata: dict[str, str] | None = None) -> None:
    """Writes arrays (evaluating them) to a safetensors file."""
    path = os.fspath(path)
    names = [ffi.new("char[]", k.encode()) for k in arrays]
    handles = [a.handle for a in arrays.values()]
    metadata = metadata or {}
    keys = [ffi.new("char[]", str(k).encode()) for k in metadata]
    values = [ffi.new("char[]", str(v).encode()) for v in metadata.values()]
    status = lib.mlxc_st_save(os.fsencode(path), ffi.new("const char*[]", names), ffi.new("mlxc_array[]", handles),
                              len(handles), ffi.new("const char*[]", keys), ffi.new("const char*[]", values),
                              len(keys))
    if status:
        raise error("save_safetensors")
