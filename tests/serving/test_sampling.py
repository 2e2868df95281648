"""resolve_max_tokens and build_params: request sampling fields -> per-choice SamplingParams."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve.engines.base import SamplingParams
from llmserve.errors import ContextLengthExceeded, InvalidRequest
from llmserve.serving.sampling import (
    FLOAT_RANGES,
    GREEDY_BELOW,
    SamplingRequest,
    build_params,
    effective_temperature,
    resolve_max_tokens,
)

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



# -- greedy rules -------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 5e-324, 1e-45, 1e-300, 1e-6, 9.999e-6])
def test_temperature_below_1e_5_is_greedy(temperature):
    params = build(SamplingRequest(n=2, temperature=temperature, seed=1))
    assert [p.temperature for p in params] == [0.0, 0.0]
    assert effective_temperature(SamplingRequest(temperature=temperature)) == 0.0


@pytest.mark.parametrize("temperature", [GREEDY_BELOW, 1e-5, 2e-5, 0.5, 1.0, 2.0])
def test_temperature_from_1e_5_is_kept(temperature):
    (p,) = build(SamplingRequest(temperature=temperature))
    assert p.temperature == temperature


@pytest.mark.parametrize("temperature", [0.0, 1e-45, 0.9, 2.0])
def test_top_p_zero_is_greedy(temperature):
    (p,) = build(SamplingRequest(temperature=temperature, top_p=0.0))
    assert p.temperature == 0.0


def test_tiny_top_p_keeps_the_temperature():
    # only exactly 0 is made greedy; a tiny top_p keeps just the top token in the engine anyway
    (p,) = build(SamplingRequest(temperature=0.9, top_p=1e-9))
    assert (p.temperature, p.top_p) == (0.9, 1e-9)


# -- float ranges -------------------------------------------------------------------------------

FLOATS = sorted(FLOAT_RANGES)


def with_value(name: str, value: float) -> SamplingRequest:
    if name == "logit_bias":
        return SamplingRequest(logit_bias={3: 1.0, 5: value})
    return SamplingRequest(**{name: value})


def param_of(name: str) -> str:
    return "logit_bias.5" if name == "logit_bias" else name


def test_the_ranges():
    assert FLOAT_RANGES == {
        "temperature": (0.0, 2.0),
        "top_p": (0.0, 1.0),
        "min_p": (0.0, 1.0),
        "presence_penalty": (-2.0, 2.0),
        "frequency_penalty": (-2.0, 2.0),
        "repetition_penalty": (0.01, 10.0),
        "logit_bias": (-100.0, 100.0),
    }


@pytest.mark.parametrize("name", FLOATS)
def test_range_edges_accepted(name):
    low, high = FLOAT_RANGES[name]
    for value in (low, high):
        (p,) = build(with_value(name, value))
        got = p.logit_bias[5] if name == "logit_bias" else getattr(p, name)
        assert got == value


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("edge", ["low", "high"])
def test_just_outside_the_range_refused(name, edge):
    low, high = FLOAT_RANGES[name]
    value = math.nextafter(low, -math.inf) if edge == "low" else math.nextafter(high, math.inf)
    with pytest.raises(InvalidRequest) as info:
        build(with_value(name, value))
    err = info.value
    assert err.status_code == 400
    assert err.param == param_of(name)
    assert param_of(name) in err.message


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_refused_naming_the_field(name, value):
    with pytest.raises(InvalidRequest) as info:
        build(with_value(name, value))
    assert info.value.param == param_of(name)
    assert info.value.status_code == 400


@pytest.mark.parametrize("value", [1e-300, 5e-324, 0.0, -1.0])
def test_tiny_repetition_penalty_refused(value):
    """1e-300 would divide logits into inf (then NaN) in float32."""
    with pytest.raises(InvalidRequest) as info:
        build(SamplingRequest(repetition_penalty=value))
    assert info.value.param == "repetition_penalty"


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(FLOATS),
    value=st.floats(allow_nan=True, allow_infinity=True),
    temperature=st.floats(0.0, 2.0),
)
def test_no_nan_or_out_of_range_value_reaches_an_engine(name, value, temperature):
    """Whatever a float holds, build_params either refuses it naming the field, or every
    engine gets finite values within the ranges and a temperature that is 0 or >= 1e-5."""
    req = with_value(name, value)
    if name != "temperature":
        req = dataclasses.replace(req, temperature=temperature)
    try:
        params = build(req)
    except InvalidRequest as err:
        assert err.param == param_of(name)
        low, high = FLOAT_RANGES[name]
        assert not (low <= value <= high)
        return
    for p in params:
        for field in FLOATS:
            values = p.logit_bias.values() if field == "logit_bias" else [getattr(p, field)]
            low, high = FLOAT_RANGES[field]
            assert all(math.isfinite(v) and low <= v <= high for v in values)
        assert p.temperature == 0.0 or p.temperature >= GREEDY_BELOW
