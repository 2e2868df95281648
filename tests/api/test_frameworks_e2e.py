"""End-to-end: structured output and tools through the frameworks users reach the server with,
unchanged (the OpenAI SDK's helpers, LangChain, instructor, pydantic-ai), on every engine,
greedy with `max_tokens` 120 on the bundled model. Each call must finish with a valid object.
A 135M model wanders where a grammar lets it (an integer of endless digits, a property it
invents): the grammar refuses what a schema does not list and bounds digits
(serving/constraints), as llama.cpp's and vLLM's grammars do."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import MODEL
from engine_fixtures import *  # engine, server, client, async_client, http
from pydantic import BaseModel

MAX_TOKENS = 120
ABOUT_PARIS = "Tell me about Paris."


class City(BaseModel):
    name: str
    country: str
    population: int


class GetForecast(BaseModel):
    """The weather forecast for a city."""

    city: str
    days: int


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return "sunny"


def test_sdk_parse_a_model_with_an_int(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": ABOUT_PARIS}], response_format=City,
        temperature=0, max_tokens=MAX_TOKENS,
    )  # LengthFinishReasonError where the integer never ends
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, City), r.choices[0].message.content


def test_sdk_pydantic_function_tool(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "The forecast for Paris, 3 days?"}],
        tools=[openai.pydantic_function_tool(GetForecast)], tool_choice="required",
        temperature=0, max_tokens=MAX_TOKENS,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = r.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetForecast), call.function.arguments


def test_sdk_responses_parse(client):
    r = client.responses.parse(model=MODEL, input=ABOUT_PARIS, text_format=City, temperature=0,
                               max_output_tokens=MAX_TOKENS)
    assert r.status == "completed"
    assert isinstance(r.output_parsed, City), r.output_text


@pytest.fixture(scope="module")
def chat_model(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(
        model=MODEL, base_url=server.base_url, api_key=server.api_key, temperature=0,
        max_tokens=MAX_TOKENS, max_retries=0, timeout=300,
    )


def test_langchain_bind_tools_plain_function(chat_model):
    """A plain function is no strict tool: its schema has no `additionalProperties: false`,
    and the model used to add a "description" that ran to max_tokens."""
    message = chat_model.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?"
    )
    assert message.response_metadata["finish_reason"] != "length", message
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    assert list(call["args"]) == ["city"] and isinstance(call["args"]["city"], str)


def test_langchain_structured_output_json_schema(chat_model):
    out = chat_model.with_structured_output(City, method="json_schema", include_raw=True).invoke(
        ABOUT_PARIS
    )
    assert out["raw"].response_metadata["finish_reason"] == "stop", out["raw"]
    assert out["parsing_error"] is None and isinstance(out["parsed"], City)


def test_instructor_tools_mode(client):
    instructor = pytest.importorskip("instructor")
    patched = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
    city, completion = patched.chat.completions.create_with_completion(
        model=MODEL, response_model=City, messages=[{"role": "user", "content": ABOUT_PARIS}],
        temperature=0, max_tokens=MAX_TOKENS, max_retries=1,  # one try: no second chance
    )
    assert completion.choices[0].finish_reason != "length"
    assert isinstance(city, City)


def test_pydantic_ai_structured_output(server):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelResponse
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=server.base_url,
                                                           api_key=server.api_key))
    agent = Agent(model, output_type=City, retries=0,
                  model_settings={"temperature": 0, "max_tokens": MAX_TOKENS, "timeout": 300})
    result = agent.run_sync(ABOUT_PARIS)
    assert isinstance(result.output, City)
    responses = [m for m in result.all_messages() if isinstance(m, ModelResponse)]
    assert len(responses) == 1 and responses[0].finish_reason != "length", json.dumps(
        [str(p) for p in responses[0].parts])
