"""Chat completions' OpenAI shapes from a generation's deltas (the e2e suites check them
against OpenAI's schema over HTTP; these pin what each shape holds)."""

from __future__ import annotations

import math

from openai_schema import validate

from llmserve.errors import EngineFailure
from llmserve.serving.chat_completions import completion, first_choices, step_choices
from llmserve.serving.collect import CollectedChoice, collect_batch
from llmserve.serving.generation import ChoiceDelta, TokenLogprob, Usage
from llmserve.serving.shapes import logprob_value, usage_body
from llmserve.serving.tool_calls import ToolCallDelta

HEAD = {"id": "chatcmpl-1", "created": 1, "model": "m"}


def _chunk(choices: list[dict]) -> dict:
    return {**HEAD, "object": "chat.completion.chunk", "choices": choices}


def test_the_first_chunk_names_the_role_and_has_no_content_yet_with_tools():
    assert [c["delta"] for c in first_choices(2, tools=False)] == [
        {"role": "assistant", "content": ""}] * 2
    assert first_choices(1, tools=True)[0]["delta"] == {"role": "assistant", "content": None}
    validate("CreateChatCompletionStreamResponse", _chunk(first_choices(2, tools=True)))


def test_a_step_gives_reasoning_then_text_then_calls_then_the_ending():
    lp = TokenLogprob("Hi", b"Hi", -0.5, (("Hi", b"Hi", -0.5),))
    batch = [
        ChoiceDelta(0, "Hi", logprobs=[lp], reasoning="think"),
        ChoiceDelta(1, "", tool_calls=[ToolCallDelta(0, "call_1", "f", "{")],
                    finish_reason="tool_calls"),
    ]
    choices = step_choices(batch)
    assert [(c["index"], c["delta"], c["finish_reason"]) for c in choices] == [
        (0, {"reasoning_content": "think"}, None),
        (0, {"content": "Hi"}, None),
        (1, {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                             "function": {"name": "f", "arguments": "{"}}]}, None),
        (1, {}, "tool_calls"),
    ]
    # the step's logprobs go with its first chunk, once
    assert choices[0]["logprobs"]["content"][0]["token"] == "Hi"
    assert choices[1]["logprobs"] is None
    validate("CreateChatCompletionStreamResponse", _chunk(choices))
    assert step_choices([ChoiceDelta(0, "")]) == []  # nothing to say: no chunk


def test_a_whole_answer_and_one_cut_short():
    choices = [CollectedChoice(), CollectedChoice()]
    collect_batch(choices, [ChoiceDelta(0, "Hel"), ChoiceDelta(1, "x")])
    collect_batch(choices, [ChoiceDelta(0, "lo", finish_reason="stop")])
    # cut short: the choice still running says "error", and the completion why
    cut = completion(HEAD, choices, Usage(3, 3), False, EngineFailure("gone"))
    assert [c["finish_reason"] for c in cut["choices"]] == ["stop", "error"]
    assert cut["error"] == {"message": "gone", "type": "server_error", "code": "engine_error"}
    collect_batch(choices, [ChoiceDelta(1, "y", finish_reason="length")])
    body = completion(HEAD, choices, Usage(3, 4), want_logprobs=False)
    validate("CreateChatCompletionResponse", body)
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello", "xy"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert "error" not in body


def test_usage_and_logprob_values_as_openai_writes_them():
    assert usage_body(Usage(2, 3)) == {"prompt_tokens": 2, "completion_tokens": 3,
                                       "total_tokens": 5}
    assert usage_body(Usage(2, 3, reasoning_tokens=1))["completion_tokens_details"] == {
        "reasoning_tokens": 1}
    assert logprob_value(-math.inf) == -9999.0 and logprob_value(-0.25) == -0.25
