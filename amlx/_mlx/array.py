"""`Array`: a Python object owning exactly one MLX array handle."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Union

import numpy as np

from amlx._mlx import dtypes as _dt
from amlx._mlx._lib import check, error, ffi, lib

# The hot path (every op) uses these module-level bindings: a name lookup in
# a module is cheaper than an attribute lookup on cffi's `lib`/`ffi`.
_free = lib.mlxc_array_free
_new = ffi.new
_alloc = object.__new__
_ARRAY_OUT = ffi.typeof("mlxc_array*")
_binary = lib.mlxc_binary_r
_binary_float = lib.mlxc_binary_float_r
_binary_int = lib.mlxc_binary_int_r


def _call(fn, op: str, *args) -> "Array":
    """Calls an mlxc function whose last parameter is `mlxc_array* out`."""
    out = _new(_ARRAY_OUT)
    if fn(*args, out):
        raise error(op)
    a = _alloc(Array)
    a._h = out[0]
    return a


def _adopt_all(handles, n: int) -> list["Array"]:
    """Arrays owning the n new handles of a `mlxc_array[]` an mlxc function filled."""
    out = []
    for i in range(n):
        a = _alloc(Array)
        a._h = handles[i]
        out.append(a)
    return out


def _handle_or_null(a: "Array | None"):
    """An optional array argument of an mlxc function: its handle, or NULL."""
    return ffi.NULL if a is None else a.handle


def _call_optional(fn, op: str, *args) -> "Array | None":
    """`_call` for an mlxc function that may set `*out` to NULL: then None."""
    out = _new(_ARRAY_OUT)
    if fn(*args, out):
        raise error(op)
    if out[0] == ffi.NULL:
        return None
    a = _alloc(Array)
    a._h = out[0]
    return a


def _closed() -> ValueError:
    return ValueError("array is closed")


_Operand = Union["Array", float, int, bool]  # what the operators take


class Array:
    """An MLX array. Owns one native handle: `close()` releases it now, the
    garbage collector releases it otherwise (a safety net, not the plan)."""

    __slots__ = ("_h", "__weakref__")

    if TYPE_CHECKING:  # the operators are attached after the class, from one table; their types:
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
        src = array(value, dtype)
        if src is value:  # an Array already: share the MLX array, not the caller's handle
            src = _call(lib.mlxc_array_clone, "array", value.handle)
        self._h = src._h
        src._h = None

    # -- lifetime -------------------------------------------------------
    # `_h` is the raw mlxc_array (a cffi pointer) or None once closed. Freeing
    # in __del__ is cheaper per array than a cffi ffi.gc wrapper.
    def close(self) -> None:
        """Releases the native handle; the array is unusable afterwards."""
        h = self._h
        if h is not None:
            self._h = None
            _free(h)

    def __del__(self, _free=_free):
        try:
            h = self._h
        except AttributeError:  # construction failed before a handle was taken
            return
        if h is not None:
            _free(h)

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

    @property
    def handle(self):
        """The raw mlxc_array, valid only while this Array is alive and open.

        It does not keep the Array alive: `f(make_array().handle)` frees the
        temporary before `f` runs (a use-after-free). Hold the Array in a
        variable across the C call."""
        h = self._h
        if h is None:
            raise _closed()
        return h

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
        if self._h is None:
            return "Array(<closed>)"
        return f"Array({self.numpy()!r}, dtype={self.dtype.name})"

    # -- conveniences delegating to ops --------------------------------
    def astype(self, dtype) -> "Array":
        from amlx._mlx import ops
        return ops.astype(self, dtype)

    def reshape(self, *shape) -> "Array":
        from amlx._mlx import ops
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        return ops.reshape(self, shape)

    def transpose(self, *axes) -> "Array":
        from amlx._mlx import ops
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = axes[0]
        return ops.transpose(self, axes or None)

    @property
    def T(self) -> "Array":
        from amlx._mlx import ops
        return ops.transpose(self)

    def sum(self, axis=None, keepdims=False) -> "Array":
        from amlx._mlx import ops
        return ops.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False) -> "Array":
        from amlx._mlx import ops
        return ops.mean(self, axis, keepdims)

    def max(self, axis=None, keepdims=False) -> "Array":
        from amlx._mlx import ops
        return ops.max(self, axis, keepdims)

    def min(self, axis=None, keepdims=False) -> "Array":
        from amlx._mlx import ops
        return ops.min(self, axis, keepdims)

    def __getitem__(self, index) -> "Array":
        from amlx._mlx import indexing
        return indexing.getitem(self, index)

    # Arrays compare elementwise, so they hash by identity.
    __hash__ = object.__hash__


_OPERANDS = (numbers.Number, np.ndarray, np.generic, list, tuple)


def binary_op(code: int, name: str, reflected: bool = False, method: bool = False):
    """The function f(a, other) = op(a, other) (op(other, a) when `reflected`)
    for an Array `a`. `other` is an Array, a Python scalar (weakly typed: it
    takes a's dtype where it can) or numpy data / nested lists (strongly
    typed). As a `method`, other operand types give NotImplemented.

    This is the hottest path of the library, written for speed: Python floats
    and ints go to C as they are (no scalar array on this side), one C call
    per op, which returns the new handle (no out-parameter allocated per op:
    about 110 ns of the 1.5 us an op cost, benchmarks/ffi_overhead.py)."""

    def op(a, other):
        h = a._h
        if h is None:
            raise _closed()
        kind = type(other)
        if kind is float:
            out = _binary_float(code, h, other, reflected)
        elif kind is int:
            out = _binary_int(code, h, other, reflected)
        else:
            if not isinstance(other, Array):
                if method and not isinstance(other, _OPERANDS):
                    return NotImplemented
                other = scalar_like(other, a)
            o = other._h
            if o is None:
                raise _closed()
            out = _binary(code, o, h) if reflected else _binary(code, h, o)
        if not out:  # (NULL: the op failed)
            raise error(name)
        r = _alloc(Array)
        r._h = out
        return r

    op.__name__ = name
    return op


def _unary_method(op_code: int, name: str):
    unary = lib.mlxc_unary

    def method(self):
        return _call(unary, name, op_code, self.handle)

    method.__name__ = name
    return method


for _name, _code, _refl in [
    ("__add__", lib.MLXC_ADD, "__radd__"), ("__sub__", lib.MLXC_SUBTRACT, "__rsub__"),
    ("__mul__", lib.MLXC_MULTIPLY, "__rmul__"), ("__truediv__", lib.MLXC_DIVIDE, "__rtruediv__"),
    ("__floordiv__", lib.MLXC_FLOOR_DIVIDE, "__rfloordiv__"), ("__mod__", lib.MLXC_REMAINDER, "__rmod__"),
    ("__pow__", lib.MLXC_POWER, "__rpow__"), ("__matmul__", lib.MLXC_MATMUL, "__rmatmul__"),
    ("__and__", lib.MLXC_BITWISE_AND, "__rand__"), ("__or__", lib.MLXC_BITWISE_OR, "__ror__"),
    ("__xor__", lib.MLXC_BITWISE_XOR, "__rxor__"), ("__lshift__", lib.MLXC_LEFT_SHIFT, "__rlshift__"),
    ("__rshift__", lib.MLXC_RIGHT_SHIFT, "__rrshift__"),
]:
    setattr(Array, _name, binary_op(_code, _name.strip("_"), method=True))
    setattr(Array, _refl, binary_op(_code, _name.strip("_"), reflected=True, method=True))

for _name, _code in [
    ("__eq__", lib.MLXC_EQUAL), ("__ne__", lib.MLXC_NOT_EQUAL), ("__lt__", lib.MLXC_LESS),
    ("__le__", lib.MLXC_LESS_EQUAL), ("__gt__", lib.MLXC_GREATER), ("__ge__", lib.MLXC_GREATER_EQUAL),
]:
    setattr(Array, _name, binary_op(_code, _name.strip("_"), method=True))

Array.__neg__ = _unary_method(lib.MLXC_NEGATIVE, "negative")
Array.__abs__ = _unary_method(lib.MLXC_ABS, "abs")
Array.__invert__ = _unary_method(lib.MLXC_BITWISE_INVERT, "bitwise_invert")


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


def from_bits(raw: np.ndarray, dtype) -> Array:
    """An array from raw element bits (e.g. uint16 patterns for bfloat16)."""
    dt = _dt.as_dtype(dtype)
    raw = np.asarray(raw, order="C")
    if raw.dtype.itemsize != dt.size:
        raise TypeError(f"{raw.dtype} bits do not fit {dt.name}")
    shape = ffi.new("int[]", list(raw.shape) or [0])
    return _call(lib.mlxc_array_from_data, "array", ffi.from_buffer(raw), shape, raw.ndim, dt.code)
