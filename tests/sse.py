"""Raw Server-Sent Events parsing over bytes, independent of any OpenAI client."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx


@dataclass
class EventStream:
    status: int
    headers: httpx.Headers
    raw: bytes
    events: list[str] = field(default_factory=list)  # the data of each event, in order

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    def chunks(self) -> list[dict]:
        """Every JSON event (all but the final [DONE])."""
        return [json.loads(e) for e in self.events if e != "[DONE]"]


def parse_events(raw: bytes, first: int = 0) -> list[str]:
    """Split an SSE body into event data strings. Every event must be `data: ...` lines
    ended by a blank line, maybe after an `id: N` line; ids number a stream's events from
    `first` (0, or the event after the one a client resumed after); comments (`:`) are
    skipped."""
    return [data for _, data in parse_numbered(raw, first)]


def parse_numbered(raw: bytes, first: int = 0) -> list[tuple[int | None, str]]:
    """The events of an SSE body with their ids, None where an event has none (see
    `parse_events`)."""
    text = raw.decode("utf-8")  # raises on a broken character anywhere in the stream
    assert text.endswith("\n\n") or not text, f"stream does not end with a blank line: {text[-50:]!r}"
    events = []
    for block in text.split("\n\n")[:-1]:
        data, id = [], None
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            if line.startswith("id: ") and id is None and not data:
                id = int(line[len("id: "):])
                continue
            assert line.startswith("data: "), f"unexpected SSE line {line!r}"
            data.append(line[len("data: "):])
        if data:
            events.append((id, "\n".join(data)))
    ids = [id for id, _ in events if id is not None]
    assert ids == list(range(first, first + len(ids))), \
        f"event ids not numbered from {first}: {ids}"
    return events


def stream_post(http: httpx.Client, path: str, body: dict) -> EventStream:
    with http.stream("POST", path, json=body) as response:
        raw = response.read()
    events = parse_events(raw) if response.status_code == 200 else []
    return EventStream(response.status_code, response.headers, raw, events)
