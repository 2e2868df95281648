"""A stalled engine is a crashed one: the real engine (and embedder) process is stopped with
SIGSTOP, mid-stream or idle, and the server notices within --engine-stall-timeout, ends what
it was serving with an error, kills and restarts it; meanwhile nothing the server does waits
on the stopped process (a request too large for the pipe included)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from conftest import MODEL, Server, run_server
from openai_schema import validate
from test_faults_e2e import (
    LONG,
    PATH,
    SHORT,
    Call,
    StreamReader,
    assert_ended_with_engine_error,
    engine_state,
    health,
    pid_gone,
    reference_text,
    wait_for_health,
)

STALL = 4.0  # --engine-stall-timeout of these servers
# Noticed within the timeout and a watchdog tick; the rest is margin for a busy 2-core machine.
NOTICED = STALL + 1.0 + 5.0
EMBED = "all-minilm-l6-v2"


def stall_env() -> dict[str, str]:
    # The setting by its environment name (the flag is the same setting: tests/test_cli.py).
    return {"LLMSERVE_ENGINE_STALL_TIMEOUT": str(STALL)}


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """`pid` stopped with SIGSTOP, and never left so: continued on the way out whatever
    happened (a process the server failed to kill would otherwise outlive the test)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def assert_restarted_after_stall(server: Server, name: str, pid: int) -> dict:
    """/health: 503 and `stalled` or `restarting` saying why, then 200 with a new process."""
    down = health(server)
    assert down.status_code == 503, down.text
    state = down.json()["engines"][name]
    assert state["state"] in ("stalled", "restarting"), state
    assert "stalled" in state["reason"] and f"pid {pid}" in state["reason"], state
    after = wait_for_health(server, 200, timeout=90)["engines"][name]
    assert after["pid"] != pid and after["state"] == "running"
    assert pid_gone(pid)
    return after


@pytest.fixture(scope="module")
def stall_server(tmp_path_factory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("stalls"), "--max-sequences", "8",
                    "--embedding-model", "none", env=stall_env()) as s:
        yield s


def test_engine_stopped_mid_stream_is_killed_and_restarted(stall_server):
    server = stall_server
    expected = reference_text(server)
    before = engine_state(server)
    pid = before["pid"]
    call = Call(server, LONG, "stall-plain")
    reader = StreamReader(server, LONG, "stall-stream")
    call.start()
    reader.start()
    deadline = time.monotonic() + 60
    while reader.content_events < 3:
        assert time.monotonic() < deadline, "the stream did not start"
        time.sleep(0.05)

    with stopped(pid):
        stopped_at = time.monotonic()
        reader.join(timeout=NOTICED + 5)
        assert reader.ended_at is not None, "the stream never ended"
        ended_after = reader.ended_at - stopped_at
        assert STALL - 0.5 < ended_after < NOTICED, ended_after
        assert_ended_with_engine_error(reader)
        error = json.loads(reader.events()[-2])["error"]
        assert "stalled" in error["message"]
        call.join(timeout=10)
        assert call.response is not None
        assert call.response.status_code == 503, call.response.text
        assert int(call.response.headers["Retry-After"]) >= 1
        validate("ErrorResponse", call.response.json())
        after = assert_restarted_after_stall(server, MODEL, pid)

    assert after["restarts"] == before["restarts"] + 1
    assert reference_text(server) == expected  # the new engine serves as the old one did
    lines = [line for line in server.log().splitlines() if "crashed" in line and "stalled" in line]
    assert len(lines) == 1, server.log()[-3000:]
    assert "stall-plain" in lines[0] and "stall-stream" in lines[0]


def test_engine_stopped_while_idle_is_noticed(stall_server):
    server = stall_server
    pid = wait_for_health(server, 200, timeout=90)["engines"][MODEL]["pid"]
    with stopped(pid):
        stopped_at = time.monotonic()
        wait_for_health(server, 503, timeout=NOTICED + 5)
        assert time.monotonic() - stopped_at < NOTICED
        assert_restarted_after_stall(server, MODEL, pid)
    r = httpx.post(server.url + PATH, json=SHORT, headers=server.headers(), timeout=60)
    assert r.status_code == 200, r.text


def test_a_large_request_to_a_stopped_engine_never_blocks_the_server(stall_server):
    """An "add" message of about 4.7 MB (a logit_bias over the whole vocabulary, n=8) fills
    the pipe of a stopped engine: the server goes on answering all along."""
    server = stall_server
    pid = wait_for_health(server, 200, timeout=90)["engines"][MODEL]["pid"]
    big = {**SHORT, "max_tokens": 8, "n": 8,
           "logit_bias": {str(t): 1 for t in range(49_000)}}
    call = Call(server, big, "stall-big")
    with stopped(pid):
        call.start()
        slowest = 0.0
        deadline = time.monotonic() + NOTICED + 60
        while True:
            assert time.monotonic() < deadline, "the engine never came back"
            t0 = time.monotonic()
            r = httpx.get(server.url + "/health", timeout=5)
            slowest = max(slowest, time.monotonic() - t0)
            if r.status_code == 200 and r.json()["engines"][MODEL]["pid"] != pid:
                break
            time.sleep(0.1)
        assert slowest < 1.0, slowest
        call.join(timeout=10)
    assert call.response is not None
    assert call.response.status_code == 503, call.response.text
    assert call.response.json()["error"]["code"] == "engine_error"
    assert pid_gone(pid)
    r = httpx.post(server.url + PATH, json=SHORT, headers=server.headers(), timeout=60)
    assert r.status_code == 200, r.text


class Embed(threading.Thread):
    def __init__(self, server: Server, text: str) -> None:
        super().__init__(daemon=True)
        self.server, self.text = server, text
        self.response: httpx.Response | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        self.response = httpx.post(self.server.url + "/v1/embeddings",
                                   json={"model": EMBED, "input": self.text},
                                   headers=self.server.headers(), timeout=120)
        self.ended_at = time.monotonic()


def test_a_stuck_embedder_is_restarted_and_its_line_is_bounded(tmp_path):
    pytest.importorskip("sentence_transformers")
    with run_server(tmp_path, "--max-queue", "1", env=stall_env()) as server:
        warm = Embed(server, "warm up")
        warm.run()
        assert warm.response is not None and warm.response.status_code == 200
        pid = engine_state_of(server, EMBED)["pid"]
        with stopped(pid):
            stopped_at = time.monotonic()
            first = Embed(server, "the batch the embedder is stuck on")
            first.start()
            time.sleep(1.0)
            second = Embed(server, "waiting in line")
            second.start()
            time.sleep(1.0)
            # the line (--max-queue 1) is full: refused at once
            third = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": "x"},
                               headers=server.headers(), timeout=10)
            assert third.status_code == 429, third.text
            assert "Retry-After" in third.headers
            validate("ErrorResponse", third.json())
            # and chat, on its own engine, is served meanwhile
            chat = httpx.post(server.url + PATH, json=SHORT, headers=server.headers(),
                              timeout=60)
            assert chat.status_code == 200, chat.text

            for waiter in (first, second):
                waiter.join(timeout=NOTICED + 5)
                assert waiter.response is not None, "an embedding request never ended"
                assert waiter.response.status_code == 503, waiter.response.text
                assert "Retry-After" in waiter.response.headers
                assert waiter.response.json()["error"]["code"] == "engine_error"
            assert first.ended_at - stopped_at < NOTICED
            assert_restarted_after_stall(server, EMBED, pid)
        r = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED, "input": "hello"},
                       headers=server.headers(), timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"][0]["embedding"]) == 384


def engine_state_of(server: Server, name: str) -> dict:
    return health(server).json()["engines"][name]
