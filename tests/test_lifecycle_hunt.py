"""Lifecycle and leak hunt: nothing a model made outlives its close (MLX memory, threads, file
descriptors, Python objects), and no request is lost or left running when its consumer, its event
loop or its model goes away. The tests under "defects found" were each written for a defect found
by probing (see the commit that added it); those under "behaviour that held" pin down what held
when probed: threads, file descriptors and memory after a close, ten load/close cycles, a consumer
cancelled at every await point, a close under requests in flight, event loops that end with
requests running, and the blocking API.

Waits are bounded only as guards against a hang (never a timing); memory is compared after a
first load, which leaves a few bytes in MLX's process-wide caches (tests/test_unclosed.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import weakref

import anyio
import pytest

import amlx
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
    path = make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", max_shard_size="50KB")  # (shards: files)
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


# -- behaviour that held ----------------------------------------------------------------------------

def _threads() -> set[threading.Thread]:
    """The live threads, less anyio's pool for `to_thread` (the event loop's, not amlx's: its idle
    threads end after 10 s)."""
    return {t for t in threading.enumerate() if t.name != "AnyIO worker thread"}


def _fds() -> dict[str, str]:
    """This process's open file descriptors and what each names."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (the listing's own descriptor, closed by now)
            pass
    return out


def _safetensors_maps() -> list[str]:
    with open("/proc/self/maps", encoding="utf-8") as f:
        return [line for line in f if ".safetensors" in line]


async def _threads_end(before: set[threading.Thread]) -> set[str]:
    """The names of threads started since `before` that are still alive once those that are
    ending have ended (the grammar and mask threads' pools stop without waiting)."""
    with anyio.move_on_after(30):  # (a guard, not a timing: the names left are the failure)
        while _threads() - before:
            await anyio.sleep(0.01)
    return {t.name for t in _threads() - before}


async def _idle(model) -> dict:
    """The model's stats once the worker has run the rounds in which cancelled requests leave
    (bounded: the stats then show what stayed)."""
    for _ in range(500):
        stats = model.stats()
        if (stats["active_requests"], stats["waiting_requests"], stats["kv_cache"]["blocks_used"]) == (0, 0, 0) \
                and not model.engine.scheduler.has_work():
            break
        await model.engine.run(lambda: None)
        await anyio.sleep(0.002)
    return stats


def _running(stats: dict) -> tuple[int, int, int]:
    return stats["active_requests"], stats["waiting_requests"], stats["kv_cache"]["blocks_used"]


async def _every_kind_of_work(model) -> None:
    """Plain, sampled, constrained (regex, choice, a JSON schema: the grammar and mask threads),
    chat, scoring, prompt log-probabilities and a request cancelled mid-generation."""
    no_eos = {i: -100.0 for i in model.engine.eos_ids}
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
    await asyncio.gather(
        model.complete("Hello there", max_tokens=8),
        model.complete("Hello there", max_tokens=8, temperature=0.7, seed=1, logprobs=True, top_logprobs=2),
        *(model.complete(f"Say {k}", max_tokens=8, regex="[a-z ]+") for k in range(3)),
        model.complete("Pick", max_tokens=8, choice=["red", "green"]),
        model.complete("JSON", max_tokens=12, response_format=schema),
        model.complete([{"role": "user", "content": "Hi!"}], max_tokens=8),
        model.score("Hello", [" there", " world"]),
        model.prompt_logprobs("Hello there friend", top_logprobs=2))
    with anyio.move_on_after(0.05):
        await model.complete("Go on", max_tokens=10_000, logit_bias=no_eos)


async def test_a_close_leaves_no_thread_descriptor_mapping_or_memory_behind(qwen3):
    threads, fds, maps = _threads(), _fds(), _safetensors_maps()
    before = settled_active()
    model = await amlx.load(qwen3)
    await _every_kind_of_work(model)
    await model.aclose()
    assert await _threads_end(threads) == set()
    assert _fds() == fds and _safetensors_maps() == maps
    assert settled_active() == before


async def test_ten_load_close_cycles_grow_nothing(warm_demo):
    threads, fds = _threads(), _fds()
    before = settled_active()
    engines = []
    for _ in range(10):
        model = await amlx.load(warm_demo)
        await _every_kind_of_work(model)
        engines.append(weakref.ref(model.engine))
        await model.aclose()
    del model
    assert settled_active() == before  # (MLX's buffer cache keeps freed buffers for reuse: not counted)
    assert await _threads_end(threads) == set() and _fds() == fds
    gc.collect()
    assert [e for e in engines if e() is not None] == []  # (no closed engine is kept anywhere)



async def test_failed_and_preempted_requests_leave_nothing_after_close(warm_demo):
    """Requests that fail at run time (a grammar the engine gives up on after its first token,
    a prompt that cannot fit) and requests preempted for KV room, half of them cancelled once the
    preemptions began: every block comes back while the model is open, and its close gives back
    every byte it held."""
    async with await amlx.load(warm_demo) as probe:
        block = probe.engine.scheduler.block_bytes()
    before = settled_active()
    async with await amlx.load(warm_demo, kv_cache_memory=5 * block) as model:
        no_eos = {i: -100.0 for i in model.engine.eos_ids}
        with pytest.raises(amlx.ConstraintError, match="cannot be followed"):
            await model.complete("Hello", max_tokens=20, grammar='start: "a" start')
        with pytest.raises(amlx.ContextLengthError):
            await model.complete(list(range(5, 5 + 16 * 6)), max_tokens=4)
        preempted = model.stats()["kv_cache"]["preemptions"]
        tasks = [asyncio.ensure_future(model.complete(list(range(10 + 7 * k, 30 + 7 * k)), max_tokens=40,
                                                      logit_bias=no_eos)) for k in range(4)]
        while model.stats()["kv_cache"]["preemptions"] == preempted and not all(t.done() for t in tasks):
            await asyncio.sleep(0)
        for task in tasks[1::2]:
            task.cancel()
        ends = await asyncio.gather(*tasks, return_exceptions=True)
        assert model.stats()["kv_cache"]["preemptions"] > preempted
        assert [type(e).__name__ for e in ends] == ["Completion", "CancelledError"] * 2
        assert all(e.usage.completion_tokens == 40 for e in ends[::2])
        assert _running(await _idle(model)) == (0, 0, 0)
    assert settled_active() == before  # (MLX's buffer cache keeps freed buffers for reuse: not counted)

_CANCELLED_WORK = {
    "generate": lambda m, k: _read_all(m.generate("Hello there", max_tokens=300, max_buffer=2,
                                                  logit_bias={i: -100.0 for i in m.engine.eos_ids})),
    "complete": lambda m, k: m.complete("Hello there", max_tokens=300, logit_bias={i: -100.0 for i in m.engine.eos_ids}),
    "chat": lambda m, k: m.complete([{"role": "user", "content": "Hello"}], max_tokens=300,
                                    logit_bias={i: -100.0 for i in m.engine.eos_ids}),
    # (a grammar not compiled yet: the request waits for the grammar thread first)
    "new_grammar": lambda m, k: m.complete("Hello", max_tokens=300, regex=f"[ab]{{{k + 1},}}"),
    "score": lambda m, k: m.score("Hello " * 40, [" a" * 40, " b" * 30]),
    "prompt_logprobs": lambda m, k: m.prompt_logprobs("Hello " * 60, top_logprobs=3),
}


async def _read_all(stream) -> None:
    async for _ in stream:
        await anyio.sleep(0)


@pytest.mark.parametrize("kind", sorted(_CANCELLED_WORK))
async def test_a_consumer_cancelled_at_any_await_point_stops_its_work(warm_demo, kind):
    """The consuming task is cancelled after 0, 2, 4, ... turns of the event loop: each await
    point of the call in turn (submitting, tokenizing on a thread, waiting for the grammar, for a
    token, for a scoring step). Each time the worker's batch empties, every KV block comes back,
    and the memory held is what the model holds idle."""
    async with await amlx.load(warm_demo) as model:
        await _CANCELLED_WORK[kind](model, -1)  # (what runs once per model: the pools, the traces)
        idle = settled_active()
        for turns in range(0, 40, 2):
            task = asyncio.ensure_future(_CANCELLED_WORK[kind](model, turns))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            assert _running(await _idle(model)) == (0, 0, 0), turns
            if kind != "new_grammar":  # (a new grammar's compiled copy is kept for the next request)
                assert settled_active() == idle, turns


async def test_a_close_ends_every_request_in_flight_with_closed_error(warm_demo):
    """Requests of every kind in flight from other tasks when the model closes: streaming, parked
    (its consumer not reading), waiting for a batch slot, waiting for its grammar, a chat prompt,
    scoring, prompt log-probabilities. Each ends with ClosedError (none hangs); a second close
    returns; every call after the close raises ClosedError; the memory comes back."""
    before = settled_active()
    model = await amlx.load(warm_demo, max_batch_size=2)
    no_eos = {i: -100.0 for i in model.engine.eos_ids}
    calls = {
        "stream": lambda: _read_all(model.generate("One", max_tokens=5000, logit_bias=no_eos)),
        "parked": lambda: _read_all(model.generate("Two", max_tokens=5000, max_buffer=1, logit_bias=no_eos)),
        "waiting": lambda: model.complete("Three", max_tokens=5000, logit_bias=no_eos),
        "grammar": lambda: model.complete("Four", max_tokens=5000, regex="[cd]{3,}"),
        "chat": lambda: model.complete([{"role": "user", "content": "Five"}], max_tokens=5000, logit_bias=no_eos),
        "score": lambda: model.score("Six " * 150, [" a" * 300] * 4),
        "prompt_logprobs": lambda: model.prompt_logprobs("Seven " * 300),
    }
    ends: dict[str, str] = {}

    async def run(name: str) -> None:
        try:
            await calls[name]()
            ends[name] = "finished"
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            ends[name] = type(exc).__name__

    quick = ("score", "prompt_logprobs")  # (started with the worker held: they cannot end before the close)
    gate = threading.Event()
    try:
        async with anyio.create_task_group() as tg:
            for name in calls:
                if name not in quick:
                    tg.start_soon(run, name)
            while model.stats()["tokens_generated"] < 8:  # (the streams are under way)
                await anyio.sleep(0.005)
            model.engine.submit_job(gate.wait)
            for name in quick:
                tg.start_soon(run, name)
            await anyio.sleep(0.05)
            tg.start_soon(model.aclose)
            await anyio.sleep(0.05)
            gate.set()
            with anyio.fail_after(60):  # (a guard against a hang, not a timing)
                await model.aclose()
    finally:
        gate.set()  # (the worker serves every model: never leave it waiting)
    assert ends == {name: "ClosedError" for name in calls}
    await model.aclose()
    model.close()
    with pytest.raises(amlx.ClosedError):
        model.generate("x")
    with pytest.raises(amlx.ClosedError):
        await model.complete("x")
    with pytest.raises(amlx.ClosedError):
        await model.score("x", [" y"])
    with pytest.raises(amlx.ClosedError):
        await model.prompt_logprobs("x y")
    with pytest.raises(amlx.ClosedError):
        await anyio.to_thread.run_sync(lambda: model.complete_sync("x"))
    assert model.closed and model.stats()["active_requests"] == 0
    assert settled_active() == before


def test_event_loops_that_end_with_requests_in_flight_leave_nothing_running(warm_demo, caplog):
    """asyncio.run (and trio.run) returning while tasks still run requests of every kind: the
    loop ends without a hang and without asyncio's "Task was destroyed but it is pending" or an
    unretrieved exception; the requests leave the worker; the model then serves loops that come
    after, asyncio's and trio's, and the blocking API."""
    import trio

    model = amlx.load_sync(warm_demo)
    no_eos = {i: -100.0 for i in model.engine.eos_ids}
    want = model.complete_sync("Hello", max_tokens=5).token_ids

    def spawn_all(spawn) -> None:
        spawn(_read_all, model.generate("Hello", max_tokens=5000, max_buffer=4, logit_bias=no_eos))
        spawn(_read_all, model.generate([{"role": "user", "content": "Hi"}], max_tokens=5000, logit_bias=no_eos))
        spawn(_read_all, model.generate("Hello", max_tokens=5000, regex="[ab]+"))
        spawn(model.score, "Hello " * 150, [" a" * 300] * 3)

    async def leave_asyncio() -> None:
        spawn_all(lambda fn, *args: asyncio.ensure_future(fn(*args)))
        await asyncio.sleep(0.1)

    async def leave_trio() -> None:
        async with trio.open_nursery() as nursery:
            spawn_all(nursery.start_soon)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    async def serve_one() -> list[int]:
        stats = await _idle(model)
        assert _running(stats) == (0, 0, 0)
        return (await model.complete("Hello", max_tokens=5)).token_ids

    try:
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            asyncio.run(leave_asyncio())
            gc.collect()
            assert asyncio.run(serve_one()) == want
            trio.run(leave_trio)
            assert trio.run(serve_one) == want
            assert asyncio.run(serve_one()) == want
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
        assert model.complete_sync("Hello", max_tokens=5).token_ids == want
    finally:
        model.close()


def test_the_blocking_api_leaves_nothing_running(warm_demo):
    """A blocking consumer that breaks out of its loop, leaves a `with` block, raises, or drops a
    half-read stream: each request leaves the worker (dropping cancels it). A consumer blocked on
    another thread when the model closes gets ClosedError; nothing is left running."""
    before = settled_active()
    threads = _threads()
    model = amlx.load_sync(warm_demo)
    no_eos = {i: -100.0 for i in model.engine.eos_ids}

    def idle() -> tuple[int, int, int]:
        return _running(anyio.run(_idle, model))

    for tok in model.generate_sync("Hello", max_tokens=5000, logit_bias=no_eos):
        break
    assert idle() == (0, 0, 0)
    with model.generate_sync("Hello", max_tokens=5000, logit_bias=no_eos) as stream:
        next(stream)
    assert idle() == (0, 0, 0)
    with pytest.raises(KeyError):
        for k, tok in enumerate(model.generate_sync([{"role": "user", "content": "Hi"}], max_tokens=5000,
                                                    logit_bias=no_eos)):
            if k == 3:
                raise KeyError("the consumer's own error")
    assert idle() == (0, 0, 0)
    stream = model.generate_sync("Hello", max_tokens=5000, regex="[ab]+")
    next(stream)
    del stream
    assert idle() == (0, 0, 0)

    ends: list[str] = []
    blocked = model.generate_sync("Hello", max_tokens=5000, max_buffer=1, logit_bias=no_eos)
    next(blocked)

    def consume() -> None:
        try:
            for _ in blocked:
                pass
            ends.append("finished")
        except amlx.ClosedError:
            ends.append("ClosedError")

    consumer = threading.Thread(target=consume)
    consumer.start()
    model.close()
    consumer.join(60)  # (a guard against a hang, not a timing)
    assert ends == ["ClosedError"] and not consumer.is_alive()
    with pytest.raises(amlx.ClosedError):
        model.complete_sync("Hello")
    del blocked
    assert settled_active() == before
    assert anyio.run(_threads_end, threads) == set()
