"""A large constraint's first check leaves the event loop free (Model.generate / complete).

llguidance's first check of a schema of thousands of optional properties takes about a second;
the async calls made it on the event loop's thread, so every other task waited it out. A
constraint of more than INLINE_CONSTRAINT_CHARS characters is now checked, as a long prompt is
tokenized, on a thread at the stream's first read; the other options are still checked at the
call, and the blocking calls (`*_sync`) check on their own thread as before.
"""

from __future__ import annotations

import threading

import anyio
import pytest

import amlx
from amlx.constrain import spec
from amlx.types import is_heavy_constraint
from tests.helpers.checkpoints import make_checkpoint


def _schema_format(bad: bool = False) -> dict:
    """response_format of an object schema of 100 optional integer properties with long names,
    more than INLINE_CONSTRAINT_CHARS characters (`bad`: the last of type "nope", which
    llguidance's check refuses). (Thousands of optional properties pass the check, then fail
    their request: llguidance's parser takes at most 2,000 items per row.)"""
    props = {f"a_property_with_a_long_name_{i:03d}": {"type": "integer"} for i in range(100)}
    if bad:
        props["a_property_with_a_long_name_099"] = {"type": "nope"}
    return {"type": "json_schema", "json_schema": {"name": "big", "schema": {"type": "object", "properties": props}}}


LARGE = _schema_format()


def test_the_schema_here_is_large():
    assert is_heavy_constraint({"response_format": LARGE})
    assert not is_heavy_constraint({"response_format": {"type": "json_object"}, "regex": None})


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("load_fast_constraint") / "q", "qwen3", seed=0)


@pytest.fixture
def slow_check(monkeypatch):
    """llguidance's check of a grammar made slow: it waits until the test's `release` is set
    (at most 10 s, so a check that blocks the event loop ends) and records whether it was."""
    state = {"entered": threading.Event(), "release": threading.Event(), "released": []}

    def check(grammar: str) -> None:
        state["entered"].set()
        state["released"].append(state["release"].wait(timeout=10))
        return None
    monkeypatch.setattr(spec, "_grammar_problem", check)
    return state


def test_a_large_constraints_first_check_leaves_the_event_loop_free(qwen3, slow_check):
    """While `complete` awaits the slow check of a large schema, another task on the same loop
    runs and releases it (without the fix the check held the loop's thread: nothing could)."""
    async def body():
        async with await amlx.load(qwen3) as m:
            done = {}

            async def constrained():
                done["completion"] = await m.complete("hi", response_format=LARGE, max_tokens=3)

            async def other():  # runs once the check has started: only if the loop is free
                await anyio.to_thread.run_sync(slow_check["entered"].wait, 10)
                slow_check["release"].set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(constrained)
                tg.start_soon(other)
            return done["completion"]

    completion = anyio.run(body)
    assert slow_check["released"] == [True]
    assert completion.text.startswith("{") and len(completion.token_ids) == 3


def test_generate_checks_a_large_constraint_at_its_first_read(qwen3):
    """A large schema llguidance refuses: generate's stream raises its ValueError at the first
    read, as complete does when awaited; the other options are still refused at the call, and
    the blocking calls refuse it at the call. Nothing is left queued."""
    bad = _schema_format(bad=True)

    async def body():
        async with await amlx.load(qwen3) as m:
            stream = m.generate("hi", response_format=bad, max_tokens=3)
            with pytest.raises(ValueError, match="invalid response_format"):
                await stream.__anext__()
            with pytest.raises(ValueError, match="invalid response_format"):
                await m.complete("hi", response_format=bad)
            with pytest.raises(ValueError, match="temperature"):
                m.generate("hi", response_format=bad, temperature=-1.0)
            with pytest.raises(TypeError, match="max_new_tokens"):
                m.generate("hi", response_format=LARGE, max_new_tokens=3)
            stats = m.stats()
            assert stats["waiting_requests"] == 0 and stats["active_requests"] == 0
            with pytest.raises(ValueError, match="invalid response_format"):
                m.generate_sync("hi", response_format=bad)
            with pytest.raises(ValueError, match="invalid response_format"):
                m.complete_sync("hi", response_format=bad)

    anyio.run(body)
