"""Lifecycle and leak hunt: nothing a model made outlives its close (MLX memory, threads, file
descriptors, Python objects), and no request is lost or left running when its consumer, its event
loop or its model goes away. Each test below the first section was written for a defect found by
probing (see the commit that added it); the rest pin down behaviour that held when probed.

Waits are bounded only as guards against a hang (never a timing); memory is compared after a
first load, which leaves a few bytes in MLX's process-wide caches (tests/test_unclosed.py)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import anyio
import pytest

import amlx
from amlx._mlx import memory
from amlx.demo import default_model_dir
from amlx.engine.worker import Worker

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint


def settled_active() -> int:
    """MLX's active bytes once earlier garbage is collected and the worker's queued jobs (a
    close, a cancelled call's cleanup) have run."""
    gc.collect()
    Worker.get().run_sync(lambda: None)
    return amlx.memory()["active"]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A random Qwen3 checkpoint: its q/k/v and gate/up layers are fused at load (the demo
    model's are not), after a first load and close."""
    path = make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")
    with amlx.load_sync(path) as warm:
        warm.complete_sync("Hello", max_tokens=2)
    return path


@pytest.fixture(scope="module")
def warm_demo():
    """The embedded demo model's path, after a first load and close."""
    with amlx.load_sync(default_model_dir()) as warm:
        warm.complete_sync("Hello", max_tokens=2)
    return default_model_dir()


# -- defects found --------------------------------------------------------------------------------

async def test_a_lora_adapter_on_a_fused_layer_gives_its_memory_back_at_close(qwen3, tmp_path):
    """LoRA on q_proj, whose q/k/v were fused at load: the replaced q_proj stayed referenced by
    its attention's fused "qkv" entry, and so did its transposed weight, a view holding the whole
    fused q/k/v weight. The close frees the derived arrays of the modules in the model's tree
    only, so 64 KiB per model (the whole q/k/v weights of a real one) stayed active after a
    training run's model closed, and after a model loaded with the adapter closed.
    (amlx/models/nn.py: `set_module` now frees the replaced module's derived arrays.)"""
    before = settled_active()
    adapter = tmp_path / "adapter"
    async with await amlx.load(qwen3) as model:
        await model.complete("Hello", max_tokens=2)
        async for _ in model.train_lora([{"text": "hello world"}] * 4, iters=1, batch_size=2, targets=("q_proj",),
                                        adapter_path=adapter, save_every=1):
            pass
        await model.complete("Hello", max_tokens=2)  # (the decode step traced with the adapter)
    assert settled_active() == before
    async with await amlx.load(qwen3, adapter=adapter) as model:
        assert (await model.complete("Hello", max_tokens=3)).usage.completion_tokens >= 1
    assert settled_active() == before


async def test_a_closed_models_scheduler_is_not_kept_by_the_idle_worker(warm_demo):
    """The worker's round kept its list of the schedulers it stepped in a local variable while it
    slept: the scheduler of a model closed in that round (its close one of the round's jobs), and
    with it the model's modules, stayed referenced until some later round, which an idle process
    may never run. (amlx/engine/worker.py: the list is emptied after the round.)"""
    model = await amlx.load(warm_demo)
    await model.complete("Hello", max_tokens=4)
    scheduler = weakref.ref(model.engine.scheduler)
    lm = weakref.ref(model.engine.model)
    await model.aclose()
    del model
    # (no worker job from here: one would start a round, which frees it anyway)
    with anyio.fail_after(30):  # (a guard: the worker finishes the round of the close, then sleeps)
        while scheduler() is not None or lm() is not None:
            gc.collect()
            await anyio.sleep(0.01)


@pytest.mark.parametrize("kind", ["train_lora", "train"])
async def test_a_training_run_kept_after_its_model_closed_holds_no_mlx_memory(warm_demo, kind):
    """A training run's model closes between two steps while the caller keeps the run (the usual
    case: `async for ev in run` ends with ClosedError, `run` still bound). The close dropped the
    optimizer's moments but not the run's random key: MLX's active memory stayed 8 bytes above
    where it was before the load for as long as the run lived. (amlx/train/trainer.py)"""
    before = settled_active()
    model = await amlx.load(warm_demo)
    run = getattr(model, kind)([{"text": "hello world " * 8}] * 8, iters=1000, batch_size=2)
    steps = 0
    with pytest.raises(amlx.ClosedError):
        async for ev in run:
            steps += ev.kind == "step"
            if steps == 2:
                asyncio.get_running_loop().call_soon(asyncio.ensure_future, model.aclose())
    await model.aclose()
    assert steps >= 2 and settled_active() == before
    del run


def _mlx_cache() -> int:
    gc.collect()
    return amlx.memory()["cache"]


async def test_a_close_gives_the_models_buffers_back_not_to_mlxs_cache(qwen3):
    """A closed model's buffers (its weights, its KV pool) went to MLX's buffer cache, which kept
    them from the device (or the host) for good: active memory came back to where it was before
    the load, and the cache grew by about the model's size, held by a process with no model open.
    (amlx/engine/engine.py: the close clears MLX's cache once the model is freed.)"""
    Worker.get().run_sync(memory.clear_cache)
    before = _mlx_cache()
    async with await amlx.load(qwen3) as model:
        await model.complete("Hello there", max_tokens=8)
        await model.score("Hello", [" there", " world"])
        assert amlx.memory()["active"] > 0
    assert _mlx_cache() <= before


@pytest.fixture(scope="module")
def mismatched_adapter(tmp_path_factory, qwen3):
    """An adapter trained on a smaller Qwen3: loading it onto `qwen3` fails (ModelLoadError)
    after its weights were read into MLX arrays."""
    small = make_checkpoint(tmp_path_factory.mktemp("small"), "qwen3", hidden_size=32, head_dim=8,
                            intermediate_size=64)
    adapter = tmp_path_factory.mktemp("adapter") / "a"
    with amlx.load_sync(small) as model:
        async def train():
            async for _ in model.train_lora([{"text": "hello world"}] * 4, iters=1, batch_size=2,
                                            adapter_path=adapter, save_every=1):
                pass
        anyio.run(train)
    return adapter


@pytest.mark.parametrize("api", ["load", "load_sync"])
async def test_a_failed_load_frees_what_it_read_with_its_error_not_at_a_garbage_collection(
        qwen3, mismatched_adapter, api):
    """A load whose adapter does not fit the model fails with ModelLoadError; the error's frames
    hold the adapter's weights, read into MLX arrays. The worker kept each failed job's error in
    a reference cycle (the error's traceback -> the worker's frame -> the job's future -> the
    error), so those arrays stayed active after the caller dropped the error, until Python's
    garbage collector happened to run. Now they go with the error, by reference counting alone.
    (amlx/engine/worker.py)"""
    before = settled_active()
    gc.disable()
    try:
        failed = ""
        try:  # (not pytest.raises: its ExceptionInfo may outlive the block)
            if api == "load":
                await amlx.load(qwen3, adapter=mismatched_adapter)
            else:
                amlx.load_sync(qwen3, adapter=mismatched_adapter)
        except amlx.ModelLoadError as exc:
            failed = str(exc)
        assert "do not fit" in failed
        Worker.get().run_sync(lambda: None)
        assert amlx.memory()["active"] == before
    finally:
        gc.enable()
