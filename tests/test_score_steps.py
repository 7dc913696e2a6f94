"""`Model.score` runs as steps, a worker job each (amlx/engine/score.py `Scorer`): decode
rounds of the streams beside it run between its steps, a cancelled call stops at the next
step and frees its cache, a close stops it with ClosedError, and weights changed under it
(an adapter trained a step) start it again, so that its scores are all of the new weights.

Nothing here is timed: the checks read which steps ran and what the engine did between them.
"""

from __future__ import annotations

import gc

import anyio
import numpy as np
import pytest

import amlx
import amlx.engine.engine as engine_module
from amlx._mlx import ops
from amlx.engine.score import Scorer
from tests.helpers.checkpoints import make_checkpoint

GUARD = 120  # seconds: only a guard against a hang, never a timing


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("score-steps") / "qwen3", "qwen3", seed=5)


class Recorded(Scorer):
    """A Scorer that records, at each step, the engine's decode steps so far; `hook(self)`
    runs on the worker before each step."""

    engine = None
    hook = None
    made: list["Recorded"] = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: list[int] = []
        Recorded.made.append(self)

    def step(self) -> bool:
        if Recorded.hook is not None:
            Recorded.hook(self)
        self.seen.append(Recorded.engine.scheduler.decode_steps)
        return super().step()


@pytest.fixture
def recorded(monkeypatch):
    monkeypatch.setattr(engine_module, "Scorer", Recorded)
    Recorded.made, Recorded.hook = [], None
    yield Recorded
    Recorded.engine = Recorded.hook = None


def _watch(model, recorded, chunk: int):
    """The model's engine, its score calls recorded, its prompts prefilled `chunk` tokens a step."""
    recorded.engine = model.engine
    model.engine.scheduler.prefill_chunk = chunk
    return model.engine


def _prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


def test_streams_decode_between_a_score_calls_steps(ckpt, recorded):
    async def body():
        async with await amlx.load(ckpt) as model:
            engine = _watch(model, recorded, 8)  # a 96-token prompt: 12 prefill steps
            vocab = engine.vocab_size
            expected = await model.score(_prompt(96, vocab), [[5, 6, 7], [9]])
            first = recorded.made.pop()
            assert first.steps == 14  # 12 chunks, then a batch of one-token continuations and one of longer ones
            stream = model.generate(_prompt(8, vocab, 1), max_tokens=400, max_buffer=1000)
            got: list[int] = []
            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    async def read():
                        async for tok in stream:
                            got.append(tok.id)
                    tg.start_soon(read)
                    while engine.scheduler.decode_steps < 2:  # the stream is decoding
                        await anyio.sleep(0.001)
                    scores = await model.score(_prompt(96, vocab), [[5, 6, 7], [9]])
                    running = len(got) < 400
                    tg.cancel_scope.cancel()
            assert scores == expected  # the same steps, the same numbers
            seen = recorded.made[0].seen
            assert running, "the stream ended before the score call did"
            # at least one decode round of the stream between any two steps of the call
            assert all(b > a for a, b in zip(seen, seen[1:])), seen

    anyio.run(body)


def test_a_cancelled_score_call_stops_at_its_next_step_and_frees_its_cache(ckpt, recorded):
    async def body():
        async with await amlx.load(ckpt) as model:
            engine = _watch(model, recorded, 4)  # 50 prefill steps
            vocab = engine.vocab_size
            await model.score(_prompt(20, vocab), [[1, 2]])  # warm: MLX's first-use memory
            await engine.run(gc.collect)
            before = amlx.memory()["active"]
            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(model.score, _prompt(200, vocab), [[5, 6, 7]])
                    while not recorded.made or recorded.made[-1].steps < 3:
                        await anyio.sleep(0.001)
                    tg.cancel_scope.cancel()
            scorer = recorded.made[-1]
            at_cancel = scorer.steps
            for _ in range(3):  # jobs run in order: the close, and any step, ran before these
                await engine.run(lambda: None)
            assert scorer.steps <= at_cancel + 1  # at most the step running when it was cancelled
            assert scorer.steps < 51 and not scorer.done
            await engine.run(gc.collect)
            assert amlx.memory()["active"] <= before  # the prompt's cache is gone
            # the model goes on serving
            assert (await model.complete(_prompt(5, vocab), max_tokens=3)).usage.completion_tokens == 3

    anyio.run(body)


def test_closing_the_model_stops_a_score_call_with_closed_error(ckpt, recorded):
    async def body():
        model = await amlx.load(ckpt)
        engine = _watch(model, recorded, 4)
        vocab = engine.vocab_size
        outcome: list[BaseException] = []

        async def score():
            try:
                await model.score(_prompt(200, vocab), [[5, 6, 7]])
            except amlx.ClosedError as exc:
                outcome.append(exc)

        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(score)
                while not recorded.made or recorded.made[-1].steps < 2:
                    await anyio.sleep(0.001)
                await model.aclose()
        assert len(outcome) == 1 and recorded.made[-1].steps < 51

    anyio.run(body)


def test_weights_changed_under_a_score_call_start_it_again(ckpt, recorded):
    async def body():
        async with await amlx.load(ckpt) as model:
            engine = _watch(model, recorded, 8)
            vocab = engine.vocab_size
            prompt, conts = _prompt(64, vocab), [[5, 6, 7], [9], [11, 12]]
            before = await model.score(prompt, conts)
            lm = engine.model
            name = "lm_head.weight" if "lm_head.weight" in dict(lm.named_parameters()) else \
                "model.embed_tokens.weight"

            def change(scorer: Recorded) -> None:
                if scorer.steps == 4 and scorer.restarts == 0:  # mid-prefill
                    w = dict(lm.named_parameters())[name]
                    lm.update({name: ops.multiply(w, 1.5).astype(w.dtype)})
                    engine.weights_changed()  # (on the worker: at once)

            recorded.hook = change
            during = await model.score(prompt, conts)
            changed = recorded.made[-1]
            recorded.hook = None
            after = await model.score(prompt, conts)  # the new weights throughout
            assert changed.restarts == 1
            assert during == after and during != before

    anyio.run(body)


def test_a_scoring_batch_holds_a_bounded_number_of_prompt_copies(ckpt):
    """Each row of a scoring batch copies the prompt's cache: many short continuations after
    a long prompt took a copy each at once (400 two-token ones after 2,000 tokens: 90 GB at
    Qwen3-0.6B's size). A batch now holds at most `copies_budget` bytes of copies; the
    scores do not change, and one-token continuations need no copy at all."""
    from amlx._mlx import memory
    from amlx.engine.score import score_continuations

    with amlx.load_sync(ckpt, max_context=2048) as model:
        engine = model.engine
        vocab = engine.vocab_size
        prompt = _prompt(1500, vocab)
        rng = np.random.default_rng(2)
        conts = [rng.integers(3, vocab, size=int(rng.integers(1, 4))).tolist() for _ in range(48)]

        def peak_and_scores(**kw):
            def job():
                gc.collect()
                memory.reset_peak()
                before = memory.counters()["active"]
                scores = score_continuations(engine.model, prompt, conts, **kw)
                return memory.counters()["peak"] - before, scores
            return engine.run_sync(job)

        one = peak_and_scores(copies_budget=1)  # a row a batch
        every = peak_and_scores()  # every row in one batch (the default budget is far above this model's copies)
        row = (every[0] - one[0]) / (sum(len(c) > 1 for c in conts) - 1)  # what a row adds
        assert row > 0
        four = peak_and_scores(copies_budget=int(4.5 * row))
        assert four[0] < one[0] + 6 * row < every[0] / 2
        for got in (one[1], four[1]):
            assert np.allclose(got, every[1], rtol=1e-5, atol=1e-5)
        singles = [c for c in conts if len(c) == 1]
        assert singles and engine.run_sync(lambda: score_continuations(engine.model, prompt, singles)) == \
            [s for c, s in zip(conts, every[1]) if len(c) == 1]
