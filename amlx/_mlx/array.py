"""`Array`: a Python object owning exactly one MLX array handle."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Union

import numpy as np

from amlx._mlx import dtypes as _dt
from amlx._mlx._lib import arraytype, check, error, ffi, lib

# The hot path (every op) uses these module-level bindings: a name lookup in
# a module is cheaper than an attribute lookup on cffi's `lib`/`ffi`.
_new = ffi.new
_ARRAY_OUT = ffi.typeof("mlxc_array*")
_binary = lib.mlxc_binary_r
_binary_float = lib.mlxc_binary_float_r
_binary_int = lib.mlxc_binary_int_r
# A new Array owning a handle (an int, not 0): the C core makes it (vendor/mlxc/arraytype.c).
_adopt = arraytype.adopt


def _address(function: str) -> int:
    """An mlxc function's address, for the C core to call (it does not link against mlxc)."""
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, function)))


def _call(fn, op: str, *args) -> "Array":
    """Calls an mlxc function whose last parameter is `mlxc_array* out`."""
    out = _new(_ARRAY_OUT)
    if fn(*args, out):
        raise error(op)
    return _adopt(out[0])


def _adopt_all(handles, n: int) -> list["Array"]:
    """Arrays owning the n new handles of a `mlxc_array[]` an mlxc function filled."""
    return [_adopt(handles[i]) for i in range(n)]


def _handle_or_null(a: "Array | None") -> int:
    """An optional array argument of an mlxc function: its handle, or 0 (none)."""
    return 0 if a is None else a.handle


def _call_optional(fn, op: str, *args) -> "Array | None":
    """`_call` for an mlxc function that may set `*out` to 0: then None."""
    out = _new(_ARRAY_OUT)
    if fn(*args, out):
        raise error(op)
    return _adopt(out[0]) if out[0] else None


_Operand = Union["Array", float, int, bool]  # what the operators take


class Array(arraytype.ArrayCore):
    """An MLX array. Owns one native handle: `close()` releases it now, the
    garbage collector releases it otherwise (a safety net, not the plan).

    The handle, its release and the operators of the common cases (arrays with
    arrays, Python floats and ints; negation, abs, invert) live in the C core,
    `ArrayCore` (vendor/mlxc/arraytype.c); everything else is here.

    Inherited from the core:

    - `close()`: releases the native handle; the array is unusable afterwards.
    - `handle`: the raw mlxc_array (an int), valid only while this Array is
      alive and open. It does not keep the Array alive: `f(make_array().handle)`
      frees the temporary before `f` runs (a use-after-free). Hold the Array in
      a variable across the C call.
    - `_h`: the same, 0 once closed, writable (amlx._mlx moves handles with it)."""

    __slots__ = ("__weakref__",)

    if TYPE_CHECKING:  # the operators live in the C core; their types:
        def __add__(self, other: _Operand) -> Array: ...
        def __radd__(self, other: _Operand) -> Array: ...
        def __sub__(self, other: _Operand) -> Array: ...
        def __rsub__(self, other: _Operand) -> Array: ...
        def __mul__(self, other: _Operand) -> Array: ...
        def __rmul__(self, other: _Operand) -> Array: ...
        def __truediv__(self, other: _Operand) -> Array: ...
        def __rtruediv__(self, other: _Operand) -> Array: ...
        def __floordiv__(self, other: _Operand) -> Array: ...
        def __rfloordiv__(self, other: _Operand) -> Array: ...
        def __mod__(self, other: _Operand) -> Array: ...
        def __rmod__(self, other: _Operand) -> Array: ...
        def __pow__(self, other: _Operand) -> Array: ...
        def __rpow__(self, other: _Operand) -> Array: ...
        def __matmul__(self, other: _Operand) -> Array: ...
        def __rmatmul__(self, other: _Operand) -> Array: ...
        def __and__(self, other: _Operand) -> Array: ...
        def __rand__(self, other: _Operand) -> Array: ...
        def __or__(self, other: _Operand) -> Array: ...
        def __ror__(self, other: _Operand) -> Array: ...
        def __xor__(self, other: _Operand) -> Array: ...
        def __rxor__(self, other: _Operand) -> Array: ...
        def __lshift__(self, other: _Operand) -> Array: ...
        def __rlshift__(self, other: _Operand) -> Array: ...
        def __rshift__(self, other: _Operand) -> Array: ...
        def __rrshift__(self, other: _Operand) -> Array: ...
        def __eq__(self, other: object) -> Array: ...  # type: ignore[override]
        def __ne__(self, other: object) -> Array: ...  # type: ignore[override]
        def __lt__(self, other: _Operand) -> Array: ...
        def __le__(self, other: _Operand) -> Array: ...
        def __gt__(self, other: _Operand) -> Array: ...
        def __ge__(self, other: _Operand) -> Array: ...
        def __neg__(self) -> Array: ...
        def __abs__(self) -> Array: ...
        def __invert__(self) -> Array: ...

    def __init__(self, value, dtype=None):
        if self._h:  # (initialised again: the handle it held is released, not leaked)
            self.close()
        src = array(value, dtype)
        if src is value:  # an Array already: share the MLX array, not the caller's handle
            src = _call(lib.mlxc_array_clone, "array", value.handle)
        self._h = src._h
        src._h = 0

    def __enter__(self) -> "Array":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Every handle has exactly one owner, so a copy takes a new handle to the
    # same (immutable) MLX array; copying the raw slot would free it twice.
    def __copy__(self) -> "Array":
        return _call(lib.mlxc_array_clone, "copy", self.handle)

    def __deepcopy__(self, memo) -> "Array":
        return self.__copy__()

    def __reduce__(self):
        raise TypeError("amlx arrays cannot be pickled: save them with io.save_safetensors or .numpy()")

    # -- metadata -------------------------------------------------------
    @property
    def ndim(self) -> int:
        return lib.mlxc_array_ndim(self.handle)

    @property
    def shape(self) -> tuple:
        h = self.handle
        n = lib.mlxc_array_ndim(h)
        buf = ffi.new("int[]", max(n, 1))
        lib.mlxc_array_shape(h, buf)
        return tuple(buf[0:n])

    @property
    def dtype(self) -> _dt.Dtype:
        return _dt.BY_CODE[lib.mlxc_array_dtype(self.handle)]

    @property
    def size(self) -> int:
        return lib.mlxc_array_size(self.handle)

    @property
    def nbytes(self) -> int:
        return lib.mlxc_array_nbytes(self.handle)

    def is_ready(self) -> bool:
        """Whether the array's value is computed: launched (`async_eval`) and finished.
        Never waits and never launches anything (a lazy, unlaunched array is not ready)."""
        return bool(lib.mlxc_array_is_ready(self.handle))

    def __len__(self) -> int:
        shape = self.shape
        if not shape:
            raise TypeError("len() of a 0-d array")
        return shape[0]

    # -- read-back ------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """A numpy copy (evaluates). bfloat16 comes back as float32."""
        dt = self.dtype
        out = np.empty(self.shape, dtype=dt.np)
        check(lib.mlxc_array_copy_out(self.handle, ffi.from_buffer(out, require_writable=True), out.nbytes),
              "numpy")
        if dt is _dt.bfloat16:
            return _dt.bf16_bits_to_f32(out)
        return out

    def tolist(self):
        return self.numpy().tolist()

    def item(self):
        if self.size != 1:
            raise ValueError(f"item() needs an array of one element, not shape {self.shape}")
        return self.numpy().reshape(()).item()

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __bool__(self) -> bool:
        return bool(self.item())

    def __index__(self) -> int:
        if not self.dtype.is_integer:
            raise TypeError("only integer arrays can be used as an index")
        return int(self.item())

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        if not self._h:
            return "Array(<closed>)"
        return f"Array({self.numpy()!r}, dtype={self.dtype.name})"

    # -- conveniences delegating to ops --------------------------------
    def astype(self, dtype) -> "Array":
        return _ops.astype(self, dtype)

    if TYPE_CHECKING:  # in the C core (ints in C, anything else through _reshape_method below)
        def reshape(self, *shape) -> Array: ...

    def transpose(self, *axes) -> "Array":
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = axes[0]
        return _ops.transpose(self, axes or None)

    if TYPE_CHECKING:  # in the C core
        @property
        def T(self) -> Array: ...

    def sum(self, axis=None, keepdims=False) -> "Array":
        return _ops.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False) -> "Array":
        return _ops.mean(self, axis, keepdims)

    def max(self, axis=None, keepdims=False) -> "Array":
        return _ops.max(self, axis, keepdims)

    def min(self, axis=None, keepdims=False) -> "Array":
        return _ops.min(self, axis, keepdims)

    if TYPE_CHECKING:  # in the C core (basic indices in C, anything else through indexing.getitem)
        def __getitem__(self, index) -> Array: ...

    # Arrays compare elementwise, so they hash by identity.
    __hash__ = object.__hash__


def _binary_arrays(code: int, name: str, a: Array, b: Array, reflected: bool) -> Array:
    """op(a, b) of two Arrays (op(b, a) when `reflected`)."""
    h = a.handle
    o = b.handle
    out = _binary(code, o, h) if reflected else _binary(code, h, o)
    if not out:  # (0: the op failed)
        raise error(name)
    return _adopt(out)


def binary_op(code: int, name: str, reflected: bool = False):
    """The function f(a, other) = op(a, other) (op(other, a) when `reflected`)
    for an Array `a`, as the ops module's functions call it. `other` is an
    Array, a Python scalar (weakly typed: it takes a's dtype where it can) or
    numpy data / nested lists (strongly typed). Python floats and ints go to C
    as they are (no scalar array on this side), one C call per op."""

    def op(a, other):
        h = a.handle
        kind = type(other)
        if kind is float:
            out = _binary_float(code, h, other, reflected)
        elif kind is int:
            out = _binary_int(code, h, other, reflected)
        else:
            if not isinstance(other, Array):
                other = scalar_like(other, a)
            return _binary_arrays(code, name, a, other, reflected)
        if not out:
            raise error(name)
        return _adopt(out)

    op.__name__ = name
    return op


_OPERANDS = (numbers.Number, np.ndarray, np.generic, list, tuple)


def _operator_other(code: int, name: str, a: Array, other, reflected: bool):
    """An operator of Array `a` whose other operand is neither an Array nor exactly a
    Python float or int (those the C core handles): numpy data, nested lists, bool,
    numpy scalars, other numbers. Anything else is NotImplemented, so Python tries the
    other operand (and `==` falls back to identity)."""
    if not isinstance(other, _OPERANDS):
        return NotImplemented
    return _binary_arrays(code, name, a, scalar_like(other, a), reflected)


def _scalar(value, dtype: _dt.Dtype) -> Array:
    if dtype is _dt.bool_:
        return _call(lib.mlxc_array_from_bool, "array", int(bool(value)))
    if isinstance(value, (bool, np.bool_)) or not dtype.is_floating and isinstance(value, numbers.Integral):
        return _call(lib.mlxc_array_from_int, "array", int(value), dtype.code)
    return _call(lib.mlxc_array_from_double, "array", float(value), dtype.code)


def scalar_like(value, like: Array) -> Array:
    """A Python scalar (or numpy data) as an array for an op with `like`.

    Python scalars are weakly typed as in MLX's own bindings: a float takes a
    floating array's dtype and an int takes any numeric array's dtype, so
    `x_bf16 * 0.5` stays bfloat16."""
    if isinstance(value, (np.ndarray, list, tuple, np.generic)):
        return array(value)
    dt = like.dtype
    if isinstance(value, bool):
        return _scalar(value, _dt.bool_)
    if isinstance(value, numbers.Integral):
        return _scalar(value, dt if dt is not _dt.bool_ else _dt.int32)
    if isinstance(value, numbers.Real):
        return _scalar(value, dt if dt.is_floating else _dt.float32)
    raise TypeError(f"cannot combine {type(value).__name__} with an array")


def array(value, dtype=None) -> Array:
    """Creates an array from an Array, numpy array, Python scalar or nested list."""
    dt = None if dtype is None else _dt.as_dtype(dtype)
    if isinstance(value, Array):
        return value if dt is None or value.dtype is dt else value.astype(dt)
    if isinstance(value, (bool, numbers.Number)) and not isinstance(value, np.generic):
        if dt is None:
            dt = _dt.bool_ if isinstance(value, bool) else _dt.int32 if isinstance(value, numbers.Integral) \
                else _dt.float32
        return _scalar(value, dt)
    np_value = np.asarray(value)
    if dt is None:
        dt = _dt.from_numpy(np_value.dtype)
    if dt is _dt.bfloat16:
        raw = _dt.f32_to_bf16_bits(np_value.astype(np.float32))
    else:
        raw = np.asarray(np_value, dtype=dt.np, order="C")  # ascontiguousarray would make 0-d 1-d
    shape = ffi.new("int[]", list(raw.shape) or [0])
    return _call(lib.mlxc_array_from_data, "array", ffi.from_buffer(raw), shape, raw.ndim, dt.code)


def upload(value: np.ndarray) -> Array:
    """An array holding a copy of a numpy array, for data on its way to the GPU.

    On CUDA the driver's copy engine writes it where MLX's own copy would write managed
    memory the GPU last held, a page fault at a time (`mlxc_array_upload`; a step's 2 MB
    of token masks: 0.62 ms). Elsewhere, the same as `array(value)`. One C call: the GIL
    is released for the copy."""
    raw = np.ascontiguousarray(value)
    dt = _dt.from_numpy(raw.dtype)
    if raw.ndim == 0 or dt is _dt.bfloat16:
        return array(raw)
    shape = ffi.new("int[]", list(raw.shape))
    return _call(lib.mlxc_array_upload, "upload", ffi.from_buffer(raw), shape, raw.ndim, dt.code)


def upload_by_driver() -> bool:
    """Whether `upload` copies with the CUDA driver here (MLX on CUDA, the GPU the default device)."""
    return bool(lib.mlxc_upload_by_driver())


def from_bits(raw: np.ndarray, dtype) -> Array:
    """An array from raw element bits (e.g. uint16 patterns for bfloat16)."""
    dt = _dt.as_dtype(dtype)
    raw = np.asarray(raw, order="C")
    if raw.dtype.itemsize != dt.size:
        raise TypeError(f"{raw.dtype} bits do not fit {dt.name}")
    shape = ffi.new("int[]", list(raw.shape) or [0])
    return _call(lib.mlxc_array_from_data, "array", ffi.from_buffer(raw), shape, raw.ndim, dt.code)


arraytype.install(*(_address(f) for f in ("mlxc_binary_r", "mlxc_binary_float_r", "mlxc_binary_int_r", "mlxc_unary",
                                           "mlxc_array_free")),
                  Array, _operator_other, error)

# The methods above delegate to the ops and indexing modules, which import this one: bound here,
# once this module's names exist, rather than imported inside every call (190 ns each).
from amlx._mlx import indexing as _indexing  # noqa: E402
from amlx._mlx import ops as _ops  # noqa: E402


def _reshape_method(a: Array, *shape) -> Array:
    """Array.reshape for what the C core leaves to Python (numpy integers, other sequences)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return _ops.reshape(a, shape)


arraytype.install_reshape(_address("mlxc_reshape"), _reshape_method)
arraytype.install_getitem(*(_address(f) for f in ("mlxc_array_ndim", "mlxc_array_shape", "mlxc_slice", "mlxc_squeeze",
                                                 "mlxc_expand_dims", "mlxc_transpose")), _indexing.getitem)
