"""Streamed answers as this server sends them (keep-alive, write timeout, places in line
given back), and runs followed or replayed from a client's position (`Last-Event-ID`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from starlette.requests import Request

from llmserve.api.requests import close_all, request_id
from llmserve.api.sse import EventStreamResponse
from llmserve.api.state import app_state
from llmserve.errors import InvalidRequest
from llmserve.serving.generation import Generation
from llmserve.serving.runs import Run


def event_stream(
    request: Request, content: AsyncIterator[bytes], gens: list[Generation]
) -> EventStreamResponse:
    """A streamed answer with this server's keep-alive and write timeout; the generations'
    places in line are given back when it ends, even if it never started."""
    state = app_state(request)
    return EventStreamResponse(
        content, keepalive=state.settings.sse_keepalive,
        write_timeout=state.settings.write_timeout, on_close=lambda: close_all(gens),
        on_stall=state.metrics.streams_dropped_stalled.inc, inflight=state.inflight,
        request_id=request_id(request),
    )


def follow_run(request: Request, run: Run, after: int) -> EventStreamResponse:
    """A run's events numbered above `after`, then live; a client that hangs up leaves the
    run going."""

    async def events() -> AsyncIterator[bytes]:
        async with aclosing(run.log.follow(after)) as it:
            async for _, data in it:
                yield data

    return event_stream(request, events(), [])


def replay_events(request: Request, events: list[tuple[int, bytes]]) -> EventStreamResponse:
    """Stored events (of a run that ended) as a stream."""

    async def replay() -> AsyncIterator[bytes]:
        for _, data in events:
            yield data

    return event_stream(request, replay(), [])


def resume_after(raw: str | None, count: int, param: str) -> int:
    """The event a resumed stream starts after, from the client's `raw` position (a header
    or query parameter named `param`): absent or empty means from the start (-1); else it
    must be the id of an event already written, an integer from 0 to `count - 1`, or the
    request is a 400. The same rule whether the run is live or replayed from the store."""
    if raw is None or not raw.strip():
        return -1
    text = raw.strip()
    # Digits only: no sign, no exponent; too many digits is out of range before int() runs.
    if text.isascii() and text.isdigit() and len(text) <= 18 and int(text) < count:
        return int(text)
    what = f"an integer from 0 to {count - 1}" if count else "and it has none yet"
    raise InvalidRequest(f"{param} must be the id of an event of this stream, {what}.",
                         param=param)


def resume_run(request: Request, run: Run, raw: str | None, param: str) -> EventStreamResponse:
    """A live (or just ended) run's events after the client's position `raw`."""
    return follow_run(request, run, resume_after(raw, len(run.log), param))


def resume_stored(
    request: Request, events: list[tuple[int, bytes]], raw: str | None, param: str
) -> EventStreamResponse:
    """A stored stream's events after the client's position `raw`."""
    after = resume_after(raw, len(events), param)
    return replay_events(request, [(i, e) for i, e in events if i > after])
