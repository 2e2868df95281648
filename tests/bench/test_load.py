"""The bench's HTTP load generator: a streamed response read as it comes, whatever the
framing (chunked pieces that split events, `id:` lines, keep-alive comments), usage's count
taken over the pieces', and a failed or broken response reported, never raised.

A bare asyncio server plays the HTTP peer here so that each framing is sent exactly; the
bench's smoke test drives the client against llmserve itself, and the llama-server test
against llama-server."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess

import orjson
import pytest

from llmserve.bench.load import StreamClient, chat_body


def _chunk(n: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % n


async def _serve(respond, requests: list[bytes]):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        requests.append(head + await reader.readexactly(length))
        await respond(writer)
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _run(respond, body: dict | None = None):
    requests: list[bytes] = []

    async def main():
        server = await _serve(respond, requests)
        port = server.sockets[0].getsockname()[1]
        async with server:
            client = StreamClient(f"http://127.0.0.1:{port}", timeout=10)
            return [await client.stream(body or chat_body("m", "hi", 3, {})) for _ in range(2)]

    return asyncio.run(main()), requests


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_a_chunked_stream_is_read_whatever_its_pieces_split():
    events = (b": keep-alive\n" + b"id: 0\n" + _chunk(0) + _chunk(1) + b"id: 2\n" + _chunk(2)
              + b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
              + b'data: {"choices":[],"usage":{"completion_tokens":7}}\n\n' + b"data: [DONE]\n\n")

    async def respond(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        # pieces cut inside events and inside a data line
        for cut in (_chunked(events[:20], events[20:75], events[75:]),):
            for i in range(0, len(cut), 17):
                writer.write(cut[i:i + 17])
                await writer.drain()
                await asyncio.sleep(0.001)

    timings, requests = _run(respond)
    for t in timings:
        assert t.error is None
        assert len(t.arrivals) == 3  # the three pieces of text, not the finish nor usage
        assert t.tokens == 7  # usage's count where the stream gives it
        assert t.start < t.arrivals[0] <= t.arrivals[-1] <= t.end
    # one connection per request, each a well-formed POST with its JSON body
    assert len(requests) == 2
    head, body = requests[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nConnection: close" in head
    assert orjson.loads(body)["stream"] is True


def test_without_usage_each_piece_of_text_counts_as_a_token():
    async def respond(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + _chunked(_chunk(0), _chunk(1), b"data: [DONE]\n\n"))

    timings, _ = _run(respond)
    assert [(t.error, t.tokens, len(t.arrivals)) for t in timings] == [(None, 2, 2)] * 2


def test_an_error_status_an_error_event_and_a_cut_stream_are_reported():
    async def status(writer):
        body = b'{"error":{"message":"no such model"}}'
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    timings, _ = _run(status)
    assert all(t.error.startswith("HTTP 404: ") and "no such model" in t.error for t in timings)

    async def event(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(
            _chunk(0), b'data: {"error":{"message":"engine failed"}}\n\n', b"data: [DONE]\n\n"))

    timings, _ = _run(event)
    assert [(t.error, len(t.arrivals)) for t in timings] == [("engine failed", 1)] * 2

    async def cut(writer):  # the connection closes before the last chunk
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + _chunked(_chunk(0))[:-5])

    timings, _ = _run(cut)
    assert all("closed the connection mid-response" in t.error for t in timings)
    assert all(len(t.arrivals) == 1 and t.end >= t.start for t in timings)


def test_a_server_that_is_not_there_is_an_error_not_an_exception():
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return await StreamClient(f"http://127.0.0.1:{port}").stream(chat_body("m", "hi", 3, {}))

    t = asyncio.run(main())
    assert t.error is not None and t.error.startswith(("ConnectionRefusedError", "OSError"))
    assert t.tokens == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_an_https_server_is_streamed_over_tls(tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client verifies: trust this one
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + _chunked(_chunk(0), b"data: [DONE]\n\n"))
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=served)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await StreamClient(f"https://127.0.0.1:{port}", timeout=10).stream(
                chat_body("m", "hi", 3, {}))

    t = asyncio.run(main())
    assert (t.error, t.tokens) == (None, 1)
