"""End-to-end: the Responses API on the real server and the bundled model, through the
official client and raw SSE; every body and event is validated against OpenAI's spec."""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest
from conftest import MODEL, run_server
from openai_schema import validate
from response_events import sse_events

WEATHER = {
    "type": "function", "name": "get_weather", "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"], "additionalProperties": False,
    },
    "strict": True,
}


def create(client: openai.OpenAI, **kw):
    kw.setdefault("max_output_tokens", 64)
    return client.responses.create(model=MODEL, temperature=0, **kw)


def test_create_returns_a_valid_completed_response(client):
    r = create(client, input="Say hello.", max_output_tokens=200)
    body = r.model_dump(mode="json", exclude_unset=True)
    validate("Response", body)
    assert r.status == "completed" and r.object == "response" and r.id.startswith("resp_")
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert r.output_text and r.output_text == item.content[0].text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens < 200
    assert r.model == MODEL and r.store is True


def test_instructions_and_item_input(client):
    rules = "You answer every question in one short sentence, politely, and never in a list."
    r = create(client, instructions=rules,
               input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}])
    assert r.output_text and r.instructions == rules
    # The instructions are the prompt's system message, in place of the template's default.
    chat = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=64,
        messages=[{"role": "system", "content": rules}, {"role": "user", "content": "Hi"}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == chat.choices[0].message.content


def test_cut_off_response_is_incomplete(client):
    r = create(client, input="Count from one to one hundred in words.", max_output_tokens=5)
    validate("Response", r.model_dump(mode="json", exclude_unset=True))
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 5


def test_stream_events_in_openai_order_and_text_equals_non_streamed(client, http):
    plain = create(client, input="What is 2+2?")
    with http.stream("POST", "/v1/responses", json={
        "model": MODEL, "input": "What is 2+2?", "temperature": 0, "max_output_tokens": 64,
        "stream": True,
    }) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    kinds = [e["type"] for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == plain.output_text
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == text
    assert events[-1]["response"]["status"] == "completed"


def test_sdk_stream_helper(client):
    with client.responses.stream(model=MODEL, input="Hi", temperature=0,
                                 max_output_tokens=64) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.status == "completed"


def test_retrieve_delete_and_input_items(client):
    r = create(client, input=[{"role": "user", "content": "One"},
                              {"role": "assistant", "content": "Two"},
                              {"role": "user", "content": "Three"}])
    got = client.responses.retrieve(r.id)
    assert got.model_dump(exclude_unset=True) == r.model_dump(exclude_unset=True)
    items = client.responses.input_items.list(r.id)
    validate("ResponseItemList", items.model_dump(mode="json", exclude_unset=True))
    texts = [i.content[0].text for i in items.data]
    assert texts == ["Three", "Two", "One"]  # newest first, as OpenAI lists them
    asc = client.responses.input_items.list(r.id, order="asc", limit=2)
    assert [i.content[0].text for i in asc.data] == ["One", "Two"] and asc.has_more
    after = client.responses.input_items.list(r.id, order="asc", after=asc.data[-1].id)
    assert [i.content[0].text for i in after.data] == ["Three"] and not after.has_more
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)


def test_store_false_is_not_kept(client):
    r = create(client, input="Hi", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_previous_response_id_continues_the_conversation(client, http):
    first = create(client, input="My name is Ada. Remember it.")
    second = create(client, input="What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text
    # The second prompt holds the first turn: more input tokens than the question alone.
    alone = create(client, input="What is my name?")
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    with pytest.raises(openai.NotFoundError) as err:
        create(client, input="x", previous_response_id="resp_missing")
    assert err.value.body["param"] == "previous_response_id"


def test_function_call_round_trip(client):
    r = create(client, input="What is the weather in Paris?", tools=[WEATHER],
               tool_choice="required", parallel_tool_calls=False, max_output_tokens=80)
    validate("Response", r.model_dump(mode="json", exclude_unset=True))
    calls = [i for i in r.output if i.type == "function_call"]
    assert calls and r.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    answer = create(client, previous_response_id=r.id, tools=[WEATHER], tool_choice="none",
                    input=[{"type": "function_call_output", "call_id": call.call_id,
                            "output": '{"temperature_c": 21}'}])
    assert answer.output_text and not [i for i in answer.output if i.type != "message"]
    # The same turns sent in full instead of chained.
    full = create(client, tools=[WEATHER], tool_choice="none", input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id,
         "output": '{"temperature_c": 21}'},
    ])
    # The same prompt (greedy text may still differ: a prompt read from the prefix cache
    # gives logits a rounding apart from one read afresh).
    assert full.usage.input_tokens == answer.usage.input_tokens


def test_parallel_tool_calls_echoed_as_applied(client):
    """Left out, the bundled model's generic call envelope holds one call (see
    tool_calls.parallel_calls): the response says so; asked, it says what was asked."""
    unset = create(client, input="Hi", tools=[WEATHER], max_output_tokens=8)
    assert unset.parallel_tool_calls is False
    asked = create(client, input="Hi", tools=[WEATHER], parallel_tool_calls=True,
                   max_output_tokens=8)
    assert asked.parallel_tool_calls is True


def test_named_tool_choice_streams_argument_events(http):
    with http.stream("POST", "/v1/responses", json={
        "model": MODEL, "input": "Weather in Oslo?", "temperature": 0, "stream": True,
        "max_output_tokens": 80, "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
    }) as r:
        events = sse_events(r)
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    deltas = "".join(e["delta"] for e in events
                     if e["type"] == "response.function_call_arguments.delta")
    assert done["arguments"] == deltas and done["name"] == "get_weather"
    jsonschema.validate(json.loads(deltas), WEATHER["parameters"])
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["type"] == "function_call"


def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 20}},
              "required": ["colour"], "additionalProperties": False}
    r = create(client, input="Pick a colour.", max_output_tokens=40,
               text={"format": {"type": "json_schema", "name": "pick", "schema": schema,
                                "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_background_resume_after_disconnect_gives_the_whole_text(client, http):
    r = create(client, input="Tell a short story about a cat.", background=True,
               max_output_tokens=60)
    assert r.status in ("queued", "in_progress") and r.background
    validate("Response", r.model_dump(mode="json", exclude_unset=True))
    # Follow a few events, then hang up deliberately.
    seen = []
    with http.stream("GET", f"/v1/responses/{r.id}", params={"stream": "true"}) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if len(seen) == 6:
                    break
    # Resume after the last event seen, through the SDK.
    rest = list(client.responses.retrieve(r.id, stream=True,
                                          starting_after=seen[-1]["sequence_number"]))
    numbers = [e["sequence_number"] for e in seen] + [e.sequence_number for e in rest]
    assert numbers == list(range(len(numbers)))  # nothing lost, nothing twice
    deltas = [e["delta"] for e in seen if e["type"] == "response.output_text.delta"]
    deltas += [e.delta for e in rest if e.type == "response.output_text.delta"]
    assert rest[-1].type in ("response.completed", "response.incomplete")
    final = client.responses.retrieve(r.id)
    assert final.status in ("completed", "incomplete")
    assert "".join(deltas) == final.output_text and final.output_text
    # Replayed from the store after the end, from any point.
    again = list(client.responses.retrieve(r.id, stream=True, starting_after=2))
    assert [e.sequence_number for e in again] == list(range(3, len(numbers)))


def test_background_cancel(client):
    r = create(client, input="Write a long essay about the sea.", background=True,
               max_output_tokens=2000)
    cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    time.sleep(0.5)
    assert client.responses.retrieve(r.id).status == "cancelled"
    plain = create(client, input="Hi")
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(plain.id)


def test_a_deleted_response_is_not_served_from_memory_either(client, http):
    done = create(client, input="Hi", background=True, max_output_tokens=8)
    deadline = time.monotonic() + 60
    while client.responses.retrieve(done.id).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    running = create(client, input="Write a long essay about the sea.", background=True,
                     max_output_tokens=2000)
    for r in (done, running):
        client.responses.delete(r.id)
        # The run lingers in memory for late followers (or still runs): gone all the same.
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(r.id)
        assert http.get(f"/v1/responses/{r.id}", params={"stream": "true"}).status_code == 404
        assert http.post(f"/v1/responses/{r.id}/cancel", json={}).status_code == 404


def test_unsupported_and_invalid_requests(http):
    def post(**kw):
        return http.post("/v1/responses", json={"model": MODEL, "input": "hi", **kw})

    r = post(tools=[{"type": "web_search"}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools.0.type"
    r = post(input=[{"type": "message", "role": "user",
                     "content": [{"type": "input_image", "image_url": "http://x"}]}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "input.0.content.0.type"
    r = post(tools=[WEATHER], tool_choice={"type": "function", "name": "nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = post(surprise=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "surprise"
    r = post(tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = post(background=True, store=False)
    assert r.status_code == 400 and r.json()["error"]["param"] == "background"
    for r in (post(tools=[{"type": "web_search"}]), post(surprise=1)):
        validate("ErrorResponse", r.json())


def test_responses_survive_a_restart_and_unfinished_ones_fail(tmp_path):
    store = tmp_path / "store.sqlite3"
    with run_server(tmp_path, "--store", str(store)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        done = create(client, input="Hi")
        running = create(client, input="Write a long essay about the sea.", background=True,
                          max_output_tokens=2000)
    with run_server(tmp_path, "--store", str(store)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        again = client.responses.retrieve(done.id)
        assert again.output_text == done.output_text and again.status == "completed"
        failed = client.responses.retrieve(running.id)
        assert failed.status == "failed" and failed.error.code == "server_error"


def test_store_none_keeps_nothing(tmp_path):
    with run_server(tmp_path, "--store", "none") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        r = create(client, input="Hi")
        assert r.store is False and r.status == "completed"
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(r.id)
        with pytest.raises(openai.BadRequestError):
            create(client, input="Hi", background=True)


def test_openai_agents_sdk_runs_an_agent_with_a_function_tool(server):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)  # traces would go to OpenAI's servers
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 C in {city}."

    model = agents.OpenAIResponsesModel(
        model=MODEL,
        openai_client=openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key,
                                         max_retries=0),
    )
    agent = agents.Agent(
        name="weather", instructions="You are a helpful assistant.",
        model=model, tools=[get_weather], reset_tool_choice=False,
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0,
                                            max_tokens=96, parallel_tool_calls=False),
    )

    class AnswerAfterTheTool(agents.RunHooks):
        # A 135M model asked again with tools on would call again: the turn after the
        # tool's result is asked with tool_choice "none", through the SDK's own hooks (the
        # agent's reset of tool_choice to auto is off for this).
        async def on_tool_end(self, context, agent, tool, result) -> None:
            agent.model_settings = agent.model_settings.resolve(
                agents.ModelSettings(tool_choice="none"))

    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3,
                                    hooks=AnswerAfterTheTool())
    assert calls  # the SDK parsed our function_call and ran the tool
    kinds = [i.type for i in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
    assert kinds[-1] == "message_output_item"  # an answer after reading the tool's output
    assert isinstance(result.final_output, str) and result.final_output
    assert len(result.raw_responses) == 2 and all(r.response_id for r in result.raw_responses)
