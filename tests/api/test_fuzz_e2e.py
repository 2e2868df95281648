"""Fuzzing end-to-end, against a real server: request bodies generated from OpenAI's own
request schemas (CreateChatCompletionRequest, CreateCompletionRequest, CreateEmbeddingRequest
in tests/openai_spec/schemas.json, through hypothesis-jsonschema), every known field given
every wrong type, and hand-written hostile bodies (malformed JSON, nesting 100,000 deep,
invalid UTF-8, lone surrogates, NUL bytes, numbers too large for any field, duplicate keys,
huge stop lists).

Every answer is a 200 that matches OpenAI's response schema (streamed: every chunk matches the
chunk schema, and no error event) or a 400/404 in OpenAI's error envelope: never a 5xx, a 422
or a hang (each request has a 30 s timeout). Afterwards the server is healthy and answers
greedy requests exactly as it did before the fuzzing. Last come large but valid payloads for
the model processes (2048 embedding inputs, a logit_bias over the whole vocabulary).

Generated bodies are kept small and fast: strings and lists are capped, `model` is mostly the
served model and only the served fields are generated (in most tests) so that requests reach
the engine, and max_tokens / n are capped. The module takes 1.5 to 2 minutes on two cores; the
example counts below are sized for that.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import MODEL, Server, run_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_schema import SCHEMAS_PATH, validate
from sse import parse_events

hypothesis_jsonschema = pytest.importorskip("hypothesis_jsonschema")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
EMBED_MODEL = "all-minilm-l6-v2"
MAX_SEQUENCES = 4
# The most tokens a generated request may ask for (a request for more than the context holds
# is a quick 400, and is sent as generated).
MAX_TOKENS = 8
TIMEOUT = 30.0
JSON_HEADERS = {"content-type": "application/json"}

RESPONSE_SCHEMA = {
    CHAT: ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"),
    COMPLETIONS: ("CreateCompletionResponse", "CreateCompletionStreamResponse"),
    EMBEDDINGS: ("CreateEmbeddingResponse", None),
}


# -- hypothesis-jsonschema on this Hypothesis --------------------------------------------------


def _patch_hypothesis_jsonschema() -> None:
    """hypothesis-jsonschema 0.23.1 (its latest release) drives Hypothesis's private
    `cu.many` with `while elements.more():`; newer Hypothesis releases replaced that method
    with a `with many(...) as elements: for _ in elements:` protocol. Give its module a
    `many` with the old method on top of the new protocol; nothing else is touched."""
    from hypothesis.internal.conjecture import utils as cu
    from hypothesis_jsonschema import _from_schema

    if hasattr(cu.many, "more") or not hasattr(cu.many, "__enter__"):
        return

    class many(cu.many):
        def more(self) -> bool:
            if self._depth is None:
                self.__enter__()
                self._elements = iter(self)
            if next(self._elements, False) is None:
                return True
            self.__exit__(None)
            return False

    class compat:
        pass

    compat.many = many
    _from_schema.cu = compat


_patch_hypothesis_jsonschema()
from_schema = hypothesis_jsonschema.from_schema


# -- request schemas -----------------------------------------------------------------------


def _components() -> dict:
    return json.loads(Path(SCHEMAS_PATH).read_text(encoding="utf-8"))["components"]["schemas"]


def _inline(node, schemas: dict, stack: tuple[str, ...] = ()):
    """`node` with every `$ref` replaced by the schema it names (the request schemas are not
    recursive), `format` (int64, uri: not asserted) and `discriminator` (OpenAPI) dropped,
    and `oneOf` loosened to `anyOf` (generating for oneOf means filtering out values that
    match two branches, which is slow here and buys nothing: the server must answer any
    body)."""
    if isinstance(node, list):
        return [_inline(v, schemas, stack) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        assert name not in stack, f"recursive schema {name}"
        target = _inline(schemas[name], schemas, (*stack, name))
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return {"allOf": [target, _inline(rest, schemas, stack)]} if rest else target
    out = {}
    for key, value in node.items():
        if key in ("format", "discriminator"):
            continue
        if key in ("enum", "const", "default", "required"):
            out[key] = value
        elif key == "oneOf":
            out["anyOf"] = _inline(value, schemas, stack)
        elif key in ("properties", "patternProperties"):
            out[key] = {k: _inline(v, schemas, stack) for k, v in value.items()}
        else:
            out[key] = _inline(value, schemas, stack)
    return out


def _bounded(node, *, max_length: int = 24, max_items: int = 3):
    """Every string at most `max_length` characters, every array at most `max_items` long:
    fast requests, and fast generation."""
    if isinstance(node, list):
        return [_bounded(v, max_length=max_length, max_items=max_items) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("enum", "const", "default", "required"):
            out[key] = value
        elif key in ("properties", "patternProperties"):
            out[key] = {k: _bounded(v, max_length=max_length, max_items=max_items)
                        for k, v in value.items()}
        else:
            out[key] = _bounded(value, max_length=max_length, max_items=max_items)
    types = out.get("type")
    types = types if isinstance(types, list) else [types]
    if "string" in types and "enum" not in out:
        out["maxLength"] = min(out.get("maxLength", max_length), max_length)
        out["minLength"] = min(out.get("minLength", 0), out["maxLength"])
    if "array" in types or "items" in out:
        out["maxItems"] = min(out.get("maxItems", max_items), max_items)
        out["minItems"] = min(out.get("minItems", 0), out["maxItems"])
    return out


def _flat_object(schema: dict) -> dict:
    """An `allOf` of object schemas as one object schema (properties merged, the later
    definition of a property winning; required fields united)."""
    parts = schema.get("allOf", [schema])
    properties: dict = {}
    required: list = []
    for part in parts:
        if "allOf" in part:
            part = _flat_object(part)
        properties.update(part.get("properties", {}))
        required += [r for r in part.get("required", []) if r not in required]
    return {"type": "object", "properties": properties, "required": required}


def _served_subset(schema: dict, fields: set[str], **patches) -> dict:
    """The spec's request schema cut down to the fields this server serves, with no other
    keys, so that most generated bodies are served rather than refused by name. `patches`
    replace some properties' schemas."""
    flat = _flat_object(_inline(schema, _components()))
    props = {k: v for k, v in flat["properties"].items() if k in fields}
    props.update(patches)
    return {"type": "object", "properties": props, "required": flat["required"],
            "additionalProperties": False}


SCHEMAS = _components()
TOKEN_IDS = {"type": "integer", "minimum": 0, "maximum": 49151}  # the bundled model's vocab
LOGIT_BIAS = {"type": ["object", "null"], "maxProperties": 3,
              "propertyNames": {"pattern": "^[0-9]{1,5}$"},
              "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100}}
SAMPLING_FIELDS = {"model", "n", "temperature", "top_p", "seed", "stop", "presence_penalty",
                   "frequency_penalty", "logit_bias", "stream", "stream_options", "user"}
CHAT_FIELDS = SAMPLING_FIELDS | {
    "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "store",
    "metadata", "service_tier", "prompt_cache_key", "safety_identifier"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "max_tokens", "echo", "logprobs", "best_of"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}

# The spec's own schemas, whole (every OpenAI field, unsupported ones too).
FULL_CHAT = _bounded(_inline(SCHEMAS["CreateChatCompletionRequest"], SCHEMAS))
FULL_COMPLETION = _bounded(_inline(SCHEMAS["CreateCompletionRequest"], SCHEMAS))
FULL_EMBEDDING = _bounded(_inline(SCHEMAS["CreateEmbeddingRequest"], SCHEMAS))



def _text_messages(chat: dict) -> dict:
    """Chat messages of every role but the deprecated `function` (which this server, like
    OpenAI's newer models, refuses)."""
    messages = chat["properties"]["messages"]
    kinds = [m for m in messages["items"]["anyOf"]
             if m["properties"]["role"].get("enum") != ["function"]]
    assert len(kinds) == 5, kinds
    chat["properties"]["messages"] = {**messages, "items": {"anyOf": kinds}}
    return chat


# The same schemas cut down to what this server serves.
SERVED_CHAT = _bounded(_text_messages(_served_subset(
    SCHEMAS["CreateChatCompletionRequest"], CHAT_FIELDS, logit_bias=LOGIT_BIAS)))
SERVED_COMPLETION = _bounded(_served_subset(
    SCHEMAS["CreateCompletionRequest"], COMPLETION_FIELDS, logit_bias=LOGIT_BIAS,
    prompt={"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        {"type": "array", "minItems": 1, "items": TOKEN_IDS},
        {"type": "array", "minItems": 1,
         "items": {"type": "array", "minItems": 1, "items": TOKEN_IDS}},
    ]}))
SERVED_EMBEDDING = _bounded(_served_subset(
    SCHEMAS["CreateEmbeddingRequest"], EMBEDDING_FIELDS,
    input={"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0,
                                                   "maximum": 30521}},
    ]}))


_STRATEGIES: dict[int, st.SearchStrategy] = {}


@st.composite
def _served_request(draw, schema: dict, model: str, path: str, share: int = 9) -> dict:
    """A body from `schema`, with `model` the served one `share` times in ten, and the
    work it asks for bounded (max_tokens, n)."""
    if id(schema) not in _STRATEGIES:
        _STRATEGIES[id(schema)] = from_schema(schema)
    body = draw(_STRATEGIES[id(schema)])
    if draw(st.integers(0, 9)) < share:
        body["model"] = model
    if path == EMBEDDINGS:
        return body
    cap = draw(st.integers(1, MAX_TOKENS))
    limited = False
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if value < 4096:  # larger: over the context, a quick 400
                body[key] = min(value, cap)
            limited = True
    if not limited:
        # Chat's default is the rest of the context; completions' 16.
        body["max_tokens"] = cap
    n = body.get("n")
    over = isinstance(n, int) and not isinstance(n, bool) and n > MAX_SEQUENCES
    if over and draw(st.integers(0, 9)) < 8:  # else: a 400 naming --max-sequences
        body["n"] = draw(st.integers(1, MAX_SEQUENCES))
    if isinstance(body.get("best_of"), int) and "n" in body:
        body["best_of"] = body["n"]
    if draw(st.integers(0, 9)) < 4:  # streamed answers too
        body["stream"] = True
        if "stream_options" not in body and draw(st.booleans()):
            body["stream_options"] = {"include_usage": True}
    return body


# -- the server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Bundled chat model and bundled embedder (the default), 4 sequences."""
    with run_server(tmp_path_factory.mktemp("fuzz"), "--max-sequences", str(MAX_SEQUENCES)) as s:
        yield s


@pytest.fixture(scope="module")
def fuzz_http(fuzz_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.url, headers=fuzz_server.headers(),
                      timeout=TIMEOUT) as c:
        yield c


GREEDY_CHAT = {"model": MODEL, "temperature": 0, "max_tokens": 16,
               "messages": [{"role": "user", "content": "Name three colours."}]}
GREEDY_COMPLETION = {"model": MODEL, "temperature": 0, "max_tokens": 16,
                     "prompt": "The capital of France is"}


def greedy_answers(http: httpx.Client) -> tuple[str, str]:
    chat = http.post(CHAT, json=GREEDY_CHAT)
    assert chat.status_code == 200, chat.text
    completion = http.post(COMPLETIONS, json=GREEDY_COMPLETION)
    assert completion.status_code == 200, completion.text
    return chat.json()["choices"][0]["message"]["content"], completion.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def baseline(fuzz_http: httpx.Client) -> tuple[str, str]:
    """The greedy answers before any fuzzing."""
    return greedy_answers(fuzz_http)


# -- checking one exchange -----------------------------------------------------------------


def _shown(raw: bytes, limit: int = 600) -> str:
    return repr(raw[:limit]) + (f"... ({len(raw)} bytes)" if len(raw) > limit else "")


def send(http: httpx.Client, server: Server, path: str, raw: bytes,
         headers: dict[str, str] = JSON_HEADERS) -> httpx.Response:
    """POST `raw`, and check the answer: a 200 that matches the response schema, or a 400 or
    404 in OpenAI's error envelope. Returns the response (read in full)."""
    try:
        with http.stream("POST", path, content=raw, headers=headers) as r:
            r.read()
    except httpx.TimeoutException as exc:
        pytest.fail(f"no answer within {TIMEOUT:g} s ({exc!r}) to POST {path} {_shown(raw)}\n"
                    f"server log tail:\n{server.log()[-3000:]}")

    def context() -> str:
        return (f"POST {path} {_shown(raw)}\n-> {r.status_code} {r.text[:1500]}\n"
                f"server log tail:\n{server.log()[-3000:]}")

    def check(ok: bool) -> None:
        if not ok:
            pytest.fail(context())

    check(r.status_code in (200, 400, 404))
    media = r.headers.get("content-type", "")
    if r.status_code != 200:
        check(media.startswith("application/json"))
        body = r.json()
        validate("ErrorResponse", body)
        check(set(body) == {"error"} and bool(body["error"]["message"]))
        return r
    whole, chunk = RESPONSE_SCHEMA[path]
    if media.startswith("text/event-stream"):
        check(chunk is not None)
        events = parse_events(r.content)
        check(bool(events) and events[-1] == "[DONE]")
        for event in events[:-1]:
            data = json.loads(event)
            # Nothing in a request may break a stream once it has started.
            check("error" not in data)
            validate(chunk, data)
        return r
    check(media.startswith("application/json"))
    body = r.json()
    if path == EMBEDDINGS:
        body = {**body, "data": [
            {**d, "embedding": np.frombuffer(base64.b64decode(d["embedding"]), "<f4").tolist()}
            if isinstance(d["embedding"], str) else d
            for d in body["data"]
        ]}
    validate(whole, body)
    return r


def send_json(http: httpx.Client, server: Server, path: str, body) -> httpx.Response:
    # json.dumps writes any non-ASCII as \u escapes, a lone surrogate included.
    return send(http, server, path, json.dumps(body).encode())


FUZZ = settings(
    deadline=None,
    database=None,  # a fresh search each run: the server is what is under test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# -- generated from OpenAI's request schemas -----------------------------------------------


def test_greedy_baseline(baseline):
    chat, completion = baseline
    assert chat and completion


@settings(FUZZ, max_examples=90)
@given(data=st.data())
def test_chat_served_fields(fuzz_server, fuzz_http, baseline, data):
    body = data.draw(_served_request(SERVED_CHAT, MODEL, CHAT))
    send_json(fuzz_http, fuzz_server, CHAT, body)


@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_chat_whole_spec(fuzz_server, fuzz_http, baseline, data):
    body = data.draw(_served_request(FULL_CHAT, MODEL, CHAT, share=7))
    send_json(fuzz_http, fuzz_server, CHAT, body)


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_completions_served_fields(fuzz_server, fuzz_http, baseline, data):
    body = data.draw(_served_request(SERVED_COMPLETION, MODEL, COMPLETIONS))
    send_json(fuzz_http, fuzz_server, COMPLETIONS, body)


@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_completions_whole_spec(fuzz_server, fuzz_http, baseline, data):
    body = data.draw(_served_request(FULL_COMPLETION, MODEL, COMPLETIONS, share=7))
    send_json(fuzz_http, fuzz_server, COMPLETIONS, body)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_embeddings_served_fields(fuzz_server, fuzz_http, baseline, data):
    body = data.draw(_served_request(SERVED_EMBEDDING, EMBED_MODEL, EMBEDDINGS))
    send_json(fuzz_http, fuzz_server, EMBEDDINGS, body)


@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_embeddings_whole_spec(fuzz_server, fuzz_http, baseline, data):
    body = data.draw(_served_request(FULL_EMBEDDING, EMBED_MODEL, EMBEDDINGS, share=7))
    send_json(fuzz_http, fuzz_server, EMBEDDINGS, body)


# -- every field, every wrong type ---------------------------------------------------------

BIG = 2**70
WRONG_VALUES = [None, True, False, 0, -1, BIG, -BIG, 1.5, -0.0, 1e300, "", "x", "\x00",
                "1", [], [1], ["x"], [None], {}, {"a": 1}, {"": None}]
VALID = {
    CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    COMPLETIONS: {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
    EMBEDDINGS: {"model": EMBED_MODEL, "input": "Hi"},
}
FIELDS = {
    CHAT: sorted(CHAT_FIELDS | {"top_k", "min_p", "repetition_penalty", "ignore_eos", "tools",
                                "response_format", "suffix"}),
    COMPLETIONS: sorted(COMPLETION_FIELDS | {"top_k", "min_p", "repetition_penalty",
                                             "ignore_eos", "suffix"}),
    EMBEDDINGS: sorted(EMBEDDING_FIELDS),
}


def _with(path: str, field: str, value) -> dict:
    body = {**VALID[path], field: value}
    if field in ("max_tokens", "max_completion_tokens"):
        # The other one keeps the answer short whatever this one says.
        other = "max_completion_tokens" if field == "max_tokens" else "max_tokens"
        if path == CHAT:
            body[other] = 2
        if isinstance(value, int) and not isinstance(value, bool) and 2 < value < 4096:
            body[field] = 2
    if field == "stream_options":
        body["stream"] = True
    return body


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_every_field_every_wrong_type(fuzz_server, fuzz_http, baseline, path):
    for field in FIELDS[path]:
        for value in WRONG_VALUES:
            if path == COMPLETIONS and field == "max_tokens" and value is None:
                continue  # no limit but the context: valid, and far too slow here
            send_json(fuzz_http, fuzz_server, path, _with(path, field, value))
    # And in a message, a content part, and as a message's extra field (the chat template
    # gets those).
    if path == CHAT:
        for value in WRONG_VALUES:
            for message in ({"role": value, "content": "Hi"}, {"role": "user", "content": value},
                            {"role": "user", "content": [{"type": "text", "text": value}]},
                            {"role": "user", "content": [{"type": value, "text": "Hi"}]},
                            {"role": "user", "content": "Hi", "name": value},
                            {"role": "assistant", "content": "Hi", "tool_calls": value},
                            value):
                send_json(fuzz_http, fuzz_server, path, {**VALID[CHAT], "messages": [message]})


# -- hand-written hostile bodies -----------------------------------------------------------

DEEP = 100_000
M = json.dumps(MODEL).encode()


def _chat(extra: bytes = b"", content: bytes = b'"Say hi."', model: bytes = M) -> bytes:
    return (b'{"model": ' + model + b', "max_tokens": 2, "messages": [{"role": "user", '
            b'"content": ' + content + b"}]" + extra + b"}")


def _completion(extra: bytes = b"", prompt: bytes = b'"Say hi."') -> bytes:
    return b'{"model": ' + M + b', "max_tokens": 2, "prompt": ' + prompt + extra + b"}"


def _embedding(extra: bytes = b"", input: bytes = b'"Say hi."') -> bytes:
    return b'{"model": "' + EMBED_MODEL.encode() + b'", "input": ' + input + extra + b"}"


ARRAYS = b"[" * DEEP + b"]" * DEEP
OBJECTS = b'{"a": ' * DEEP + b"1" + b"}" * DEEP
UNCLOSED = b"[" * DEEP
# Just under orjson's depth limit (1024): parsed, then up to pydantic and the template.
ARRAYS_1000 = b"[" * 1000 + b"]" * 1000
OBJECTS_1000 = b'{"a": ' * 1000 + b'"x"' + b"}" * 1000

MALFORMED = [b"", b" ", b"\n", b"{", b"}", b"[", b"{}", b"[]", b"[1, 2]", b'"text"', b"42",
             b"null", b"true", b"\x00", b'{"model": ', b'{"model": "x",}', b"{'model': 'x'}",
             b'{"model": "x"} trailing', b'{"model": "x"}{"model": "y"}', b"NaN", b"-",
             b'{"model": "x", "temperature": NaN, ', b"\xef\xbb\xbf{}", b'{"a": 01}',
             b'{"a": 1.}', b'{"a": .5}', b'{"a": +1}', b'{"a": 0x10}', b'{"a": "\\x41"}',
             b'{"a": "\\u12"}', b'{"a": "\t"}', b'{"\x00": 1}', b"\xff" * 64,
             UNCLOSED, ARRAYS, OBJECTS, b'{"a": ' * DEEP, b'{"messages": ' + UNCLOSED]

CHAT_HOSTILE = [
    # nesting, in every place a value can go
    _chat(content=ARRAYS), _chat(content=OBJECTS), _chat(b', "metadata": ' + OBJECTS),
    _chat(b', "metadata": ' + ARRAYS), _chat(b', "logit_bias": ' + OBJECTS),
    _chat(b', "stop": ' + ARRAYS), _chat(b', "user": ' + ARRAYS),
    _chat(content=ARRAYS_1000), _chat(content=OBJECTS_1000),
    _chat(b', "metadata": ' + OBJECTS_1000), _chat(b', "stop": ' + ARRAYS_1000),
    _chat(content=b'"Hi", "extra": ' + ARRAYS_1000),
    _chat(content=b'"Hi", "extra": ' + OBJECTS_1000),
    _chat(content=b'"Hi", "tool_calls": ' + OBJECTS_1000),
    _chat(content=b'[{"type": "text", "text": "Hi", "x": ' + ARRAYS_1000 + b"}]"),
    # invalid UTF-8 (raw bytes) in content and in the model name
    _chat(content=b'"\xff\xfe"'), _chat(content=b'"\xc0\xaf"'), _chat(content=b'"\xe2\x82"'),
    _chat(content=b'"\xed\xa0\x80"'), _chat(content=b'"\xf4\x90\x80\x80"'),
    _chat(content=b'"\x80"'), _chat(model=b'"\xff"'),
    # lone surrogates as JSON escapes
    _chat(content=b'"\\ud800"'), _chat(content=b'"\\udfff"'), _chat(content=b'"a\\ud800b"'),
    _chat(content=b'"\\ud800\\u0041"'), _chat(content=b'"\\udc00\\ud800"'),
    _chat(model=b'"\\ud800"'), _chat(b', "stop": ["\\ud800"]'), _chat(b', "user": "\\udfff"'),
    _chat(b', "metadata": {"\\ud800": "x"}'), _chat(b', "logit_bias": {"\\ud800": 1}'),
    _chat(content=b'[{"type": "text", "text": "\\ud800"}]'),
    # NUL bytes, escaped and raw
    _chat(content=b'"a\\u0000b"'), _chat(content=b'"\\u0000"'), _chat(content=b'"a\x00b"'),
    _chat(model=M[:-1] + b'\\u0000"'), _chat(model=b'"\\u0000"'), _chat(model=M[:-1] + b'\x00"'),
    _chat(b', "stop": ["\\u0000"]'), _chat(b', "stop": "\\u0000"'),
    _chat(b', "user": "\\u0000"'), _chat(b', "metadata": {"\\u0000": "\\u0000"}'),
    _chat(b', "logit_bias": {"\\u0000": 1}'), _chat(b', "\\u0000": 1'),
    # numbers: too large for a double, too large for 64 bits, negative zero, exponents
    *[_chat(b', "%s": %s' % (field.encode(), number))
      for field in ("n", "max_completion_tokens", "seed", "top_k", "temperature", "top_p",
                    "presence_penalty", "top_logprobs", "repetition_penalty", "min_p")
      for number in (b"1e400", b"-1e400", b"1180591620717411303424", b"-1180591620717411303424",
                     b"18446744073709551616", b"9223372036854775808", b"-9223372036854775809",
                     b"4294967296", b"-0", b"-0.0", b"1e-400", b"1E2", b"1.0e0",
                     b"1" + b"0" * 5000)],
    _chat(b', "max_tokens": 1e400'), _chat(b', "max_tokens": -0'),
    _chat(b', "max_tokens": 1180591620717411303424'),
    _chat(b', "logprobs": true, "top_logprobs": 1180591620717411303424'),
    *[_chat(b', "logit_bias": {"%s": 1}' % key)
      for key in (b"1180591620717411303424", b"18446744073709551616", b"-1", b"-0", b" 1",
                  b"1 ", b"1_0", b"\\u0661", b"1e3", b"0x10", b"+1", b"", b"1.0", b"NaN")],
    *[_chat(b', "logit_bias": {"1": %s}' % value)
      for value in (b"1e400", b"-1e400", b"1180591620717411303424", b"101", b"-0", b"true",
                    b'"1"', b"null")],
    # huge lists and strings
    _chat(b', "stop": ' + json.dumps([f"s{i}" for i in range(100_000)]).encode()),
    _chat(b', "stop": ' + json.dumps("z" * 1_000_000).encode()),
    _chat(b', "stop": ' + json.dumps([""] * 1000).encode()),
    _chat(b', "logit_bias": ' + json.dumps({str(i): 1 for i in range(1000)}).encode()),
    _chat(b', "metadata": ' + json.dumps({f"k{i}": "v" for i in range(50_000)}).encode()),
    _chat(content=json.dumps([{"type": "text", "text": "a"}] * 20_000).encode()),
    b'{"model": ' + M + b', "max_tokens": 2, "messages": '
    + json.dumps([{"role": "user", "content": "a"}] * 3000).encode() + b"}",
    # duplicate keys (the last one counts, as for json.loads)
    b'{"model": "x", "model": ' + M + b', "max_tokens": 2, "messages": [], '
    b'"messages": [{"role": "user", "content": "Hi"}]}',
    b'{"model": ' + M + b', "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}], '
    b'"messages": []}',
    _chat(b', "max_tokens": 5000, "max_tokens": 1'),
    _chat(content=b'"Hi", "role": "robot"'),
]

COMPLETION_HOSTILE = [
    _completion(prompt=ARRAYS), _completion(prompt=ARRAYS_1000), _completion(prompt=OBJECTS),
    _completion(prompt=b'"\\ud800"'), _completion(prompt=b'"\xff"'),
    _completion(prompt=b'"\\u0000"'), _completion(prompt=b'["\\u0000", "\\u0000"]'),
    _completion(prompt=b"[1180591620717411303424]"), _completion(prompt=b"[-1]"),
    _completion(prompt=b"[49152]"), _completion(prompt=b"[[]]"), _completion(prompt=b"[]"),
    _completion(prompt=b'""'), _completion(prompt=b'[""]'), _completion(prompt=b"[1.5]"),
    _completion(prompt=b"[1e400]"), _completion(prompt=b"[-0]"), _completion(prompt=b"[true]"),
    _completion(prompt=b'[1, "a"]'), _completion(prompt=b"[[1], 1]"),
    _completion(prompt=b"[[1180591620717411303424]]"),
    _completion(b', "echo": true', prompt=b'"\\u0000"'),
    _completion(b', "logprobs": 1e400'), _completion(b', "best_of": 1180591620717411303424'),
    _completion(b', "n": 1180591620717411303424'), _completion(b', "seed": 1e400'),
    _completion(b', "suffix": "\\ud800"'), _completion(b', "stop": ["\\u0000"]'),
    _completion(prompt=json.dumps(["a"] * 64).encode()),
    _completion(prompt=json.dumps([[1, 2]] * 64).encode()),
    _completion(prompt=json.dumps(list(range(1, 2100))).encode()),
]

EMBEDDING_HOSTILE = [
    _embedding(input=ARRAYS), _embedding(input=ARRAYS_1000), _embedding(input=OBJECTS),
    _embedding(input=b'"\\ud800"'), _embedding(input=b'"\xff"'), _embedding(input=b'"\\u0000"'),
    _embedding(input=b'"\x00"'), _embedding(input=b'["\\u0000", ""]'),
    _embedding(input=b"[1180591620717411303424]"), _embedding(input=b"[-1]"),
    _embedding(input=b"[30522]"), _embedding(input=b"[[]]"), _embedding(input=b"[]"),
    _embedding(input=b'""'), _embedding(input=b"[1e400]"), _embedding(input=b"[[1e400]]"),
    _embedding(input=b"[[-0]]"), _embedding(input=b"[true]"),
    _embedding(input=json.dumps("word " * 2000).encode()),
    _embedding(input=json.dumps(list(range(1, 1000))).encode()),
    _embedding(b', "dimensions": 1180591620717411303424'), _embedding(b', "dimensions": 1e400'),
    _embedding(b', "dimensions": -0'), _embedding(b', "encoding_format": "\\u0000"'),
    b'{"model": ' + M + b', "input": "Hi"}',
    b'{"model": "' + EMBED_MODEL.encode() + b'", "model": "x", "input": "Hi"}',
    b'{"model": "' + EMBED_MODEL.encode() + b'\\u0000", "input": "Hi"}',
]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_malformed_bodies(fuzz_server, fuzz_http, baseline, path):
    for raw in MALFORMED:
        r = send(fuzz_http, fuzz_server, path, raw)
        assert r.status_code == 400, (raw[:200], r.text)


@pytest.mark.parametrize("path,bodies", [
    (CHAT, CHAT_HOSTILE), (COMPLETIONS, COMPLETION_HOSTILE), (EMBEDDINGS, EMBEDDING_HOSTILE),
], ids=["chat", "completions", "embeddings"])
def test_hostile_bodies(fuzz_server, fuzz_http, baseline, path, bodies):
    for raw in bodies:
        send(fuzz_http, fuzz_server, path, raw)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_hostile_bodies_streamed(fuzz_server, fuzz_http, baseline, path):
    """With stream: true, a refused body is still refused before the stream starts."""
    bodies = CHAT_HOSTILE if path == CHAT else COMPLETION_HOSTILE
    for raw in bodies[::3]:
        if raw.endswith(b"}"):
            send(fuzz_http, fuzz_server, path, raw[:-1] + b', "stream": true}')


@pytest.mark.parametrize("media", [
    "application/json; charset=latin-1", "application/json; charset=utf-16",
    "APPLICATION/JSON", "application/json;;;", 'application/json; charset="utf-8"',
])
def test_content_type_parameters(fuzz_server, fuzz_http, baseline, media):
    """Parameters on the JSON media type change nothing: the body is read as UTF-8 JSON."""
    send(fuzz_http, fuzz_server, CHAT, _chat(content=b'"caf\xe9"'), {"content-type": media})
    send(fuzz_http, fuzz_server, CHAT, _chat(), {"content-type": media})


# -- afterwards ----------------------------------------------------------------------------


def test_still_healthy_and_deterministic(fuzz_server, fuzz_http, baseline):
    health = fuzz_http.get("/health")
    assert health.status_code == 200, health.text
    assert greedy_answers(fuzz_http) == baseline
    assert fuzz_server.process.poll() is None
    log = fuzz_server.log()
    assert "Traceback" not in log and " crashed" not in log, log[-5000:]


# -- large but valid payloads for the model processes ----------------------------------------
# Last in this module: each of these has failed with a 503 that leaves its model process
# restarting or wedged, which would only muddle every test after it.

LARGE = {
    # OpenAI takes up to 2048 inputs in one embeddings request; the batcher embeds 64 at a
    # time, so 128 is two full batches.
    "embeddings-128": (EMBEDDINGS, {"model": EMBED_MODEL,
                                    "input": [f"text number {i}" for i in range(128)]}),
    "embeddings-2048": (EMBEDDINGS, {"model": EMBED_MODEL,
                                     "input": [f"text number {i}" for i in range(2048)]}),
    # A bias for every token of the vocabulary (49,152), for four prompts: four messages of
    # about 0.6 MB each to the engine process.
    "logit-bias-whole-vocab": (COMPLETIONS, {**VALID[COMPLETIONS], "prompt": ["Hi"] * 4,
                                             "logit_bias": {str(i): 1 for i in range(49_152)}}),
}


@pytest.mark.parametrize("case", list(LARGE))
def test_large_valid_payloads(fuzz_server, fuzz_http, baseline, case):
    deadline = time.monotonic() + 15  # each case on its own: not while a process restarts
    while fuzz_http.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    path, body = LARGE[case]
    r = send_json(fuzz_http, fuzz_server, path, body)
    assert r.status_code == 200, r.text
    if path == EMBEDDINGS:
        assert len(r.json()["data"]) == len(body["input"])
        assert fuzz_http.post(EMBEDDINGS, json=VALID[EMBEDDINGS]).status_code == 200
    else:  # the engine still answers, as before
        assert greedy_answers(fuzz_http) == baseline
