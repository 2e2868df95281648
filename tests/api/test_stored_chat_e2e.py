"""End-to-end: stored chat completions (`store: true`) as at OpenAI, and resumable chat
streams (our extension): a stored stream goes on when its client hangs up, and is followed
again from the event after `Last-Event-ID`."""

from __future__ import annotations

import json
import uuid

import openai
import pytest
from conftest import MODEL
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
