"""vLLM split across worker processes (pipeline stages, tensor parallelism, two nodes) behind
one server: a hang-up stops its request, and a worker killed mid-stream ends the streams with
the error event and [DONE], /health says so, and the restart policy brings the engine back.
`make test-cluster` runs these, and the chat suite's core on the same servers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from conftest import MODEL, PARALLEL, Server
from greedy import assert_same_greedy
from openai_schema import validate
from sse import parse_events

pytestmark = pytest.mark.skipif(
    os.environ.get("LLMSERVE_TEST_CLUSTER") != "1",
    reason="vLLM across worker processes: make test-cluster")

PATH = "/v1/chat/completions"
SHORT = {"model": MODEL, "messages": [{"role": "user", "content": "Name three colors."}],
         "max_tokens": 24, "temperature": 0}
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module", params=list(PARALLEL))
def server(request, engine_servers) -> Server:
    return engine_servers(request.param)


def workers(server: Server) -> list:
    """vLLM's worker processes under the server and its other nodes (VLLM::Worker_PP1,
    VLLM::Worker_TP2, ...)."""
    import psutil

    found = [p for root in (server.process, *server.nodes)
             for p in psutil.Process(root.pid).children(recursive=True)
             if "Worker" in p.name() + " ".join(p.cmdline())]
    return sorted(found, key=lambda p: p.name() + " ".join(p.cmdline()))


def running(server: Server) -> float:
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("llmserve:num_requests_running{"))


def test_the_model_is_split_across_workers(server):
    assert len(workers(server)) >= 2
    for node in server.nodes:  # each other node runs workers of its own
        import psutil

        assert any("Worker" in p.name() for p in psutil.Process(node.pid).children(True))
    answer = httpx.post(server.url + PATH, json=SHORT, headers=server.headers(), timeout=120)
    assert answer.status_code == 200, answer.text
    validate("CreateChatCompletionResponse", answer.json())


def test_a_hang_up_stops_the_generation(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as h:
        with h.stream("POST", PATH, json=LONG) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection at once
            for line in lines:
                if line.startswith("data: {") and '"content":"' in line \
                        and '"content":""' not in line:
                    break
            assert running(server) == 1
    deadline = time.monotonic() + 10
    while running(server) != 0:  # 400 tokens would take far longer than this
        assert time.monotonic() < deadline, "the generation went on after the hang-up"
        time.sleep(0.2)


def test_a_worker_killed_mid_stream_ends_it_and_the_engine_comes_back(server):
    asked = {**SHORT, "logprobs": True, "top_logprobs": 5}
    before = httpx.post(server.url + PATH, json=asked, headers=server.headers(), timeout=120)
    assert before.status_code == 200
    reference = before.json()["choices"][0]["logprobs"]["content"]
    victim = workers(server)[-1]  # the last stage / rank: not the one the core talks to first
    raw = bytearray()
    chunks = threading.Event()

    def read() -> None:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=300) as h:
            with h.stream("POST", PATH, json=LONG) as r:
                assert r.status_code == 200
                for part in r.iter_bytes():
                    raw.extend(part)
                    if raw.count(b'"content":') >= 5:
                        chunks.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert chunks.wait(120), "the stream did not start"
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the stream did not end after its worker died"
    ended = time.monotonic() - killed
    events = parse_events(bytes(raw))
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    validate("ErrorResponse", error)
    assert error["error"]["code"] == "engine_error", error
    for e in events[:-2]:
        validate("CreateChatCompletionStreamResponse", json.loads(e))
    assert ended < 30, f"the stream ended {ended:.0f} s after the kill"

    down = httpx.get(server.url + "/health", timeout=10)
    assert down.status_code == 503
    state = down.json()["engines"][MODEL]
    # stalled: a lost rank 1 is noticed by rank 0's stall watchdog, which kills its engine
    assert state["state"] in ("stalled", "restarting", "starting") and state["reason"], state

    deadline = time.monotonic() + 300
    while (health := httpx.get(server.url + "/health", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, health.text
        time.sleep(1)
    assert health.json()["engines"][MODEL]["restarts"] >= 1
    assert len(workers(server)) >= 2 and victim.pid not in {p.pid for p in workers(server)}
    after = httpx.post(server.url + PATH, json=SHORT, headers=server.headers(), timeout=120)
    assert after.status_code == 200, after.text
    assert_same_greedy(after.json()["choices"][0]["message"]["content"], reference)
