"""Stop strings matched across token and chunk boundaries.

The unsent tail of the text is kept; a match ends generation and only the text before it
is sent. Otherwise everything is sent except the longest suffix that is a proper prefix of
some stop string: nothing more is held back, and it is released as soon as it cannot be
the start of a stop string any more.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StopResult:
    text: str  # safe to send now
    stopped: bool  # a stop string matched; `text` ends right before it


class StopMatcher:
    __slots__ = ("_stops", "_pending")

    def __init__(self, stops: list[str]) -> None:
        self._stops = tuple(s for s in dict.fromkeys(stops) if s)
        self._pending = ""

    def feed(self, text: str) -> StopResult:
        if not self._stops:
            return StopResult(text, False)
        buf = self._pending + text
        # The pending text holds no complete stop string, so any match overlaps the new text.
        # The match completed first wins (then the one starting first): the same cut however
        # the text was split into pieces.
        matches = [(i + len(s), i) for s in self._stops if (i := buf.find(s)) >= 0]
        if matches:
            self._pending = ""
            return StopResult(buf[: min(matches)[1]], True)
        hold = self._held_suffix(buf)
        self._pending = buf[len(buf) - hold :]
        return StopResult(buf[: len(buf) - hold], False)

    def flush(self) -> str:
        """At the end of generation the held text is no stop string: send it."""
        text, self._pending = self._pending, ""
        return text

    def _held_suffix(self, buf: str) -> int:
        """The length of the longest suffix of `buf` that is a proper prefix of a stop string
        (`buf` holds no whole one). Only places holding a stop's first character are tried,
        so long stop strings cost little."""
        longest = 0
        size = len(buf)
        for stop in self._stops:
            at = max(0, size - len(stop) + 1)
            while (at := buf.find(stop[0], at, size - longest)) >= 0:
                if stop.startswith(buf[at:]):
                    longest = size - at
                    break
                at += 1
        return longest
