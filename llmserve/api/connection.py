"""What a stream can know of its client's connection beyond what the kernel accepted.

A client that stops reading, or vanishes without a FIN, does not make writes fail or wait:
the kernel's send buffer (autotuned up to megabytes) takes a whole answer. On Linux the
socket tells what the client has acknowledged (`TCP_INFO`) and what still waits for it
(`SIOCOUTQ`), which is what `--write-timeout` judges. uvicorn does not hand an ASGI app its
socket, so `with_transport_in_state` puts each connection's transport in the `state` of its
requests' scopes.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from collections.abc import MutableMapping
from typing import Any

TRANSPORT_KEY = "llmserve.transport"

# What a stream may have written but not delivered: SO_SNDBUF (the kernel doubles it for its
# bookkeeping). Tokens go out at tens of KB/s, far below what 64 KiB carries on any round
# trip; the kernel's autotuned default lets a stuck client hold up to 4 MB.
STREAM_SEND_BUFFER = 64 * 1024

_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in struct tcp_info, Linux 4.1+
_TCPI_LEN = _TCPI_BYTES_ACKED + 8

if sys.platform == "linux":
    import fcntl
    import termios

    _SIOCOUTQ: int | None = termios.TIOCOUTQ  # the same request number for sockets
else:
    _SIOCOUTQ = None


def with_transport_in_state(base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol `base`, putting each connection's transport in its requests'
    scope["state"] (uvicorn copies the protocol's `app_state` into every request's scope)."""

    class TransportInState(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.app_state = {**self.app_state, TRANSPORT_KEY: transport}
            super().connection_made(transport)

    TransportInState.__name__ = TransportInState.__qualname__ = f"TransportInState{base.__name__}"
    return TransportInState


class Delivery:
    """How much of what was written to one TCP connection its peer has acknowledged."""

    __slots__ = ("_sock", "_transport")

    def __init__(self, transport: asyncio.WriteTransport, sock: Any) -> None:
        self._transport = transport
        self._sock = sock  # asyncio's TransportSocket or uvloop's PseudoSocket

    @classmethod
    def of(cls, scope: MutableMapping[str, Any]) -> Delivery | None:
        """The delivery of the request's connection, or None where it cannot be known (not
        Linux, not TCP, not served by `with_transport_in_state`)."""
        transport = scope.get("state", {}).get(TRANSPORT_KEY)
        if _SIOCOUTQ is None or transport is None or transport.is_closing():
            return None
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        delivery = cls(transport, sock)
        try:
            delivery.progress()
        except OSError:
            return None
        return delivery

    def bound_send_buffer(self, size: int = STREAM_SEND_BUFFER) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError:
            pass  # the connection went away: the stream is ending anyway

    def progress(self) -> tuple[int, bool]:
        """(bytes the peer has acknowledged, whether bytes wait for it: in the kernel's send
        queue, sent or not, or in the transport's buffer). OSError once the socket is gone."""
        raw = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LEN)
        if len(raw) < _TCPI_LEN:
            raise OSError("TCP_INFO without tcpi_bytes_acked (Linux before 4.1)")
        (acked,) = struct.unpack_from("=Q", raw, _TCPI_BYTES_ACKED)
        assert _SIOCOUTQ is not None
        queued = struct.unpack("i", fcntl.ioctl(self._sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
        return acked, queued > 0 or self._transport.get_write_buffer_size() > 0

    def abort(self) -> None:
        """Drop the connection at once with a reset (linger 0): its unacknowledged bytes are
        discarded, not kept in the kernel for minutes of probes to a client that is not
        reading."""
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self._transport.abort()
