"""End-to-end: hostile clients are refused before any route acts on them. A body over
--max-request-bytes is a 413 before it is read in full; a POST under /v1 that is not JSON is
a 415; a Host a loopback server does not answer to is a 421 (DNS rebinding); CORS is off
unless --cors-origins names the origin; the docs routes need the API key when one is set."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import API_KEY, MODEL, Server, run_server
from openai_schema import validate

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
JSON_ROUTES = [CHAT, COMPLETIONS, EMBEDDINGS]
ORIGIN = "http://app.example"
SMALL_LIMIT = 1000
MIB = 1024 * 1024


def chat_body(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 1, **extra}


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    validate("ErrorResponse", body)
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == code, err
    assert err["param"] is None and err["message"]
    return err


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No API key, a 1000-byte body limit, evil.example allowed, CORS for ORIGIN (given
    through the environment, to check that path too)."""
    with run_server(tmp_path_factory.mktemp("guards"), "--max-request-bytes", str(SMALL_LIMIT),
                    "--allowed-hosts", "evil.example", api_key=None,
                    env={"LLMSERVE_CORS_ORIGINS": f"{ORIGIN}, http://other.example"}) as s:
        yield s


def _raw_exchange(server: Server, head: bytes, body_part: bytes) -> tuple[int, dict, bytes]:
    """Send `head` and the start of a body that is never finished; read the answer that
    comes anyway. Returns status, headers (lowercased names) and body."""
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head + body_part)
        data = b""
        while True:
            piece = sock.recv(65536)
            if not piece:  # the server closes after the refusal
                break
            data += piece
    header_block, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split()[1]), headers, body


def _head(server: Server, path: str, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {urlsplit(server.url).netloc}",
             "Content-Type: application/json", *extra]
    if server.api_key:
        lines.append(f"Authorization: Bearer {server.api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _assert_raw_413(status: int, headers: dict, body: bytes) -> None:
    assert status == 413, (status, body)
    assert headers["content-type"].startswith("application/json")
    assert headers.get("connection", "").lower() == "close"
    err = json.loads(body)
    validate("ErrorResponse", err)
    assert err["error"]["code"] == "request_too_large"


# -- request size ----------------------------------------------------------------------------


def test_content_length_over_limit_refused_before_the_body(server):
    """Content-Length says 40 MiB but only a few bytes ever come: the 413 must arrive
    anyway, so the server answered without waiting for (or reading) the body."""
    head = _head(server, CHAT, f"Content-Length: {40 * MIB}")
    t0 = time.monotonic()
    status, headers, body = _raw_exchange(server, head, b'{"model": ')
    assert time.monotonic() - t0 < 10
    _assert_raw_413(status, headers, body)
    assert "33554432" in json.loads(body)["error"]["message"]


def test_40_mib_body_with_content_length_is_413(server, http):
    r = http.post(CHAT, content=b"x" * (40 * MIB), headers={"content-type": "application/json"})
    assert_error(r, 413, "request_too_large")


def test_chunked_body_over_limit_refused_while_it_arrives(open_server):
    """A chunked body that passes the limit and never ends: the 413 comes once the limit
    is passed, without the rest of the body."""
    head = _head(open_server, CHAT, "Transfer-Encoding: chunked")
    chunk = b"x" * 500
    piece = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3))  # 1500 > 1000
    status, headers, body = _raw_exchange(open_server, head, piece)
    _assert_raw_413(status, headers, body)


def test_chunked_body_over_limit_from_httpx(open_server):
    def pieces() -> Iterator[bytes]:
        for _ in range(20):
            yield b"x" * 100

    r = httpx.post(open_server.url + CHAT, content=pieces(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert "content-length" not in r.request.headers  # it went chunked
    assert_error(r, 413, "request_too_large")


def test_body_under_the_limit_is_served(open_server):
    raw = json.dumps(chat_body()).encode()
    assert len(raw) < SMALL_LIMIT
    r = httpx.post(open_server.url + CHAT, content=raw,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text

    def pieces() -> Iterator[bytes]:  # the same body, chunked
        yield raw[:20]
        yield raw[20:]

    r = httpx.post(open_server.url + CHAT, content=pieces(),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text


def test_one_mib_body_served_under_the_default_limit(http):
    # A tool's description is free text; with tool_choice none it stays out of the prompt.
    tool = {"type": "function", "function": {"name": "f", "description": "d" * MIB}}
    r = http.post(CHAT, json=chat_body(tools=[tool], tool_choice="none"))
    assert r.status_code == 200, r.text


def test_server_serves_after_refusals(open_server, server, http):
    r = httpx.post(open_server.url + CHAT, json=chat_body(), timeout=60)
    assert r.status_code == 200, r.text
    assert http.post(CHAT, json=chat_body()).status_code == 200


# -- content type ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", JSON_ROUTES)
@pytest.mark.parametrize("content_type", [
    "text/plain", None, "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
])
def test_non_json_content_type_is_415(server, path, content_type):
    headers = server.headers()
    if content_type:
        headers["content-type"] = content_type
    r = httpx.post(server.url + path, content=json.dumps(chat_body()).encode(), headers=headers,
                   timeout=30)
    assert r.request.headers.get("content-type") == content_type
    assert_error(r, 415, "unsupported_media_type")


@pytest.mark.parametrize("content_type", ["text/plain", None])
def test_bodiless_post_must_be_json_too(server, http, content_type):
    """A cancel reads no body, yet a page must not be able to post it without a preflight:
    refused, and the background response goes on."""
    r = http.post("/v1/responses", json={"model": MODEL, "input": "Write a long essay.",
                                         "background": True, "max_output_tokens": 200})
    assert r.status_code == 200, r.text
    id = r.json()["id"]
    headers = server.headers()
    if content_type:
        headers["content-type"] = content_type
    try:
        for path in (f"/v1/responses/{id}/cancel", "/v1/chat/completions/chatcmpl-x"):
            assert_error(httpx.post(server.url + path, headers=headers, timeout=30),
                         415, "unsupported_media_type")
        assert http.get(f"/v1/responses/{id}").json()["status"] in ("queued", "in_progress",
                                                                   "completed", "incomplete")
    finally:
        http.post(f"/v1/responses/{id}/cancel", headers={"content-type": "application/json"})


def test_content_type_refused_only_on_served_routes(server):
    """An unknown route stays a 404 and a wrong method a 405, whatever the content type."""
    headers = {**server.headers(), "content-type": "text/plain"}
    r = httpx.post(server.url + "/v1/audio/speech", content=b"hi", headers=headers)
    assert_error(r, 404, "not_found")
    r = httpx.post(server.url + "/v1/models", content=b"hi", headers=headers)
    assert_error(r, 405, "method_not_allowed")


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_content_type_with_parameters_accepted(http, content_type):
    r = http.post(CHAT, content=json.dumps(chat_body()).encode(),
                  headers={"content-type": content_type})
    assert r.status_code == 200, r.text


# -- Host (DNS rebinding) -------------------------------------------------------------------


@pytest.mark.parametrize("path,method", [(CHAT, "POST"), ("/v1/models", "GET"), ("/health", "GET")])
def test_foreign_host_refused_on_loopback(server, path, method):
    r = httpx.request(method, server.url + path, json=chat_body() if method == "POST" else None,
                      headers={**server.headers(), "Host": "evil.example"}, timeout=30)
    err = assert_error(r, 421, "misdirected_request")
    assert "evil.example" in err["message"]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "127.9.8.7", "LOCALHOST"])
def test_loopback_hosts_served(server, http, host):
    port = urlsplit(server.url).port
    for value in (host, f"{host}:{port}"):
        r = http.get("/v1/models", headers={"Host": value})
        assert r.status_code == 200, (value, r.text)


def test_allowed_hosts_lets_a_name_in(open_server):
    port = urlsplit(open_server.url).port
    for value in ("evil.example", f"evil.example:{port}", "EVIL.example"):
        r = httpx.post(open_server.url + CHAT, json=chat_body(), headers={"Host": value},
                       timeout=60)
        assert r.status_code == 200, (value, r.text)
    r = httpx.get(open_server.url + "/v1/models", headers={"Host": "other.example"})
    assert_error(r, 421, "misdirected_request")


# -- CORS -----------------------------------------------------------------------------------


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url + CHAT, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })


def test_cors_off_by_default(server, http):
    r = http.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200
    assert not any(k.startswith("access-control-") for k in r.headers)
    r = _preflight(server.url, ORIGIN)
    assert not any(k.startswith("access-control-") for k in r.headers), r.headers


def test_cors_for_a_listed_origin(open_server):
    r = httpx.post(open_server.url + CHAT, json=chat_body(), headers={"Origin": ORIGIN},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()

    r = _preflight(open_server.url, ORIGIN)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed

    # A refusal carries the CORS headers too, so the page can read why.
    r = httpx.post(open_server.url + CHAT, content=b"hi", headers={"Origin": ORIGIN,
                                                                    "content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")
    assert r.headers["access-control-allow-origin"] == ORIGIN


def test_cors_not_for_other_origins(open_server):
    r = httpx.get(open_server.url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = _preflight(open_server.url, "http://evil.example")
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers


# -- docs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_need_the_key(server, path):
    r = httpx.get(server.url + path)
    assert_error(r, 401, "missing_api_key")
    r = httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, "invalid_api_key")
    r = httpx.get(server.url + path, headers=server.headers())
    assert r.status_code == 200, r.text
    if path == "/openapi.json":
        assert CHAT in r.json()["paths"]


@pytest.mark.parametrize("path", ["/docs", "/openapi.json"])
def test_docs_open_without_a_key(open_server, path):
    assert httpx.get(open_server.url + path).status_code == 200


def test_health_needs_no_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert API_KEY not in httpx.get(server.url + "/health").text
