"""Adaptive draft length (amlx.speculative.adaptive): the cost model and the per-row controller."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx.speculative.adaptive import AdaptiveLength, CostModel, batch_width, expected_tokens

alphas = st.floats(0.0, 1.0)


@given(alpha=alphas, k=st.integers(0, 8))
def test_expected_tokens_is_the_sum_of_the_acceptance_probabilities(alpha, k):
    assert expected_tokens(alpha, k) == pytest.approx(sum(alpha ** i for i in range(k + 1)), rel=1e-9, abs=1e-12)


@settings(max_examples=200)
@given(alpha=alphas, slope=st.floats(0.0, 1.0), draft=st.floats(0.0, 0.5), max_tokens=st.integers(0, 8))
def test_best_length_maximises_tokens_per_cost(alpha, slope, draft, max_tokens):
    cost = CostModel.linear(8, slope, draft)
    k = cost.best_length(alpha, max_tokens)
    rates = [expected_tokens(alpha, j) / (1 + slope * j + draft * j) for j in range(max_tokens + 1)]
    assert 0 <= k <= max_tokens
    assert rates[k] == pytest.approx(max(rates), rel=1e-9)
    assert k == 0 or rates[k] > 1.0  # drafting only where it beats plain steps


@given(alpha=alphas, c1=st.floats(1.0, 2.5), draft=st.floats(0.0, 0.5))
def test_one_draft_pays_exactly_above_the_derived_threshold(alpha, c1, draft):
    """With one draft: 1 + alpha tokens for c1 + draft units pays iff alpha > c1 + draft - 1."""
    cost = CostModel((1.0, c1), draft)
    threshold = c1 + draft - 1.0
    if abs(alpha - threshold) > 1e-9:
        assert (cost.best_length(alpha, 1) == 1) == (alpha > threshold)


@given(a=alphas, b=alphas, slope=st.floats(0.0, 1.0))
def test_more_acceptance_never_means_shorter_drafts(a, b, slope):
    cost = CostModel.linear(8, slope)
    lo, hi = sorted((a, b))
    assert cost.best_length(lo, 8) <= cost.best_length(hi, 8)


def test_lengths_grow_when_drafts_are_accepted_and_shrink_to_zero_when_not():
    ctl = AdaptiveLength(CostModel.linear(6, 0.1), 6)
    start = ctl.length
    for _ in range(20):
        ctl.observe(ctl.length, ctl.length)
    assert ctl.length == 6 > start - 1 and ctl.alpha > 0.9
    seen = []
    for _ in range(60):
        seen.append(ctl.observe(ctl.length, 0))
        if ctl.length == 0:
            break
    assert ctl.length == 0
    assert seen == sorted(seen, reverse=True)  # shrinking all the way


def test_a_row_that_stopped_drafting_tries_again_later_and_rarely_when_it_keeps_failing():
    ctl = AdaptiveLength(CostModel.linear(4, 0.3), 4, prior=0.6)
    drafted_steps, steps = 0, 2000
    for _ in range(steps):
        k = ctl.length
        drafted_steps += k > 0
        ctl.observe(k, 0)  # nothing is ever accepted
    assert 0 < drafted_steps < steps * 0.05


@pytest.mark.parametrize("true_alpha", [0.2, 0.5, 0.8, 0.95])
def test_the_controller_settles_near_the_best_length_for_the_true_acceptance(true_alpha):
    cost = CostModel.linear(8, 0.15)
    ctl = AdaptiveLength(cost, 8)
    rng = random.Random(1)
    tokens = units = 0.0
    for step in range(3000):
        k = ctl.length
        a = 0
        while a < k and rng.random() < true_alpha:
            a += 1
        ctl.observe(k, a)
        if step >= 500:
            tokens += a + 1
            units += cost.step_cost(k)
    best = max(cost.speedup(true_alpha, k) for k in range(9))
    assert tokens / units > 0.9 * best


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="verify_cost\\[0\\]"):
        CostModel((1.2, 1.5))
    with pytest.raises(ValueError, match="decrease"):
        CostModel((1.0, 1.5, 1.2))
    with pytest.raises(ValueError, match="draft_cost"):
        CostModel((1.0,), -0.1)
    with pytest.raises(ValueError, match="max_tokens"):
        AdaptiveLength(CostModel.linear(2, 0.1), -1)
    with pytest.raises(ValueError, match="decay"):
        AdaptiveLength(CostModel.linear(2, 0.1), 2, decay=0.0)
    with pytest.raises(ValueError, match="accepted"):
        AdaptiveLength(CostModel.linear(2, 0.1), 2).observe(1, 2)


def test_a_batch_drafts_only_when_its_rows_together_pay_for_the_wider_pass():
    cost = CostModel.linear(4, 0.2)
    eager = AdaptiveLength(cost, 4)
    for _ in range(30):
        eager.observe(eager.length, eager.length)
    idle = AdaptiveLength(cost, 4)
    for _ in range(60):
        idle.observe(idle.length, 0)
    assert eager.length == 4 and idle.length == 0
    assert batch_width([], cost) == 0
    assert batch_width([idle], cost) == 0
    assert batch_width([eager], cost) == 4
    # one copying row among many that do not draft: the pass's width would cost them all
    assert batch_width([eager] + [idle] * 7, cost) == 0
    assert 0 < batch_width([eager] * 4 + [idle] * 2, cost) <= 4


@settings(max_examples=100)
@given(alphas=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6), slope=st.floats(0.0, 0.6))
def test_batch_width_maximises_the_batch_tokens_per_cost(alphas, slope):
    cost = CostModel.linear(5, slope)
    rows = []
    for a in alphas:
        row = AdaptiveLength(cost, 5, prior=a, prior_weight=1.0)
        rows.append(row)
    k = batch_width(rows, cost)
    rate = [sum(expected_tokens(r.alpha, min(r.length, j)) for r in rows) / (len(rows) * cost.step_cost(j))
            for j in range(max(r.length for r in rows) + 1)]
    assert rate[k] == pytest.approx(max(rate), rel=1e-6)


def test_measured_cost_model_from_timings():
    """CostModel.measured: verify and draft costs over the plain step's time; a longer
    pass never cheaper than a shorter one (noise), none below the plain step."""
    verify_s = {1: 0.012, 2: 0.011, 3: 0.016, 4: 0.016}
    cost = CostModel.measured(4, 0.010, verify_s.__getitem__, 0.003)
    assert cost.verify_cost == pytest.approx((1.0, 1.2, 1.2, 1.6, 1.6))
    assert cost.draft_cost == pytest.approx(0.3)
    assert CostModel.measured(2, 0.010, lambda k: 0.005).verify_cost == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        CostModel.measured(2, 0.0, lambda k: 0.01)


def test_adaptive_length_takes_a_new_cost_model():
    """`use` swaps the cost model and recomputes the length from the same evidence."""
    cheap = CostModel.linear(4, 0.0)
    dear = CostModel.linear(4, 10.0)
    adaptive = AdaptiveLength(cheap, 4)
    assert adaptive.length == 4
    assert adaptive.use(dear) == 0 and adaptive.length == 0 and adaptive.cost is dear
    assert adaptive.use(cheap) == 4
