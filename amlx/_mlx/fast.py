"""MLX's fused kernels: normalisation, rotary embeddings, attention."""

from __future__ import annotations

import functools
import math

from amlx._mlx._lib import check, ffi, lib
from amlx._mlx.array import Array, _call, _handle_or_null
from amlx._mlx.dtypes import Dtype
from amlx._mlx.ops import _Vec



def rms_norm(x: Array, weight: Array | None, eps: float) -> Array:
    return _call(lib.mlxc_rms_norm, "rms_norm", x.handle, _handle_or_null(weight), float(eps))


def layer_norm(x: Array, weight: Array | None, bias: Array | None, eps: float) -> Array:
    return _call(lib.mlxc_layer_norm, "layer_norm", x.handle, _handle_or_null(weight), _handle_or_null(bias), float(eps))


def rope(x: Array, dims: int, *, traditional: bool = False, base: float | None = None, scale: float = 1.0,
         offset: int | Array = 0, freqs: Array | None = None) -> Array:
    """Rotary embedding over the last axis of x (B, H, L, D) from position `offset`.

    `offset` is an int, or an int array: a scalar, or one offset per batch row.
    Give either `base` or `freqs`: custom frequencies as MLX defines them, the
    periods `base ** (2i / dims)` (the reciprocal of Hugging Face's inv_freq), so
    that the angle of pair i at position p is `p * scale / freqs[i]`."""
    if (base is None) == (freqs is None):
        raise ValueError("rope: give exactly one of base and freqs")
    b = math.nan if base is None else float(base)
    if isinstance(offset, Array):
        return _call(lib.mlxc_rope_dynamic, "rope", x.handle, int(dims), int(traditional), b, float(scale),
                     offset.handle, _handle_or_null(freqs))
    return _call(lib.mlxc_rope, "rope", x.handle, int(dims), int(traditional), b, float(scale), int(offset),
                 _handle_or_null(freqs))


def scaled_dot_product_attention(q: Array, k: Array, v: Array, *, scale: float,
                                 mask: None | str | Array = None) -> Array:
    """softmax(q k^T * scale + mask) v with grouped-query broadcasting.

    `mask` is None, "causal", or an array (boolean: keep where true; float: added)."""
    if mask is None:
        return _call(lib.mlxc_sdpa, "scaled_dot_product_attention", q.handle, k.handle, v.handle, float(scale),
                     b"", 0)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask mode {mask!r}")
        return _call(lib.mlxc_sdpa, "scaled_dot_product_attention", q.handle, k.handle, v.handle, float(scale),
                     b"causal", 0)
    return _call(lib.mlxc_sdpa, "scaled_dot_product_attention", q.handle, k.handle, v.handle, float(scale),
                 b"array", mask.handle)


@functools.cache
def cuda_available() -> bool:
    """Whether MLX runs on its CUDA backend here (custom CUDA kernels can run);
    fixed for the process, so asked once."""
    return bool(lib.mlxc_cuda_available())


class CudaKernel:
    """A custom CUDA kernel that MLX JIT-compiles and runs as one graph node.

    `source` is the kernel body; MLX writes the signature: `const T* name` for
    each input (T from its dtype), `T* name` for each output, then the template
    arguments as `constexpr int/bool NAME` or `using NAME = type`. Only MLX's
    CUDA backend can run it (see `cuda_available`)."""

    def __init__(self, name: str, inputs: list[str], outputs: list[str], source: str, header: str = "",
                 ensure_row_contiguous: bool = True):
        keep = [ffi.new("char[]", s.encode()) for s in inputs + outputs]
        ins = ffi.new("char*[]", keep[:len(inputs)])
        outs = ffi.new("char*[]", keep[len(inputs):])
        out = ffi.new("mlxc_kernel*")
        check(lib.mlxc_cuda_kernel_new(name.encode(), ins, len(inputs), outs, len(outputs), source.encode(),
                                       header.encode(), int(ensure_row_contiguous), 0, out), "cuda_kernel")
        self._k = ffi.gc(out[0], lib.mlxc_cuda_kernel_free)
        self.name = name

    def __call__(self, inputs: list[Array], output_shapes: list[tuple[int, ...]], output_dtypes: list,
                 grid: tuple[int, int, int], threadgroup: tuple[int, int, int],
                 template: dict[str, object] | None = None) -> list[Array]:

        template = template or {}
        names = [ffi.new("char[]", n.encode()) for n in template]
        kinds, values = [], []
        for v in template.values():
            if isinstance(v, bool):
                kinds.append(1)
                values.append(int(v))
            elif isinstance(v, int):
                kinds.append(0)
                values.append(v)
            elif isinstance(v, Dtype):
                kinds.append(2)
                values.append(v.code)
            else:
                raise TypeError(f"{self.name}: template arguments are ints, bools or dtypes, not {type(v).__name__}")
        shapes = [int(d) for s in output_shapes for d in s]
        handles = [a.handle for a in inputs]
        with _Vec() as v:
            check(lib.mlxc_cuda_kernel_apply(
                self._k, ffi.new("mlxc_array[]", handles), len(handles), ffi.new("int[]", shapes or [0]),
                ffi.new("int[]", [len(s) for s in output_shapes]), ffi.new("int[]", [d.code for d in output_dtypes]),
                len(output_shapes), *grid, *threadgroup, ffi.new("char*[]", names), ffi.new("int[]", kinds or [0]),
                ffi.new("int[]", values or [0]), len(names), v.h), self.name)
            return v.arrays()
