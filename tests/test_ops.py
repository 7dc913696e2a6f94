"""Every op of amlx._mlx.ops / amlx._mlx.fast / amlx._mlx.random against numpy.

The numpy reference is computed in float64 from exactly the values the MLX
array holds (inputs are rounded to the dtype first), so what the tolerances
allow for is MLX's own error: the rounding of its result to the dtype, its
libm, and its order of accumulation. They are in one table, TOL, below.
Shapes and broadcasting come from hypothesis; data from a seeded numpy
generator (hypothesis draws the seed), so every failure replays.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import amlx
from amlx import _mlx as mx
from amlx._mlx import fast
from amlx._mlx import ops as O
from amlx._mlx import random as R
from amlx._mlx.dtypes import bf16_bits_to_f32, f32_to_bf16_bits

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FLOATS = ["float32", "float16", "bfloat16"]
MDT = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# ---------------------------------------------------------------------------
# Tolerances: kind of computation -> dtype -> (rtol, atol).
# A result passes when |got - want| <= rtol * |want| + atol * scale, elementwise,
# where `scale` is 1 unless the test says otherwise (see the kinds).
#
# EPS is the spacing of the dtype at 1.0 (one ulp); rounding a result to the
# dtype costs at most half of it relatively, so rtol = 1 ulp leaves a factor 2.
EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
TOL = {
    # One op, the result rounded once. float32: MLX's libm and numpy's differ by
    # a few ulp (exp and sigmoid measured up to ~4.5 ulp) -> 16 ulp; atol 1e-6
    # because MLX's float32 erf has an *absolute* error of ~5e-7 (its relative
    # error near 0 is large: erf(2.5e-5) is off by ~2%). float16/bfloat16: MLX
    # computes in float32 and rounds once -> 1 ulp; float16's atol is one step
    # of its subnormal range (2**-24), where the spacing is absolute; bfloat16
    # has float32's exponent range, so no subnormals at these magnitudes.
    "elementwise": {"float32": (16 * EPS["float32"], 1e-6), "float16": (EPS["float16"], 2.0**-24),
                    "bfloat16": (EPS["bfloat16"], 0.0)},
    # Sums, means, variances, logsumexp, matmuls: MLX accumulates in float32 for
    # every float dtype (checked: sum of 4096 bfloat16 ones is 4096), then rounds
    # once. atol is per unit of `scale` = the sum of |terms| (the condition
    # scale of a sum): float32 accumulation error <= n * 2**-24 * scale, the
    # tests keep n <= ~200 -> 2e-5 (typical errors are ~sqrt(n) smaller). The
    # rtol is 2 ulp of the output: a mean is a rounded sum times a rounded 1/n.
    "reduce": {"float32": (4 * EPS["float32"], 2e-5), "float16": (2 * EPS["float16"], 2e-5),
               "bfloat16": (2 * EPS["bfloat16"], 2e-5)},
    # cumsum/cumprod/logcumsumexp scan *in the dtype* (checked: cumsum of 4096
    # bfloat16 ones sticks at 256), so every step rounds: atol per unit of
    # scale = n * running sum of |terms| is half an ulp per step.
    "scan": {"float32": (4 * EPS["float32"], EPS["float32"]), "float16": (EPS["float16"], EPS["float16"]),
             "bfloat16": (EPS["bfloat16"], EPS["bfloat16"])},
    # quantized_matmul: in half dtypes MLX's CPU kernel rounds partial sums to
    # the dtype (measured up to 1.1 ulp x sum|x||w|, the same numbers as MLX's
    # own bindings), so atol per unit of scale = sum|x||w| is 2 ulp there.
    "quantized_matmul": {"float32": (4 * EPS["float32"], 2e-5), "float16": (2 * EPS["float16"], 2 * EPS["float16"]),
                         "bfloat16": (2 * EPS["bfloat16"], 2 * EPS["bfloat16"])},
    # logaddexp / logsumexp are max + log(sum exp(x - max)) with both terms
    # rounded in the dtype: an error of an ulp of (|max| + 1 + log n), not of
    # the (possibly much smaller) result -> atol per unit of that scale.
    "two_term": {"float32": (16 * EPS["float32"], 4 * EPS["float32"]), "float16": (EPS["float16"], EPS["float16"]),
                 "bfloat16": (EPS["bfloat16"], EPS["bfloat16"])},
    # Fused kernels and composites (softmax, rms_norm, layer_norm, rope,
    # attention): float32 inside, a few roundings of intermediates in the
    # dtype; outputs are O(1) so the atol is absolute: 4 ulp of the dtype at 1
    # (scaled by max|v| for attention, whose output is a mix of v's rows).
    "fused": {"float32": (1e-5, 4e-6), "float16": (2 * EPS["float16"], 4 * EPS["float16"]),
              "bfloat16": (2 * EPS["bfloat16"], 4 * EPS["bfloat16"])},
}
# rope computes the angle position * scale * inv_freq in float32 for every
# dtype: a few float32 ulps of an angle of up to ~300 rad, which moves the
# output by |x| times that. Added to the "fused" bound: this many float32 ulps
# of the largest angle, times max|x|.
ROPE_ANGLE_ULPS = 16


def rounded(x, name: str) -> np.ndarray:
    """float64 copy of x rounded to what an MLX array of dtype `name` holds."""
    x = np.asarray(x, dtype=np.float32)
    if name == "bfloat16":
        x = bf16_bits_to_f32(f32_to_bf16_bits(x))
    elif name == "float16":
        x = x.astype(np.float16)
    return x.astype(np.float64)


def make(x, name: str):
    """(reference float64 data, MLX array) holding the same values."""
    q = rounded(x, name)
    return q, mx.array(q.astype(np.float32), MDT[name])


def check(got, want, name: str, kind: str = "elementwise", scale=1.0, dtype=None, extra=0.0) -> None:
    """got (an MLX array of dtype `name`, or `dtype`) is close to want (float64).

    `extra` is an absolute error a test derives itself (rope's angle error)."""
    dt = dtype if dtype is not None else MDT[name]
    assert got.dtype is dt, (got.dtype, dt)
    g = got.numpy().astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert g.shape == want.shape, (g.shape, want.shape)
    rtol, atol = TOL[kind][name]
    both_nan = np.isnan(g) & np.isnan(want)
    same_inf = np.isinf(want) & (g == want)
    with np.errstate(invalid="ignore"):  # inf - inf: judged by same_inf
        err = np.abs(g - want)
    bound = rtol * np.abs(want) + atol * np.asarray(scale, dtype=np.float64) + extra
    bad = ~(both_nan | same_inf | (err <= bound))
    if bad.any():
        i = np.argwhere(bad)[0]
        i = tuple(i) if g.ndim else ()
        raise AssertionError(f"{name}/{kind}: {int(bad.sum())} of {g.size} off; first at {i}: got {g[i]!r}, "
                             f"want {want[i]!r}, err {err[i]:.3g} > bound {np.broadcast_to(bound, g.shape)[i]:.3g}")


def exact(got, want, dtype=None) -> None:
    want = np.asarray(want)
    if dtype is not None:
        assert got.dtype is dtype, (got.dtype, dtype)
    g = got.numpy()
    assert g.shape == want.shape, (g.shape, want.shape)
    assert np.array_equal(g, want, equal_nan=g.dtype.kind == "f"), f"\ngot  {g}\nwant {want}"


shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=5)
nonempty_shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)
seeds = st.integers(0, 2**32 - 1)
pairs = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4)


def rng_of(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# coverage: every public op is exercised here

NOT_OPS = {"Array", "array", "check", "error", "ffi", "lib", "scalar_like", "binary_op"}
COVERED: set[str] = set()


def covers(*names):
    COVERED.update(names)
    return lambda f: f


# ---------------------------------------------------------------------------
# elementwise unary

def _torch(fn):
    return lambda x: fn(torch.from_numpy(np.asarray(x, np.float64))).numpy()


UNARY = {
    # name: (numpy reference, low, high)
    "abs": (np.abs, -4, 4), "negative": (np.negative, -4, 4), "sign": (np.sign, -4, 4),
    "reciprocal": (lambda x: 1 / x, 0.1, 5), "square": (np.square, -4, 4), "sqrt": (np.sqrt, 0, 9),
    "rsqrt": (lambda x: 1 / np.sqrt(x), 0.01, 9), "exp": (np.exp, -6, 6), "expm1": (np.expm1, -3, 3),
    "log": (np.log, 0.01, 50), "log1p": (np.log1p, -0.9, 5), "log2": (np.log2, 0.01, 50),
    "sin": (np.sin, -7, 7), "cos": (np.cos, -7, 7), "tanh": (np.tanh, -5, 5),
    "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), -10, 10), "erf": (_torch(torch.erf), -3, 3),
    "erfinv": (_torch(torch.special.erfinv), -0.99, 0.99),
    "floor": (np.floor, -9, 9), "ceil": (np.ceil, -9, 9), "round": (np.round, -9, 9),
    "stop_gradient": (lambda x: x, -3, 3), "copy": (lambda x: x, -3, 3), "contiguous": (lambda x: x, -3, 3),
}


@covers(*UNARY)
@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("op", list(UNARY))
@SETTINGS
@given(shape=shapes, seed=seeds)
def test_unary_float(op, name, shape, seed):
    ref, lo, hi = UNARY[op]
    x = rng_of(seed).uniform(lo, hi, shape)
    if op == "round":
        x = np.round(x * 2) / 2  # exact halves: round half to even, like numpy
    q, a = make(x, name)
    check(getattr(O, op)(a), ref(q), name)


@covers("isnan", "isinf", "logical_not")
@pytest.mark.parametrize("name", FLOATS)
def test_isnan_isinf(name):
    x = np.array([0.0, -0.0, 1.5, np.nan, np.inf, -np.inf, -2.0], np.float32)
    a = mx.array(x, MDT[name])
    exact(O.isnan(a), np.isnan(x), mx.bool_)
    exact(O.isinf(a), np.isinf(x), mx.bool_)
    exact(O.logical_not(O.isnan(a)), ~np.isnan(x), mx.bool_)
    exact(O.logical_not(a), x == 0, mx.bool_)  # numbers: "not" is "== 0"


@covers("bitwise_invert", "abs", "negative", "sign", "square")
@pytest.mark.parametrize("dt", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
@SETTINGS
@given(shape=shapes, seed=seeds)
def test_unary_int(dt, shape, seed):
    info = np.iinfo(dt)
    x = rng_of(seed).integers(info.min, info.max, shape, dtype=dt, endpoint=True)
    a = mx.array(x)
    mdt = a.dtype
    exact(O.bitwise_invert(a), ~x, mdt)
    exact(~a, ~x, mdt)
    with np.errstate(over="ignore"):
        exact(O.negative(a), (-x.astype(np.int64 if info.min < 0 else np.uint64)).astype(dt), mdt)  # wraps
        exact(O.square(a), (x.astype(np.uint64) * x.astype(np.uint64)).astype(dt), mdt)  # wraps
    if info.min < 0:
        exact(O.abs(a), np.abs(x), mdt)  # abs(min) wraps to min, like numpy
        exact(O.sign(a), np.sign(x), mdt)


# ---------------------------------------------------------------------------
# elementwise binary with broadcasting

BINARY = {
    # name: (numpy reference, (low, high) of x, (low, high) of y)
    "add": (np.add, (-4, 4), (-4, 4)), "subtract": (np.subtract, (-4, 4), (-4, 4)),
    "multiply": (np.multiply, (-4, 4), (-4, 4)), "divide": (np.divide, (-4, 4), (0.25, 4)),
    "maximum": (np.maximum, (-4, 4), (-4, 4)), "minimum": (np.minimum, (-4, 4), (-4, 4)),
    "power": (np.power, (0.1, 4), (-3, 3)), "arctan2": (np.arctan2, (-4, 4), (-4, 4)),
    "logaddexp": (np.logaddexp, (-6, 6), (-6, 6)),
}


@covers(*BINARY)
@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("op", list(BINARY))
@SETTINGS
@given(shapes=pairs, seed=seeds)
def test_binary_float_broadcasting(op, name, shapes, seed):
    ref, (xl, xh), (yl, yh) = BINARY[op]
    sx, sy = shapes.input_shapes
    r = rng_of(seed)
    qx, x = make(r.uniform(xl, xh, sx), name)
    qy, y = make(r.uniform(yl, yh, sy), name)
    if op == "divide":
        qy, y = make(np.where(r.random(sy) < 0.5, -1, 1) * qy, name)  # both signs, away from 0
    if op == "logaddexp":
        check(O.logaddexp(x, y), ref(qx, qy), name, "two_term", np.maximum(np.abs(qx), np.abs(qy)) + 1)
    else:
        check(getattr(O, op)(x, y), ref(qx, qy), name)
    if op in ("add", "subtract", "multiply", "divide", "power"):
        sym = {"add": "__add__", "subtract": "__sub__", "multiply": "__mul__", "divide": "__truediv__",
               "power": "__pow__"}[op]
        check(getattr(x, sym)(y), ref(qx, qy), name)


@covers("floor_divide", "remainder")
@pytest.mark.parametrize("name", FLOATS)
@SETTINGS
@given(shapes=pairs, seed=seeds)
def test_floor_divide_remainder_float(name, shapes, seed):
    # Quarters over powers of two: the quotient is exact, so floor and the
    # remainder are too; the remainder takes the divisor's sign, like numpy.
    sx, sy = shapes.input_shapes
    r = rng_of(seed)
    qx, x = make(r.integers(-40, 40, sx) / 4, name)
    qy, y = make(r.choice([-2.0, -0.5, 0.25, 1.0, 4.0], sy), name)
    exact(O.floor_divide(x, y), np.floor_divide(qx, qy).astype(np.float32), MDT[name])
    exact(x // y, np.floor_divide(qx, qy).astype(np.float32), MDT[name])
    exact(O.remainder(x, y), np.remainder(qx, qy).astype(np.float32), MDT[name])
    exact(x % y, np.remainder(qx, qy).astype(np.float32), MDT[name])


INT_BINARY = {
    "add": np.add, "subtract": np.subtract, "multiply": np.multiply, "floor_divide": np.floor_divide,
    "remainder": np.remainder, "maximum": np.maximum, "minimum": np.minimum, "bitwise_and": np.bitwise_and,
    "bitwise_or": np.bitwise_or, "bitwise_xor": np.bitwise_xor, "left_shift": np.left_shift,
    "right_shift": np.right_shift,
}


@covers(*INT_BINARY)
@pytest.mark.parametrize("dt", [np.int32, np.int64, np.uint8, np.int16, np.uint32])
@pytest.mark.parametrize("op", list(INT_BINARY))
@SETTINGS
@given(shapes=pairs, seed=seeds)
def test_binary_int_broadcasting(op, dt, shapes, seed):
    sx, sy = shapes.input_shapes
    r = rng_of(seed)
    info = np.iinfo(dt)
    lo, hi = max(info.min, -100), min(info.max, 100)
    x = r.integers(lo, hi, sx, dtype=dt, endpoint=True)
    y = r.integers(lo, hi, sy, dtype=dt, endpoint=True)
    if op in ("floor_divide", "remainder"):
        y = np.where(y == 0, dt(7), y).astype(dt)  # MLX: x // 0 == 0 and x % 0 == x, numpy warns
    if op in ("left_shift", "right_shift"):
        y = (np.abs(y.astype(np.int64)) % 8).astype(dt)
    a, b = mx.array(x), mx.array(y)
    with np.errstate(over="ignore"):
        want = getattr(np, op)(x, y)
    exact(getattr(O, op)(a, b), want, a.dtype)


def test_integer_division_semantics():
    """Floor division and remainder follow numpy (floor, divisor's sign), not C."""
    x = mx.array(np.array([-7, 7, -7, 7], np.int32))
    y = mx.array(np.array([2, -2, -2, 2], np.int32))
    assert (x // y).tolist() == [-4, -4, 3, 3]
    assert (x % y).tolist() == [1, -1, -1, 1]
    assert (x / y).dtype is mx.float32  # true division of ints is float32
    assert (x / y).tolist() == [-3.5, -3.5, 3.5, 3.5]
    # Documented differences from numpy: no error, no warning.
    assert (x // 0).tolist() == [0, 0, 0, 0]
    assert (x % 0).tolist() == [-7, 7, -7, 7]
    assert (x ** -1).tolist() == [0, 0, 0, 0]  # numpy raises for negative integer powers
    assert (x ** 2).dtype is mx.int32 and (x ** 2).tolist() == [49, 49, 49, 49]


@covers("equal", "not_equal", "greater", "greater_equal", "less", "less_equal", "logical_and", "logical_or")
@pytest.mark.parametrize("name", FLOATS + ["int32"])
@SETTINGS
@given(shapes=pairs, seed=seeds)
def test_comparisons_and_logical(name, shapes, seed):
    sx, sy = shapes.input_shapes
    r = rng_of(seed)
    x = r.integers(-2, 3, sx).astype(np.float32)  # small ints: plenty of ties
    y = r.integers(-2, 3, sy).astype(np.float32)
    if name == "int32":
        a, b = mx.array(x.astype(np.int32)), mx.array(y.astype(np.int32))
    else:
        a, b = mx.array(x, MDT[name]), mx.array(y, MDT[name])
    for op, sym in [("equal", "__eq__"), ("not_equal", "__ne__"), ("greater", "__gt__"),
                    ("greater_equal", "__ge__"), ("less", "__lt__"), ("less_equal", "__le__")]:
        want = getattr(np, op)(x, y)
        exact(getattr(O, op)(a, b), want, mx.bool_)
        exact(getattr(a, sym)(b), want, mx.bool_)
    exact(O.logical_and(a, b), np.logical_and(x, y), mx.bool_)
    exact(O.logical_or(a, b), np.logical_or(x, y), mx.bool_)
    ba, bb = O.greater(a, 0), O.less(b, 1)
    exact(ba & bb, (x > 0) & (y < 1), mx.bool_)
    exact(ba | bb, (x > 0) | (y < 1), mx.bool_)
    exact(ba ^ bb, (x > 0) ^ (y < 1), mx.bool_)
    exact(~ba, ~(x > 0), mx.bool_)


def test_nan_comparisons():
    a = mx.array(np.array([np.nan, 1.0, np.nan], np.float32))
    b = mx.array(np.array([np.nan, np.nan, 2.0], np.float32))
    exact(a == b, [False, False, False])
    exact(a != b, [True, True, True])
    exact(a < b, [False, False, False])
    exact(O.maximum(a, b), [np.nan, np.nan, np.nan])  # NaN propagates, like np.maximum


# ---------------------------------------------------------------------------
# Python scalars are weakly typed (as in MLX's own bindings)

@pytest.mark.parametrize("name", FLOATS)
@SETTINGS
@given(shape=shapes, seed=seeds, s=st.sampled_from([0.5, 0.1, 3, -2, 1e-3, 7.25]))
def test_python_scalars_keep_the_array_dtype(name, shape, seed, s):
    q, a = make(rng_of(seed).uniform(0.5, 4, shape), name)
    sq = rounded(s, name)  # the scalar becomes an array of a's dtype first
    cases = [
        (a + s, q + sq), (s + a, sq + q), (a - s, q - sq), (s - a, sq - q), (a * s, q * sq), (s * a, sq * q),
        (a / s, q / sq), (s / a, sq / q), (O.add(a, s), q + sq), (O.multiply(s, a), sq * q),
        (O.maximum(a, s), np.maximum(q, sq)), (O.minimum(s, a), np.minimum(sq, q)),
        (O.where(q > 1, a, s), np.where(q > 1, q, sq)), (O.where(q > 1, s, a), np.where(q > 1, sq, q)),
        (O.clip(a, s, None), np.maximum(q, sq)),
    ]
    for got, want in cases:
        check(got, want, name)
    if isinstance(s, int):
        check(a ** s, q ** s, name)


def test_python_scalars_with_integer_and_bool_arrays():
    i32 = mx.array(np.array([1, -2, 3], np.int32))
    assert (i32 + 2).dtype is mx.int32 and (i32 + 2).tolist() == [3, 0, 5]
    assert (2 - i32).dtype is mx.int32 and (2 - i32).tolist() == [1, 4, -1]
    assert (i32 * 0.5).dtype is mx.float32 and (i32 * 0.5).tolist() == [0.5, -1.0, 1.5]
    u8 = mx.array(np.array([1, 200], np.uint8))
    assert (u8 * 2).dtype is mx.uint8 and (u8 * 2).tolist() == [2, 144]  # wraps in the array's dtype
    i8 = mx.array(np.array([100, -100], np.int8))
    assert (i8 + 1).dtype is mx.int8
    b = mx.array(np.array([True, False]))
    assert (b + 1).dtype is mx.int32 and (b + 1).tolist() == [2, 1]
    assert (b * 1.5).dtype is mx.float32 and (b * 1.5).tolist() == [1.5, 0.0]
    assert (b & True).dtype is mx.bool_ and (b | False).tolist() == [True, False]
    assert (i32 > 1).tolist() == [False, False, True]
    assert (i32 == 3.0).tolist() == [False, False, True]
    # numpy data is strongly typed: float64 data is float32, which wins over bfloat16
    bf = mx.array(np.ones(2, np.float32), mx.bfloat16)
    assert (bf * np.ones(2)).dtype is mx.float32
    assert (bf * mx.array(np.ones(2, np.float16))).dtype is mx.float32  # bf16 x f16 -> f32, as in MLX
    assert O.add(1.5, 2).dtype is mx.float32 and O.add(1.5, 2).item() == 3.5
    assert O.add(1, 2).dtype is mx.int32


# ---------------------------------------------------------------------------
# matmul and addmm

@st.composite
def matmul_shapes(draw):
    m, k, n = draw(st.integers(1, 6)), draw(st.integers(1, 24)), draw(st.integers(1, 6))
    batch = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=3))
    ba, bb = batch.input_shapes
    return ba + (m, k), bb + (k, n)


@covers("matmul")
@pytest.mark.parametrize("name", FLOATS)
@SETTINGS
@given(sh=matmul_shapes(), seed=seeds)
def test_matmul_batched_broadcast(name, sh, seed):
    r = rng_of(seed)
    qa, a = make(r.uniform(-2, 2, sh[0]), name)
    qb, b = make(r.uniform(-2, 2, sh[1]), name)
    scale = np.abs(qa) @ np.abs(qb)
    check(O.matmul(a, b), qa @ qb, name, "reduce", scale)
    check(a @ b, qa @ qb, name, "reduce", scale)


@pytest.mark.parametrize("name", FLOATS)
def test_matmul_vectors_and_views(name):
    r = rng_of(0)
    qv, v = make(r.uniform(-2, 2, 7), name)
    qm, m = make(r.uniform(-2, 2, (7, 3)), name)
    qn, n = make(r.uniform(-2, 2, (3, 7)), name)
    check(O.matmul(v, m), qv @ qm, name, "reduce", np.abs(qv) @ np.abs(qm))
    check(O.matmul(n, v), qn @ qv, name, "reduce", np.abs(qn) @ np.abs(qv))
    check(O.matmul(v, v), qv @ qv, name, "reduce", np.abs(qv) @ np.abs(qv))
    # transposed operands (non-contiguous views)
    check(O.matmul(m.T, n.T), qm.T @ qn.T, name, "reduce", np.abs(qm.T) @ np.abs(qn.T))
    with pytest.raises(amlx.MLXError, match="matmul"):
        O.matmul(m, m)
    with pytest.raises(amlx.MLXError):
        O.matmul(mx.array(np.ones((2, 2), np.int32)), mx.array(np.ones((2, 2), np.int32)))  # floats only


@covers("addmm")
@pytest.mark.parametrize("name", FLOATS)
@SETTINGS
@given(seed=seeds, m=st.integers(1, 5), k=st.integers(1, 16), n=st.integers(1, 5),
       alpha=st.sampled_from([1.0, 0.5, -2.0]), beta=st.sampled_from([1.0, 0.0, 0.25]),
       c_shape=st.sampled_from(["full", "row", "col", "scalar"]), batch=st.sampled_from([(), (2,)]))
def test_addmm(name, seed, m, k, n, alpha, beta, c_shape, batch):
    r = rng_of(seed)
    qa, a = make(r.uniform(-2, 2, batch + (m, k)), name)
    qb, b = make(r.uniform(-2, 2, batch + (k, n)), name)
    cs = {"full": batch + (m, n), "row": (n,), "col": (m, 1), "scalar": ()}[c_shape]
    qc, c = make(r.uniform(-2, 2, cs), name)
    want = beta * qc + alpha * (qa @ qb)
    scale = abs(beta) * np.abs(qc) + abs(alpha) * (np.abs(qa) @ np.abs(qb))
    check(O.addmm(c, a, b, alpha=alpha, beta=beta), want, name, "reduce", scale)


# ---------------------------------------------------------------------------
# reductions

@st.composite
def axes_for(draw, ndim):
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none" or ndim == 0:
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    return tuple(a - ndim if draw(st.booleans()) else a for a in axes)


def _np_axis(axis):
    return axis if axis is None or isinstance(axis, int) else tuple(axis)


def _count(shape, axis):
    if axis is None:
        return int(np.prod(shape))
    axes = (axis,) if isinstance(axis, int) else axis
    return int(np.prod([shape[a] for a in axes]))


@covers("sum", "mean", "max", "min", "prod", "logsumexp", "var")
@pytest.mark.parametrize("name", FLOATS)
@SETTINGS
@given(shape=shapes, seed=seeds, data=st.data(), keepdims=st.booleans())
def test_float_reductions(name, shape, seed, data, keepdims):
    axis = data.draw(axes_for(len(shape)), label="axis")
    r = rng_of(seed)
    q, a = make(r.uniform(-2, 2, shape), name)
    ax = _np_axis(axis)
    kw = dict(axis=ax, keepdims=keepdims)
    n = _count(shape, axis)
    sabs = np.sum(np.abs(q), **kw)
    check(O.sum(a, axis, keepdims), np.sum(q, **kw), name, "reduce", sabs)
    check(a.sum(axis, keepdims), np.sum(q, **kw), name, "reduce", sabs)
    check(O.mean(a, axis, keepdims), np.mean(q, **kw), name, "reduce", sabs / n)
    exact(O.max(a, axis, keepdims), np.max(q, **kw).astype(np.float32), MDT[name])
    exact(O.min(a, axis, keepdims), np.min(q, **kw).astype(np.float32), MDT[name])
    exact(a.max(axis, keepdims), np.max(q, **kw).astype(np.float32), MDT[name])
    # var = mean(x^2) - mean(x)^2 or mean((x - mean)^2): either way the scale is mean(x^2) + mean(x)^2
    check(O.var(a, axis, keepdims), np.var(q, **kw), name, "reduce",
          np.mean(q * q, **kw) + np.mean(q, **kw) ** 2)
    check(O.logsumexp(a, axis, keepdims), np.log(np.sum(np.exp(q), **kw)), name, "two_term",
          np.max(np.abs(q), **kw) + 1 + np.log(n))
    # prod: factors near 1, the relative error grows by one rounding per factor
    qp, p = make(r.uniform(0.8, 1.25, shape), name)
    want = np.prod(qp, **kw)
    check(O.prod(p, axis, keepdims), want, name, "reduce", np.abs(want) * n * 0.05)  # ~16 n ulp(f32)


@covers("all", "any")
@SETTINGS
@given(shape=shapes, seed=seeds, data=st.data(), keepdims=st.booleans(), p=st.sampled_from([0.1, 0.5, 0.9]))
def test_all_any(shape, seed, data, keepdims, p):
    axis = data.draw(axes_for(len(shape)), label="axis")
    x = rng_of(seed).random(shape) < p
    a = mx.array(x)
    kw = dict(axis=_np_axis(axis), keepdims=keepdims)
    exact(O.all(a, axis, keepdims), np.all(x, **kw), mx.bool_)
    exact(O.any(a, axis, keepdims), np.any(x, **kw), mx.bool_)
    # on numbers: truthiness
    f = mx.array(x.astype(np.float32) * 3)
    exact(O.all(f, axis, keepdims), np.all(x, **kw), mx.bool_)


@SETTINGS
@given(shape=shapes, seed=seeds, data=st.data(), keepdims=st.booleans())
def test_integer_reductions(shape, seed, data, keepdims):
    axis = data.draw(axes_for(len(shape)), label="axis")
    x = rng_of(seed).integers(-50, 50, shape, dtype=np.int32)
    a = mx.array(x)
    kw = dict(axis=_np_axis(axis), keepdims=keepdims)
    exact(O.sum(a, axis, keepdims), np.sum(x, **kw).astype(np.int32), mx.int32)
    exact(O.max(a, axis, keepdims), np.max(x, **kw), mx.int32)
    exact(O.min(a, axis, keepdims), np.min(x, **kw), mx.int32)
    m = O.mean(a, axis, keepdims)
    assert m.dtype is mx.float32  # the mean of ints is float32
    np.testing.assert_allclose(m.numpy(), np.mean(x, **kw), rtol=1e-6, atol=1e-5)


def test_reduction_dtypes_and_edges():
    i8 = mx.array(np.array([100, 100, 100], np.int8))
    assert O.sum(i8).dtype is mx.int32 and O.sum(i8).item() == 300  # small ints are summed as int32
    assert O.prod(mx.array(np.array([16, 16], np.uint8))).dtype is mx.uint32
    assert O.sum(mx.array(np.array([True, True, False]))).dtype is mx.int32
    assert O.sum(mx.array(np.array([True, True, False]))).item() == 2
    x = mx.array(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert O.sum(x, axis=()).shape == (2, 3)  # no axes: nothing reduced, like numpy
    exact(O.sum(x, axis=()), np.arange(6, dtype=np.float32).reshape(2, 3))
    e = mx.array(np.zeros((0, 3), np.float32))
    exact(O.sum(e, axis=0), np.zeros(3, np.float32))
    exact(O.prod(e, axis=0), np.ones(3, np.float32))
    assert O.logsumexp(mx.array(np.full(3, -np.inf, np.float32))).item() == -np.inf
    big = mx.array(np.array([1000.0, 1000.0], np.float32))
    assert abs(O.logsumexp(big).item() - (1000 + math.log(2))) < 1e-3  # no overflow
    with pytest.raises(amlx.MLXError):
        O.sum(x, axis=2)


@covers("argmax", "argmin")
@SETTINGS
@given(shape=nonempty_shapes, seed=seeds, data=st.data(), keepdims=st.booleans())
def test_argmax_argmin_ties_first(shape, seed, data, keepdims):
    x = rng_of(seed).integers(0, 3, shape).astype(np.float32)  # many ties
    a = mx.array(x)
    axis = data.draw(st.none() | st.integers(-len(shape), len(shape) - 1), label="axis")
    for op in ("argmax", "argmin"):
        got = getattr(O, op)(a, axis, keepdims)
        assert got.dtype is mx.uint32
        want = getattr(np, op)(x, axis=axis, keepdims=keepdims)  # numpy: first occurrence of a tie
        if axis is None and keepdims:
            want = np.asarray(want).reshape((1,))  # over the flattened array: one axis kept
        exact(got, np.asarray(want).astype(np.uint32))


# ---------------------------------------------------------------------------
# softmax / logsumexp

@covers("softmax")
@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("precise", [False, True])
@SETTINGS
@given(shape=nonempty_shapes, seed=seeds, data=st.data())
def test_softmax(name, precise, shape, seed, data):
    axis = data.draw(axes_for(len(shape)), label="axis")
    q, a = make(rng_of(seed).uniform(-6, 6, shape), name)
    ax = tuple(range(len(shape))) if axis is None else _np_axis(axis)
    e = np.exp(q - np.max(q, axis=ax, keepdims=True))
    want = e / np.sum(e, axis=ax, keepdims=True)
    got = O.softmax(a, axis=ax, precise=precise)
    check(got, want, name, "fused")
    s = got.numpy().astype(np.float64).sum(axis=ax)
    np.testing.assert_allclose(s, 1.0, atol=8 * EPS[name] * _count(shape, ax))


def test_softmax_masked_rows():
    x = np.array([[0.0, -np.inf, 1.0], [-np.inf, -np.inf, 2.0]], np.float32)
    got = O.softmax(mx.array(x), axis=-1).numpy()
    np.testing.assert_allclose(got, [[1 / (1 + math.e), 0, math.e / (1 + math.e)], [0, 0, 1]], rtol=1e-6)


# ---------------------------------------------------------------------------
# sorting and selection

@covers("sort", "argsort")
@pytest.mark.parametrize("name", FLOATS + ["int32"])
@SETTINGS
@given(shape=nonempty_shapes, seed=seeds, data=st.data())
def test_sort_argsort(name, shape, seed, data):
    axis = data.draw(st.none() | st.integers(-len(shape), len(shape) - 1), label="axis")
    r = rng_of(seed)
    n = int(np.prod(shape))
    distinct = r.permutation(n).reshape(shape).astype(np.float32) - n // 2  # exact in every dtype for n <= 256
    ties = r.integers(-2, 3, shape).astype(np.float32)
    for x in (distinct, ties):
        a = mx.array(x.astype(np.int32)) if name == "int32" else mx.array(x, MDT[name])
        xr = a.numpy()  # the values as held (large integers round in bfloat16: more ties)
        got = O.sort(a, axis=axis)
        exact(got, np.sort(xr, axis=axis).astype(got.numpy().dtype))
        idx = O.argsort(a, axis=axis)
        assert idx.dtype is mx.uint32
        # MLX's argsort is stable: ties keep their order, like numpy's kind="stable"
        exact(idx, np.argsort(xr, axis=axis, kind="stable").astype(np.uint32))


def test_sort_nan_last():
    x = np.array([3.0, np.nan, -1.0, np.inf], np.float32)
    exact(O.sort(mx.array(x)), np.sort(x))


@covers("topk", "argpartition")
@pytest.mark.parametrize("name", FLOATS)
@SETTINGS
@given(shape=nonempty_shapes, seed=seeds, data=st.data())
def test_topk_and_argpartition_sets(name, shape, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    n = shape[axis]
    k = data.draw(st.integers(1, n), label="k")
    r = rng_of(seed)
    x = r.integers(-3, 4, shape).astype(np.float32)  # ties included
    a = mx.array(x, MDT[name])
    # topk: the k largest values along axis, in no particular order -> compare as sorted multisets
    got = O.topk(a, k, axis=axis).numpy()
    want = np.take(np.sort(x, axis=axis), np.arange(n - k, n), axis=axis)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.sort(got, axis=axis), want)
    # argpartition: a permutation along axis, x[kth] in sorted position, smaller before, larger after
    kth = k - 1
    idx = O.argpartition(a, kth, axis=axis)
    assert idx.dtype is mx.uint32
    p = idx.numpy().astype(np.int64)
    np.testing.assert_array_equal(np.sort(p, axis=axis), np.broadcast_to(
        np.arange(n).reshape([-1 if i == axis % len(shape) else 1 for i in range(len(shape))]), shape))
    v = np.take_along_axis(x, p, axis=axis)
    pivot = np.take(np.sort(x, axis=axis), [kth], axis=axis)
    np.testing.assert_array_equal(np.take(v, [kth], axis=axis), pivot)
    assert np.all(np.take(v, np.arange(kth), axis=axis) <= pivot)
    assert np.all(np.take(v, np.arange(kth + 1, n), axis=axis) >= pivot)


# ---------------------------------------------------------------------------
# cumulative ops

def _cum_ref(fn, identity, x, axis, reverse, inclusive):
    if axis is None:
        x, axis = x.reshape(-1), 0
    if reverse:
        x = np.flip(x, axis)
    y = fn(x, axis)
    if not inclusive:
        first = np.full_like(np.take(y, [0], axis=axis), identity)
        y = np.concatenate([first, np.take(y, np.arange(y.shape[axis] - 1), axis=axis)], axis=axis)
    return np.flip(y, axis) if reverse else y


CUMULATIVE = {
    "cumsum": (lambda x, ax: np.cumsum(x, axis=ax), 0.0),
    "cumprod": (lambda x, ax: np.cumprod(x, axis=ax), 1.0),
    "cummax": (lambda x, ax: np.maximum.accumulate(x, axis=ax), -np.inf),
    "cummin": (lambda x, ax: np.minimum.accumulate(x, axis=ax), np.inf),
    "logcumsumexp": (lambda x, ax: np.logaddexp.accumulate(x, axis=ax), -np.inf),
}


@covers(*CUMULATIVE)
@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("op", list(CUMULATIVE))
@SETTINGS
@given(shape=nonempty_shapes, seed=seeds, data=st.data(), reverse=st.booleans(), inclusive=st.booleans())
def test_cumulative(op, name, shape, seed, data, reverse, inclusive):
    axis = data.draw(st.none() | st.integers(-len(shape), len(shape) - 1), label="axis")
    fn, identity = CUMULATIVE[op]
    lo, hi = ((0.97, 1.03) if axis is None else (0.8, 1.25)) if op == "cumprod" else (-3, 3)  # no float16 overflow
    q, a = make(rng_of(seed).uniform(lo, hi, shape), name)
    got = getattr(O, op)(a, axis=axis, reverse=reverse, inclusive=inclusive)
    want = _cum_ref(fn, identity, q, axis, reverse, inclusive)
    if op in ("cummax", "cummin"):
        exact(got, want.astype(np.float32), MDT[name])
        return
    n = q.size if axis is None else shape[axis]
    if op == "cumsum":
        scale = n * _cum_ref(fn, 0.0, np.abs(q), axis, reverse, True)
    elif op == "cumprod":
        scale = n * 2 * np.abs(want)
    else:
        scale = n * (1.0 + np.abs(want))
    check(got, want, name, "scan", scale)


def test_cumulative_integer_and_exclusive_identities():
    xi = mx.array(np.array([3, 1, 2], np.int32))
    exact(O.cumsum(xi), np.array([3, 4, 6], np.int32), mx.int32)
    exact(O.cummax(xi, inclusive=False), np.array([np.iinfo(np.int32).min, 3, 3], np.int32))
    assert O.cumsum(mx.array(np.array([True, True]))).dtype is mx.int32
    assert O.cumsum(mx.array(np.array([100, 100], np.int8))).dtype is mx.int8  # no widening, unlike sum


# ---------------------------------------------------------------------------
# shapes

@covers("reshape", "transpose", "swapaxes", "expand_dims", "squeeze", "broadcast_to", "flatten")
@pytest.mark.parametrize("name", ["float32", "bfloat16", "int32"])
@SETTINGS
@given(shape=shapes, seed=seeds, data=st.data())
def test_shape_ops(name, shape, seed, data):
    x = rng_of(seed).integers(-100, 100, shape).astype(np.float32)
    if name == "int32":
        x = x.astype(np.int32)
        a = mx.array(x)
    else:
        a = mx.array(x, MDT[name])
    nd = len(shape)
    # reshape, with a -1
    new = data.draw(st.permutations(list(shape)), label="perm shape") if nd else []
    exact(O.reshape(a, new), x.reshape(new))
    if nd:
        inferred = list(new)
        inferred[data.draw(st.integers(0, nd - 1), label="infer")] = -1
        exact(O.reshape(a, inferred), x.reshape(inferred))
        exact(a.reshape(*inferred), x.reshape(inferred))
    exact(O.flatten(a), x.reshape(-1))
    # transpose
    perm = data.draw(st.permutations(range(nd)), label="perm")
    exact(O.transpose(a, perm), np.transpose(x, perm))
    exact(O.transpose(a), x.T)
    exact(a.T, x.T)
    if nd >= 2:
        i, j = data.draw(st.integers(-nd, nd - 1), label="i"), data.draw(st.integers(-nd, nd - 1), label="j")
        exact(O.swapaxes(a, i, j), np.swapaxes(x, i, j))
    # expand_dims / squeeze
    ax = data.draw(st.integers(-nd - 1, nd), label="expand axis")
    e = O.expand_dims(a, ax)
    exact(e, np.expand_dims(x, ax))
    exact(O.squeeze(e, ax), x)
    exact(O.expand_dims(a, (0, nd + 1)), np.expand_dims(x, (0, nd + 1)))
    exact(O.squeeze(a), np.squeeze(x))
    ones = tuple(i for i, s in enumerate(shape) if s == 1)
    if ones:
        exact(O.squeeze(a, ones), np.squeeze(x, ones))
    # broadcast_to: new leading axes, and size-1 axes widened
    other = data.draw(hnp.broadcastable_shapes(shape, max_dims=nd + 2, max_side=3), label="other")
    full = np.broadcast_shapes(shape, other)
    exact(O.broadcast_to(a, full), np.broadcast_to(x, full))
    exact(O.broadcast_to(2.5, (2, 3)), np.full((2, 3), 2.5, np.float32), mx.float32)


def test_shape_errors():
    a = mx.array(np.zeros((2, 3), np.float32))
    for bad in (lambda: O.reshape(a, (4, 2)), lambda: O.transpose(a, (0, 0)), lambda: O.squeeze(a, 0),
                lambda: O.broadcast_to(a, (3, 3)), lambda: O.expand_dims(a, 4)):
        with pytest.raises(amlx.MLXError):
            bad()


@covers("concatenate", "stack", "split")
@pytest.mark.parametrize("name", ["float32", "float16", "int32"])
@SETTINGS
@given(shape=nonempty_shapes, seed=seeds, data=st.data())
def test_concatenate_stack_split(name, shape, seed, data):
    nd = len(shape)
    axis = data.draw(st.integers(-nd, nd - 1), label="axis")
    r = rng_of(seed)
    npdt = {"float32": np.float32, "float16": np.float16, "int32": np.int32}[name]
    k = data.draw(st.integers(1, 3), label="count")
    xs = []
    for _ in range(k):
        s = list(shape)
        s[axis] = data.draw(st.integers(0, 3), label="size along axis")
        xs.append(r.integers(-50, 50, s).astype(npdt))
    got = O.concatenate([mx.array(x) for x in xs], axis=axis)
    exact(got, np.concatenate(xs, axis=axis))
    ys = [r.integers(-50, 50, shape).astype(npdt) for _ in range(k)]
    sax = data.draw(st.integers(-nd - 1, nd), label="stack axis")
    exact(O.stack([mx.array(y) for y in ys], axis=sax), np.stack(ys, axis=sax))
    # split at indices (unsorted and out-of-range indices as numpy: empty pieces)
    y = ys[0]
    a = mx.array(y)
    n = shape[axis]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3), label="cuts"))
    pieces = O.split(a, cuts, axis=axis)
    want = np.split(y, cuts, axis=axis)
    assert len(pieces) == len(want)
    for p, w in zip(pieces, want):
        exact(p, w)
    # split into equal sections
    sections = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]), label="sections")
    pieces = O.split(a, sections, axis=axis)
    for p, w in zip(pieces, np.split(y, sections, axis=axis)):
        exact(p, w)
    if n > 1 and any(n % d for d in range(2, n + 1)):
        bad = next(d for d in range(2, n + 1) if n % d)
        with pytest.raises(amlx.MLXError):
            O.split(a, bad, axis=axis)


def test_concatenate_promotes():
    got = O.concatenate([mx.array(np.ones(2, np.int32)), mx.array(np.ones(1, np.float16))])
    assert got.dtype is mx.float16
    with pytest.raises(amlx.MLXError):
        O.concatenate([mx.array(np.ones((2, 2), np.float32)), mx.array(np.ones((3, 3), np.float32))], axis=0)


# ---------------------------------------------------------------------------
# slicing, static and dynamic

@st.composite
def window(draw, shape):
    starts, stops, strides = [], [], []
    for n in shape:
        a = draw(st.integers(0, n))
        b = draw(st.integers(a, n))
        starts.append(a), stops.append(b), strides.append(draw(st.integers(1, 3)))
    return starts, stops, strides


@covers("slice", "slice_update")
@pytest.mark.parametrize("name", ["float32", "bfloat16", "int32"])
@SETTINGS
@given(shape=shapes, seed=seeds, data=st.data())
def test_static_slice_and_update(name, shape, seed, data):
    r = rng_of(seed)
    x = r.integers(-100, 100, shape).astype(np.int32 if name == "int32" else np.float32)
    a = mx.array(x) if name == "int32" else mx.array(x, MDT[name])
    starts, stops, strides = data.draw(window(shape), label="window")
    sl = tuple(slice(s, e, k) for s, e, k in zip(starts, stops, strides))
    exact(O.slice(a, starts, stops, strides), x[sl])
    exact(O.slice(a, starts, stops), x[tuple(slice(s, e) for s, e in zip(starts, stops))])
    upd = r.integers(-100, 100, x[sl].shape).astype(x.dtype)
    want = x.copy()
    want[sl] = upd
    u = mx.array(upd) if name == "int32" else mx.array(upd, MDT[name])
    got = O.slice_update(a, u, starts, stops, strides)
    exact(got, want)
    exact(a, x)  # functional: the source is unchanged
    # a scalar update broadcasts over the window
    want2 = x.copy()
    want2[sl] = 7
    exact(O.slice_update(a, 7, starts, stops, strides), want2)


@covers("slice_dynamic", "slice_update_dynamic")
@pytest.mark.parametrize("start_dtype", [np.int32, np.int64, np.uint32])
@SETTINGS
@given(shape=nonempty_shapes, seed=seeds, data=st.data())
def test_dynamic_slice_and_update(start_dtype, shape, seed, data):
    r = rng_of(seed)
    x = r.integers(-100, 100, shape).astype(np.float32)
    a = mx.array(x)
    nd = len(shape)
    axes = data.draw(st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True), label="axes")
    sizes = [data.draw(st.integers(1, n), label="size") for n in shape]
    starts = [data.draw(st.integers(0, shape[ax] - sizes[ax]), label="start") for ax in axes]
    sl = [slice(0, s) for s in sizes]
    for ax, s in zip(axes, starts):
        sl[ax] = slice(s, s + sizes[ax])
    sl = tuple(sl)
    neg_axes = [ax - nd if data.draw(st.booleans(), label="negative axis") else ax for ax in axes]
    start = mx.array(np.array(starts, start_dtype))
    exact(O.slice_dynamic(a, start, neg_axes, sizes), x[sl])
    if len(axes) == 1:  # a 0-d start works for one axis
        exact(O.slice_dynamic(a, mx.array(start_dtype(starts[0])), axes, sizes), x[sl])
    # update: the window at `start` along `axes`, from 0 along the others
    upd_shape = [sizes[d] if d in axes else shape[d] for d in range(nd)]
    upd = r.integers(-100, 100, upd_shape).astype(np.float32)
    sl_u = tuple(sl[d] if d in axes else slice(None) for d in range(nd))
    want = x.copy()
    want[sl_u] = upd
    exact(O.slice_update_dynamic(a, mx.array(upd), start, neg_axes), want)


def test_dynamic_offsets_are_clamped_into_range():
    """Out-of-range starts are clamped (as XLA does), never read or written outside the array."""
    x = np.arange(10, dtype=np.float32)
    a = mx.array(x)
    for s, want in [(8, x[6:10]), (100, x[6:10]), (-3, x[0:4]), (3, x[3:7])]:
        exact(O.slice_dynamic(a, mx.array(np.array([s], np.int32)), [0], [4]), want)
    z = O.zeros((6,))
    for s, want in [(5, [0, 0, 0, 0, 1, 1]), (-2, [1, 1, 0, 0, 0, 0]), (2, [0, 0, 1, 1, 0, 0])]:
        exact(O.slice_update_dynamic(z, O.ones((2,)), mx.array(np.array([s], np.int32)), [0]),
              np.array(want, np.float32))


# ---------------------------------------------------------------------------
# gathers and scatters

@covers("take")
@pytest.mark.parametrize("name", ["float32", "bfloat16", "int32"])
@SETTINGS
@given(shape=nonempty_shapes, seed=seeds, data=st.data(), ishape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
def test_take(name, shape, seed, data, ishape):
    r = rng_of(seed)
    x = r.integers(-100, 100, shape).astype(np.int32 if name == "int32" else np.float32)
    a = mx.array(x) if name == "int32" else mx.array(x, MDT[name])
    axis = data.draw(st.none() | st.integers(-len(shape), len(shape) - 1), label="axis")
    n = x.size if axis is None else shape[axis]
    idx = r.integers(-n, n, ishape).astype(np.int32)  # negative indices count from the end
    exact(O.take(a, mx.array(idx), axis), np.take(x, idx, axis=axis))
    exact(O.take(a, mx.array((idx % n).astype(np.uint32)), axis), np.take(x, idx % n, axis=axis))


@covers("take_along_axis", "put_along_axis")
@pytest.mark.parametrize("name", ["float32", "float16", "int32"])
@SETTINGS
@given(shape=nonempty_shapes, seed=seeds, data=st.data())
def test_take_put_along_axis(name, shape, seed, data):
    r = rng_of(seed)
    npdt = {"float32": np.float32, "float16": np.float16, "int32": np.int32}[name]
    x = r.integers(-100, 100, shape).astype(npdt)
    a = mx.array(x)
    nd = len(shape)
    axis = data.draw(st.integers(-nd, nd - 1), label="axis")
    n = shape[axis]
    k = data.draw(st.integers(1, 4), label="k")
    ishape = list(shape)
    ishape[axis] = k
    # indices may broadcast along the other axes
    for d in range(nd):
        if d != axis % nd and data.draw(st.booleans(), label="broadcast idx"):
            ishape[d] = 1
    idx = r.integers(0, n, ishape).astype(np.int32)
    exact(O.take_along_axis(a, mx.array(idx), axis), np.take_along_axis(x, idx, axis=axis))
    # put_along_axis: distinct positions per line (the order of duplicate writes is unspecified)
    kk = min(k, n)
    pshape = list(shape)
    pshape[axis] = kk
    perm = np.argsort(r.random(shape), axis=axis)
    pidx = np.take(perm, np.arange(kk), axis=axis).astype(np.int32)
    vals = r.integers(-100, 100, pshape).astype(npdt)
    want = x.copy()
    np.put_along_axis(want, pidx, vals, axis=axis)
    exact(O.put_along_axis(a, mx.array(pidx), mx.array(vals), axis), want)
    want2 = x.copy()
    np.put_along_axis(want2, pidx, npdt(5), axis=axis)
    exact(O.put_along_axis(a, mx.array(pidx), 5, axis), want2)  # a scalar value broadcasts


# ---------------------------------------------------------------------------
# where, clip, astype, view

@covers("where")
@pytest.mark.parametrize("name", FLOATS)
@SETTINGS
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=4, max_side=4), seed=seeds)
def test_where(name, shapes, seed):
    sc, sx, sy = shapes.input_shapes
    r = rng_of(seed)
    c = r.random(sc) < 0.5
    qx, x = make(r.uniform(-4, 4, sx), name)
    qy, y = make(r.uniform(-4, 4, sy), name)
    exact(O.where(mx.array(c), x, y), np.where(c, qx, qy).astype(np.float32), MDT[name])
    exact(O.where(mx.array(c), x, 0.0), np.where(c, qx, 0.0).astype(np.float32), MDT[name])
    exact(O.where(mx.array(c), -1.0, y), np.where(c, -1.0, qy).astype(np.float32), MDT[name])
    # a numeric condition is "!= 0"
    exact(O.where(mx.array(c.astype(np.float32) * 2), x, y), np.where(c, qx, qy).astype(np.float32))


@covers("clip")
@pytest.mark.parametrize("name", FLOATS + ["int32"])
@SETTINGS
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=4), seed=seeds)
def test_clip(name, shapes, seed):
    sx, sl, sh = shapes.input_shapes
    r = rng_of(seed)
    if name == "int32":
        x = r.integers(-10, 10, sx).astype(np.int32)
        a = mx.array(x)
        exact(O.clip(a, -3, 4), np.clip(x, -3, 4), mx.int32)
        return
    qx, a = make(r.uniform(-4, 4, sx), name)
    ql, lo = make(r.uniform(-3, 0, sl), name)
    qh, hi = make(r.uniform(0, 3, sh), name)
    f = lambda v: np.asarray(v).astype(np.float32)  # noqa: E731
    exact(O.clip(a, lo, hi), f(np.clip(qx, ql, qh)), MDT[name])
    exact(O.clip(a, -1.5, 2.0), f(np.clip(qx, -1.5, 2.0)), MDT[name])
    exact(O.clip(a, None, 0.5), f(np.minimum(qx, 0.5)), MDT[name])
    exact(O.clip(a, -0.5, None), f(np.maximum(qx, -0.5)), MDT[name])
    exact(O.clip(a, 1.0, -1.0), f(np.full_like(qx, -1.0)), MDT[name])  # lo > hi: hi wins, like numpy


@covers("astype")
@SETTINGS
@given(shape=shapes, seed=seeds)
def test_astype_round_trips(shape, seed):
    r = rng_of(seed)
    x = (r.standard_normal(shape) * 10.0 ** r.integers(-4, 5, shape)).astype(np.float32)
    a = mx.array(x)
    # float32 -> bfloat16 rounds to nearest even, exactly like f32_to_bf16_bits
    b = O.astype(a, mx.bfloat16)
    assert b.dtype is mx.bfloat16
    exact(O.view(b, mx.uint16), f32_to_bf16_bits(x))
    exact(O.astype(b, mx.float32), bf16_bits_to_f32(f32_to_bf16_bits(x)))  # widening is exact
    exact(O.astype(O.astype(b, mx.float32), mx.bfloat16).astype(mx.float32), bf16_bits_to_f32(f32_to_bf16_bits(x)))
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    exact(O.astype(a, mx.float16), h)
    exact(O.astype(O.astype(a, mx.float16), mx.float32), h.astype(np.float32))
    exact(a.astype("float16").astype(np.float32), h.astype(np.float32))
    # float -> int truncates toward zero (in range)
    small = np.clip(x, -1e6, 1e6)
    s = mx.array(small)
    exact(O.astype(s, mx.int32), small.astype(np.int32))
    exact(O.astype(s, mx.int64), small.astype(np.int64))
    # int -> float, int narrowing wraps like numpy, bool <-> numbers
    i = r.integers(-(2**31), 2**31 - 1, shape, dtype=np.int64)
    exact(O.astype(mx.array(i), mx.int8), i.astype(np.int8))
    exact(O.astype(mx.array(i), mx.uint16), i.astype(np.uint16))
    exact(O.astype(mx.array(i), mx.float32), i.astype(np.float32))
    exact(O.astype(a, mx.bool_), x != 0)
    exact(O.astype(mx.array(x > 0), mx.float32), (x > 0).astype(np.float32))


def test_astype_bfloat16_rounding_ties_and_specials():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0xFF800000, 0x00000001, 0x80000000],
                    np.uint32)
    x = bits.view(np.float32)
    got = O.view(O.astype(mx.array(x), mx.bfloat16), mx.uint16).numpy()
    # ties to even (down, up), above the tie up, overflow to inf, -inf, subnormal -> 0, -0
    assert got.tolist() == [0x3F80, 0x3F82, 0x3F81, 0x7F80, 0xFF80, 0x0000, 0x8000]
    nan = O.astype(mx.array(np.array([np.nan], np.float32)), mx.bfloat16)
    assert math.isnan(nan.item())


@covers("view")
def test_view_reinterprets_bits():
    x = np.array([[1.0, -2.5, 3.25], [0.0, -0.0, np.inf]], np.float32)
    a = mx.array(x)
    exact(O.view(a, mx.uint32), x.view(np.uint32), mx.uint32)
    exact(O.view(a, mx.int32), x.view(np.int32))
    exact(O.view(a, mx.uint8), x.view(np.uint8))  # a smaller dtype widens the last axis
    exact(O.view(O.view(a, mx.uint8), mx.float32), x)
    exact(O.view(a, mx.float16), x.view(np.float16))
    exact(O.view(a.T, mx.uint32), x.T.view(np.uint32))  # of a transposed view: its logical values
    b = mx.from_bits(np.array([0x3F80, 0xC020], np.uint16), mx.bfloat16)
    exact(O.view(b, mx.int16), np.array([0x3F80, 0xC020], np.uint16).view(np.int16))
    exact(b, np.array([1.0, -2.5], np.float32))


# ---------------------------------------------------------------------------
# creation

@covers("full", "zeros", "ones", "zeros_like", "ones_like")
@pytest.mark.parametrize("dt", ["float32", "bfloat16", "float16", "int32", "uint8", "bool_", "int64"])
def test_full_zeros_ones(dt):
    d = getattr(mx, dt)
    npd = {"bfloat16": np.float32, "bool_": np.bool_}.get(dt, getattr(np, dt, None))
    for shape in [(), (3,), (2, 0, 4), (2, 3)]:
        exact(O.zeros(shape, d), np.zeros(shape, npd), d)
        exact(O.ones(shape, d), np.ones(shape, npd), d)
        exact(O.full(shape, 1, d), np.full(shape, 1, npd), d)
        z = O.zeros(shape, d)
        exact(O.zeros_like(z), np.zeros(shape, npd), d)
        exact(O.ones_like(z), np.ones(shape, npd), d)
    assert O.zeros(4).shape == (4,) and O.zeros(4).dtype is mx.float32  # default dtype float32


def test_full_values_and_dtypes():
    assert O.full((2,), 3).dtype is mx.int32
    assert O.full((2,), 2.5).dtype is mx.float32
    assert O.full((2,), True).dtype is mx.bool_
    exact(O.full((2,), 2.5, mx.int32), np.array([2, 2], np.int32))  # converted like astype
    exact(O.full((2, 3), 0.1, mx.bfloat16), np.full((2, 3), rounded(0.1, "bfloat16")).astype(np.float32))
    row = mx.array(np.array([1, 2, 3], np.float32))
    exact(O.full((2, 3), row), np.broadcast_to(np.array([1, 2, 3], np.float32), (2, 3)))
    with pytest.raises(amlx.MLXError):
        O.full((2, 2), row)


@covers("arange")
@SETTINGS
@given(start=st.integers(-20, 20), stop=st.integers(-20, 20), step=st.sampled_from([1, 2, 3, -1, -2, 5]))
def test_arange_int(start, stop, step):
    exact(O.arange(start, stop, step), np.arange(start, stop, step, dtype=np.int32), mx.int32)
    if start >= 0:
        exact(O.arange(start), np.arange(start, dtype=np.int32), mx.int32)


@SETTINGS
@given(start=st.sampled_from([0.0, 0.5, -1.25, 3.0]), stop=st.sampled_from([1.0, 3.2, -2.0, 10.0]),
       step=st.sampled_from([0.1, 0.7, -0.5, 0.25, 1.5]))
def test_arange_float(start, stop, step):
    want = np.arange(start, stop, step)
    got = O.arange(start, stop, step)
    assert got.dtype is mx.float32
    assert got.shape == want.shape  # ceil((stop - start) / step) elements, like numpy
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6 * max(1, abs(stop)))
    for d in ("bfloat16", "float16", "int32"):
        assert O.arange(0, 5, 1, dtype=getattr(mx, d)).dtype is getattr(mx, d)


@covers("tril", "triu")
@SETTINGS
@given(shape=hnp.array_shapes(min_dims=2, max_dims=4, max_side=5), k=st.integers(-4, 4), seed=seeds)
def test_tril_triu(shape, k, seed):
    x = rng_of(seed).integers(-9, 9, shape).astype(np.float32)
    a = mx.array(x)
    exact(O.tril(a, k), np.tril(x, k))  # batched over the leading axes
    exact(O.triu(a, k), np.triu(x, k))
    with pytest.raises(amlx.MLXError):
        O.tril(mx.array(np.ones(3, np.float32)))  # needs at least 2-D (numpy broadcasts 1-D)


# ---------------------------------------------------------------------------
# quantization

@covers("quantize", "dequantize", "quantized_matmul")
@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("bits,group", [(4, 64), (4, 32), (8, 64), (2, 32), (3, 64), (6, 128)])
def test_quantize_dequantize_bound(name, bits, group):
    r = rng_of(bits * 1000 + group)
    rows, cols = 6, 256
    qw, w = make(r.standard_normal((rows, cols)) * r.uniform(0.1, 3, (rows, 1)), name)
    wq, scales, biases = O.quantize(w, group_size=group, bits=bits)
    assert wq.dtype is mx.uint32 and wq.shape == (rows, cols * bits // 32)
    assert scales.shape == biases.shape == (rows, cols // group)
    assert scales.dtype is MDT[name] and biases.dtype is MDT[name]
    deq = O.dequantize(wq, scales, biases, group_size=group, bits=bits)
    assert deq.dtype is MDT[name] and deq.shape == (rows, cols)
    d = deq.numpy().astype(np.float64)
    sc = np.repeat(scales.numpy().astype(np.float64), group, axis=1)  # MLX's scales may be negative
    b = np.repeat(biases.numpy().astype(np.float64), group, axis=1)
    gmax = np.repeat(np.abs(qw).reshape(rows, -1, group).max(-1), group, axis=1)
    # Affine: w ~ scale * q + bias with q in [0, 2**bits), plus the roundings
    # of scale*q+bias and of the stored scale and bias in the dtype (a few ulp
    # of the group's magnitude).
    # MLX's affine mode makes the group's edge value (its min or max) exact and
    # adjusts the step for it, so the far end can be off by up to one step
    # (measured 0.99 step), not half a step.
    assert np.all(np.abs(d - qw) <= np.abs(sc) + 4 * EPS[name] * gmax + 1e-7)
    if name == "float32":  # (in half dtypes the rounding of d dominates for small steps)
        assert np.mean(np.abs(d - qw) / np.abs(sc)) < 0.3  # the typical error is a quarter step
    # Every dequantized value is on the group's grid, at a step in range.
    steps = (d - b) / sc
    assert np.all(np.abs(steps - np.round(steps)) <= 0.01 + 4 * EPS[name] * gmax / np.abs(sc))
    assert np.round(steps).min() >= 0 and np.round(steps).max() <= 2**bits - 1
    exact(O.dequantize(wq, scales, biases, group_size=group, bits=bits, dtype=mx.float32).astype(MDT[name]),
          d.astype(np.float32))
    # quantized_matmul == x @ dequantize(w).T ...
    qx, x = make(r.uniform(-1, 1, (3, 5, cols)), name)
    check(O.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group, bits=bits), qx @ d.T, name,
          "quantized_matmul", np.abs(qx) @ np.abs(d.T))
    # ... and with transpose=False, w is (K, N) quantized along N: x @ dequantize(w)
    qw2, w2 = make(r.standard_normal((24, cols)), name)
    wq2, s2, b2 = O.quantize(w2, group_size=group, bits=bits)
    d2 = O.dequantize(wq2, s2, b2, group_size=group, bits=bits).numpy().astype(np.float64)
    qx2, x2 = make(r.uniform(-1, 1, (4, 24)), name)
    check(O.quantized_matmul(x2, wq2, s2, b2, transpose=False, group_size=group, bits=bits), qx2 @ d2, name,
          "quantized_matmul", np.abs(qx2) @ np.abs(d2))


def test_quantize_rejects_bad_shapes():
    with pytest.raises(amlx.MLXError):
        O.quantize(mx.array(np.ones((4, 48), np.float32)), group_size=64, bits=4)
    with pytest.raises(amlx.MLXError):
        O.quantize(mx.array(np.ones((4, 64), np.float32)), group_size=64, bits=7)


# ---------------------------------------------------------------------------
# fast: rms_norm, layer_norm

@covers("rms_norm", "layer_norm")
@pytest.mark.parametrize("name", FLOATS)
@SETTINGS
@given(shape=nonempty_shapes, seed=seeds, eps=st.sampled_from([1e-6, 1e-5, 1e-2]),
       affine=st.sampled_from(["none", "weight", "both"]))
def test_norms(name, shape, seed, eps, affine):
    r = rng_of(seed)
    q, x = make(r.uniform(-3, 3, shape) + r.uniform(-1, 1), name)
    d = shape[-1]
    qw, w = make(r.uniform(0.5, 1.5, d), name)
    qb, b = make(r.uniform(-1, 1, d), name)
    weight = w if affine != "none" else None
    bias = b if affine == "both" else None
    ww = qw if affine != "none" else 1.0
    bb = qb if affine == "both" else 0.0
    rms = q / np.sqrt(np.mean(q * q, axis=-1, keepdims=True) + eps) * ww
    check(fast.rms_norm(x, weight, eps), rms, name, "fused", np.maximum(1.0, np.abs(rms)))
    mu = q.mean(-1, keepdims=True)
    ln = (q - mu) / np.sqrt(q.var(-1, keepdims=True) + eps) * ww + bb
    # x - mean cancels when the row is nearly constant: an error of an ulp of
    # |x| is amplified by 1 / std, so the scale is 1 + max|x| / sqrt(var + eps).
    cond = 1.0 + np.max(np.abs(q), axis=-1, keepdims=True) / np.sqrt(q.var(-1, keepdims=True) + eps)
    check(fast.layer_norm(x, weight, bias, eps), ln, name, "fused", np.maximum(1.0, np.abs(ln)) * cond)


# ---------------------------------------------------------------------------
# fast: rope

def rope_ref(x, dims, *, traditional, base=None, scale=1.0, offset=0, freqs=None):
    """RoPE over the last axis of x (B, H, L, D). offset: int, or (B,) per batch row.

    freqs are MLX's: periods, the angle of pair i at position p is p * scale / freqs[i]."""
    x = np.asarray(x, np.float64)
    L = x.shape[-2]
    inv = 1.0 / np.asarray(freqs, np.float64) if freqs is not None else base ** (-np.arange(0, dims, 2) / dims)
    off = np.asarray(offset, np.float64)
    pos = (off.reshape(off.shape + (1,) * 2) + np.arange(L)[:, None]) if off.ndim else off + np.arange(L)[:, None]
    theta = pos * scale * inv  # (L, dims/2) or (B, 1, L, dims/2) for per-row offsets
    if off.ndim:
        theta = theta.reshape(off.shape[0], 1, L, dims // 2)
    cos, sin = np.cos(theta), np.sin(theta)
    out = x.copy()
    if traditional:
        x1, x2 = x[..., 0:dims:2], x[..., 1:dims:2]
        out[..., 0:dims:2] = x1 * cos - x2 * sin
        out[..., 1:dims:2] = x1 * sin + x2 * cos
    else:
        # Hugging Face: q * cat(cos, cos) + rotate_half(q) * cat(sin, sin), over the first `dims`
        c = np.concatenate([cos, cos], -1)
        s = np.concatenate([sin, sin], -1)
        h = x[..., :dims]
        rotate_half = np.concatenate([-h[..., dims // 2:], h[..., :dims // 2]], -1)
        out[..., :dims] = h * c + rotate_half * s
    return out


@covers("rope")
@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("traditional", [False, True])
@SETTINGS
@given(seed=seeds, b=st.integers(1, 3), h=st.integers(1, 3), L=st.integers(1, 9),
       D=st.sampled_from([8, 16, 32]), partial=st.booleans(), offset=st.integers(0, 300),
       base=st.sampled_from([10000.0, 500000.0, 100.0]), scale=st.sampled_from([1.0, 0.5, 0.25]),
       offset_kind=st.sampled_from(["int", "array0d", "per_row"]))
def test_rope(name, traditional, seed, b, h, L, D, partial, offset, base, scale, offset_kind):
    r = rng_of(seed)
    dims = D // 2 if partial else D
    q, x = make(r.uniform(-2, 2, (b, h, L, D)), name)
    if offset_kind == "int":
        off, got_off = offset, offset
    elif offset_kind == "array0d":
        off, got_off = offset, mx.array(np.int32(offset))
    else:  # MLX takes a vector of one offset per batch row
        offs = r.integers(0, 300, b)
        off, got_off = offs, mx.array(offs.astype(np.int32))
    maxpos = float(np.max(off)) + L
    angle_err = ROPE_ANGLE_ULPS * EPS["float32"] * maxpos * scale * np.max(np.abs(q))
    got = fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=got_off)
    want = rope_ref(q, dims, traditional=traditional, base=base, scale=scale, offset=off)
    check(got, want, name, "fused", extra=angle_err)
    # the same with custom frequencies (MLX's are periods), e.g. llama3's stretched low frequencies
    periods = (base ** (np.arange(0, dims, 2) / dims)).astype(np.float32)
    periods = periods * np.where(np.arange(dims // 2) >= dims // 4, 8.0, 1.0).astype(np.float32)
    got_f = fast.rope(x, dims, traditional=traditional, freqs=mx.array(periods), scale=scale, offset=got_off)
    want_f = rope_ref(q, dims, traditional=traditional, freqs=periods, scale=scale, offset=off)
    check(got_f, want_f, name, "fused", extra=angle_err)


def test_rope_offsets_agree():
    """Per-row offsets equal one call per row; an int offset equals the 0-d array offset."""
    r = rng_of(7)
    x = mx.array(r.standard_normal((3, 2, 5, 16)).astype(np.float32))
    offs = np.array([0, 17, 256], np.int32)
    together = fast.rope(x, 16, base=10000.0, offset=mx.array(offs)).numpy()
    for i, o in enumerate(offs):
        alone = fast.rope(x[i:i + 1], 16, base=10000.0, offset=int(o)).numpy()
        np.testing.assert_allclose(together[i:i + 1], alone, rtol=1e-6, atol=1e-6)
        as_array = fast.rope(x[i:i + 1], 16, base=10000.0, offset=mx.array(np.int32(o))).numpy()
        np.testing.assert_allclose(as_array, alone, rtol=1e-6, atol=1e-6)
    with pytest.raises(amlx.MLXError):
        fast.rope(x, 16, base=10000.0, offset=mx.array(offs.reshape(3, 1)))  # at most one dimension
    with pytest.raises(ValueError):
        fast.rope(x, 16)  # neither base nor freqs
    with pytest.raises(ValueError):
        fast.rope(x, 16, base=1.0, freqs=mx.array(np.ones(8, np.float32)))


# ---------------------------------------------------------------------------
# fast: scaled_dot_product_attention

def sdpa_ref(q, k, v, scale, mask=None):
    H, Hk = q.shape[1], k.shape[1]
    k = np.repeat(k, H // Hk, axis=1)  # grouped-query: query head h reads kv head h // (H / Hk)
    v = np.repeat(v, H // Hk, axis=1)
    s = q @ np.swapaxes(k, -1, -2) * scale
    Lq, Lk = s.shape[-2:]
    if isinstance(mask, str):
        # causal, aligned to the end: query i sits at position Lk - Lq + i
        keep = np.arange(Lq)[:, None] + (Lk - Lq) >= np.arange(Lk)[None, :]
        s = np.where(keep, s, -np.inf)
    elif mask is not None and mask.dtype == np.bool_:
        s = np.where(mask, s, -np.inf)
    elif mask is not None:
        s = s + mask
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return p @ v


@covers("scaled_dot_product_attention")
@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
@SETTINGS
@given(seed=seeds, B=st.integers(1, 2), Hk=st.sampled_from([1, 2]), rep=st.sampled_from([1, 2, 4]),
       Lq=st.integers(1, 6), extra=st.integers(0, 6), D=st.sampled_from([8, 32, 64]),
       mask_shape=st.sampled_from(["full", "row", "2d"]))
def test_sdpa(name, mask_kind, seed, B, Hk, rep, Lq, extra, D, mask_shape):
    r = rng_of(seed)
    H, Lk = Hk * rep, Lq + extra
    qq, q = make(r.standard_normal((B, H, Lq, D)), name)
    qk, k = make(r.standard_normal((B, Hk, Lk, D)), name)
    qv, v = make(r.standard_normal((B, Hk, Lk, D)), name)
    scale = 1.0 / math.sqrt(D)
    mshape = {"full": (B, H, Lq, Lk), "row": (1, 1, 1, Lk), "2d": (Lq, Lk)}[mask_shape]
    if mask_kind == "none":
        mask, ref_mask = None, None
    elif mask_kind == "causal":
        mask, ref_mask = "causal", "causal"
    elif mask_kind == "bool":
        ref_mask = r.random(mshape) < 0.7
        ref_mask[..., 0] = True  # every query keeps at least one key (an all-masked row is undefined)
        mask = mx.array(ref_mask)
    else:
        m = np.where(r.random(mshape) < 0.3, -1e4, r.uniform(-2, 2, mshape))
        m[..., 0] = r.uniform(-2, 2, m[..., 0].shape)  # not every key pushed away (that row would be
        qm, mask = make(m, name)                        # softmax of score - 1e4: precision lost at 1e4)
        ref_mask = qm
    got = fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    want = sdpa_ref(qq, qk, qv, scale, ref_mask)
    assert got.shape == (B, H, Lq, D)
    # the output is a convex combination of rows of v: error ~ a few ulp of max|v|
    check(got, want, name, "fused", 2 * np.abs(qv).max())


def test_sdpa_causal_is_aligned_to_the_end():
    """With Lq < Lk (decoding over a cache) the last query sees every key."""
    r = rng_of(3)
    q = r.standard_normal((1, 1, 2, 8)).astype(np.float32)
    k = r.standard_normal((1, 1, 5, 8)).astype(np.float32)
    v = np.eye(5, 8, dtype=np.float32)[None, None]  # output row = attention weights
    out = fast.scaled_dot_product_attention(mx.array(q), mx.array(k), mx.array(v), scale=1.0, mask="causal")
    w = out.numpy()[0, 0, :, :5]
    assert np.all(w[0, 4] == 0) and np.all(w[0, :4] > 0)  # query 0 is at position 3: keys 0..3
    assert np.all(w[1] > 0)  # query 1 is at position 4: all keys
    with pytest.raises(ValueError):
        fast.scaled_dot_product_attention(mx.array(q), mx.array(k), mx.array(k), scale=1.0, mask="sliding")


# ---------------------------------------------------------------------------
# random

def test_random_keys_are_deterministic():
    k = R.key(42)
    assert k.dtype is mx.uint32 and k.shape == (2,)
    for fn in (lambda key: R.uniform(shape=(64,), key=key), lambda key: R.normal((64,), key=key),
               lambda key: R.randint(0, 1000, (64,), key=key), lambda key: R.gumbel((64,), key=key),
               lambda key: R.categorical(mx.array(np.zeros(10, np.float32)), num_samples=64, key=key)):
        a, b = fn(R.key(42)).numpy(), fn(R.key(42)).numpy()
        np.testing.assert_array_equal(a, b)  # same key, same numbers
        c = fn(R.key(43)).numpy()
        assert not np.array_equal(a, c)
    ks = R.split(k, 3)
    assert ks.shape == (3, 2) and ks.dtype is mx.uint32
    rows = ks.numpy()
    assert len({tuple(r) for r in rows.tolist()} | {tuple(k.tolist())}) == 4  # all distinct
    draws = [R.uniform(shape=(32,), key=ks[i]).numpy() for i in range(3)]
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])
    np.testing.assert_array_equal(R.split(k, 3).numpy(), rows)  # splitting is deterministic too
    # the global key: seed() makes the sequence reproducible
    R.seed(7)
    s1 = [R.uniform(shape=(8,)).numpy() for _ in range(2)]
    R.seed(7)
    s2 = [R.uniform(shape=(8,)).numpy() for _ in range(2)]
    np.testing.assert_array_equal(np.stack(s1), np.stack(s2))
    assert not np.array_equal(s1[0], s1[1])


@pytest.mark.parametrize("name", FLOATS)
def test_random_ranges_and_moments(name):
    d = MDT[name]
    u = R.uniform(-2.0, 3.0, (20000,), d, key=R.key(1))
    assert u.dtype is d
    x = u.numpy().astype(np.float64)
    assert x.min() >= -2.0 and x.max() <= 3.0  # bounds: [low, high) before rounding to the dtype
    assert abs(x.mean() - 0.5) < 0.05 and abs(x.std() - 5 / math.sqrt(12)) < 0.05
    lo = mx.array(np.array([0.0, 10.0], np.float32), d)
    v = R.uniform(lo, lo + 1.0, (5000, 2), d, key=R.key(2)).numpy()  # array bounds broadcast
    assert v[:, 0].min() >= 0 and v[:, 0].max() <= 1 and v[:, 1].min() >= 10 and v[:, 1].max() <= 11
    n = R.normal((20000,), d, loc=1.0, scale=2.0, key=R.key(3)).numpy().astype(np.float64)
    assert abs(n.mean() - 1.0) < 0.06 and abs(n.std() - 2.0) < 0.06
    g = R.gumbel((20000,), d, key=R.key(4)).numpy().astype(np.float64)
    assert abs(g.mean() - 0.5772) < 0.05  # Euler-Mascheroni
    i = R.randint(-3, 5, (20000,), key=R.key(5))
    assert i.dtype is mx.int32
    iv = i.numpy()
    assert iv.min() == -3 and iv.max() == 4  # [low, high)
    assert R.randint(0, 10, (3,), mx.int64, key=R.key(5)).dtype is mx.int64


def test_categorical_matches_softmax():
    """Chi-square goodness of fit, fixed key: deterministic, with a loose bound."""
    logits = np.array([0.5, -1.0, 2.0, 0.0, 1.0, -3.0], np.float32)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    n = 40000
    s = R.categorical(mx.array(logits), num_samples=n, key=R.key(11))
    assert s.shape == (n,) and s.dtype is mx.uint32
    counts = np.bincount(s.numpy(), minlength=len(p))
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 35.9, (chi2, counts, n * p)  # P(chi2_5 > 35.9) ~ 1e-6
    # batched logits, one sample per row along the last axis, and along axis 0
    two = mx.array(np.array([[0.0, -np.inf, 0.0], [-np.inf, -np.inf, 5.0]], np.float32))
    rows = R.categorical(two, num_samples=500, key=R.key(12)).numpy()
    assert rows.shape == (2, 500)
    assert set(rows[0].tolist()) == {0, 2} and set(rows[1].tolist()) == {2}  # -inf is never drawn
    one = R.categorical(two, key=R.key(13))
    assert one.shape == (2,)
    col = R.categorical(mx.array(np.array([[-np.inf, 0.0], [0.0, -np.inf]], np.float32)), axis=0,
                        key=R.key(14)).numpy()
    assert col.tolist() == [1, 0]


# ---------------------------------------------------------------------------
# evaluation and errors

@covers("eval", "async_eval")
def test_eval_and_async_eval():
    a = mx.array(np.arange(4, dtype=np.float32))
    b, c = a * 2, O.exp(a)
    mx.eval(b, [c], {"x": a + 1}, None)
    exact(b, np.arange(4, dtype=np.float32) * 2)
    d = O.sum(a)
    mx.async_eval(d)
    assert d.item() == 6.0
    O.eval([b, c])
    O.async_eval(a)
    with pytest.raises(TypeError):
        mx.eval(3)


@covers("graph_summary")
def test_graph_summary_counts_pending_nodes():
    a = mx.array(np.ones((2, 3), np.float32))
    b = O.exp(a * 2.0)
    c = b + O.sum(b)
    total, kinds = O.graph_summary(c)
    assert total == sum(kinds.values()) >= 3
    assert kinds.get("Exp") == 1 and kinds.get("Sum") == 1
    O.eval(c)
    assert O.graph_summary(c) == (0, {})
    assert O.graph_summary(a) == (0, {})


def test_errors_name_the_op():
    a = mx.array(np.ones((2, 3), np.float32))
    with pytest.raises(amlx.MLXError, match="add"):
        O.add(a, mx.array(np.ones((4,), np.float32)))
    with pytest.raises(amlx.MLXError, match="reshape"):
        O.reshape(a, (5,))
    a.close()
    with pytest.raises(ValueError, match="closed"):
        O.exp(a)


@covers("buffer_view")
@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_buffer_view_reads_the_arrays_buffer(shape, seed):
    x = mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    O.eval(x)
    view = O.buffer_view(x)
    assert view is not None and view.shape == x.shape and view.dtype == x.dtype
    np.testing.assert_array_equal(view.numpy(), x.numpy())


def test_buffer_view_is_none_without_a_whole_computed_buffer():
    x = O.arange(24, dtype=mx.float32)
    assert O.buffer_view(x) is None  # not yet computed
    O.eval(x)
    assert O.buffer_view(x) is not None
    part = O.slice(O.reshape(x, (4, 6)), (1, 0), (3, 6))
    O.eval(part)
    assert O.buffer_view(part) is None  # a slice: its data starts inside another buffer
    t = O.transpose(O.reshape(x, (4, 6)))
    O.eval(t)
    assert O.buffer_view(t) is None  # strided


@covers("buffer_views")
def test_buffer_views_are_all_or_none():
    xs = [mx.array(np.full((2, 3), i, np.float32)) for i in range(5)]
    O.eval(*xs)
    views = O.buffer_views(xs)
    assert len(views) == 5 and all(np.array_equal(v.numpy(), x.numpy()) for v, x in zip(views, xs))
    for v in views[:-1]:
        v.close()
    np.testing.assert_array_equal(views[-1].numpy(), xs[-1].numpy())
    assert O.buffer_views(xs[:2] + [O.arange(3, dtype=mx.float32)] + xs[2:]) is None  # one not computed
    assert O.buffer_views([]) == []


def test_every_op_is_covered():
    public = {n for n in O.__all__ if not n.startswith("_")} - NOT_OPS
    missing = public - COVERED
    assert not missing, f"ops without a test here: {sorted(missing)}"
    fast_ops = {"rms_norm", "layer_norm", "rope", "scaled_dot_product_attention"}
    assert fast_ops <= COVERED


def test_is_ready_says_whether_a_launched_value_is_computed():
    """Array.is_ready never waits nor launches: a lazy result is not ready, a launched one is
    once computed (ops.eval waits for it), a constant always is."""
    from amlx._mlx import array, ops

    a = array(np.arange(6, dtype=np.float32))
    assert a.is_ready()
    b = ops.add(a, a)
    assert not b.is_ready() and not b.is_ready()  # (asking does not launch it)
    ops.async_eval(b)
    ops.eval(b)
    assert b.is_ready()
    np.testing.assert_array_equal(b.numpy(), 2 * np.arange(6, dtype=np.float32))
