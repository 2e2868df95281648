"""Admission: sequence slots handed out first come, first served, with a bounded line.

A request needs one slot per choice. It takes them, or its place in line, the moment it is
let in (`reserve`); when the line is full it is refused at once (429 with Retry-After), and
it gives up after `queue_timeout` (503). The engine never holds more sequences than it has
slots.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from llmserve.errors import QueueTimeout, ServerBusy


class Reservation:
    """A request's place in line, taken at once (or refused at once with 429) and kept until
    `release`: `wait` gives the slots when its turn comes. Release is idempotent, and frees
    the slots or the place in line, whichever it holds."""

    def __init__(self, scheduler: Scheduler, n: int, future: asyncio.Future[None] | None) -> None:
        self._scheduler = scheduler
        self.n = n
        self._future = future  # None: granted when taken
        self._timer: asyncio.TimerHandle | None = None
        self._released = False

    @property
    def granted(self) -> bool:
        fut = self._future
        return fut is None or (fut.done() and not fut.cancelled() and fut.exception() is None)

    async def wait(self) -> None:
        if self._future is None:
            return
        try:
            await asyncio.shield(self._future)
        finally:
            self._cancel_timer()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._cancel_timer()
        self._scheduler._leave(self)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Scheduler:
    def __init__(self, slots: int, *, max_queue: int, queue_timeout: float | None) -> None:
        self._free = slots
        self._slots = slots
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self._line: deque[Reservation] = deque()

    @property
    def free_slots(self) -> int:
        return self._free

    @property
    def waiting(self) -> int:
        """Requests in line."""
        return len(self._line)

    @property
    def capacity(self) -> int:
        return self._slots

    @property
    def slots_in_use(self) -> int:
        """Sequences holding a slot: running, or about to."""
        return self._slots - self._free

    @property
    def sequences_waiting(self) -> int:
        """Sequences in line (a request waits for one slot per choice)."""
        return sum(r.n for r in self._line)

    @asynccontextmanager
    async def slots(self, n: int) -> AsyncIterator[None]:
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)

    def check_room(self, n: int = 1) -> None:
        """Refuse now (429) what would find the line full."""
        if n > self._slots:
            raise ValueError(f"{n} slots asked, only {self._slots} exist")
        if (self._line or self._free < n) and len(self._line) >= self._max_queue:
            raise ServerBusy(
                f"The server is busy: {self._max_queue} requests are already waiting. "
                "Retry later.",
                headers={"Retry-After": "1"},
            )

    def reserve(self, n: int) -> Reservation:
        """Take `n` slots now, or a place in line for them; ServerBusy (429) if the line is
        full. Nothing awaits between the check and the taking: no request that was let in can
        find the line full later (a stream is refused before its first byte or not at all)."""
        self.check_room(n)
        if not self._line and self._free >= n:
            self._free -= n
            return Reservation(self, n, None)
        loop = asyncio.get_running_loop()
        reservation = Reservation(self, n, loop.create_future())
        self._line.append(reservation)
        if self._queue_timeout:
            reservation._timer = loop.call_later(self._queue_timeout, self._expire, reservation)
        return reservation

    async def acquire(self, n: int) -> None:
        reservation = self.reserve(n)
        try:
            await reservation.wait()
        except BaseException:
            reservation.release()
            raise

    def release(self, n: int) -> None:
        self._free += n
        self._wake()

    def _leave(self, reservation: Reservation) -> None:
        if reservation.granted:
            self.release(reservation.n)
        elif reservation in self._line:
            self._line.remove(reservation)
            reservation._future.cancel()
            self._wake()  # a smaller request behind it may fit now

    def _expire(self, reservation: Reservation) -> None:
        if reservation in self._line:
            self._line.remove(reservation)
            reservation._future.set_exception(QueueTimeout(
                f"No sequence slot came free within {self._queue_timeout:g} s. Retry later.",
                headers={"Retry-After": "1"},
            ))
            self._wake()

    def _wake(self) -> None:
        while self._line and self._line[0].n <= self._free:
            reservation = self._line.popleft()
            self._free -= reservation.n
            reservation._future.set_result(None)
