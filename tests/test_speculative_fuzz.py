"""Speculative decoding against itself under randomized requests (hypothesis) and
backpressure: greedy output is plain decoding's token for token (logprobs, stop
strings, penalties, EOS and max_tokens inside drafts included), and a seeded sampled
request is reproducible however fast its consumer reads."""

from __future__ import annotations

import functools

import anyio
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import amlx

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.requests import (read_slowly as _slowly, complete_all as _complete_all,
                                        with_stops_from_plain)
except ImportError:  # run from inside tests/
    from helpers.checkpoints import make_checkpoint
    from helpers.requests import (read_slowly as _slowly, complete_all as _complete_all,
                                  with_stops_from_plain)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("spec_fuzz") / "gemma", "gemma3_text", seed=0)


def run(fn, *args, **kwargs):
    return anyio.run(functools.partial(fn, *args, **kwargs), backend="asyncio")


@pytest.mark.parametrize("draft", ["prompt_lookup", "model"])
def test_seeded_sampling_does_not_depend_on_the_consumers_pace(gemma, draft):
    """README (backpressure): a paused request continues with the tokens of an unpaused
    run, seeded sampling included. A row's draft length followed its buffer's free room
    (how fast its consumer read), and with it the verify steps a seeded row's draws come
    from: a slow reader got other sampled tokens than a fast one."""
    prompt = [5, 6, 7, 8] * 3 + [5, 6]

    async def body():
        async with await amlx.load(gemma, device="cpu",
                                   draft="prompt_lookup" if draft == "prompt_lookup" else str(gemma)) as m:
            out = []
            for seed in (0, 2):
                options = dict(max_tokens=30, temperature=0.9, seed=seed, max_buffer=4)
                fast = (await m.complete(prompt, **options)).token_ids
                out.append((fast, await _slowly(m, prompt, options, 0.01)))
            return out, m.stats()["speculative"]

    pairs, stats = run(body)
    for fast, slow in pairs:
        assert slow == fast
    assert stats["accepted_tokens"] > 0


@pytest.fixture(scope="module")
def models(gemma):
    """The checkpoint plain, with prompt lookup, and as its own draft (every draft accepted)."""
    loaded = {"plain": amlx.load_sync(gemma, device="cpu"),
              "lookup": amlx.load_sync(gemma, device="cpu", draft="prompt_lookup", num_draft_tokens=6),
              "model": amlx.load_sync(gemma, device="cpu", draft=str(gemma), num_draft_tokens=5)}
    yield loaded
    for m in loaded.values():
        m.close()


_PROMPTS = st.one_of(
    st.lists(st.integers(3, 40), min_size=1, max_size=24),  # (random: drafts mostly rejected)
    st.lists(st.integers(3, 8), min_size=1, max_size=5).flatmap(lambda u: st.integers(1, 6).map(lambda r: u * r)),
)
_OPTIONS = st.fixed_dictionaries({"max_tokens": st.integers(1, 30)}, optional={
    "logprobs": st.just(True), "top_logprobs": st.integers(1, 3), "max_buffer": st.integers(1, 5),
    "repetition_penalty": st.sampled_from([1.3, 0.8]), "presence_penalty": st.sampled_from([0.7, -0.5]),
    "frequency_penalty": st.just(0.4), "logit_bias": st.just({1: 4.0, 6: 3.0}),  # (EOS inside drafts)
    "stop_at": st.tuples(st.floats(0, 1), st.integers(1, 3))})


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests=st.lists(st.tuples(_PROMPTS, _OPTIONS), min_size=1, max_size=4))
def test_greedy_speculation_equals_plain_decoding_fuzzed(models, requests):
    """Random concurrent greedy requests: both drafts give plain decoding's tokens, text,
    finish reason, logprobs and top logprobs (stop strings cut from plain output)."""
    final, want = with_stops_from_plain(run, models["plain"], requests)
    for name in ("lookup", "model"):
        got = run(_complete_all, models[name], final)
        for w, g in zip(want, got):
            assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason), name
            assert (g.logprobs is None) == (w.logprobs is None)
            if w.logprobs is not None:
                assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
            assert (g.top_logprobs is None) == (w.top_logprobs is None)
            if w.top_logprobs is not None:
                assert [[i for i, _ in t] for t in g.top_logprobs] == [[i for i, _ in t] for t in w.top_logprobs]
