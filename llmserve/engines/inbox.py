"""Messages from a child process, read on the event loop.

The pipe is read without ever waiting: whatever has arrived is taken, and each whole message
is unpickled and handed on there and then. A child stopped halfway through a message leaves
half a message here, never a loop blocked on the rest. On the event loop, not on a thread of
its own: at one stream a reader thread cost about a fifth of the API process's CPU per token
(its wake-up, the GIL handed back and forth, the loop woken again), CPU taken from the
engine's own threads on a small machine.

The framing is `multiprocessing.Connection`'s, which the child writes with: a 4-byte
big-endian signed length, or -1 and an 8-byte length for a message over 2 GiB.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

log = logging.getLogger(__name__)

_SIZE = struct.Struct("!i")
_LARGE_SIZE = struct.Struct("!Q")

# A deeper pipe than Linux's 64 KiB: a child ahead of a busy loop writes on rather than
# waiting for it (best effort: the system's pipe-max-size may forbid it).
PIPE_SIZE = 1024 * 1024
READ_SIZE = 256 * 1024


class Inbox:
    """Reads `conn` (the read end of a pipe, ours alone) on `loop`: `on_message(msg)` for each
    message, in order, then `on_closed()` once, when the writer has gone (end of file) and
    everything it wrote has been handed on. The connection is closed with the inbox."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop, *,
                 on_message: Callable[[object], None], on_closed: Callable[[], None]) -> None:
        self._conn = conn
        self._fd = conn.fileno()
        self._loop = loop
        self._on_message = on_message
        self._on_closed = on_closed
        self._buffer = bytearray()
        self._open = True
        os.set_blocking(self._fd, False)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (OSError, AttributeError):
            pass
        loop.add_reader(self._fd, self._readable)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self._fd)
            self._conn.close()

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            self._on_closed()
            return
        buffer = self._buffer
        buffer += data
        taken = 0
        try:
            while self._open:
                message, end = _next_frame(buffer, taken)
                if end == taken:
                    break
                taken = end
                try:
                    self._on_message(ForkingPickler.loads(message))
                except Exception:  # noqa: BLE001 - one bad message must not stop the others
                    log.exception("a message from a child process could not be handled")
        finally:
            del buffer[:taken]


def _next_frame(buffer: bytearray, start: int) -> tuple[bytes, int]:
    """The message framed at `start` and the offset after it; `start` again if it has not
    all arrived."""
    have = len(buffer) - start
    if have < _SIZE.size:
        return b"", start
    (size,) = _SIZE.unpack_from(buffer, start)
    head = _SIZE.size
    if size == -1:
        if have < head + _LARGE_SIZE.size:
            return b"", start
        (size,) = _LARGE_SIZE.unpack_from(buffer, start + head)
        head += _LARGE_SIZE.size
    end = start + head + size
    if len(buffer) < end:
        return b"", start
    return bytes(buffer[start + head:end]), end
