"""Fixtures for suites that run on every engine: import them into a test module
(`from engine_fixtures import *`) and each of its tests runs once per engine, against a
server of that engine (one per engine for the whole session): they are named `engine`, `server`,
`client`, `async_client` and `http` there, in place of the session-wide ones."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import Server, engines

__all__ = ["engine_async_client", "engine_client", "engine_engine", "engine_http",
           "engine_server"]


@pytest.fixture(scope="module", params=engines(), name="engine")
def engine_engine(request) -> str:
    return request.param


@pytest.fixture(scope="module", name="server")
def engine_server(engine: str, request) -> Server:
    if engine == "llamacpp":
        return request.getfixturevalue("session_server")
    return request.getfixturevalue("engine_servers")(engine)


@pytest.fixture(scope="module", name="client")
def engine_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0,
                         timeout=300)


@pytest.fixture(scope="module", name="async_client")
def engine_async_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0,
                              timeout=300)


@pytest.fixture(scope="module", name="http")
def engine_http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=300) as c:
        yield c
