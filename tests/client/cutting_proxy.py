"""A TCP proxy in front of a server that cuts the first streamed chat completion after a
few hundred bytes of its answer, as a dropped connection would; everything else passes."""

from __future__ import annotations

import socket
import threading
from contextlib import suppress


class CuttingProxy:
    def __init__(self, upstream_port: int, cut_after: int = 1500) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after  # bytes of the response, headers included
        self.cuts = 0
        self.requests: list[str] = []  # request lines seen, in order
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"cutting": False, "sent": 0}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state),
                             daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        with suppress(OSError):
            while data := client.recv(65536):
                for line in data.split(b"\r\n"):
                    if line.startswith((b"GET ", b"POST ", b"DELETE ")):
                        with self._lock:
                            self.requests.append(line.decode())
                            if line.startswith(b"POST /v1/chat/completions") and not self.cuts:
                                self.cuts = 1
                                state["cutting"] = True
                upstream.sendall(data)
        _close(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        with suppress(OSError):
            while data := upstream.recv(65536):
                if state["cutting"]:
                    room = self.cut_after - state["sent"]
                    if len(data) >= room:
                        client.sendall(data[:room])
                        break  # the cut: both sides closed, as by a broken network
                    state["sent"] += len(data)
                client.sendall(data)
        _close(client, upstream)


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with suppress(OSError):
            s.close()
