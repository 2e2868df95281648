"""tool_calls: the generic format's prompt and grammar, and its parsers reading output that
arrives in pieces of any size."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmserve.errors import InvalidRequest
from llmserve.serving.tool_calls import (
    EnvelopeParser,
    HermesParser,
    NamedCallParser,
    OutputRequest,
    Tool,
    ToolCallDelta,
    ToolChoice,
    plan_output,
    tool_format,
)

WEATHER = Tool("get_weather", "Weather in a city",
               {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]})
TIME = Tool("get_time", None, {"type": "object", "properties": {}})


def feed_all(parser, pieces: list[str]) -> tuple[str, list[ToolCallDelta]]:
    content, calls = "", []
    for piece in pieces:
        c, d = parser.feed(piece)
        content += c
        calls.extend(d)
    return content, calls


def assemble(deltas: list[ToolCallDelta]) -> list[dict]:
    """Deltas -> whole calls, as a client assembles them; each call's first delta has its
    id and name, and only the first."""
    calls: dict[int, dict] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id is not None and d.id.startswith("call_") and d.name, d
            calls[d.index] = {"id": d.id, "name": d.name, "arguments": d.arguments}
        else:
            assert d.id is None and d.name is None, d
            calls[d.index]["arguments"] += d.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)]


def splits(text: str):
    return st.lists(st.integers(0, len(text)), max_size=12).map(
        lambda cuts: [text[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)])]
    )


CALLS = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris \\"Ville\\" \\u00e9"}}, '
         '{"name": "get_time", "arguments": {"nested": [1, {"a": "}]"}], "n": -2.5}}]}')
RESPONSE = '{"response": "Hello \\"you\\"\\n\\u4f60\\u597d \\ud83d\\ude00 \\\\ / end"}'


@given(splits(CALLS))
def test_envelope_calls_in_any_pieces(pieces):
    parser = EnvelopeParser()
    content, deltas = feed_all(parser, pieces)
    assert content == ""
    assert parser.called
    calls = assemble(deltas)
    expected = json.loads(CALLS)["tool_calls"]
    assert [c["name"] for c in calls] == [e["name"] for e in expected]
    assert [json.loads(c["arguments"]) for c in calls] == [e["arguments"] for e in expected]
    assert len({c["id"] for c in calls}) == 2


@given(splits(RESPONSE))
def test_envelope_response_is_content(pieces):
    parser = EnvelopeParser()
    content, deltas = feed_all(parser, pieces)
    assert deltas == [] and not parser.called
    assert content == json.loads(RESPONSE)["response"]


def test_text_that_is_no_envelope_is_content():
    parser = EnvelopeParser()
    assert feed_all(parser, ["{\"x", "\": 1} and more"]) == ('{"x": 1} and more', [])
    assert feed_all(EnvelopeParser(), ["Hello"]) == ("Hello", [])


def test_primitive_arguments():
    text = '{"tool_calls": [{"name": "f", "arguments": 42}, {"name": "g", "arguments": null}]}'
    calls = assemble(feed_all(EnvelopeParser(), list(text))[1])
    assert [(c["name"], c["arguments"]) for c in calls] == [("f", "42"), ("g", "null")]


def test_named_parser_is_all_arguments():
    parser = NamedCallParser("get_weather")
    content, deltas = feed_all(parser, ['{"ci', 'ty": "Oslo"}'])
    assert content == ""
    [call] = assemble(deltas)
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Oslo"}


# -- plans ------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "Weather in Paris?"}]


def test_plan_without_tools_or_format_changes_nothing():
    plan = plan_output(USER, OutputRequest([], ToolChoice(), True, None))
    assert plan.messages == USER and plan.grammar is None and plan.parser is None


def test_plan_tools_describe_them_in_the_system_message():
    system = [{"role": "system", "content": "Be brief."}, *USER]
    plan = plan_output(system, OutputRequest([WEATHER, TIME], ToolChoice("auto"), True, None))
    first = plan.messages[0]
    assert first["role"] == "system" and first["content"].startswith("Be brief.\n\n")
    assert '"get_weather"' in first["content"] and '"get_time"' in first["content"]
    assert plan.grammar is not None and plan.parser is EnvelopeParser
    assert plan.calls_finish == "tool_calls"


def test_plan_none_keeps_tools_out():
    plan = plan_output(USER, OutputRequest([WEATHER], ToolChoice("none"), True, None))
    assert plan.messages == USER and plan.grammar is None


def test_plan_named_generates_arguments_alone():
    plan = plan_output(USER, OutputRequest([WEATHER, TIME], ToolChoice("named", "get_weather"), True, None))
    assert plan.calls_finish == "stop"
    assert isinstance(plan.parser(), NamedCallParser)


def test_plan_history_of_calls_and_results_is_text():
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    plan = plan_output(history, OutputRequest([WEATHER], ToolChoice("auto"), True, None))
    assistant, tool = plan.messages[-2:]
    assert json.loads(assistant["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert tool["role"] == "user"
    assert json.loads(tool["content"]) == {
        "tool_response": {"name": "get_weather", "content": "18 C"}}


def test_plan_history_reads_the_same_whatever_the_call_ids():
    def history(call_id: str) -> list[dict]:
        return [*USER,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": call_id, "content": "18 C"}]

    request = OutputRequest([WEATHER], ToolChoice("auto"), True, None)
    first = plan_output(history("call_1"), request).messages
    assert first == plan_output(history("call_q8C7oEGsvXkYYi2ZCv5AKHHa"), request).messages
    assert "call_1" not in json.dumps(first)


@pytest.mark.parametrize("schema, strict", [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, False),
    ({"type": "string", "format": "no-such-format"}, True),
    ({"type": "string", "pattern": "(?=ahead)"}, True),
    ([1, 2], False),
])
def test_bad_tool_schema_names_the_tool(schema, strict):
    bad = Tool("bad", None, schema, strict)
    with pytest.raises(InvalidRequest) as err:
        plan_output(USER, OutputRequest([WEATHER, bad], ToolChoice("auto"), True, None))
    assert err.value.param == "tools.1.function.parameters"


def test_unknown_format_ignored_when_not_strict():
    lenient = Tool("f", None, {"type": "string", "format": "no-such-format"}, strict=False)
    plan = plan_output(USER, OutputRequest([lenient], ToolChoice("required"), False, None))
    assert plan.grammar is not None


def test_response_format_plans():
    assert plan_output(USER, OutputRequest([], ToolChoice(), True, {"type": "text"})).grammar is None
    assert plan_output(USER, OutputRequest([], ToolChoice(), True, {"type": "json_object"})).grammar is not None
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                   "schema": {"type": "strin"}}}
    with pytest.raises(InvalidRequest) as err:
        plan_output(USER, OutputRequest([], ToolChoice(), True, fmt))
    assert err.value.param == "response_format.json_schema.schema"


# -- Hermes -------------------------------------------------------------------------------------

HERMES = ('Let me check <b>.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
          '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n')


@given(splits(HERMES))
def test_hermes_text_then_calls(pieces):
    parser = HermesParser()
    content, deltas = feed_all(parser, pieces)
    content += parser.flush()
    assert content == "Let me check <b>.\n"
    calls = assemble(deltas)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_hermes_text_alone_and_a_held_prefix_at_the_end():
    parser = HermesParser()
    content, deltas = feed_all(parser, ["a < b ", "and <tool"])
    assert (content, deltas) == ("a < b and ", [])
    assert parser.flush() == "<tool" and not parser.called


HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
)


def test_tool_format_detected_from_the_template():
    assert tool_format(HERMES_TEMPLATE) == "hermes"
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") == "generic"


@pytest.mark.parametrize("choice", [ToolChoice("auto"), ToolChoice("required"),
                                    ToolChoice("named", "get_time")])
def test_hermes_plans(choice):
    history = [*USER, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}]
    plan = plan_output(history, OutputRequest([WEATHER, TIME], choice, True, None), "hermes")
    assert [t["function"]["name"] for t in plan.template_tools] == ["get_weather", "get_time"]
    assert plan.messages[-1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert plan.grammar is not None and plan.parser is HermesParser
    assert plan.calls_finish == ("stop" if choice.mode == "named" else "tool_calls")


@pytest.mark.parametrize("fmt", ["generic", "hermes"])
@pytest.mark.parametrize("choice", [ToolChoice("auto"), ToolChoice("required"),
                                    ToolChoice("named", "get_trip")])
def test_parameters_with_refs_in_every_format(fmt, choice):
    """A pydantic model with a nested one has `$defs` and "#/$defs/..." refs: they still
    resolve where the format puts the parameters inside a larger schema."""
    import llguidance
    from llguidance import LLMatcher

    city = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    params = {"type": "object", "$defs": {"City": city},
              "properties": {"to": {"$ref": "#/$defs/City"},
                             "via": {"type": "array", "items": {"$ref": "#/$defs/City"}}},
              "required": ["to", "via"]}
    trip = Tool("get_trip", None, params)
    plan = plan_output(USER, OutputRequest([trip, WEATHER], choice, False, None), fmt)
    arguments = {"to": {"name": "Rome"}, "via": [{"name": "Pisa"}]}
    if choice.mode == "named" and fmt == "generic":
        text = json.dumps(arguments)
    elif fmt == "generic":
        text = json.dumps({"tool_calls": [{"name": "get_trip", "arguments": arguments}]})
    else:
        lead = "Sure.\n" if choice.mode == "auto" else ""
        call = json.dumps({"name": "get_trip", "arguments": arguments})
        text = f"{lead}<tool_call>\n{call}\n</tool_call>"
    tok = llguidance.LLTokenizer("byte")
    m = LLMatcher(tok, plan.grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    assert m.consume_tokens(tok.tokenize_str(text)) and m.is_accepting(), text


@pytest.mark.parametrize("fmt, parallel, several", [
    ("generic", None, False), ("generic", True, True), ("generic", False, False),
    ("hermes", None, True), ("hermes", False, False)])
def test_parallel_calls_unless_said_only_where_the_template_has_them(fmt, parallel, several):
    import llguidance
    from llguidance import LLMatcher

    plan = plan_output(USER, OutputRequest([WEATHER], ToolChoice("required"), parallel, None),
                       fmt)
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    if fmt == "generic":
        text = json.dumps({"tool_calls": [call, call]})
    else:
        one = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        text = f"{one}\n{one}"
    tok = llguidance.LLTokenizer("byte")
    m = LLMatcher(tok, plan.grammar, log_level=0)
    assert (m.consume_tokens(tok.tokenize_str(text)) and m.is_accepting()) == several
