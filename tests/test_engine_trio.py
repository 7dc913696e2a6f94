"""The engine behaviour tests of test_engine.py, run under trio.

The test bodies are written once, with anyio primitives, in test_engine.py;
the test functions are imported here and collected a second time, with the
`backend` fixture overridden to "trio" (the module-scoped `model` fixture is
loaded again for this module; the checkpoint and the transformers references
are shared). The asyncio-only tests (uvloop, asyncio.wait_for, plain threads,
sampling statistics) are not imported.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trio")

try:  # pytest's default import mode puts tests/ on sys.path
    import test_engine as shared
except ImportError:  # --import-mode=importlib from the repository root
    from tests import test_engine as shared

# fixtures and tests collected here a second time
ckpt, idle, model, run = shared.ckpt, shared.idle, shared.model, shared.run
test_64_concurrent_streams_match_solo_and_transformers = shared.test_64_concurrent_streams_match_solo_and_transformers
test_a_failure_outside_isolation_ends_every_request = shared.test_a_failure_outside_isolation_ends_every_request
test_backpressure = shared.test_backpressure
test_cancellation = shared.test_cancellation
test_a_cancelled_reader_takes_no_buffered_token = shared.test_a_cancelled_reader_takes_no_buffered_token
test_close = shared.test_close
test_the_event_loop_never_waits_on_mlx = shared.test_the_event_loop_never_waits_on_mlx
test_failure_in_one_request_is_isolated = shared.test_failure_in_one_request_is_isolated
test_heavy_prompts_are_tokenized_off_the_loop = shared.test_heavy_prompts_are_tokenized_off_the_loop
test_options_prompts_and_results = shared.test_options_prompts_and_results
test_parked_streams_give_up_their_slots_and_resume = shared.test_parked_streams_give_up_their_slots_and_resume
test_paused_streams_cost_the_batch_nothing = shared.test_paused_streams_cost_the_batch_nothing


@pytest.fixture(scope="module")
def backend() -> str:
    return "trio"


def test_bodies_run_under_trio(backend):
    """The override took: the shared bodies really run on trio here."""
    import trio

    async def inside_trio() -> bool:
        return trio.lowlevel.current_trio_token() is not None  # raises outside trio

    assert backend == "trio"
    assert run(backend, inside_trio)
