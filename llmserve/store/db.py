"""One SQLite connection, owned by one worker thread, with versioned migrations.

sqlite3 blocks, so no query runs on the event loop. A single-thread executor (rather than
anyio's thread pool plus a lock) keeps the connection on the thread that opened it
(sqlite3's own same-thread check stays on) and queues calls in order without a lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from llmserve.errors import LLMServeError

T = TypeVar("T")


class StoreError(LLMServeError):
    """The database failed (or cannot be opened); the message says why."""

    code = "store_error"


class Database:
    def __init__(self, path: Path, migrations: Sequence[str]) -> None:
        self.path = path
        self._migrations = migrations
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        if self._executor is not None:
            raise StoreError("the store is already open")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llmserve-store")
        try:
            await self._call(self._connect)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.shield(asyncio.wrap_future(executor.submit(_translated, self._disconnect)))
        finally:
            executor.shutdown(wait=False)  # its queue is empty: the thread ends by itself

    async def run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        """`fn(connection)` in one transaction on the worker thread; `write` takes the write
        lock up front, so a read-then-write never fails halfway on another process's lock.

        Once called it runs to the end even if the caller is cancelled: a write is then
        either done or not, never unknown to the next caller."""

        def transact() -> T:
            assert self._conn is not None
            with transaction(self._conn, immediate=write):
                return fn(self._conn)

        return await self._call(transact)

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise StoreError("the store is not open")
        future = asyncio.wrap_future(self._executor.submit(_translated, fn))
        return await asyncio.shield(future)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: sqlite3 opens no transactions of its own; `transaction` does.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL stays consistent; fsync less
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA busy_timeout = 5000")  # another process writing: wait, not fail
            migrate(conn, self._migrations, name=str(self.path))
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def migrate(conn: sqlite3.Connection, migrations: Sequence[str], *, name: str = "database") -> int:
    """Apply the scripts after `PRAGMA user_version` (the number applied so far), all in one
    transaction: a failed migration leaves the database as it was. Returns the new version."""
    with transaction(conn, immediate=True):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(migrations):
            raise StoreError(
                f"{name} has schema version {version}, written by a newer llmserve; this one "
                f"knows versions up to {len(migrations)}. Upgrade llmserve, or use another "
                "--store file."
            )
        for number, script in enumerate(migrations[version:], start=version + 1):
            for statement in statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number:d}")
        return len(migrations)


def statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one by one: `executescript` would commit first."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement: {pending.strip()!r}")


@contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def _translated(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except sqlite3.Error as exc:
        raise StoreError(f"store database error: {exc}") from exc
