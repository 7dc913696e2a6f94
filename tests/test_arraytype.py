"""Array's C core (vendor/mlxc/arraytype.c, amlx._arraytype).

The core owns the handle, frees it when the object dies, and runs the operators of
the common operand types (Array, exactly float, exactly int) in C; every other
operand type goes back to Python (`array._operator_other`). These tests pin what
the move to C must not change: every operator against numpy for every operand
kind, Python's fallbacks (NotImplemented, identity `==`), the errors, and that a
dropped array gives its memory back with no `close()`.
"""

from __future__ import annotations

import copy
import gc
import importlib
import operator
import threading
import weakref

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import amlx
from amlx import _mlx as mx
from amlx._mlx import memory

array_module = importlib.import_module("amlx._mlx.array")  # (amlx._mlx.array is also a function)

FLOAT_OPS = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow,
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
    "ge": operator.ge,
}
INT_OPS = {"and": operator.and_, "or": operator.or_, "xor": operator.xor, "lshift": operator.lshift,
           "rshift": operator.rshift}

# Operand kinds: how each is made from a numpy value, and whether it is weakly typed
# (takes the array's dtype, as MLX's own bindings do) or strongly typed.
OPERANDS = {
    "array": lambda v: mx.array(v),
    "float": lambda v: float(v.flat[0]),
    "int": lambda v: int(v.flat[0]),
    "numpy": lambda v: v,
    "np_scalar": lambda v: v.dtype.type(v.flat[0]),
    "list": lambda v: v.tolist(),
}


def _reference(op, x: np.ndarray, other, kind: str, reflected: bool) -> np.ndarray:
    if kind in ("float", "int"):  # weak: the scalar takes x's dtype
        other = np.asarray(other, dtype=x.dtype)
    else:
        other = np.asarray(other)
    return op(other, x) if reflected else op(x, other)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(FLOAT_OPS)), kind=st.sampled_from(sorted(OPERANDS)),
       reflected=st.booleans(), seed=st.integers(0, 2**16), shape=st.sampled_from([(), (3,), (2, 3)]))
def test_float_operators_match_numpy_for_every_operand_kind(name, kind, reflected, seed, shape):
    # (numpy data on the left runs numpy's operator, which reads the Array through __array__)
    assume(not (reflected and kind in ("numpy", "np_scalar")))
    r = np.random.default_rng(seed)
    x_np = r.uniform(0.5, 3.0, (2, 3)).astype(np.float32)
    v = r.uniform(0.5, 3.0, shape).astype(np.float32)
    if kind == "int":
        v = np.asarray(r.integers(1, 4, shape), np.int64)
    if kind in ("float", "int", "np_scalar"):
        v = v.reshape(-1)[:1].reshape(())
    other = OPERANDS[kind](v)
    op = FLOAT_OPS[name]
    x = mx.array(x_np)
    got = op(other, x) if reflected else op(x, other)
    assert type(got) is mx.Array
    want = _reference(op, x_np, other, kind, reflected)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-6)
    assert got.dtype.np == want.dtype or want.dtype == np.float64  # (numpy float64 data stays float32 in MLX)


@pytest.mark.parametrize("name", sorted(INT_OPS))
@pytest.mark.parametrize("kind,reflected", [("array", False), ("array", True), ("int", False), ("int", True),
                                            ("numpy", False), ("list", False), ("list", True)])
def test_integer_operators(name, kind, reflected):  # (numpy on the left runs numpy's own operator)
    x_np = np.array([[1, 2, 7], [12, 5, 3]], np.int32)
    v = np.array([1, 2, 3], np.int32) if kind != "int" else np.array(2, np.int32)
    other = OPERANDS[kind](v) if kind != "int" else 2
    op = INT_OPS[name]
    x = mx.array(x_np)
    got = op(other, x) if reflected else op(x, other)
    ref = np.asarray(other, np.int32) if kind == "int" else np.asarray(other)  # (a list of ints: int64)
    want = op(ref, x_np) if reflected else op(x_np, ref)
    assert got.tolist() == want.tolist()
    assert got.dtype.np == want.dtype


def test_unary_operators_and_matmul():
    x_np = np.array([[1.5, -2.0], [0.25, -4.0]], np.float32)
    x = mx.array(x_np)
    assert (-x).tolist() == (-x_np).tolist()
    assert abs(x).tolist() == np.abs(x_np).tolist()
    assert (~mx.array(np.array([0, 5], np.int32))).tolist() == [-1, -6]
    np.testing.assert_allclose((x @ x).numpy(), x_np @ x_np, rtol=1e-6)
    np.testing.assert_allclose((x_np.tolist() @ x).numpy(), x_np @ x_np, rtol=1e-6)  # reflected, a list


def test_bool_and_float_subclasses_are_not_the_weak_scalars():
    # bool goes the Python way (a bool array), as do numpy scalars (strongly typed)
    b = mx.array(np.array([True, False]))
    assert (b & True).dtype is mx.bool_
    bf = mx.array(np.ones(2, np.float32), mx.bfloat16)
    assert (bf * 0.5).dtype is mx.bfloat16  # a Python float is weak
    assert (bf * np.float64(0.5)).dtype is mx.float32  # numpy's float64 (a float subclass) is not


def test_other_operand_types_fall_back_to_python():
    x = mx.array(np.arange(3, dtype=np.float32))
    assert (x == None) is False  # noqa: E711  (NotImplemented both ways: identity)
    assert (x != "abc") is True
    assert x.__add__("abc") is NotImplemented
    with pytest.raises(TypeError):
        x + "abc"
    with pytest.raises(TypeError):
        object() * x
    with pytest.raises(TypeError):
        pow(x, 2, 3)
    with pytest.raises(OverflowError):
        x + 2**70


def test_failed_operators_raise_mlx_errors_naming_the_op():
    a = mx.array(np.ones((2, 3), np.float32))
    b = mx.array(np.ones((4,), np.float32))
    for op, name in [(operator.add, "add"), (operator.mul, "mul"), (operator.matmul, "matmul"),
                     (operator.lt, "lt")]:
        with pytest.raises(amlx.MLXError, match=name):
            op(a, b)
    with pytest.raises(amlx.MLXError, match="add"):
        a + np.ones(4, np.float32)  # through the Python fallback
    with pytest.raises(amlx.MLXError, match="bitwise_invert"):
        ~a  # (not defined for floats)
    assert (a + 1.0).tolist() == [[2.0] * 3] * 2  # and everything still works


def test_identity_hash_weakref_copy():
    x = mx.array(np.arange(4, dtype=np.float32))
    assert hash(x) == object.__hash__(x)
    assert {x: 1}[x] == 1
    ref = weakref.ref(x)
    assert ref() is x
    y = copy.copy(x)
    assert y.handle != x.handle and y.tolist() == x.tolist()
    z = mx.Array(x)  # shares the MLX array, owns its own handle
    x.close()
    assert z.tolist() == [0.0, 1.0, 2.0, 3.0] and y.tolist() == z.tolist()
    del x
    gc.collect()
    assert ref() is None


def test_handles_are_ints_owned_once():
    x = mx.array(np.ones(2, np.float32))
    h = x.handle
    assert isinstance(h, int) and h == x._h and h != 0
    x.close()
    assert x._h == 0
    with pytest.raises(ValueError, match="closed"):
        x.handle
    with pytest.raises(ValueError, match="null handle"):
        array_module._adopt(0)
    with pytest.raises(RuntimeError, match="installed already"):
        array_module.arraytype.install(1, 1, 1, 1, 1, mx.Array, None, None)


def _active() -> int:
    mx.eval([])
    return memory.active()


def test_dropped_arrays_give_their_memory_back():
    start = _active()
    x = mx.array(np.ones((256, 256), np.float32))
    for _ in range(20):  # evaluated operator results, never closed: freed when dropped
        y = x * 2.0 + x
        mx.eval(y)
        z = -y
        mx.eval(z)
    assert _active() > start
    del x, y, z
    assert _active() == start


def test_arrays_dropped_on_another_thread_are_freed():
    start = _active()
    arrays = [mx.array(np.ones((64, 64), np.float32)) + 1.0 for _ in range(8)]
    mx.eval(arrays)
    assert _active() > start

    def drop():
        arrays.clear()

    t = threading.Thread(target=drop)
    t.start()
    t.join()
    assert _active() == start


# -- ops as functions: NativeOps run the common case in C, anything else in their Python function

from amlx._mlx import ops as O  # noqa: E402

ARG_KINDS = {
    "array": lambda v: mx.array(v),
    "float": lambda v: float(v.flat[0]),
    "int": lambda v: int(round(float(v.flat[0]))),
    "numpy": lambda v: v,
    "list": lambda v: v.tolist(),
    "bool": lambda v: bool(v.flat[0] > 1),
}


def _same(got, want):
    assert type(got) is mx.Array and type(want) is mx.Array
    assert got.dtype is want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def _outcome(fn, *args):
    """fn(*args), or the exception it raised."""
    try:
        return fn(*args)
    except Exception as exc:
        return exc


def _same_outcome(fast, python, *args):
    """The C way and the Python way give the same array, or the same exception type and text."""
    got, want = _outcome(fast, *args), _outcome(python, *args)
    if isinstance(want, Exception):
        assert type(got) is type(want) and str(got) == str(want)
    else:
        _same(got, want)
    return got, want


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(["add", "subtract", "multiply", "divide", "maximum", "minimum", "power", "arctan2",
                             "logaddexp", "equal", "less"]),
       ka=st.sampled_from(sorted(ARG_KINDS)), kb=st.sampled_from(sorted(ARG_KINDS)), seed=st.integers(0, 2**16))
def test_binary_functions_equal_their_python_function(name, ka, kb, seed):
    r = np.random.default_rng(seed)
    va, vb = (r.uniform(0.5, 2.0, (2, 3)).astype(np.float32) for _ in range(2))
    a, b = ARG_KINDS[ka](va), ARG_KINDS[kb](vb)
    op = getattr(O, name)
    _same(op(a, b), op.__wrapped__(a, b))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["exp", "log", "sqrt", "negative", "abs", "tanh", "sigmoid", "floor", "square"]),
       kind=st.sampled_from(["array", "numpy", "list", "float"]), seed=st.integers(0, 2**16))
def test_unary_functions_equal_their_python_function(name, kind, seed):
    v = np.random.default_rng(seed).uniform(0.5, 2.0, (3, 2)).astype(np.float32)
    a = ARG_KINDS[kind](v)
    op = getattr(O, name)
    _same(op(a), op.__wrapped__(a))


@pytest.mark.parametrize("shape", [(6,), [3, 2], (1, 6, 1), (-1,), (2, -1), (np.int64(3), 2), np.array([2, 3]),
                                   (2.0, 3), (7,), (2**40,), (1,) * 33, ()])
def test_shape_functions_equal_their_python_function(shape):
    x = mx.array(np.arange(6, dtype=np.float32))

    _same_outcome(O.reshape, O.reshape.__wrapped__, x, shape)
    b = mx.array(np.arange(3, dtype=np.float32))
    _same(O.broadcast_to(b, (2, 3)), O.broadcast_to.__wrapped__(b, (2, 3)))
    _same(O.broadcast_to(1.5, [2, 2]), O.broadcast_to.__wrapped__(1.5, [2, 2]))


def test_native_ops_look_like_their_functions_and_fail_alike():
    assert O.exp.__name__ == "exp" and O.exp.__doc__ == O.exp.__wrapped__.__doc__
    assert repr(O.reshape) == "<amlx op reshape>"
    x = mx.array(np.ones((2, 3), np.float32))
    _same(O.reshape(x, shape=(3, 2)), O.reshape.__wrapped__(x, (3, 2)))  # keywords go the Python way
    with pytest.raises(amlx.MLXError, match="reshape"):
        O.reshape(x, (4,))
    with pytest.raises(amlx.MLXError, match="add"):
        O.add(x, mx.array(np.ones(4, np.float32)))
    with pytest.raises(TypeError):
        O.exp()
    x.close()
    for use in (lambda: O.exp(x), lambda: O.add(x, 1.0), lambda: O.add(2, x), lambda: O.reshape(x, (6,))):
        with pytest.raises(ValueError, match="closed"):
            use()


@pytest.mark.parametrize("args", [(2, 3), ((2, 3),), ([3, 2],), (-1,), (6,), (np.int64(2), 3), ((np.int32(3), 2),),
                                  (2, 4), (), (2**40,), (2.0, 3), tuple([1] * 33)])
def test_the_reshape_method_equals_its_python_way(args):
    x = mx.array(np.arange(6, dtype=np.float32))

    _same_outcome(lambda a, *s: a.reshape(*s), array_module._reshape_method, x, *args)


def test_initialising_an_array_again_releases_its_handle():
    start = _active()
    x = mx.array(np.ones((128, 128), np.float32))
    y = x + 1.0
    mx.eval(y)
    y.__init__(np.zeros(3, np.float32))  # (y's old value had only this handle)
    assert y.tolist() == [0.0, 0.0, 0.0]
    del x
    assert _active() < start + 128 * 128 * 4  # both 64 KiB buffers gone: y's old one too


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["sum", "mean", "max", "min", "prod", "all", "any", "logsumexp", "var"]),
       axis=st.sampled_from([None, 0, 1, -1, (0,), (0, 1), [1], (), np.int64(1), 5, "x"]),
       keepdims=st.sampled_from([None, False, True, 1]), seed=st.integers(0, 2**16))
def test_reductions_equal_their_python_function(name, axis, keepdims, seed):
    x = mx.array(np.random.default_rng(seed).uniform(0.5, 2.0, (3, 4)).astype(np.float32))
    op = getattr(O, name)
    args = (x, axis) if keepdims is None else (x, axis, keepdims)

    _same_outcome(op, op.__wrapped__, *args)
    _same(op(x, axis=1, keepdims=True), op.__wrapped__(x, 1, True))  # (keywords: the Python way)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.int32, "float16", np.float16, np.dtype("int32")])
def test_dtype_functions_equal_their_python_function(dtype):
    x = mx.array(np.array([[1.5, -2.25], [3.0, 4.75]], np.float32))
    _same(O.astype(x, dtype), O.astype.__wrapped__(x, dtype))
    _same(x.astype(dtype), O.astype.__wrapped__(x, dtype))
    y = mx.array(np.array([1.0, 2.0], np.float32))
    _same(O.view(y, mx.int32), O.view.__wrapped__(y, mx.int32))
    with pytest.raises(TypeError, match="unknown dtype"):
        O.astype(x, "float128")
    x.close()
    with pytest.raises(ValueError, match="closed"):
        O.astype(x, mx.float16)


indexing = importlib.import_module("amlx._mlx.indexing")


@st.composite
def basic_index(draw, ndim: int):
    def item():
        if draw(st.integers(0, 9)) == 0:  # (now and then an index the C core leaves to Python)
            return draw(st.sampled_from([True, np.int64(1), slice(None, None, -1)]))
        return draw(st.one_of(
            st.integers(-5, 4),
            st.builds(slice, st.none() | st.integers(-5, 5), st.none() | st.integers(-5, 5),
                      st.none() | st.sampled_from([1, 2, 3, -1])),
            st.just(None), st.just(Ellipsis)))
    items = [item() for _ in range(draw(st.integers(0, ndim + 2)))]
    return items[0] if len(items) == 1 and draw(st.booleans()) else tuple(items)


@settings(max_examples=300, deadline=None)
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple), data=st.data())
def test_indexing_equals_the_python_way(shape, data):
    x = mx.array(np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape))
    index = data.draw(basic_index(len(shape)))

    got, want = _same_outcome(lambda a, i: a[i], indexing.getitem, x, index)
    assert (got is x) == (want is x)  # a[:] and a[...] are the array itself, either way


@pytest.mark.parametrize("index", [0, -1, -3, 2, slice(1, None), slice(None, -1), slice(None, None, 2),
                                   (slice(None), -1), (Ellipsis, None), (None, Ellipsis, 0), (1, slice(None, None, 2)),
                                   (-1, -1), (slice(1, 3), None, 0), (Ellipsis, -2), ()])
def test_common_indices_equal_the_python_way(index):
    x = mx.array(np.arange(12, dtype=np.float32).reshape(3, 4))
    _same_outcome(lambda a, i: a[i], indexing.getitem, x, index)
    _same(x[index], mx.array(x.numpy()[index]))  # and numpy's


def test_indexing_a_closed_array_fails_clearly():
    x = mx.array(np.ones((2, 3), np.float32))
    assert x[...] is x and x[:] is x
    x.close()
    with pytest.raises(ValueError, match="closed"):
        x[0]


@pytest.mark.parametrize("args", [(), (None,), ((1, 0, 2),), ([2, 0, 1],), ((0, 1),), ((0, 0, 1),), ((np.int64(2), 1, 0),),
                                  ((5, 0, 1),), ("ab",)])
def test_transpose_equals_its_python_function(args):
    x = mx.array(np.arange(24, dtype=np.float32).reshape(2, 3, 4))

    _same_outcome(O.transpose, O.transpose.__wrapped__, x, *args)
    _same(x.T, O.transpose.__wrapped__(x))


@settings(max_examples=60, deadline=None)
@given(axis=st.sampled_from([-1, 0, 1, None, (0, 1), [1], (), 3, np.int64(0), "x"]),
       precise=st.sampled_from([None, False, True, 1]), dtype=st.sampled_from([mx.float32, mx.bfloat16]),
       seed=st.integers(0, 2**16))
def test_softmax_equals_its_python_function(axis, precise, dtype, seed):
    x = mx.array(np.random.default_rng(seed).normal(0, 2, (3, 5)).astype(np.float32), dtype)
    args = (x, axis) if precise is None else (x, axis, precise)

    _same_outcome(O.softmax, O.softmax.__wrapped__, *args)
    _same(O.softmax(x), O.softmax.__wrapped__(x))


@settings(max_examples=60, deadline=None)
@given(kc=st.sampled_from(["array", "numpy", "bool"]), kx=st.sampled_from(sorted(ARG_KINDS)),
       ky=st.sampled_from(sorted(ARG_KINDS)), seed=st.integers(0, 2**16))
def test_where_equals_its_python_function(kc, kx, ky, seed):
    r = np.random.default_rng(seed)
    c = r.random((2, 3)) < 0.5
    cond = mx.array(c) if kc == "array" else (c if kc == "numpy" else bool(c[0, 0]))
    x, y = (ARG_KINDS[k](r.uniform(0.5, 2.0, (2, 3)).astype(np.float32)) for k in (kx, ky))
    _same(O.where(cond, x, y), O.where.__wrapped__(cond, x, y))


@pytest.mark.parametrize("axis", [None, 0, 1, -1, 2, np.int64(1), "x"])
@pytest.mark.parametrize("kind", ["array", "list", "numpy"])
def test_take_equals_its_python_function(axis, kind):
    x = mx.array(np.arange(12, dtype=np.float32).reshape(3, 4))
    idx = {"array": mx.array(np.array([2, 0, 1], np.int32)), "list": [2, 0, 1], "numpy": np.array([2, 0])}[kind]

    _same_outcome(O.take, O.take.__wrapped__, x, idx, axis)
    _same(O.take(x, mx.array(np.array([3, 1], np.int32))), O.take.__wrapped__(x, [3, 1]))


def test_the_transpose_property():
    x = mx.array(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert x.T.tolist() == np.arange(6).reshape(2, 3).T.tolist()
    x.close()
    with pytest.raises(ValueError, match="closed"):
        x.T


@pytest.mark.parametrize("name", ["concatenate", "stack"])
@pytest.mark.parametrize("arrays,axis", [
    ("aa", 0), ("aa", 1), ("aaa", -1), ("a", 0), ("ab", 0), ("an", 0), ("al", 1), ("", 0), ("aa", 5),
    ("aa", np.int64(1)), ("aa", "x"), ("a" * 70, 0)])
def test_list_ops_equal_their_python_function(name, arrays, axis):
    r = np.random.default_rng(0)
    make = {"a": lambda: mx.array(r.uniform(size=(2, 3)).astype(np.float32)),
            "b": lambda: mx.array(r.uniform(size=(3, 3)).astype(np.float32)),
            "n": lambda: r.uniform(size=(2, 3)).astype(np.float32), "l": lambda: [[1.0, 2.0, 3.0]] * 2}
    items = [make[k]() for k in arrays]
    op = getattr(O, name)
    for seq in (items, tuple(items)):
        _same_outcome(op, op.__wrapped__, seq, axis)
    if items and all(isinstance(a, mx.Array) for a in items):
        items[-1].close()
        with pytest.raises(ValueError, match="closed"):
            op(items, 0)
