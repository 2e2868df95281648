"""Request models: OpenAI fields parsed, unknown ones refused, unsupported ones refused by name."""

from __future__ import annotations

import json
import math

import pydantic
import pytest
from openai_schema import SCHEMAS_PATH

from llmserve.api.errors import validation_error
from llmserve.api.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from llmserve.api.responses_protocol import CreateResponseRequest
from llmserve.errors import InvalidRequest, UnsupportedParameter
from llmserve.serving.sampling import FLOAT_RANGES

USER = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": USER, **fields}
    return ChatCompletionRequest.model_validate(body)


def completion(**fields) -> CompletionRequest:
    body = {"model": "m", "prompt": "Hi", **fields}
    return CompletionRequest.model_validate(body)


# -- unknown and unsupported fields -------------------------------------------------------------


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completion"])
def test_unknown_field_refused(make):
    with pytest.raises(InvalidRequest) as info:
        make(foo=1)
    err = info.value
    assert not isinstance(err, UnsupportedParameter)
    assert err.message == "Unrecognized request argument supplied: foo"
    assert err.param == "foo"
    assert err.status_code == 400
    assert err.type == "invalid_request_error"


def test_unknown_field_refused_even_when_null():
    with pytest.raises(InvalidRequest, match="Unrecognized request argument supplied: bar"):
        chat(bar=None)


CHAT_UNSUPPORTED = {
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "verbosity": "low",
    "suffix": "x",
    "moderation": {"model": "omni-moderation-latest"},
}


@pytest.mark.parametrize("name", sorted(CHAT_UNSUPPORTED))
def test_chat_unsupported_field_refused_by_name(name):
    with pytest.raises(UnsupportedParameter) as info:
        chat(**{name: CHAT_UNSUPPORTED[name]})
    err = info.value
    assert err.param == name
    assert name in err.message
    assert err.code == "unsupported_parameter"
    assert err.status_code == 400


@pytest.mark.parametrize("name", sorted(CHAT_UNSUPPORTED))
def test_chat_unsupported_field_set_to_null_is_accepted(name):
    chat(**{name: None})


# Values of unsupported fields that ask for nothing beyond what is served: accepted.
CHAT_HARMLESS = {"modalities": ["text"], "verbosity": "medium", "service_tier": "auto"}


@pytest.mark.parametrize("name", sorted(CHAT_HARMLESS))
def test_chat_harmless_value_of_unsupported_field_accepted(name):
    chat(**{name: CHAT_HARMLESS[name]})


@pytest.mark.parametrize("name,value", [
    ("modalities", ["audio"]), ("modalities", ["text", "audio"]), ("verbosity", "high"),
    ("service_tier", "flex"), ("service_tier", "priority"), ("service_tier", "scale"),
])
def test_chat_value_asking_for_more_refused_by_name(name, value):
    with pytest.raises(UnsupportedParameter) as info:
        chat(**{name: value})
    assert info.value.param == name
    assert name in info.value.message


def test_responses_default_verbosity_and_tier_accepted_others_refused_by_name():
    def response(**fields) -> CreateResponseRequest:
        return CreateResponseRequest.model_validate({"model": "m", "input": "Hi", **fields})

    response(text={"verbosity": "medium"}, service_tier="default")
    response(text={"verbosity": None}, service_tier=None)
    for fields, param in [({"text": {"verbosity": "low"}}, "text.verbosity"),
                          ({"service_tier": "flex"}, "service_tier")]:
        with pytest.raises(UnsupportedParameter) as info:
            response(**fields)
        assert info.value.param == param


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completion"])
def test_n_null_is_the_default(make):
    assert make(n=None).n == 1


def test_every_nullable_chat_field_of_the_spec_takes_null():
    """A client may send any field the spec makes nullable as null (the SDK does, for a
    field set to None): none is refused, not even one this server does not serve."""
    spec = json.loads(SCHEMAS_PATH.read_text())["components"]["schemas"]

    def properties(schema: dict) -> dict:
        if "$ref" in schema:
            return properties(spec[schema["$ref"].rsplit("/", 1)[-1]])
        found = dict(schema.get("properties", {}))
        for part in schema.get("allOf", []):
            found.update(properties(part))
        return found

    def takes_null(s: dict) -> bool:
        kinds = s.get("type")
        return (kinds == "null" or isinstance(kinds, list) and "null" in kinds
                or any(takes_null(alt) for alt in s.get("anyOf", [])))

    fields = properties(spec["CreateChatCompletionRequest"])
    nullable = [k for k, v in fields.items() if takes_null(v)]
    assert {"n", "moderation", "prompt_cache_retention", "temperature"} <= set(nullable)
    chat(**dict.fromkeys(nullable))


def test_completion_suffix_unsupported():
    with pytest.raises(UnsupportedParameter) as info:
        completion(suffix="end")
    assert info.value.param == "suffix"
    completion(suffix=None)


def test_chat_only_fields_are_unknown_on_completions():
    with pytest.raises(InvalidRequest) as info:
        completion(tools=[])
    assert not isinstance(info.value, UnsupportedParameter)
    assert info.value.param == "tools"


def test_harmless_fields_accepted():
    r = chat(store=False, metadata={"k": "v"}, service_tier="default", user="u",
             prompt_cache_key="k", safety_identifier="s")
    assert r.metadata == {"k": "v"}


# -- messages ---------------------------------------------------------------------------------


def test_content_as_array_of_text_parts_is_joined():
    r = chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"},
    ]}])
    assert r.template_messages() == [{"role": "user", "content": "Hello, world"}]


def test_refusal_part_is_text():
    r = chat(messages=[
        *USER,
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
    ])
    assert r.template_messages()[1] == {"role": "assistant", "content": "No."}


def test_image_part_unsupported():
    r = chat(messages=[
        {"role": "system", "content": "s"},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ]},
    ])
    with pytest.raises(UnsupportedParameter) as info:
        r.template_messages()
    assert info.value.param == "messages.1.content.1.type"
    assert "image_url" in info.value.message


def test_text_part_without_string_text_is_invalid():
    r = chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])
    with pytest.raises(InvalidRequest) as info:
        r.template_messages()
    assert info.value.param == "messages.0.content.0.text"


def test_developer_role_becomes_system():
    r = chat(messages=[{"role": "developer", "content": "Be terse."}, *USER])
    assert r.template_messages() == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
    ]
    assert r.messages[0].role == "developer"  # the request itself is unchanged


def test_null_content_becomes_empty_and_extra_fields_pass_through():
    r = chat(messages=[*USER, {"role": "assistant", "content": None, "name": "bot"}])
    assert r.template_messages()[1] == {"role": "assistant", "content": "", "name": "bot"}


def test_unknown_role_and_empty_messages_are_validation_errors():
    with pytest.raises(pydantic.ValidationError):
        chat(messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(pydantic.ValidationError):
        chat(messages=[])


# -- streaming and logprobs options -------------------------------------------------------------


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completion"])
@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_without_stream_refused(make, stream):
    fields = {"stream_options": {"include_usage": True}}
    if stream is not None:
        fields["stream"] = stream
    with pytest.raises(InvalidRequest) as info:
        make(**fields)
    assert info.value.param == "stream_options"


def test_stream_options_with_stream():
    r = chat(stream=True, stream_options={"include_usage": True})
    assert r.include_usage is True
    assert chat(stream=True).include_usage is False
    assert chat(stream=True, stream_options={"include_obfuscation": False}).include_usage is False


def test_stream_options_unknown_key_is_validation_error():
    with pytest.raises(pydantic.ValidationError):
        chat(stream=True, stream_options={"bogus": True})


@pytest.mark.parametrize("logprobs", [None, False])
def test_top_logprobs_without_logprobs_refused(logprobs):
    fields = {"top_logprobs": 3}
    if logprobs is not None:
        fields["logprobs"] = logprobs
    with pytest.raises(InvalidRequest) as info:
        chat(**fields)
    assert info.value.param == "top_logprobs"


def test_chat_logprobs_to_sampling():
    assert chat().to_sampling().logprobs is None
    assert chat(logprobs=False).to_sampling().logprobs is None
    assert chat(logprobs=True).to_sampling().logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).to_sampling().logprobs == 5


def test_completion_logprobs_to_sampling():
    assert completion().to_sampling().logprobs is None
    assert completion(logprobs=0).to_sampling().logprobs == 0
    assert completion(logprobs=3).to_sampling().logprobs == 3


# -- max tokens -----------------------------------------------------------------------------------


def test_max_completion_tokens_takes_precedence():
    assert chat(max_tokens=10, max_completion_tokens=20).to_sampling().max_tokens == 20
    assert chat(max_tokens=30, max_completion_tokens=5).to_sampling().max_tokens == 5
    assert chat(max_tokens=10).to_sampling().max_tokens == 10
    assert chat(max_completion_tokens=7).to_sampling().max_tokens == 7
    assert chat().to_sampling().max_tokens is None


def test_completion_max_tokens_defaults_to_16():
    assert completion().to_sampling().max_tokens == 16
    assert completion(max_tokens=100).to_sampling().max_tokens == 100
    assert completion(max_tokens=None).to_sampling().max_tokens is None


# -- sampling fields -----------------------------------------------------------------------------


def test_sampling_defaults():
    s = chat().to_sampling()
    assert (s.n, s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.0, 0.0, 1.0)
    assert s.logit_bias == {} and s.ignore_eos is False


def test_sampling_fields_carried():
    s = chat(n=2, temperature=0.3, top_p=0.8, top_k=20, min_p=0.1, seed=5,
             presence_penalty=-1, frequency_penalty=1.5, repetition_penalty=1.2,
             ignore_eos=True).to_sampling()
    assert (s.n, s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (2, 0.3, 0.8, 20, 0.1, 5)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (-1, 1.5, 1.2)
    assert s.ignore_eos is True


def test_top_k_minus_one_means_off():
    assert chat(top_k=-1).to_sampling().top_k == 0


def test_temperature_and_top_p_carried_as_sent():
    """The greedy rules (top_p 0, temperature below 1e-5) are the serving core's, applied in
    build_params for every engine alike (tests/serving/test_sampling.py)."""
    s = chat(top_p=0.0, temperature=0.9).to_sampling()
    assert (s.temperature, s.top_p) == (0.9, 0.0)
    assert chat(temperature=1e-45).to_sampling().temperature == 1e-45


def test_logit_bias_keys_become_token_ids():
    assert chat(logit_bias={"50256": -100, "7": 2.5}).to_sampling().logit_bias == {
        50256: -100.0, 7: 2.5,
    }


def test_logit_bias_non_integer_key_refused():
    r = chat(logit_bias={"hello": 1})
    with pytest.raises(InvalidRequest) as info:
        r.to_sampling()
    assert info.value.param == "logit_bias"


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 2.5},
        {"temperature": -0.1},
        {"top_p": 1.5},
        {"n": 0},
        {"n": 129},
        {"presence_penalty": 2.1},
        {"frequency_penalty": -2.1},
        {"logit_bias": {"1": 101}},
        {"max_tokens": 0},
        {"max_completion_tokens": 0},
        {"logprobs": True, "top_logprobs": 21},
        {"min_p": 1.5},
        {"repetition_penalty": 0},
        {"repetition_penalty": 10.5},
        {"min_p": -0.1},
        {"top_p": -0.1},
        {"logit_bias": {"1": -101}},
        {"top_k": -2},
    ],
)
def test_range_violations_are_validation_errors(fields):
    with pytest.raises(pydantic.ValidationError):
        chat(**fields)


FLOAT_FIELDS = sorted(FLOAT_RANGES)


def _field_value(name: str, value):
    return {name: {"1": value}} if name == "logit_bias" else {name: value}


def _loc(name: str) -> tuple:
    return (name, "1") if name == "logit_bias" else (name,)


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completion"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_float_ranges_are_the_serving_cores(make, name):
    """Each float field accepts exactly the range the serving core checks (FLOAT_RANGES)."""
    low, high = FLOAT_RANGES[name]
    for ok in (low, high, (low + high) / 2):
        make(**_field_value(name, ok))
    for bad in (math.nextafter(low, -math.inf), math.nextafter(high, math.inf)):
        with pytest.raises(pydantic.ValidationError) as info:
            make(**_field_value(name, bad))
        assert info.value.errors()[0]["loc"] == _loc(name)


@pytest.mark.parametrize("make", [chat, completion], ids=["chat", "completion"])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, "NaN", "nan", "inf", "-Infinity"],
    ids=["nan", "inf", "-inf", "str-NaN", "str-nan", "str-inf", "str--Infinity"],
)
def test_non_finite_floats_refused_naming_the_field(make, name, value):
    with pytest.raises(pydantic.ValidationError) as info:
        make(**_field_value(name, value))
    [err] = info.value.errors()
    assert err["loc"] == _loc(name)
    assert err["type"] == "finite_number"
    # as the API answers it: a 400 naming the field
    api = validation_error(info.value.errors(include_url=False))
    assert api.status_code == 400
    assert api.param == ".".join(_loc(name))
    assert api.param in api.message and "finite" in api.message


@pytest.mark.parametrize("value", [0.0, 1e-300, 0.009999])
def test_repetition_penalty_below_a_hundredth_refused(value):
    with pytest.raises(pydantic.ValidationError) as info:
        chat(repetition_penalty=value)
    assert info.value.errors()[0]["loc"] == ("repetition_penalty",)


def test_tiny_temperatures_are_in_range():
    for t in (1e-45, 5e-324, 1e-6):
        assert chat(temperature=t).temperature == t


def test_completion_range_violations():
    with pytest.raises(pydantic.ValidationError):
        completion(logprobs=21)
    with pytest.raises(pydantic.ValidationError):
        completion(max_tokens=0)
    with pytest.raises(pydantic.ValidationError):
        completion(best_of=0)


def test_model_is_required():
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate({"messages": USER})
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest.model_validate({"prompt": "x"})


@pytest.mark.parametrize(
    "stop, expected",
    [(None, []), ("\n", ["\n"]), (["a", "b"], ["a", "b"]), ([], [])],
)
def test_stop_list(stop, expected):
    assert chat(stop=stop).stop_list == expected
    assert completion(stop=stop).stop_list == expected


# -- completions prompts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("Once upon", ["Once upon"]),
        ("", [""]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompt_forms(prompt, expected):
    assert completion(prompt=prompt).prompts() == expected


def test_token_prompt_stays_ints():
    (p,) = completion(prompt=[10, 20]).prompts()
    assert p == [10, 20] and all(type(t) is int for t in p)


def test_empty_prompt_list_refused():
    with pytest.raises(InvalidRequest) as info:
        completion(prompt=[]).prompts()
    assert info.value.param == "prompt"


@pytest.mark.parametrize("prompt", [None, 5, ["a", 1], [[1], "a"], {"x": 1}])
def test_bad_prompt_types_are_validation_errors(prompt):
    with pytest.raises(pydantic.ValidationError):
        completion(prompt=prompt)


def test_best_of_different_from_n_refused():
    with pytest.raises(UnsupportedParameter) as info:
        completion(best_of=2)
    assert info.value.param == "best_of"
    with pytest.raises(UnsupportedParameter):
        completion(n=3, best_of=2)
    assert completion(n=2, best_of=2).to_sampling().n == 2
    assert completion(best_of=1).to_sampling().n == 1


def test_echo_with_logprobs_refused():
    with pytest.raises(UnsupportedParameter) as info:
        completion(echo=True, logprobs=1)
    assert info.value.param == "echo"
    assert completion(echo=True).echo is True
    assert completion(echo=False, logprobs=1).to_sampling().logprobs == 1


# -- tools and response_format ----------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("fields, param", [
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [TOOL, TOOL]}, "tools"),
])
def test_tool_refusals(fields, param):
    with pytest.raises(InvalidRequest) as info:
        chat(**fields)
    assert info.value.param == param


def test_output_request_from_the_fields():
    req = chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}},
               parallel_tool_calls=False,
               response_format={"type": "json_schema",
                                "json_schema": {"name": "x", "schema": {"type": "object"},
                                                "strict": True}}).output_request()
    assert [t.name for t in req.tools] == ["f"] and req.tools[0].parameters == {"type": "object"}
    assert (req.choice.mode, req.choice.name, req.parallel) == ("named", "f", False)
    assert req.response_format["json_schema"]["schema"] == {"type": "object"}
    plain = chat(tools=[{"type": "function", "function": {"name": "g"}}]).output_request()
    assert plain.choice.mode == "auto" and plain.parallel is None  # the format decides
    assert plain.tools[0].parameters == {"type": "object"}


# -- /tokenize --------------------------------------------------------------------------------


def test_tokenize_defaults_are_vllm_s():
    prompt = TokenizeRequest.model_validate({"model": "m", "prompt": "Hi"})
    assert not prompt.chat and prompt.special_tokens  # BOS as a completion adds it
    chat_ = TokenizeRequest.model_validate({"model": "m", "messages": USER})
    assert chat_.chat and not chat_.special_tokens and chat_.generation_prompt
    assert chat_.template_messages() == [{"role": "user", "content": "Hi"}]
    assert chat_.output_request().tools == []
    # continue_final_message alone turns the generation prompt off (vLLM would need both)
    cont = TokenizeRequest.model_validate({"model": "m", "messages": USER,
                                           "continue_final_message": True})
    assert not cont.generation_prompt


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "messages": USER}, "prompt"),
    ({}, "messages"),
    ({"prompt": "x", "chat_template_kwargs": {}}, "chat_template_kwargs"),
    ({"messages": USER, "add_generation_prompt": True, "continue_final_message": True},
     "continue_final_message"),
])
def test_tokenize_shapes_refused(body, param):
    with pytest.raises(InvalidRequest) as err:
        TokenizeRequest.model_validate({"model": "m", **body})
    assert err.value.param == param


def test_tokenize_client_template_refused_by_name():
    with pytest.raises(UnsupportedParameter) as err:
        TokenizeRequest.model_validate({"model": "m", "messages": USER, "chat_template": "x"})
    assert err.value.param == "chat_template"
