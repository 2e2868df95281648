"""Server-Sent Events from lines of text: each event's data and, where the server numbers
them, its id (what `Last-Event-ID` resumes after)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    data: str
    id: str | None = None


def iter_events(lines: Iterable[str]) -> Iterator[Event]:
    """Events of an SSE body given line by line (without their line ends); comments
    (`: keep-alive`) and fields other than `data` and `id` are skipped."""
    data: list[str] = []
    id: str | None = None
    for line in lines:
        if not line:
            if data:
                yield Event("\n".join(data), id)
            data, id = [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "id":
            id = value
    # An event without its blank line is cut off: not given, so a resume asks for it again.
