"""Delivery over real loopback TCP connections, and uvicorn handing requests their transport."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmserve.api.connection import (
    STREAM_SEND_BUFFER,
    TRANSPORT_KEY,
    Delivery,
    with_transport_in_state,
)

linux_only = pytest.mark.skipif(sys.platform != "linux",
                                reason="acknowledged bytes are read from Linux's TCP_INFO")


class _Accepting(asyncio.Protocol):
    def __init__(self, made: asyncio.Future[asyncio.Transport]) -> None:
        self._made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made.set_result(transport)  # type: ignore[arg-type]


async def _connected_pair() -> tuple[asyncio.Transport, socket.socket, asyncio.AbstractServer]:
    """A server-side transport and the client's plain socket, which reads only when told."""
    loop = asyncio.get_running_loop()
    made: asyncio.Future[asyncio.Transport] = loop.create_future()
    server = await loop.create_server(lambda: _Accepting(made), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await loop.sock_connect(client, ("127.0.0.1", port))
    return await made, client, server


def _drain(client: socket.socket) -> int:
    taken = 0
    try:
        while data := client.recv(65536):
            taken += len(data)
    except BlockingIOError:
        pass
    return taken


@linux_only
def test_acknowledged_bytes_stop_while_the_peer_reads_nothing_and_move_when_it_reads():
    async def scenario() -> None:
        transport, client, server = await _connected_pair()
        try:
            delivery = Delivery.of({"state": {TRANSPORT_KEY: transport}})
            assert delivery is not None
            delivery.bound_send_buffer()
            assert transport.get_extra_info("socket").getsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF) <= 2 * STREAM_SEND_BUFFER
            acked, waiting = delivery.progress()
            assert not waiting
            transport.write(b"x" * 2_000_000)  # far more than the window and buffers hold
            await asyncio.sleep(0.3)
            stuck, waiting = delivery.progress()
            assert waiting and stuck > acked
            await asyncio.sleep(0.5)
            assert delivery.progress() == (stuck, True)  # nothing more taken
            taken = 0
            for _ in range(400):
                taken += _drain(client)
                await asyncio.sleep(0.01)
                if taken == 2_000_000:
                    break
            assert taken == 2_000_000
            for _ in range(100):
                moved, waiting = delivery.progress()
                if not waiting:
                    break
                await asyncio.sleep(0.01)
            assert not waiting and moved >= stuck + 2_000_000 - 4 * STREAM_SEND_BUFFER
            transport.write(b"y" * 1_000_000)
            await asyncio.sleep(0.1)
            delivery.abort()  # a reset: what waits is dropped, not sent on for minutes
            await asyncio.sleep(0.05)
            assert transport.is_closing()
            with pytest.raises(ConnectionResetError):  # after what was already delivered
                while client.recv(65536):
                    pass
        finally:
            client.close()
            server.close()

    asyncio.run(scenario())


def test_no_delivery_without_a_tcp_transport(tmp_path):
    assert Delivery.of({"type": "http"}) is None
    assert Delivery.of({"state": {}}) is None

    async def over_unix_socket() -> Delivery | None:
        loop = asyncio.get_running_loop()
        made: asyncio.Future[asyncio.Transport] = loop.create_future()
        path = str(tmp_path / "s")
        server = await loop.create_unix_server(lambda: _Accepting(made), path)
        client = socket.socket(socket.AF_UNIX)
        client.setblocking(False)
        await loop.sock_connect(client, path)
        try:
            return Delivery.of({"state": {TRANSPORT_KEY: await made}})
        finally:
            client.close()
            server.close()

    if hasattr(socket, "AF_UNIX"):
        assert asyncio.run(over_unix_socket()) is None


def test_uvicorn_puts_each_connections_transport_in_its_requests_state():
    seen: list[object] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen.append(scope["state"].get(TRANSPORT_KEY))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http=with_transport_in_state(H11Protocol),
                                           lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:  # one connection
            assert http.get("/").text == "ok" and http.get("/").text == "ok"
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "ok"  # another
    finally:
        server.should_exit = True
        thread.join(10)
    assert len(seen) == 3 and all(hasattr(t, "get_extra_info") for t in seen)
    assert seen[0] is seen[1] and seen[2] is not seen[0]
