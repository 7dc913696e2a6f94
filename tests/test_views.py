"""Read-back of arrays and of non-contiguous views is exact, for every dtype.

MLX views (transpose, broadcast, slices, strided views of views) share their
parent's buffer with arbitrary strides and offsets; `Array.numpy()`, `.tolist()`
and `.item()` must give exactly what numpy gives for the same chain of views on
the same data, bit for bit. Construction from numpy arrays of every dtype and
from non-contiguous numpy arrays must be exact too.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amlx import _mlx as mx
from amlx._mlx import ops as O
from amlx._mlx.dtypes import bf16_bits_to_f32, f32_to_bf16_bits

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# name -> numpy dtype of the data handed to mx.array (bfloat16 travels as float32).
DTYPES = {
    "bool": np.bool_, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "float16": np.float16, "float32": np.float32, "bfloat16": np.float32, "complex64": np.complex64,
}


def make_data(name: str, shape, rng: np.random.Generator) -> np.ndarray:
    """Random data covering the whole range of the dtype, with float specials.

    For bfloat16 the float32 data is already rounded to bfloat16, so it is
    exactly what the MLX array holds."""
    np_dt = np.dtype(DTYPES[name])
    n = int(np.prod(shape))
    if name == "bool":
        x = rng.integers(0, 2, n).astype(np.bool_)
    elif np_dt.kind in "iu":
        info = np.iinfo(np_dt)
        x = rng.integers(info.min, info.max, n, dtype=np_dt, endpoint=True)
    else:
        real = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)
        specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 65504.0])
        pick = rng.random(n) < 0.15
        real = np.where(pick, specials[rng.integers(0, len(specials), n)], real)
        if name == "complex64":
            x = (real + 1j * rng.standard_normal(n)).astype(np.complex64)
        else:
            x = real.astype(np_dt)
        if name == "bfloat16":
            x = bf16_bits_to_f32(f32_to_bf16_bits(x))
    return x.reshape(shape)


def make(name: str, data: np.ndarray) -> mx.Array:
    return mx.array(data, getattr(mx, name if name != "bool" else "bool_"))


def assert_exact(got: np.ndarray, want: np.ndarray) -> None:
    """Same shape, same dtype, same bits (NaNs included)."""
    want = np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if want.dtype.kind in "fc":
        u = {2: np.uint16, 4: np.uint32, 8: np.uint64}[want.dtype.itemsize]
        if want.dtype.kind == "c":
            got, want = np.stack([got.real, got.imag]), np.stack([want.real, want.imag])
            u = np.uint32
        got_b = np.asarray(got, order="C").view(u)
        want_b = np.asarray(want, order="C").view(u)
        assert np.array_equal(got_b, want_b), f"\ngot  {got}\nwant {want}"
    else:
        assert np.array_equal(got, want), f"\ngot  {got}\nwant {want}"


def read(a: mx.Array) -> np.ndarray:
    return a.numpy()


# -- random chains of views -----------------------------------------------

MAX_ELEMS = 2000


@st.composite
def view_step(draw, shape):
    """One view operation valid for `shape`, as (description, numpy fn, mlx fn)."""
    nd = len(shape)
    kinds = ["transpose", "broadcast", "expand", "steps"]
    if nd >= 2:
        kinds += ["swapaxes", "static_slice"]
    if nd >= 1:
        kinds += ["static_slice", "int_index", "index_array", "neg_steps", "split", "none_ellipsis"]
    if any(s == 1 for s in shape):
        kinds.append("squeeze")
    kind = draw(st.sampled_from(kinds))
    if kind == "transpose":
        perm = draw(st.permutations(range(nd)))
        return kind, (lambda x: np.transpose(x, perm)), (lambda a: O.transpose(a, perm))
    if kind == "swapaxes":
        i, j = draw(st.integers(0, nd - 1)), draw(st.integers(0, nd - 1))
        return kind, (lambda x: np.swapaxes(x, i, j)), (lambda a: O.swapaxes(a, i, j))
    if kind == "broadcast":
        # A new size-1 axis (or an existing one) broadcast to k, and maybe a leading axis.
        ax = draw(st.integers(0, nd))
        k = draw(st.integers(1, 3))
        lead = draw(st.lists(st.integers(1, 2), max_size=1))
        new = tuple(lead) + shape[:ax] + (k,) + shape[ax:]
        if int(np.prod(new)) > MAX_ELEMS:
            new = shape[:ax] + (1,) + shape[ax:]
        return (kind, (lambda x: np.broadcast_to(np.expand_dims(x, ax), new)),
                (lambda a: O.broadcast_to(O.expand_dims(a, ax), new)))
    if kind == "expand":
        ax = draw(st.integers(-(nd + 1), nd))
        return kind, (lambda x: np.expand_dims(x, ax)), (lambda a: O.expand_dims(a, ax))
    if kind == "squeeze":
        ax = draw(st.sampled_from([i for i, s in enumerate(shape) if s == 1]))
        return kind, (lambda x: np.squeeze(x, ax)), (lambda a: O.squeeze(a, ax))
    if kind in ("steps", "neg_steps"):
        steps = [-3, -2, -1, 1, 2, 3] if kind == "neg_steps" else [1, 2, 3]
        idx = []
        for n in shape:
            start = draw(st.none() | st.integers(-n - 1, n + 1))
            stop = draw(st.none() | st.integers(-n - 1, n + 1))
            idx.append(slice(start, stop, draw(st.sampled_from(steps))))
        idx = tuple(idx)
        return f"{kind}{idx}", (lambda x: x[idx]), (lambda a: a[idx])
    if kind == "static_slice":
        starts, stops, strides = [], [], []
        for n in shape:
            a = draw(st.integers(0, n))
            b = draw(st.integers(a, n))
            starts.append(a), stops.append(b), strides.append(draw(st.integers(1, 3)))
        sl = tuple(slice(a, b, c) for a, b, c in zip(starts, stops, strides))
        return f"slice{sl}", (lambda x: x[sl]), (lambda a: O.slice(a, starts, stops, strides))
    if kind == "none_ellipsis":
        return kind, (lambda x: x[None, ..., ::2]), (lambda a: a[None, ..., ::2])
    if kind == "int_index":
        ax = draw(st.integers(0, nd - 1))
        if shape[ax] == 0:
            return "noop", (lambda x: x), (lambda a: a)
        i = draw(st.integers(-shape[ax], shape[ax] - 1))
        idx = (slice(None),) * ax + (i,)
        return f"int{idx}", (lambda x: x[idx]), (lambda a: a[idx])
    if kind == "index_array":
        ax = draw(st.integers(0, nd - 1))
        n = shape[ax]
        if n == 0:
            return "noop", (lambda x: x), (lambda a: a)
        ids = draw(st.lists(st.integers(-n, n - 1), min_size=0, max_size=4))
        ids_np = np.array(ids, dtype=np.int32)
        if int(np.prod(shape)) // max(n, 1) * max(len(ids), 1) > MAX_ELEMS:
            ids_np = ids_np[:1]
        idx = (slice(None),) * ax + (mx.array(ids_np),)
        np_idx = (slice(None),) * ax + (ids_np,)
        return f"array{ax}{ids}", (lambda x: x[np_idx]), (lambda a: a[idx])
    if kind == "split":
        ax = draw(st.integers(0, nd - 1))
        n = shape[ax]
        cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
        piece = draw(st.integers(0, len(cuts)))
        return (f"split{ax}{cuts}[{piece}]", (lambda x: np.split(x, cuts, axis=ax)[piece]),
                (lambda a: O.split(a, cuts, axis=ax)[piece]))
    raise AssertionError(kind)


@pytest.mark.parametrize("name", list(DTYPES))
@SETTINGS
@given(shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_view_chains_read_back_exactly(name, shape, seed, data):
    x = make_data(name, shape, np.random.default_rng(seed))
    a = make(name, x)
    assert_exact(read(a), x)
    steps = []
    for _ in range(data.draw(st.integers(1, 4), label="n_steps")):
        desc, f_np, f_mx = data.draw(view_step(x.shape), label="step")
        steps.append(desc)
        x, a = f_np(x), f_mx(a)
        assert a.shape == x.shape, steps
        # Every intermediate view reads back exactly, not only the last one.
        assert_exact(read(a), x)
    # ... also when computed on afterwards (a view as an op input).
    if name not in ("bool", "complex64") and x.size:
        assert_exact(read(O.contiguous(a)), x)
    assert a.tolist() == x.tolist() or _nan_equal_lists(a.tolist(), x.tolist())


def _nan_equal_lists(a, b) -> bool:
    return np.array_equal(np.array(a, dtype=object).astype(complex), np.array(b, dtype=object).astype(complex),
                          equal_nan=True)


# -- fixed views that matter -----------------------------------------------

@pytest.mark.parametrize("name", list(DTYPES))
def test_named_views(name):
    rng = np.random.default_rng(1)
    x = make_data(name, (3, 4, 5), rng)
    a = make(name, x)
    cases = {
        "T": (x.T, a.T),
        "transpose(1,0,2)": (x.transpose(1, 0, 2), O.transpose(a, (1, 0, 2))),
        "swapaxes(0,2)": (np.swapaxes(x, 0, 2), O.swapaxes(a, 0, 2)),
        "broadcast": (np.broadcast_to(x[:, None], (3, 2, 4, 5)), O.broadcast_to(O.expand_dims(a, 1), (3, 2, 4, 5))),
        "broadcast scalar": (np.broadcast_to(x[1, 2, 3], (2, 3)), O.broadcast_to(a[1, 2, 3], (2, 3))),
        "steps": (x[::2, 1::2, ::3], a[::2, 1::2, ::3]),
        "negative steps": (x[::-1, ::-2, 3:0:-2], a[::-1, ::-2, 3:0:-2]),
        "view of view": (x.T[::2][:, ::-1][1], a.T[::2][:, ::-1][1]),
        "None ... ::2": (x[None, ..., ::2], a[None, ..., ::2]),
        "int index": (x[1], a[1]),
        "int index mid": (x[:, -1], a[:, -1]),
        "int index of transposed": (x.T[2, 1], a.T[2, 1]),
        "index array": (x[:, [3, 0, 3, -1]], a[:, mx.array(np.array([3, 0, 3, -1], np.int32))]),
        "index array 2d": (x[np.array([[0, 2], [1, 1]])], a[mx.array(np.array([[0, 2], [1, 1]], np.int32))]),
        "index array of transposed": (x.T[[4, 0]], a.T[mx.array(np.array([4, 0], np.int32))]),
        "slice past the end": (x[1:100, -100:2], a[1:100, -100:2]),
        "empty slice": (x[2:1], a[2:1]),
        "empty negative slice": (x[1:2:-1], a[1:2:-1]),
        "ellipsis int": (x[..., 0], a[..., 0]),
    }
    for label, (want, view) in cases.items():
        assert view.shape == want.shape, label
        assert_exact(read(view), want)


def test_advanced_indexing_follows_numpy():
    """Index arrays mixed with ints and slices place their axes as numpy does."""
    x = np.arange(2 * 3 * 4 * 5, dtype=np.int32).reshape(2, 3, 4, 5)
    a = mx.array(x)
    i = np.array([2, 0, 1], np.int32)
    j = np.array([[1], [-1]], np.int32)
    k = np.array([1, -2, 1], np.int32)
    ai, aj, ak = mx.array(i), mx.array(j), mx.array(k)
    cases = [
        ((0, slice(None), i), (0, slice(None), ai)),           # int and array split by a slice: array dims first
        ((slice(None), 1, slice(None), j), (slice(None), 1, slice(None), aj)),
        ((slice(None), i, 1), (slice(None), ai, 1)),           # adjacent: in place
        ((k, slice(None), i), (ak, slice(None), ai)),          # two arrays broadcast together, not outer
        ((k[:, None], slice(None), i, -1), (ak[:, None], slice(None), ai, -1)),
        ((1, i, j), (1, ai, aj)),                              # int + arrays, adjacent
        ((Ellipsis, k, 2), (Ellipsis, ak, 2)),
        ((slice(None), i[:2], j), (slice(None), ai[:2], aj)),  # adjacent arrays broadcast in place
        ((Ellipsis, j), (Ellipsis, aj)),
        ((None, k, None), (None, ak, None)),
        ((k, None, 0), (ak, None, 0)),                          # None between advanced indices
        ((1, slice(None), k[0]), (1, slice(None), ak[0])),    # 0-d index arrays
    ]
    for np_idx, mx_idx in cases:
        want = x[np_idx]
        got = a[mx_idx]
        assert got.shape == want.shape, np_idx
        assert_exact(read(got), want)


@SETTINGS
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5), data=st.data())
def test_random_indexing_matches_numpy(shape, data):
    """Random mixes of slices (any step), ints, index arrays, None and Ellipsis."""
    x = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    a = mx.array(x)
    m, p = data.draw(st.integers(1, 3), label="m"), data.draw(st.integers(1, 2), label="p")
    np_idx, mx_idx = [], []
    for n in shape:
        if data.draw(st.booleans(), label="new axis"):
            np_idx.append(None), mx_idx.append(None)
        kind = data.draw(st.sampled_from(["slice", "int", "array"]), label="kind")
        if kind == "slice":
            sl = slice(data.draw(st.none() | st.integers(-n - 1, n + 1)), data.draw(st.none() | st.integers(-n - 1, n + 1)),
                       data.draw(st.sampled_from([None, 1, 2, -1, -2])))
            np_idx.append(sl), mx_idx.append(sl)
        elif kind == "int":
            i = data.draw(st.integers(-n, n - 1))
            np_idx.append(i), mx_idx.append(i)
        else:
            ishape = data.draw(st.sampled_from([(), (m,), (1, m), (p, 1)]), label="index shape")
            ids = np.array(data.draw(st.lists(st.integers(-n, n - 1), min_size=int(np.prod(ishape)),
                                              max_size=int(np.prod(ishape)))), np.int32).reshape(ishape)
            # numpy treats a 0-d integer array like a plain int (a basic index); MLX arrays are always advanced.
            np_idx.append(ids if ishape else ids[None]), mx_idx.append(mx.array(ids) if ishape else mx.array(ids[None]))
    if data.draw(st.booleans(), label="ellipsis") and len(np_idx) > 0:
        cut = data.draw(st.integers(0, len(np_idx) - 1), label="cut")
        np_idx[cut] = mx_idx[cut] = Ellipsis
    want = x[tuple(np_idx)]
    got = a[tuple(mx_idx)]
    assert got.shape == want.shape, np_idx
    assert_exact(read(got), want)


def test_index_errors():
    a = mx.array(np.zeros((2, 3), np.float32))
    with pytest.raises(IndexError):
        a[2]
    with pytest.raises(IndexError):
        a[0, 0, 0]
    with pytest.raises(IndexError):
        a[..., ...]
    with pytest.raises(IndexError):
        a[1.5]


# -- tolist / item -----------------------------------------------------------

@pytest.mark.parametrize("name", list(DTYPES))
def test_tolist_and_item(name):
    rng = np.random.default_rng(2)
    x = make_data(name, (2, 3), rng)
    a = make(name, x)
    want_type = {"b": bool, "i": int, "u": int, "f": float, "c": complex}[x.dtype.kind]
    got = a.T.tolist()
    assert _nan_equal_lists(got, x.T.tolist())
    assert all(type(v) is want_type for row in got for v in row)
    for idx in [(0, 0), (1, 2), (-1, -2)]:
        v = a[idx].item()
        assert type(v) is want_type
        assert _nan_equal_lists([v], [x[idx].item()])
        # item() of a one-element view that is not 0-d
        w = a[idx[0]:idx[0] + 1 if idx[0] != -1 else None, idx[1]:idx[1] + 1 if idx[1] != -1 else None].item()
        assert _nan_equal_lists([w], [x[idx].item()])
    with pytest.raises(ValueError):
        a.item()
    # conversions that go through item()
    if want_type in (int, float):
        assert float(a[0, 0]) == float(x[0, 0]) or np.isnan(x[0, 0])


def test_scalar_conversions():
    assert int(mx.array(np.int64(-7))) == -7
    assert float(mx.array(2.5, mx.bfloat16)) == 2.5
    assert bool(mx.array(np.array([0.0], np.float32))) is False
    assert [10, 20, 30][mx.array(np.int32(1))] == 20
    with pytest.raises(TypeError):
        [1, 2][mx.array(1.0)]
    assert mx.array(np.uint64(2**64 - 1)).item() == 2**64 - 1
    assert mx.array(np.int64(-(2**63))).item() == -(2**63)


# -- construction ------------------------------------------------------------

@pytest.mark.parametrize("name", list(DTYPES))
@SETTINGS
@given(shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4), seed=st.integers(0, 2**32 - 1))
def test_construction_from_numpy(name, shape, seed):
    x = make_data(name, shape, np.random.default_rng(seed))
    if name != "bfloat16":
        a = mx.array(x)  # the dtype comes from numpy
        assert a.dtype is getattr(mx, name if name != "bool" else "bool_")
    else:
        a = mx.array(x, mx.bfloat16)
    assert a.shape == x.shape
    assert_exact(read(a), x)


def test_construction_infers_dtypes():
    assert mx.array(np.zeros(2, np.float64)).dtype is mx.float32  # float64 data becomes float32 ...
    assert mx.array(np.zeros(2, np.float64), mx.float64).dtype is mx.float64  # ... unless asked for by name
    assert mx.array(1.5).dtype is mx.float32
    assert mx.array(3).dtype is mx.int32
    assert mx.array(True).dtype is mx.bool_
    assert mx.array(np.float16(1)).dtype is mx.float16
    assert mx.array([1.0, 2.0]).dtype is mx.float32
    assert mx.array([True, False]).dtype is mx.bool_
    with pytest.raises(TypeError):
        mx.array(np.array(["a"]))
    with pytest.raises(TypeError):
        mx.array(np.zeros(2, np.complex128))


@pytest.mark.parametrize("name", ["uint8", "int16", "int64", "float16", "float32", "bfloat16", "complex64", "bool"])
def test_construction_from_non_contiguous_numpy(name):
    rng = np.random.default_rng(3)
    base = make_data(name, (4, 5, 6), rng)
    mdt = getattr(mx, name if name != "bool" else "bool_")
    views = {
        "transposed": base.transpose(2, 0, 1),
        "negative strides": base[::-1, :, ::-2],
        "steps": base[1::2, ::3],
        "fortran": np.asfortranarray(base),
        "broadcast (0 strides)": np.broadcast_to(base[:1, :1], (3, 4, 5, 6)),
        "int index": base[:, 2],
        "0-d view": base[1, 2, 3, ...],
    }
    for label, v in views.items():
        a = mx.array(v, mdt)
        assert a.shape == v.shape, label
        assert_exact(read(a), v)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_construction_with_conversion():
    x = np.array([[1.7, -2.5], [3.25, 1e6]], np.float64)
    assert_exact(read(mx.array(x, mx.float16)), x.astype(np.float16))
    assert_exact(read(mx.array(x, mx.int32)), x.astype(np.int32))
    assert_exact(read(mx.array(x.T, mx.bfloat16)), bf16_bits_to_f32(f32_to_bf16_bits(x.T.astype(np.float32))))
    bits = np.array([[0x3F80, 0xC000], [0x7F80, 0x0001]], np.uint16)
    b = mx.from_bits(bits, mx.bfloat16)
    assert b.dtype is mx.bfloat16
    assert_exact(read(b.T), bf16_bits_to_f32(bits).T)
    assert_exact(read(O.view(b.T, mx.uint16)), np.ascontiguousarray(bits.T))


# -- 0-d and empty -----------------------------------------------------------

@pytest.mark.parametrize("name", list(DTYPES))
def test_zero_d(name):
    x = make_data(name, (), np.random.default_rng(4))
    mdt = getattr(mx, name if name != "bool" else "bool_")
    for value in (x, x[()]):  # a 0-d ndarray and a numpy scalar
        a = mx.array(value, mdt)
        assert a.shape == () and a.ndim == 0 and a.size == 1
        assert_exact(read(a), x)
        assert _nan_equal_lists([a.item()], [x.item()])
        assert _nan_equal_lists([a.tolist()], [x.tolist()])
        assert a[None].shape == (1,) and a[...].shape == ()
        assert_exact(read(O.broadcast_to(a, (2, 3))), np.broadcast_to(x, (2, 3)))
    with pytest.raises(TypeError):
        len(mx.array(np.float32(1)))
    if name == "bfloat16":
        assert mx.from_bits(np.array(0x3F80, np.uint16), mx.bfloat16).shape == ()


@pytest.mark.parametrize("name", list(DTYPES))
def test_empty(name):
    mdt = getattr(mx, name if name != "bool" else "bool_")
    for shape in [(0,), (0, 3), (3, 0), (2, 0, 4)]:
        x = make_data(name, shape, np.random.default_rng(5))
        a = mx.array(x, mdt)
        assert a.shape == shape and a.size == 0 and a.nbytes == 0
        assert_exact(read(a), x)
        assert a.tolist() == x.tolist()
        assert_exact(read(a.T), x.T)
        assert_exact(read(a[..., ::-1]), x[..., ::-1])
        assert_exact(read(O.broadcast_to(a[None], (2,) + shape)), np.broadcast_to(x[None], (2,) + shape))
    z = mx.array(make_data(name, (3, 4), np.random.default_rng(6)), mdt)
    assert read(z[1:1]).shape == (0, 4)
    assert read(z[:, 4:]).shape == (3, 0)
    assert read(z[mx.array(np.zeros(0, np.int32))]).shape == (0, 4)
    with pytest.raises(ValueError):
        mx.array(np.zeros(0, np.float32)).item()
