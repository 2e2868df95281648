"""When `llmserve chat` is given no --base-url and nothing listens on the default one, it
starts `llmserve serve` on the bundled model itself, as `ollama run` does: the first minute
should be a chat, not a hint to open a second terminal. The server is a child process on a
free loopback port, started through the command line like any other (the client still only
speaks the API), and stopped when the chat ends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
START_TIMEOUT = 180.0


def default_base_url() -> str:
    return os.environ.get("LLMSERVE_BASE_URL") or DEFAULT_BASE_URL


def listening(base_url: str, timeout: float = 1.0) -> bool:
    """Whether something accepts connections at the URL's host and port."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class LocalServer:
    """`llmserve serve` on the bundled model in a child process, its log in `log_path`."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "llmserve.cli", "serve", "--host", "127.0.0.1",
                "--port", str(self.port)]
        with open(self.log_path, "wb") as log:
            # Its own session: Ctrl-C in the chat stops an answer, not the server.
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"the server exited ({self._process.returncode}); "
                                   f"its log: {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not come up; its log: {self.log_path}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
