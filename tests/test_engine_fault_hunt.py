"""Faults and races in the engine, each test written for a defect found by probing it (see the
commit that added it): a close while a request's grammar is still queued for compiling, two
tasks reading one stream, a batched decode step that fails while each of its rows alone runs."""

from __future__ import annotations

import threading

import anyio
import pytest

import amlx
from amlx._mlx import ops
from amlx.constrain import matcher as matcher_module
from amlx.engine.channel import Channel
from amlx.engine.pacing import segment_setting
from amlx.engine.prefill_budget import prefill_memory
from amlx.demo import default_model_dir
from tests.helpers.faults import failing_array


async def _outcome(stream) -> tuple[str, str, list[int]]:
    """How a stream ended: ("ok" or the error's type name, the error's text, the token ids it gave)."""
    ids: list[int] = []
    try:
        async for tok in stream:
            ids.append(tok.id)
    except Exception as exc:  # noqa: BLE001 - the outcome under test
        return type(exc).__name__, str(exc), ids
    return "ok", "", ids


def test_a_close_ends_a_request_whose_grammar_waits_to_compile_with_closed_error(monkeypatch):
    """Two constrained requests with grammars not compiled yet: the first one's compile runs
    (held here), the second waits behind it on the grammar thread; the model closes. Both end
    with ClosedError. The waiting one's future, cancelled by the close, ended its stream with a
    bare concurrent.futures.CancelledError (an Exception, so the callback took it as the
    request's own error)."""
    entered, gate = threading.Event(), threading.Event()
    build = matcher_module.GrammarVocab.from_tokenizer.__func__

    def held_build(cls, *args, **kwargs):
        entered.set()
        gate.wait(60)
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(matcher_module.GrammarVocab, "from_tokenizer", classmethod(held_build))
    ends: dict[int, tuple[str, str, list[int]]] = {}

    async def body():
        model = await amlx.load(default_model_dir())
        try:
            streams = [model.generate("hi", regex="[ab]+", max_tokens=4),
                       model.generate("hi", regex="[cd]+", max_tokens=4)]

            async def read(k: int) -> None:
                ends[k] = await _outcome(streams[k])

            async with anyio.create_task_group() as tg:
                for k in range(2):
                    tg.start_soon(read, k)
                await anyio.to_thread.run_sync(entered.wait, 60)
                await model.aclose()
                gate.set()
        finally:
            gate.set()
            await model.aclose()

    anyio.run(body)
    assert ends[0][0] == "ClosedError" and ends[1][0] == "ClosedError", ends


def test_two_tasks_reading_one_stream_both_end_and_share_its_tokens_once():
    """Two tasks iterate one stream at once: each token goes to exactly one of them, in order,
    and both loops end with the stream. The channel kept one waiting task: the second to wait
    replaced the first, which was never woken again, not even by the stream's end (a hang);
    waiters that time out unwoken leave no trace behind."""
    taken: list[int] = []
    done: list[int] = []

    async def body():
        async with await amlx.load(default_model_dir()) as model:
            prompt = [5, 6, 7, 8]
            want = (await model.complete(prompt, max_tokens=40)).token_ids
            stream = model.generate(prompt, max_tokens=40, max_buffer=2)

            async def read(k: int) -> None:
                async for tok in stream:
                    taken.append(tok.id)
                    await anyio.sleep(0)
                done.append(k)

            with anyio.fail_after(60):  # (a guard against the hang, not a timing)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read, 0)
                    tg.start_soon(read, 1)
            assert taken == want and sorted(done) == [0, 1]

    anyio.run(body)


def test_reads_that_time_out_leave_no_waiters_behind():
    """A consumer polling with timeouts that expire before any token (the wake-ups of reads
    cancelled unwoken are dropped, not kept until the next token), then the next token and
    the end still reach it."""
    channel = Channel(4, lambda: None)

    async def body():
        for _ in range(50):
            with anyio.move_on_after(0.001):
                await channel.get()
        assert channel._async_waiters == []
        async with anyio.create_task_group() as tg:
            got = []

            async def read() -> None:
                got.append(await channel.get())
                got.append(await channel.get())

            tg.start_soon(read)
            await anyio.sleep(0.01)
            channel.put("token")
            channel.close()
        assert got == ["token", None]

    anyio.run(body)


def test_a_batched_step_that_fails_while_each_row_alone_runs_sheds_the_youngest_rows():
    """Every decode step of two or more rows fails (as one out of memory for the batch would)
    while each row alone runs: retried as it was, the step failed every round for good, the
    worker spinning and no stream moving. Now the youngest rows end with the step's error,
    one at a time, until the batch runs: the oldest gives its solo tokens, the others a prefix
    of theirs; every block comes back and the engine serves the next request."""
    prompts = ["The sky is", "Once upon a time", "Hello there"]
    errors: list[str] = []

    async def body():
        async with await amlx.load(default_model_dir()) as model:
            # (EOS barred: every stream runs to max_tokens, so every row meets the fault)
            options = dict(max_tokens=24, logit_bias={i: -100.0 for i in model.engine.eos_ids})
            solo = [(await model.complete(p, **options)).token_ids for p in prompts]
            sched = model.engine.scheduler

            def fault(rows, chained):
                if len(rows) > 1 and all(r.steps >= 2 for r in rows):
                    raise amlx.MLXError("injected", "the batch ran out of memory")

            sched.fault = fault
            streams = [model.generate(p, max_buffer=64, **options) for p in prompts]
            ends: dict[int, tuple[str, str, list[int]]] = {}

            async def read(k: int) -> None:
                ends[k] = await _outcome(streams[k])

            with anyio.fail_after(60):  # (a guard against the spin, not a timing)
                async with anyio.create_task_group() as tg:
                    for k in range(3):
                        tg.start_soon(read, k)
            assert ends[0] == ("ok", "", solo[0]), ends
            for k in (1, 2):
                kind, text, ids = ends[k]
                assert kind == "MLXError" and "the batch ran out of memory" in text
                assert "each row alone ran" in text and "youngest request ends" in text
                assert len(ids) >= 3 and ids == solo[k][:len(ids)]  # (no token lost or repeated)
                errors.append(text)
            sched.fault = None
            while sched.has_work():  # (the last rows leave on the worker's next round)
                await anyio.sleep(0.01)
            assert model.stats()["kv_cache"]["blocks_used"] == 0
            assert (await model.complete(prompts[1], **options)).token_ids == solo[1]

    anyio.run(body)
    assert len(errors) == 2


def test_an_exception_in_one_requests_detokenizer_fails_that_request_alone(monkeypatch):
    """A request whose detokenizer raises at its fourth token: that request ends with an
    AmlxError naming the exception, after exactly its first three tokens; the others give
    their solo tokens and every block comes back. Raised out of the scheduler's round, it
    ended every request of the engine, each with an MLXError ('engine: ...') although MLX
    had not failed."""
    prompts = ["The sky is", "Once upon a time", "Hello there"]

    async def body():
        async with await amlx.load(default_model_dir()) as model:
            options = dict(max_tokens=24, logit_bias={i: -100.0 for i in model.engine.eos_ids})
            solo = [(await model.complete(p, **options)).token_ids for p in prompts]
            made = model.engine.tokenizer.detokenizer
            detokenizers = []

            def detokenizer(*args, **kwargs):
                # (the second request's fails at its fourth id: set up before it is submitted)
                detok = made(*args, **kwargs)
                detokenizers.append(detok)
                if len(detokenizers) == 2:
                    add, ids = detok.add, []

                    def failing_add(token_id):
                        ids.append(token_id)
                        if len(ids) == 4:
                            raise RuntimeError("injected: a detokenizer bug")
                        return add(token_id)

                    detok.add = failing_add
                return detok

            monkeypatch.setattr(model.engine.tokenizer, "detokenizer", detokenizer)
            streams = [model.generate(p, **options) for p in prompts]
            ends = [await _outcome(s) for s in streams]
            assert ends[0] == ("ok", "", solo[0]) and ends[2] == ("ok", "", solo[2]), ends
            kind, text, ids = ends[1]
            assert kind == "AmlxError" and "RuntimeError: injected: a detokenizer bug" in text, ends[1]
            assert ids == solo[1][:3]
            sched = model.engine.scheduler
            while sched.has_work():  # (the last rows leave on the worker's next round)
                await anyio.sleep(0.01)
            assert model.stats()["kv_cache"]["blocks_used"] == 0

    anyio.run(body)


@pytest.mark.parametrize("text", ["inf", "1e999", "-inf", "infM", "nan"])
def test_an_infinite_prefill_byte_count_is_a_value_error_naming_the_variable(monkeypatch, text):
    """AMLX_PREFILL_MEMORY=inf (or a number past a float's range) raised int()'s bare
    OverflowError ('cannot convert float infinity to integer') out of the load; it is the
    ValueError naming the variable that other nonsense gets (AMLX_PREFILL_SEGMENT reads alike)."""
    monkeypatch.setenv("AMLX_PREFILL_MEMORY", text)
    with pytest.raises(ValueError, match="AMLX_PREFILL_MEMORY must be a byte count"):
        prefill_memory()
    monkeypatch.setenv("AMLX_PREFILL_SEGMENT", text)
    with pytest.raises(ValueError, match="AMLX_PREFILL_SEGMENT must be a byte count"):
        segment_setting()


@pytest.mark.parametrize("path", ["group", "chunk"])
def test_a_request_cancelled_while_its_failing_prefill_runs_gives_its_blocks_back(monkeypatch, path):
    """A request's consumer leaves while its prefill pass runs, and the pass fails (MLXError):
    prompts prefilled together ("group", then retried one by one) or a long prompt alone, a
    chunk at a time ("chunk"). The failure path ended only requests still active, so the
    cancelled one kept its KV blocks and its place in the scheduler for good. Now it gives
    them back; the requests beside it give their tokens."""
    if path == "chunk":
        monkeypatch.setenv("AMLX_PREFILL_CHUNK", "8")  # (read at load: the long prompt goes in chunks)
    victim_ids = list(range(5, 45))  # (40 tokens: five chunks of eight)
    prompts = [victim_ids, [50, 51], [60, 61, 62]]

    async def body():
        async with await amlx.load(default_model_dir()) as model:
            sched = model.engine.scheduler
            want = [(await model.complete(p, max_tokens=5)).token_ids for p in prompts[1:]]
            fired = []

            def leave_and_fail(reqs) -> None:
                # (set up before the victim is submitted: known by its prompt)
                victim = next((r for r in reqs if r.prompt == victim_ids and r.pos == 0), None)
                if victim is not None and not fired:
                    fired.append(len(reqs))
                    victim.channel.cancel()  # (its consumer leaves while the pass runs)
                    raise amlx.MLXError("injected", "the prefill pass failed")

            if path == "group":
                sched.fault = lambda rows, chained: leave_and_fail(rows)
            else:
                prefill_pass = sched._prefill_pass
                monkeypatch.setattr(sched, "_prefill_pass", lambda shard, reqs, *args: (
                    leave_and_fail(reqs), prefill_pass(shard, reqs, *args))[1])
            streams = [model.generate(p, max_tokens=5) for p in prompts]
            ends = [await _outcome(s) for s in streams[1:]]
            assert fired and [ids for _, _, ids in ends] == want, ends
            while sched.has_work():
                await anyio.sleep(0.01)
            assert not sched._held and model.stats()["kv_cache"]["blocks_used"] == 0

    anyio.run(body)


def test_a_parked_request_left_while_another_shards_pool_fails_gives_its_blocks_back(monkeypatch):
    """Two shards: a running request in one, a parked one (its consumer stopped reading) in the
    other. In one round the parked one's consumer leaves and the running one's pool cannot be
    computed (what running out of memory there looks like). The failure path failed the
    requests holding blocks in the broken pool and dropped every inactive parked request
    without ending it: the one just left kept its blocks in the sound pool and its place in
    the scheduler for good. Now it leaves the next round, as any cancelled one does."""
    monkeypatch.setenv("AMLX_SHARDS", "2")

    async def body():
        async with await amlx.load(default_model_dir()) as model:
            sched = model.engine.scheduler
            options = dict(max_tokens=200, logit_bias={i: -100.0 for i in model.engine.eos_ids})
            running = model.generate("a stream read to its end", max_buffer=400, **options)
            await running.__anext__()
            parked = model.generate("a stream nobody reads", max_buffer=1, **options)
            await parked.__anext__()
            while not await model.engine.run(lambda: bool(sched.parked)):
                await anyio.sleep(0.005)
            run_req, parked_req = running._stream.request, parked._stream.request
            assert run_req.shard != parked_req.shard  # (each shard takes one: the least loaded)
            fired = []

            def fault(rows, chained):
                if run_req in rows and not fired:
                    fired.append(True)
                    parked._stream.cancel()  # (its consumer leaves during the round)
                    pool = sched.shards[run_req.shard].kv.pool
                    pool.arrays[0] = ops.add(pool.arrays[0], ops.astype(failing_array(), pool.arrays[0].dtype))
                    return failing_array()
                return None

            sched.fault = fault
            kind, text, _ = await _outcome(running)
            assert fired and kind == "MLXError" and "without a primitive" in text
            sched.fault = None
            while sched.has_work():
                await anyio.sleep(0.01)
            assert not sched._held and model.stats()["kv_cache"]["blocks_used"] == 0

    anyio.run(body)


def test_a_stream_nobody_reads_gives_its_blocks_to_a_waiting_request_once_its_slot_lapses():
    """A pool of 4 blocks: a stream whose consumer stopped reading holds 3 of them, parked.
    A new request needs 2 and waited for good (only the unread stream's batch slot was given
    up, never its blocks: README's "streams nobody reads never starve new ones" did not hold
    for memory). Once the parked stream's slot lapses, it gives its blocks back and stays
    parked; the new request runs; read again, the parked stream is recomputed and goes on
    without a gap: its tokens are those of a run alone, and every block comes back."""
    unread_prompt, waiting_prompt = list(range(5, 45)), list(range(100, 130))

    async def body():
        async with await amlx.load(default_model_dir()) as probe:
            block = probe.engine.scheduler.block_bytes()
            options = dict(logit_bias={i: -100.0 for i in probe.engine.eos_ids})
            want_unread = (await probe.complete(unread_prompt, max_tokens=20, **options)).token_ids
            want_waiting = (await probe.complete(waiting_prompt, max_tokens=5, **options)).token_ids
        async with await amlx.load(default_model_dir(), kv_cache_memory=4 * block) as model:
            sched = model.engine.scheduler
            sched.slot_idle_limit = 0.05
            unread = model.generate(unread_prompt, max_tokens=20, max_buffer=1, **options)
            got = [(await unread.__anext__()).id]
            while not await model.engine.run(lambda: bool(sched.parked) and not sched.rows):
                await anyio.sleep(0.005)
            assert model.stats()["kv_cache"]["blocks_used"] == 3
            with anyio.fail_after(60):  # (a guard against waiting for good, not a timing)
                done = await model.complete(waiting_prompt, max_tokens=5, **options)
            assert done.token_ids == want_waiting
            got += [t.id async for t in unread]
            assert got == want_unread
            while sched.has_work():
                await anyio.sleep(0.01)
            assert not sched._held and model.stats()["kv_cache"]["blocks_used"] == 0

    anyio.run(body)
