"""Stored Responses and stored chat completions, with their streams' events, in SQLite."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from llmserve.errors import InvalidRequest
from llmserve.store.db import Database, StoreError
from llmserve.store.schema import MIGRATIONS

log = logging.getLogger(__name__)

# What a response left queued or in progress by a previous server process becomes.
RESTART_ERROR = {
    "code": "server_error",
    "message": "The server restarted before this response finished.",
}
_UNFINISHED = "status IN ('queued', 'in_progress')"  # as in the responses_unfinished index
_LIVE = "(expires_at IS NULL OR expires_at > ?)"
_MINE = "key_hash = ?"  # the stored items of the key a request came with


@dataclass(frozen=True)
class StoredResponse:
    response: dict  # the OpenAI Response object as last saved
    input_items: list[dict]  # this request's own input items, each with an "id"
    context: list[dict]  # the conversation through this response's output


@dataclass(frozen=True)
class StoredChat:
    completion: dict  # the chat.completion object
    messages: list[dict]  # the request's messages, each with an "id"
    metadata: dict[str, str]


class Store:
    """Async access to the store file. `ttl` (seconds) bounds how long a saved item is
    kept, counted from its creation; None keeps it forever. Expired items are invisible at
    once and deleted by `purge_expired` (at `open`, and by `run_purger`).

    Each response and chat completion belongs to the `key_hash` it was saved with (a hash of
    the request's API key; '' without keys): reading, listing, changing and deleting it need
    the same `key_hash`, and another key's item is as good as absent."""

    def __init__(
        self, path: Path, *, ttl: float | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._db = Database(path, MIGRATIONS)
        self._ttl = ttl
        self._clock = clock

    @property
    def path(self) -> Path:
        return self._db.path

    async def open(self) -> None:
        """Connect and migrate, purge what expired, and fail the responses a previous server
        process left unfinished: a background response cannot outlive its server."""
        await self._db.open()
        try:
            await self.purge_expired()
            failed = await self._db.run(_fail_unfinished, write=True)
        except BaseException:
            await self._db.close()
            raise
        if failed:
            log.warning("%d stored response(s) left unfinished by the last run marked failed",
                        failed)

    async def close(self) -> None:
        await self._db.close()

    # Responses

    async def save_response(
        self, response: dict, *, input_items: list[dict], context: list[dict],
        key_hash: str = "",
    ) -> None:
        """Insert, or replace everything saved under `response["id"]` (but who made it)."""
        created = float(response["created_at"])
        row = (response["id"], response.get("status"), created, self._expiry(created),
               _dumps(response), _dumps(input_items), _dumps(context), key_hash)

        def save(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO responses (id, status, created_at, expires_at, response,"
                " input_items, context, key_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
                " created_at = excluded.created_at, expires_at = excluded.expires_at,"
                " response = excluded.response, input_items = excluded.input_items,"
                " context = excluded.context",
                row,
            )

        await self._db.run(save, write=True)

    async def update_response(self, response: dict) -> bool:
        """Replace only the Response object (a status change); False if none is saved."""
        params = (response.get("status"), _dumps(response), response["id"])

        def update(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE responses SET status = ?, response = ? WHERE id = ?",
                               params)
            return cur.rowcount > 0

        return await self._db.run(update, write=True)

    async def get_response(self, id: str, key_hash: str = "") -> StoredResponse | None:
        now = self._clock()

        def get(conn: sqlite3.Connection) -> StoredResponse | None:
            row = conn.execute(
                "SELECT response, input_items, context FROM responses"
                f" WHERE id = ? AND {_MINE} AND {_LIVE}",
                (id, key_hash, now),
            ).fetchone()
            return None if row is None else StoredResponse(*map(orjson.loads, row))

        return await self._db.run(get)

    async def delete_response(self, id: str, key_hash: str = "") -> bool:
        """Delete the response and its events; False if there was none (or it expired)."""
        return await self._delete("responses", id, key_hash)

    # Events of a response's or a chat completion's stream

    async def append_events(self, owner: str, events: list[tuple[int, bytes]]) -> None:
        """Save events by sequence number; one already saved under its number is kept, so a
        retried append is harmless."""
        expires = self._expiry(self._clock())
        rows = [(owner, seq, expires, bytes(data)) for seq, data in events]
        if not rows:
            return

        def append(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO events (owner, seq, expires_at, data) VALUES (?, ?, ?, ?)",
                rows,
            )

        await self._db.run(append, write=True)

    async def events(self, owner: str, after: int = -1) -> list[tuple[int, bytes]]:
        """The owner's events numbered above `after`, in order."""
        now = self._clock()

        def read(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
            return conn.execute(
                f"SELECT seq, data FROM events WHERE owner = ? AND seq > ? AND {_LIVE}"
                " ORDER BY seq",
                (owner, after, now),
            ).fetchall()

        return await self._db.run(read)

    # Chat completions

    async def save_chat(
        self, completion: dict, *, messages: list[dict], metadata: dict[str, str],
        key_hash: str = "",
    ) -> None:
        """Insert, or replace everything saved under `completion["id"]` (but who made it)."""
        created = int(completion["created"])
        row = (completion["id"], created, completion.get("model", ""), self._expiry(created),
               _dumps(completion), _dumps(messages), _dumps(metadata), key_hash)

        def save(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO chats (id, created, model, expires_at, completion, messages,"
                " metadata, key_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET created = excluded.created,"
                " model = excluded.model, expires_at = excluded.expires_at,"
                " completion = excluded.completion, messages = excluded.messages,"
                " metadata = excluded.metadata",
                row,
            )

        await self._db.run(save, write=True)

    async def get_chat(self, id: str, key_hash: str = "") -> StoredChat | None:
        now = self._clock()

        def get(conn: sqlite3.Connection) -> StoredChat | None:
            row = conn.execute(
                "SELECT completion, messages, metadata FROM chats"
                f" WHERE id = ? AND {_MINE} AND {_LIVE}",
                (id, key_hash, now),
            ).fetchone()
            return None if row is None else StoredChat(*map(orjson.loads, row))

        return await self._db.run(get)

    async def list_chats(
        self,
        *,
        model: str | None = None,
        metadata: dict[str, str] | None = None,
        after: str | None = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "asc",
        key_hash: str = "",
    ) -> tuple[list[StoredChat], bool]:
        """A page of chat completions ordered by (created, id), and whether more follow.
        `after` is the last id of the previous page (InvalidRequest if there is none such);
        `metadata` keeps those whose metadata has every given key with the given value."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        now = self._clock()
        where = [_MINE, _LIVE]
        params: list[Any] = [key_hash, now]
        if model is not None:
            where.append("model = ?")
            params.append(model)
        for key, value in (metadata or {}).items():
            # json_each, not json_extract: any key works without quoting it into a path.
            where.append("EXISTS (SELECT 1 FROM json_each(chats.metadata) AS m"
                         " WHERE m.key = ? AND m.value = ?)")
            params += [key, value]
        direction = "ASC" if order == "asc" else "DESC"

        def page(conn: sqlite3.Connection) -> tuple[list[StoredChat], bool]:
            conds, args = list(where), list(params)
            if after is not None:
                # The cursor row's own (created, id); it need not match the filters.
                cursor = conn.execute(f"SELECT created, id FROM chats WHERE id = ? AND {_MINE}",
                                      (after, key_hash)).fetchone()
                if cursor is None:
                    raise InvalidRequest(f"No chat completion found with id '{after}'.",
                                         param="after")
                conds.append("(created, id) > (?, ?)" if order == "asc"
                             else "(created, id) < (?, ?)")
                args.extend(cursor)
            rows = conn.execute(
                f"SELECT completion, messages, metadata FROM chats WHERE {' AND '.join(conds)}"
                f" ORDER BY created {direction}, id {direction} LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
            chats = [StoredChat(*map(orjson.loads, row)) for row in rows[:limit]]
            return chats, len(rows) > limit

        return await self._db.run(page)

    async def update_chat_metadata(
        self, id: str, metadata: dict[str, str], key_hash: str = ""
    ) -> StoredChat | None:
        """Replace the metadata (in the completion object too); None if no such chat."""
        now = self._clock()

        def update(conn: sqlite3.Connection) -> StoredChat | None:
            row = conn.execute(
                f"SELECT completion, messages FROM chats WHERE id = ? AND {_MINE} AND {_LIVE}",
                (id, key_hash, now),
            ).fetchone()
            if row is None:
                return None
            completion = orjson.loads(row[0])
            completion["metadata"] = metadata
            conn.execute("UPDATE chats SET completion = ?, metadata = ? WHERE id = ?",
                         (_dumps(completion), _dumps(metadata), id))
            return StoredChat(completion, orjson.loads(row[1]), dict(metadata))

        return await self._db.run(update, write=True)

    async def delete_chat(self, id: str, key_hash: str = "") -> bool:
        """Delete the chat completion and its events; False if there was none (or it expired)."""
        return await self._delete("chats", id, key_hash)

    # Expiry

    async def purge_expired(self) -> int:
        """Delete expired responses and chat completions with their events, and expired
        events whose owner was never saved. Returns how many responses and chats went."""
        now = self._clock()

        def purge(conn: sqlite3.Connection) -> int:
            gone = 0
            for table in ("responses", "chats"):
                expired = f"SELECT id FROM {table} WHERE expires_at <= ?"
                conn.execute(f"DELETE FROM events WHERE owner IN ({expired})", (now,))
                gone += conn.execute(f"DELETE FROM {table} WHERE expires_at <= ?",
                                     (now,)).rowcount
            conn.execute("DELETE FROM events WHERE expires_at <= ?", (now,))
            return gone

        return await self._db.run(purge, write=True)

    async def run_purger(self, every: float = 3600.0) -> None:
        """Purge every `every` seconds until cancelled (run it as a task for the app's life).
        A failed purge is logged and tried again next time."""
        while True:
            await asyncio.sleep(every)
            try:
                gone = await self.purge_expired()
            except StoreError:
                log.exception("purging expired stored items failed")
                continue
            if gone:
                log.info("purged %d expired stored item(s)", gone)

    # Helpers

    def _expiry(self, start: float) -> float | None:
        return None if self._ttl is None else start + self._ttl

    async def _delete(self, table: Literal["responses", "chats"], id: str, key_hash: str) -> bool:
        now = self._clock()

        def delete(conn: sqlite3.Connection) -> bool:
            row = conn.execute(f"SELECT {_LIVE} FROM {table} WHERE id = ? AND {_MINE}",
                               (now, id, key_hash)).fetchone()
            if row is None:  # none, or another key's: left alone
                return False
            conn.execute("DELETE FROM events WHERE owner = ?", (id,))
            conn.execute(f"DELETE FROM {table} WHERE id = ?", (id,))
            return bool(row[0])

        return await self._db.run(delete, write=True)


def _fail_unfinished(conn: sqlite3.Connection) -> int:
    rows = conn.execute(f"SELECT id, response FROM responses WHERE {_UNFINISHED}").fetchall()
    for id, raw in rows:
        response = orjson.loads(raw)
        response["status"] = "failed"
        response["error"] = dict(RESTART_ERROR)
        conn.execute("UPDATE responses SET status = ?, response = ? WHERE id = ?",
                     ("failed", _dumps(response), id))
    return len(rows)


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()
