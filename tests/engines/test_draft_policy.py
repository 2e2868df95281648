"""The draft policy: drafts only the lengths that pay for their verification, and learns from
guesses whether drafted or not."""

from __future__ import annotations

import pytest

from llmserve.engines.draft_policy import Acceptance, DraftPolicy

LINEAR = [0.011 + 0.009 * d for d in range(6)]  # measured: the bundled model on an AVX2 EPYC
FLAT = [0.020 + 0.0005 * d for d in range(6)]  # a GPU: a few more tokens cost nearly nothing


def test_cost_ratios_are_against_a_plain_step_and_never_fall():
    policy = DraftPolicy([0.010, 0.018, 0.017, 0.030])
    assert policy.cost_ratio == pytest.approx((1.0, 1.8, 1.8, 3.0))
    assert policy.max_length == 3
    with pytest.raises(ValueError):
        DraftPolicy([])


def test_where_verifying_is_nearly_free_any_fair_guess_drafts():
    policy = DraftPolicy(FLAT)
    assert policy.length(0.9, 5) == 5
    assert 3 <= policy.length(0.5, 5) < 5  # the last guesses would hardly ever be reached
    assert policy.length(0.3, 2) == 2  # no more than was guessed
    assert policy.length(0.0, 5) == 0


def test_where_a_token_costs_almost_a_step_only_a_copy_drafts():
    policy = DraftPolicy(LINEAR)
    assert policy.length(0.5, 5) == 0
    assert policy.length(0.8, 5) == 0
    assert policy.length(0.99, 5) == 5
    expected = sum(0.99 ** i for i in range(6))
    assert policy.gain(0.99, 5) == pytest.approx(expected / policy.cost_ratio[5])


def test_acceptance_follows_the_record():
    a = Acceptance(0.5)
    a.update(10, 0)
    assert a.p > 0.9
    for _ in range(10):
        a.update(0, 1)
    assert a.p < 0.2


def test_observed_steps_correct_a_skewed_measurement():
    # measured while the machine was busy with other work: drafting looks free
    policy = DraftPolicy([0.050, 0.020, 0.021, 0.022])
    assert policy.length(0.5, 3) == 3
    for _ in range(100):  # what steps really take
        policy.observe(0, 0.010)
        policy.observe(3, 0.040)
        policy.observe(1, 0.020)
    assert policy.cost_ratio[3] == pytest.approx(4.0, rel=0.05)
    assert policy.length(0.5, 3) == 0
