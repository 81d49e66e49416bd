"""SQLite: numbered migrations, WAL, and the job rows every request leaves behind."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

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
)


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class JobOrigin:
    """Who asked for a job, and where; plain ids so no Discord object leaks past the cogs."""

    user_id: int
    user_name: str
    guild_id: int | None
    channel_id: int | None
    command: str
    interaction_id: int | None = None


class Database:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, path: Path | str) -> Database:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path)
        conn.row_factory = aiosqlite.Row
        db = cls(conn)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=5000")
        await db.migrate()
        return db

    async def close(self) -> None:
        await self.conn.close()

    async def __aenter__(self) -> Database:
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

    # -- jobs ---------------------------------------------------------------------------------

    async def create_job(
        self,
        origin: JobOrigin,
        params: Mapping[str, Any],
        *,
        status: str = "queued",
        reason: str | None = None,
        error: str | None = None,
    ) -> int:
        now = utcnow()
        final = status in FINAL_STATUSES
        cur = await self.conn.execute(
            """INSERT INTO jobs (guild_id, channel_id, user_id, user_name, command, prompt,
                   negative_prompt, model, width, height, steps, guidance, seed, params, status,
                   reason, error, interaction_id, queued_at, finished_at, mode, count)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                origin.guild_id,
                origin.channel_id,
                origin.user_id,
                origin.user_name,
                origin.command,
                str(params.get("prompt") or ""),
                str(params.get("negative_prompt") or ""),
                params.get("model"),
                params.get("width"),
                params.get("height"),
                params.get("steps"),
                params.get("guidance"),
                params.get("seed"),
                json.dumps(dict(params), default=str),
                status,
                reason,
                error,
                origin.interaction_id,
                now,
                now if final else None,
                str(params.get("mode") or "txt2img"),
                params["count"] if isinstance(params.get("count"), int) else 1,
            ),
        )
        await self.conn.commit()
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def record_rejected(
        self, origin: JobOrigin, params: Mapping[str, Any], reason: str, error: str
    ) -> int:
        return await self.create_job(origin, params, status="rejected", reason=reason, error=error)

    async def mark_running(self, job_id: int) -> None:
        await self.conn.execute(
            "UPDATE jobs SET status='running', started_at=? WHERE id=? AND status='queued'",
            (utcnow(), job_id),
        )
        await self.conn.commit()

    async def mark_done(
        self,
        job_id: int,
        status: str,
        *,
        reason: str | None = None,
        error: str | None = None,
        gpu_seconds: float | None = None,
    ) -> None:
        if status not in FINAL_STATUSES:
            raise ValueError(f"{status!r} is not a final status")
        now = utcnow()
        row = await self.get_job(job_id)
        duration = None
        if row is not None and row["started_at"]:
            duration = (_parse_time(now) - _parse_time(row["started_at"])).total_seconds()
        await self.conn.execute(
            """UPDATE jobs SET status=?, reason=?, error=?, finished_at=?, duration_s=?,
                   gpu_seconds=? WHERE id=? AND status IN ('queued', 'running')""",
            (status, reason, error, now, duration, gpu_seconds, job_id),
        )
        await self.conn.commit()

    async def set_message_id(self, job_id: int, message_id: int) -> None:
        """The Discord message holding a job's result, for buttons and /history links."""
        await self.conn.execute("UPDATE jobs SET message_id=? WHERE id=?", (message_id, job_id))
        await self.conn.commit()

    async def interrupt_unfinished(self) -> int:
        """Close out rows a previous process left queued/running (a crash or kill -9)."""
        cur = await self.conn.execute(
            """UPDATE jobs SET status='interrupted', reason='restart',
                   error='The bot restarted before this job finished.', finished_at=?
               WHERE status IN ('queued', 'running')""",
            (utcnow(),),
        )
        await self.conn.commit()
        return cur.rowcount

    async def record_model_load(
        self,
        *,
        model: str,
        source: str,
        ok: bool,
        seconds: float,
        memory_mb: float | None = None,
        error: str | None = None,
    ) -> None:
        await self.conn.execute(
            """INSERT INTO model_loads (model, source, ok, seconds, memory_mb, error, loaded_at)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (model, source, int(ok), seconds, memory_mb, error, utcnow()),
        )
        await self.conn.commit()

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

    async def get_job(self, job_id: int) -> aiosqlite.Row | None:
        async with self.conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)) as cur:
            return await cur.fetchone()

    async def list_jobs(
        self, *, user_id: int | None = None, limit: int = 50
    ) -> list[aiosqlite.Row]:
        sql = "SELECT * FROM jobs"
        args: tuple[Any, ...] = ()
        if user_id is not None:
            sql += " WHERE user_id=?"
            args = (user_id,)
        sql += " ORDER BY id DESC LIMIT ?"
        async with self.conn.execute(sql, (*args, limit)) as cur:
            return list(await cur.fetchall())
