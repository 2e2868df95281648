"""Requests in flight, so that a server shutting down can end those still running when its
drain time is up: a stream with an error event and `[DONE]`, an unanswered request with a
503, rather than a connection cut by task cancellation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from llmserve.errors import EngineUnavailable, LLMServeError

Abort = Callable[[LLMServeError], None]


class Inflight:
    def __init__(self) -> None:
        self._aborts: set[Abort] = set()

    @contextmanager
    def track(self, abort: Abort) -> Iterator[None]:
        self._aborts.add(abort)
        try:
            yield
        finally:
            self._aborts.discard(abort)

    def __len__(self) -> int:
        return len(self._aborts)

    def abort_all(self, reason: str) -> int:
        """End every request still in flight; returns how many there were."""
        aborts = list(self._aborts)
        for abort in aborts:
            abort(EngineUnavailable(reason, headers={"Retry-After": "5"}))
        return len(aborts)
