"""resolve_max_tokens and build_params: request sampling fields -> per-choice SamplingParams."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve.engines.base import SamplingParams
from llmserve.errors import ContextLengthExceeded, InvalidRequest
from llmserve.serving.sampling import SamplingRequest, build_params, resolve_max_tokens

# -- resolve_max_tokens -----------------------------------------------------------------------


def test_default_is_the_rest_of_the_context():
    assert resolve_max_tokens(100, None, 2048) == 1948
    assert resolve_max_tokens(2047, None, 2048) == 1


def test_requested_within_the_context_is_kept():
    assert resolve_max_tokens(100, 16, 2048) == 16
    assert resolve_max_tokens(100, 1948, 2048) == 1948  # exactly fills the context


def test_requested_over_the_context():
    with pytest.raises(ContextLengthExceeded) as info:
        resolve_max_tokens(100, 1949, 2048)
    err = info.value
    assert isinstance(err, InvalidRequest)
    assert err.status_code == 400
    assert err.type == "invalid_request_error"
    assert err.code == "context_length_exceeded"
    assert err.param == "max_tokens"
    for number in ("2048", "2049", "100", "1949"):
        assert number in err.message


def test_prompt_fills_the_context_with_no_max_tokens():
    with pytest.raises(ContextLengthExceeded) as info:
        resolve_max_tokens(2048, None, 2048)
    err = info.value
    assert err.status_code == 400
    assert err.code == "context_length_exceeded"
    assert "2048" in err.message
    assert err.param == "messages"


def test_prompt_longer_than_the_context():
    with pytest.raises(ContextLengthExceeded) as info:
        resolve_max_tokens(3000, None, 2048)
    assert "3000" in info.value.message and "2048" in info.value.message
    with pytest.raises(ContextLengthExceeded) as info:
        resolve_max_tokens(3000, 1, 2048)
    assert "3001" in info.value.message and "2048" in info.value.message


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.integers(0, 5000),
    requested=st.none() | st.integers(1, 5000),
    context=st.integers(16, 4096),
)
def test_result_never_overflows_the_context(prompt, requested, context):
    try:
        got = resolve_max_tokens(prompt, requested, context)
    except ContextLengthExceeded:
        room = context - prompt
        assert room < 1 if requested is None else requested > room
    else:
        assert got >= 1
        assert prompt + got <= context
        assert got == (context - prompt if requested is None else requested)


# -- build_params -------------------------------------------------------------------------------


def build(req: SamplingRequest, *, prompt_tokens=10, context_length=100, vocab_size=1000):
    return build_params(
        req, prompt_tokens=prompt_tokens, context_length=context_length, vocab_size=vocab_size
    )


def test_one_params_per_choice_with_request_fields():
    req = SamplingRequest(
        n=3, max_tokens=20, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, seed=7,
        presence_penalty=0.1, frequency_penalty=0.2, repetition_penalty=1.1,
        logit_bias={5: -100.0}, logprobs=2, ignore_eos=True,
    )
    params = build(req)
    assert len(params) == 3
    for i, p in enumerate(params):
        assert isinstance(p, SamplingParams)
        assert p == SamplingParams(
            max_tokens=20, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, seed=7 + i,
            presence_penalty=0.1, frequency_penalty=0.2, repetition_penalty=1.1,
            logit_bias={5: -100.0}, logprobs=2, ignore_eos=True,
        )


def test_default_max_tokens_is_rest_of_context():
    (p,) = build(SamplingRequest(), prompt_tokens=30, context_length=100)
    assert p.max_tokens == 70


def test_over_the_context_raises():
    with pytest.raises(ContextLengthExceeded):
        build(SamplingRequest(max_tokens=91), prompt_tokens=10, context_length=100)


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31])
def test_n_choices_with_seed_get_distinct_derived_seeds(seed):
    params = build(SamplingRequest(n=4, seed=seed))
    assert [p.seed for p in params] == [seed, seed + 1, seed + 2, seed + 3]


def test_same_seed_gives_same_seeds():
    a = build(SamplingRequest(n=3, seed=99))
    b = build(SamplingRequest(n=3, seed=99))
    assert [p.seed for p in a] == [p.seed for p in b]


def test_no_seed_gives_random_seeds():
    params = build(SamplingRequest(n=8))
    seeds = [p.seed for p in params]
    assert all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds)
    assert len(set(seeds)) > 1  # 8 draws of 32 bits: equal only by astronomically bad luck


@pytest.mark.parametrize("token", [-1, 1000, 10**9])
def test_logit_bias_token_outside_vocab(token):
    with pytest.raises(InvalidRequest) as info:
        build(SamplingRequest(logit_bias={token: 1.0}), vocab_size=1000)
    err = info.value
    assert err.status_code == 400
    assert err.param == "logit_bias"
    assert str(token) in err.message
    assert not isinstance(err, ContextLengthExceeded)


def test_logit_bias_tokens_at_vocab_edges_accepted():
    (p,) = build(SamplingRequest(logit_bias={0: 5.0, 999: -5.0}), vocab_size=1000)
    assert p.logit_bias == {0: 5.0, 999: -5.0}

