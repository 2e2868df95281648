"""docker/entrypoint.sh outside a container: its `health` check, `serve`, and other commands."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[1] / "docker" / "entrypoint.sh"


def run(*args: str, port: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if port is not None:
        env["LLMSERVE_PORT"] = str(port)
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.fixture
def health_server() -> Iterator[tuple[int, list[int]]]:
    """A stand-in /health answering the status the test puts in `answer`."""
    answer = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            code = answer[0] if self.path == "/health" else 404
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], answer
    finally:
        server.shutdown()
        server.server_close()


def test_health_follows_the_status(health_server) -> None:
    port, answer = health_server
    assert run("health", port=port).returncode == 0
    answer[0] = 503  # an engine down: unhealthy
    done = run("health", port=port)
    assert done.returncode == 1
    assert "503" in done.stderr


def test_health_fails_when_nothing_listens() -> None:
    with socket.socket() as s:  # a port just freed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run("health", port=port)
    assert done.returncode == 1 and "unhealthy" in done.stderr


def test_serve_passes_its_flags_to_llmserve_serve() -> None:
    done = run("serve", "--help")
    assert done.returncode == 0
    assert "--allowed-hosts" in done.stdout


def test_other_commands_run_as_given() -> None:
    done = run("llmserve", "--version")
    assert done.returncode == 0 and done.stdout.strip()
    assert run("sh", "-c", "exit 3").returncode == 3
