"""A server that loses requests, never itself: the engine process is killed (SIGKILL,
SIGSEGV), its decode loop raises, it crashes in a loop, the server is killed. What clients
see, what /health says, and that nothing is left running."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, Server, run_server
from openai_schema import validate
from sse import parse_events

PATH = "/v1/chat/completions"
SHORT = {"model": MODEL, "temperature": 0, "max_tokens": 24,
         "messages": [{"role": "user", "content": "Name three fruits."}]}
LONG = {"model": MODEL, "temperature": 0, "max_tokens": 1500, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Write a very long story about a ship."}]}


def health(server: Server) -> httpx.Response:
    return httpx.get(server.url + "/health", timeout=10)


def engine_state(server: Server) -> dict:
    return health(server).json()["engines"][MODEL]


def wait_for_health(server: Server, status: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = health(server)
        if r.status_code == status:
            return r.json()
        time.sleep(0.1)
    raise AssertionError(f"/health never answered {status}: {health(server).text}")


def pid_gone(pid: int, timeout: float = 10) -> bool:
    """The process has exited and been reaped (no zombie left either)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.05)
    return False


def children(pid: int) -> list[int]:
    """Every child process of `pid` (engine processes, multiprocessing's helpers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def engine_processes(pid: int) -> list[int]:
    def cmdline(child: int) -> bytes:
        try:
            return Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            return b""

    return [c for c in children(pid) if b"spawn_main" in cmdline(c)]


def reference_text(server: Server) -> str:
    r = httpx.post(server.url + PATH, json=SHORT, headers=server.headers(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


class StreamReader(threading.Thread):
    """Reads one streamed request to its end, noting when each event arrived."""

    def __init__(self, server: Server, body: dict, request_id: str) -> None:
        super().__init__(daemon=True)
        self.server, self.body, self.request_id = server, body, request_id
        self.status: int | None = None
        self.raw = b""
        self.content_events = 0
        self.ended_at: float | None = None

    def run(self) -> None:
        headers = {**self.server.headers(), "X-Request-ID": self.request_id}
        with httpx.stream("POST", self.server.url + PATH, json={**self.body, "stream": True},
                          headers=headers, timeout=120) as r:
            self.status = r.status_code
            for chunk in r.iter_raw():
                self.raw += chunk
                self.content_events = self.raw.count(b'"content":"') - 1  # less the role chunk
        self.ended_at = time.monotonic()

    def events(self) -> list[str]:
        return parse_events(self.raw)


class Call(threading.Thread):
    """One non-streamed request in the background."""

    def __init__(self, server: Server, body: dict, request_id: str) -> None:
        super().__init__(daemon=True)
        self.server, self.body, self.request_id = server, body, request_id
        self.response: httpx.Response | None = None

    def run(self) -> None:
        headers = {**self.server.headers(), "X-Request-ID": self.request_id}
        self.response = httpx.post(self.server.url + PATH, json=self.body, headers=headers,
                                   timeout=120)


def assert_ended_with_engine_error(reader: StreamReader) -> None:
    assert reader.status == 200
    events = reader.events()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    validate("ErrorResponse", error)
    assert error["error"]["code"] == "engine_error"
    for e in events[:-2]:  # everything before it is a well-formed chunk
        validate("CreateChatCompletionStreamResponse", json.loads(e))


def start_load(server: Server) -> tuple[list[StreamReader], Call]:
    """Two streams (one with n=2) and a non-streamed request, all decoding."""
    call = Call(server, LONG, "fault-plain")
    readers = [StreamReader(server, LONG, "fault-stream-a"),
               StreamReader(server, {**LONG, "n": 2}, "fault-stream-b")]
    call.start()
    for r in readers:
        r.start()
    deadline = time.monotonic() + 60
    while any(r.content_events < 3 for r in readers):
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.05)
    return readers, call


@pytest.fixture(scope="module")
def crash_server(tmp_path_factory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("faults"), "--max-sequences", "4",
                    "--embedding-model", "none") as s:
        yield s


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_engine_killed_mid_generation(crash_server, sig):
    server = crash_server
    expected = reference_text(server)
    before = engine_state(server)
    pid = before["pid"]
    readers, call = start_load(server)

    os.kill(pid, sig)
    killed_at = time.monotonic()
    for r in readers:
        r.join(timeout=10)
        assert r.ended_at is not None and r.ended_at - killed_at < 2.0
        assert_ended_with_engine_error(r)
    call.join(timeout=10)
    assert call.response is not None
    assert call.response.status_code == 503, call.response.text
    assert int(call.response.headers["Retry-After"]) >= 1
    validate("ErrorResponse", call.response.json())
    assert call.response.json()["error"]["code"] == "engine_error"

    down = health(server)
    assert down.status_code == 503
    state = down.json()["engines"][MODEL]
    assert state["state"] == "restarting" and sig.name in state["reason"]
    # Not started yet while the engine is down: a plain 503 with Retry-After, streamed or not.
    for body in (SHORT, {**SHORT, "stream": True}):
        refused = httpx.post(server.url + PATH, json=body, headers=server.headers(), timeout=30)
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        assert refused.json()["error"]["code"] == "engine_error"

    after = wait_for_health(server, 200)["engines"][MODEL]
    assert after["pid"] != pid and after["restarts"] == before["restarts"] + 1
    assert pid_gone(pid)
    assert reference_text(server) == expected  # same greedy output as before the crash
    assert server.process.poll() is None

    crash_lines = [line for line in server.log().splitlines()
                   if "crashed" in line and f"killed by {sig.name}" in line]
    assert len(crash_lines) == 1, server.log()[-3000:]
    for rid in ("fault-plain", "fault-stream-a", "fault-stream-b"):
        assert rid in crash_lines[0]


def test_decode_loop_exception_restarts_the_engine(tmp_path):
    with run_server(tmp_path, "--embedding-model", "none",
                    env={"LLMSERVE_TEST_FAULT": "step:30"}) as server:
        pid = engine_state(server)["pid"]
        reader = StreamReader(server, LONG, "fault-raise")
        reader.start()
        reader.join(timeout=60)
        assert_ended_with_engine_error(reader)
        assert health(server).status_code == 503
        assert "InjectedFault" in engine_state(server)["reason"]
        wait_for_health(server, 200)
        assert engine_state(server)["pid"] != pid
        assert pid_gone(pid)
        reference_text(server)  # the new engine serves (the fault was in the first only)
        log = server.log()
        assert "Traceback" in log and "injected fault after step 30" in log
        assert "fault-raise" in log


def test_a_failure_of_one_request_leaves_the_others_running(tmp_path):
    with run_server(tmp_path, "--embedding-model", "none",
                    env={"LLMSERVE_TEST_FAULT": "seed:666"}) as server:
        pid = engine_state(server)["pid"]
        expected = reference_text(server)
        good = StreamReader(server, {**LONG, "max_tokens": 200}, "good")
        good.start()
        while good.content_events < 3:
            time.sleep(0.05)
        bad = StreamReader(server, {**SHORT, "temperature": 1.0, "seed": 666}, "bad")
        bad.start()
        bad.join(timeout=60)
        good.join(timeout=120)
        assert_ended_with_engine_error(bad)
        events = good.events()
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length"
        state = engine_state(server)
        assert state["state"] == "running" and state["pid"] == pid
        assert reference_text(server) == expected


def test_crash_loop_leaves_the_engine_down(tmp_path):
    with run_server(tmp_path, "--embedding-model", "none") as server:
        pids = []
        for _ in range(5):
            pid = wait_for_health(server, 200, timeout=90)["engines"][MODEL]["pid"]
            pids.append(pid)
            os.kill(pid, signal.SIGKILL)
            assert pid_gone(pid)
        state = wait_for_health(server, 503)["engines"][MODEL]
        assert state["state"] == "failed", state
        time.sleep(3)  # and it stays so: no restart is scheduled
        state = engine_state(server)
        assert state["state"] == "failed", state
        assert "5 crashes" in state["reason"]
        r = httpx.post(server.url + PATH, json=SHORT, headers=server.headers(), timeout=30)
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert len(set(pids)) == 5
        assert engine_processes(server.process.pid) == []  # none left behind
        assert server.process.poll() is None  # the server itself is fine


def test_no_process_outlives_the_server(tmp_path):
    # SIGTERM: the engine is stopped with the server.
    with run_server(tmp_path) as server:  # the engine and the embedder
        assert len(engine_processes(server.process.pid)) == 2
        pids = children(server.process.pid)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        assert "Traceback" not in server.log()
        assert all(pid_gone(pid) for pid in pids)
    # SIGKILL: nobody stops them; they notice their server is gone and exit.
    with run_server(tmp_path) as server:
        assert len(engine_processes(server.process.pid)) == 2
        pids = children(server.process.pid)
        server.process.kill()
        server.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    """Running (an orphan is reaped by init once it exits, so a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_weight_repack_on_never_takes_the_server_down(tmp_path):
    """Where llama.cpp's repack crashes (AMX CPUs), the engine dies, not the server."""
    with run_server(tmp_path, "--embedding-model", "none", "--weight-repack", "on") as server:
        r = httpx.post(server.url + PATH, json=SHORT, headers=server.headers(), timeout=60)
        if r.status_code != 200:
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_error", r.text
            assert "Retry-After" in r.headers
        assert server.process.poll() is None
        assert health(server).status_code in (200, 503)
