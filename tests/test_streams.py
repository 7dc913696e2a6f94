"""CPU streams: matmuls split into column blocks over several streams (so one
request's step uses several cores) give exactly the unsplit results."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from amlx import _mlx as mx
from amlx._mlx import device, ops

# The scheduler uses CPU streams only where the default device is the CPU; on a
# GPU these arrays would live there, computed by other kernels (TF32 tiles).
pytestmark = pytest.mark.skipif(device.default_device() != "cpu", reason="CPU streams are used on the CPU only")


def on_own_thread(fn):
    """Runs fn on a fresh thread (the streams become that thread's defaults) and
    returns its result or raises its exception."""
    box = {}

    def body():
        try:
            box["out"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["exc"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "exc" in box:
        raise box["exc"]
    return box["out"]


@pytest.mark.parametrize("streams", [2, 3])
@pytest.mark.parametrize("rows", [1, 5])
def test_split_matmuls_are_exact(streams, rows):
    rng = np.random.default_rng(streams * 10 + rows)
    x_np = rng.standard_normal((rows, 128)).astype(np.float32)
    w_np = rng.standard_normal((1000, 128)).astype(np.float32)  # (out, in) as checkpoints store it
    b_np = rng.standard_normal(1000).astype(np.float32)

    def check():
        s = device.cpu_streams(streams)
        x, w, b = mx.array(x_np), mx.array(w_np), mx.array(b_np)
        w_t = ops.transpose(w)
        wq, scales, biases = ops.quantize(w, 64, 4)
        cases = [lambda: ops.matmul(x, w_t), lambda: ops.addmm(b, x, w_t),
                 lambda: ops.quantized_matmul(x, wq, scales, biases, True, 64, 4)]
        out = []
        for make in cases:
            plain = make()
            with device.split_matmuls(s):
                split = make()
            kinds = ops.graph_summary(split)[1]
            out.append((plain.numpy(), split.numpy(), kinds))
        return out

    for plain, split, kinds in on_own_thread(check):
        assert kinds.get("Concatenate") == 1  # really computed in blocks
        np.testing.assert_array_equal(split, plain)


def test_narrow_outputs_are_not_split():
    def check():
        s = device.cpu_streams(2)
        x, w = mx.array(np.ones((2, 8), np.float32)), mx.array(np.ones((8, 300), np.float32))
        with device.split_matmuls(s):
            y = ops.matmul(x, w)
        return ops.graph_summary(y)[1], y.numpy()

    kinds, y = on_own_thread(check)
    assert "Concatenate" not in kinds  # 300 columns: blocks would be narrower than worth it
    np.testing.assert_array_equal(y, np.full((2, 300), 8.0, np.float32))
