"""Safetensors files interoperate with the reference `safetensors` package, both
ways, bit for bit, for every dtype checkpoints use; loading is lazy.
"""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as np_load
from safetensors.numpy import save_file as np_save
from safetensors.torch import load_file as torch_load
from safetensors.torch import save_file as torch_save

from amlx import _mlx as mx
from amlx._mlx.dtypes import bf16_bits_to_f32

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "uint32": np.uint32,
                "uint8": np.uint8, "bool": np.bool_}
HEADER_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32",
                "uint8": "U8", "bool": "BOOL"}
SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4)]
METADATA = {"format": "pt", "note": "ünïcode ✓", "empty": ""}


def sample(dtype: str, shape, seed: int) -> np.ndarray:
    """Values that exercise each dtype's range (special floats included)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if dtype == "bool":
        return (rng.random(n) < 0.5).reshape(shape)
    if dtype in ("float32", "float16"):
        v = (rng.standard_normal(n) * 100).astype(dtype)
        special = np.array([0.0, -0.0, np.inf, -np.inf, np.finfo(dtype).max, np.finfo(dtype).tiny], dtype)
        v[:min(n, len(special))] = special[:n]
        return v.reshape(shape)
    info = np.iinfo(dtype)
    v = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
    v[:min(n, 2)] = [info.min, info.max][:min(n, 2)]
    return v.reshape(shape)


def bf16_bits(shape, seed: int) -> np.ndarray:
    """bfloat16 bit patterns of finite values, +-0, +-inf and a NaN."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bits = np.where((bits & 0x7F80) == 0x7F80, bits & 0x807F, bits)  # no NaN/inf at random
    special = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0], np.uint16)
    bits[:min(n, len(special))] = special[:n]
    return bits.astype(np.uint16).reshape(shape)


def amlx_bits(a: mx.Array) -> np.ndarray:
    """The raw element bits of an amlx array (bfloat16 as uint16)."""
    if a.dtype is mx.bfloat16:
        return mx.ops.view(a, mx.uint16).numpy()
    return a.numpy()


def header_of(path) -> dict:
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])


# -- amlx writes, safetensors reads ------------------------------------------------

@pytest.mark.parametrize("dtype", list(NUMPY_DTYPES))
def test_amlx_writes_safetensors_numpy_reads(tmp_path, dtype):
    want = {f"t{i}": sample(dtype, shape, i) for i, shape in enumerate(SHAPES)}
    path = tmp_path / f"{dtype}.safetensors"
    mx.io.save_safetensors(path, {k: mx.array(v) for k, v in want.items()}, METADATA)
    header = header_of(path)
    assert header["__metadata__"] == METADATA
    assert all(header[k]["dtype"] == HEADER_NAMES[dtype] for k in want)
    got = np_load(str(path))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].tobytes() == v.tobytes(), k  # bit for bit (also -0.0 and inf)
    with safe_open(str(path), "np") as f:
        assert f.metadata() == METADATA


def test_amlx_writes_bfloat16_torch_reads(tmp_path):
    bits = {f"t{i}": bf16_bits(shape, i) for i, shape in enumerate(SHAPES)}
    path = tmp_path / "bf16.safetensors"
    mx.io.save_safetensors(path, {k: mx.from_bits(v, mx.bfloat16) for k, v in bits.items()}, METADATA)
    assert all(header_of(path)[k]["dtype"] == "BF16" for k in bits)
    got = torch_load(str(path))
    for k, v in bits.items():
        t = got[k]
        assert t.dtype == torch.bfloat16 and tuple(t.shape) == v.shape, k
        assert np.array_equal(t.view(torch.int16).numpy().view(np.uint16), v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == METADATA


def test_amlx_writes_mixed_dtypes_non_contiguous(tmp_path):
    # Views (transposes, slices) are written in row-major order.
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    a = mx.array(base)
    arrays = {"t": a.T, "s": a[1:3, ::2], "h": (a * 0.5).astype(mx.float16), "b": a > 7.0,
              "bf": a.astype(mx.bfloat16)}
    path = tmp_path / "mixed.safetensors"
    mx.io.save_safetensors(path, arrays)
    got = torch_load(str(path))
    assert np.array_equal(got["t"].numpy(), base.T)
    assert np.array_equal(got["s"].numpy(), base[1:3, ::2])
    assert np.array_equal(got["h"].numpy(), (base * 0.5).astype(np.float16))
    assert np.array_equal(got["b"].numpy(), base > 7)
    assert np.array_equal(got["bf"].float().numpy(), base)  # small integers are exact in bf16


# -- safetensors writes, amlx reads ------------------------------------------------

@pytest.mark.parametrize("dtype", list(NUMPY_DTYPES))
def test_safetensors_numpy_writes_amlx_reads(tmp_path, dtype):
    want = {f"t{i}": sample(dtype, shape, 100 + i) for i, shape in enumerate(SHAPES)}
    path = tmp_path / f"{dtype}.safetensors"
    np_save(want, str(path), metadata=METADATA)
    got, meta = mx.io.load_safetensors(path)
    assert meta == METADATA
    assert set(got) == set(want)
    for k, v in want.items():
        a = got[k]
        assert a.dtype.name == dtype and a.shape == v.shape, k
        assert a.numpy().tobytes() == v.tobytes(), k


def test_safetensors_torch_writes_bfloat16_amlx_reads(tmp_path):
    bits = {f"t{i}": bf16_bits(shape, 200 + i) for i, shape in enumerate(SHAPES)}
    tensors = {k: torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16) for k, v in bits.items()}
    path = tmp_path / "bf16.safetensors"
    torch_save(tensors, str(path), metadata=METADATA)
    got, meta = mx.io.load_safetensors(path)
    assert meta == METADATA
    for k, v in bits.items():
        a = got[k]
        assert a.dtype is mx.bfloat16 and a.shape == v.shape, k
        assert np.array_equal(amlx_bits(a), v), k
        # Values read back as float32 agree with torch's own conversion (NaN aside).
        want = tensors[k].float().numpy()
        np.testing.assert_array_equal(a.numpy(), want)
        np.testing.assert_array_equal(bf16_bits_to_f32(v), want)


def test_safetensors_torch_writes_all_dtypes_amlx_reads(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {
        "f32": torch.from_numpy(rng.standard_normal((4, 4)).astype(np.float32)),
        "f16": torch.from_numpy(rng.standard_normal((4, 4)).astype(np.float16)),
        "bf16": torch.from_numpy(rng.standard_normal((4, 4)).astype(np.float32)).to(torch.bfloat16),
        "i32": torch.from_numpy(rng.integers(-1000, 1000, (5,), dtype=np.int32)),
        "u8": torch.from_numpy(rng.integers(0, 255, (5,), dtype=np.uint8)),
        "bool": torch.tensor([True, False, True]),
    }
    path = tmp_path / "torch.safetensors"
    torch_save(tensors, str(path))
    got, meta = mx.io.load_safetensors(path)
    assert meta == {}
    for k, t in tensors.items():
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        np.testing.assert_array_equal(got[k].numpy(), want)


def test_round_trip_through_amlx(tmp_path):
    arrays = {dt: mx.array(sample(dt, (3, 4), 7)) for dt in NUMPY_DTYPES}
    arrays["bfloat16"] = mx.from_bits(bf16_bits((3, 4), 7), mx.bfloat16)
    path = tmp_path / "rt.safetensors"
    mx.io.save_safetensors(path, arrays, METADATA)
    got, meta = mx.io.load_safetensors(path)
    assert meta == METADATA
    for k, a in arrays.items():
        assert got[k].dtype is a.dtype
        assert np.array_equal(amlx_bits(got[k]), amlx_bits(a)), k


# -- lazy loading --------------------------------------------------------------------

def test_loading_is_lazy(tmp_path):
    big = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)  # 16 MiB
    small = np.arange(1000, dtype=np.float32)
    path = tmp_path / "big.safetensors"
    np_save({"big": big, "small": small, "other": big[:512]}, str(path))
    gc.collect()
    start = mx.memory.active()
    arrays, _ = mx.io.load_safetensors(path)
    assert arrays["big"].shape == (2048, 2048) and arrays["big"].dtype is mx.float32
    assert mx.memory.active() - start < 4096  # nothing read yet
    # Using one tensor reads that tensor alone.
    np.testing.assert_array_equal(arrays["small"].numpy(), small)
    assert mx.memory.active() - start < 4096 + small.nbytes * 2
    np.testing.assert_allclose(arrays["big"].sum().item(), big.sum(dtype=np.float64), rtol=1e-4)
    used = mx.memory.active() - start
    assert big.nbytes <= used < big.nbytes + 512 * 2048 * 4  # "other" still unread
    for a in arrays.values():
        a.close()
    assert mx.memory.active() == start
