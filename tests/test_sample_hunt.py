"""A correctness hunt of the sampler (amlx.sample) against references.

tests/test_sample.py checks each processor on fixed cases; here hypothesis draws whole
batches of rows, each with its own mix of options, and every row is held to a reference
built from transformers' own processors (SequenceBias, RepetitionPenalty, Temperature,
TopK, TopP, MinP, in the order transformers' `generate` composes them) plus OpenAI's
presence / frequency penalties in numpy, the order amlx documents (vLLM's): logit_bias ->
repetition penalty (prompt and output) -> presence / frequency (output only) ->
temperature -> top-k -> top-p -> min-p. Then the draws themselves (chi-square against the
filtered softmax, fixed seeds so the outcome is deterministic), log-probabilities (of the
raw distribution, README's rule), batch independence of seeded rows across the step's
compiled modes, and greedy decoding end to end against transformers' `generate`.

Where the references differ by design it is said at the check: amlx keeps every token
tied with a top-k / top-p boundary value (one threshold per row), transformers' top-p keeps
the tied tokens its sort order happens to put first. Data is drawn so that such boundary
cases are either avoided (continuous logits, margins checked) or checked against amlx's
stated rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx.sample import (BatchParams, BatchSampling, RowSampling, SamplingParams, make_counts, make_history,
                         make_keys, sample, sampling_logits)
from amlx.types import GenerationOptions

try:
    from tests.helpers.stats import chi2_sf
except ImportError:  # tests/ itself on sys.path
    from helpers.stats import chi2_sf

torch = pytest.importorskip("torch")
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,  # noqa: E402
                                                    SequenceBiasLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

SP = SamplingParams


def arr(x, dtype=None):
    return mx.array(np.asarray(x), dtype)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# -- the reference ---------------------------------------------------------------------

def hf_adjust(x: np.ndarray, p: SamplingParams, prompt: list[int], generated: list[int]) -> np.ndarray:
    """One row's logits after logit_bias (transformers' SequenceBias with one-token
    sequences), the repetition penalty on prompt and output (transformers'), then OpenAI's
    presence / frequency penalties over the generated tokens (numpy): what a greedy row
    takes the argmax of."""
    scores = torch.tensor(np.asarray(x, np.float32)[None].copy())
    ids = torch.tensor([list(prompt) + list(generated)], dtype=torch.long)
    if p.logit_bias:
        # (newer transformers refuse token id 0 in a sequence bias; a one-token bias adds to
        # its column, which is done here for id 0)
        rest = [[[k], v] for k, v in p.logit_bias if k != 0]
        if rest:
            scores = SequenceBiasLogitsProcessor(sequence_bias=rest)(ids, scores)
        zero = [v for k, v in p.logit_bias if k == 0]
        if zero:
            scores[0, 0] += zero[0]
    if p.repetition_penalty != 1.0 and ids.shape[1]:
        scores = RepetitionPenaltyLogitsProcessor(penalty=p.repetition_penalty)(ids, scores)
    out = scores[0].numpy().astype(np.float32)
    counts = np.bincount(np.asarray(generated, np.int64), minlength=out.size).astype(np.float32)
    return (out - np.float32(p.presence_penalty) * (counts > 0) - np.float32(p.frequency_penalty) * counts
            ).astype(np.float32)


def hf_warp(x: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Temperature, top-k, top-p, min-p with transformers' warpers, in `generate`'s order
    (each only where `generate` would add it). Filtered tokens are -inf."""
    scores = torch.tensor(np.asarray(x, np.float32)[None].copy())
    ids = torch.zeros((1, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(top_k=p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(top_p=p.top_p)(ids, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(min_p=p.min_p)(ids, scores)
    return scores[0].numpy().astype(np.float32)


def boundary_margin(z: np.ndarray, p: SamplingParams) -> float:
    """How far (in probability mass / ratio) the row's top-p and min-p decisions are from
    flipping, in float64: below ~1e-5, float32 rounding may decide them either way."""
    z = np.asarray(z, np.float64)
    margin = math.inf
    keep = np.isfinite(z)
    if 0 < p.top_k < z.size:
        kth = np.sort(z)[::-1][p.top_k - 1]
        keep &= z >= kth
    if p.top_p < 1.0:
        zk = np.where(keep, z, -np.inf)
        probs = np.exp(zk - zk.max())
        probs /= probs.sum()
        order = np.argsort(-zk, kind="stable")
        above = np.cumsum(probs[order])[:-1]  # the mass above the 2nd, 3rd, ... token (the 1st: 0)
        above = above[probs[order][1:] > 0]
        if above.size:
            margin = min(margin, float(np.min(np.abs(above - p.top_p))))
    if p.min_p > 0.0:
        finite = z[np.isfinite(z)]
        ratio = finite - finite.max()
        ratio = ratio[ratio < 0]  # (the top token is kept whatever min_p is)
        if ratio.size:
            margin = min(margin, float(np.min(np.abs(ratio - math.log(p.min_p)))))
    return margin


# -- strategies ------------------------------------------------------------------------

def row_params(vocab: int):
    """One row's options; temperature 0 (greedy) often, so batches mix greedy and sampling
    rows (a greedy row's filters must be ignored, a sampling row's applied)."""
    ids = st.integers(0, vocab - 1)
    return st.builds(
        SamplingParams,
        temperature=st.sampled_from([0.0, 0.0, 0.25, 0.7, 1.0, 1.9]),
        top_k=st.sampled_from([0, 0, 1, 2, 3, 7, vocab - 1 if vocab > 1 else 0, vocab]),
        top_p=st.sampled_from([1.0, 1.0, 0.999, 0.9, 0.5, 0.2, 1e-3, 1e-9]),
        min_p=st.sampled_from([0.0, 0.0, 0.01, 0.2, 0.9, 1.0]),
        repetition_penalty=st.sampled_from([1.0, 1.0, 0.5, 1.3, 3.0]),
        presence_penalty=st.sampled_from([0.0, 0.0, -1.5, 0.6, 2.0]),
        frequency_penalty=st.sampled_from([0.0, 0.0, -0.7, 0.4, 2.0]),
        logit_bias=st.dictionaries(ids, st.sampled_from([-100.0, -3.5, 0.25, 4.0, 100.0]), max_size=3),
        seed=st.integers(0, 2**64 - 1),
        logprobs=st.booleans(),
    )


@st.composite
def batches(draw, max_rows=5):
    vocab = draw(st.sampled_from([1, 2, 5, 31, 32, 33, 100, 257]))
    rows = draw(st.lists(row_params(vocab), min_size=1, max_size=max_rows))
    histories = [(draw(st.lists(st.integers(0, vocab - 1), max_size=6)),
                  draw(st.lists(st.integers(0, vocab - 1), max_size=6))) for _ in rows]  # (prompt, generated)
    return vocab, rows, histories, draw(st.integers(0, 2**32 - 1))


def draw_logits(rng, rows: int, vocab: int) -> np.ndarray:
    """Continuous logits (exact ties have probability ~0), some -inf (tokens the model masks
    out), one huge-magnitude row entry now and then."""
    x = (rng.normal(size=(rows, vocab)) * rng.choice([0.5, 2.0, 6.0], size=(rows, 1))).astype(np.float32)
    if vocab > 2:
        x[rng.random(x.shape) < 0.08] = -np.inf
        x[np.arange(rows), rng.integers(0, vocab, rows)] = rng.normal(size=rows).astype(np.float32)
    if vocab > 3 and rng.random() < 0.3:
        x[rng.integers(0, rows), rng.integers(0, vocab)] = np.float32(rng.choice([-1e30, 1e4, -3e4]))
    return x


def device_state(rows, histories, vocab):
    history = make_history([p + g for p, g in histories], vocab)
    counts = make_counts([g for _, g in histories], vocab)
    return history, counts


# -- processed logits, row by row against transformers -------------------------------------

@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=batches())
def test_each_row_gets_exactly_its_own_processing(case):
    """`sampling_logits` (the logits each row of `sample` chooses from) for a batch of
    mixed rows, row by row against transformers' processors on that row alone: the same
    kept set and the same values. A row whose top-p / min-p decision sits within float32
    rounding of its boundary is checked only up to that boundary token."""
    vocab, rows, histories, data_seed = case
    rng = np.random.default_rng(data_seed)
    x = draw_logits(rng, len(rows), vocab)
    history, counts = device_state(rows, histories, vocab)
    bp = BatchParams.build(rows)
    got = sampling_logits(arr(x), bp, history, counts).numpy()
    for b, p in enumerate(rows):
        prompt, generated = histories[b]
        adjusted = hf_adjust(x[b], p, prompt, generated)
        if p.is_greedy:  # no temperature, no filters: the biased and penalised logits
            np.testing.assert_allclose(got[b], adjusted, rtol=1e-6, atol=1e-6, err_msg=str((b, p)))
            continue
        want = hf_warp(adjusted, p)
        keep_got, keep_want = np.isfinite(got[b]), np.isfinite(want)
        np.testing.assert_allclose(got[b][keep_got], (adjusted / np.float32(max(p.temperature, 1e-6)))[keep_got],
                                   rtol=1e-6, atol=1e-6)
        if not np.isfinite(adjusted).any():
            continue
        z = adjusted.astype(np.float64) / p.temperature
        if boundary_margin(z, p) < 1e-5:
            # rounding may move the boundary by one token: the top token is kept all the same
            assert keep_got[int(np.argmax(adjusted))]
            continue
        np.testing.assert_array_equal(keep_got, keep_want, err_msg=str((b, p, x[b], adjusted)))


# -- ties: amlx keeps every token tied with a boundary ---------------------------------------

def tie_rule_keep(z: np.ndarray, p: SamplingParams) -> np.ndarray:
    """amlx's documented filter with ties (float64, z the tempered logits): top-k keeps every
    token >= the k-th largest value; top-p (on the top-k survivors) keeps every token >= the
    smallest value whose strictly-better mass is < top_p, counting tied tokens in sort order
    (so a tied group straddling the boundary is kept whole); min-p keeps p >= min_p * p_max."""
    keep = np.isfinite(z)
    if 0 < p.top_k < z.size:
        keep &= z >= np.sort(z)[::-1][p.top_k - 1]
    if p.top_p < 1.0:
        zk = np.where(keep, z, -np.inf)
        probs = np.exp(zk - zk.max())
        probs /= probs.sum()
        s = np.sort(zk)[::-1]
        ps = np.sort(probs)[::-1]
        above = np.concatenate([[0.0], np.cumsum(ps)[:-1]])
        keep &= z >= s[above < p.top_p].min()
    if p.min_p > 0.0:
        keep &= z - z[keep].max() >= math.log(p.min_p)
    return keep


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(vocab=st.sampled_from([2, 3, 8, 33, 64]), grid=st.sampled_from([1, 2, 4]),
       params=st.lists(st.builds(SamplingParams, temperature=st.sampled_from([0.5, 1.0, 2.0]),
                                 top_k=st.sampled_from([0, 1, 2, 3, 5]),
                                 top_p=st.sampled_from([1.0, 0.75, 0.5, 0.25, 0.1, 1e-6]),
                                 min_p=st.sampled_from([0.0, 0.5, 1.0])), min_size=1, max_size=4),
       data_seed=st.integers(0, 2**32 - 1))
def test_ties_at_a_boundary_are_kept_whole(vocab, grid, params, data_seed):
    """Logits on a coarse grid (many exact ties, at the top too): the kept set is the tie
    rule's, a superset of transformers' (whose top-p keeps only the tied tokens its sort
    puts first), and never empty. Grid and temperatures are powers of two, so the tempered
    values, and hence the ties, are exact in float32."""
    rng = np.random.default_rng(data_seed)
    x = (rng.integers(-3, 4, size=(len(params), vocab)) * grid).astype(np.float32)
    got = sampling_logits(arr(x), BatchParams.build(params)).numpy()
    for b, p in enumerate(params):
        z = x[b].astype(np.float64) / p.temperature
        # tie-rule probabilities sit on a dyadic grid; skip rows whose top-p boundary rounds either way
        if p.top_p < 1.0 and boundary_margin(z, p) < 1e-6:
            continue
        keep = np.isfinite(got[b])
        np.testing.assert_array_equal(keep, tie_rule_keep(z, p), err_msg=str((p, x[b])))
        hf = np.isfinite(hf_warp(x[b], p))
        assert keep[hf].all() and keep.any()


# -- the draws ---------------------------------------------------------------------------------



def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of the draws against `probs`, cells with < 5 expected draws pooled; a draw
    of a zero-probability token fails at once."""
    n = counts.sum()
    assert counts[probs == 0].sum() == 0, ("a filtered token was drawn", np.flatnonzero(counts * (probs == 0)))
    order = np.argsort(-probs)
    c, e = [], []
    acc_c = acc_e = 0.0
    for j in order:
        if probs[j] == 0:
            continue
        acc_c += counts[j]
        acc_e += n * probs[j]
        if acc_e >= 5:
            c.append(acc_c)
            e.append(acc_e)
            acc_c = acc_e = 0.0
    if acc_e and e:
        c[-1] += acc_c
        e[-1] += acc_e
    c, e = np.array(c), np.array(e)
    if len(e) < 2:
        return 1.0
    return chi2_sf(float(((c - e) ** 2 / e).sum()), len(e) - 1)


P_BOUND = 1e-6  # a correct sampler fails one check with probability 1e-6; the seeds are fixed


def draws(x: np.ndarray, params: list[SamplingParams], seeds: list[int], steps: int, history=None, counts=None,
          compile=False) -> np.ndarray:
    """(steps, B) tokens for fixed logits, keys carried, history and counts held fixed."""
    bp = BatchParams.build(params)
    keys = make_keys(seeds)
    out = []
    for _ in range(steps):
        o = sample(arr(x), bp, keys, history, counts, compile=compile)
        keys = o.keys
        out.append(o.tokens.numpy())
    return np.stack(out)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=batches())
def test_sample_draws_the_argmax_of_the_processed_logits_plus_the_rows_noise(case):
    """What `sample` draws is what the processed logits (checked against transformers
    above) and the row's own Gumbel noise give: argmax(sampling_logits + gumbel_noise(key))
    on a sampling row, argmax(sampling_logits) (first index on ties) on a greedy one. Ties
    the bias or the penalties make in a greedy row are broken like transformers' argmax."""
    from amlx.sample import gumbel_noise

    vocab, rows, histories, data_seed = case
    rng = np.random.default_rng(data_seed)
    x = draw_logits(rng, len(rows), vocab)
    if vocab > 4:
        x[:, 1] = x[:, 3]  # exact ties, which bias / penalties may bring to the top
    history, counts = device_state(rows, histories, vocab)
    bp = BatchParams.build(rows)
    keys = make_keys([p.seed for p in rows])
    out = sample(arr(x), bp, keys, history, counts, compile=False)
    z = sampling_logits(arr(x), bp, history, counts).numpy()
    g = gumbel_noise(keys, vocab).numpy()
    for b, p in enumerate(rows):
        want = np.argmax(z[b]) if p.is_greedy else np.argmax(z[b] + g[b])
        assert out.tokens.tolist()[b] == int(want), (b, p)
        if p.is_greedy:
            prompt, generated = histories[b]
            assert want == int(torch.argmax(torch.tensor(hf_adjust(x[b], p, prompt, generated))))


def test_draws_follow_the_processed_distribution_row_by_row():
    """Four kinds of rows interleaved in one batch (every processor on in the step), V=37
    (not a multiple of 32): each kind's 12000 draws follow softmax of transformers' processed
    logits for that row (bias, repetition penalty, presence / frequency, temperature, top-k,
    top-p, min-p)."""
    V, reps, steps = 37, 1500, 8
    rng = np.random.default_rng(21)
    base = (rng.normal(size=V) * 1.2).astype(np.float32)
    base[5] = -np.inf
    kinds = [
        SP(temperature=0.8, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={3: 2.0}),
        SP(temperature=1.3, top_k=9, repetition_penalty=1.7),
        SP(temperature=1.0, top_p=0.8, logit_bias={int(np.argmax(base)): -100.0}, frequency_penalty=-0.5),
        SP(temperature=0.5, top_k=20, top_p=0.95, min_p=0.02, repetition_penalty=0.6, presence_penalty=-1.0),
    ]
    prompt, generated = [0, 1, 2, int(np.argmax(base))], [4, 4, 7, 30]
    params = [kinds[i % len(kinds)] for i in range(reps * len(kinds))]
    x = np.tile(base, (len(params), 1))
    history, counts = device_state(params, [(prompt, generated)] * len(params), V)
    toks = draws(x, params, list(range(len(params))), steps, history, counts)
    for k, p in enumerate(kinds):
        want = hf_warp(hf_adjust(base, p, prompt, generated), p)
        assert boundary_margin(hf_adjust(base, p, prompt, generated) / p.temperature, p) > 1e-3
        probs = np.exp(log_softmax(want))
        counts_k = np.bincount(toks[:, k::len(kinds)].ravel(), minlength=V)
        assert chi_square_p(counts_k, probs) > P_BOUND, (k, p, counts_k, probs * counts_k.sum())


def test_draws_over_a_large_flat_vocabulary_are_uniform():
    """Equal logits over V=1000 (and a -inf tail past it, V=1003): every token equally likely,
    the noise's words for every counter used alike (each token drawn ~40 times)."""
    V = 1003
    x = np.zeros((1000, V), np.float32)
    x[:, 1000:] = -np.inf
    toks = draws(x, [SP(temperature=1.0)] * 1000, list(range(7_000, 8_000)), 40)
    counts = np.bincount(toks.ravel(), minlength=V)
    probs = np.r_[np.full(1000, 1e-3), np.zeros(3)]
    assert chi_square_p(counts, probs) > P_BOUND


@pytest.mark.parametrize("gap, rows, steps", [(5.0, 20000, 10), (8.0, 20000, 25)])
def test_an_unlikely_token_is_drawn_as_often_as_its_probability(gap, rows, steps):
    """Two tokens, the second exp(-gap) as likely (0.67% and 0.034%): the rare draws count
    within 5 standard deviations of their expectation (the noise's large values, from the
    smallest uniforms, decide them: the end where float32 must keep its precision)."""
    x = np.tile(np.array([0.0, -gap], np.float32), (rows, 1))
    toks = draws(x, [SP(temperature=1.0)] * rows, list(range(rows)), steps)
    n, p = toks.size, 1.0 / (1.0 + math.exp(gap))
    z = ((toks == 1).sum() - n * p) / math.sqrt(n * p * (1 - p))
    assert abs(z) < 5, z


@pytest.mark.parametrize("top_p", [1e-9, 1e-3, 0.3])
def test_small_top_p_keeps_the_top_token(top_p):
    """The top token holds > 30% of the mass: any top_p up to that keeps it alone."""
    rng = np.random.default_rng(22)
    x = rng.normal(size=(64, 77)).astype(np.float32)
    x[np.arange(64), rng.integers(0, 77, 64)] = 6.0  # well above the rest: > 30% of the mass
    toks = draws(x, [SP(temperature=1.0, top_p=top_p)] * 64, list(range(64)), 4)
    assert (toks == x.argmax(axis=1)).all()


# -- seeded rows: the same tokens alone as in any batch ------------------------------------------

def run_alone_and_batched(rows, histories, steps_x, compile=False):
    """Tokens and logprobs (S, B) of the batch, and of each row sampled alone (S, B)."""
    vocab = steps_x[0].shape[1]

    def go(params, hists, xs):
        history, counts = device_state(params, hists, vocab)
        bp = BatchParams.build(params)
        keys = make_keys([p.seed for p in params])
        toks, lps = [], []
        for x in xs:
            o = sample(arr(x), bp, keys, history, counts, compile=compile)
            keys, history, counts = o.keys, o.history, o.counts
            toks.append(o.tokens.numpy())
            lps.append(o.logprobs.numpy())
        return np.stack(toks), np.stack(lps)

    batched = go(rows, histories, steps_x)
    alone = [go([p], [h], [x[b:b + 1] for x in steps_x]) for b, (p, h) in enumerate(zip(rows, histories))]
    return batched, (np.concatenate([a[0] for a in alone], axis=1), np.concatenate([a[1] for a in alone], axis=1))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=batches(max_rows=4))
def test_a_seeded_row_draws_the_same_tokens_alone_and_batched(case):
    """Alone, a row's step may take another path than in the batch (no sort, a partial
    top-k, a full sort; with or without the penalty, bias and logprob work): the tokens,
    logprobs, history and counts must not depend on it."""
    vocab, rows, histories, data_seed = case
    rng = np.random.default_rng(data_seed)
    xs = [draw_logits(rng, len(rows), vocab) for _ in range(4)]
    (bt, bl), (at, al) = run_alone_and_batched(rows, histories, xs)
    np.testing.assert_array_equal(bt, at)
    for b, p in enumerate(rows):
        if p.logprobs:
            np.testing.assert_allclose(bl[:, b], al[:, b], rtol=1e-6, atol=1e-6)


def test_compiled_mixed_batch_matches_each_row_alone():
    """The compiled step (one configuration: sort, min-p, penalties, counts, bias, logprobs)
    against every row alone, eager: same tokens."""
    rng = np.random.default_rng(23)
    V = 45
    rows = [SP(temperature=0.9, top_p=0.8, seed=1, logprobs=True), SP(),
            SP(temperature=1.2, top_k=4, min_p=0.1, seed=2, repetition_penalty=1.3),
            SP(temperature=0.7, presence_penalty=1.0, frequency_penalty=0.5, logit_bias={3: 5.0}, seed=3),
            SP(repetition_penalty=2.0, logit_bias={7: -100.0})]
    histories = [([1, 2], []), ([3], [3, 4]), ([0, 5, 5], [6]), ([], [3, 3]), ([7], [])]
    xs = [draw_logits(rng, len(rows), V) for _ in range(5)]
    compiled, _ = run_alone_and_batched(rows, histories, xs, compile=True)
    _, alone = run_alone_and_batched(rows, histories, xs, compile=False)
    np.testing.assert_array_equal(compiled[0], alone[0])


def row_logits(row: int, step: int, vocab: int) -> np.ndarray:
    """The logits row `row` sees at its own step `step`, whatever batch it is in."""
    return (np.random.default_rng([row, step]).normal(size=vocab) * 2.5).astype(np.float32)


def options_of(p: SamplingParams) -> GenerationOptions:
    return GenerationOptions(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                             repetition_penalty=p.repetition_penalty, seed=p.seed, logprobs=p.logprobs,
                             presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                             logit_bias=dict(p.logit_bias), top_logprobs=p.top_logprobs)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(params=st.lists(row_params(40), min_size=2, max_size=6),
       plan=st.lists(st.tuples(st.sampled_from(["step", "step", "leave", "join", "rebuild", "pause"]),
                               st.integers(0, 10)), min_size=3, max_size=14))
def test_rows_leaving_joining_and_pausing_draw_what_they_draw_alone(params, plan):
    """The engine's batch changes at the sampler's level: rows leave (`take`, on the device),
    join (`extend`, or a rebuild from the rows' host state after `sync_back`) and pause
    (`selected`) between steps. Each row's tokens are those it draws alone, step for step,
    from the same logits (a row's logits depend on the row and its own step count only)."""
    V = 40
    prompts = [[r % V, (3 * r) % V] for r in range(len(params))]
    rows = {r: RowSampling(options_of(p), prompts[r]) for r, p in enumerate(params)}
    waiting = list(range(len(params)))
    got: dict[int, list[int]] = {r: [] for r in rows}
    batch: list[int] = [waiting.pop(0)]
    state = BatchSampling([rows[r] for r in batch])
    try:
        for op, arg in plan:
            if op == "leave" and len(batch) > 1:
                keep = [i for i in range(len(batch)) if i != arg % len(batch)]
                new = state.take(keep)
                state.close()
                state, batch = new, [batch[i] for i in keep]
            elif op == "join" and waiting:
                r = waiting.pop(0)
                needs = rows[r].params
                if (needs.repetition_penalty != 1.0 and state.history is None) or (
                        needs.counts_generated and state.counts is None):
                    op = "rebuild"  # (as the engine does: such a row waits for a drained batch)
                    batch.append(r)
                else:
                    new = state.extend([rows[r]])
                    state.close()
                    state, batch = new, batch + [r]
            if op == "rebuild":
                state.sync_back()
                state.close()
                state = BatchSampling([rows[r] for r in batch])
            if op in ("step", "pause"):
                selected = list(range(len(batch)))
                if op == "pause" and len(batch) > 1:
                    selected.remove(arg % len(batch))
                x = np.stack([row_logits(r, len(got[r]), V) for r in batch])
                ids, _, _ = state(arr(x), selected=selected if op == "pause" else None).read()
                for i in selected:
                    r = batch[i]
                    got[r].append(ids[i])
                    rows[r].observe(ids[i])
    finally:
        state.close()
    for r, toks in got.items():
        if not toks:
            continue
        alone = BatchSampling([RowSampling(options_of(params[r]), prompts[r])])
        try:
            mine = []
            for s in range(len(toks)):
                t = alone(arr(row_logits(r, s, V)[None])).read()[0][0]
                alone.rows[0].observe(t)
                mine.append(t)
        finally:
            alone.close()
        assert toks == mine, (r, params[r])


# -- log-probabilities ----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(vocab=st.sampled_from([1, 2, 3, 20, 33, 300]), n=st.integers(1, 20), grid=st.booleans(),
       data_seed=st.integers(0, 2**32 - 1), others=st.lists(st.integers(0, 20), max_size=3))
def test_top_logprobs_are_the_raw_top_n_best_first_ties_by_id(vocab, n, grid, data_seed, others):
    """top_logprobs: the min(n, V) best ids of the raw distribution in the order (value
    descending, id ascending), each with its raw log-softmax value, whatever the row's own
    filters and penalties and whatever other rows (asking other widths) share the batch; the
    chosen token's logprob is its raw log-softmax."""
    rng = np.random.default_rng(data_seed)
    if grid:  # many exact ties, also at the top and at the n-th place
        x = rng.integers(-2, 3, size=(1, vocab)).astype(np.float32)
    else:
        x = (rng.normal(size=(1, vocab)) * 3).astype(np.float32)
    if vocab > 3:
        x[0, rng.random(vocab) < 0.2] = -np.inf
        x[0, rng.integers(0, vocab)] = 0.0
    mine = SP(temperature=0.8, top_k=2, presence_penalty=2.0, logit_bias={0: 50.0}, seed=5, logprobs=True,
              top_logprobs=n)
    rows = [mine] + [SP(logprobs=True, top_logprobs=m) if m else SP(temperature=1.0, seed=m) for m in others]
    X = np.concatenate([x, (rng.normal(size=(len(others), vocab)) * 3).astype(np.float32)])
    counts = make_counts([[0, 0]] + [[]] * len(others), vocab)
    out = sample(arr(X), BatchParams.build(rows), make_keys([p.seed or 0 for p in rows]), None, counts,
                 compile=False)
    ref = log_softmax(x[0])
    width = min(max(p.top_logprobs for p in rows), vocab)
    ids = out.top_ids.numpy()[0]
    vals = out.top_logprobs.numpy()[0]
    assert ids.tolist() == np.argsort(-x[0], kind="stable")[:width].tolist()
    np.testing.assert_allclose(vals, ref[ids], atol=1e-5)
    tok = int(out.tokens.numpy()[0])
    np.testing.assert_allclose(out.logprobs.numpy()[0], ref[tok], atol=1e-5)
    # every other row's list too
    for b in range(1, len(rows)):
        assert out.top_ids.numpy()[b].tolist() == np.argsort(-X[b], kind="stable")[:width].tolist()


def test_top_logprobs_with_ties_do_not_depend_on_the_batch_width():
    """Regression: with tied logits (bf16 logits tie often) the ids argpartition picked among
    the ties depended on the width asked, i.e. on the widest top_logprobs of the batch: a row
    asking 1 got another id alone than beside a row asking 20, and a greedy row's own token was
    often not at the head of its list. Now ties go to the lower id, like the argmax."""
    rng = np.random.default_rng(24)
    for V in (13, 150, 170):
        x = rng.integers(-2, 3, size=(3, V)).astype(np.float32)
        lists = {}
        for n in (1, 2, 5, 20):
            o = sample(arr(x), BatchParams.build([SP(logprobs=True, top_logprobs=n)] * 3), make_keys([0, 1, 2]),
                       compile=False)
            lists[n] = o.top_ids.tolist()
            assert [row[0] for row in lists[n]] == o.tokens.tolist() == x.argmax(axis=1).tolist()
        for n in (1, 2, 5):
            assert lists[n] == [row[:n] for row in lists[20]], (V, n)
        with_wide = sample(arr(x), BatchParams.build([SP(logprobs=True, top_logprobs=1), SP(), SP(logprobs=True,
                           top_logprobs=20)]), make_keys([0, 1, 2]), compile=False)
        assert with_wide.top_ids.tolist()[0][:1] == lists[1][0]


def test_top_logprobs_compiled_match_eager_with_ties():
    x = np.random.default_rng(25).integers(-2, 3, size=(4, 333)).astype(np.float32)
    x[1, :] = -np.inf
    x[1, 7] = 0.0  # one finite token: the rest of the list is -inf, ties by id
    bp = BatchParams.build([SP(logprobs=True, top_logprobs=n) for n in (3, 20, 1, 7)])
    a = sample(arr(x), bp, make_keys([0, 1, 2, 3]), compile=False)
    b = sample(arr(x), bp, make_keys([0, 1, 2, 3]), compile=True)
    assert a.top_ids.tolist() == b.top_ids.tolist() == np.argsort(-x, axis=1, kind="stable")[:, :20].tolist()
    np.testing.assert_allclose(a.top_logprobs.numpy(), b.top_logprobs.numpy(), atol=1e-6)


# -- end to end: greedy decoding against transformers' generate ----------------------------------

try:
    from tests.helpers.checkpoints import load_reference, make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import load_reference, make_checkpoint


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    import amlx

    path = make_checkpoint(tmp_path_factory.mktemp("sample-hunt") / "qwen3", "qwen3", seed=3)
    model = amlx.load_sync(path, device="cpu")
    ref = load_reference(path)
    yield model, ref
    model.close()


def hf_generate(ref, prompt: list[int], n: int, **kwargs):
    """transformers' greedy `generate` with its own processors: the new ids and each step's
    raw logits (before any processor)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=0,
                               output_logits=True, output_scores=True, return_dict_in_generate=True,
                               temperature=None, top_p=None, top_k=None, pad_token_id=0, **kwargs)
    finally:
        torch.set_num_threads(threads)
    new = out.sequences[0, len(prompt):].tolist()
    raw = np.stack([lg[0].float().numpy() for lg in out.logits])
    processed = np.stack([sc[0].float().numpy() for sc in out.scores])
    return new, raw, processed


@pytest.mark.parametrize("options, hf_kwargs", [
    (dict(), dict()),
    (dict(repetition_penalty=1.8), dict(repetition_penalty=1.8)),
    (dict(repetition_penalty=0.7, logit_bias={17: 3.0, 40: -100.0}),
     dict(repetition_penalty=0.7, sequence_bias={(17,): 3.0, (40,): -100.0})),
])
def test_greedy_with_processors_and_logprobs_match_transformers_generate(e2e, options, hf_kwargs):
    """`complete(..., logprobs=True, top_logprobs=5)` greedy with logit_bias / repetition
    penalty against transformers' `generate` with SequenceBias / RepetitionPenalty: the same
    tokens (up to a step whose processed top two are within float noise), and logprobs and
    top_logprobs those of the raw logits (README: before penalties and bias), the top list
    best first."""
    model, ref = e2e
    prompt = [5, 99, 23, 61, 23, 8, 140]
    n = 12
    comp = model.complete_sync(prompt, max_tokens=n, logprobs=True, top_logprobs=5, **options)
    new, raw, processed = hf_generate(ref, prompt, len(comp.token_ids), **hf_kwargs)
    assert len(comp.logprobs) == len(comp.top_logprobs) == len(comp.token_ids)
    compared = 0
    for s, tok in enumerate(comp.token_ids):
        top2 = np.sort(processed[s])[-2:]
        if s >= len(new) or top2[1] - top2[0] < 1e-3:
            break  # a near-tie: float noise may pick either, and the runs part
        assert tok == new[s], (s, comp.token_ids, new)
        lsm = log_softmax(raw[s])
        np.testing.assert_allclose(comp.logprobs[s], lsm[tok], atol=2e-4)
        order = np.argsort(-raw[s], kind="stable")[:5]
        assert [i for i, _ in comp.top_logprobs[s]] == order.tolist()
        np.testing.assert_allclose([v for _, v in comp.top_logprobs[s]], lsm[order], atol=2e-4)
        compared += 1
    assert compared >= 6
    if "logit_bias" in options:
        assert 40 not in comp.token_ids


def test_seeded_requests_with_filters_draw_the_same_alone_and_together(e2e):
    """Seeded sampling requests with different filters and penalties (and lengths, so rows
    leave the batch while others go on) give the same tokens and logprobs alone as run
    together through the engine."""
    import asyncio

    model, _ = e2e
    reqs = [
        ([5, 6, 7], dict(temperature=1.2, top_p=0.7, seed=11, max_tokens=9, logprobs=True)),
        ([8, 9], dict(temperature=0.9, top_k=5, min_p=0.05, seed=12, max_tokens=14, top_logprobs=3)),
        ([5, 6, 7], dict(temperature=1.0, repetition_penalty=1.5, frequency_penalty=0.8, seed=13, max_tokens=5,
                         logprobs=True)),
        ([1, 2, 3, 4], dict(max_tokens=11, presence_penalty=-1.0, logit_bias={3: 2.0})),
        ([9], dict(temperature=1.6, min_p=0.3, presence_penalty=1.0, seed=2**70 + 5, max_tokens=12, logprobs=True)),
    ]
    solo = [model.complete_sync(p, **o) for p, o in reqs]

    async def together():
        return await asyncio.gather(*[model.complete(p, **o) for p, o in reqs])

    for a, b in zip(solo, asyncio.run(together())):
        assert a.token_ids == b.token_ids
        if a.logprobs is not None:
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        if a.top_logprobs is not None:
            assert [[i for i, _ in t] for t in a.top_logprobs] == [[i for i, _ in t] for t in b.top_logprobs]
    assert len({tuple(c.token_ids) for c in solo}) == len(solo)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A checkpoint whose tokens come in pairs with the same (tied) embedding row, so every
    logit has an exact twin: 2k and 2k + 1 always tie (V = 709, the last one alone)."""
    import amlx
    from safetensors.numpy import load_file, save_file

    path = make_checkpoint(tmp_path_factory.mktemp("sample-hunt-twins") / "qwen3", "qwen3", seed=5)
    weights = load_file(str(path / "model.safetensors"))
    w = weights["model.embed_tokens.weight"]
    w[1::2] = w[0:w.shape[0] - 1:2]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = amlx.load_sync(path, device="cpu")
    yield model
    model.close()


def test_engine_top_logprobs_with_tied_logits_are_batch_independent_and_lead_with_the_greedy_token(twins):
    """Regression (engine): with exact ties a request's top_logprobs ids depended on the widest
    top_logprobs of the requests batched with it, and its greedy token was often not first.
    Now: ties by the lower id, the same alone and together, the greedy token first."""
    import asyncio

    model = twins
    prompt = [12, 400, 33, 7]
    solo = model.complete_sync(prompt, max_tokens=8, top_logprobs=1)

    async def together():
        return await asyncio.gather(model.complete(prompt, max_tokens=8, top_logprobs=1),
                                    model.complete([3, 4, 5], max_tokens=8, top_logprobs=20))

    mine, wide = asyncio.run(together())
    ties = [(a, b) for top in wide.top_logprobs for a, b in zip(top, top[1:]) if a[1] == b[1]]
    if not ties:  # (a backend whose matmul rounds the twin columns apart has nothing to test here)
        pytest.skip("the twin tokens' logits did not tie")
    assert all(a[0] < b[0] for a, b in ties)  # tied values in id order
    assert mine.token_ids == solo.token_ids
    assert mine.top_logprobs == solo.top_logprobs
    for c in (solo, wide):
        for tok, top in zip(c.token_ids, c.top_logprobs):
            assert top[0][0] == tok  # the greedy token heads its list, as the argmax takes the lower twin


@pytest.mark.parametrize("options", [dict(), dict(temperature=1.0, seed=4, top_p=0.9)])
def test_stop_strings_cut_the_text_where_the_first_one_completes(e2e, options):
    """A stop string (ASCII, taken from the unstopped reply, often across a token boundary)
    ends the reply at the token that completes it: the text stops before it, the ids,
    logprobs and top_logprobs are the unstopped reply's up to that token (seeded sampling
    included: a stop changes nothing before it)."""
    model, _ = e2e
    prompt = [5, 99, 23, 61, 23, 8, 140]
    full = model.complete_sync(prompt, max_tokens=16, logprobs=True, top_logprobs=2, **options)
    text = full.text
    stops = {text[a:a + n] for a in range(len(text)) for n in (1, 2, 4) if a + n <= len(text)}
    stops = sorted(s for s in stops if s.isascii() and s.strip())
    assert len(stops) >= 5
    for stop in stops[:: max(1, len(stops) // 12)]:
        c = model.complete_sync(prompt, max_tokens=16, logprobs=True, top_logprobs=2, stop=stop, **options)
        k = len(c.token_ids)
        assert c.finish_reason == "stop" and c.text == text[:text.find(stop)], stop
        assert c.token_ids == full.token_ids[:k] and c.logprobs == full.logprobs[:k]
        assert c.top_logprobs == full.top_logprobs[:k]
        assert stop in model.tokenizer.decode(full.token_ids[:k])
        assert stop not in model.tokenizer.decode(full.token_ids[:k - 1])
