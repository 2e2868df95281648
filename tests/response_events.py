"""A Responses API stream read event by event, each event checked against the spec."""

from __future__ import annotations

import json

import httpx
from openai_schema import SCHEMAS_PATH, validate


def _event_schemas() -> dict[str, str]:
    """Each stream event's schema by its type (validating against the union of them all
    reports every alternative's complaint, not the one that matters)."""
    schemas = json.loads(SCHEMAS_PATH.read_text())["components"]["schemas"]
    union = schemas["ResponseStreamEvent"]
    out = {}
    for ref in union.get("anyOf", union.get("oneOf", [])):
        name = ref["$ref"].rsplit("/", 1)[-1]
        out[schemas[name]["properties"]["type"]["enum"][0]] = name
    return out


EVENT_SCHEMAS = _event_schemas()


def sse_events(response: httpx.Response) -> list[dict]:
    """The events of a Responses stream, each checked against the spec; `event:` names
    match the payloads' types."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            assert event["type"] == name
            validate(EVENT_SCHEMAS[event["type"]], event)
            events.append(event)
    return events
