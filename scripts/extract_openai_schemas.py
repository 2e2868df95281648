#!/usr/bin/env python3
"""Extract the OpenAI schemas our tests use: the response bodies they validate against, and
the request bodies the fuzz tests (tests/api/test_fuzz_e2e.py) generate from.

Reads the OpenAI OpenAPI 3.1 spec (default: ../shared/openai/openapi.yaml
relative to the repo root), collects the root component schemas below plus
everything they transitively ``$ref``, and writes a self-contained JSON Schema
(draft 2020-12) document to tests/openai_spec/schemas.json.  ``$ref``s stay as
``#/components/schemas/X`` so they resolve inside that document.

Transformations (schema-aware: property *names* such as ``title`` are never
touched, nor are ``enum``/``const``/``default`` values):
  * OpenAPI-3.0-style ``nullable: true`` becomes real JSON Schema:
    ``type: X`` -> ``type: [X, "null"]`` (an ``enum`` also gains ``null``);
    a schema without ``type`` (e.g. a bare ``$ref``) is wrapped as
    ``anyOf: [<schema>, {"type": "null"}]``.  The ``nullable`` key is dropped.
  * Purely descriptive keys are dropped: description, title, example(s),
    deprecated, and all ``x-*`` vendor extensions (x-oaiMeta, x-stainless-*,
    x-oaiTypeLabel, ...).

Usage: python3 scripts/extract_openai_schemas.py [path/to/openapi.yaml]
Requires PyYAML.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = REPO_ROOT / ".." / "shared" / "openai" / "openapi.yaml"
OUTPUT = REPO_ROOT / "tests" / "openai_spec" / "schemas.json"
REF_PREFIX = "#/components/schemas/"

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ErrorResponse",
    "ListModelsResponse",
    "Model",
    "CreateEmbeddingResponse",
    # The Responses API and stored chat completions.
    "Response",
    "ResponseStreamEvent",
    "ResponseItemList",
    "ChatCompletionList",
    "ChatCompletionMessageList",
    "ChatCompletionDeleted",
    # Request bodies, for the fuzz tests' generated requests.
    "CreateChatCompletionRequest",
    "CreateCompletionRequest",
    "CreateEmbeddingRequest",
]

DESCRIPTIVE_KEYS = {"description", "title", "example", "examples", "deprecated"}

# JSON Schema keywords whose value is a map of name -> subschema.
SCHEMA_MAP_KEYS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
# Keywords whose value is a single subschema.
SCHEMA_KEYS = {
    "items",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "additionalItems",
}
# Keywords whose value is a list of subschemas.
SCHEMA_LIST_KEYS = {"allOf", "anyOf", "oneOf", "prefixItems"}


def _is_dropped(key: str) -> bool:
    return key in DESCRIPTIVE_KEYS or key.startswith("x-")


def convert(schema):
    """Return a cleaned copy of a schema (bool schemas pass through)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if _is_dropped(key) or key == "nullable":
            continue
        if key in SCHEMA_MAP_KEYS and isinstance(value, dict):
            out[key] = {name: convert(sub) for name, sub in value.items()}
        elif key in SCHEMA_KEYS:
            out[key] = convert(value)
        elif key in SCHEMA_LIST_KEYS and isinstance(value, list):
            out[key] = [convert(sub) for sub in value]
        else:
            out[key] = value  # enum, const, default, required, format, ...
    if schema.get("nullable") is True:
        out = _make_nullable(out)
    return out


def _make_nullable(schema: dict) -> dict:
    composite = any(k in schema for k in SCHEMA_LIST_KEYS | {"$ref", "not", "const"})
    if "type" in schema and not composite:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if "null" not in types:
            types = [*types, "null"]
        schema["type"] = types
        if "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
        return schema
    # No plain type (bare $ref, composition, ...): wrap the whole thing.
    return {"anyOf": [schema, {"type": "null"}]}


def collect_refs(schema, found: set[str]) -> None:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str):
            if not ref.startswith(REF_PREFIX):
                raise ValueError(f"unsupported $ref {ref!r}")
            found.add(ref[len(REF_PREFIX) :])
        for key, value in schema.items():
            if key in SCHEMA_MAP_KEYS and isinstance(value, dict):
                for sub in value.values():
                    collect_refs(sub, found)
            elif key in SCHEMA_KEYS:
                collect_refs(value, found)
            elif key in SCHEMA_LIST_KEYS and isinstance(value, list):
                for sub in value:
                    collect_refs(sub, found)


def extract(spec: dict) -> dict[str, dict]:
    all_schemas = spec["components"]["schemas"]
    selected: dict[str, dict] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in selected:
            continue
        if name not in all_schemas:
            raise KeyError(f"component schema {name!r} not found in spec")
        selected[name] = convert(all_schemas[name])
        refs: set[str] = set()
        collect_refs(selected[name], refs)
        todo.extend(sorted(refs - selected.keys()))
    add_completion_stream(selected)
    return selected


def add_completion_stream(selected: dict[str, dict]) -> None:
    """The spec has no schema for streamed legacy completions: OpenAI streams them as
    CreateCompletionResponse objects whose `finish_reason` is null until the last chunk.
    CreateCompletionStreamResponse is that schema with `finish_reason` and `usage` nullable,
    as in the chat chunk schema."""
    import copy

    stream = copy.deepcopy(selected["CreateCompletionResponse"])
    finish = stream["properties"]["choices"]["items"]["properties"]["finish_reason"]
    finish["type"] = [finish["type"], "null"] if isinstance(finish["type"], str) else finish["type"]
    finish["enum"] = [*finish["enum"], None]
    # With include_usage, chunks before the last carry "usage": null, as chat chunks do.
    stream["properties"]["usage"] = {"anyOf": [stream["properties"]["usage"], {"type": "null"}]}
    selected["CreateCompletionStreamResponse"] = stream


def main(argv: list[str]) -> int:
    spec_path = Path(argv[1]) if len(argv) > 1 else DEFAULT_SPEC
    spec_path = spec_path.resolve()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(spec_path, encoding="utf-8") as f:
        spec = yaml.load(f, Loader=loader)
    version_file = spec_path.parent / "VERSION"
    source = "unknown"
    if version_file.exists():
        source = version_file.read_text(encoding="utf-8").strip()

    doc = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "source": source,
        "components": {"schemas": extract(spec)},
    }
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    OUTPUT.write_text(text, encoding="utf-8")
    count = len(doc["components"]["schemas"])
    print(f"wrote {OUTPUT} ({count} schemas, {len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
