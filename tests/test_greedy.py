"""The greedy-answer comparison the e2e tests use (tests/greedy.py) must fail on a real
difference and pass only a near tie."""

from __future__ import annotations

import pytest
from greedy import TIE, assert_same_greedy, parting


def step(token: str, logprob: float, *alts: tuple[str, float]) -> dict:
    top = [(token, logprob), *alts]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                             for t, lp in top]}


REFERENCE = [step("1", -1.0, ("The", -1.0 - TIE / 2)), step(".", -0.1, ("!", -3.0)),
             step(" Red", -0.5, (" Blue", -2.5))]


def test_the_same_text_is_the_same_answer():
    assert parting("1. Red", REFERENCE) is None


def test_a_near_tie_taken_the_other_way_passes():
    assert parting("The most obvious colour", REFERENCE) is None


def test_a_choice_far_below_the_reference_fails_and_says_where():
    why = parting("1! Red", REFERENCE)
    assert why is not None and why.startswith("step 1:") and "'!'" in why
    with pytest.raises(AssertionError):
        assert_same_greedy("1. Green", REFERENCE)


def test_an_answer_longer_than_the_reference_fails():
    assert parting("1. Red and more", REFERENCE) is not None
