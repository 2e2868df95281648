"""The Responses API's text side: input items as stored and as the template takes them, and
a generation's deltas as output items and events in OpenAI's order."""

from __future__ import annotations

import pytest

from llmserve.errors import InvalidRequest, UnsupportedParameter
from llmserve.serving.generation import ChoiceDelta, Usage
from llmserve.serving.responses import ResponseStream, chat_messages, normalize_input
from llmserve.serving.tool_calls import ToolCallDelta


def test_a_string_input_is_one_user_message():
    [item] = normalize_input("Hi")
    assert item["type"] == "message" and item["role"] == "user" and item["id"].startswith("msg_")
    assert item["content"] == [{"type": "input_text", "text": "Hi"}]


def test_items_are_normalised_with_ids_kept_or_given():
    items = normalize_input([
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "assistant", "id": "msg_given",
         "content": [{"type": "output_text", "text": "Hello"}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "42"},
    ])
    assert [i["type"] for i in items] == ["message", "message", "function_call",
                                          "function_call_output"]
    assert items[1]["id"] == "msg_given" and items[1]["content"][0]["type"] == "output_text"
    assert all(i["id"] for i in items)


@pytest.mark.parametrize("value,param,error", [
    ([], "input", InvalidRequest),
    ([{"role": "robot", "content": "x"}], "input.0.role", InvalidRequest),
    ([{"type": "input_image"}], "input.0.type", UnsupportedParameter),
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
     "input.0.content.0.type", UnsupportedParameter),
    ([{"type": "function_call", "call_id": "c", "name": "f"}], "input.0.arguments",
     InvalidRequest),
    ([{"type": "function_call_output", "output": "x"}], "input.0.call_id", InvalidRequest),
])
def test_bad_items_name_the_field(value, param, error):
    with pytest.raises(error) as exc:
        normalize_input(value)
    assert exc.value.param == param


def test_chat_messages_group_calls_and_turn_outputs_into_tool_messages():
    items = normalize_input([
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"city":"A"}'},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"city":"B"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sun"},
        {"type": "function_call_output", "call_id": "c2", "output": "rain"},
    ])
    messages = chat_messages(items, "Rules.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]
    assert messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "sun"}


def _response() -> dict:
    return {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}


def test_text_events_in_openai_order_and_numbered():
    s = ResponseStream(_response())
    events = s.start()
    events += s.feed([ChoiceDelta(0, "Hel")])
    events += s.feed([ChoiceDelta(0, "lo", finish_reason="stop")])
    events += s.finish(Usage(3, 2))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["output"] == []  # a snapshot, not the live object
    [item] = s.response["output"]
    assert item["status"] == "completed" and item["content"][0]["text"] == "Hello"
    assert s.response["status"] == "completed" and s.response["usage"]["total_tokens"] == 5


def test_calls_after_text_close_the_message_and_stream_arguments():
    s = ResponseStream(_response())
    s.start()
    events = s.feed([ChoiceDelta(0, "Let me check.", tool_calls=[
        ToolCallDelta(0, id="call_1", name="w", arguments='{"ci'),
    ])])
    events += s.feed([ChoiceDelta(0, "", tool_calls=[ToolCallDelta(0, arguments='ty":"A"}')],
                                  finish_reason="tool_calls")])
    events += s.finish(Usage(1, 1))
    kinds = [e["type"] for e in events]
    assert kinds.index("response.output_item.done") < kinds.index("response.output_item.added", 3)
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == '{"city":"A"}' and done["output_index"] == 1
    message, call = s.response["output"]
    assert message["content"][0]["text"] == "Let me check."
    assert call["type"] == "function_call" and call["call_id"] == "call_1"
    assert call["status"] == "completed" and call["id"].startswith("fc_")


def test_cut_off_failed_and_cancelled_endings():
    cut = ResponseStream(_response())
    cut.start()
    cut.feed([ChoiceDelta(0, "abc", finish_reason="length")])
    assert cut.finish(Usage(1, 3))[-1]["type"] == "response.incomplete"
    assert cut.response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut.response["output"][0]["status"] == "incomplete"

    failed = ResponseStream(_response())
    failed.start()
    assert failed.fail("engine died")[-1]["type"] == "response.failed"
    assert failed.response["error"] == {"code": "server_error", "message": "engine died"}

    cancelled = ResponseStream(_response())
    cancelled.start("queued")
    assert [e["type"] for e in cancelled.running()] == ["response.in_progress"]
    assert cancelled.running() == []  # once
    cancelled.feed([ChoiceDelta(0, "x")])
    events = cancelled.cancel()
    assert events[-1]["type"] == "response.output_item.done"  # no event of its own
    assert cancelled.response["status"] == "cancelled"


def test_reasoning_streams_as_its_own_item_before_the_message():
    s = ResponseStream(_response())
    s.start()
    events = s.feed([ChoiceDelta(0, "", reasoning="Two and")])
    events += s.feed([ChoiceDelta(0, "Four.", reasoning=" two.")])
    events += s.feed([ChoiceDelta(0, "", finish_reason="stop")])
    events += s.finish(Usage(3, 6, reasoning_tokens=4))
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]
    assert events[4]["text"] == "Two and two." and events[4]["output_index"] == 0
    thought, message = s.response["output"]
    assert thought["type"] == "reasoning" and thought["id"].startswith("rs_")
    assert thought["content"] == [{"type": "reasoning_text", "text": "Two and two."}]
    assert thought["summary"] == [] and thought["status"] == "completed"
    assert message["content"][0]["text"] == "Four."
    assert s.response["usage"]["output_tokens_details"] == {"reasoning_tokens": 4}


def test_a_reasoning_cut_off_ends_incomplete_and_kept():
    s = ResponseStream(_response())
    s.start()
    s.feed([ChoiceDelta(0, "", reasoning="Hmm, let", finish_reason="length")])
    assert s.finish(Usage(1, 3, reasoning_tokens=3))[-1]["type"] == "response.incomplete"
    [thought] = s.response["output"]
    assert thought["status"] == "incomplete" and thought["content"][0]["text"] == "Hmm, let"


def test_reasoning_sent_back_goes_to_the_next_assistant_message():
    items = normalize_input([
        {"role": "user", "content": "2 + 2?"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "Two and two."}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Four."}]},
        {"role": "user", "content": "And 3 + 3?"},
    ])
    assert items[1] == {"type": "reasoning", "id": "rs_1", "summary": [], "status": "completed",
                        "content": [{"type": "reasoning_text", "text": "Two and two."}]}
    messages = chat_messages(items, None)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1] == {"role": "assistant", "content": "Four.",
                           "reasoning_content": "Two and two."}
