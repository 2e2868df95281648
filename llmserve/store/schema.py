"""The database schema, as migrations: script N takes `PRAGMA user_version` from N-1 to N.

Append new scripts; never edit one that has shipped. JSON columns are TEXT (SQLite 3.45+
reads a BLOB given to its JSON functions as JSONB). `expires_at` is Unix seconds; NULL
keeps the row forever. `key_hash` is who made a response or chat completion: the SHA-256 (hex)
of the API key its request came with, '' on a server without keys; every read, change and
list of stored items is by it. (The events' `owner` is the response or chat they belong to.)
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: stored Responses, stored chat completions, and their streams' events.
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        status TEXT,  -- response["status"], kept apart to find unfinished ones at startup
        created_at REAL NOT NULL,
        expires_at REAL,
        response TEXT NOT NULL,
        input_items TEXT NOT NULL,
        context TEXT NOT NULL
    );
    CREATE INDEX responses_unfinished ON responses (status)
        WHERE status IN ('queued', 'in_progress');
    CREATE INDEX responses_expiry ON responses (expires_at) WHERE expires_at IS NOT NULL;

    CREATE TABLE chats (
        id TEXT PRIMARY KEY,
        created INTEGER NOT NULL,
        model TEXT NOT NULL,
        expires_at REAL,
        completion TEXT NOT NULL,
        messages TEXT NOT NULL,
        metadata TEXT NOT NULL
    );
    CREATE INDEX chats_order ON chats (created, id);
    CREATE INDEX chats_model ON chats (model, created, id);
    CREATE INDEX chats_expiry ON chats (expires_at) WHERE expires_at IS NOT NULL;

    -- No foreign key: an owner is a response or a chat completion, and its events may be
    -- written before it is saved. Deleting or purging an owner deletes its events; events
    -- whose owner was never saved expire on their own.
    CREATE TABLE events (
        owner TEXT NOT NULL,
        seq INTEGER NOT NULL,
        expires_at REAL,
        data BLOB NOT NULL,
        PRIMARY KEY (owner, seq)
    );
    CREATE INDEX events_expiry ON events (expires_at) WHERE expires_at IS NOT NULL;
    """,
    # 2: who made each stored item (items stored before it belong to the server without keys).
    """
    ALTER TABLE responses ADD COLUMN key_hash TEXT NOT NULL DEFAULT '';
    ALTER TABLE chats ADD COLUMN key_hash TEXT NOT NULL DEFAULT '';
    DROP INDEX chats_order;
    DROP INDEX chats_model;
    CREATE INDEX chats_order ON chats (key_hash, created, id);
    CREATE INDEX chats_model ON chats (key_hash, model, created, id);
    """,
)
