"""Server-Sent Events framing for OpenAI streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmserve.errors import LLMServeError

DONE = b"data: [DONE]\n\n"

HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies must not buffer tokens
}


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def error_event(exc: LLMServeError) -> bytes:
    # The shape the official client raises on: {"error": {...}} in a data event.
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    return event(orjson.dumps(body))


class EventStreamResponse(StreamingResponse):
    """A streaming response that always closes its generator, so a client that hangs up
    cancels generation now rather than whenever the generator is garbage collected."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers=HEADERS, media_type=self.media_type)
        self._source = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()


class ChunkEncoder:
    """Chunks of one stream differ only in their choice: the rest is encoded once."""

    def __init__(self, *, id: str, object: str, created: int, model: str, include_usage: bool):
        head = orjson.dumps({"id": id, "object": object, "created": created, "model": model})
        self._prefix = b"data: " + head[:-1] + b',"choices":['
        self._suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def choice(self, choice: dict) -> bytes:
        return self._prefix + orjson.dumps(choice) + self._suffix

    def usage(self, usage: dict) -> bytes:
        return self._prefix + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"
