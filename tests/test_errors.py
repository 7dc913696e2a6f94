"""MLX failures surface as `amlx.MLXError` and the process goes on.

Every C++ exception inside MLX becomes a non-zero status at the C ABI and an
MLXError in Python carrying the operation's name and MLX's own message. After
each failure a normal computation must still give the right answer: no state is
left broken (thread-local error text, memory limit, compile cache, pending
callback exceptions).
"""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest

import amlx
from amlx import _mlx as mx
from amlx._mlx import ops as O
from amlx._mlx import transforms as T
from amlx.errors import MLXError


def still_works():
    """A normal computation after a failure gives the right answer."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5)
    got = O.softmax(mx.array(a) @ mx.array(b), -1).sum(-1).numpy()
    np.testing.assert_allclose(got, np.ones(3), rtol=1e-5)


@pytest.fixture
def x23():
    return mx.array(np.arange(6, dtype=np.float32).reshape(2, 3))


def raises_mlx(fn, op: str, *fragments: str) -> MLXError:
    with pytest.raises(MLXError) as info:
        r = fn()
        mx.eval(r)  # errors found only at evaluation count too
    err = info.value
    assert isinstance(err, amlx.AmlxError)
    assert err.op == op, (err.op, str(err))
    for f in fragments:
        assert f.lower() in str(err).lower(), (f, str(err))
    assert str(err).startswith(f"{op}: ")
    assert err.mlx_message and err.mlx_message in str(err)
    still_works()
    return err


# -- shape and axis errors --------------------------------------------------------

def test_matmul_mismatch(x23):
    y = mx.array(np.ones((4, 5), np.float32))
    raises_mlx(lambda: x23 @ y, "matmul", "[matmul]", "(2,3)", "(4,5)")
    raises_mlx(lambda: O.matmul(x23, y), "matmul", "[matmul]")


def test_bad_reshape(x23):
    raises_mlx(lambda: x23.reshape(7), "reshape", "[reshape]", "size 6")
    raises_mlx(lambda: O.reshape(x23, (4, -1)), "reshape", "[reshape]")


@pytest.mark.parametrize("op", ["sum", "mean", "max", "min", "prod", "logsumexp", "var", "all", "any"])
def test_bad_axis_reductions(x23, op):
    raises_mlx(lambda: getattr(O, op)(x23, 2), op, "axis")
    raises_mlx(lambda: getattr(O, op)(x23, -3), op, "axis")


def test_bad_axis_softmax_transpose_squeeze_concatenate(x23):
    raises_mlx(lambda: O.softmax(x23, 5), "softmax", "axis")
    raises_mlx(lambda: x23.transpose(0, 0), "transpose", "[transpose]")
    raises_mlx(lambda: x23.transpose(0, 1, 2), "transpose", "[transpose]")
    raises_mlx(lambda: O.squeeze(x23, 0), "squeeze", "[squeeze]", "axis 0")
    raises_mlx(lambda: O.squeeze(x23, 4), "squeeze", "[squeeze]")
    y = mx.array(np.ones((3, 3), np.float32))
    raises_mlx(lambda: O.concatenate([x23, y], 1), "concatenate", "[concatenate]", "(2,3)", "(3,3)")
    raises_mlx(lambda: O.concatenate([x23, x23], 2), "concatenate", "[concatenate]")
    raises_mlx(lambda: O.argmax(x23, 3), "argmax", "axis")
    raises_mlx(lambda: O.swapaxes(x23, 0, 2), "swapaxes", "[swapaxes]")


def test_broadcast_and_elementwise_shape_errors(x23):
    z = mx.array(np.ones((4,), np.float32))
    raises_mlx(lambda: x23 + z, "add", "broadcast")
    raises_mlx(lambda: O.maximum(x23, z), "maximum", "broadcast")
    raises_mlx(lambda: O.broadcast_to(x23, (3, 3)), "broadcast_to", "broadcast")


def test_bad_dtype_code(x23):
    # A dtype code MLX does not know reaches C only through a forged Dtype:
    # the C layer refuses it with its own message.
    bogus = mx.Dtype("bogus", 99, 4, np.float32, "f")
    raises_mlx(lambda: O.astype(x23, bogus), "astype", "unknown dtype code 99")
    raises_mlx(lambda: O.full((2,), mx.array(1.0), bogus), "full", "unknown dtype code 99")
    raises_mlx(lambda: mx.array(np.zeros(3, np.float32), bogus), "array", "unknown dtype code 99")
    # Names that are no dtype are refused in Python before any C call.
    with pytest.raises(TypeError, match="unknown dtype"):
        O.astype(x23, "float8")
    still_works()


# -- memory limit -------------------------------------------------------------------

def test_memory_limit_exceeded():
    gc.collect()
    mx.memory.clear_cache()
    start = mx.memory.active()
    previous = mx.memory.set_memory_limit(1 << 20)  # 1 MiB
    try:
        assert mx.memory.get_memory_limit() == 1 << 20
        big = O.zeros((1024, 1024)) + 1.0  # 4 MiB once computed
        err = raises_mlx(lambda: big, "eval", "memory limit", str(1 << 20))
        assert "[eval]" in err.mlx_message
        # Reading back evaluates too, and fails the same way.
        with pytest.raises(MLXError, match="memory limit") as info:
            big.numpy()
        assert info.value.op == "numpy"
        # Small work still fits under the limit.
        assert O.ones((10, 10)).sum().item() == 100.0
        big.close()
    finally:
        mx.memory.set_memory_limit(previous)
    assert mx.memory.get_memory_limit() == previous
    # The same graph evaluates once the limit is restored.
    again = O.zeros((1024, 1024)) + 1.0
    assert again.sum().item() == 1024 * 1024
    again.close()
    assert mx.memory.active() == start


# -- corrupt and truncated safetensors ------------------------------------------

@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    mx.io.save_safetensors(path, {"w": mx.array(np.arange(100, dtype=np.float32)),
                                  "b": mx.array(np.arange(10, dtype=np.int32))}, {"format": "pt"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw, json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path, header, body: bytes) -> str:
    hb = json.dumps(header).encode()
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + body)
    return str(path)


def load_fails(path, *fragments: str) -> MLXError:
    with pytest.raises(MLXError) as info:
        arrays, _ = mx.io.load_safetensors(path)
        mx.eval(list(arrays.values()))
    err = info.value
    assert err.op == "load_safetensors"
    assert str(path) in str(err), str(err)
    for f in fragments:
        assert f in str(err), (f, str(err))
    still_works()
    return err


def test_good_file_loads(good_file, tmp_path):
    raw, _, _ = good_file
    path = tmp_path / "copy.safetensors"
    path.write_bytes(raw)
    arrays, meta = mx.io.load_safetensors(path)
    assert meta == {"format": "pt"}
    assert arrays["w"].numpy().tolist() == list(range(100))
    assert arrays["b"].numpy().tolist() == list(range(10))


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    load_fails(path, "header length")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    load_fails(empty, "too short")


def test_header_not_json(tmp_path, good_file):
    _, _, body = good_file
    path = tmp_path / "notjson.safetensors"
    junk = b"{this is not json at all}"
    path.write_bytes(len(junk).to_bytes(8, "little") + junk + body)
    load_fails(path, "corrupt header")
    path2 = tmp_path / "list.safetensors"
    write_st(path2, [1, 2, 3], body)
    load_fails(path2, "not a JSON object")


@pytest.mark.parametrize("case, fragment", [
    ("length", "offsets 0..300"),        # offsets that do not hold dtype x shape
    ("past_end", "truncated"),           # the right length but past the end of the data
    ("overlap", "overlaps"),             # two tensors on the same bytes
    ("negative", "offsets -40..360"),
    ("strings", "non-integer offsets"),
    ("floats", "non-integer offsets"),
    ("dtype", "malformed entry"),
    ("shape", "invalid shape"),
    ("missing", "malformed entry"),
    ("metadata", "__metadata__"),
])
def test_wrong_offsets_and_entries(tmp_path, good_file, case, fragment):
    _, header, body = good_file
    w = header["w"]
    if case == "length":
        w["data_offsets"] = [0, 300]
    elif case == "past_end":
        w["data_offsets"] = [400, 800]
    elif case == "overlap":
        w["data_offsets"] = [0, 400]
    elif case == "negative":
        w["data_offsets"] = [-40, 360]
    elif case == "strings":
        w["data_offsets"] = ["40", "440"]
    elif case == "floats":
        w["data_offsets"] = [40.0, 440.0]
    elif case == "dtype":
        w["dtype"] = "F99"
    elif case == "shape":
        w["shape"] = [-100]
    elif case == "missing":
        del w["data_offsets"]
    elif case == "metadata":
        header["__metadata__"] = {"format": 1}
    path = write_st(tmp_path / f"{case}.safetensors", header, body)
    err = load_fails(path, fragment)
    if case != "metadata":
        assert "'w'" in str(err)  # the tensor is named


def test_truncated_file(tmp_path, good_file):
    raw, _, _ = good_file
    for cut in (1, 100, len(raw) // 2):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(raw[:len(raw) - cut])
        err = load_fails(path)
        assert "truncated" in str(err)
        if cut <= 100:
            assert "'w'" in str(err)  # the last tensor lost its tail
    short = tmp_path / "short.safetensors"
    short.write_bytes(raw[:12])
    load_fails(short, "header length")


def test_missing_file(tmp_path):
    load_fails(tmp_path / "nope.safetensors", "No such file")


def test_unwritable_save(tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "x.safetensors"
    with pytest.raises(MLXError) as info:
        mx.io.save_safetensors(target, {"x": mx.array([1.0])})
    assert info.value.op == "save_safetensors"
    assert not os.path.exists(target)
    still_works()


# -- closed arrays -------------------------------------------------------------------

def test_closed_array_use_is_a_clear_error():
    a = mx.array(np.arange(4, dtype=np.float32))
    b = mx.array(np.ones(4, np.float32))
    a.close()
    a.close()  # idempotent
    assert repr(a) == "Array(<closed>)"
    uses = [lambda: a + 1.0, lambda: a + 1, lambda: a * b, lambda: b * a, lambda: 2.0 - a, lambda: -a,
            lambda: O.exp(a), lambda: O.add(b, a), lambda: a.sum(), lambda: a.numpy(), lambda: a.shape,
            lambda: a.dtype, lambda: a.reshape(2, 2), lambda: a[0], lambda: mx.eval(a), lambda: mx.eval([b, a]),
            lambda: O.concatenate([b, a]), lambda: O.where(b > 0, a, b), lambda: T.compile(lambda x: x)(a)]
    for use in uses:
        with pytest.raises(ValueError, match="array is closed"):
            use()
    assert (b + 1.0).tolist() == [2.0] * 4
    still_works()


def test_context_manager_closes_on_error():
    with pytest.raises(MLXError):
        with mx.array(np.ones((2, 3), np.float32)) as a:
            a @ a
    with pytest.raises(ValueError, match="closed"):
        a.numpy()
    still_works()


# -- exceptions inside transformed functions ---------------------------------------

class Boom(Exception):
    pass


def boom(*args):
    raise Boom("inside the function")


def check_propagates(call, op):
    with pytest.raises(MLXError) as info:
        call()
    err = info.value
    assert err.op == op
    assert isinstance(err.__cause__, Boom)
    assert "Boom" in str(err) and "inside the function" in str(err)
    return err


def test_exception_in_value_and_grad_propagates():
    x = mx.array(np.arange(4, dtype=np.float32))
    check_propagates(lambda: T.value_and_grad(boom)(x), "value_and_grad")
    check_propagates(lambda: T.grad(boom)(x), "value_and_grad")
    # A later call (and the pending-exception slot) is clean.
    v, g = T.value_and_grad(lambda x: (x * x).sum())(x)
    assert v.item() == 14.0 and g.tolist() == [0.0, 2.0, 4.0, 6.0]
    # A later *failure of MLX's own* carries no stale cause.
    err = raises_mlx(lambda: x @ mx.array(np.ones((3, 3), np.float32)), "matmul")
    assert err.__cause__ is None


def test_exception_in_vjp_propagates():
    x = mx.array(np.arange(4, dtype=np.float32))
    check_propagates(lambda: T.vjp(boom, [x], [x]), "vjp")
    outs, vjps = T.vjp(lambda x: x * 3.0, [x], [mx.array(np.ones(4, np.float32))])
    assert outs[0].tolist() == [0.0, 3.0, 6.0, 9.0] and vjps[0].tolist() == [3.0] * 4


def test_exception_in_compile_propagates():
    x = mx.array(np.arange(4, dtype=np.float32))
    check_propagates(lambda: T.compile(boom)(x), "compile")
    calls = []

    def flaky(x):
        calls.append(1)
        if len(calls) == 1:
            raise Boom("inside the function")
        return x * 2.0 + 1.0

    f = T.compile(flaky)
    check_propagates(lambda: f(x), "compile")
    assert f(x).tolist() == [1.0, 3.0, 5.0, 7.0]  # the same compiled function retraces and works
    assert f(x).tolist() == [1.0, 3.0, 5.0, 7.0]
    f.close()
    g = T.compile(lambda x: O.exp(x))
    assert np.allclose(g(x).numpy(), np.exp(np.arange(4)))
    g.close()


def test_mlx_error_inside_transformed_function():
    # An MLX failure inside the traced function: its MLXError is the cause.
    x = mx.array(np.ones((2, 3), np.float32))
    with pytest.raises(MLXError) as info:
        T.value_and_grad(lambda x: (x @ x).sum())(x)
    assert isinstance(info.value.__cause__, MLXError)
    assert info.value.__cause__.op == "matmul"
    still_works()


def test_value_and_grad_needs_an_array_output():
    x = mx.array(np.arange(4, dtype=np.float32))
    for bad in (lambda x: None, lambda x: "loss", lambda x: (), lambda x: ("loss", x.sum())):
        with pytest.raises(MLXError) as info:
            T.value_and_grad(bad)(x)
        assert isinstance(info.value.__cause__, TypeError)
    # A non-scalar output is MLX's own error.
    raises_mlx(lambda: T.value_and_grad(lambda x: x * 2.0)(x), "value_and_grad", "shape")


def test_many_errors_in_a_row_leave_no_state():
    x = mx.array(np.ones((2, 3), np.float32))
    gc.collect()
    start = mx.memory.active()
    for _ in range(200):
        with pytest.raises(MLXError):
            x @ x
        with pytest.raises(MLXError):
            T.value_and_grad(boom)(x)
    gc.collect()
    assert mx.memory.active() == start
    still_works()
