"""The guards' Host rules, without a server: what counts as loopback, how a Host header's
name is read, and when the Host is checked at all."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.responses import PlainTextResponse

from llmserve.api.guards import Guards, host_name, is_loopback
from llmserve.config import Settings


@pytest.mark.parametrize("value,name", [
    ("localhost", "localhost"), ("LocalHost:8000", "localhost"), ("127.0.0.1:80", "127.0.0.1"),
    ("[::1]", "[::1]"), ("[::1]:8000", "[::1]"), ("evil.example:443", "evil.example"),
    (" Evil.Example ", "evil.example"), ("", ""),
])
def test_host_name_drops_the_port(value, name):
    assert host_name(value) == name


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.9.8.7", "::1", "[::1]", "LOCALHOST"])
def test_loopback(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", [
    "0.0.0.0", "::", "10.0.0.1", "evil.example", "localhost.evil.example", "127.0.0.1.nip.io",
    "", "[::2]",
])
def test_not_loopback(host):
    assert not is_loopback(host)


def _status(settings: Settings, host: str) -> int:
    app = Guards(PlainTextResponse("ok"), settings)

    async def get() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return (await c.get("/v1/models", headers={"Host": host})).status_code

    return asyncio.run(get())


@pytest.mark.parametrize("bind,allowed,host,status", [
    ("127.0.0.1", [], "evil.example", 421),
    ("localhost", [], "evil.example", 421),
    ("::1", [], "evil.example:8000", 421),
    ("127.0.0.1", ["evil.example:9999"], "evil.example:8000", 200),  # ports never matter
    ("127.0.0.1", ["*"], "anything.example", 200),
    ("127.0.0.1", ["other.example"], "evil.example", 421),
    ("0.0.0.0", [], "evil.example", 200),  # not loopback: the Host is not checked
    ("192.168.1.5", [], "evil.example", 200),
])
def test_host_check(bind, allowed, host, status):
    assert _status(Settings(host=bind, allowed_hosts=allowed), host) == status
