"""CPU streams: matmuls split into column blocks over several streams (so one
request's step uses several cores) give exactly the unsplit results. The split
is a layer choice (`nn.MatmulSplit`, handed to layers by `nn.split_layers`), not
state the array layer reads."""

from __future__ import annotations

import numpy as np
import pytest

from amlx import _mlx as mx
from amlx._mlx import device, ops
from amlx.models import nn

# The engine splits matmuls on the CPU only; on a GPU these arrays would be
# computed by other kernels (TF32 tiles).
pytestmark = pytest.mark.skipif(device.default_device() != "cpu", reason="CPU streams are used on the CPU only")


def layers(rng):
    """A Linear with a bias, a QuantizedLinear and an Embedding (tied output
    projection), each 1000 outputs by 128 inputs."""
    w = mx.array(rng.standard_normal((1000, 128)).astype(np.float32))  # (out, in) as checkpoints store it
    b = mx.array(rng.standard_normal(1000).astype(np.float32))
    wq, scales, biases = ops.quantize(w, 64, 4)
    return [nn.Linear(w, b), nn.Linear(w), nn.QuantizedLinear(wq, scales, biases, 64, 4), nn.Embedding(w)]


def apply(layer, x):
    return layer.as_linear(x) if isinstance(layer, nn.Embedding) else layer(x)


@pytest.mark.parametrize("streams", [2, 3])
@pytest.mark.parametrize("rows", [1, 5])
def test_split_layers_are_exact(streams, rows):
    rng = np.random.default_rng(streams * 10 + rows)
    x = mx.array(rng.standard_normal((rows, 128)).astype(np.float32))
    split = nn.MatmulSplit([device.new_stream("cpu") for _ in range(streams)])
    for layer in layers(rng):
        plain = apply(layer, x)
        twin = nn.split_layers(layer, split)
        assert twin is not layer and twin.weight is layer.weight  # shares the arrays
        out = apply(twin, x)
        kinds = ops.graph_summary(out)[1]
        assert kinds.get("Concatenate") == 1  # really computed in blocks
        np.testing.assert_array_equal(out.numpy(), plain.numpy())
        assert "Concatenate" not in ops.graph_summary(apply(layer, x))[1]  # the layer itself is unchanged


def test_split_twin_of_a_tree_shares_fused_layers_and_is_exact():
    """A twin of a module tree: sub-modules, lists and fused layers (prepare's
    q/k/v-style fusion) are twinned too, and the output is bitwise the same."""
    rng = np.random.default_rng(3)

    class Pair(nn.Module):
        def __init__(self):
            self.a = nn.Linear(mx.array(rng.standard_normal((600, 64)).astype(np.float32)))
            self.b = nn.Linear(mx.array(rng.standard_normal((400, 64)).astype(np.float32)))

        def derived_arrays(self):
            return self._fuse("ab", [self.a, self.b])

        def __call__(self, x):
            fused = self._fused("ab", [self.a, self.b])
            return fused(x) if fused is not None else ops.concatenate([self.a(x), self.b(x)], axis=1)

    class Tree(nn.Module):
        def __init__(self):
            self.blocks = [Pair(), Pair()]

        def __call__(self, x):
            return ops.concatenate([blk(x) for blk in self.blocks], axis=1)

    tree = Tree()
    tree.prepare()
    x = mx.array(rng.standard_normal((1, 64)).astype(np.float32))
    plain = tree(x)
    twin = nn.split_layers(tree, nn.MatmulSplit([device.new_stream("cpu") for _ in range(2)]))
    out = twin(x)
    # each block's fused 1000-column layer is split in two; nothing is concatenated unfused
    assert ops.graph_summary(out)[1].get("Concatenate") == 3
    np.testing.assert_array_equal(out.numpy(), plain.numpy())


def test_narrow_outputs_are_not_split():
    x, w = mx.array(np.ones((2, 8), np.float32)), mx.array(np.ones((300, 8), np.float32))
    twin = nn.split_layers(nn.Linear(w), nn.MatmulSplit([device.new_stream("cpu") for _ in range(2)]))
    y = twin(x)
    assert "Concatenate" not in ops.graph_summary(y)[1]  # 300 columns: blocks would be narrower than worth it
    np.testing.assert_array_equal(y.numpy(), np.full((2, 300), 8.0, np.float32))


def test_on_stream_nests_and_leaves_the_default_device_alone():
    before = device.default_device()
    s1, s2 = device.new_stream("cpu"), device.new_stream("cpu")
    with device.on_stream(s1):
        assert device.current_stream() == s1
        with device.on_stream(s2):
            assert device.current_stream() == s2
            y = ops.add(mx.array(np.ones(3, np.float32)), 1.0)
        assert device.current_stream() == s1
    assert device.current_stream() is None
    assert device.default_device() == before
    np.testing.assert_array_equal(y.numpy(), np.full(3, 2.0, np.float32))


def test_a_lone_rows_decode_step_is_split_only_where_the_kernels_run_on_one_thread(tmp_path, monkeypatch):
    """amlx's CPU kernels take a decode step's products on a pool of threads; splitting a
    lone row's matmuls over the streams as well only adds cross-stream waits (measured
    slower, benchmarks/README.md). The split is kept where the kernels run on one
    thread, and both ways give the same tokens."""
    import asyncio

    import amlx
    from amlx._mlx import cpu_kernels
    from tests.helpers.checkpoints import make_checkpoint

    monkeypatch.setenv("AMLX_SHARDS", "2")
    model = amlx.load_sync(make_checkpoint(tmp_path / "qwen3", "qwen3", seed=0), device="cpu")
    sched, before = model.engine.scheduler, cpu_kernels.threads()
    split_steps = []
    compiled = sched._split_step_fn

    def counting(*args):
        split_steps.append(1)
        return compiled(*args)

    sched._split_step_fn = counting
    try:
        runs = {}
        for threads in (2, 1):
            cpu_kernels.set_threads(threads)
            assert model.engine.placement.split_decode() == (threads == 1)
            del split_steps[:]
            runs[threads] = asyncio.run(model.complete([5, 17, 300, 42], max_tokens=12)).token_ids
            assert bool(split_steps) == (threads == 1)
        assert runs[1] == runs[2]
    finally:
        cpu_kernels.set_threads(before)
        sched._split_step_fn = compiled  # (close releases the compiled function)
        model.close()


def test_cpu_engines_decode_in_one_shard_and_split_prefill_over_the_cores(tmp_path, monkeypatch):
    """One shard by default (amlx's kernels spread a decode step over the cores and read
    each weight once for all rows), with a stream per core to split a prompt's matmuls
    over (MLX's BLAS computes a call on one core); a tensor-parallel rank keeps one."""
    import amlx
    from amlx.engine.placement import EngineOptions, cpu_streams
    from tests.helpers.checkpoints import make_checkpoint

    monkeypatch.delenv("AMLX_SHARDS", raising=False)
    options = EngineOptions(device="cpu").resolved()
    assert (options.shards, options.split_streams) == (1, cpu_streams())
    assert options.for_rank().split_streams == 1
    assert EngineOptions(device="cpu", shards=3, split_streams=2).resolved().split_streams == 3
    with pytest.raises(ValueError, match="split_streams"):
        EngineOptions(device="cpu", split_streams=0).resolved()
    model = amlx.load_sync(make_checkpoint(tmp_path / "qwen3", "qwen3", seed=0), device="cpu")
    try:
        assert len(model.engine.scheduler.shards) == 1
        assert len(model.engine.placement.streams) == cpu_streams()
        assert (model.engine.placement.split is not None) == (cpu_streams() > 1)
    finally:
        model.close()
