"""The event stream response in process (httpx over ASGI): a source that fails with a bug
mid-stream still ends the stream as streams end, with an error event and [DONE]."""

from __future__ import annotations

import asyncio
import json

import httpx
from openai_schema import validate
from starlette.applications import Starlette
from starlette.routing import Route

from llmserve.api import sse


def test_a_source_that_raises_ends_with_an_error_event_and_done():
    async def source():
        yield sse.event(b'{"n": 1}')
        raise RuntimeError("a bug")

    app = Starlette(routes=[Route("/s", lambda request: sse.EventStreamResponse(source()))])

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as client:
            return (await client.get("/s")).content

    body = asyncio.run(main())
    events = [e for e in body.split(b"\n\n") if e]
    assert events[0] == b'data: {"n": 1}' and events[-1] == b"data: [DONE]"
    error = json.loads(events[-2].removeprefix(b"data: "))
    validate("ErrorResponse", error)
    assert error["error"]["type"] == "server_error"
