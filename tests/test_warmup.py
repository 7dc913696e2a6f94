"""Load-time warm-up of quantized matmuls (amlx/models/warmup.py) and the error that
names the fix when MLX's CUDA kernel compiler misses a header (amlx/_mlx/_lib.py).

The GPU side (kernels really compiled at load, the first request no longer
stalling) is measured by benchmarks/first_request.py on the lent GPU; here the
warm-up's choice of shapes and rows, its notice and its switch are checked on
the CPU, and the missing-header error with NVRTC's own wording, simulated."""

from __future__ import annotations

import numpy as np
import pytest

from amlx import _mlx as mx
from amlx._mlx import _lib
from amlx._mlx import ops as O
from amlx.errors import MLXError
from amlx.models.nn import Module, QuantizedEmbedding, QuantizedLinear
from amlx.models.warmup import needs_warmup, precompile, quantized_shapes, rows_to_warm, warm_quantized_matmuls

# NVRTC's log as MLX 0.32's JIT reports it when CUDA's crt/ headers are absent
NVRTC_CRT_LOG = (
    'Failed to compile kernel: /usr/local/lib/python3.12/site-packages/mlx/include/cute/arch/'
    'mma_sm90_desc.hpp(35): catastrophic error: cannot open source file "crt/mma.h"\n'
    '  #include <crt/mma.h>\n                      ^\n\n1 catastrophic error detected in the compilation of '
    '"qmm_sm90_tn_bfloat16_n16_b4_g64_affine.cu".\nCompilation terminated.\n.')


def _quantized_linear(rng, k: int, n: int, group: int = 64, bits: int = 4) -> QuantizedLinear:
    w = mx.array(rng.normal(0, 0.02, (n, k)).astype(np.float32))
    wq, scales, biases = O.quantize(w, group, bits)
    return QuantizedLinear(wq, scales, biases, group, bits)


class _Tiny(Module):
    def __init__(self, rng):
        w = mx.array(rng.normal(0, 0.02, (96, 128)).astype(np.float32))
        self.embed = QuantizedEmbedding(*O.quantize(w, 64, 4), 64, 4)
        self.layers = [_Tiny.Block(rng), _Tiny.Block(rng)]  # same shapes twice: warmed once

    class Block(Module):
        def __init__(self, rng):
            self.up = _quantized_linear(rng, 128, 256)
            self.down = _quantized_linear(rng, 256, 128, group=128, bits=8)


def test_rows_cover_each_tile_once():
    assert rows_to_warm(1) == []
    assert rows_to_warm(2) == [2]
    assert rows_to_warm(4) == [4]
    assert rows_to_warm(8) == [5]
    assert rows_to_warm(16) == [5]  # 2..4 rows: amlx's own kernel on CUDA; 5 reaches MLX's first tile
    assert rows_to_warm(17) == [5, 17]
    assert rows_to_warm(64) == [5, 17, 33]
    assert rows_to_warm(2048) == [5, 17, 33, 65, 129]


def test_warmup_runs_each_distinct_shape_for_each_row_count():
    model = _Tiny(np.random.default_rng(0))
    x = mx.array(np.random.default_rng(1).normal(size=(3, 128)).astype(np.float32))
    before = model.layers[0].up(x).numpy()
    lines: list[str] = []
    report = warm_quantized_matmuls(model, 40, write=lines.append, notice_after=60.0)
    # shapes: embed as lm head 128->96, up 128->256, down 256->128 (8 bits); rows 2, 17, 33
    assert report.matmuls == 3 * 3
    assert lines == []  # nothing slow: no notice
    np.testing.assert_array_equal(model.layers[0].up(x).numpy(), before)


def test_notice_shows_when_the_warmup_takes_long():
    lines: list[str] = []
    warm_quantized_matmuls(_Tiny(np.random.default_rng(0)), 2, write=lines.append, notice_after=0.0)
    assert lines and "compiling GPU kernels" in lines[0] and "once" in lines[0]


def test_precompile_runs_each_variant_in_a_child():
    """One child per (dtype, bits, group, rows): here two kinds (4-bit/64 and 8-bit/128;
    the two 4-bit shapes share a variant) at one row count; each child exits cleanly."""
    shapes = quantized_shapes(_Tiny(np.random.default_rng(0)))
    assert precompile(shapes, [2], timeout=240) == 2


def test_needs_warmup_only_on_cuda_with_quantized_layers(monkeypatch):
    model = _Tiny(np.random.default_rng(0))
    assert not needs_warmup(model, "cpu")
    monkeypatch.setattr("amlx.models.warmup.fast.cuda_available", lambda: True)
    assert needs_warmup(model, "gpu")
    assert not needs_warmup(Module(), "gpu")
    monkeypatch.setenv("AMLX_WARMUP", "0")
    assert not needs_warmup(model, "gpu")


class _FakeLib:
    def __init__(self, message: str):
        self._message = _lib.ffi.new("char[]", message.encode())

    def mlxc_last_error(self):
        return self._message


def test_missing_crt_header_names_the_fix(monkeypatch):
    monkeypatch.setattr(_lib, "lib", _FakeLib(NVRTC_CRT_LOG))
    err = _lib.error("eval")
    assert isinstance(err, MLXError)
    assert err.mlx_message == NVRTC_CRT_LOG  # MLX's own text is kept
    assert "pip install nvidia-cuda-crt" in str(err) and "crt/mma.h" in str(err)
    assert err.hint is not None and "nvidia-cuda-crt" in err.hint


def test_other_missing_header_names_the_toolkit():
    hint = _lib.fix_for('Failed to compile kernel: x.cu(1): catastrophic error: cannot open source file '
                        '"cuda_fp16.h"\n.')
    assert hint is not None and "cuda_fp16.h" in hint and "CUDA toolkit" in hint


def test_ordinary_errors_have_no_hint():
    with pytest.raises(MLXError) as info:
        O.reshape(mx.array(np.zeros(6, np.float32)), (4,))
    assert info.value.hint is None
    assert _lib.fix_for("[matmul] Last dimension of first input with shape (2,3) must match") is None


@pytest.mark.parametrize("message", [
    "cudaMallocAsync(&data, size, stream) failed: out of memory",  # MLX's CUDA allocator (H200, 2026-12-03)
    "cudaMalloc(&data, size) failed: out of memory",
    "[malloc] Unable to allocate 17179869184 bytes.",  # the common allocator
    "[metal::malloc] Attempting to allocate 90000000000 bytes which is greater than the maximum allowed "
    "buffer size of 77309411328 bytes.",
    "[METAL] Command buffer execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
])
def test_out_of_memory_names_what_to_lower(monkeypatch, message):
    """An allocation failure says what it is and what to change, MLX's own text kept; the
    server maps it to 503 out_of_memory (tests/test_serve_failures.py)."""
    monkeypatch.setattr(_lib, "lib", _FakeLib(message))
    err = _lib.error("eval")
    assert err.mlx_message == message
    assert err.hint is not None and "ran out of memory" in err.hint
    assert "kv_cache_memory" in str(err) and "max_batch_size" in str(err) and "other processes" in str(err).lower()
