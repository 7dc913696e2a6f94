"""A failed request frees its step's memory with its last reference, without a garbage collection.

The error a request ends with is raised on the consumer's side. Its traceback then held
the worker's frames (the failed step's locals: MLX arrays) and the consumer's, one of which
holds the channel that holds the error: a reference cycle, so about 130 KB of MLX memory
(on the tiny test model; a step's activations on a real one) stayed until Python's cycle
collector next ran. The channel now keeps the worker's traceback as text (a note).
"""

from __future__ import annotations

import gc
import types

import pytest

import amlx

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.faults import failing_array
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from helpers.faults import failing_array


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


def _cycles() -> list:
    """What only the cycle collector would free now (collected, and kept for inspection)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


@pytest.mark.parametrize("kind", ["raise", "mlx_eval"])
async def test_a_failed_request_leaves_no_worker_frames_in_a_cycle(qwen, kind):
    model = await amlx.load(qwen)
    try:
        await model.complete("warm up", max_tokens=4)
        sched = model.engine.scheduler
        stream = model.generate("a request that fails", max_tokens=30)
        victim = stream._stream.request

        def fault(rows, chained):
            if victim not in rows or victim.steps < 3:
                return None
            if kind == "mlx_eval":
                return failing_array()  # its evaluation fails inside MLX
            raise amlx.MLXError("injected", "poison step")

        gc.collect()
        gc.disable()
        try:
            sched.fault = fault
            with pytest.raises(amlx.MLXError) as caught:
                async for _ in stream:
                    pass
            sched.fault = None
            err = caught.value
            # where the worker failed is still told, as text
            assert any("worker traceback" in note and "scheduler.py" in note for note in err.__notes__)
            del caught, err, stream, victim, fault
            await model.complete("after the failure", max_tokens=4)  # the worker is past the failed step
            garbage = _cycles()
        finally:
            gc.enable()
        frames = [o.f_code.co_filename for o in garbage if isinstance(o, types.FrameType)]
        assert not [f for f in frames if "/amlx/engine/" in f and not f.endswith(("channel.py", "request.py"))], frames
        assert not [o for o in garbage if type(o).__name__ == "Array"]
    finally:
        await model.aclose()
