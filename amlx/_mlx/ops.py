"""Array operations (thin wrappers over mlxc; MLX does the shape checking)."""

from __future__ import annotations

import builtins
import numbers
from typing import Iterable, Sequence

from amlx._mlx import dtypes as _dt
from amlx._mlx._lib import arraytype, check, error, ffi, lib
from amlx._mlx.array import Array, _address, _adopt_all, _call, _call_optional, array, binary_op, scalar_like

def _int_arr(values: Sequence[int]):
    values = [int(v) for v in values]
    return ffi.new("int[]", values or [0]), len(values)


def _as_array(x, like: Array | None = None) -> Array:
    if isinstance(x, Array):
        return x
    if like is not None and isinstance(x, numbers.Number):
        return scalar_like(x, like)
    return array(x)


def _pair(a, b):
    if isinstance(a, Array):
        return a, _as_array(b, a)
    if isinstance(b, Array):
        return _as_array(a, b), b
    return array(a), array(b)


# -- elementwise ---------------------------------------------------------

def _named(op, name: str, doc: str):
    """`op` under the name and docstring of the MLX op it stands for."""
    op.__name__ = name
    op.__doc__ = doc
    return op


# The elementwise ops and the most used shape ops are NativeOps of Array's C core
# (vendor/mlxc/arraytype.c): the common arguments (Arrays; Python floats and ints beside an
# Array; shapes as tuples or lists of ints) run in C, as the operators do, and anything else
# goes to the Python function each wraps (its `__wrapped__`), which converts it.

def _unary(code: int, name: str):
    unary = lib.mlxc_unary

    def op(a: Array) -> Array:
        a = _as_array(a)  # kept alive across the call: a temporary's handle is freed with it
        return _call(unary, name, code, a.handle)

    return arraytype.unary_function(code, name, _named(op, name, f"Elementwise {name}."))


def _binary(code: int, name: str):
    forward = binary_op(code, name)
    reflected = binary_op(code, name, reflected=True)

    def op(a, b) -> Array:
        if isinstance(a, Array):
            return forward(a, b)
        if isinstance(b, Array):
            return reflected(b, a)
        return forward(array(a), array(b))

    return arraytype.binary_function(code, name, _named(op, name, f"Elementwise {name} with broadcasting."))


def _shape_op(name: str, op):
    """op(a, ints) as a NativeOp over the mlxc function of the same name."""
    return arraytype.shape_function(_address(f"mlxc_{name}"), name, op)


abs = _unary(lib.MLXC_ABS, "abs")
negative = _unary(lib.MLXC_NEGATIVE, "negative")
sign = _unary(lib.MLXC_SIGN, "sign")
logical_not = _unary(lib.MLXC_LOGICAL_NOT, "logical_not")
reciprocal = _unary(lib.MLXC_RECIPROCAL, "reciprocal")
floor = _unary(lib.MLXC_FLOOR, "floor")
ceil = _unary(lib.MLXC_CEIL, "ceil")
round = _unary(lib.MLXC_ROUND, "round")
square = _unary(lib.MLXC_SQUARE, "square")
sqrt = _unary(lib.MLXC_SQRT, "sqrt")
rsqrt = _unary(lib.MLXC_RSQRT, "rsqrt")
exp = _unary(lib.MLXC_EXP, "exp")
expm1 = _unary(lib.MLXC_EXPM1, "expm1")
log = _unary(lib.MLXC_LOG, "log")
log1p = _unary(lib.MLXC_LOG1P, "log1p")
log2 = _unary(lib.MLXC_LOG2, "log2")
sin = _unary(lib.MLXC_SIN, "sin")
cos = _unary(lib.MLXC_COS, "cos")
tanh = _unary(lib.MLXC_TANH, "tanh")
sigmoid = _unary(lib.MLXC_SIGMOID, "sigmoid")
erf = _unary(lib.MLXC_ERF, "erf")
erfinv = _unary(lib.MLXC_ERFINV, "erfinv")
stop_gradient = _unary(lib.MLXC_STOP_GRADIENT, "stop_gradient")
copy = _unary(lib.MLXC_COPY, "copy")
contiguous = _unary(lib.MLXC_CONTIGUOUS, "contiguous")
bitwise_invert = _unary(lib.MLXC_BITWISE_INVERT, "bitwise_invert")
isnan = _unary(lib.MLXC_ISNAN, "isnan")
isinf = _unary(lib.MLXC_ISINF, "isinf")

add = _binary(lib.MLXC_ADD, "add")
subtract = _binary(lib.MLXC_SUBTRACT, "subtract")
multiply = _binary(lib.MLXC_MULTIPLY, "multiply")
divide = _binary(lib.MLXC_DIVIDE, "divide")
floor_divide = _binary(lib.MLXC_FLOOR_DIVIDE, "floor_divide")
remainder = _binary(lib.MLXC_REMAINDER, "remainder")
power = _binary(lib.MLXC_POWER, "power")
maximum = _binary(lib.MLXC_MAXIMUM, "maximum")
minimum = _binary(lib.MLXC_MINIMUM, "minimum")
equal = _binary(lib.MLXC_EQUAL, "equal")
not_equal = _binary(lib.MLXC_NOT_EQUAL, "not_equal")
greater = _binary(lib.MLXC_GREATER, "greater")
greater_equal = _binary(lib.MLXC_GREATER_EQUAL, "greater_equal")
less = _binary(lib.MLXC_LESS, "less")
less_equal = _binary(lib.MLXC_LESS_EQUAL, "less_equal")
logical_and = _binary(lib.MLXC_LOGICAL_AND, "logical_and")
logical_or = _binary(lib.MLXC_LOGICAL_OR, "logical_or")
arctan2 = _binary(lib.MLXC_ARCTAN2, "arctan2")
logaddexp = _binary(lib.MLXC_LOGADDEXP, "logaddexp")
bitwise_and = _binary(lib.MLXC_BITWISE_AND, "bitwise_and")
bitwise_or = _binary(lib.MLXC_BITWISE_OR, "bitwise_or")
bitwise_xor = _binary(lib.MLXC_BITWISE_XOR, "bitwise_xor")
left_shift = _binary(lib.MLXC_LEFT_SHIFT, "left_shift")
right_shift = _binary(lib.MLXC_RIGHT_SHIFT, "right_shift")


def addmm(c: Array, a: Array, b: Array, alpha: float = 1.0, beta: float = 1.0) -> Array:
    """beta * c + alpha * (a @ b)."""
    return _call(lib.mlxc_addmm, "addmm", c.handle, a.handle, b.handle, float(alpha), float(beta))


def _where(cond, x, y) -> Array:
    """x where cond, else y (broadcast together; Python scalars take the other's dtype)."""
    cond = _as_array(cond)
    x, y = _pair(x, y)
    return _call(lib.mlxc_where, "where", cond.handle, x.handle, y.handle)


where = arraytype.arrays_function(_address("mlxc_where"), "where", "where", _where)


def clip(a: Array, a_min=None, a_max=None) -> Array:
    lo = None if a_min is None else _as_array(a_min, a)  # kept alive across the call
    hi = None if a_max is None else _as_array(a_max, a)
    return _call(lib.mlxc_clip, "clip", a.handle, 0 if lo is None else lo.handle,
                 0 if hi is None else hi.handle)


def _astype(a: Array, dtype) -> Array:
    """`a` converted to `dtype` (a Dtype, its name or a numpy dtype)."""
    return _call(lib.mlxc_astype, "astype", a.handle, _dt.as_dtype(dtype).code)


def _view(a: Array, dtype) -> Array:
    """Reinterprets the bits of `a` as `dtype`."""
    return _call(lib.mlxc_view, "view", a.handle, _dt.as_dtype(dtype).code)


astype = arraytype.dtype_function(_address("mlxc_astype"), "astype", _astype, _dt.Dtype)
view = arraytype.dtype_function(_address("mlxc_view"), "view", _view, _dt.Dtype)


# -- reductions ----------------------------------------------------------

def _axes(axis):
    if axis is None:
        return ffi.NULL, -1
    if isinstance(axis, numbers.Integral):
        axis = (axis,)
    return _int_arr(axis)


def _reduce(code: int, name: str):
    def op(a: Array, axis=None, keepdims: bool = False) -> Array:
        axes, n = _axes(axis)
        return _call(lib.mlxc_reduce, name, code, a.handle, axes, n, int(keepdims))

    return arraytype.reduce_function(_address("mlxc_reduce"), code, name,
                                     _named(op, name, f"{name} over `axis` (an int, a sequence, or None for all)."))


sum = _reduce(lib.MLXC_SUM, "sum")
mean = _reduce(lib.MLXC_MEAN, "mean")
max = _reduce(lib.MLXC_MAX, "max")
min = _reduce(lib.MLXC_MIN, "min")
prod = _reduce(lib.MLXC_PROD, "prod")
all = _reduce(lib.MLXC_ALL, "all")
any = _reduce(lib.MLXC_ANY, "any")
logsumexp = _reduce(lib.MLXC_LOGSUMEXP, "logsumexp")
var = _reduce(lib.MLXC_VAR, "var")


def _softmax(a: Array, axis=-1, precise: bool = False) -> Array:
    """Softmax over `axis`; `precise` computes in float32 for half inputs."""
    axes, n = _axes(axis)
    code = lib.MLXC_SOFTMAX_PRECISE if precise else lib.MLXC_SOFTMAX
    return _call(lib.mlxc_reduce, "softmax", code, a.handle, axes, n, 0)


softmax = arraytype.softmax_function(_address("mlxc_reduce"), lib.MLXC_SOFTMAX, lib.MLXC_SOFTMAX_PRECISE, "softmax",
                                     _softmax)


def _flat_axis(a: Array, axis):
    """(array, axis) with axis=None meaning the flattened array."""
    if axis is None:
        return reshape(a, (-1,)), 0
    return a, int(axis)


def argmax(a: Array, axis=None, keepdims: bool = False) -> Array:
    a2, ax = _flat_axis(a, axis)
    return _call(lib.mlxc_axis, "argmax", lib.MLXC_ARGMAX, a2.handle, ax, int(keepdims), 0)


def argmin(a: Array, axis=None, keepdims: bool = False) -> Array:
    a2, ax = _flat_axis(a, axis)
    return _call(lib.mlxc_axis, "argmin", lib.MLXC_ARGMIN, a2.handle, ax, int(keepdims), 0)


def sort(a: Array, axis=-1) -> Array:
    a2, ax = _flat_axis(a, axis)
    return _call(lib.mlxc_axis, "sort", lib.MLXC_SORT, a2.handle, ax, 0, 0)


def argsort(a: Array, axis=-1) -> Array:
    a2, ax = _flat_axis(a, axis)
    return _call(lib.mlxc_axis, "argsort", lib.MLXC_ARGSORT, a2.handle, ax, 0, 0)


def _cumulative(code: int, name: str):
    def op(a: Array, axis=None, reverse: bool = False, inclusive: bool = True) -> Array:
        a2, ax = _flat_axis(a, axis)
        return _call(lib.mlxc_axis, name, code, a2.handle, ax, int(reverse), int(inclusive))

    op.__name__ = name
    return op


cumsum = _cumulative(lib.MLXC_CUMSUM, "cumsum")
cumprod = _cumulative(lib.MLXC_CUMPROD, "cumprod")
cummax = _cumulative(lib.MLXC_CUMMAX, "cummax")
cummin = _cumulative(lib.MLXC_CUMMIN, "cummin")
logcumsumexp = _cumulative(lib.MLXC_LOGCUMSUMEXP, "logcumsumexp")


def topk(a: Array, k: int, axis: int = -1) -> Array:
    """The k largest values along `axis` (in no particular order)."""
    return _call(lib.mlxc_topk, "topk", a.handle, int(k), int(axis))


def argpartition(a: Array, kth: int, axis: int = -1) -> Array:
    return _call(lib.mlxc_argpartition, "argpartition", a.handle, int(kth), int(axis))


def tril(a: Array, k: int = 0) -> Array:
    return _call(lib.mlxc_tri, "tril", a.handle, int(k), 0)


def triu(a: Array, k: int = 0) -> Array:
    return _call(lib.mlxc_tri, "triu", a.handle, int(k), 1)


# -- shapes --------------------------------------------------------------

def _reshape(a: Array, shape: Sequence[int]) -> Array:
    """`a` with a new shape (one dimension may be -1)."""
    s, n = _int_arr(shape)
    return _call(lib.mlxc_reshape, "reshape", a.handle, s, n)


reshape = _shape_op("reshape", _reshape)


def _transpose(a: Array, axes: Sequence[int] | None = None) -> Array:
    """`a` with its axes permuted (reversed where `axes` is None)."""
    if axes is None:
        return _call(lib.mlxc_transpose, "transpose", a.handle, ffi.NULL, -1)
    s, n = _int_arr(axes)
    return _call(lib.mlxc_transpose, "transpose", a.handle, s, n)


transpose = arraytype.axes_function(_address("mlxc_transpose"), "transpose", _transpose)


def swapaxes(a: Array, axis1: int, axis2: int) -> Array:
    return _call(lib.mlxc_swapaxes, "swapaxes", a.handle, int(axis1), int(axis2))


def expand_dims(a: Array, axis) -> Array:
    s, n = _int_arr((axis,) if isinstance(axis, numbers.Integral) else axis)
    return _call(lib.mlxc_expand_dims, "expand_dims", a.handle, s, n)


def squeeze(a: Array, axis=None) -> Array:
    if axis is None:
        return _call(lib.mlxc_squeeze, "squeeze", a.handle, ffi.NULL, -1)
    s, n = _int_arr((axis,) if isinstance(axis, numbers.Integral) else axis)
    return _call(lib.mlxc_squeeze, "squeeze", a.handle, s, n)


def _broadcast_to(a, shape: Sequence[int]) -> Array:
    """`a` broadcast to `shape`."""
    s, n = _int_arr(shape)
    a = _as_array(a)
    return _call(lib.mlxc_broadcast_to, "broadcast_to", a.handle, s, n)


broadcast_to = _shape_op("broadcast_to", _broadcast_to)


def flatten(a: Array) -> Array:
    return reshape(a, (-1,))


def _handle_array(arrays: Sequence[Array]):
    """An `mlxc_array[]` of the arrays' handles, for one C call over all of them (the
    arrays must stay alive across the call: a handle does not hold its array)."""
    return ffi.new("mlxc_array[]", [a.handle for a in arrays])


class _Vec:
    """A temporary mlxc_vec, freed on exit."""

    def __init__(self, arrays: Iterable[Array] = ()):
        out = ffi.new("mlxc_vec*")
        check(lib.mlxc_vec_new(out), "vec")
        self.h = out[0]
        held = list(arrays)  # (alive across the call: their handles do not hold them)
        if held:
            if lib.mlxc_vec_push_many(self.h, _handle_array(held), len(held)):
                lib.mlxc_vec_free(self.h)
                raise error("vec")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        lib.mlxc_vec_free(self.h)
        self.h = None

    def arrays(self) -> list[Array]:
        n = lib.mlxc_vec_size(self.h)
        handles = ffi.new("mlxc_array[]", n)
        check(lib.mlxc_vec_take(self.h, handles, n), "vec")
        return _adopt_all(handles, n)


def _concatenate(arrays: Sequence[Array], axis: int = 0) -> Array:
    """The arrays joined along an existing axis."""
    with _Vec(_as_array(a) for a in arrays) as v:
        return _call(lib.mlxc_concatenate, "concatenate", v.h, int(axis))


def _stack(arrays: Sequence[Array], axis: int = 0) -> Array:
    """The arrays joined along a new axis."""
    with _Vec(_as_array(a) for a in arrays) as v:
        return _call(lib.mlxc_stack, "stack", v.h, int(axis))


def _list_op(name: str, op):
    """op(arrays, axis) as a NativeOp over the mlxc function of the same name."""
    return arraytype.list_function(*(_address(f) for f in (f"mlxc_{name}", "mlxc_vec_new", "mlxc_vec_push_many",
                                                           "mlxc_vec_free")), name, op)


concatenate = _list_op("concatenate", _concatenate)
stack = _list_op("stack", _stack)


def split(a: Array, indices_or_sections, axis: int = 0) -> list[Array]:
    """Splits into equal sections (an int) or at the given indices."""
    with _Vec() as v:
        if isinstance(indices_or_sections, numbers.Integral):
            if indices_or_sections <= 0:
                raise ValueError("split: the number of sections must be positive")
            check(lib.mlxc_split(a.handle, ffi.NULL, 0, int(indices_or_sections), int(axis), v.h), "split")
        else:
            s, n = _int_arr(indices_or_sections)
            check(lib.mlxc_split(a.handle, s, n, 0, int(axis), v.h), "split")
        return v.arrays()


# -- slicing -------------------------------------------------------------

def slice(a: Array, start: Sequence[int], stop: Sequence[int], strides: Sequence[int] | None = None) -> Array:
    """a[start:stop:strides] over every axis (static bounds)."""
    nd = len(start)
    st, _ = _int_arr(start)
    sp, _ = _int_arr(stop)
    sd, _ = _int_arr(strides if strides is not None else [1] * nd)
    return _call(lib.mlxc_slice, "slice", a.handle, st, sp, sd, nd)


def slice_dynamic(a: Array, start: Array, axes: Sequence[int], sizes: Sequence[int]) -> Array:
    """A slice whose start offsets along `axes` are an array (no recompile per offset).

    Offsets outside [0, dim - size] are clamped into that range (as in XLA)."""
    ax, na = _int_arr(axes)
    sz, ns = _int_arr(sizes)
    return _call(lib.mlxc_slice_dynamic, "slice_dynamic", a.handle, start.handle, ax, na, sz, ns)


def slice_update(a: Array, update: Array, start: Sequence[int], stop: Sequence[int],
                 strides: Sequence[int] | None = None) -> Array:
    """A copy of `a` with a[start:stop:strides] replaced by `update`."""
    nd = len(start)
    st, _ = _int_arr(start)
    sp, _ = _int_arr(stop)
    sd, _ = _int_arr(strides if strides is not None else [1] * nd)
    update = _as_array(update, a)
    return _call(lib.mlxc_slice_update, "slice_update", a.handle, update.handle, st, sp, sd, nd)


def slice_update_dynamic(a: Array, update: Array, start: Array, axes: Sequence[int]) -> Array:
    """slice_update with array start offsets along `axes` (clamped into range like slice_dynamic)."""
    ax, na = _int_arr(axes)
    return _call(lib.mlxc_slice_update_dynamic, "slice_update_dynamic", a.handle, update.handle, start.handle,
                 ax, na)


def _take(a: Array, indices, axis: int | None = None) -> Array:
    """a's entries at `indices` along `axis` (of the flattened array where None)."""
    idx = _as_array(indices)
    if axis is None:
        return _call(lib.mlxc_take, "take", a.handle, idx.handle, 0, 1)
    return _call(lib.mlxc_take, "take", a.handle, idx.handle, int(axis), 0)


take = arraytype.arrays_function(_address("mlxc_take"), "take", "take", _take)


def take_along_axis(a: Array, indices: Array, axis: int) -> Array:
    indices = _as_array(indices)
    return _call(lib.mlxc_take_along_axis, "take_along_axis", a.handle, indices.handle, int(axis))


def put_along_axis(a: Array, indices: Array, values, axis: int) -> Array:
    indices, values = _as_array(indices), _as_array(values, a)
    return _call(lib.mlxc_put_along_axis, "put_along_axis", a.handle, indices.handle, values.handle, int(axis))


def buffer_view(a: Array) -> Array | None:
    """A leaf array on `a`'s buffer that does not hold it (vendor/mlxc/buffer_view.cpp),
    or None unless `a` is a whole, evaluated (or launched), row-contiguous buffer.
    What is read through it does not keep MLX from writing `a` in place. Only for
    readers on `a`'s stream launched after `a`, while `a`'s buffer lives: the view
    carries no dependency on `a`."""
    return _call_optional(lib.mlxc_buffer_view, "buffer_view", a.handle)


def buffer_views(arrays: Sequence[Array]) -> list[Array] | None:
    """`buffer_view` of each of `arrays` in one call, or None where one of them has none."""
    held = list(arrays)
    if not held:
        return []
    out = ffi.new("mlxc_array[]", len(held))
    check(lib.mlxc_buffer_views(_handle_array(held), len(held), out), "buffer_view")
    return None if not out[0] else _adopt_all(out, len(held))


# -- creation ------------------------------------------------------------

def full(shape: Sequence[int], value, dtype=None) -> Array:
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    v = _as_array(value)
    dt = v.dtype if dtype is None else _dt.as_dtype(dtype)
    s, n = _int_arr(shape)
    return _call(lib.mlxc_full, "full", s, n, v.handle, dt.code)


def zeros(shape, dtype=_dt.float32) -> Array:
    return full(shape, array(0, dtype), dtype)


def ones(shape, dtype=_dt.float32) -> Array:
    return full(shape, array(1, dtype), dtype)


def zeros_like(a: Array) -> Array:
    return zeros(a.shape, a.dtype)


def ones_like(a: Array) -> Array:
    return ones(a.shape, a.dtype)


def arange(start, stop=None, step=1, dtype=None) -> Array:
    if stop is None:
        start, stop = 0, start
    if dtype is None:
        dtype = _dt.int32 if builtins.all(isinstance(v, numbers.Integral) for v in (start, stop, step)) \
            else _dt.float32
    return _call(lib.mlxc_arange, "arange", float(start), float(stop), float(step), _dt.as_dtype(dtype).code)


# -- quantization ----------------------------------------------------------

def quantize(w: Array, group_size: int = 64, bits: int = 4) -> tuple[Array, Array, Array]:
    """Affine quantization along the last axis: (packed uint32 weight, scales, biases)."""
    with _Vec() as v:
        check(lib.mlxc_quantize(w.handle, int(group_size), int(bits), v.h), "quantize")
        wq, scales, biases = v.arrays()
        return wq, scales, biases


def dequantize(wq: Array, scales: Array, biases: Array, group_size: int = 64, bits: int = 4,
               dtype=None) -> Array:
    code = -1 if dtype is None else _dt.as_dtype(dtype).code
    return _call(lib.mlxc_dequantize, "dequantize", wq.handle, scales.handle, biases.handle, int(group_size),
                 int(bits), code)


def quantized_matmul(x: Array, wq: Array, scales: Array, biases: Array, transpose: bool = True,
                     group_size: int = 64, bits: int = 4) -> Array:
    return _call(lib.mlxc_quantized_matmul, "quantized_matmul", x.handle, wq.handle, scales.handle,
                 biases.handle, int(transpose), int(group_size), int(bits))


def matmul(a, b) -> Array:
    """a @ b."""
    return _plain_matmul(a, b)


_plain_matmul = _binary(lib.MLXC_MATMUL, "matmul")


# -- evaluation ------------------------------------------------------------

def _handles(arrays):
    flat = []
    for a in arrays:
        if isinstance(a, Array):
            flat.append(a.handle)
        elif isinstance(a, (list, tuple)):
            flat.extend(_handles(a))
        elif isinstance(a, dict):
            flat.extend(_handles(list(a.values())))
        elif a is not None:
            raise TypeError(f"eval takes arrays (or lists/dicts of them), not {type(a).__name__}")
    return flat


def eval(*arrays) -> None:
    """Computes the given arrays (lists, tuples and dicts of arrays too)."""
    hs = _handles(arrays)
    check(lib.mlxc_eval(ffi.new("mlxc_array[]", hs), len(hs)), "eval")


def async_eval(*arrays) -> None:
    """Schedules the computation of the given arrays and returns at once."""
    hs = _handles(arrays)
    check(lib.mlxc_async_eval(ffi.new("mlxc_array[]", hs), len(hs)), "async_eval")


def graph_summary(*arrays) -> tuple[int, dict[str, int]]:
    """The not yet computed graph behind `arrays`: (number of nodes, nodes per
    primitive name). A diagnostic for profiling what a step asks MLX to do."""
    hs = _handles(arrays)
    buf = ffi.new("char[]", 1 << 16)
    n = ffi.new("size_t*")
    check(lib.mlxc_graph_summary(ffi.new("mlxc_array[]", hs), len(hs), buf, 1 << 16, n), "graph_summary")
    lines = ffi.string(buf).decode().splitlines()
    return n[0], {name: int(c) for name, c in (ln.rsplit(" ", 1) for ln in lines)}


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "builtins", "numbers",
                                                                      "Iterable", "Sequence", "arraytype")]
