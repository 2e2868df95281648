"""How a rank above 0 of --nnodes follows rank 0 (llmserve.engines.vllm's node helpers): it
joins when rank 0's rendezvous port opens, and lets its workers go once the port has stayed
closed. Real sockets and processes; no vLLM needed (make test-cluster runs the real thing)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from llmserve.engines import vllm as vllm_engine


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(vllm_engine, "_GONE_AFTER", 0.5)


def closed_port() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


def test_waits_until_rank_0_listens():
    address = closed_port()
    listener = socket.socket()

    def open_later() -> None:
        time.sleep(0.8)
        listener.bind(address)
        listener.listen()

    threading.Thread(target=open_later).start()
    t0 = time.monotonic()
    try:
        vllm_engine._wait_for(address, True, threading.Event())
        assert time.monotonic() - t0 >= 0.8
    finally:
        listener.close()


def test_gone_only_once_closed_for_a_while():
    address = closed_port()
    t0 = time.monotonic()
    vllm_engine._wait_for(address, False, threading.Event())
    assert time.monotonic() - t0 >= 0.5
    with socket.socket() as listener:  # open: not gone, however long
        listener.bind(address)
        listener.listen()
        stop = threading.Event()
        threading.Timer(1.5, stop.set).start()
        with pytest.raises(SystemExit):
            vllm_engine._wait_for(address, False, stop)


def test_a_stop_ends_the_wait():
    stop = threading.Event()
    stop.set()
    with pytest.raises(SystemExit):
        vllm_engine._wait_for(closed_port(), True, stop)


def children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_workers_still_joining_a_gone_rank_0_are_ended():
    earlier = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    spared = children()  # this one, and the session's servers: not workers of this join
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = threading.Event()
        vllm_engine._kill_workers_when_gone(closed_port(), gone, threading.Event(), spared)
        assert gone.is_set()
        assert worker.wait(timeout=10) == -9
        assert earlier.poll() is None
    finally:
        worker.kill()
        earlier.kill()


def test_workers_of_a_rank_0_still_there_are_left_alone():
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            stop = threading.Event()
            threading.Timer(1.0, stop.set).start()
            gone = threading.Event()
            vllm_engine._kill_workers_when_gone(listener.getsockname(), gone, stop, set())
        assert not gone.is_set() and worker.poll() is None
    finally:
        worker.kill()
