"""Messages to a child process, written by a thread of its own: whoever sends (the event
loop) never waits on the child. A child that stops reading fills its pipe; then the writer
thread waits, not the server, and the messages queue here, bounded in bytes.
"""

from __future__ import annotations

import threading
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler


class OutboxFull(Exception):
    """The child has not read what it was sent: `queued` bytes are waiting."""

    def __init__(self, queued: int) -> None:
        super().__init__(f"{queued} bytes waiting")
        self.queued = queued


class OutboxClosed(Exception):
    pass


class Outbox:
    """Pickles each message where it is sent (its size is known before it is queued) and
    writes it on the writer thread, in order. `limit` bounds the bytes waiting, the message
    being written included; one message is always taken when none waits, however large.
    The writer owns the connection's closing: `close` drops what has not been written."""

    def __init__(self, conn: Connection, *, name: str, limit: int) -> None:
        self._conn = conn
        self._limit = limit
        self._items: deque[bytes] = deque()
        self._bytes = 0
        self._closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._write, name=f"{name}-writer", daemon=True).start()

    @property
    def queued(self) -> int:
        return self._bytes

    def put(self, msg: tuple, *, bounded: bool = True) -> None:
        """Queue `msg`; OutboxFull when `bounded` and the limit would be passed (cancels and
        pings are not bounded: they are small, and must get through)."""
        data = bytes(ForkingPickler.dumps(msg))  # what Connection.send writes
        with self._cond:
            if self._closed:
                raise OutboxClosed
            if bounded and self._bytes and self._bytes + len(data) > self._limit:
                raise OutboxFull(self._bytes)
            self._items.append(data)
            self._bytes += len(data)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._bytes = 0
            self._cond.notify()

    def _write(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._items and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    data = self._items[0]
                try:
                    self._conn.send_bytes(data)
                except (OSError, ValueError):  # the child is gone: its reader reports that
                    self.close()
                    return
                with self._cond:
                    if not self._closed:
                        self._items.popleft()
                        self._bytes -= len(data)
        finally:
            self._conn.close()
