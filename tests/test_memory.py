"""Native memory is owned: closing (or dropping) arrays returns MLX's active
memory to where it was, through plain ops, compiled functions and gradients.

`memory.active()` counts the bytes held by live MLX buffers (not MLX's buffer
cache), so each test measures from a clean start: earlier garbage collected.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from amlx import _mlx as mx
from amlx._mlx import ops as O
from amlx._mlx import transforms as T


def active() -> int:
    """Bytes held by live MLX buffers once the device is done. MLX's CUDA backend lets
    go of a command buffer's temporaries and inputs on its own thread after the work
    completes, a moment after eval returns; synchronize() waits for that too."""
    mx.device.synchronize()
    return mx.memory.active()


@pytest.fixture
def start():
    """Active memory at the start, and a check at the end that it came back."""
    gc.collect()
    mx.memory.clear_cache()  # a reused cached buffer may be larger than asked for
    before = active()
    yield before
    gc.collect()
    assert active() == before


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((8, 32)).astype(np.float32))
    w = mx.array(rng.standard_normal((32, 32)).astype(np.float32) / 8)
    mx.eval(x, w)
    yield x, w
    x.close()
    w.close()


def small_graph(x, w):
    return O.softmax(x @ w, -1).max(-1).sum()


def test_10000_arrays_created_and_closed(start):
    arrays = [mx.array(np.full(16, i, np.float32)) for i in range(10_000)]
    assert active() - start >= 10_000 * 16 * 4
    for a in arrays:
        a.close()
    assert active() == start
    # Results of ops (lazy, then evaluated) too.
    base = mx.array(np.ones(16, np.float32))
    results = [base * float(i) for i in range(10_000)]
    mx.eval(results)
    assert active() > start
    for r in results:
        r.close()
    base.close()
    assert active() == start


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint8, np.float16])
def test_an_array_from_host_data_is_its_own_copy(start, dtype):
    """`array(ndarray)` takes the data at once (on the CPU and CUDA MLX copies it into a buffer
    of its own, and amlx makes no copy before that): changing or dropping the source afterwards
    changes nothing, and the array's memory is MLX's, counted and given back."""
    rng = np.random.default_rng(3)
    src = (rng.standard_normal((64, 300)) * 50).astype(dtype)
    want = src.copy()
    a = mx.array(src)
    assert active() - start >= src.nbytes
    src[:] = 0
    del src
    gc.collect()
    np.testing.assert_array_equal(a.numpy(), want.astype(a.numpy().dtype))
    b = mx.array(want[:, ::3])  # (a strided view: made contiguous first)
    np.testing.assert_array_equal(b.numpy(), want[:, ::3].astype(b.numpy().dtype))
    a.close()
    b.close()


def test_loop_of_small_graphs_returns_to_start(inputs):
    x, w = inputs
    gc.collect()
    before = active()
    peak = before
    for step in range(1000):
        y = small_graph(x, w)
        mx.eval(y)
        peak = max(peak, active())
        if step % 2:
            y.close()
        else:
            del y  # dropped without close: freed at once by reference counting
    assert peak > before  # each step really computed something
    assert active() == before


def test_loop_of_elementwise_scalar_ops_returns_to_start(inputs):
    x, _ = inputs
    gc.collect()
    before = active()
    for _ in range(1000):
        y = (x * 1.0001 + 0.5) / 2 - 1
        mx.eval(y)
        y.close()
    assert active() == before


def test_compiled_loop_returns_to_start(inputs):
    x, w = inputs
    gc.collect()
    before = active()
    f = T.compile(small_graph)
    for step in range(1000):
        y = f(x, w)
        mx.eval(y)
        if step == 0:
            np.testing.assert_allclose(y.item(), small_graph(x, w).item(), rtol=1e-6)
        y.close()
    gc.collect()
    assert active() == before
    f.close()
    gc.collect()
    assert active() == before


def test_compiled_function_holding_a_constant_frees_it_on_close(inputs):
    x, _ = inputs
    gc.collect()
    before = active()
    const = mx.array(np.arange(32, dtype=np.float32))
    f = T.compile(lambda x: x * const)
    mx.eval(f(x))
    del const  # the compiled graph may still hold it
    gc.collect()
    f.close()
    del f
    gc.collect()
    assert active() == before


def test_value_and_grad_loop_returns_to_start(inputs):
    x, w = inputs
    gc.collect()
    before = active()
    vg = T.value_and_grad(lambda params, x: small_graph(x, params["w"]))
    for _ in range(1000):
        value, grads = vg({"w": w}, x)
        mx.eval(value, grads)
        value.close()
        grads["w"].close()
    assert active() == before  # no garbage collection needed: nothing is kept in cycles


def test_compiled_value_and_grad_loop_returns_to_start(inputs):
    x, w = inputs
    gc.collect()
    before = active()
    step = T.compile(T.value_and_grad(small_graph, argnums=(0, 1)))
    for _ in range(1000):
        value, (gx, gw) = step(x, w)
        mx.eval(value, gx, gw)
        del value, gx, gw
    step.close()
    gc.collect()
    assert active() == before


def test_vjp_loop_returns_to_start(inputs):
    x, w = inputs
    gc.collect()
    before = active()
    cot = mx.array(np.ones((8, 32), np.float32))
    for _ in range(300):
        outs, vjps = T.vjp(lambda x, w: O.softmax(x @ w, -1), [x, w], [cot])
        mx.eval(outs, vjps)
        del outs, vjps
    cot.close()
    assert active() == before


def test_array_as_context_manager(start):
    with mx.array(np.ones((256, 256), np.float32)) as a:
        assert active() - start >= 256 * 256 * 4
        with a @ a as b:
            assert b.sum().item() == 256 * 256 * 256
        with pytest.raises(ValueError, match="closed"):
            b.numpy()
    assert active() == start
    with pytest.raises(ValueError, match="closed"):
        a.numpy()
    # Closed on the way out of an exception too.
    with pytest.raises(RuntimeError):
        with mx.array(np.ones(1000, np.float32)) as c:
            mx.eval(c)
            raise RuntimeError("leaving early")
    assert repr(c) == "Array(<closed>)"
    assert active() == start


def test_finalizer_frees_dropped_arrays(start):
    a = mx.array(np.ones(10_000, np.float32))
    b = a + 1.0
    mx.eval(b)
    ref = weakref.ref(b)
    assert active() - start >= 2 * 40_000
    del a, b  # no close(): reference counting runs the finalizer
    assert ref() is None
    assert active() == start


def test_finalizer_frees_arrays_in_reference_cycles(start):
    class Holder:
        pass

    h1, h2 = Holder(), Holder()
    h1.other, h2.other = h2, h1  # a cycle: only the garbage collector frees it
    h1.array = mx.array(np.ones(10_000, np.float32))
    h2.array = h1.array * 2.0
    mx.eval(h2.array)
    held = active()
    assert held - start >= 80_000
    gc.disable()
    try:
        del h1, h2
        assert active() == held  # still alive: the cycle holds them
    finally:
        gc.enable()
    gc.collect()
    assert active() == start


def test_closing_a_graph_input_keeps_the_result_valid(start):
    a = mx.array(np.arange(1000, dtype=np.float32))
    b = a * 2.0  # lazy: b's graph holds a's data
    a.close()
    assert b.sum().item() == 999 * 1000
    b.close()
    assert active() == start


def test_array_constructor_shares_without_stealing(start):
    a = mx.array(np.arange(4, dtype=np.float32))
    b = mx.Array(a)  # another owner of the same MLX array
    a.close()
    assert b.tolist() == [0.0, 1.0, 2.0, 3.0]
    b.close()
    assert active() == start


def test_loaded_checkpoint_frees_on_close(tmp_path, start):
    path = tmp_path / "w.safetensors"
    data = {f"t{i}": mx.array(np.full((64, 64), i, np.float32)) for i in range(8)}
    mx.io.save_safetensors(path, data)
    for a in data.values():
        a.close()
    assert active() == start
    arrays, _ = mx.io.load_safetensors(path)
    mx.eval(list(arrays.values()))
    assert active() - start >= 8 * 64 * 64 * 4
    for a in arrays.values():
        a.close()
    assert active() == start


# -- raw handles and temporaries --------------------------------------------------------
# An Array owns a raw mlxc_array freed when it dies: `f(make_array().handle)` would
# free the temporary before f runs. These guard against that use-after-free.

def test_no_handle_of_a_temporary_in_the_array_layer():
    import ast
    import pathlib

    package = pathlib.Path(mx.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("handle", "_h") \
                    and isinstance(node.value, ast.Call):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "handle of a temporary Array (freed before the C call):\n" + "\n".join(offenders)


def test_python_operands_live_across_the_c_call(start):
    # Each of these turns Python data into a temporary Array inside the op.
    x_np = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    x = mx.array(x_np)
    idx = np.array([[0], [2], [1]], np.int32)
    for _ in range(50):
        junk = [mx.array(np.full(4, 9.0, np.float32)) for _ in range(20)]  # reuse freed memory
        np.testing.assert_allclose(O.exp([0.0, 1.0]).numpy(), np.exp([0.0, 1.0]), rtol=1e-6)
        np.testing.assert_array_equal(O.clip(x, -0.5, 0.5).numpy(), np.clip(x_np, -0.5, 0.5))
        np.testing.assert_array_equal(O.broadcast_to(3.0, (2, 2)).numpy(), np.full((2, 2), 3.0))
        np.testing.assert_array_equal(O.slice_update(x, 7.0, (0, 0), (1, 4)).numpy()[0], np.full(4, 7.0))
        np.testing.assert_array_equal(O.take_along_axis(x, idx, 1).numpy(), np.take_along_axis(x_np, idx, 1))
        want = x_np.copy()
        np.put_along_axis(want, idx, 5.0, 1)
        np.testing.assert_array_equal(O.put_along_axis(x, idx, 5.0, 1).numpy(), want)
        np.testing.assert_array_equal(O.where(x > 0, 1.0, -1.0).numpy(), np.where(x_np > 0, 1.0, -1.0))
        np.testing.assert_array_equal((x + [1.0, 2.0, 3.0, 4.0]).numpy(), x_np + np.float32([1, 2, 3, 4]))
        np.testing.assert_array_equal(O.maximum(0.0, x).numpy(), np.maximum(0.0, x_np))
        key = mx.random.key(len(junk))  # an explicit key: the global one is state MLX keeps
        u = mx.random.uniform(2.0, 3.0, (64,), key=key).numpy()
        assert u.min() >= 2.0 and u.max() < 3.0
        r = mx.random.randint(5, 9, (64,), key=key).numpy()
        assert r.min() >= 5 and r.max() < 9
        key.close()
        del junk
    x.close()


def test_copy_and_deepcopy_take_their_own_handle(start):
    import copy
    import pickle

    a = mx.array(np.arange(1000, dtype=np.float32))
    b = copy.copy(a)
    tree = copy.deepcopy({"a": a, "list": [a, 1.5]})
    assert tree["list"][0] is tree["a"]  # the memo keeps shared leaves shared
    a.close()
    assert b.sum().item() == tree["a"].sum().item() == 999 * 500
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(b)
    del b, tree  # each handle freed once (a double free would crash here)
    gc.collect()
