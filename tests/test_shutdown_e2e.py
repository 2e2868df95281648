"""SIGTERM and SIGINT drain the server: no new connections, requests in flight finish
within --shutdown-timeout or end with an error then, exit code 0, no tracebacks."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from conftest import MODEL, Server, run_server
from openai_schema import validate
from sse import parse_events

PATH = "/v1/chat/completions"


def body(max_tokens: int, **extra) -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a long story about a ship."}],
            **extra}


class Stream(threading.Thread):
    def __init__(self, server: Server, payload: dict) -> None:
        super().__init__(daemon=True)
        self.server, self.payload = server, payload
        self.raw = b""
        self.started = threading.Event()

    def run(self) -> None:
        with httpx.stream("POST", self.server.url + PATH, json={**self.payload, "stream": True},
                          headers=self.server.headers(), timeout=120) as r:
            for chunk in r.iter_raw():
                self.raw += chunk
                if self.raw.count(b'"content":"') > 3:
                    self.started.set()

    def chunks(self) -> tuple[list[dict], list[str]]:
        events = parse_events(self.raw)
        return [json.loads(e) for e in events if e != "[DONE]"], events


class Call(threading.Thread):
    def __init__(self, server: Server, payload: dict) -> None:
        super().__init__(daemon=True)
        self.server, self.payload = server, payload
        self.response: httpx.Response | None = None

    def run(self) -> None:
        self.response = httpx.post(self.server.url + PATH, json=self.payload,
                                   headers=self.server.headers(), timeout=120)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_in_flight_streams_finish_naturally_and_the_server_exits_0(tmp_path, sig):
    with run_server(tmp_path, "--embedding-model", "none", "--shutdown-timeout", "30") as server:
        stream = Stream(server, body(120))
        stream.start()
        assert stream.started.wait(60)
        server.process.send_signal(sig)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(server.url + "/health", timeout=5)
        stream.join(timeout=60)
        chunks, events = stream.chunks()
        assert events[-1] == "[DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in c for c in chunks)
        assert server.process.wait(timeout=30) == 0
        assert "Traceback" not in server.log()


def test_what_outlasts_the_shutdown_timeout_ends_with_an_error(tmp_path):
    with run_server(tmp_path, "--embedding-model", "none", "--shutdown-timeout", "2") as server:
        stream = Stream(server, body(1800))
        call = Call(server, body(1800))
        call.start()
        stream.start()
        assert stream.started.wait(60)
        time.sleep(0.5)  # the plain request is decoding too
        server.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        stream.join(timeout=30)
        call.join(timeout=30)
        assert time.monotonic() - sent < 10
        chunks, events = stream.chunks()
        assert events[-1] == "[DONE]"
        error = chunks[-1]
        validate("ErrorResponse", error)
        assert error["error"]["code"] == "engine_error"
        assert "shutting down" in error["error"]["message"]
        assert call.response is not None and call.response.status_code == 503
        validate("ErrorResponse", call.response.json())
        assert server.process.wait(timeout=30) == 0
        log = server.log()
        assert "Traceback" not in log and "ended 2 request(s)" in log
