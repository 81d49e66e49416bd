"""The one SQLite connection: opening it (WAL), the numbered migrations, the meta table, and
the UTC time stamps every stored row carries. The mixins in jobs.py, guilds.py and
api_keys.py add the queries for what they store on top of this."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import aiosqlite

from bot.input_store import InputStore

log = logging.getLogger(__name__)

# Terminal states: a job row must end in one of these, never stay queued/running.
FINAL_STATUSES = ("finished", "failed", "rejected", "cancelled", "interrupted")
STATUSES = ("queued", "running", *FINAL_STATUSES)

# Append only; each entry moves the schema from version i to i+1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE jobs (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        guild_id        INTEGER,
        channel_id      INTEGER,
        user_id         INTEGER NOT NULL,
        user_name       TEXT NOT NULL DEFAULT '',
        command         TEXT NOT NULL,
        prompt          TEXT NOT NULL DEFAULT '',
        negative_prompt TEXT NOT NULL DEFAULT '',
        model           TEXT,
        width           INTEGER,
        height          INTEGER,
        steps           INTEGER,
        guidance        REAL,
        seed            INTEGER,
        params          TEXT NOT NULL DEFAULT '{{}}',
        status          TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
        reason          TEXT,
        error           TEXT,
        interaction_id  INTEGER,
        queued_at       TEXT NOT NULL,
        started_at      TEXT,
        finished_at     TEXT,
        duration_s      REAL
    );
    CREATE INDEX jobs_user ON jobs (user_id, id);
    CREATE INDEX jobs_guild_time ON jobs (guild_id, queued_at);
    CREATE INDEX jobs_status ON jobs (status) WHERE status IN ('queued', 'running');
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    CREATE TABLE model_loads (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        model       TEXT NOT NULL,
        source      TEXT NOT NULL,
        ok          INTEGER NOT NULL,
        seconds     REAL NOT NULL,
        memory_mb   REAL,
        error       TEXT,
        loaded_at   TEXT NOT NULL
    );
    ALTER TABLE jobs ADD COLUMN mode TEXT NOT NULL DEFAULT 'txt2img';
    ALTER TABLE jobs ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN message_id INTEGER;
    ALTER TABLE jobs ADD COLUMN gpu_seconds REAL;
    """,
    """
    CREATE TABLE guild_settings (
        guild_id INTEGER NOT NULL,
        key      TEXT NOT NULL,
        value    TEXT NOT NULL,
        PRIMARY KEY (guild_id, key)
    );
    CREATE TABLE guild_channels (
        guild_id   INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        PRIMARY KEY (guild_id, channel_id)
    );
    CREATE TABLE blocked_words (
        guild_id INTEGER NOT NULL,
        pattern  TEXT NOT NULL,
        PRIMARY KEY (guild_id, pattern)
    );
    CREATE TABLE bans (
        guild_id  INTEGER NOT NULL,
        user_id   INTEGER NOT NULL,
        reason    TEXT NOT NULL DEFAULT '',
        banned_by INTEGER NOT NULL,
        banned_at TEXT NOT NULL,
        PRIMARY KEY (guild_id, user_id)
    );
    CREATE TABLE user_quotas (
        guild_id    INTEGER NOT NULL,
        user_id     INTEGER NOT NULL,
        daily_quota INTEGER NOT NULL,
        PRIMARY KEY (guild_id, user_id)
    );
    CREATE TABLE audit_log (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        guild_id INTEGER NOT NULL,
        user_id  INTEGER NOT NULL,
        action   TEXT NOT NULL,
        key      TEXT NOT NULL DEFAULT '',
        old      TEXT,
        new      TEXT,
        at       TEXT NOT NULL
    );
    CREATE INDEX audit_guild ON audit_log (guild_id, id);
    CREATE INDEX jobs_guild_user_time ON jobs (guild_id, user_id, queued_at);
    """,
    """
    ALTER TABLE jobs ADD COLUMN outputs TEXT;
    """,
    # The input pictures (and masks) a job used, by the hash they are kept under in the input
    # store: reruns read them there once Discord's signed URL has expired, and retention
    # deletes a file when the last row naming it goes.
    """
    CREATE TABLE job_inputs (
        job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        role   TEXT NOT NULL CHECK (role IN ('image', 'mask')),
        url    TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (job_id, role)
    );
    CREATE INDEX job_inputs_url ON job_inputs (url);
    CREATE INDEX job_inputs_sha256 ON job_inputs (sha256);
    """,
    # Keys of the HTTP API (bot/http_api): only the SHA-256 of each key is kept; `prefix` (the
    # key's first characters) tells a member's keys apart in /apikey list. A key acts as its
    # owner in its server, as if in the channel it was made in (and that channel's parent when
    # it was a thread, for the channel allow-list); `options` holds what the
    # client set through /sdapi/v1/options. API jobs are told apart by their command ("api:…").
    """
    CREATE TABLE api_keys (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        guild_id   INTEGER NOT NULL,
        user_id    INTEGER NOT NULL,
        user_name  TEXT NOT NULL DEFAULT '',
        channel_id INTEGER,
        parent_channel_id INTEGER,
        name       TEXT NOT NULL DEFAULT '',
        prefix     TEXT NOT NULL,
        key_hash   TEXT NOT NULL UNIQUE,
        options    TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        last_used  TEXT,
        revoked_at TEXT
    );
    CREATE INDEX api_keys_owner ON api_keys (guild_id, user_id);
    """,
)


def utc_stamp() -> str:
    """Now, as the ISO text stored in the TEXT time columns ("2024-05-01T12:00:00.000Z")."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_stamp(value: str) -> datetime:
    """The datetime of a stored stamp written by `utc_stamp`."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class BaseDatabase:
    """One aiosqlite connection and its schema; the mixins share it as `self.conn`."""

    def __init__(self, conn: aiosqlite.Connection, inputs: InputStore | None = None) -> None:
        self.conn = conn
        #: Where the input pictures its rows name are kept (None: not kept, for :memory:).
        self.inputs = inputs

    @classmethod
    async def open(cls, path: Path | str) -> Self:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path)
        conn.row_factory = aiosqlite.Row
        db = cls(conn, InputStore.beside(path))
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=5000")
        await db.migrate()
        return db

    async def close(self) -> None:
        await self.conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def schema_version(self) -> int:
        async with self.conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def migrate(self, target: int | None = None) -> None:
        target = len(MIGRATIONS) if target is None else target
        current = await self.schema_version()
        for version in range(current, target):
            log.info("migrating database to schema version %d", version + 1)
            # One transaction per migration: a crash never leaves a half-applied version.
            await self.conn.executescript(
                f"BEGIN; {MIGRATIONS[version]}; PRAGMA user_version = {version + 1}; COMMIT;"
            )

    async def get_meta(self, key: str) -> str | None:
        async with self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        await self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=?",
            (key, value, value),
        )
        await self.conn.commit()
