"""End-to-end: tools and structured output on the real server and the bundled model, greedy,
through the official client and raw SSE. Guarantees come from constrained decoding: a 135M
model would not write valid calls by itself."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
from conftest import MODEL, run_server
from engine_fixtures import *  # engine, server, client, async_client, http
from greedy import assert_same_greedy
from openai_schema import validate
from sse import stream_post
from test_errors_e2e import CHAT, assert_error, chat_body

# -- every test here runs on each engine: grammars are applied by each, the same way ----------


WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 40}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER_PARAMS, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone",
                                      "parameters": TIME_PARAMS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def create(client: openai.OpenAI, **kw):
    kw.setdefault("max_tokens", 120)
    return client.chat.completions.create(model=MODEL, temperature=0, **kw)


def assert_valid_calls(calls, *, names=None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or SCHEMAS)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def streamed(client: openai.OpenAI, **kw):
    """The stream's chunks, validated, and the calls and content they assemble into."""
    kw.setdefault("max_tokens", 120)
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=MODEL, temperature=0, stream=True, **kw):
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for c in delta.tool_calls or ():
                if c.index not in calls:
                    assert c.id and c.function.name, "a call's first delta has id and name"
                    calls[c.index] = {"id": c.id, "name": c.function.name, "arguments": ""}
                else:
                    assert c.id is None and (c.function.name is None), "id and name come once"
                calls[c.index]["arguments"] += c.function.arguments or ""
            if choice.finish_reason:
                finish = choice.finish_reason
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_time"}}])
def test_forced_calls_are_valid_streamed_and_not(client, choice):
    kw = {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False}
    # Greedy text is the same for the same request once its prompt is in the cache (read
    # whole, a prompt's last logits differ from those of a cached prompt in the last bits).
    create(client, **kw)
    r = create(client, **kw)
    validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    message = r.choices[0].message
    named = isinstance(choice, dict)
    assert_valid_calls(message.tool_calls, names=["get_time"] if named else None)
    assert message.content is None
    assert r.choices[0].finish_reason == ("stop" if named else "tool_calls")

    content, calls, finish = streamed(client, **kw)
    assert content == ""
    assert finish == r.choices[0].finish_reason
    # Streamed and not: the same calls (ids aside).
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls]


def test_parallel_false_makes_one_call(client):
    r = create(client, messages=ASK, tools=TOOLS, tool_choice="required",
               parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1


def test_parallel_calls_each_valid(client):
    """Several calls (a small model may repeat them until max_tokens): every finished one is
    valid; only the last can be cut off, and only when the answer was."""
    r = create(client, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200,
               parallel_tool_calls=True)  # unset: one call, on a template without them
    calls = r.choices[0].message.tool_calls
    if r.choices[0].finish_reason == "length":
        calls = calls[:-1]
    else:
        assert r.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(calls)


def test_auto_answers_or_calls(client):
    r = create(client, messages=ASK, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)
    validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert_valid_calls(choice.message.tool_calls)
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.message.content and "{" not in choice.message.content[:1]
        assert choice.finish_reason in ("stop", "length")


def test_none_gives_text(client):
    r = create(client, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=16)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content


def test_a_tool_result_turn(client):
    first = create(client, messages=ASK, tools=TOOLS, tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    r = create(client, messages=history, tools=TOOLS, tool_choice="none", max_tokens=24)
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_json_schema_output_validates_streamed_and_not(client):
    fmt = {"type": "json_schema",
           "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Invent a person."}]
    r = create(client, messages=messages, response_format=fmt)
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert r.choices[0].finish_reason == "stop"
    content, calls, finish = streamed(client, messages=messages, response_format=fmt)
    assert content == text and calls == [] and finish == "stop"


def test_json_object_output_parses(client):
    r = create(client, messages=[{"role": "user", "content": "Describe a cat in JSON."}],
               response_format={"type": "json_object"}, max_tokens=200)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut off by max_tokens: still the start of an object
        assert r.choices[0].message.content.startswith("{")


def test_sdk_parse_helper_and_pydantic_function_tool(client):
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=30)
        age: int = Field(ge=0, le=150)

    class GetWeather(BaseModel):
        city: str = Field(max_length=40)

    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person, temperature=0, max_tokens=120,
    )
    assert isinstance(r.choices[0].message.parsed, Person)
    r = client.chat.completions.parse(
        model=MODEL, messages=ASK, tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=120,
    )
    call = r.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_half_constrained_half_free_concurrently(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    def one(i: int):
        if i % 2:
            r = create(client, messages=[{"role": "user", "content": f"Invent person {i}."}],
                       response_format=fmt)
            jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
        else:
            r = create(client, messages=[{"role": "user", "content": f"Count to {i}."}],
                       max_tokens=16)
            assert r.choices[0].message.content
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        finishes = list(pool.map(one, range(16)))
    assert all(f in ("stop", "length") for f in finishes)


def test_free_output_is_the_same_beside_constrained(client, http):
    """A free request's greedy text does not change when constrained ones share its batch."""
    messages = [{"role": "user", "content": "Name three colors."}]
    alone = create(client, messages=messages, max_tokens=24, logprobs=True, top_logprobs=5)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(create, client, messages=ASK, response_format=fmt)
                  for _ in range(3)]
        beside = create(client, messages=messages, max_tokens=24).choices[0].message.content
        [f.result() for f in others]
    # A mask leaking into this row would move its logprobs by nats; batch rounding may tip a
    # near tie (tests/greedy.py).
    assert_same_greedy(beside, alone.choices[0].logprobs.content)


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [*TOOLS, TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "strict": True,
        "parameters": {"type": "object", "properties": {"a": {"type": "string",
                                                             "pattern": "(?=x)"}}}}}]},
     "tools.0.function.parameters"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_refusals_name_the_param(http, extra, param):
    err = assert_error(http.post(CHAT, json=chat_body(**extra)), 400)
    assert err["param"] == param or err["param"].startswith(param + "."), err
    r = stream_post(http, CHAT, chat_body(stream=True, **extra))
    assert r.status == 400


# -- LangChain, unchanged -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(
        model=MODEL, base_url=server.base_url, api_key=server.api_key, temperature=0,
        max_tokens=120, max_retries=0,
    )


def test_langchain_bind_tools(chat_model):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    llm = chat_model.bind_tools([get_weather], tool_choice="get_weather",
                                parallel_tool_calls=False)
    message = llm.invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    chunks = list(llm.stream("What is the weather in Paris?"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert [c["name"] for c in merged.tool_calls] == ["get_weather"]


def test_langchain_structured_output(chat_model):
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        """A person."""

        name: str = Field(max_length=30)
        age: int = Field(ge=0, le=150)

    person = chat_model.with_structured_output(Person, method="json_schema").invoke(
        "Invent a person."
    )
    assert isinstance(person, Person)
    person = chat_model.with_structured_output(Person, method="function_calling").invoke(
        "Invent a person."
    )
    assert isinstance(person, Person)


# -- a template with its own tool syntax (Hermes), through --chat-template ---------------------

HERMES_TEMPLATE = Path(__file__).parent.parent / "data" / "hermes_template.jinja"


@pytest.fixture(scope="module")
def hermes_client(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("hermes"), "--chat-template",
                    str(HERMES_TEMPLATE), "--embedding-model", "none") as s:
        yield openai.OpenAI(base_url=s.base_url, api_key=s.api_key, max_retries=0, timeout=300)


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_time"}}])
def test_hermes_forced_calls(hermes_client, engine, choice):
    if engine != "llamacpp":
        pytest.skip("the template is the point here, not the engine")
    kw = {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False}
    create(hermes_client, **kw)  # the prompt into the cache: see the test above
    r = create(hermes_client, **kw)
    validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    named = isinstance(choice, dict)
    assert_valid_calls(r.choices[0].message.tool_calls, names=["get_time"] if named else None)
    assert r.choices[0].finish_reason == ("stop" if named else "tool_calls")
    assert not r.choices[0].message.content
    content, calls, finish = streamed(hermes_client, **kw)
    assert (content, finish) == ("", r.choices[0].finish_reason)
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]


def test_hermes_auto_and_a_tool_result_turn(hermes_client, engine):
    if engine != "llamacpp":
        pytest.skip("the template is the point here, not the engine")
    r = create(hermes_client, messages=ASK, tools=TOOLS, tool_choice="auto",
               parallel_tool_calls=False, max_tokens=80)
    message = r.choices[0].message
    assert "<tool_call>" not in (message.content or "")
    if message.tool_calls:
        complete = message.tool_calls if r.choices[0].finish_reason != "length" else []
        assert_valid_calls(complete) if complete else None
    first = create(hermes_client, messages=ASK, tools=TOOLS, tool_choice="required",
                   parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    r = create(hermes_client, messages=history, tools=TOOLS, max_tokens=24,
               parallel_tool_calls=False)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
