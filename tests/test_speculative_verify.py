"""Speculative decoding's acceptance rule (amlx.speculative.verify).

Greedy rows must emit exactly what plain steps (`amlx.sample.sample`) emit, with the
same logprobs, top logprobs, history and counts, whatever the logit_bias and
penalties; a row without drafts is a plain step, also for sampling rows (same key,
same token). Sampling rows must keep the target's distribution: chi-square tests
over many seeded rows on a 5-token vocabulary, for a draft model's arbitrary q and
for prompt lookup's point masses, of one verify step and of a short generation by
repeated verify steps (fixed seeds, so the tests cannot flake).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx.sample import BatchParams, SamplingParams, make_counts, make_history, make_keys, sample, sampling_logits
from amlx.speculative.draft_sampling import draft_keys, draft_step, fit_vocab
from amlx.speculative.verify import CompiledVerify, Drafts, Verified, VerifyParams, uniforms, verify

# chi-square critical values at significance 1e-4 (df -> value), from the chi-square quantile
CHI2_CRITICAL = {4: 23.51, 24: 57.41}


def arr(x, dtype=np.float32):
    return mx.array(np.asarray(x, dtype=dtype))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def chi_square(observed: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * observed.sum()
    keep = expected > 0
    assert observed[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float((((observed - expected) ** 2)[keep] / expected[keep]).sum())


def run_verify(logits, drafts, lengths, params, seeds, probs=None, history=None, counts=None):
    b, width, _ = logits.shape
    vp = VerifyParams.build(BatchParams.build(params), width)
    d = Drafts(arr(drafts, np.int32), arr(lengths, np.int32), None if probs is None else arr(probs))
    return verify(arr(logits), d, vp, make_keys(seeds), history, counts)


# -- greedy rows: exactly plain decoding -------------------------------------------

ROW_PARAMS = [
    SamplingParams(),
    SamplingParams(logprobs=True, top_logprobs=3),
    SamplingParams(repetition_penalty=1.8, logprobs=True),
    SamplingParams(presence_penalty=1.5, frequency_penalty=0.9),
    SamplingParams(logit_bias={2: 3.0, 5: -4.0}, repetition_penalty=0.6),
]


def plain_steps(logits, params, history, counts):
    """K + 1 plain greedy steps, each after the previous steps' tokens."""
    bp = BatchParams.build(params)
    keys = make_keys([0] * len(params))
    hist, cnt = make_history(history, logits.shape[2]), make_counts(counts, logits.shape[2])
    steps = []
    for j in range(logits.shape[1]):
        out = sample(arr(logits[:, j]), bp, keys, hist, cnt, compile=False)
        hist, cnt = out.history, out.counts
        steps.append((out.tokens.tolist(), out.logprobs.tolist(), out.top_ids.tolist(), out.top_logprobs.tolist(),
                      hist.numpy(), cnt.numpy()))
    return steps


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 4), data=st.data())
def test_greedy_rows_emit_exactly_what_plain_steps_emit(seed, k, data):
    rng = np.random.default_rng(seed)
    b, vocab = len(ROW_PARAMS), 9
    logits = rng.normal(0, 2, (b, k + 1, vocab)).astype(np.float32)
    history = [list(rng.integers(0, vocab, rng.integers(0, 5))) for _ in range(b)]
    counts = [list(h[: len(h) // 2]) for h in history]
    ref = plain_steps(logits, ROW_PARAMS, history, counts)
    # drafts follow the plain tokens for `agree` positions, then go astray
    agree = [data.draw(st.integers(0, k)) for _ in range(b)]
    lengths = [data.draw(st.integers(0, k)) for _ in range(b)]
    drafts = np.array([[ref[j][0][r] if j < agree[r] else (ref[j][0][r] + 1) % vocab for j in range(k)]
                       for r in range(b)], np.int32)
    out = run_verify(logits, drafts, lengths, ROW_PARAMS, [0] * b,
                     history=make_history(history, vocab), counts=make_counts(counts, vocab))
    rows = out.read()
    hist, cnt = out.history.numpy(), out.counts.numpy()
    for r, row in enumerate(rows):
        n = min(agree[r], lengths[r])
        assert row.accepted == n
        assert row.tokens == [ref[j][0][r] for j in range(n + 1)]
        np.testing.assert_allclose(row.logprobs, [ref[j][1][r] for j in range(n + 1)], rtol=1e-6, atol=1e-6)
        assert [[i for i, _ in t] for t in row.top] == [ref[j][2][r] for j in range(n + 1)]
        np.testing.assert_array_equal(hist[r], ref[n][4][r])
        np.testing.assert_array_equal(cnt[r], ref[n][5][r])


def test_rows_without_drafts_take_a_plain_step():
    """Sampling and greedy rows with no drafts (mixed with drafting rows) get the token, logprob
    and next key a plain step gives them with the same key: bit for bit."""
    rng = np.random.default_rng(3)
    params = [SamplingParams(temperature=0.9, top_p=0.8, logprobs=True), SamplingParams(temperature=1.3, top_k=4),
              SamplingParams(), SamplingParams(temperature=0.7, min_p=0.1, repetition_penalty=1.2)]
    b, k, vocab = len(params), 3, 50
    logits = rng.normal(0, 2, (b, k + 1, vocab)).astype(np.float32)
    seeds = [11, 12, 13, 14]
    lengths = [0, 0, 2, 0]
    drafts = rng.integers(0, vocab, (b, k))
    hist = [[1, 2], [3], [], [4, 4]]
    out = run_verify(logits, drafts, lengths, params, seeds, history=make_history(hist, vocab))
    plain = sample(arr(logits[:, 0]), BatchParams.build(params), make_keys(seeds), make_history(hist, vocab),
                   compile=False)
    rows = out.read()
    for r in (0, 1, 3):
        assert rows[r].accepted == 0
        assert rows[r].tokens == [plain.tokens.tolist()[r]]
    assert rows[0].logprobs == [plain.logprobs.tolist()[0]]
    np.testing.assert_array_equal(out.keys.numpy(), plain.keys.numpy())


def test_a_row_alone_or_in_a_batch_verifies_alike():
    rng = np.random.default_rng(5)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=3)] * 3
    b, k, vocab = len(params), 4, 7
    logits = rng.normal(0, 1, (b, k + 1, vocab)).astype(np.float32)
    drafts, lengths, seeds = rng.integers(0, vocab, (b, k)), [4, 3, 2, 4, 1, 0], list(range(b))
    batch = run_verify(logits, drafts, lengths, params, seeds).read()
    for r in range(b):
        alone = run_verify(logits[r:r + 1], drafts[r:r + 1], lengths[r:r + 1], params[r:r + 1], seeds[r:r + 1])
        assert alone.read()[0] == batch[r]


def test_uniforms_lie_in_the_open_unit_interval_and_look_uniform():
    u = uniforms(make_keys(list(range(2000))), 5).numpy()
    assert u.shape == (2000, 5) and u.min() > 0 and u.max() < 1
    observed = np.histogram(u.ravel(), bins=5, range=(0, 1))[0]
    assert chi_square(observed, np.full(5, 0.2)) < CHI2_CRITICAL[4]


def test_bad_shapes_are_refused():
    params = [SamplingParams()] * 2
    with pytest.raises(ValueError, match="VerifyParams"):
        vp = VerifyParams.build(BatchParams.build(params), 3)
        verify(arr(np.zeros((2, 4, 5))), Drafts(mx.array(np.zeros((2, 3), np.int32)), arr([0, 0], np.int32)), vp,
               make_keys([0, 0]))
    with pytest.raises(ValueError, match="drafts"):
        run_verify(np.zeros((2, 3, 5)), np.zeros((2, 1)), [0, 0], params, [0, 0])
    with pytest.raises(ValueError, match="at least one position"):
        VerifyParams.build(BatchParams.build(params), 0)


# -- sampling rows: the target's distribution ---------------------------------------

V, K, N = 5, 3, 20000


def dirichlet_q(rng, n):
    return rng.dirichlet(np.full(V, 0.7), size=(n, K)).astype(np.float32)


def draw(rng, q):
    """One token per row of q (..., V) by inverse CDF."""
    c = np.cumsum(q, axis=-1)
    u = rng.random(q.shape[:-1] + (1,)) * c[..., -1:]
    return np.minimum((u > c).sum(axis=-1), q.shape[-1] - 1)


def expected_p(logits_row: np.ndarray, param: SamplingParams) -> np.ndarray:
    """The target's distribution, from `sampling_logits` (the transforms a plain step samples with)."""
    x = sampling_logits(arr(logits_row[None]), BatchParams.build([param])).numpy()[0]
    return np.exp(log_softmax(x)[0] if x.ndim > 1 else log_softmax(x[None])[0])


@pytest.mark.parametrize("param", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
                                   SamplingParams(temperature=1.5, top_p=0.8, min_p=0.05)],
                         ids=["plain", "top_k", "top_p_min_p"])
@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_one_verify_step_keeps_the_target_distribution(param, drafter):
    """Every position j of a step (given the drafts before it were accepted) emits p_j."""
    rng = np.random.default_rng(17)
    target = rng.normal(0, 1.2, (K + 1, V)).astype(np.float32)
    logits = np.broadcast_to(target, (N, K + 1, V))
    q = dirichlet_q(rng, N) if drafter == "model" else None
    # prompt lookup's drafts are whatever the history held: any tokens, here skewed to token 0
    drafts = draw(rng, q) if q is not None else draw(rng, np.broadcast_to([0.6, 0.1, 0.1, 0.1, 0.1], (N, K, V)))
    out = run_verify(logits, drafts, [K] * N, [param] * N, list(range(N)), probs=q)
    accepted, tokens = out.accepted.numpy(), out.tokens.numpy()
    assert accepted.min() >= 0 and accepted.max() <= K
    for j in range(K + 1):
        reached = accepted >= j  # position j emitted a token
        observed = np.bincount(tokens[reached, j], minlength=V)
        assert chi_square(observed, expected_p(target[j], param)) < CHI2_CRITICAL[4], (j, observed)
    lp = out.logprobs.numpy()
    assert not lp.any()  # no row asked for logprobs


def markov_drafts(drafter: str, rng, last, draft_table, bp, keys):
    """K drafts per row after `last`, and q: from the draft table in numpy ("model"), by
    `draft_step` on the device with the rows' derived draft keys ("draft_step"), or a
    fixed guess (point masses, "lookup")."""
    drafts, probs, prev = np.zeros((N, K), np.int64), np.zeros((N, K, V), np.float32), last
    dkeys = draft_keys(keys)
    for j in range(K):
        if drafter == "draft_step":
            step = draft_step(arr(np.log(draft_table[prev])), bp, dkeys)
            dkeys, probs[:, j], drafts[:, j] = step.keys, step.probs.numpy(), step.tokens.numpy()
        else:
            probs[:, j] = draft_table[prev]
            drafts[:, j] = draw(rng, probs[:, j]) if drafter == "model" else (prev + 1) % V
        prev = drafts[:, j]
    return drafts, (None if drafter == "lookup" else probs)


def markov_generate(drafter: str, seed: int, steps_wanted: int = 2):
    """Generates `steps_wanted` tokens per row by repeated verify steps from a Markov 'model'
    whose logits at a position are table[previous token]."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1.2, (V, V)).astype(np.float32)
    draft_table = rng.dirichlet(np.full(V, 0.5), size=V).astype(np.float32)
    params = [SamplingParams(temperature=1.0, logprobs=True)] * N
    bp = BatchParams.build(params)
    vp = VerifyParams.build(bp, K + 1)
    keys = make_keys([seed * N + i for i in range(N)])
    last = np.zeros(N, np.int64)
    out_tokens = [[] for _ in range(N)]
    while min(len(t) for t in out_tokens) < steps_wanted:
        drafts, probs = markov_drafts(drafter, rng, last, draft_table, bp, keys)
        context = np.concatenate([last[:, None], drafts], axis=1)
        d = Drafts(arr(drafts, np.int32), arr([K] * N, np.int32), None if probs is None else arr(probs))
        res = verify(arr(table[context]), d, vp, keys)
        keys = res.keys
        for r, row in enumerate(res.read()):
            out_tokens[r] += row.tokens
            np.testing.assert_allclose(row.logprobs, log_softmax(table[context[r, :len(row.tokens)]])
                                       [np.arange(len(row.tokens)), row.tokens], atol=1e-5)
        last = np.array([t[-1] for t in out_tokens])
    return table, out_tokens


@pytest.mark.parametrize("drafter", ["model", "draft_step", "lookup"])
def test_generation_by_verify_steps_keeps_the_target_distribution(drafter):
    """The joint distribution of the first two generated tokens (25 cells) is the target's,
    across verify steps (the second token may come from the same step or the next), and
    every logprob is the target's."""
    table, out_tokens = markov_generate(drafter, seed=23)
    p = np.exp(log_softmax(table))
    joint = p[0][:, None] * p  # P(t1 | start 0) * P(t2 | t1)
    observed = np.zeros((V, V), np.int64)
    for t in out_tokens:
        observed[t[0], t[1]] += 1
    assert chi_square(observed.ravel(), joint.ravel()) < CHI2_CRITICAL[24]


# -- the draft model's own draws ------------------------------------------------------

def test_draft_steps_draw_from_q_and_greedy_rows_take_the_argmax():
    rng = np.random.default_rng(29)
    logits = rng.normal(0, 1, V).astype(np.float32)
    params = [SamplingParams(temperature=0.8, top_k=4)] * N + [SamplingParams(repetition_penalty=3.0)]
    bp = BatchParams.build(params)
    history = make_history([[]] * N + [[int(np.argmax(logits))]], V)
    step = draft_step(arr(np.broadcast_to(logits, (N + 1, V))), bp, draft_keys(make_keys(list(range(N + 1)))),
                      history)
    tokens, q = step.tokens.numpy(), step.probs.numpy()
    np.testing.assert_allclose(q.sum(axis=-1), 1.0, rtol=1e-5)
    assert chi_square(np.bincount(tokens[:N], minlength=V), q[0]) < CHI2_CRITICAL[4]
    # the greedy row's penalty pushed its argmax elsewhere, and the draft joined its history
    penalised = sampling_logits(arr(logits[None]), BatchParams.build(params[N:]), make_history([[int(np.argmax(
        logits))]], V)).numpy()[0]
    assert tokens[N] == int(np.argmax(penalised)) != int(np.argmax(logits))
    assert step.history.numpy()[N, tokens[N]]


# -- the compiled graph ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["greedy_penalties", "sampled_q", "no_drafts"])
def test_compiled_verify_gives_what_the_eager_one_gives(case):
    """Same tokens, logprobs, keys, history and counts; a second call replays the trace."""
    rng = np.random.default_rng(41)
    vocab = 11
    if case == "greedy_penalties":
        params = [SamplingParams(repetition_penalty=1.5, logprobs=True, top_logprobs=2),
                  SamplingParams(presence_penalty=1.0, logit_bias={3: 2.0})]
    else:
        params = [SamplingParams(temperature=0.9, top_p=0.8, logprobs=True), SamplingParams(),
                  SamplingParams(temperature=1.2, top_k=3)]
    b, k = len(params), (0 if case == "no_drafts" else 3)
    vp = VerifyParams.build(BatchParams.build(params), k + 1)
    compiled = CompiledVerify()
    try:
        for call in range(2):
            logits = arr(rng.normal(0, 2, (b, k + 1, vocab)))
            q = arr(rng.dirichlet(np.ones(vocab), (b, k))) if case == "sampled_q" else None
            drafts = Drafts(arr(rng.integers(0, vocab, (b, k)), np.int32), arr(rng.integers(0, k + 1, b), np.int32), q)
            keys = make_keys([call * 10 + i for i in range(b)])
            state = {}
            if case == "greedy_penalties":
                state = dict(history=make_history([[1, 2], [3]], vocab), counts=make_counts([[1], [3, 3]], vocab))
            eager = verify(logits, drafts, vp, keys, **state)
            fast = verify(logits, drafts, vp, keys, **state, compiled=compiled)
            for name, a, c in zip(Verified._fields, eager, fast):
                assert (a is None) == (c is None), name
                if a is not None:
                    np.testing.assert_array_equal(a.numpy(), c.numpy(), err_msg=name)
        assert len(compiled) == 1
    finally:
        compiled.close()


def test_draft_logits_fit_the_target_vocabulary():
    logits = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(fit_vocab(arr(logits), 6).numpy(), logits)
    np.testing.assert_array_equal(fit_vocab(arr(logits), 4).numpy(), logits[:, :4])
    wide = fit_vocab(arr(logits), 9).numpy()
    np.testing.assert_array_equal(wide[:, :6], logits)
    assert np.isneginf(wide[:, 6:]).all()
    step = draft_step(fit_vocab(arr(logits), 9), BatchParams.build([SamplingParams(temperature=1.0)] * 2),
                      draft_keys(make_keys([1, 2])))
    assert (step.tokens.numpy() < 6).all() and not step.probs.numpy()[:, 6:].any()
