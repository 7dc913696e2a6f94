"""Defects found hunting the public Model API and its options (amlx/model.py, types.py,
prompt.py): each test fails without its fix. The embedded demo model serves them (it loads
in a fraction of a second)."""

from __future__ import annotations

import asyncio
import collections
import copy
import gc
import io
import pickle
import threading
import types
import warnings

import anyio
import numpy as np
import pytest

import amlx
from amlx.demo import default_model_dir, run_demo
from amlx.engine.worker import Worker
from amlx.env import env_choice, env_int


@pytest.fixture(scope="module")
def model():
    m = amlx.load_sync(default_model_dir())
    yield m
    m.close()


def _messages(mapping) -> list:
    return [mapping(role="user", content="Hello!")]


@pytest.mark.parametrize("mapping", [lambda **kw: types.MappingProxyType(kw),
                                     lambda **kw: collections.UserDict(kw)], ids=["proxy", "userdict"])
async def test_chat_messages_of_any_mapping_are_a_prompt(model, mapping):
    # Prompt is Sequence[Mapping]: messages that were Mappings but not dicts were refused with
    # "prompt must be a string, a list of token ids, or a list of chat messages"
    want = await model.complete(_messages(dict), max_tokens=6)
    got = await model.complete(_messages(mapping), max_tokens=6)
    assert got.token_ids == want.token_ids and got.usage.prompt_tokens == want.usage.prompt_tokens


@pytest.mark.parametrize("prompt", [b"Hello", bytearray(b"Hello"), {"role": "user", "content": "x"}, [1.0, 2.0],
                                    [{"role": "user"}, 3], None])
def test_other_prompts_are_still_refused_by_type(model, prompt):
    with pytest.raises(TypeError, match="prompt must be a string, a list of token ids, or a list of chat"):
        model.generate(prompt)


@pytest.mark.parametrize("dtype", ["float64", np.float64])
def test_a_float64_dtype_is_refused_at_load(dtype):
    # float64 passed as "a floating-point type": the model loaded, then every request failed
    # with an MLXError from a CPU kernel (and a GPU has no float64 at all)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16, not float64"):
        amlx.load_sync(default_model_dir(), dtype=dtype)


async def _loaded_with_close_held() -> tuple[int, amlx.Model, threading.Event]:
    """(MLX's active memory before the load, a loaded model that has decoded, an Event): the
    model's close queues its shutdown behind a worker job that waits for the Event."""
    before = amlx.memory()["active"]
    model = await amlx.load(default_model_dir())
    assert (await model.complete("Hello!", max_tokens=2)).usage.completion_tokens == 2
    gate = threading.Event()
    model.engine.submit_job(gate.wait)
    return before, model, gate


async def test_a_second_close_waits_until_the_model_is_freed():
    # a close that found another under way returned at once, the model's memory still held
    before, model, gate = await _loaded_with_close_held()
    try:
        first = asyncio.create_task(model.aclose())
        await asyncio.sleep(0)
        second = asyncio.create_task(model.aclose())
        for _ in range(3):
            await asyncio.sleep(0)
        assert model.closed and not second.done()
    finally:
        gate.set()  # (the worker serves every model: never leave it waiting)
    await second
    assert amlx.memory()["active"] == before
    await first
    model.close()  # (a later close still returns at once)


async def test_aclose_in_a_cancelled_scope_returns_once_the_model_is_freed():
    # inside a cancelled scope aclose returned at once, before the worker's shutdown job had
    # run: the model's memory was still held when `async with` had been left
    before, model, gate = await _loaded_with_close_held()
    threading.Timer(0.2, gate.set).start()  # (released from another thread: this task is blocked in aclose)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await model.aclose()
    assert scope.cancelled_caught  # the cancellation still reached the caller
    assert model.closed and amlx.memory()["active"] == before


@pytest.mark.parametrize("which", ["first", "second"])
async def test_aclose_in_a_task_cancelled_by_asyncio_returns_once_the_model_is_freed(which):
    # asyncio's own task.cancel() (a timeout, Ctrl-C in asyncio.run) is not held by an anyio
    # shield: aclose ended at once, the model's memory still held. A second close, finding the
    # first under way, waited in a thread, and the cancellation ended that wait at once too.
    before, model, gate = await _loaded_with_close_held()
    freed = []

    async def closer():
        try:
            await model.aclose()
        finally:
            freed.append(amlx.memory()["active"] == before)

    first = asyncio.create_task(closer() if which == "first" else model.aclose())
    try:
        await asyncio.sleep(0.05)
        task = first if which == "first" else asyncio.create_task(closer())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # still waiting for the shutdown
    finally:
        gate.set()  # (the worker serves every model: never leave it waiting)
    with pytest.raises(asyncio.CancelledError):
        await task  # the cancellation is raised once the close is done
    if which == "second":
        await first
    assert freed == [True] and model.closed


async def test_the_demo_reports_a_stream_that_ended_by_itself_as_ended():
    # with a budget under 4 the "cancel" stream left after its first token whatever that token
    # was, and was reported "cancelled" although its one token (finish_reason "length") ended it
    out = io.StringIO()
    counts = await run_demo(out=out, tokens=1)
    assert counts == {name: 1 for name in counts}
    assert "cancel (length, 1 tokens)" in out.getvalue()


@pytest.mark.parametrize("tokens", [0, -1, True, 2**31, 1.5])
async def test_a_bad_demo_budget_is_refused_before_the_model_loads(tokens):
    # it failed as "max_tokens must be ...", an option the caller never named, after loading
    with pytest.raises(ValueError, match=r"tokens must be an integer in \[1, 2147483647\], got "):
        await run_demo(out=io.StringIO(), tokens=tokens, model_dir="/nonexistent/amlx-demo")


async def test_a_load_cancelled_on_the_worker_closes_the_model_it_made(monkeypatch):
    # the worker finished the load after its caller had gone and the model was dropped open:
    # its finalizer warned of an "unclosed" model that nobody had been given
    before = amlx.memory()["active"]
    worker = Worker.get()
    submitted = []
    submit = worker.submit
    monkeypatch.setattr(worker, "submit", lambda fn: submitted.append(fn) or submit(fn))
    gate = threading.Event()
    submit(gate.wait)  # the load's worker job queues behind this one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            task = asyncio.create_task(amlx.load(default_model_dir()))
            while not submitted:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            gate.set()
        await asyncio.wrap_future(submit(lambda: None))  # (after the load's job and the close it queued)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert amlx.memory()["active"] == before


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_setting_is_unset(monkeypatch, blank):
    # `NAME=` unsets a setting in a shell or a compose file: the word settings refused it
    # (AMLX_QMM_SPLIT, read at import, made `import amlx` fail) and the integer ones refused spaces
    monkeypatch.setenv("AMLX_HUNT_SETTING", blank)
    assert env_choice("AMLX_HUNT_SETTING", ("on", "off"), "off") == "off"
    assert env_int("AMLX_HUNT_SETTING") is None
    monkeypatch.setenv("AMLX_MASK_BUILD", blank)
    with amlx.load_sync(default_model_dir()) as m:
        assert m.complete_sync("Hello!", max_tokens=2, regex="[a-z]+").usage.completion_tokens == 2


def test_an_integer_setting_past_int32_names_its_variable(monkeypatch):
    # the load failed with an MLXError holding numpy's "array is too big" (AMLX_KV_BLOCK), or
    # never ended (AMLX_SHARDS made a stream per shard)
    monkeypatch.setenv("AMLX_KV_BLOCK", str(2**64))
    with pytest.raises(ValueError, match=r"AMLX_KV_BLOCK must be an integer in \[1, 2147483647\], not 1844"):
        amlx.load_sync(default_model_dir())
    monkeypatch.setenv("AMLX_HUNT_SETTING", "-1")
    with pytest.raises(ValueError, match=r"AMLX_HUNT_SETTING must be an integer in \[0, 2147483647\], not -1"):
        env_int("AMLX_HUNT_SETTING", least=0)


async def test_prompt_logprobs_takes_a_numpy_top_logprobs_as_generate_does(model):
    # generate takes top_logprobs=np.int64(2); prompt_logprobs refused it as "must be an integer"
    want = await model.prompt_logprobs("Hello there", top_logprobs=2)
    got = await model.prompt_logprobs("Hello there", top_logprobs=np.int64(2))
    assert got == want and all(type(i) is int for t in got[1:] for i, _ in t.top_logprobs)
    with pytest.raises(ValueError, match=r"top_logprobs must be an integer in \[0, 20\], got 21"):
        await model.prompt_logprobs("Hello there", top_logprobs=np.int64(21))


async def test_reads_that_start_a_chat_stream_together_make_one_request(model):
    # a chat prompt is tokenized and submitted by the stream's first read: two reads at once
    # made two requests, both read the same first token, and the one the stream dropped held
    # its place and KV blocks for good
    chat = [{"role": "user", "content": "Tell me a story about a dragon."}]
    want = (await model.complete(chat, max_tokens=2)).token_ids
    stream = model.generate(chat, max_tokens=50, max_buffer=2)
    first, second = await asyncio.gather(stream.__anext__(), stream.__anext__())
    # (which of the two reads gets which token is the event loop's order: one request's two
    # tokens, in either order; two requests gave its first token twice)
    assert sorted([first.id, second.id]) == sorted(want)
    await stream.aclose()
    for _ in range(100):  # (worker rounds: a cancelled request leaves at the next one)
        stats = model.stats()
        if stats["active_requests"] == stats["waiting_requests"] == stats["kv_cache"]["blocks_used"] == 0:
            break
        await model.engine.run(lambda: None)
    assert (stats["active_requests"], stats["waiting_requests"], stats["kv_cache"]["blocks_used"]) == (0, 0, 0)


def test_generation_options_built_directly_take_what_generate_takes():
    # the public class refused stop="abc" as "stop must be a string ..., got 'abc'" (and a list),
    # and kept the caller's logit_bias dict, which could change the frozen options later
    bias = {5: 1.0}
    opts = amlx.GenerationOptions(stop="abc", logit_bias=bias)
    bias[6] = 2.0
    assert opts.stop == ("abc",) and opts.logit_bias == {5: 1.0}
    assert amlx.GenerationOptions(stop=["a", "b"]).stop == ("a", "b")
    with pytest.raises(ValueError, match="stop must be a string or a sequence of non-empty strings"):
        amlx.GenerationOptions(stop={"a"})


@pytest.mark.parametrize("path", [None, b"/tmp", 5])
async def test_a_path_of_another_type_is_refused_naming_path(path):
    # pathlib's "expected str, bytes or os.PathLike object, not NoneType" named no option
    with pytest.raises(TypeError, match=r"path must be a checkpoint directory or a Hugging Face model id"):
        await amlx.load(path)
    with pytest.raises(TypeError, match=r"path must be a checkpoint directory or a Hugging Face model id"):
        amlx.load_sync(path)


def test_a_kv_block_too_large_for_the_device_is_refused_at_load(monkeypatch):
    # a pool holds 2 blocks whatever its ceiling: 2 blocks of 2**30 tokens (2 TiB each here)
    # crashed MLX (a segfault), smaller huge ones got the process killed for memory
    monkeypatch.setenv("AMLX_KV_BLOCK_SIZE", str(2**30))
    with pytest.raises(ValueError, match=r"a KV block of 1073741824 tokens \(kv_block_size, AMLX_KV_BLOCK_SIZE\) "
                                         r"takes \d+ bytes: the 2 a pool holds at least do not fit"):
        amlx.load_sync(default_model_dir())


async def test_stop_takes_any_sequence_of_strings(model):
    # stop is typed Sequence[str]: a deque was refused as "stop must be a string or a sequence
    # of non-empty strings"
    free = (await model.complete("Hello!", max_tokens=8)).text
    cut = free[len(free) // 2:][:2]
    want = await model.complete("Hello!", max_tokens=8, stop=[cut])
    got = await model.complete("Hello!", max_tokens=8, stop=collections.deque([cut]))
    assert got.text == want.text and got.finish_reason == want.finish_reason == "stop"


def test_an_mlx_error_survives_pickle_and_copy():
    # MLXError(op, message, hint) was made again from its one formatted message: TypeError, so
    # it could not leave a process (a ProcessPoolExecutor's worker) nor be copied
    err = amlx.MLXError("matmul", "shapes (2, 3) and (4, 5) differ", "a hint")
    for again in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
        assert type(again) is amlx.MLXError and str(again) == str(err)
        assert (again.op, again.mlx_message, again.hint) == ("matmul", "shapes (2, 3) and (4, 5) differ", "a hint")
