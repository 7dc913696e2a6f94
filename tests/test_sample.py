"""Batched device sampling (amlx.sample).

Checks greedy decoding and log-probabilities against numpy, seeded
reproducibility (also across batch compositions), that top-k / top-p / min-p
never emit a token outside the set computed in numpy, that the sampled
distribution matches softmax (chi-square, fixed seeds so it cannot flake),
the repetition penalty against Hugging Face's processor, and validation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx.sample import (BatchParams, SamplingParams, advance_keys, apply_repetition_penalty, keyed_hash, make_history,
                         make_keys, sample)

try:
    from tests.helpers.stats import chi2_sf
except ImportError:  # tests/ itself on sys.path
    from helpers.stats import chi2_sf

SP = SamplingParams


def arr(x, dtype=None):
    return mx.array(np.asarray(x), dtype)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def run(logits_steps, params, seeds=None, history=None, compile=False, carry_history=True):
    """Samples len(logits_steps) steps for a fixed batch, carrying keys and
    (unless carry_history is false) the history. Eager by default: on MLX's
    CPU backend every new compiled graph costs seconds of C++ compilation on a
    cold cache; `test_compiled_step_matches_eager` covers the compiled path.

    Returns (tokens (S, B), logprobs (S, B)) as numpy."""
    bp = BatchParams.build(params)
    keys = make_keys(seeds if seeds is not None else [p.seed for p in params])
    toks, lps = [], []
    for logits in logits_steps:
        out = sample(logits if isinstance(logits, mx.Array) else arr(logits, mx.float32), bp, keys, history,
                     compile=compile)
        keys = out.keys
        if carry_history:
            history = out.history
        toks.append(out.tokens.numpy())
        lps.append(out.logprobs.numpy())
    return np.stack(toks), np.stack(lps)


# -- the generator ---------------------------------------------------------------

def lowbias32_np(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def keyed_hash_np(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = lowbias32_np(counters[None, :].astype(np.uint32) * np.uint32(0x9E3779B9) + keys[:, :1])
        return lowbias32_np(x ^ keys[:, 1:2])


def test_keyed_hash_and_key_advance_match_numpy():
    keys = make_keys(list(range(50)) + [None, 2**64 - 1, -5])
    counters = np.arange(3000, dtype=np.uint32)
    np.testing.assert_array_equal(keyed_hash(keys, arr(counters[None, :])).numpy(),
                                  keyed_hash_np(keys.numpy(), counters))
    np.testing.assert_array_equal(advance_keys(keys).numpy(),
                                  keyed_hash_np(keys.numpy(), np.array([2**32 - 1, 2**32 - 2], np.uint32)))
    assert make_keys([7]).tolist() == make_keys([7]).tolist() != make_keys([8]).tolist()
    assert make_keys([None]).tolist() != make_keys([None]).tolist()


def test_noise_words_are_uniform_and_uncorrelated():
    """The words behind the noise: 128 seeds x 8 steps x 4096 tokens. Each
    check is a z-score or a Kolmogorov-Smirnov statistic against its null
    distribution with a bound that a fair generator exceeds with probability
    < 1e-6 (fixed seeds, so deterministic)."""
    keys = make_keys(range(128)).numpy()
    counters = np.arange(4096, dtype=np.uint32)
    words = []
    for _ in range(8):
        words.append(keyed_hash_np(keys, counters))
        keys = keyed_hash_np(keys, np.array([2**32 - 1, 2**32 - 2], np.uint32))
    w = np.stack(words)  # (steps, rows, tokens)
    u = (w.astype(np.float64) + 0.5) / 2**32
    n = u.size
    flat = np.sort(u.ravel())
    ks = np.max(np.abs(flat - np.arange(1, n + 1) / n)) * math.sqrt(n)
    assert ks < 2.7  # P(KS*sqrt(n) > 2.7) ~ 1e-6

    def z_corr(a, b):  # z-score of the Pearson correlation of two aligned samples
        return abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) * math.sqrt(a.size)

    assert z_corr(u[..., :-1], u[..., 1:]) < 5  # neighbouring tokens
    assert z_corr(u[:, :-1], u[:, 1:]) < 5  # neighbouring seeds
    assert z_corr(u[:-1], u[1:]) < 5  # consecutive steps of a row
    bits = np.unpackbits(w.view(np.uint8)).reshape(-1, 32)
    assert (np.abs(bits.mean(axis=0) - 0.5) * 2 * math.sqrt(bits.shape[0])).max() < 5.5  # every bit fair


# -- greedy and logprobs ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_greedy_is_argmax_and_logprobs_are_log_softmax(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 1000)).astype(np.float32) * 4
    x[2, 17] = x[2, 500] = x[2].max() + 1.0  # a tie: the first index wins, as in numpy
    logits = arr(x, dtype)
    ref = logits.numpy()  # the values the array holds (bf16-rounded for bf16)
    for compile in (True, False):
        bp = BatchParams.build([SP(logprobs=True)] * 6)
        out = sample(logits, bp, make_keys(range(6)), compile=compile)
        assert out.tokens.dtype == mx.int32
        np.testing.assert_array_equal(out.tokens.numpy(), ref.argmax(axis=-1))
        expect = log_softmax(ref)[np.arange(6), ref.argmax(axis=-1)]
        np.testing.assert_allclose(out.logprobs.numpy(), expect, rtol=1e-5, atol=1e-5)


def test_sampled_logprob_is_raw_log_softmax_of_the_chosen_token():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 300)).astype(np.float32) * 2
    params = [SP(temperature=0.7, top_p=0.8, logprobs=True), SP(temperature=1.3, top_k=5, logprobs=True),
              SP(temperature=1.0, min_p=0.1, repetition_penalty=1.5, logprobs=True), SP(logprobs=True)]
    hist = make_history([[1, 2], [3], list(range(50)), []], 300)
    toks, lps = run([x] * 5, params, seeds=[1, 2, 3, 4], history=hist)
    ls = log_softmax(x)
    for s in range(5):
        np.testing.assert_allclose(lps[s], ls[np.arange(4), toks[s]], rtol=1e-5, atol=1e-5)


def test_logprobs_are_zero_unless_asked():
    out = sample(arr(np.ones((2, 5)), mx.float32), BatchParams.build([SP(), SP(temperature=1.0)]),
                 make_keys([0, 1]), compile=False)
    assert out.logprobs.tolist() == [0.0, 0.0]


def test_greedy_batch_keeps_keys_and_updates_history():
    x = np.array([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]], np.float32)
    keys = make_keys([1, 2])
    hist = make_history([[0], []], 3)
    out = sample(arr(x), BatchParams.build([SP(), SP()]), keys, hist)
    assert out.tokens.tolist() == [1, 0]
    np.testing.assert_array_equal(out.keys.numpy(), keys.numpy())
    assert out.history.tolist() == [[True, True, False], [True, False, False]]


# -- reproducibility -----------------------------------------------------------------

def test_same_seed_same_tokens_different_seed_different_tokens():
    rng = np.random.default_rng(2)
    steps = [rng.normal(size=(1, 5000)).astype(np.float32) for _ in range(30)]
    a, _ = run(steps, [SP(temperature=1.0, seed=42)])
    b, _ = run(steps, [SP(temperature=1.0, seed=42)])
    c, _ = run(steps, [SP(temperature=1.0, seed=43)])
    np.testing.assert_array_equal(a, b)
    assert (a != c).sum() > 20  # 30 draws from ~5000 near-uniform tokens


def batched_case(rng, V=500, S=25):
    """Two seeded rows (given alone) and a batch holding them at positions 3
    and 1 among rows with other params, seeds and filters (which switch on the
    sort, min-p, penalty and logprobs paths)."""
    mine = [SP(temperature=0.8, seed=1234, logprobs=True), SP(temperature=1.0, top_k=7, seed=99)]
    others = [SP(), SP(temperature=0.6, top_p=0.5, seed=7), SP(temperature=1.1, top_k=3, min_p=0.2, seed=8),
              SP(temperature=0.9, repetition_penalty=1.3, seed=None), SP(temperature=2.0, top_p=0.95, seed=9)]
    steps_mine = [rng.normal(size=(2, V)).astype(np.float32) * 3 for _ in range(S)]
    batch = [others[0], mine[1], others[1], mine[0], others[2], others[3], others[4]]
    seeds = [p.seed if p.seed is not None else 555 for p in batch]
    steps = []
    for s in steps_mine:
        full = rng.normal(size=(len(batch), V)).astype(np.float32) * 3
        full[3], full[1] = s[0], s[1]
        steps.append(full)
    hist = [[], [], [], [], [5], list(range(0, V, 3)), []]
    return mine, steps_mine, batch, seeds, steps, hist


def test_row_tokens_do_not_depend_on_the_batch():
    """A seeded row gives the same tokens alone and inside a batch of other rows."""
    mine, steps_mine, batch, seeds, steps, hist = batched_case(np.random.default_rng(3))
    V = steps[0].shape[1]
    alone_a, lp_a = run([s[:1] for s in steps_mine], mine[:1])
    alone_b, _ = run([s[1:] for s in steps_mine], mine[1:])  # top-k only: the topk path
    toks, lps = run(steps, batch, seeds=seeds, history=make_history(hist, V))
    np.testing.assert_array_equal(toks[:, 3], alone_a[:, 0])
    np.testing.assert_array_equal(toks[:, 1], alone_b[:, 0])
    np.testing.assert_array_equal(lps[:, 3], lp_a[:, 0])


def test_compiled_step_matches_eager():
    # One compiled configuration only: on the CPU backend MLX builds each new
    # fused kernel with the system C++ compiler (seconds, cached on disk after).
    _, _, batch, seeds, steps, hist = batched_case(np.random.default_rng(3), S=6)
    V = steps[0].shape[1]
    eager = run(steps, batch, seeds=seeds, history=make_history(hist, V), compile=False)
    compiled = run(steps, batch, seeds=seeds, history=make_history(hist, V), compile=True)
    np.testing.assert_array_equal(eager[0], compiled[0])
    np.testing.assert_allclose(eager[1], compiled[1], rtol=1e-6, atol=1e-6)


def test_bf16_logits_sample_like_their_float32_values():
    rng = np.random.default_rng(4)
    x = arr(rng.normal(size=(3, 800)).astype(np.float32) * 3, mx.bfloat16)
    params = [SP(temperature=0.9, top_p=0.9, seed=s) for s in (1, 2, 3)]
    a, _ = run([x] * 4, params)
    b, _ = run([x.astype(mx.float32)] * 4, params)
    np.testing.assert_array_equal(a, b)


# -- filters never emit a token outside the allowed set ---------------------------

def allowed_set(x: np.ndarray, p: SamplingParams, hist: np.ndarray | None) -> np.ndarray:
    """The tokens the filters allow for one row, computed in numpy (a superset
    with a little slack where float32 rounding could move a boundary)."""
    x = x.astype(np.float32)
    if hist is not None and p.repetition_penalty != 1.0:
        pen = np.float32(p.repetition_penalty)
        x = np.where(hist, np.where(x < 0, x * pen, x / pen), x).astype(np.float32)
    if p.temperature == 0:
        keep = np.zeros(x.shape, bool)
        keep[np.argmax(x)] = True
        return keep
    x = (x / np.float32(p.temperature)).astype(np.float32)
    keep = np.isfinite(x)
    V = x.size
    if 0 < p.top_k < V:
        kth = np.sort(x)[::-1][p.top_k - 1]
        keep &= x >= kth
    if p.top_p < 1.0:
        xs = np.where(keep, x, -np.inf).astype(np.float64)
        probs = np.exp(xs - xs.max())
        probs /= probs.sum()
        order = np.argsort(-xs, kind="stable")
        above = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
        n = int((above < p.top_p + 1e-4).sum())
        keep &= xs >= xs[order[max(n, 1) - 1]]
    if p.min_p > 0.0:
        keep &= (x - x.max()) >= math.log(p.min_p) - 1e-4
    return keep


row_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]),
    top_k=st.sampled_from([0, 1, 2, 5, 20, 100]),
    top_p=st.sampled_from([1.0, 0.95, 0.7, 0.3, 0.05]),
    min_p=st.sampled_from([0.0, 0.05, 0.3, 0.9]),
    repetition_penalty=st.sampled_from([1.0, 1.0, 0.8, 1.5]),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=st.lists(row_params, min_size=1, max_size=4), vocab=st.sampled_from([3, 16, 64]),
       data_seed=st.integers(0, 2**32 - 1))
def test_filters_never_emit_a_token_outside_the_allowed_set(params, vocab, data_seed):
    rng = np.random.default_rng(data_seed)
    reps, steps = 32, 3  # each row 32 times (different seeds) for 3 steps: 96 draws per row
    B = len(params) * reps
    # Logits on a coarse grid: exact ties happen (and must be handled), near-ties
    # closer than float rounding do not.
    x = rng.integers(-40, 41, size=(len(params), vocab)).astype(np.float32) / 8
    if vocab > 3:
        x[rng.random(x.shape) < 0.1] = -np.inf  # tokens the model masks out
        x[np.arange(len(params)), rng.integers(0, vocab, len(params))] = rng.normal(size=len(params))
    hist_np = rng.random((len(params), vocab)) < 0.3
    batch = [p for p in params for _ in range(reps)]
    logits = np.repeat(x, reps, axis=0)
    hist = mx.array(np.repeat(hist_np, reps, axis=0))
    toks, _ = run([logits] * steps, batch, seeds=list(range(data_seed % 1000, data_seed % 1000 + B)),
                  history=hist, carry_history=False)
    for i, p in enumerate(params):
        keep = allowed_set(x[i], p, hist_np[i])
        drawn = np.unique(toks[:, i * reps:(i + 1) * reps])
        assert keep[drawn].all(), (p, x[i], drawn, np.flatnonzero(keep))


def test_top_k_one_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 400)).astype(np.float32)
    params = [SP(temperature=1.5, top_k=1), SP(temperature=1.5, top_p=1e-6), SP(temperature=1.5, min_p=1.0), SP(),
              SP(temperature=1e-30)]  # a vanishing temperature acts as 1e-6: finite, near-greedy
    toks, _ = run([x] * 8, params, seeds=[1, 2, 3, 4, 5])
    assert (toks == x.argmax(axis=-1)).all()


# -- distribution ---------------------------------------------------------------------



def test_chi2_sf_reference_values():
    # Textbook critical values: 5% at df=9 is 16.919, 0.1% at df=4 is 18.467.
    assert abs(chi2_sf(16.919, 9) - 0.05) < 1e-4
    assert abs(chi2_sf(18.467, 4) - 0.001) < 1e-5


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "a token with zero probability was drawn"
    expect = n * probs[support]
    assert expect.min() >= 5, "the test needs >= 5 expected draws per cell"
    return float(((counts[support] - expect) ** 2 / expect).sum()), int(support.sum() - 1)


# The bound: the p-value must exceed 1e-6 (at df = 11, 12 tokens, that is chi2 < 48.87).
# A correct sampler fails it with probability 1e-6 over seed choices; the seeds
# are fixed, so the outcome is deterministic and cannot flake.
P_BOUND = 1e-6
LOGITS = np.array([2.0, 1.5, 1.2, 1.0, 0.5, 0.3, 0.0, -0.2, -0.5, -1.0, -1.5, -2.0], np.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_distribution_matches_softmax(temperature):
    rows, steps = 2000, 10  # 20000 draws: 2000 seeds x 10 steps each
    x = np.tile(LOGITS, (rows, 1))
    toks, _ = run([x] * steps, [SP(temperature=temperature)] * rows, seeds=list(range(rows)))
    counts = np.bincount(toks.ravel(), minlength=LOGITS.size)
    probs = np.exp(log_softmax(LOGITS / temperature))
    stat, df = chi_square(counts, probs)
    assert chi2_sf(stat, df) > P_BOUND, (stat, df, counts, probs * counts.sum())


def test_filtered_distribution_matches_renormalised_softmax():
    """top-k, top-p and min-p together (rows mixed with an unfiltered row, so the
    batch takes the sort path): the draws follow the renormalised kept set."""
    rows, steps = 2000, 10
    T = 0.9
    p_filtered = SP(temperature=T, top_k=8, top_p=0.9, min_p=0.03)
    p_plain = SP(temperature=T)
    params = [p_filtered if i % 2 == 0 else p_plain for i in range(rows)]
    x = np.tile(LOGITS, (rows, 1))
    toks, _ = run([x] * steps, params, seeds=list(range(10_000, 10_000 + rows)))
    z = LOGITS.astype(np.float64) / T
    keep = allowed_set(LOGITS, p_filtered, None)
    # The boundaries must be clear of rounding for this check: top-8, then the
    # nucleus (mass before the last kept token < 0.9 <= mass including it).
    probs_k = np.where(np.arange(12) < 8, np.exp(z - z.max()), 0)
    probs_k /= probs_k.sum()
    cum = np.cumsum(probs_k)
    n = int(np.searchsorted(cum, 0.9) + 1)
    assert abs(cum[n - 1] - 0.9) > 1e-3 and abs(cum[n - 2] - 0.9) > 1e-3
    expect_keep = np.zeros(12, bool)
    expect_keep[:n] = True
    expect_keep &= np.exp(z - z.max()) >= 0.03
    np.testing.assert_array_equal(keep, expect_keep)
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    stat, df = chi_square(np.bincount(toks[:, 0::2].ravel(), minlength=12), probs)
    assert chi2_sf(stat, df) > P_BOUND, (stat, df)
    # The unfiltered rows of the same batch still follow the full softmax.
    stat, df = chi_square(np.bincount(toks[:, 1::2].ravel(), minlength=12), np.exp(log_softmax(z)))
    assert chi2_sf(stat, df) > P_BOUND, (stat, df)


# -- repetition penalty -----------------------------------------------------------------

def test_repetition_penalty_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(6)
    B, V, H = 6, 50, 12
    penalties = [1.0, 1.2, 2.0, 0.7, 1.5, 3.0]
    # Few distinct large logits, so the penalty often changes the argmax.
    x = rng.normal(size=(B, V)).astype(np.float32) * 3
    ids = rng.integers(0, V, size=(B, H))
    ids[:, 0] = x.argmax(axis=1)  # the current favourite was seen
    x[1, :] = -np.abs(x[1, :])  # a row of negative logits only
    ref = np.stack([
        RepetitionPenaltyLogitsProcessor(penalty=penalties[b])(torch.tensor(ids[b:b + 1]),
                                                               torch.tensor(x[b:b + 1])).numpy()[0]
        for b in range(B)])
    hist = make_history(ids.tolist(), V)
    got = apply_repetition_penalty(arr(x), hist, arr(np.array(penalties, np.float32))).numpy()
    np.testing.assert_array_equal(got, ref)
    out = sample(arr(x), BatchParams.build([SP(repetition_penalty=p) for p in penalties]), make_keys(range(B)),
                 hist)
    np.testing.assert_array_equal(out.tokens.numpy(), ref.argmax(axis=1))
    assert (ref.argmax(axis=1) != x.argmax(axis=1)).any()  # the test does exercise the penalty


def test_penalty_needs_history_and_history_grows():
    x = np.array([[3.0, 2.9, 0.0]], np.float32)
    bp = BatchParams.build([SP(repetition_penalty=2.0)])
    with pytest.raises(ValueError, match="history"):
        sample(arr(x), bp, make_keys([0]))
    keys, hist = make_keys([0]), make_history([[]], 3)
    seen = []
    for _ in range(3):
        out = sample(arr(x), bp, keys, hist)
        keys, hist = out.keys, out.history
        seen.append(out.tokens.item())
    assert seen == [0, 1, 0]  # 3.0 -> 1.5 after use, so 2.9 wins, then 1.5 > 1.45
    assert hist.tolist() == [[True, True, False]]


# -- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(min_p=-0.01), "min_p"), (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(seed=1.5), "seed"), (dict(seed="7"), "seed"), (dict(seed=True), "seed"),
    (dict(logprobs="yes"), "logprobs"),
])
def test_bad_params_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SP(**kwargs)


def test_good_params_and_is_greedy():
    assert SP().is_greedy and SP().validate() == SP()
    p = SP(temperature=0.5, top_p=1.0, top_k=0, min_p=1.0, repetition_penalty=0.5, seed=-3, logprobs=True)
    assert not p.is_greedy
    assert SP(seed=2**70).seed == 2**70
    with pytest.raises(ValueError):
        BatchParams.build([])


def test_shape_errors():
    bp = BatchParams.build([SP(), SP()])
    with pytest.raises(ValueError, match="rows"):
        sample(arr(np.zeros((3, 4), np.float32)), bp, make_keys([0, 1, 2]))
    with pytest.raises(ValueError, match="keys"):
        sample(arr(np.zeros((2, 4), np.float32)), bp, make_keys([0]))
    with pytest.raises(ValueError, match="shape"):
        sample(arr(np.zeros((2, 1, 4), np.float32)), bp, make_keys([0, 1]))


# -- logit_bias, presence / frequency penalties, top_logprobs --------------------------------

def penalised_np(x: np.ndarray, p: SamplingParams, prompt: list[int], generated: list[int]) -> np.ndarray:
    """The numpy reference of the processing before the draw, in the documented
    order: logit_bias, repetition penalty (prompt and output), then OpenAI's
    presence and frequency penalties on the generated tokens only."""
    x = x.astype(np.float32).copy()
    for k, v in p.logit_bias:
        x[k] += np.float32(v)
    seen = np.zeros(x.shape, bool)
    seen[list(prompt) + list(generated)] = True
    pen = np.float32(p.repetition_penalty)
    x = np.where(seen, np.where(x < 0, x * pen, x / pen), x).astype(np.float32)
    counts = np.bincount(np.asarray(generated, np.int64), minlength=x.size).astype(np.float32)
    return (x - np.float32(p.presence_penalty) * (counts > 0) - np.float32(p.frequency_penalty) * counts
            ).astype(np.float32)


def run_rows(logits_steps, params, prompts, *, compile=False):
    """Steps a batch through `BatchSampling` (keys, history and counts carried on the
    device) and returns tokens (S, B), logprobs (S, B) and each step's top lists."""
    from amlx.sample import BatchSampling, RowSampling
    from amlx.types import GenerationOptions

    rows = []
    for p, prompt in zip(params, prompts):
        opts = GenerationOptions(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                                 repetition_penalty=p.repetition_penalty, seed=p.seed, logprobs=p.logprobs,
                                 presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                                 logit_bias=dict(p.logit_bias), top_logprobs=p.top_logprobs)
        rows.append(RowSampling(opts, prompt))
    bs = BatchSampling(rows)
    toks, lps, tops = [], [], []
    try:
        for logits in logits_steps:
            step = bs(arr(logits, mx.float32))
            ids, lp, top = step.read()
            for r, t in zip(rows, ids):
                r.observe(t)
            toks.append(ids)
            lps.append(lp)
            tops.append(top)
    finally:
        bs.close()
    return np.array(toks), np.array(lps), tops


def test_logit_bias_matches_transformers_sequence_bias():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import SequenceBiasLogitsProcessor

    rng = np.random.default_rng(11)
    B, V = 4, 40
    x = rng.normal(size=(B, V)).astype(np.float32) * 2
    biases = [{3: 5.0, 7: -100.0, int(x[0].argmax()): -3.5}, {}, {0: 100.0}, {int(x[3].argmax()): -1.25, 39: 2.0}]
    params = [SP(logit_bias=b) for b in biases]
    bp = BatchParams.build(params)
    from amlx.sample import apply_logit_bias

    got = apply_logit_bias(arr(x), bp.bias_ids, bp.bias_values).numpy()
    for b in range(B):
        ref = x[b:b + 1]
        if biases[b]:
            proc = SequenceBiasLogitsProcessor(sequence_bias=[[[k], v] for k, v in biases[b].items()])
            ref = proc(torch.zeros((1, 1), dtype=torch.long), torch.tensor(x[b:b + 1])).numpy()
        np.testing.assert_array_equal(got[b], ref[0])
    out = sample(arr(x), bp, make_keys(range(B)))
    assert out.tokens.tolist() == [int(np.argmax(got[b])) for b in range(B)]
    assert out.tokens.tolist()[2] == 0  # +100 forces a token


def test_presence_and_frequency_penalties_match_numpy_over_steps():
    """Greedy rows over 12 steps: every step's token is the argmax of the numpy
    reference, with counts of the generated tokens carried on the device (the
    prompt does not count for these penalties, only for the repetition penalty)."""
    rng = np.random.default_rng(12)
    B, V, S = 6, 24, 12
    # Few strong favourites, so the penalties keep changing the argmax.
    base = rng.normal(size=(B, V)).astype(np.float32)
    base[:, :4] += 3.0
    params = [SP(presence_penalty=0.7), SP(frequency_penalty=0.4), SP(presence_penalty=-0.5, frequency_penalty=1.3),
              SP(), SP(presence_penalty=2.0, repetition_penalty=1.4, logit_bias={5: 2.5}),
              SP(frequency_penalty=-2.0, presence_penalty=2.0)]
    prompts = [[0, 1], [], [2, 2, 3], [1], [0, 5], [3]]
    steps = [base + rng.normal(size=(B, V)).astype(np.float32) * 0.1 for _ in range(S)]
    toks, _, _ = run_rows(steps, params, prompts)
    for b, p in enumerate(params):
        generated: list[int] = []
        for s in range(S):
            ref = penalised_np(steps[s][b], p, prompts[b], generated)
            assert toks[s, b] == int(np.argmax(ref)), (b, s, p)
            generated.append(int(toks[s, b]))
    assert len(set(toks[:, 0].tolist())) > 1 and len(set(toks[:, 3].tolist())) == 1  # the penalty did act
    from amlx.sample import apply_presence_frequency

    counts = rng.integers(0, 4, size=(B, V)).astype(np.int32)
    pres, freq = rng.uniform(-2, 2, B).astype(np.float32), rng.uniform(-2, 2, B).astype(np.float32)
    got = apply_presence_frequency(arr(base), arr(counts), arr(pres), arr(freq)).numpy()
    want = base - pres[:, None] * (counts > 0) - freq[:, None] * counts
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_sampled_rows_with_bias_and_penalties_stay_in_the_allowed_set():
    """Sampled rows draw only tokens their filters allow on the processed logits."""
    rng = np.random.default_rng(13)
    V, S = 32, 6
    params = [SP(temperature=0.8, top_k=3, presence_penalty=1.5, frequency_penalty=0.5, logit_bias={4: 3.0}, seed=1),
              SP(temperature=1.2, top_p=0.5, frequency_penalty=2.0, seed=2),
              SP(temperature=0.5, min_p=0.3, presence_penalty=-1.0, logit_bias={1: -100.0}, seed=3)]
    x = rng.normal(size=(len(params), V)).astype(np.float32) * 2
    toks, _, _ = run_rows([x] * S, params, [[0]] * len(params))
    for b, p in enumerate(params):
        generated: list[int] = []
        for s in range(S):
            keep = allowed_set(penalised_np(x[b], p, [0], generated), SP(temperature=p.temperature, top_k=p.top_k,
                                                                      top_p=p.top_p, min_p=p.min_p), None)
            assert keep[toks[s, b]], (b, s)
            generated.append(int(toks[s, b]))
    assert 1 not in toks[:, 2]


def test_top_logprobs_are_the_raw_distribution_best_first():
    rng = np.random.default_rng(14)
    B, V = 5, 50
    x = rng.normal(size=(B, V)).astype(np.float32) * 3
    params = [SP(logprobs=True, top_logprobs=5), SP(), SP(temperature=0.9, seed=4, logprobs=True, top_logprobs=1),
              SP(logprobs=True, top_logprobs=20, logit_bias={0: 50.0}, presence_penalty=1.0),
              SP(logprobs=True)]
    toks, lps, tops = run_rows([x, x], params, [[1, 2]] * B)
    ref = log_softmax(x)
    for step in range(2):
        for b, p in enumerate(params):
            top = tops[step][b]
            np.testing.assert_allclose(lps[step, b] if p.logprobs else 0.0,
                                       ref[b, toks[step, b]] if p.logprobs else 0.0, atol=1e-5)
            n = p.top_logprobs
            if not n:
                continue
            got = top[:n]
            order = np.argsort(-ref[b], kind="stable")[:n]
            assert [i for i, _ in got] == order.tolist()
            np.testing.assert_allclose([v for _, v in got], ref[b, order], atol=1e-5)
    assert toks[0, 3] == 0 and tops[0][3][0][0] != 0  # the bias moved the token, not the logprobs
    assert len(tops[0][0]) == 20  # every row gets the batch's widest list; rows keep their own n


def test_top_logprobs_width_is_capped_by_the_vocabulary():
    x = np.array([[0.0, 1.0, 2.0]], np.float32)
    out = sample(arr(x), BatchParams.build([SP(logprobs=True, top_logprobs=20)]), make_keys([0]))
    assert out.top_ids.tolist() == [[2, 1, 0]]
    np.testing.assert_allclose(out.top_logprobs.numpy()[0], log_softmax(x)[0, [2, 1, 0]], atol=1e-6)
    plain = sample(arr(x), BatchParams.build([SP(logprobs=True)]), make_keys([0]))
    assert plain.top_ids is None and plain.top_logprobs is None


def test_new_options_do_not_depend_on_the_batch():
    """A row with bias, penalties and top_logprobs gives the same tokens, logprobs
    and top lists alone as inside a batch of rows with other (or no) options."""
    rng = np.random.default_rng(15)
    V, S = 64, 8
    mine = SP(temperature=0.9, top_p=0.9, presence_penalty=0.8, frequency_penalty=0.3, logit_bias={7: 4.0, 9: -2.0},
              seed=21, logprobs=True, top_logprobs=3)
    plain = SP(temperature=0.7, seed=5)
    others = [SP(), SP(temperature=1.1, top_k=4, seed=9, logprobs=True, top_logprobs=7),
              SP(frequency_penalty=-1.0, logit_bias={1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0}), plain]
    steps = [rng.normal(size=(5, V)).astype(np.float32) * 2 for _ in range(S)]
    batch_toks, batch_lps, batch_tops = run_rows(steps, others[:2] + [mine] + others[2:], [[3, 4]] * 5)
    solo_toks, solo_lps, solo_tops = run_rows([s[2:3] for s in steps], [mine], [[3, 4]])
    np.testing.assert_array_equal(batch_toks[:, 2], solo_toks[:, 0])
    np.testing.assert_allclose(batch_lps[:, 2], solo_lps[:, 0], atol=1e-6)
    for s in range(S):
        assert [i for i, _ in batch_tops[s][2][:3]] == [i for i, _ in solo_tops[s][0]]
    # and a row with none of the options is unaffected by its neighbours' options
    plain_toks, _, _ = run_rows([s[4:5] for s in steps], [plain], [[3, 4]])
    np.testing.assert_array_equal(batch_toks[:, 4], plain_toks[:, 0])


def test_paused_rows_keep_their_counts():
    from amlx.sample import BatchSampling, RowSampling
    from amlx.types import GenerationOptions

    x = arr(np.array([[5.0, 4.0, 0.0]] * 2, np.float32))
    rows = [RowSampling(GenerationOptions(frequency_penalty=2.0), []) for _ in range(2)]
    bs = BatchSampling(rows)
    try:
        first = bs(x).tokens.tolist()
        rows[0].observe(first[0])
        rows[1].observe(first[1])
        second = bs(x, selected=[0]).tokens.tolist()  # row 1 paused: its token is dropped
        rows[0].observe(second[0])
        assert bs.counts.tolist() == [[1, 1, 0], [1, 0, 0]]
        third = bs(x).tokens.tolist()
    finally:
        bs.close()
    assert first == [0, 0] and second[0] == 1 and third == [0, 1]


def test_compiled_step_with_the_new_options_matches_eager():
    rng = np.random.default_rng(16)
    x = rng.normal(size=(3, 40)).astype(np.float32)
    params = [SP(temperature=0.8, seed=1, presence_penalty=1.0, logit_bias={3: 2.0}, logprobs=True, top_logprobs=4),
              SP(frequency_penalty=0.5), SP(temperature=1.0, seed=2, top_k=5)]
    bp = BatchParams.build(params)
    counts = arr(rng.integers(0, 3, size=(3, 40)).astype(np.int32))
    a = sample(arr(x), bp, make_keys([1, 2, 3]), None, counts, compile=False)
    b = sample(arr(x), bp, make_keys([1, 2, 3]), None, counts, compile=True)
    assert a.tokens.tolist() == b.tokens.tolist() and a.top_ids.tolist() == b.top_ids.tolist()
    np.testing.assert_allclose(a.top_logprobs.numpy(), b.top_logprobs.numpy(), atol=1e-6)
    np.testing.assert_array_equal(a.counts.numpy(), b.counts.numpy())
    with pytest.raises(ValueError, match="counts"):
        sample(arr(x), bp, make_keys([1, 2, 3]))


@pytest.mark.parametrize("top_p", [1e-45, 1e-46, 5e-324, float(np.finfo(np.float32).tiny) / 2])
def test_top_p_that_underflows_float32_is_greedy(top_p):
    """Issue 12.8: top_p below float32's range became 0 on the device and every
    draw returned token 0; it now acts as the smallest top_p (greedy)."""
    rng = np.random.default_rng(17)
    x = rng.normal(size=(4, 300)).astype(np.float32)
    x[:, 0] = -5.0  # token 0 is never the argmax
    params = [SP(temperature=1.5, top_p=top_p, seed=s) for s in range(4)]
    toks, _ = run([x] * 6, params)
    assert (toks == x.argmax(axis=-1)).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"), (dict(frequency_penalty="1"), "frequency_penalty"),
    (dict(logit_bias={1: 101.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"), (dict(logit_bias={1: float("inf")}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"), (dict(logit_bias=5), "logit_bias"),
    (dict(logit_bias={2**31: 1.0}), "logit_bias"),
    (dict(top_logprobs=21), "top_logprobs"), (dict(top_logprobs=-1), "top_logprobs"),
    (dict(top_logprobs=3), "logprobs=True"), (dict(top_logprobs=2.0, logprobs=True), "top_logprobs"),
    (dict(top_k=2**31), "top_k"), (dict(temperature=1e9), "temperature"),
    (dict(repetition_penalty=1e-30), "repetition_penalty"), (dict(repetition_penalty=1e6), "repetition_penalty"),
])
def test_bad_new_params_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SP(**kwargs)


def test_vocabulary_checks():
    SP(top_k=50, logit_bias={49: 1.0}).check_vocab(50)
    with pytest.raises(ValueError, match="top_k"):
        SP(top_k=51).check_vocab(50)
    with pytest.raises(ValueError, match="logit_bias token id 50"):
        SP(logit_bias={50: 1.0}).check_vocab(50)
    assert SP(logit_bias={9: 1, 2: -3.5}).logit_bias == ((2, -3.5), (9, 1.0))
