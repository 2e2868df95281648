"""End-to-end: stored chat completions (`store: true`) as at OpenAI, and resumable chat
streams (our extension): a stored stream goes on when its client hangs up, and is followed
again from the event after `Last-Event-ID`."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid

import httpx
import openai
import pytest
from conftest import MODEL, run_server
from openai_schema import validate
from sse import parse_numbered, stream_post

CHAT = "/v1/chat/completions"


def stored(client: openai.OpenAI, content: str, **kw):
    kw.setdefault("max_tokens", 32)
    return client.chat.completions.create(
        model=MODEL, temperature=0, store=True,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}],
        **kw)


def test_every_chat_stream_event_is_numbered(http):
    s = stream_post(http, CHAT, {"model": MODEL, "stream": True, "max_tokens": 8,
                                 "messages": [{"role": "user", "content": "Hi"}]})
    numbered = parse_numbered(s.raw)
    assert numbered and all(id is not None for id, _ in numbered)  # ids 0, 1, ... checked there
    assert numbered[-1][1] == "[DONE]"


def test_stored_completion_retrieve_messages_update_delete(client):
    tag = uuid.uuid4().hex
    c = stored(client, "Hi", metadata={"suite": tag})
    got = client.chat.completions.retrieve(c.id)
    validate("CreateChatCompletionResponse", got.model_dump(mode="json", exclude_unset=True))
    assert got.choices[0].message.content == c.choices[0].message.content
    assert got.metadata == {"suite": tag}
    messages = client.chat.completions.messages.list(c.id)
    # The spec lists messages with the response message's schema, whose role can only be
    # "assistant"; OpenAI lists a request's messages with their own roles.
    listed = messages.model_dump(mode="json", exclude_unset=True)
    validate("ChatCompletionMessageList",
             {**listed, "data": [{**m, "role": "assistant"} for m in listed["data"]]})
    assert [(m.role, m.content) for m in messages.data] == [("system", "Be brief."),
                                                           ("user", "Hi")]
    desc = client.chat.completions.messages.list(c.id, order="desc", limit=1)
    assert [m.content for m in desc.data] == ["Hi"] and desc.has_more
    updated = client.chat.completions.update(c.id, metadata={"suite": tag, "seen": "yes"})
    assert updated.metadata == {"suite": tag, "seen": "yes"}
    assert client.chat.completions.retrieve(c.id).metadata == {"suite": tag, "seen": "yes"}
    deleted = client.chat.completions.delete(c.id)
    validate("ChatCompletionDeleted", deleted.model_dump(mode="json", exclude_unset=True))
    assert deleted.deleted and deleted.id == c.id
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(c.id)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.delete(c.id)


def test_list_filters_by_metadata_and_model_and_pages(client):
    tag = uuid.uuid4().hex
    ids = [stored(client, f"Say {i}", metadata={"batch": tag}, max_tokens=4).id
           for i in range(3)]
    stored(client, "Other", metadata={"batch": "other-" + tag}, max_tokens=4)
    client.chat.completions.create(model=MODEL, max_tokens=4, metadata={"batch": tag},
                                   messages=[{"role": "user", "content": "not stored"}])
    page = client.chat.completions.list(metadata={"batch": tag}, model=MODEL, limit=2)
    validate("ChatCompletionList", page.model_dump(mode="json", exclude_unset=True))
    assert [c.id for c in page.data] == ids[:2] and page.has_more
    rest = client.chat.completions.list(metadata={"batch": tag}, after=ids[1])
    assert [c.id for c in rest.data] == ids[2:] and not rest.has_more
    newest = client.chat.completions.list(metadata={"batch": tag}, order="desc")
    assert [c.id for c in newest.data] == ids[::-1]
    every = [c.id for c in client.chat.completions.list(metadata={"batch": tag}, limit=1)]
    assert every == ids  # the SDK's auto-pagination follows `after`
    assert client.chat.completions.list(model="no-such-model").data == []


def test_stored_stream_resumes_after_a_disconnect_with_last_event_id(http, client):
    body = {"model": MODEL, "stream": True, "store": True, "temperature": 0, "max_tokens": 80,
            "messages": [{"role": "user", "content": "Tell a short story about a cat."}]}
    seen: list[tuple[int, dict]] = []
    with http.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200
        event_id = None
        for line in r.iter_lines():
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                seen.append((event_id, json.loads(line[6:])))
                if len(seen) == 5:
                    break  # hang up mid-stream
    completion_id = seen[0][1]["id"]
    last = seen[-1][0]
    with http.stream("GET", f"{CHAT}/{completion_id}", params={"stream": "true"},
                     headers={"Last-Event-ID": str(last)}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.read())
    assert events[0][0] == last + 1 and events[-1][1] == "[DONE]"
    ids = [i for i, _ in seen] + [i for i, _ in events]
    assert ids == list(range(len(ids)))  # nothing lost, nothing twice
    chunks = [c for _, c in seen] + [json.loads(d) for _, d in events[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    final = client.chat.completions.retrieve(completion_id)
    assert text == final.choices[0].message.content and text
    assert final.choices[0].finish_reason == chunks[-1]["choices"][0]["finish_reason"]
    # After the end, the whole stream again from the store, from any event on.
    with http.stream("GET", f"{CHAT}/{completion_id}", params={"stream": "true"},
                     headers={"Last-Event-ID": "1"}) as r:
        again = _events(r.read())
    assert [i for i, _ in again] == list(range(2, len(ids)))


def _events(raw: bytes) -> list[tuple[int, str]]:
    """Events of a resumed stream: numbered, continuing from where the client left."""
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        lines = [ln for ln in block.split("\n") if not ln.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("id: ") and lines[1].startswith("data: "), block
        out.append((int(lines[0][4:]), lines[1][6:]))
    assert out
    assert [i for i, _ in out] == list(range(out[0][0], out[0][0] + len(out)))
    return out


def test_store_requests_that_cannot_be_served(http, client):
    plain = client.chat.completions.create(model=MODEL, max_tokens=4,
                                           messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.NotFoundError):  # not stored
        client.chat.completions.retrieve(plain.id)
    c = stored(client, "Hi", max_tokens=4)
    r = http.get(f"{CHAT}/{c.id}", params={"stream": "true"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = http.get(f"{CHAT}/{c.id}", params={"stream": "true"}, headers={"Last-Event-ID": "x"})
    assert r.status_code == 400
    r = http.post(f"{CHAT}/{c.id}", json={"metadata": {"k": "v"}, "extra": 1})
    assert r.status_code == 400
    validate("ErrorResponse", r.json())


# Not event ids of a stream: a negative, a number past the end, a number past any integer
# type, and what is not an integer at all.
BAD_POSITIONS = ["-1", "-3", "-100", "99999999999999999999999", "+1", "1e3", "0x1", "x"]


def _resume(http, path: str, position: str | None, query: bool) -> httpx.Response:
    """GET `path` as a stream resumed after `position`: a `starting_after` parameter
    (`query`, Responses) or a Last-Event-ID header (chat completions)."""
    params = {"stream": "true"}
    headers = {}
    if position is not None:
        if query:
            params["starting_after"] = position
        else:
            headers["Last-Event-ID"] = position
    return http.get(path, params=params, headers=headers)


def test_resume_positions_out_of_range_are_a_400_live_and_from_the_store(tmp_path):
    store = tmp_path / "store.sqlite3"
    with run_server(tmp_path, "--store", str(store), "--embedding-model", "none") as server:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as http:
            chat = stream_post(http, CHAT, {
                "model": MODEL, "stream": True, "store": True, "temperature": 0,
                "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
            chat_id = json.loads(chat.events[0])["id"]
            r = http.post("/v1/responses", json={"model": MODEL, "input": "Hi",
                                                 "background": True, "max_output_tokens": 8})
            response_id = r.json()["id"]
            deadline = time.monotonic() + 60
            while http.get(f"/v1/responses/{response_id}").json()["status"] in (
                    "queued", "in_progress"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            # Both runs ended a moment ago: still in memory.
            live = _check_positions(http, chat_id, response_id)
    with run_server(tmp_path, "--store", str(store), "--embedding-model", "none") as server:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as http:
            stored = _check_positions(http, chat_id, response_id)
    assert stored == live  # memory and store replay the same events for every position


def _check_positions(http, chat_id: str, response_id: str) -> dict:
    """Every bad position is a 400 naming the header or parameter; returns what the good
    ones replay."""
    replays = {}
    for path, query, param in ((f"{CHAT}/{chat_id}", False, "Last-Event-ID"),
                               (f"/v1/responses/{response_id}", True, "starting_after")):
        whole = _resume(http, path, None, query)
        assert whole.status_code == 200
        count = len(parse_numbered(whole.content) if not query else
                    [b for b in whole.content.split(b"\n\n") if b.strip()])
        assert count > 3
        for bad in [*BAD_POSITIONS, str(count)]:
            r = _resume(http, path, bad, query)
            assert r.status_code == 400, (path, bad, r.text)
            assert r.json()["error"]["param"] == param
            validate("ErrorResponse", r.json())
        replays[path] = [whole.content] + [_resume(http, path, str(p), query).content
                                           for p in (0, 3, count - 1)]
        assert replays[path][-1] == b""  # after the last event: nothing more
    return replays


def _hang_up_after(http, body: dict, events: int) -> str:
    """Start a stream, read `events` of its events, hang up; the id of what it makes."""
    with http.stream("POST", body.pop("path"), json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                first = json.loads(line[6:])
                events -= 1
                if events == 0:
                    return first.get("id") or first["response"]["id"]
    raise AssertionError("the stream ended early")


def test_chat_and_responses_runs_are_not_each_others(http):
    chat_id = _hang_up_after(http, {
        "path": CHAT, "model": MODEL, "stream": True, "store": True, "temperature": 0,
        "max_tokens": 60, "messages": [{"role": "user", "content": "Tell a story."}]}, 1)
    response_id = http.post("/v1/responses", json={
        "model": MODEL, "input": "Tell a story.", "background": True,
        "max_output_tokens": 60}).json()["id"]
    # Both run now; each API finds only its own kind: the other's id is a 404.
    for r in (http.post(f"/v1/responses/{chat_id}/cancel", json={}),
              http.get(f"/v1/responses/{chat_id}"),
              http.get(f"/v1/responses/{chat_id}", params={"stream": "true"}),
              http.delete(f"/v1/responses/{chat_id}"),
              http.get(f"{CHAT}/{response_id}"),
              http.get(f"{CHAT}/{response_id}", params={"stream": "true"}),
              http.delete(f"{CHAT}/{response_id}")):
        assert r.status_code == 404, (r.request.method, r.request.url, r.text)
        validate("ErrorResponse", r.json())
    # Neither was touched: both run to their end and are stored.
    with http.stream("GET", f"{CHAT}/{chat_id}", params={"stream": "true"}) as r:
        events = parse_numbered(r.read())
    assert events[-1][1] == "[DONE]"
    assert json.loads(events[-2][1])["choices"][0]["finish_reason"] in ("stop", "length")
    assert http.get(f"{CHAT}/{chat_id}").status_code == 200
    with http.stream("GET", f"/v1/responses/{response_id}", params={"stream": "true"}) as r:
        last = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")][-1]
    assert last["type"] in ("response.completed", "response.incomplete")


def test_a_deleted_completion_is_not_served_from_memory_either(http, client):
    s = stream_post(http, CHAT, {"model": MODEL, "stream": True, "store": True,
                                 "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
    completion_id = json.loads(s.events[0])["id"]
    assert client.chat.completions.delete(completion_id).deleted
    # The run ended a moment ago (it lingers in memory for late followers): gone too.
    r = http.get(f"{CHAT}/{completion_id}", params={"stream": "true"})
    assert r.status_code == 404, r.text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(completion_id)
    # Deleted while it runs: stopped and gone.
    running = _hang_up_after(http, {
        "path": CHAT, "model": MODEL, "stream": True, "store": True, "max_tokens": 1500,
        "ignore_eos": True, "messages": [{"role": "user", "content": "Tell a story."}]}, 2)
    assert client.chat.completions.delete(running).deleted
    for params in ({}, {"stream": "true"}):
        assert http.get(f"{CHAT}/{running}", params=params).status_code == 404


LONG_STORED = {"path": CHAT, "model": MODEL, "stream": True, "store": True, "temperature": 0,
               "max_tokens": 1500, "ignore_eos": True,
               "messages": [{"role": "user", "content": "Write a very long story."}]}


def _stored_with_why(http, completion_id: str, code: str) -> None:
    """The completion is stored with what it had and why it ended, and its stream replays
    the same, ending with the error event and [DONE]."""
    r = http.get(f"{CHAT}/{completion_id}")
    assert r.status_code == 200, r.text
    completion = r.json()
    assert completion["error"]["code"] == code, completion
    [choice] = completion["choices"]
    assert choice["finish_reason"] == "error" and choice["message"]["content"]
    with http.stream("GET", f"{CHAT}/{completion_id}", params={"stream": "true"}) as s:
        events = parse_numbered(s.read())
    assert events[-1][1] == "[DONE]"
    error = json.loads(events[-2][1])
    validate("ErrorResponse", error)
    assert error["error"]["code"] == code
    chunks = [json.loads(d) for _, d in events[:-2]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == choice["message"]["content"]


def test_a_stored_stream_cut_short_is_stored_with_why(tmp_path):
    store = tmp_path / "store.sqlite3"
    flags = ("--store", str(store), "--embedding-model", "none", "--shutdown-timeout", "1")
    with run_server(tmp_path, *flags, env={"LLMSERVE_TEST_FAULT": "step:40"}) as server:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as http:
            # The engine fails mid-stream (then restarts).
            crashed = stream_post(http, CHAT, {k: v for k, v in LONG_STORED.items()
                                               if k != "path"})
            assert json.loads(crashed.events[-2])["error"]["code"] == "engine_error"
            crashed_id = json.loads(crashed.events[0])["id"]
            _stored_with_why(http, crashed_id, "engine_error")
            deadline = time.monotonic() + 60
            while http.get("/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            # The client hangs up and the server stops while it runs; a follower sees why.
            stopped_id = _hang_up_after(http, dict(LONG_STORED), 3)
            follower: dict[str, bytes] = {}

            def follow() -> None:
                with http.stream("GET", f"{CHAT}/{stopped_id}", params={"stream": "true"},
                                 headers={"Last-Event-ID": "1"}) as s:
                    follower["raw"] = s.read()

            thread = threading.Thread(target=follow, daemon=True)
            thread.start()
            time.sleep(1)
            server.process.send_signal(signal.SIGTERM)
            thread.join(timeout=30)
            assert server.process.wait(timeout=30) == 0
            events = [d for d in follower["raw"].decode().split("\n\n") if d.strip()]
            assert events[-1].endswith("data: [DONE]")
            assert '"error"' in events[-2]
    with run_server(tmp_path, *flags) as server:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as http:
            _stored_with_why(http, crashed_id, "engine_error")
            _stored_with_why(http, stopped_id, "engine_error")
            assert "shut down" in http.get(f"{CHAT}/{stopped_id}").json()["error"]["message"]


def test_each_api_key_sees_only_its_own_stored_items(tmp_path):
    store = tmp_path / "store.sqlite3"
    keys = ("key-for-ann", "key-for-bob")
    with run_server(tmp_path, "--store", str(store), "--embedding-model", "none",
                    "--api-key", keys[0], "--api-key", keys[1], api_key=None) as server:
        ann, bob = (openai.OpenAI(base_url=server.base_url, api_key=k, max_retries=0,
                                  timeout=120) for k in keys)
        ann_http, bob_http = (httpx.Client(base_url=server.url, timeout=120,
                                           headers={"Authorization": f"Bearer {k}"})
                              for k in keys)
        tag = uuid.uuid4().hex
        chat = stored(ann, "Hi", max_tokens=4, metadata={"tag": tag})
        streamed = stream_post(ann_http, CHAT, {
            "model": MODEL, "stream": True, "store": True, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}]})
        streamed_id = json.loads(streamed.events[0])["id"]
        response = ann.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
        running = ann.responses.create(model=MODEL, input="Write a long essay.",
                                       background=True, max_output_tokens=2000)
        # Bob finds none of Ann's items, live or stored, by any route.
        assert bob.chat.completions.list(metadata={"tag": tag}).data == []
        assert chat.id not in [c.id for c in bob.chat.completions.list()]
        for call in (lambda: bob.chat.completions.retrieve(chat.id),
                     lambda: bob.chat.completions.update(chat.id, metadata={"x": "y"}),
                     lambda: bob.chat.completions.messages.list(chat.id),
                     lambda: bob.chat.completions.delete(chat.id),
                     lambda: bob.responses.retrieve(response.id),
                     lambda: bob.responses.input_items.list(response.id),
                     lambda: bob.responses.delete(response.id),
                     lambda: bob.responses.retrieve(running.id),
                     lambda: bob.responses.cancel(running.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        for path in (f"{CHAT}/{streamed_id}", f"/v1/responses/{running.id}"):
            assert bob_http.get(path, params={"stream": "true"}).status_code == 404
        r = bob_http.get(f"{CHAT}", params={"after": chat.id})
        assert r.status_code == 400 and r.json()["error"]["param"] == "after"
        with pytest.raises(openai.NotFoundError) as err:
            bob.responses.create(model=MODEL, input="Go on.", previous_response_id=response.id,
                                 max_output_tokens=4)
        assert err.value.body["param"] == "previous_response_id"
        # Ann still has all of hers, untouched.
        assert ann.chat.completions.retrieve(chat.id).metadata == {"tag": tag}
        assert [c.id for c in ann.chat.completions.list(metadata={"tag": tag})] == [chat.id]
        assert ann.responses.create(model=MODEL, input="Go on.", max_output_tokens=4,
                                    previous_response_id=response.id).output_text
        with ann_http.stream("GET", f"{CHAT}/{streamed_id}", params={"stream": "true"}) as s:
            assert parse_numbered(s.read())[-1][1] == "[DONE]"
        assert ann.responses.cancel(running.id).status == "cancelled"
        ann_http.close()
        bob_http.close()
    raw = store.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("store.sqlite3-*"))
    assert not any(k.encode() in raw for k in keys)  # a hash of each key, never the key
