"""Store: stored Responses, stored chat completions and their events, kept in SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from llmserve.errors import InvalidRequest
from llmserve.store import Store, StoredChat, StoredResponse
from llmserve.store.store import RESTART_ERROR


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def opened(path: Path, **kwargs) -> AsyncIterator[Store]:
    store = Store(path, **kwargs)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def run(main: Callable[[], Awaitable[object]]) -> object:
    return asyncio.run(main())


def response(id: str, status: str = "completed", created_at: int = 1_000_000, **extra) -> dict:
    return {"id": id, "object": "response", "created_at": created_at, "status": status,
            "error": None, "output": [], **extra}


def chat(id: str, created: int = 1_000_000, model: str = "m", **metadata: str) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [], "metadata": metadata}


async def save_chat(store: Store, id: str, created: int = 1_000_000, model: str = "m",
                    **metadata: str) -> None:
    await store.save_chat(chat(id, created, model, **metadata),
                          messages=[{"id": f"{id}-0", "role": "user", "content": "hi"}],
                          metadata=metadata)


def ids(page: tuple[list[StoredChat], bool]) -> tuple[list[str], bool]:
    chats, more = page
    return [c.completion["id"] for c in chats], more


def rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "store.sqlite3"


# Responses


def test_response_round_trip_replace_and_update(path):
    items = [{"id": "msg_1", "type": "message", "role": "user", "content": "héllo ✓"}]
    context = [*items, {"id": "msg_2", "type": "message", "role": "assistant", "content": []}]

    async def main():
        async with opened(path) as store:
            assert await store.get_response("resp_1") is None
            await store.save_response(response("resp_1", "in_progress"), input_items=items,
                                      context=items)
            await store.save_response(response("resp_1"), input_items=items, context=context)
            got = await store.get_response("resp_1")
            assert got == StoredResponse(response("resp_1"), items, context)

            done = response("resp_1", "incomplete", usage={"total_tokens": 3})
            assert await store.update_response(done) is True
            got = await store.get_response("resp_1")
            assert got == StoredResponse(done, items, context)  # items kept
            assert await store.update_response(response("resp_nope")) is False
            assert await store.get_response("resp_nope") is None

    run(main)


def test_delete_response_deletes_its_events_only(path):
    async def main():
        async with opened(path) as store:
            await store.save_response(response("resp_1"), input_items=[], context=[])
            await store.append_events("resp_1", [(0, b"a"), (1, b"b")])
            await store.append_events("resp_2", [(0, b"other")])
            assert await store.delete_response("resp_1") is True
            assert await store.get_response("resp_1") is None
            assert await store.events("resp_1") == []
            assert await store.events("resp_2") == [(0, b"other")]
            assert await store.delete_response("resp_1") is False

    run(main)


def test_open_fails_responses_a_previous_process_left_unfinished(path):
    async def main():
        async with opened(path) as store:
            for status in ("queued", "in_progress", "completed", "failed", "cancelled"):
                await store.save_response(response(f"resp_{status}", status),
                                          input_items=[{"id": "i"}], context=[{"id": "c"}])
        async with opened(path) as store:
            return {s: await store.get_response(f"resp_{s}")
                    for s in ("queued", "in_progress", "completed", "failed", "cancelled")}

    got = run(main)
    for status in ("queued", "in_progress"):
        r = got[status].response
        assert r["status"] == "failed"
        assert r["error"] == {"code": "server_error",
                              "message": "The server restarted before this response finished."}
        assert r["error"] == RESTART_ERROR
        assert got[status].input_items == [{"id": "i"}]
    for status in ("completed", "failed", "cancelled"):
        assert got[status].response == response(f"resp_{status}", status)


# Events


def test_events_in_order_after_a_sequence_number_and_idempotent(path):
    async def main():
        async with opened(path) as store:
            await store.append_events("o", [(2, b"c"), (0, b"a")])
            await store.append_events("o", [(1, b"b"), (2, b"C again")])  # 2: already saved
            await store.append_events("o", [])
            await store.append_events("o", [(3, bytearray(b"\x00\xff"))])
            return (await store.events("o"), await store.events("o", after=1),
                    await store.events("o", after=3), await store.events("nobody"))

    every, after_1, after_3, nobody = run(main)
    assert every == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"\x00\xff")]
    assert all(type(data) is bytes for _, data in every)
    assert after_1 == [(2, b"c"), (3, b"\x00\xff")]
    assert after_3 == nobody == []


# Chat completions


def test_chat_round_trip_and_replace(path):
    async def main():
        async with opened(path) as store:
            assert await store.get_chat("chatcmpl-1") is None
            await save_chat(store, "chatcmpl-1", team="a")
            got = await store.get_chat("chatcmpl-1")
            assert got == StoredChat(chat("chatcmpl-1", team="a"),
                                     [{"id": "chatcmpl-1-0", "role": "user", "content": "hi"}],
                                     {"team": "a"})
            await save_chat(store, "chatcmpl-1", model="other")
            got = await store.get_chat("chatcmpl-1")
            assert got.completion["model"] == "other" and got.metadata == {}
            assert ids(await store.list_chats(model="m")) == ([], False)

    run(main)


def test_list_chats_pages_in_both_orders(path):
    # created ties are ordered by id.
    order = ["c-a", "c-b", "c-c", "c-d", "c-e"]
    created = {"c-a": 1, "c-b": 2, "c-c": 2, "c-d": 3, "c-e": 5}

    async def main():
        async with opened(path) as store:
            for id in reversed(order):
                await save_chat(store, id, created[id])
            pages = {}
            for direction in ("asc", "desc"):
                got, after = [], None
                while True:
                    page, more = ids(await store.list_chats(after=after, limit=2,
                                                            order=direction))
                    pages.setdefault(direction, []).append((page, more))
                    got += page
                    if not more:
                        break
                    after = page[-1]
            everything = ids(await store.list_chats(limit=5))
            beyond = ids(await store.list_chats(limit=6))
            default = ids(await store.list_chats())
            last = ids(await store.list_chats(after="c-e"))
            return pages, everything, beyond, default, last

    pages, everything, beyond, default, last = run(main)
    assert pages["asc"] == [(["c-a", "c-b"], True), (["c-c", "c-d"], True), (["c-e"], False)]
    assert pages["desc"] == [(["c-e", "c-d"], True), (["c-c", "c-b"], True), (["c-a"], False)]
    assert everything == beyond == default == (order, False)
    assert last == ([], False)


def test_list_chats_filters_by_model_and_metadata(path):
    async def main():
        async with opened(path) as store:
            await save_chat(store, "c1", 1, "m1", team="a", env="prod")
            await save_chat(store, "c2", 2, "m2", team="a", env="dev")
            await save_chat(store, "c3", 3, "m1", team="b", env="prod")
            await save_chat(store, "c4", 4, "m1", **{'odd."key$': "x"})
            await save_chat(store, "c5", 5, "m1")
            return [
                ids(await store.list_chats(model="m1")),
                ids(await store.list_chats(metadata={"team": "a"})),
                ids(await store.list_chats(metadata={"team": "a", "env": "prod"})),
                ids(await store.list_chats(model="m2", metadata={"env": "prod"})),
                ids(await store.list_chats(metadata={'odd."key$': "x"})),
                ids(await store.list_chats(metadata={})),
                ids(await store.list_chats(model="m1", limit=1, after="c1")),
                ids(await store.list_chats(model="m1", after="c2")),  # cursor need not match
                ids(await store.list_chats(metadata={"env": "prod"}, order="desc", limit=1)),
            ]

    assert run(main) == [
        (["c1", "c3", "c4", "c5"], False),
        (["c1", "c2"], False),
        (["c1"], False),
        ([], False),
        (["c4"], False),
        (["c1", "c2", "c3", "c4", "c5"], False),
        (["c3"], True),
        (["c3", "c4", "c5"], False),
        (["c3"], True),
    ]


def test_list_chats_rejects_an_unknown_cursor_and_bad_arguments(path):
    async def main():
        async with opened(path) as store:
            with pytest.raises(InvalidRequest, match="chatcmpl-nope") as info:
                await store.list_chats(after="chatcmpl-nope")
            assert info.value.param == "after"
            with pytest.raises(ValueError):
                await store.list_chats(order="sideways")
            with pytest.raises(ValueError):
                await store.list_chats(limit=0)

    run(main)


def test_update_chat_metadata_replaces_it_everywhere(path):
    async def main():
        async with opened(path) as store:
            await save_chat(store, "c1", team="a", env="dev")
            updated = await store.update_chat_metadata("c1", {"team": "b"})
            assert updated.metadata == {"team": "b"}
            assert updated.completion["metadata"] == {"team": "b"}
            assert updated.messages[0]["id"] == "c1-0"
            assert await store.update_chat_metadata("c-nope", {"x": "y"}) is None
            assert ids(await store.list_chats(metadata={"team": "a"})) == ([], False)
            assert ids(await store.list_chats(metadata={"team": "b"})) == (["c1"], False)
        async with opened(path) as store:
            return await store.get_chat("c1")

    assert run(main).metadata == {"team": "b"}


def test_delete_chat_deletes_its_events(path):
    async def main():
        async with opened(path) as store:
            await save_chat(store, "c1")
            await store.append_events("c1", [(0, b"data: {}\n\n")])
            assert await store.delete_chat("c1") is True
            assert await store.delete_chat("c1") is False
            assert await store.get_chat("c1") is None
            assert await store.events("c1") == []
            assert ids(await store.list_chats()) == ([], False)

    run(main)
    assert rows(path, "events") == rows(path, "chats") == 0


# Expiry


def test_expired_items_are_invisible_then_purged_with_their_events(path):
    clock = Clock(1000.0)

    async def main():
        async with opened(path, ttl=10, clock=clock) as store:
            await store.save_response(response("r-old", created_at=1000), input_items=[],
                                      context=[])
            await store.save_response(response("r-new", created_at=1005), input_items=[],
                                      context=[])
            await save_chat(store, "c-old", 1000)
            await save_chat(store, "c-new", 1005)
            await store.append_events("r-old", [(0, b"x")])
            await store.append_events("c-old", [(0, b"y")])
            await store.append_events("never-saved", [(0, b"z")])  # expires at 1010 itself
            clock.now = 1009.9
            assert await store.get_response("r-old") is not None
            assert ids(await store.list_chats()) == (["c-old", "c-new"], False)
            assert await store.purge_expired() == 0

            clock.now = 1010.0
            assert await store.get_response("r-old") is None
            assert await store.get_chat("c-old") is None
            assert await store.get_response("r-new") is not None
            assert ids(await store.list_chats()) == (["c-new"], False)
            assert await store.update_chat_metadata("c-old", {}) is None
            assert await store.events("never-saved") == []
            assert await store.delete_response("r-old") is False  # gone already, for readers
            assert rows(path, "responses") == 1 and rows(path, "chats") == 2

            assert await store.purge_expired() == 1  # c-old; r-old was deleted above
            assert rows(path, "events") == 0
            assert rows(path, "chats") == 1

    run(main)


def test_no_ttl_keeps_everything(path):
    clock = Clock(0)

    async def main():
        async with opened(path, clock=clock) as store:
            await store.save_response(response("r", created_at=0), input_items=[], context=[])
            await save_chat(store, "c", 0)
            await store.append_events("r", [(0, b"x")])
            clock.now = 1e12
            assert await store.purge_expired() == 0
            assert await store.get_response("r") is not None
            assert await store.get_chat("c") is not None
            assert await store.events("r") == [(0, b"x")]

    run(main)


def test_open_purges_what_expired_while_closed(path):
    clock = Clock(1000.0)

    async def main():
        async with opened(path, ttl=60, clock=clock) as store:
            await store.save_response(response("r", "queued", created_at=1000), input_items=[],
                                      context=[])
            await store.append_events("r", [(0, b"x")])
        clock.now = 2000.0
        async with opened(path, ttl=60, clock=clock):
            pass

    run(main)
    assert rows(path, "responses") == rows(path, "events") == 0


def test_run_purger_purges_periodically_and_stops_when_cancelled(path):
    clock = Clock(1000.0)

    async def main():
        async with opened(path, ttl=1, clock=clock) as store:
            await save_chat(store, "c", 1000)
            purger = asyncio.create_task(store.run_purger(every=0.01))
            await asyncio.sleep(0.05)
            assert rows(path, "chats") == 1
            clock.now = 1001.0
            for _ in range(200):
                if rows(path, "chats") == 0:
                    break
                await asyncio.sleep(0.01)
            purger.cancel()
            with pytest.raises(asyncio.CancelledError):
                await purger
            assert rows(path, "chats") == 0

    run(main)


# The database as a whole


def test_everything_survives_close_and_reopen(path):
    async def main():
        async with opened(path) as store:
            await store.save_response(response("r"), input_items=[{"id": "i"}],
                                      context=[{"id": "i"}, {"id": "o"}])
            await save_chat(store, "c", team="a")
            await store.append_events("r", [(0, b"e0"), (1, b"e1")])
        async with opened(path) as store:
            return (await store.get_response("r"), await store.get_chat("c"),
                    await store.events("r"))

    r, c, events = run(main)
    assert r == StoredResponse(response("r"), [{"id": "i"}], [{"id": "i"}, {"id": "o"}])
    assert c.metadata == {"team": "a"}
    assert events == [(0, b"e0"), (1, b"e1")]


def test_many_tasks_at_once(path):
    async def writer(store: Store, n: int) -> None:
        await save_chat(store, f"c{n:03d}", n, model=f"m{n % 3}")
        for seq in range(5):
            await store.append_events(f"c{n:03d}", [(seq, f"{n}:{seq}".encode())])
        await store.save_response(response(f"r{n}"), input_items=[], context=[])
        assert (await store.get_chat(f"c{n:03d}")).completion["created"] == n

    async def main():
        async with opened(path) as store:
            await asyncio.gather(*(writer(store, n) for n in range(100)))
            everything = ids(await store.list_chats(limit=1000))
            m0 = ids(await store.list_chats(model="m0", limit=1000))
            events = await asyncio.gather(*(store.events(f"c{n:03d}") for n in range(100)))
            return everything, m0, events

    everything, m0, events = run(main)
    assert everything == ([f"c{n:03d}" for n in range(100)], False)
    assert m0 == ([f"c{n:03d}" for n in range(0, 100, 3)], False)
    assert all(e == [(s, f"{n}:{s}".encode()) for s in range(5)] for n, e in enumerate(events))
    assert rows(path, "responses") == 100


def test_calls_on_a_closed_store_fail_clearly(path):
    from llmserve.store import StoreError

    async def main():
        store = Store(path)
        with pytest.raises(StoreError, match="not open"):
            await store.get_chat("c")
        await store.open()
        await store.close()
        with pytest.raises(StoreError, match="not open"):
            await store.save_response(response("r"), input_items=[], context=[])

    run(main)


# Owners


def test_each_key_hash_sees_only_its_own_items(path):
    async def main():
        async with opened(path) as store:
            await store.save_response(response("r1"), input_items=[], context=[],
                                      key_hash="ann")
            await store.save_chat(chat("c1"), messages=[], metadata={}, key_hash="ann")
            await store.append_events("c1", [(0, b"data: {}\n\n")])
            assert await store.get_response("r1", "bob") is None
            assert await store.get_chat("c1", "bob") is None
            assert await store.get_chat("c1") is None  # nor the server without keys
            assert ids(await store.list_chats(key_hash="bob")) == ([], False)
            with pytest.raises(InvalidRequest):  # another key's id is no cursor either
                await store.list_chats(after="c1", key_hash="bob")
            assert await store.update_chat_metadata("c1", {"k": "v"}, "bob") is None
            assert await store.delete_chat("c1", "bob") is False
            assert await store.delete_response("r1", "bob") is False
            # Ann's are all there, untouched.
            assert (await store.get_response("r1", "ann")) is not None
            assert (await store.get_chat("c1", "ann")).metadata == {}
            assert ids(await store.list_chats(key_hash="ann")) == (["c1"], False)
            assert await store.events("c1") == [(0, b"data: {}\n\n")]
            assert await store.delete_chat("c1", "ann") is True

    run(main)


def test_items_stored_before_owners_belong_to_the_server_without_keys(path):
    from llmserve.store.db import migrate
    from llmserve.store.schema import MIGRATIONS

    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, MIGRATIONS[:1])
    conn.execute("INSERT INTO chats (id, created, model, completion, messages, metadata)"
                 " VALUES ('old', 1, 'm', '{\"id\": \"old\"}', '[]', '{}')")
    conn.close()

    async def main():
        async with opened(path) as store:
            assert (await store.get_chat("old")).completion == {"id": "old"}
            assert await store.get_chat("old", "ann") is None

    run(main)
