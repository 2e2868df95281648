"""End-to-end: every error leaves the server in OpenAI's envelope, with the right status and
never a 422 or a 500; auth; admission limits (429 / 503); request ids.

Every error body is validated against OpenAI's ErrorResponse schema."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import API_KEY, MODEL, run_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_schema import validate
from sse import parse_events, stream_post

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Say hi."}]


def chat_body(**extra) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **extra}


def completion_body(**extra) -> dict:
    return {"model": MODEL, "prompt": "Say hi.", "max_tokens": 2, **extra}


BODIES = {CHAT: chat_body, COMPLETIONS: completion_body}
both_routes = pytest.mark.parametrize("path", [CHAT, COMPLETIONS])


def assert_error(
    r: httpx.Response,
    status: int,
    *,
    type: str | None = None,
    code: object = ...,
    param: object = ...,
    in_message: tuple[str, ...] = (),
) -> dict:
    """The response is an OpenAI error envelope with this status; returns the error."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    validate("ErrorResponse", body)
    assert set(body) == {"error"}
    err = body["error"]
    assert err["message"]
    if type is not None:
        assert err["type"] == type, err
    if code is not ...:
        assert err["code"] == code, err
    if param is not ...:
        assert err["param"] == param, err
    for piece in in_message:
        assert piece in err["message"], err
    return err


def post_stream_plain(http: httpx.Client, path: str, body: dict) -> httpx.Response:
    """POST a stream=true request that must fail before its first chunk: a plain HTTP error
    with a JSON body, not an event stream."""
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        r.read()
    assert not r.headers["content-type"].startswith("text/event-stream"), r.text
    return r


# -- malformed requests ---------------------------------------------------------------------


@both_routes
def test_malformed_json(http, path):
    r = http.post(path, content=b'{"model": "x", ', headers={"content-type": "application/json"})
    assert_error(r, 400, type="invalid_request_error")


@both_routes
@pytest.mark.parametrize("raw", [b"[]", b"[1, 2]", b'"text"', b"42", b"null", b""])
def test_body_not_an_object(http, path, raw):
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, type="invalid_request_error")


def test_missing_messages(http):
    r = http.post(CHAT, json={"model": MODEL})
    assert_error(r, 400, type="invalid_request_error", param="messages", in_message=("messages",))


def test_missing_prompt(http):
    r = http.post(COMPLETIONS, json={"model": MODEL})
    assert_error(r, 400, param="prompt", in_message=("prompt",))


@both_routes
def test_missing_model(http, path):
    body = BODIES[path]()
    del body["model"]
    assert_error(http.post(path, json=body), 400, param="model", in_message=("model",))


def test_empty_messages(http):
    r = http.post(CHAT, json=chat_body(messages=[]))
    assert_error(r, 400, param="messages")


@pytest.mark.parametrize("messages", [
    [{"role": "robot", "content": "hi"}],
    [{"content": "hi"}],
    "hello",
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "text"}]}],
])
def test_bad_messages(http, messages):
    err = assert_error(http.post(CHAT, json=chat_body(messages=messages)), 400,
                       type="invalid_request_error")
    assert err["param"] is not None and err["param"].startswith("messages")


def test_bad_role_named(http):
    err = assert_error(http.post(CHAT, json=chat_body(messages=[{"role": "robot", "content": "x"}])),
                       400)
    assert err["param"] == "messages.0.role"


@both_routes
@pytest.mark.parametrize("field,value", [
    ("temperature", 3), ("temperature", -0.5), ("temperature", "hot"),
    ("top_p", 1.5), ("n", 0), ("n", -1), ("n", 1.5), ("max_tokens", 0), ("max_tokens", -5),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("stop", 5), ("stop", [1]),
    ("logit_bias", {"x": 1}), ("logit_bias", {"1": 500}), ("logit_bias", {"99999999": 1}),
    ("seed", "abc"), ("stream", "maybe"), ("stream_options", {"bogus": True}),
])
def test_out_of_range_values(http, path, field, value):
    body = BODIES[path](**{field: value})
    if field == "stream_options":
        body["stream"] = True
    err = assert_error(http.post(path, json=body), 400, type="invalid_request_error")
    assert err["param"] is not None and err["param"].startswith(field), err


def test_temperature_3_names_temperature(http, client):
    err = assert_error(http.post(CHAT, json=chat_body(temperature=3)), 400, param="temperature")
    assert "temperature" in err["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3, max_tokens=2)
    assert exc.value.status_code == 400
    assert exc.value.param == "temperature"


def post_raw(http: httpx.Client, path: str, body: dict, *, stream: bool = False) -> httpx.Response:
    """POST `body` written by Python's json module, which writes NaN, Infinity and -Infinity
    literals (as the openai client's own json.dumps would); orjson refuses them."""
    raw = json.dumps({**body, "stream": True} if stream else body).encode()
    with http.stream("POST", path, content=raw,
                     headers={"content-type": "application/json"}) as r:
        r.read()
    return r


NAN, INF = float("nan"), float("inf")


@both_routes
@pytest.mark.parametrize("field,value,param", [
    ("temperature", NAN, "temperature"), ("temperature", INF, "temperature"),
    ("temperature", -INF, "temperature"), ("temperature", "NaN", "temperature"),
    ("top_p", NAN, "top_p"), ("top_p", -INF, "top_p"),
    ("presence_penalty", INF, "presence_penalty"), ("frequency_penalty", NAN, "frequency_penalty"),
    ("min_p", NAN, "min_p"), ("repetition_penalty", NAN, "repetition_penalty"),
    ("repetition_penalty", INF, "repetition_penalty"),
    ("repetition_penalty", 1e-300, "repetition_penalty"),
    ("repetition_penalty", 0.009, "repetition_penalty"),
    ("logit_bias", {"1": NAN}, "logit_bias.1"), ("logit_bias", {"7": -INF}, "logit_bias.7"),
    ("logit_bias", {"1": 1.0, "7": INF}, "logit_bias.7"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_non_finite_and_unsafe_floats_name_the_field(http, path, field, value, param, stream):
    r = post_raw(http, path, BODIES[path](**{field: value}), stream=stream)
    assert not r.headers["content-type"].startswith("text/event-stream"), r.text
    err = assert_error(r, 400, type="invalid_request_error", param=param)
    assert field in err["message"]


@both_routes
def test_number_too_large_for_a_double_names_the_field(http, path):
    raw = json.dumps(BODIES[path]()).encode()[:-1] + b', "temperature": 1e400}'
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, param="temperature", in_message=("temperature",))


def test_nan_where_no_float_is_read_names_its_path(http):
    """A NaN in a field the request model passes through unread (a message's extra fields
    go to the chat template) is still refused, by its path."""
    body = chat_body(messages=[{"role": "user", "content": "Hi", "weight": NAN}])
    assert_error(post_raw(http, CHAT, body), 400, param="messages.0.weight")
    body = chat_body(messages=[{"role": "user", "content": "Hi", "extra": [1, {"x": -INF}]}])
    assert_error(post_raw(http, CHAT, body), 400, param="messages.0.extra.1.x")


def test_invalid_json_that_python_also_refuses_names_no_field(http):
    r = http.post(CHAT, content=b'{"model": "x", "temperature": NaN, ',
                  headers={"content-type": "application/json"})
    assert_error(r, 400, param=None, in_message=("not valid JSON",))


def test_server_answers_after_non_finite_floats(http):
    for value in (NAN, INF, -INF):
        assert_error(post_raw(http, CHAT, chat_body(temperature=value)), 400,
                     param="temperature")
    r = http.post(CHAT, json=chat_body(temperature=1e-45, max_tokens=2))
    assert r.status_code == 200, r.text


@both_routes
def test_n_zero(http, path):
    assert_error(http.post(path, json=BODIES[path](n=0)), 400, param="n")


@both_routes
def test_n_over_max_sequences(http, path):
    # The shared server decodes 16 sequences together.
    err = assert_error(http.post(path, json=BODIES[path](n=17)), 400, param="n")
    assert "16" in err["message"]
    r = post_stream_plain(http, path, BODIES[path](n=17))
    assert_error(r, 400, param="n")


@both_routes
@pytest.mark.parametrize("name", ["foo", "frobnicate", "max_new_tokens"])
def test_unknown_field(http, path, name):
    r = http.post(path, json=BODIES[path](**{name: 1}))
    assert_error(r, 400, type="invalid_request_error", param=name,
                 in_message=(f"Unrecognized request argument supplied: {name}",))


def test_unknown_field_via_openai_client(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                       extra_body={"frobnicate": True})
    assert exc.value.param == "frobnicate"
    assert "Unrecognized request argument supplied: frobnicate" in exc.value.message


CHAT_UNSUPPORTED = {
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "web_search_options": {},
    "verbosity": "low",
}


@pytest.mark.parametrize("field", sorted(CHAT_UNSUPPORTED))
def test_unsupported_chat_field_named(http, field):
    r = http.post(CHAT, json=chat_body(**{field: CHAT_UNSUPPORTED[field]}))
    err = assert_error(r, 400, type="invalid_request_error", param=field, in_message=(field,))
    assert "Unrecognized" not in err["message"]  # known to OpenAI: refused as unsupported
    # Streamed: refused before the first chunk, as a plain HTTP error.
    r = post_stream_plain(http, CHAT, chat_body(**{field: CHAT_UNSUPPORTED[field]}))
    assert_error(r, 400, param=field)


def test_fields_a_client_sends_with_default_values_served(client):
    """What SDKs and frameworks send as they stand: nullable fields null, unsupported fields
    set to values that ask for nothing more (text only, default verbosity and tier)."""
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, n=None, modalities=["text"],
        verbosity="medium", service_tier="auto")
    assert len(reply.choices) == 1
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=None,
                                            stream=True))
    assert {c.choices[0].index for c in chunks if c.choices} == {0}


def test_unsupported_field_via_openai_client(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, functions=CHAT_UNSUPPORTED["functions"]
        )
    assert exc.value.status_code == 400
    assert exc.value.param == "functions"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, prediction=CHAT_UNSUPPORTED["prediction"],
            stream=True,
        )
    assert exc.value.param == "prediction"


def test_completions_suffix_named(http):
    r = http.post(COMPLETIONS, json=completion_body(suffix="end"))
    assert_error(r, 400, param="suffix", in_message=("suffix",))


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-1"}},
])
def test_non_text_content_part(http, part):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    err = assert_error(http.post(CHAT, json=chat_body(messages=messages)), 400,
                       type="invalid_request_error")
    assert part["type"] in err["message"]
    assert err["param"] is not None and err["param"].startswith("messages.0.content")


def test_top_logprobs_without_logprobs(http):
    assert_error(http.post(CHAT, json=chat_body(top_logprobs=3)), 400, param="top_logprobs")
    assert_error(http.post(CHAT, json=chat_body(top_logprobs=3, logprobs=False)), 400,
                 param="top_logprobs")


@both_routes
def test_stream_options_without_stream(http, path):
    body = BODIES[path](stream_options={"include_usage": True})
    assert_error(http.post(path, json=body), 400, param="stream_options")
    body["stream"] = False
    assert_error(http.post(path, json=body), 400, param="stream_options")


# -- not found / method ---------------------------------------------------------------------


@both_routes
def test_unknown_model(http, path):
    err = assert_error(http.post(path, json=BODIES[path](model="no-such-model")), 404,
                       code="model_not_found", param="model")
    assert "no-such-model" in err["message"]
    r = post_stream_plain(http, path, BODIES[path](model="no-such-model"))
    assert_error(r, 404, code="model_not_found")


def test_unknown_model_via_openai_client(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
    assert exc.value.status_code == 404 and exc.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_get_unknown_model(http):
    err = assert_error(http.get("/v1/models/nope"), 404, code="model_not_found")
    assert "nope" in err["message"]


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/nope"), ("POST", "/v1/audio/speech"), ("GET", "/nope"), ("POST", "/v2/chat"),
])
def test_unknown_route(http, method, path):
    assert_error(http.request(method, path), 404, type="invalid_request_error")


@pytest.mark.parametrize("method,path", [
    ("DELETE", CHAT), ("GET", COMPLETIONS), ("DELETE", "/v1/models"), ("PUT", CHAT),
    ("POST", "/health"),
])
def test_wrong_method(http, method, path):
    assert_error(http.request(method, path), 405, type="invalid_request_error")


def test_wrong_method_says_allow(http):
    r = http.delete(CHAT)  # GET lists stored completions
    assert r.status_code == 405
    assert r.headers.get("allow") == "GET, POST"  # every route's methods on this path


# -- context length -------------------------------------------------------------------------


def test_context_overflow_chat(http, client):
    ok = http.post(CHAT, json=chat_body(max_tokens=1)).json()
    prompt_tokens = ok["usage"]["prompt_tokens"]
    r = http.post(CHAT, json=chat_body(max_tokens=5000))
    err = assert_error(r, 400, type="invalid_request_error", code="context_length_exceeded",
                       in_message=("2048", str(prompt_tokens)))
    assert err["param"] in ("max_tokens", "messages")
    # max_completion_tokens too.
    r = http.post(CHAT, json={**chat_body(), "max_tokens": None, "max_completion_tokens": 5000})
    assert_error(r, 400, code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5000)
    assert exc.value.code == "context_length_exceeded"


def test_context_overflow_completions(http):
    ok = http.post(COMPLETIONS, json=completion_body(max_tokens=1)).json()
    prompt_tokens = ok["usage"]["prompt_tokens"]
    r = http.post(COMPLETIONS, json=completion_body(max_tokens=5000))
    assert_error(r, 400, code="context_length_exceeded", in_message=("2048", str(prompt_tokens)))


@both_routes
def test_context_overflow_in_stream_is_plain_http(http, path):
    r = post_stream_plain(http, path, BODIES[path](max_tokens=5000))
    assert_error(r, 400, code="context_length_exceeded", in_message=("2048",))


LONG = "the quick brown fox jumps over the lazy dog " * 300  # about 2700 tokens


def test_long_prompt_alone_overflows_chat(http):
    body = chat_body(messages=[{"role": "user", "content": LONG}])
    del body["max_tokens"]  # nothing asked for the completion: the prompt alone is too long
    err = assert_error(http.post(CHAT, json=body), 400, code="context_length_exceeded",
                       in_message=("2048",))
    assert err["type"] == "invalid_request_error"
    r = post_stream_plain(http, CHAT, body)
    assert_error(r, 400, code="context_length_exceeded")


def test_long_prompt_alone_overflows_completions(http):
    body = completion_body(prompt=LONG, max_tokens=1)
    assert_error(http.post(COMPLETIONS, json=body), 400, code="context_length_exceeded",
                 in_message=("2048",))
    assert_error(http.post(COMPLETIONS, json=completion_body(prompt=["hi", LONG], max_tokens=1)),
                 400, code="context_length_exceeded")


# -- a fuzz: any JSON in any field is a 200 or an envelope, never 422/500 -------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)
# Left out: max_tokens-like fields (a None there generates up to the whole context).
CHAT_FIELDS = [
    "messages", "n", "temperature", "top_p", "seed", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias", "stream", "stream_options", "user", "top_k", "min_p",
    "repetition_penalty", "logprobs", "top_logprobs", "store", "metadata", "service_tier",
    "tools", "response_format", "zzz_unknown",
]
COMPLETION_FIELDS = [
    "prompt", "n", "temperature", "top_p", "seed", "stop", "logit_bias", "stream", "echo",
    "logprobs", "best_of", "suffix", "user", "top_k", "repetition_penalty", "zzz_unknown",
]
messages_strategy = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
        optional={"content": json_values, "name": json_values, "tool_calls": json_values,
                  "tool_call_id": json_values},
    ),
    max_size=3,
)


def _check_any_answer(r: httpx.Response, raw: bytes) -> None:
    assert r.status_code in (200, 400), (r.status_code, raw[:300])
    if r.status_code == 400:
        validate("ErrorResponse", json.loads(raw))
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = parse_events(raw)
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            assert "error" not in json.loads(e), e
    else:
        body = json.loads(raw)
        name = ("CreateChatCompletionResponse" if body["object"] == "chat.completion"
                else "CreateCompletionResponse")
        validate(name, body)


def _post_any(http: httpx.Client, path: str, body: dict) -> None:
    with http.stream("POST", path, json=body) as r:
        raw = r.read()
    _check_any_answer(r, raw)


FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(field=st.sampled_from(CHAT_FIELDS), value=json_values, messages=messages_strategy)
def test_fuzz_chat_fields(http, field, value, messages):
    body = chat_body(max_tokens=1, **{field: value})
    if field != "messages" and messages:
        body["messages"] = messages
    _post_any(http, CHAT, body)


@FUZZ
@given(field=st.sampled_from(COMPLETION_FIELDS), value=json_values)
def test_fuzz_completion_fields(http, field, value):
    _post_any(http, COMPLETIONS, completion_body(max_tokens=1, **{field: value}))


# -- auth -----------------------------------------------------------------------------------

AUTH_ROUTES = [("GET", "/v1/models", None), ("GET", f"/v1/models/{MODEL}", None),
               ("POST", CHAT, chat_body()), ("POST", COMPLETIONS, completion_body())]
WRONG_KEY = "sk-wrong-9f8e7d6c5b4a"


@pytest.mark.parametrize("method,path,body", AUTH_ROUTES)
@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": f"Bearer {WRONG_KEY}"},
    {"Authorization": f"Basic {API_KEY}"},
    {"Authorization": API_KEY},
    {"Authorization": "Bearer"},
    {"X-API-Key": API_KEY},
], ids=["none", "wrong-key", "basic-scheme", "no-scheme", "empty-bearer", "other-header"])
def test_auth_refused(server, method, path, body, headers):
    r = httpx.request(method, server.url + path, json=body, headers=headers, timeout=30)
    err = assert_error(r, 401, type="invalid_request_error")
    assert err["code"] in ("invalid_api_key", "missing_api_key")
    assert API_KEY not in r.text and WRONG_KEY not in r.text


def test_auth_refused_stream_is_plain_http(server):
    with httpx.stream("POST", server.url + CHAT, json=chat_body(stream=True),
                      headers={"Authorization": f"Bearer {WRONG_KEY}"}, timeout=30) as r:
        r.read()
    assert_error(r, 401, code="invalid_api_key")


def test_auth_wrong_key_code(server):
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {WRONG_KEY}"})
    assert_error(r, 401, code="invalid_api_key")
    r = httpx.get(server.url + "/v1/models")
    assert_error(r, 401, code="missing_api_key")


def test_auth_scheme_is_case_insensitive(server):
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"bearer {API_KEY}"})
    assert r.status_code == 200


def test_auth_via_openai_client(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key=WRONG_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stream=True)


def test_health_needs_no_key(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["status"] == "ok"


def test_key_never_logged(server, http):
    # Requests with the right key and a wrong one, then read the whole log.
    http.post(CHAT, json=chat_body(max_tokens=1))
    httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {WRONG_KEY}"})
    log = server.log()
    assert log, "the server log should not be empty"
    assert API_KEY not in log
    assert WRONG_KEY not in log


# -- request id -----------------------------------------------------------------------------


def test_request_id_generated(http):
    a = http.get("/v1/models").headers.get("x-request-id")
    b = http.get("/v1/models").headers.get("x-request-id")
    assert a and b and a != b


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/models", None),
    ("POST", CHAT, chat_body(max_tokens=1)),
    ("POST", CHAT, chat_body(temperature=9)),  # an error keeps the id too
    ("GET", "/v1/nope", None),
    ("GET", "/health", None),
])
def test_request_id_echoed(http, method, path, body):
    r = http.request(method, path, json=body, headers={"X-Request-ID": "my-trace-42"})
    assert r.headers.get("x-request-id") == "my-trace-42"


@pytest.mark.parametrize("value", [b"\xff\xfe", "caf\xe9".encode("latin-1")])
def test_request_id_not_utf8_is_no_500(server, http, value):
    r = httpx.get(server.url + "/health", headers={"X-Request-ID": value})
    assert r.status_code == 200, r.text
    assert r.headers.get("x-request-id")
    r = http.post(CHAT, json=chat_body(max_tokens=1), headers={"X-Request-ID": value})
    assert r.status_code == 200, r.text


def test_request_id_on_401_and_stream(server, http):
    r = httpx.get(server.url + "/v1/models", headers={"X-Request-ID": "unauth-1"})
    assert r.status_code == 401 and r.headers.get("x-request-id") == "unauth-1"
    with http.stream("POST", CHAT, json=chat_body(stream=True, max_tokens=1),
                     headers={"X-Request-ID": "stream-1"}) as s:
        s.read()
    assert s.status_code == 200 and s.headers.get("x-request-id") == "stream-1"


# -- admission limits: 429 when the line is full, 503 when a wait times out -----------------


def _read_until_first_token(lines) -> None:
    for line in lines:
        if line.startswith("data: {"):
            chunk = json.loads(line[len("data: "):])
            if any(c.get("text") for c in chunk["choices"]):
                return
    raise AssertionError("the long stream ended before its first token")


def test_limits_busy_and_queue_timeout(tmp_path):
    with run_server(tmp_path, "--max-sequences", "1", "--max-queue", "1", "--queue-timeout", "3",
                    "--log-level", "debug") as srv:
        h = dict(base_url=srv.url, headers=srv.headers(), timeout=60)
        oa = openai.OpenAI(base_url=srv.base_url, api_key=srv.api_key, max_retries=0, timeout=60)
        small = completion_body(max_tokens=2)
        small_chat = chat_body(max_tokens=2)
        with httpx.Client(**h) as main, httpx.Client(**h) as waiter:
            # n over --max-sequences 1 is a 400, not a wait forever.
            assert_error(main.post(COMPLETIONS, json=completion_body(n=2)), 400, param="n")

            long_body = completion_body(prompt="Once upon a time", max_tokens=2000,
                                        ignore_eos=True, stream=True)
            with main.stream("POST", COMPLETIONS, json=long_body) as long:
                assert long.status_code == 200
                # Keep the line iterator alive: a closed one would close the connection.
                long_lines = long.iter_lines()
                _read_until_first_token(long_lines)  # the one slot is taken now

                with ThreadPoolExecutor(1) as pool:
                    t0 = time.monotonic()
                    waiting = pool.submit(waiter.post, COMPLETIONS, json=small)
                    time.sleep(0.7)  # let it reach the line
                    assert not waiting.done(), waiting.result().text

                    # The line (1) is full: refused at once with 429 + Retry-After.
                    for path, body in ((COMPLETIONS, small), (CHAT, small_chat)):
                        r = main.post(path, json=body)
                        err = assert_error(r, 429, type="rate_limit_error")
                        assert r.headers.get("retry-after", "").isdigit()
                        assert err["code"] == "server_busy"
                        # Streamed: still a plain HTTP 429, before any event.
                        r = post_stream_plain(main, path, body)
                        assert_error(r, 429, type="rate_limit_error")
                        assert r.headers.get("retry-after")
                    with pytest.raises(openai.RateLimitError) as exc:
                        oa.chat.completions.create(**small_chat)
                    assert exc.value.status_code == 429
                    with pytest.raises(openai.RateLimitError):
                        oa.completions.create(**small, stream=True)

                    # The waiting one gives up after --queue-timeout 3 s.
                    r = waiting.result(timeout=30)
                    waited = time.monotonic() - t0
                    assert_error(r, 503, code="queue_timeout")
                    assert 2.5 <= waited < 15, waited

                # A streamed request that times out waiting: 200, then the error in-stream as
                # one `data: {"error": ...}` event, then [DONE].
                # (Raw for completions; chat through the official client below: each wait
                # costs the 3 s timeout.)
                for path, body in ((COMPLETIONS, small),):
                    s = stream_post(waiter, path, {**body, "stream": True})
                    assert s.status == 200
                    assert s.headers["content-type"].startswith("text/event-stream")
                    assert s.done
                    errors = [e for e in s.chunks() if "error" in e]
                    assert len(errors) == 1
                    validate("ErrorResponse", errors[0])
                    assert errors[0]["error"]["code"] == "queue_timeout"
                    assert json.loads(s.events[-2]) == errors[0] and s.events[-1] == "[DONE]"
                    # Anything before it is an ordinary chunk without content.
                    for c in s.chunks()[:-1]:
                        assert "error" not in c
                        for ch in c["choices"]:
                            assert not ch.get("text") and not ch.get("delta", {}).get("content")

                # The official client raises APIError while iterating such a stream.
                with pytest.raises(openai.APIError) as exc:
                    for _ in oa.chat.completions.create(**small_chat, stream=True):
                        pass
                assert "slot" in str(exc.value) or "queue" in str(exc.value).lower()

                long_lines.close()
            # The long stream is closed: its slot comes free and the server serves again.
            deadline = time.monotonic() + 20
            while True:
                r = main.post(COMPLETIONS, json=small)
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert r.status_code == 200, r.text
            validate("CreateCompletionResponse", r.json())
            s = stream_post(main, CHAT, {**small_chat, "stream": True})
            assert s.status == 200 and s.done
            assert not any("error" in c for c in s.chunks())
            r2 = oa.chat.completions.create(**small_chat)
            assert r2.choices[0].message.role == "assistant"

        # Nothing above leaked the key into the (debug) log.
        log = srv.log()
        assert API_KEY not in log
        assert "queue" in log.lower() or "slot" in log.lower() or "503" in log


def test_a_burst_is_refused_before_any_byte_never_inside_a_stream(tmp_path):
    """The line is taken the moment a request is let in: of a burst of streams arriving at
    once behind a busy slot, exactly --max-queue get a 200 stream that completes, the rest a
    plain 429; no stream carries a busy error inside a 200."""
    with run_server(tmp_path, "--max-sequences", "1", "--max-queue", "2",
                    "--embedding-model", "none") as srv:
        h = dict(base_url=srv.url, headers=srv.headers(), timeout=120)
        long_body = chat_body(max_tokens=2000, ignore_eos=True, stream=True)
        with httpx.Client(**h) as main:
            with main.stream("POST", CHAT, json=long_body) as long:
                lines = long.iter_lines()
                next(line for line in lines if '"content":"' in line and '"role"' not in line)

                def one(_: int) -> tuple[int, list[str]]:
                    with httpx.Client(**h) as c:
                        r = stream_post(c, CHAT, chat_body(max_tokens=4, stream=True))
                        return r.status, r.events

                with ThreadPoolExecutor(12) as pool:
                    burst = [pool.submit(one, i) for i in range(12)]
                    time.sleep(3)  # all of them have been answered 429 or are in line
                    long.close()  # frees the slot for those in line
                    results = [f.result(timeout=120) for f in burst]
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] * 2 + [429] * 10, statuses
        for status, events in results:
            if status == 200:
                assert events[-1] == "[DONE]"
                assert not any('"error"' in e for e in events), events
