"""Tests for the OpenAI response-schema helper (tests/openai_schema.py)."""

from __future__ import annotations

import copy

import jsonschema
import pytest

try:
    from openai_schema import schema_names, validate
except ImportError:  # tests/ imported as a package
    from tests.openai_schema import schema_names, validate

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}

CHAT_COMPLETION = {
    "id": "chatcmpl-123",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "tiny-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
}

STREAM_FIRST_CHUNK = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "tiny-model",
    "choices": [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ],
    "usage": None,
}

STREAM_USAGE_CHUNK = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "tiny-model",
    "choices": [],
    "usage": USAGE,
}

TEXT_COMPLETION = {
    "id": "cmpl-123",
    "object": "text_completion",
    "created": 1700000000,
    "model": "tiny-model",
    "choices": [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "length"}],
    "usage": USAGE,
}

ERROR = {
    "error": {
        "message": "model 'nope' not found",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
}

MODEL_LIST = {
    "object": "list",
    "data": [
        {"id": "tiny-model", "object": "model", "created": 1700000000, "owned_by": "llmserve"}
    ],
}

EMBEDDINGS = {
    "object": "list",
    "model": "tiny-embed",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}],
    "usage": {"prompt_tokens": 4, "total_tokens": 4},
}


@pytest.mark.parametrize(
    "schema_name, body",
    [
        ("CreateChatCompletionResponse", CHAT_COMPLETION),
        ("CreateChatCompletionStreamResponse", STREAM_FIRST_CHUNK),
        ("CreateChatCompletionStreamResponse", STREAM_USAGE_CHUNK),
        ("CreateCompletionResponse", TEXT_COMPLETION),
        ("ErrorResponse", ERROR),
        ("ListModelsResponse", MODEL_LIST),
        ("Model", MODEL_LIST["data"][0]),
        ("CreateEmbeddingResponse", EMBEDDINGS),
    ],
)
def test_valid_bodies(schema_name, body):
    validate(schema_name, body)


def test_valid_variants():
    # Final content chunk: empty delta, finish_reason set; usage key omitted.
    chunk = copy.deepcopy(STREAM_FIRST_CHUNK)
    chunk["choices"][0].update(delta={}, finish_reason="stop")
    del chunk["usage"]
    validate("CreateChatCompletionStreamResponse", chunk)
    # delta.content may be null (e.g. tool-call deltas).
    chunk["choices"][0]["delta"] = {"content": None}
    validate("CreateChatCompletionStreamResponse", chunk)
    # Chat logprobs object; text completion logprobs object.
    body = copy.deepcopy(CHAT_COMPLETION)
    body["choices"][0]["logprobs"] = {
        "content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}],
        "refusal": None,
    }
    validate("CreateChatCompletionResponse", body)
    text = copy.deepcopy(TEXT_COMPLETION)
    text["choices"][0]["logprobs"] = {
        "tokens": ["Hello"],
        "token_logprobs": [-0.5],
        "text_offset": [0],
        "top_logprobs": [{"Hello": -0.5}],
    }
    validate("CreateCompletionResponse", text)


def _mutated(body, mutate):
    body = copy.deepcopy(body)
    mutate(body)
    return body


@pytest.mark.parametrize(
    "schema_name, body, expected_in_message",
    [
        pytest.param(
            "CreateChatCompletionResponse",
            _mutated(CHAT_COMPLETION, lambda b: b.update(object="chat.completion.chunk")),
            "'chat.completion.chunk' is not one of ['chat.completion']",
            id="chat-wrong-object",
        ),
        pytest.param(
            "CreateChatCompletionStreamResponse",
            _mutated(STREAM_FIRST_CHUNK, lambda b: b.update(object="chat.completion")),
            "'chat.completion' is not one of ['chat.completion.chunk']",
            id="chunk-wrong-object",
        ),
        pytest.param(
            "CreateChatCompletionResponse",
            _mutated(CHAT_COMPLETION, lambda b: b.pop("choices")),
            "'choices' is a required property",
            id="chat-missing-choices",
        ),
        pytest.param(
            "CreateCompletionResponse",
            _mutated(TEXT_COMPLETION, lambda b: b.pop("choices")),
            "'choices' is a required property",
            id="text-missing-choices",
        ),
        pytest.param(
            "CreateChatCompletionResponse",
            _mutated(CHAT_COMPLETION, lambda b: b["choices"][0].update(finish_reason="bogus")),
            "'bogus' is not one of",
            id="chat-bogus-finish-reason",
        ),
        pytest.param(
            "CreateChatCompletionStreamResponse",
            _mutated(STREAM_FIRST_CHUNK, lambda b: b["choices"][0].update(finish_reason="bogus")),
            "'bogus' is not one of",
            id="chunk-bogus-finish-reason",
        ),
        pytest.param(
            "ErrorResponse",
            _mutated(ERROR, lambda b: b["error"].pop("message")),
            "'message' is a required property",
            id="error-missing-message",
        ),
        pytest.param(
            "CreateChatCompletionResponse",
            _mutated(CHAT_COMPLETION, lambda b: b["choices"][0]["message"].pop("refusal")),
            "'refusal' is a required property",
            id="chat-message-missing-refusal",
        ),
        pytest.param(
            "CreateChatCompletionResponse",
            _mutated(CHAT_COMPLETION, lambda b: b["choices"][0].pop("logprobs")),
            "'logprobs' is a required property",
            id="chat-missing-logprobs",
        ),
        pytest.param(
            "CreateChatCompletionResponse",
            _mutated(CHAT_COMPLETION, lambda b: b.update(usage=None)),
            "None is not of type 'object'",
            id="chat-usage-null",
        ),
        pytest.param(
            "CreateChatCompletionStreamResponse",
            _mutated(STREAM_FIRST_CHUNK, lambda b: b["choices"][0]["delta"].update(role="robot")),
            "'robot' is not one of",
            id="chunk-bad-role",
        ),
        pytest.param(
            "ListModelsResponse",
            _mutated(MODEL_LIST, lambda b: b["data"][0].pop("owned_by")),
            "'owned_by' is a required property",
            id="model-missing-owned-by",
        ),
        pytest.param(
            "CreateChatCompletionResponse",
            _mutated(CHAT_COMPLETION, lambda b: b.update(created="1700000000")),
            "is not of type 'integer'",
            id="chat-created-string",
        ),
    ],
)
def test_invalid_bodies(schema_name, body, expected_in_message):
    with pytest.raises(jsonschema.ValidationError) as excinfo:
        validate(schema_name, body)
    message = str(excinfo.value)
    assert schema_name in message
    assert expected_in_message in message


def test_error_message_names_the_path():
    body = _mutated(CHAT_COMPLETION, lambda b: b["choices"][0].update(finish_reason="bogus"))
    with pytest.raises(jsonschema.ValidationError) as excinfo:
        validate("CreateChatCompletionResponse", body)
    assert "$.choices[0].finish_reason" in excinfo.value.message
    assert list(excinfo.value.path) == ["choices", 0, "finish_reason"]


def test_unknown_schema_name():
    with pytest.raises(KeyError, match="unknown OpenAI schema"):
        validate("NoSuchSchema", {})


def test_all_roots_present_and_refs_resolve():
    import json

    from referencing import Registry, Resource

    try:
        from openai_schema import SCHEMAS_PATH
    except ImportError:
        from tests.openai_schema import SCHEMAS_PATH

    document = json.loads(SCHEMAS_PATH.read_text(encoding="utf-8"))
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    names = set(schema_names())
    for root in [
        "CreateChatCompletionResponse",
        "CreateChatCompletionStreamResponse",
        "CreateCompletionResponse",
        "ErrorResponse",
        "ListModelsResponse",
        "Model",
        "CreateEmbeddingResponse",
    ]:
        assert root in names

    refs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document["components"])
    assert refs
    resolver = Registry().with_resource("urn:t", Resource.from_contents(document)).resolver("urn:t")
    for ref in refs:
        assert ref.startswith("#/components/schemas/")
        resolver.lookup(ref)  # raises if unresolvable
    assert "nullable" not in json.dumps(document)
