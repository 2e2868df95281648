"""constraints: what the grammar adds to a schema (unlisted properties refused unless allowed,
numbers with bounded digits) and what it keeps (the schema's own bounds), on every path a
schema takes to a grammar: `json_schema`, `json_object` and `%json` in a Lark grammar. Text is
matched byte by byte (llguidance's byte tokenizer): what the grammar allows, not a model."""

from __future__ import annotations

import copy
import json

import llguidance
import pytest
from llguidance import LLMatcher

from llmserve.serving import constraints
from llmserve.serving.schema_bounds import INT_MAX, INT_MIN, bounded
from llmserve.serving.tool_calls import OutputRequest, Tool, ToolChoice, plan_output

BYTES = llguidance.LLTokenizer("byte")


def matches(grammar: str, text: str) -> bool:
    m = LLMatcher(BYTES, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return m.consume_tokens(BYTES.tokenize_str(text)) and m.is_accepting()


def schema_matches(schema: dict, text: str, *, strict: bool = False) -> bool:
    return matches(constraints.json_schema(schema, strict=strict, param="p"), text)


def obj(properties: dict, **kw) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), **kw}


CITY = obj({"name": {"type": "string"}, "population": {"type": "integer"}})


@pytest.mark.parametrize("strict", [False, True])
def test_unlisted_property_refused_by_default(strict):
    assert schema_matches(CITY, '{"name": "Paris", "population": 2}', strict=strict)
    assert not schema_matches(CITY, '{"name": "Paris", "population": 2, "description": "x"}',
                              strict=strict)
    nested = obj({"city": CITY})
    assert schema_matches(nested, '{"city": {"name": "P", "population": 2}}')
    assert not schema_matches(nested, '{"city": {"name": "P", "population": 2, "x": 1}}')


def test_extra_properties_where_the_schema_allows_them():
    extra = '{"name": "P", "population": 2, "note": [1, {"a": null}], "n": -2.5}'
    assert schema_matches({**CITY, "additionalProperties": True}, extra)
    typed = {**CITY, "additionalProperties": {"type": "integer"}}
    assert schema_matches(typed, '{"name": "P", "population": 2, "area": 105}')
    assert not schema_matches(typed, '{"name": "P", "population": 2, "area": "big"}')
    patterned = {**CITY, "patternProperties": {"^x_": {"type": "string"}}}
    assert schema_matches(patterned, '{"name": "P", "population": 2, "x_a": "b"}')
    assert not schema_matches(patterned, '{"name": "P", "population": 2, "y": "b"}')


def test_an_object_without_properties_takes_any():
    assert schema_matches({"type": "object"}, '{"a": {"b": [1, "x", true]}}')
    assert matches(constraints.json_object(), '{"a": {"b": [1, "x", true, null, 0.5]}}')
    assert not schema_matches(obj({}), '{"a": 1}')  # properties listed: none
    assert schema_matches(obj({}), '{}')


def test_required_names_it_does_not_list_stay_allowed():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}},
              "required": ["a", "b"]}
    assert schema_matches(schema, '{"a": 1, "b": "anything"}')
    assert not schema_matches(schema, '{"a": 1, "b": 2, "c": 3}')


def test_parts_of_an_all_of_keep_each_others_properties():
    a, b = obj({"a": {"type": "integer"}}), obj({"b": {"type": "integer"}})
    assert schema_matches({"allOf": [a, b]}, '{"a": 1, "b": 2}')
    defs = {"$defs": {"A": a}, "allOf": [{"$ref": "#/$defs/A"}, b]}
    assert schema_matches(defs, '{"a": 1, "b": 2}')


def test_refs_and_any_of_are_bounded_too():
    schema = {"$defs": {"City": CITY}, **obj({
        "home": {"$ref": "#/$defs/City"},
        "size": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    })}
    good = '{"home": {"name": "P", "population": 2}, "size": null}'
    assert schema_matches(schema, good)
    assert not schema_matches(schema, good.replace("2}", '2, "x": 1}'))
    assert not schema_matches(schema, good.replace("null", "1" * 30))


def test_integers_have_int64_range():
    n = obj({"n": {"type": "integer"}})
    for value in (0, -7, INT_MAX, INT_MIN):
        assert schema_matches(n, f'{{"n": {value}}}'), value
    for text in ("1" * 30, str(INT_MAX + 1), "-" + "1" * 30, "1e5"):
        assert not schema_matches(n, f'{{"n": {text}}}'), text


def test_numbers_have_bounded_digits():
    x = obj({"x": {"type": "number"}})
    for text in ("0", "-2.5", "9" * 16, "3.1415926535", "-" + "9" * 16 + ".0123456789"):
        assert schema_matches(x, f'{{"x": {text}}}'), text
    for text in ("1" * 17, "1." + "1" * 11, "0." + "1" * 20, "1e5"):
        assert not schema_matches(x, f'{{"x": {text}}}'), text
    # in values left free as well
    assert not matches(constraints.json_object(), '{"a": [' + "1" * 30 + "]}")
    assert not schema_matches({"type": "object", "additionalProperties": True},
                              '{"a": 0.' + "1" * 20 + "}")


def test_the_schemas_own_bounds_stay():
    schema = obj({"age": {"type": "integer", "minimum": 0, "maximum": 150},
                  "name": {"type": "string", "maxLength": 3},
                  "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                  "half": {"type": "number", "multipleOf": 0.5},
                  "big": {"type": "integer", "minimum": 10}})
    def text(age=3, name='"Al"', score="0.5", half="1.5", big="10"):
        return (f'{{"age": {age}, "name": {name}, "score": {score}, "half": {half}, '
                f'"big": {big}}}')

    assert schema_matches(schema, text())
    for bad in ({"age": 151}, {"age": -1}, {"name": '"Alex"'}, {"score": 0}, {"score": "1.5"},
                {"half": "1.25"}, {"big": 9}, {"big": "1" * 30}):
        assert not schema_matches(schema, text(**bad)), bad
    assert schema_matches(schema, text(big=INT_MAX))
    # bounds that leave no room for ours keep theirs alone
    huge = {"type": "number", "minimum": 1e17}
    assert schema_matches(huge, "1" * 18)
    assert schema_matches({"type": "integer", "enum": [1, 2]}, "2")
    assert schema_matches({"type": "number", "const": 0.123456789012}, "0.123456789012")


def test_tuples_take_their_items():
    pair = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}
    assert schema_matches(pair, '[1, "a"]')
    assert not schema_matches(pair, '[1, "a", 2]')
    assert schema_matches({**pair, "items": {"type": "integer"}}, '[1, "a", 2]')
    assert schema_matches({"type": "array"}, '[1, "a", {"b": []}]')


def test_the_schema_itself_is_not_changed():
    schema = {"$defs": {"C": CITY}, **obj({"c": {"$ref": "#/$defs/C"}, "free": {}})}
    before = copy.deepcopy(schema)
    out = bounded(schema)
    assert schema == before
    assert out["$defs"]["C"]["additionalProperties"] is False


def test_lark_json_is_bounded_the_same():
    """A template with its own call syntax (Hermes) embeds schemas in Lark with `%json`."""
    tool = Tool("get_city", None, CITY)
    for choice in (ToolChoice("named", "get_city"), ToolChoice("auto")):
        plan = plan_output([{"role": "user", "content": "hi"}],
                           OutputRequest([tool], choice, False, None), "hermes")
        call = {"name": "get_city", "arguments": {"name": "P", "population": 2}}
        text = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        assert matches(plan.grammar, text), choice
        call["arguments"]["extra"] = 1
        assert not matches(plan.grammar, f"<tool_call>\n{json.dumps(call)}\n</tool_call>")
        call["arguments"] = {"name": "P", "population": int("1" * 30)}
        assert not matches(plan.grammar, f"<tool_call>\n{json.dumps(call)}\n</tool_call>")


def test_generic_envelope_is_bounded():
    tool = Tool("get_city", None, CITY)
    plan = plan_output([{"role": "user", "content": "hi"}],
                       OutputRequest([tool], ToolChoice("required"), False, None))
    call = {"name": "get_city", "arguments": {"name": "P", "population": 2}}
    assert matches(plan.grammar, json.dumps({"tool_calls": [call]}))
    call["arguments"]["description"] = "x"
    assert not matches(plan.grammar, json.dumps({"tool_calls": [call]}))
