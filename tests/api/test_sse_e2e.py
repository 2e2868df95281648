"""Streams that no client can stall: keep-alive comments while a stream waits, slow readers
that hold no slot once their answer is generated, and readers that accept nothing dropped
after the write timeout."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, Server, run_server
from prometheus_client.parser import text_string_to_metric_families
from sse import parse_events

linux_only = pytest.mark.skipif(sys.platform != "linux",
                                reason="acknowledged bytes are read from Linux's TCP_INFO")

PATH = "/v1/chat/completions"
SHORT = {"model": MODEL, "temperature": 0, "max_tokens": 16,
         "messages": [{"role": "user", "content": "Name three fruits."}]}
LONG = {"model": MODEL, "temperature": 0, "max_tokens": 400, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Write a very long story about a ship."}]}
# About 3 KB per token: an answer far larger than the socket buffers between us.
BULKY = {**LONG, "logprobs": True, "top_logprobs": 20}


def stalled_client(server: Server, body: dict, rcvbuf: int = 4096) -> socket.socket:
    """Sends a streamed request and then reads nothing, with a tiny receive window."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    payload = json.dumps({**body, "stream": True}).encode()
    head = (f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(payload)}\r\n\r\n")
    sock.sendall(head.encode() + payload)
    return sock


def timed_short(server: Server) -> tuple[float, str]:
    start = time.monotonic()
    r = httpx.post(server.url + PATH, json=SHORT, headers=server.headers(), timeout=120)
    assert r.status_code == 200, r.text
    return time.monotonic() - start, r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("sse"), "--max-sequences", "1", "--sse-keepalive",
                    "0.5", "--write-timeout", "60", "--embedding-model", "none") as s:
        yield s


def test_keepalive_comments_while_queued_and_clients_ignore_them(one_slot):
    server = one_slot
    _, expected = timed_short(server)
    holder_started = threading.Event()

    def hold() -> None:  # keeps the only slot busy for a few seconds
        with httpx.stream("POST", server.url + PATH, json={**LONG, "stream": True},
                          headers=server.headers(), timeout=120) as r:
            for _ in r.iter_raw():
                holder_started.set()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holder_started.wait(60)
    with httpx.stream("POST", server.url + PATH, json={**SHORT, "stream": True},
                      headers=server.headers(), timeout=120) as r:
        raw = r.read()
    first_content = raw.index(b'"content":"', raw.index(b'"content":"') + 1)  # after the role chunk
    assert b"\n: keep-alive\n" in raw[:first_content]  # sent while it waited for the slot
    events = parse_events(raw)  # comments are valid SSE
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in map(json.loads, events[:-1]) if c["choices"])
    assert text == expected

    # The official client, also queued behind the holder, skips the comments.
    holder = threading.Thread(target=hold, daemon=True)
    holder_started.clear()
    holder.start()
    assert holder_started.wait(60)
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    stream = client.chat.completions.create(**SHORT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    holder.join(timeout=120)

    # And LangChain's OpenAI chat model.
    langchain_openai = pytest.importorskip("langchain_openai")
    holder = threading.Thread(target=hold, daemon=True)
    holder_started.clear()
    holder.start()
    assert holder_started.wait(60)
    llm = langchain_openai.ChatOpenAI(
        model=SHORT["model"], base_url=server.base_url, api_key=server.api_key, max_retries=0,
        temperature=SHORT.get("temperature", 0), max_tokens=SHORT["max_tokens"],
    )
    assert "".join(c.content for c in llm.stream(SHORT["messages"])) == expected
    holder.join(timeout=120)


def test_a_slow_reader_holds_no_slot_once_its_answer_is_generated(one_slot):
    """The reader takes nothing and its answer is larger than the socket buffers; the write
    timeout is 60 s. Its generation must still run to the end at once and free the only
    slot: the next request waits for the engine's work, not for that client."""
    server = one_slot
    alone, _ = timed_short(server)
    sock = stalled_client(server, {**BULKY, "max_tokens": 150})
    try:
        time.sleep(0.5)
        waited, _ = timed_short(server)
    finally:
        sock.close()
    assert waited < 30, f"{waited:.1f} s behind a stalled reader (alone: {alone:.1f} s)"


def test_a_reader_that_accepts_nothing_is_dropped_after_the_write_timeout(tmp_path):
    """The reader takes nothing; its 2000-token answer (about 6 MB) is more than the socket
    buffers hold (up to 4 MB on Linux), and generating it would take the only slot for
    half a minute. Once the buffers are full and no byte has gone out for 2 s it is dropped,
    its generation cancelled and the slot freed."""
    with run_server(tmp_path, "--max-sequences", "1", "--write-timeout", "2",
                    "--embedding-model", "none") as server:
        _, expected = timed_short(server)
        sock = stalled_client(server, {**BULKY, "max_tokens": 2000})
        try:
            time.sleep(0.5)
            _, text = timed_short(server)  # waits for the slot the dropped stream held
            assert text == expected
            assert "the client accepted no bytes for 2 s" in server.log()
        finally:
            sock.close()
        assert "Traceback" not in server.log()


def scrape(server: Server) -> dict[str, float]:
    r = httpx.get(server.url + "/metrics", timeout=30)
    return {s.name: s.value for family in text_string_to_metric_families(r.text)
            for s in family.samples}


def wait_for_drops(server: Server, count: int, within: float) -> float:
    """Seconds until `count` streams were dropped for stalling (fails after `within`)."""
    start = time.monotonic()
    while (dropped := scrape(server)["llmserve:streams_dropped_stalled_total"]) < count:
        assert time.monotonic() - start < within, f"{dropped:g} of {count} dropped"
        time.sleep(0.25)
    return time.monotonic() - start


@linux_only
def test_clients_that_stop_reading_are_dropped_though_the_kernel_takes_their_answer(tmp_path):
    """Four clients with a 2 KB receive window send 2000-token streams and read nothing: the
    answers (about 400 KB each) fit the kernel's buffers, so no write ever waits, yet each is
    dropped within the write timeout of its window closing (its acknowledgements stop),
    freeing both slots: a short request sent after them is answered at once."""
    with run_server(tmp_path, "--max-sequences", "2", "--write-timeout", "5",
                    "--embedding-model", "none") as server:
        _, expected = timed_short(server)
        generated_before = scrape(server)["llmserve:generation_tokens_total"]
        socks = [stalled_client(server, {**LONG, "max_tokens": 2000}, rcvbuf=2048)
                 for _ in range(4)]
        try:
            time.sleep(3)
            waited, text = timed_short(server)
            assert text == expected
            assert waited < 30, f"the short request waited {waited:.1f} s"
            # The two queued behind the first two are dropped too (their windows close once
            # they start), within the timeout and a few seconds of it.
            wait_for_drops(server, 4, within=40)
            metrics = scrape(server)
            assert metrics["llmserve:num_requests_running"] == 0  # no slot leaked
            assert metrics["llmserve:num_requests_waiting"] == 0
            generated = metrics["llmserve:generation_tokens_total"] - generated_before
            assert generated < 4 * 1000, f"{generated:g} tokens for clients that read nothing"
        finally:
            for sock in socks:
                sock.close()
        log = server.log()
        assert log.count("stream dropped, the client accepted no bytes for 5 s") == 4
        assert "Traceback" not in log


@linux_only
def test_a_slow_steady_reader_is_never_dropped(tmp_path):
    """A reader taking 1 KiB every 100 ms with a small window falls far behind the stream
    (each write waits seconds for room), but its acknowledgements keep moving: it gets the
    whole answer, with a 2 s write timeout."""
    with run_server(tmp_path, "--max-sequences", "1", "--write-timeout", "2",
                    "--embedding-model", "none") as server:
        sock = stalled_client(server, {**BULKY, "max_tokens": 150}, rcvbuf=8192)
        raw = bytearray()
        try:
            deadline = time.monotonic() + 120
            while not raw.endswith(b"0\r\n\r\n"):  # the chunked body's end
                assert time.monotonic() < deadline
                data = sock.recv(1024)
                assert data, "the server closed the stream"
                raw += data
                time.sleep(0.1)
        finally:
            sock.close()
        # More than the buffers between us hold: the server's writes waited on the reader.
        assert len(raw) > 250_000
        assert b"data: [DONE]" in raw and b'"finish_reason":"length"' in raw
        assert "stream dropped" not in server.log()
        assert scrape(server)["llmserve:streams_dropped_stalled_total"] == 0


@linux_only
def test_a_stored_stream_whose_client_stalls_is_detached_and_resumes(tmp_path):
    """store: true keeps the run when its client goes: one that stops reading is dropped
    from the stream, the generation goes on, and the client resumes with Last-Event-ID.
    Logprobs make the answer (about 600 KB) larger than the buffers between us."""
    with run_server(tmp_path, "--max-sequences", "1", "--write-timeout", "3",
                    "--embedding-model", "none") as server:
        sock = stalled_client(server, {**BULKY, "max_tokens": 300, "store": True}, rcvbuf=2048)
        try:
            head = b""
            while b"\n\n" not in head[head.find(b"id: 0"):]:
                head += sock.recv(256)
            first = head[head.index(b"id: 0"):].split(b"\n\n")[0]
            completion_id = json.loads(first.split(b"data: ", 1)[1])["id"]
            wait_for_drops(server, 1, within=30)
        finally:
            sock.close()
        with httpx.stream("GET", f"{server.url}{PATH}/{completion_id}",
                          params={"stream": "true"}, headers={**server.headers(),
                                                               "Last-Event-ID": "0"},
                          timeout=120) as r:
            assert r.status_code == 200
            events = parse_events(r.read(), first=1)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # not cancelled
        stored = httpx.get(f"{server.url}{PATH}/{completion_id}", headers=server.headers(),
                           timeout=30).json()
        assert stored["usage"]["completion_tokens"] == 300
        assert stored["choices"][0]["finish_reason"] == "length"
