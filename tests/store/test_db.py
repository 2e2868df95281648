"""Database: the worker thread's connection, its pragmas, and versioned migrations."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from llmserve.store.db import Database, StoreError, migrate, statements
from llmserve.store.schema import MIGRATIONS

ONE = "CREATE TABLE a (x INTEGER);"
TWO = "CREATE TABLE b (y TEXT);\nINSERT INTO a VALUES (1);"


def user_version(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def tables(path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_open_creates_the_directory_and_migrates_from_empty(tmp_path):
    path = tmp_path / "deep" / "er" / "store.sqlite3"

    async def main():
        db = Database(path, MIGRATIONS)
        await db.open()
        pragmas = await db.run(lambda c: [c.execute(f"PRAGMA {p}").fetchone()[0]
                                          for p in ("journal_mode", "synchronous", "foreign_keys")])
        await db.close()
        return pragmas

    assert asyncio.run(main()) == ["wal", 1, 1]  # synchronous 1: NORMAL
    assert user_version(path) == len(MIGRATIONS) >= 1
    assert {"responses", "chats", "events"} <= tables(path)


def test_migrations_apply_only_the_ones_not_yet_applied(tmp_path):
    path = tmp_path / "db.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, [ONE]) == 1
    assert migrate(conn, [ONE, TWO]) == 2  # ONE again would fail: table a exists
    assert migrate(conn, [ONE, TWO]) == 2
    assert conn.execute("SELECT x FROM a").fetchall() == [(1,)]
    conn.close()
    assert user_version(path) == 2


def test_a_failed_migration_leaves_the_database_as_it_was(tmp_path):
    path = tmp_path / "db.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, [ONE])
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, [ONE, "CREATE TABLE c (z);\nINSERT INTO nowhere VALUES (1);"])
    conn.close()
    assert user_version(path) == 1
    assert tables(path) == {"a"}


def test_a_database_from_a_newer_version_refuses_to_open(tmp_path):
    path = tmp_path / "db.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")

    async def main():
        db = Database(path, MIGRATIONS)
        with pytest.raises(StoreError, match="newer llmserve") as info:
            await db.open()
        assert str(path) in info.value.message
        with pytest.raises(StoreError, match="not open"):
            await db.run(lambda c: None)
        await db.open()  # still refused, and nothing was left half open by the first try

    with pytest.raises(StoreError, match="newer"):
        asyncio.run(main())
    assert user_version(path) == len(MIGRATIONS) + 1
    assert tables(path) == set()


def test_not_a_database_is_a_store_error(tmp_path):
    path = tmp_path / "db.sqlite3"
    path.write_bytes(b"not sqlite at all" * 100)

    async def main():
        with pytest.raises(StoreError, match="database"):
            await Database(path, MIGRATIONS).open()

    asyncio.run(main())


def test_sqlite_errors_become_store_errors_and_roll_back(tmp_path):
    async def main():
        db = Database(tmp_path / "db.sqlite3", [ONE])
        await db.open()

        def half(conn):
            conn.execute("INSERT INTO a VALUES (7)")
            conn.execute("INSERT INTO nowhere VALUES (1)")

        with pytest.raises(StoreError, match="nowhere"):
            await db.run(half, write=True)
        assert await db.run(lambda c: c.execute("SELECT count(*) FROM a").fetchone()[0]) == 0
        await db.close()
        await db.close()  # closing twice is harmless

    asyncio.run(main())


def test_every_query_runs_on_the_one_worker_thread_not_the_loop(tmp_path):
    import threading

    async def main():
        db = Database(tmp_path / "db.sqlite3", [ONE])
        await db.open()
        names = await asyncio.gather(*(db.run(lambda c: threading.current_thread().name)
                                       for _ in range(20)))
        await db.close()
        return set(names)

    (name,) = asyncio.run(main())
    assert name.startswith("llmserve-store") and name != threading.current_thread().name


def test_a_cancelled_caller_s_write_still_completes(tmp_path):
    async def main():
        db = Database(tmp_path / "db.sqlite3", [ONE])
        await db.open()

        def slow_insert(conn):
            time.sleep(0.2)
            conn.execute("INSERT INTO a VALUES (1)")

        task = asyncio.create_task(db.run(slow_insert, write=True))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Queued behind the write, so it sees it.
        count = await db.run(lambda c: c.execute("SELECT count(*) FROM a").fetchone()[0])
        await db.close()
        return count

    assert asyncio.run(main()) == 1


def test_statements_split_a_script_and_keep_triggers_whole():
    script = """
    CREATE TABLE t (x); -- a comment; with a semicolon
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN
        UPDATE t SET x = x + 1;
    END;
    INSERT INTO t VALUES (';');
    """
    parts = list(statements(script))
    assert len(parts) == 3
    assert parts[1].startswith("CREATE TRIGGER") and parts[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        list(statements("CREATE TABLE t (x)"))
