"""Admission: sequence slots handed out first come, first served, with a bounded line.

A request needs one slot per choice. When none is free it waits in line; when the line is
full it is refused at once (429 with Retry-After), and it gives up after `queue_timeout`
(503). The engine never holds more sequences than it has slots.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from llmserve.errors import QueueTimeout, ServerBusy


class Scheduler:
    def __init__(self, slots: int, *, max_queue: int, queue_timeout: float | None) -> None:
        self._free = slots
        self._slots = slots
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self._line: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def free_slots(self) -> int:
        return self._free

    @property
    def waiting(self) -> int:
        return len(self._line)

    @asynccontextmanager
    async def slots(self, n: int) -> AsyncIterator[None]:
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)

    def check_room(self, n: int = 1) -> None:
        """Refuse now (429) what would find the line full: a stream checks this before
        its first byte, so that refusal is a plain HTTP error."""
        if n > self._slots:
            raise ValueError(f"{n} slots asked, only {self._slots} exist")
        if (self._line or self._free < n) and len(self._line) >= self._max_queue:
            raise ServerBusy(
                f"The server is busy: {self._max_queue} requests are already waiting. "
                "Retry later.",
                headers={"Retry-After": "1"},
            )

    async def acquire(self, n: int) -> None:
        self.check_room(n)
        if not self._line and self._free >= n:
            self._free -= n
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (n, fut)
        self._line.append(entry)
        # A timer rather than asyncio.wait_for: before Python 3.12, wait_for can swallow a
        # cancellation that lands together with the grant, and the slot would be kept.
        timer = loop.call_later(self._queue_timeout, self._expire, entry) if self._queue_timeout else None
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(n)  # granted as we were cancelled: hand it on
            elif entry in self._line:
                self._line.remove(entry)
                self._wake()  # a smaller request behind us may fit now
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        if entry in self._line:
            self._line.remove(entry)
            entry[1].set_exception(QueueTimeout(
                f"No sequence slot came free within {self._queue_timeout:g} s. Retry later.",
                headers={"Retry-After": "1"},
            ))
            self._wake()

    def release(self, n: int) -> None:
        self._free += n
        self._wake()

    def _wake(self) -> None:
        while self._line and self._line[0][0] <= self._free:
            n, fut = self._line.popleft()
            self._free -= n
            fut.set_result(None)
