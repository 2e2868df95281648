"""End-to-end: a thinking model's reasoning apart from its answer, on every engine: the
bundled model made a thinking one (tests/thinking.py)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import MODEL, Server, engine_flags, engines, run_server
from openai_schema import validate
from response_events import sse_events
from sse import stream_post
from thinking import ASK, SYSTEM, THINKING_TEMPLATE


@pytest.fixture(scope="module", params=engines())
def server(request, tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("reasoning")
    template = tmp / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    flags = engine_flags(request.param) or ("--embedding-model", "none")
    with run_server(tmp, "--chat-template", str(template), "--max-sequences", "4",
                    *flags) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0,
                         timeout=300)


def warm(server: Server, **body) -> dict:
    """The answer after one earlier run of the same request, so the next run finds the
    prompt in its cache in the same state. llama.cpp's kernels round differently by batch
    shape (tests/greedy.py), so two greedy runs whose cached prompts were computed in other
    shapes may part at a near tie: here, whether a thought ends now or goes on."""
    chat(server, **body)
    return chat(server, **body)


def post(server: Server, path: str, schema: str, body: dict) -> dict:
    """A 200 answer to `body` at `path`, valid as `schema`."""
    r = httpx.post(server.base_url + path, json=body, headers=server.headers(), timeout=300)
    assert r.status_code == 200, r.text
    validate(schema, r.json())
    return r.json()


def chat(server: Server, **body) -> dict:
    return post(server, "/chat/completions", "CreateChatCompletionResponse",
                {"model": MODEL, "messages": ASK, "max_tokens": 48, "temperature": 0, **body})


def streamed(server: Server, **body) -> tuple[list[dict], list[dict]]:
    """(chunks, each choice's deltas in order)."""
    body = {"model": MODEL, "messages": ASK, "max_tokens": 48, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **body}
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=300) as http:
        events = stream_post(http, "/v1/chat/completions", body)
    assert events.status == 200 and events.done, events.raw[-300:]
    chunks = events.chunks()
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", c)
    return chunks, [choice for c in chunks for choice in c["choices"]]


def parts_of(deltas: list[dict]) -> tuple[str, str]:
    """(reasoning, answer) of one choice's deltas; the reasoning must all come first."""
    reasoning, answer = "", ""
    for d in deltas:
        r, a = d["delta"].get("reasoning_content"), d["delta"].get("content")
        if r:
            assert not answer, "reasoning after the answer began"
            reasoning += r
        answer += a or ""
    return reasoning, answer


def test_the_reasoning_is_apart_from_the_answer(server):
    data = chat(server)
    message = data["choices"][0]["message"]
    reasoning, answer = message["reasoning_content"], message["content"]
    assert reasoning.strip() and answer.strip(), message
    for text in (reasoning, answer):
        assert "<think>" not in text and "</think>" not in text
    assert answer == answer.lstrip(), "the blanks after </think> are not the answer's"
    usage = data["usage"]
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]
    assert data["choices"][0]["finish_reason"] == "stop"


def test_stream_equals_non_stream_for_both_parts(server):
    whole = warm(server)
    chunks, deltas = streamed(server)
    assert parts_of(deltas) == (whole["choices"][0]["message"]["reasoning_content"],
                                whole["choices"][0]["message"]["content"])
    assert chunks[-1]["usage"] == whole["usage"]
    assert deltas[-1]["finish_reason"] == "stop"
    # token by token: more than one reasoning delta, never a tag in one
    pieces = [d["delta"]["reasoning_content"] for d in deltas
              if d["delta"].get("reasoning_content")]
    assert len(pieces) > 1


def test_the_sdk_reads_both_parts_streamed_and_not(server, client):
    warm(server)
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=48, temperature=0)
    message = r.choices[0].message
    reasoning, answer = "", ""
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=48,
                                                temperature=0, stream=True):
        if chunk.choices:
            reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
            answer += chunk.choices[0].delta.content or ""
    assert (reasoning, answer) == (message.reasoning_content, message.content)
    assert r.usage.completion_tokens_details.reasoning_tokens > 0


def test_langchain_gets_the_answer_and_the_reasoning_count(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.base_url, api_key=server.api_key,
                     temperature=0, max_tokens=48, max_retries=0)
    whole = chat(server)
    got = llm.invoke(ASK)
    # ChatOpenAI keeps OpenAI's fields only (its docs: reasoning_content is for provider
    # classes): the answer without the reasoning, and the reasoning's token count.
    assert got.content == whole["choices"][0]["message"]["content"]
    reasoning_tokens = whole["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert got.usage_metadata["output_token_details"]["reasoning"] == reasoning_tokens


def test_cut_off_inside_the_reasoning_keeps_it(server):
    full = chat(server)["choices"][0]["message"]["reasoning_content"]
    data = chat(server, max_tokens=3)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == ""
    assert full.startswith(choice["message"]["reasoning_content"])
    assert choice["message"]["reasoning_content"]
    usage = data["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == usage["completion_tokens"] == 3
    _, deltas = streamed(server, max_tokens=3)
    assert parts_of(deltas) == (choice["message"]["reasoning_content"], "")
    assert deltas[-1]["finish_reason"] == "length"


def test_n_choices_each_split(server):
    one = chat(server)["choices"][0]["message"]
    data = chat(server, n=2)
    for c in data["choices"]:
        assert c["message"]["reasoning_content"] and c["message"]["content"]
    _, deltas = streamed(server, n=2)
    for i in (0, 1):
        # each choice's deltas on their own: reasoning first, then the answer
        assert parts_of([d for d in deltas if d["index"] == i])[0]
    assert one["reasoning_content"]


@pytest.mark.parametrize("switch", [{"chat_template_kwargs": {"enable_thinking": False}},
                                    {"reasoning_effort": "none"}])
def test_thinking_switched_off_through_the_template(server, switch):
    data = chat(server, **switch)
    message = data["choices"][0]["message"]
    assert "reasoning_content" not in message and message["content"].strip()
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_reasoning_effort_reaches_a_template_that_reads_it(server):
    assert chat(server, reasoning_effort="high")["choices"][0]["message"]["reasoning_content"]


def test_reasoning_effort_is_refused_by_name_where_no_template_reads_it(session_server):
    r = httpx.post(session_server.base_url + "/chat/completions", headers=session_server.headers(),
                   json={"model": MODEL, "messages": ASK[1:], "reasoning_effort": "low",
                         "max_tokens": 4}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "reasoning_effort"
    assert "reasoning_effort" in r.json()["error"]["message"]
    # the bundled model's own template writes no <think>: no reasoning, no count
    r = httpx.post(session_server.base_url + "/chat/completions", headers=session_server.headers(),
                   json={"model": MODEL, "messages": ASK[1:], "max_tokens": 4}, timeout=60)
    assert "reasoning_content" not in r.json()["choices"][0]["message"]
    assert "completion_tokens_details" not in r.json()["usage"]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}


def test_tools_after_thinking_are_valid_calls(server):
    ask = ASK  # (a question the model closes its thought on: a call is then required)
    data = warm(server, messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=120)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    # the reasoning was free text before the grammar took over
    assert choice["message"]["reasoning_content"].strip()
    _, deltas = streamed(server, messages=ask, tools=[WEATHER], tool_choice="required",
                         max_tokens=120)
    reasoning, _ = parts_of(deltas)
    assert reasoning == choice["message"]["reasoning_content"]


def test_response_format_applies_after_thinking(server):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    data = chat(server, max_tokens=120, response_format={
        "type": "json_schema", "json_schema": {"name": "sum", "schema": schema, "strict": True}})
    message = data["choices"][0]["message"]
    assert message["reasoning_content"].strip()
    assert isinstance(json.loads(message["content"])["answer"], int)


def responses(server: Server, **body) -> dict:
    return post(server, "/responses", "Response",
                {"model": MODEL, "instructions": SYSTEM, "input": ASK[1]["content"],
                 "max_output_tokens": 48, "temperature": 0, **body})


def test_responses_give_a_reasoning_item_before_the_message(server):
    data = responses(server)
    thought, message = data["output"]
    assert thought["type"] == "reasoning" and message["type"] == "message"
    [part] = thought["content"]
    assert part["type"] == "reasoning_text" and part["text"].strip()
    assert "<think>" not in part["text"] and "</think>" not in part["text"]
    answer = message["content"][0]["text"]
    assert answer.strip() and "</think>" not in answer
    assert data["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    # the same split as chat's
    chat_message = chat(server)["choices"][0]["message"]
    assert (part["text"], answer) == (chat_message["reasoning_content"], chat_message["content"])


def test_responses_stream_reasoning_events_that_equal_the_response(server):
    whole = responses(server)
    body = {"model": MODEL, "instructions": SYSTEM, "input": ASK[1]["content"],
            "max_output_tokens": 48, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/responses", json=body,
                      headers=server.headers(), timeout=300) as r:
        assert r.status_code == 200
        events = sse_events(r)  # each checked against the spec
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    answer = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert (thought, answer) == (whole["output"][0]["content"][0]["text"],
                                 whole["output"][1]["content"][0]["text"])
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == thought


def test_responses_reasoning_effort_and_the_sdk(server, client):
    r = client.responses.create(model=MODEL, instructions=SYSTEM, input=ASK[1]["content"],
                                max_output_tokens=48, temperature=0,
                                reasoning={"effort": "none"})
    assert [item.type for item in r.output] == ["message"]  # the template closed it
    assert r.reasoning.effort == "none" and r.output_text.strip()
    r = client.responses.create(model=MODEL, instructions=SYSTEM, input=ASK[1]["content"],
                                max_output_tokens=48, temperature=0)
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text.strip()
    # an earlier turn's reasoning sent back is taken (and goes where the template puts it)
    again = client.responses.create(
        model=MODEL, instructions=SYSTEM, max_output_tokens=48, temperature=0,
        input=[{"role": "user", "content": ASK[1]["content"]},
               *[item.model_dump(exclude_none=True) for item in r.output],
               {"role": "user", "content": "And 3 + 3?"}])
    assert again.status == "completed" and again.output[0].type == "reasoning"


def test_responses_reasoning_effort_refused_where_no_template_reads_it(session_server):
    r = httpx.post(session_server.base_url + "/responses", headers=session_server.headers(),
                   json={"model": MODEL, "input": "Hi", "reasoning": {"effort": "low"},
                         "max_output_tokens": 4}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "reasoning.effort"
    validate("ErrorResponse", r.json())
