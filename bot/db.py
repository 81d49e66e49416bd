"""SQLite: numbered migrations, WAL, and the job rows every request leaves behind."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from bot.backend import JobOrigin

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
)


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


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

    async def merge_params(self, job_id: int, extra: Mapping[str, Any]) -> None:
        """Add facts to a job's stored parameters (e.g. where its input image came from)."""
        row = await self.get_job(job_id)
        if row is None:
            return
        params = {**json.loads(row["params"]), **extra}
        await self.conn.execute(
            "UPDATE jobs SET params=? WHERE id=?", (json.dumps(params, default=str), job_id)
        )
        await self.conn.commit()

    async def set_message_id(self, job_id: int, message_id: int) -> None:
        """The Discord message holding a job's result, for buttons and /history links."""
        await self.conn.execute("UPDATE jobs SET message_id=? WHERE id=?", (message_id, job_id))
        await self.conn.commit()

    async def interrupt_unfinished(self) -> list[aiosqlite.Row]:
        """Close out rows a previous process left queued/running (a crash or kill -9);
        returns them so their owners can be told."""
        async with self.conn.execute(
            "SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY id"
        ) as cur:
            stale = list(await cur.fetchall())
        await self.conn.execute(
            """UPDATE jobs SET status='interrupted', reason='restart',
                   error='The bot restarted before this job finished.', finished_at=?
               WHERE status IN ('queued', 'running')""",
            (utcnow(),),
        )
        await self.conn.commit()
        return stale

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
        self, *, user_id: int | None = None, guild_id: int | None = None, limit: int = 50
    ) -> list[aiosqlite.Row]:
        """Newest first."""
        clauses: list[str] = []
        args: list[Any] = []
        if user_id is not None:
            clauses.append("user_id=?")
            args.append(user_id)
        if guild_id is not None:
            clauses.append("guild_id=?")
            args.append(guild_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT * FROM jobs{where} ORDER BY id DESC LIMIT ?"
        async with self.conn.execute(sql, (*args, limit)) as cur:
            return list(await cur.fetchall())

    async def active_jobs(self) -> list[aiosqlite.Row]:
        """Queued and running jobs, oldest first."""
        sql = "SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY id"
        async with self.conn.execute(sql) as cur:
            return list(await cur.fetchall())

    # -- per-guild configuration ----------------------------------------------------------------

    async def guild_settings(self, guild_id: int) -> dict[str, str]:
        sql = "SELECT key, value FROM guild_settings WHERE guild_id=?"
        async with self.conn.execute(sql, (guild_id,)) as cur:
            return {str(k): str(v) for k, v in await cur.fetchall()}

    async def audit(
        self, guild_id: int, user_id: int, action: str, key: str = "",
        old: str | None = None, new: str | None = None,
    ) -> None:  # fmt: skip
        await self.conn.execute(
            "INSERT INTO audit_log (guild_id, user_id, action, key, old, new, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (guild_id, user_id, action, key, old, new, utcnow()),
        )

    async def set_guild_setting(
        self, guild_id: int, key: str, value: str | None, *, by: int
    ) -> str | None:
        """Set (or with None, reset) one setting; audited in the same transaction."""
        old = (await self.guild_settings(guild_id)).get(key)
        if value is None:
            await self.conn.execute(
                "DELETE FROM guild_settings WHERE guild_id=? AND key=?", (guild_id, key)
            )
        else:
            await self.conn.execute(
                "INSERT INTO guild_settings (guild_id, key, value) VALUES (?, ?, ?)"
                " ON CONFLICT(guild_id, key) DO UPDATE SET value=excluded.value",
                (guild_id, key, value),
            )
        await self.audit(guild_id, by, "reset" if value is None else "set", key, old, value)
        await self.conn.commit()
        return old

    async def list_values(self, table: str, column: str, guild_id: int) -> list[Any]:
        assert (table, column) in _LIST_TABLES, table
        sql = f"SELECT {column} FROM {table} WHERE guild_id=? ORDER BY {column}"
        async with self.conn.execute(sql, (guild_id,)) as cur:
            return [row[0] for row in await cur.fetchall()]

    async def add_value(
        self, table: str, column: str, guild_id: int, value: Any, *, by: int
    ) -> bool:
        assert (table, column) in _LIST_TABLES, table
        cur = await self.conn.execute(
            f"INSERT OR IGNORE INTO {table} (guild_id, {column}) VALUES (?, ?)", (guild_id, value)
        )
        if cur.rowcount:
            await self.audit(guild_id, by, f"add:{table}", column, None, str(value))
        await self.conn.commit()
        return bool(cur.rowcount)

    async def remove_value(
        self, table: str, column: str, guild_id: int, value: Any, *, by: int
    ) -> bool:
        assert (table, column) in _LIST_TABLES, table
        cur = await self.conn.execute(
            f"DELETE FROM {table} WHERE guild_id=? AND {column}=?", (guild_id, value)
        )
        if cur.rowcount:
            await self.audit(guild_id, by, f"remove:{table}", column, str(value), None)
        await self.conn.commit()
        return bool(cur.rowcount)

    async def ban(self, guild_id: int, user_id: int, reason: str, *, by: int) -> None:
        await self.conn.execute(
            "INSERT INTO bans (guild_id, user_id, reason, banned_by, banned_at)"
            " VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(guild_id, user_id) DO UPDATE SET reason=excluded.reason",
            (guild_id, user_id, reason, by, utcnow()),
        )
        await self.audit(guild_id, by, "ban", str(user_id), None, reason)
        await self.conn.commit()

    async def unban(self, guild_id: int, user_id: int, *, by: int) -> bool:
        cur = await self.conn.execute(
            "DELETE FROM bans WHERE guild_id=? AND user_id=?", (guild_id, user_id)
        )
        if cur.rowcount:
            await self.audit(guild_id, by, "unban", str(user_id))
        await self.conn.commit()
        return bool(cur.rowcount)

    async def ban_reason(self, guild_id: int, user_id: int) -> str | None:
        sql = "SELECT reason FROM bans WHERE guild_id=? AND user_id=?"
        async with self.conn.execute(sql, (guild_id, user_id)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def set_user_quota(
        self, guild_id: int, user_id: int, quota: int | None, *, by: int
    ) -> None:
        if quota is None:
            await self.conn.execute(
                "DELETE FROM user_quotas WHERE guild_id=? AND user_id=?", (guild_id, user_id)
            )
        else:
            await self.conn.execute(
                "INSERT INTO user_quotas (guild_id, user_id, daily_quota) VALUES (?, ?, ?)"
                " ON CONFLICT(guild_id, user_id) DO UPDATE SET daily_quota=excluded.daily_quota",
                (guild_id, user_id, quota),
            )
        await self.audit(
            guild_id, by, "quota", str(user_id), None, None if quota is None else str(quota)
        )
        await self.conn.commit()

    async def user_quota(self, guild_id: int, user_id: int) -> int | None:
        sql = "SELECT daily_quota FROM user_quotas WHERE guild_id=? AND user_id=?"
        async with self.conn.execute(sql, (guild_id, user_id)) as cur:
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def audit_entries(self, guild_id: int, limit: int = 10) -> list[aiosqlite.Row]:
        sql = "SELECT * FROM audit_log WHERE guild_id=? ORDER BY id DESC LIMIT ?"
        async with self.conn.execute(sql, (guild_id, limit)) as cur:
            return list(await cur.fetchall())

    # -- usage --------------------------------------------------------------------------------

    async def usage_since(
        self, guild_id: int, user_id: int, since: str
    ) -> tuple[int, float, str | None]:
        """(images, GPU seconds, time of the latest accepted job) of a user since `since`."""
        sql = """SELECT COALESCE(SUM(CASE WHEN status='finished' THEN count ELSE 0 END), 0),
                        COALESCE(SUM(gpu_seconds), 0),
                        (SELECT MAX(queued_at) FROM jobs WHERE guild_id=? AND user_id=?
                           AND status NOT IN ('rejected'))
                 FROM jobs WHERE guild_id=? AND user_id=? AND queued_at >= ?
                   AND status IN ('queued', 'running', 'finished')"""
        async with self.conn.execute(sql, (guild_id, user_id, guild_id, user_id, since)) as cur:
            row = await cur.fetchone()
        assert row is not None
        return int(row[0]), float(row[1]), row[2]

    async def pending_images(self, guild_id: int, user_id: int) -> int:
        sql = """SELECT COALESCE(SUM(count), 0) FROM jobs
                 WHERE guild_id=? AND user_id=? AND status IN ('queued', 'running')"""
        async with self.conn.execute(sql, (guild_id, user_id)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def stats_rows(self, guild_id: int, since: str) -> list[aiosqlite.Row]:
        sql = """SELECT substr(queued_at, 1, 10) AS day, mode, status, user_id, user_name, model,
                        count, gpu_seconds FROM jobs WHERE guild_id=? AND queued_at >= ?"""
        async with self.conn.execute(sql, (guild_id, since)) as cur:
            return list(await cur.fetchall())

    async def set_outputs(self, job_id: int, paths: list[str]) -> None:
        await self.conn.execute("UPDATE jobs SET outputs=? WHERE id=?", (json.dumps(paths), job_id))
        await self.conn.commit()

    async def prune(self, before: str) -> tuple[int, list[str]]:
        """Retention: drop finished-with rows older than `before`; returns how many, and the
        saved image files they pointed at (for the caller to delete)."""
        where = "queued_at < ? AND status NOT IN ('queued', 'running')"
        async with self.conn.execute(
            f"SELECT outputs FROM jobs WHERE {where} AND outputs IS NOT NULL", (before,)
        ) as cur:
            files = [p for (raw,) in await cur.fetchall() for p in json.loads(raw)]
        cur = await self.conn.execute(f"DELETE FROM jobs WHERE {where}", (before,))
        await self.conn.commit()
        return cur.rowcount, files


_LIST_TABLES = {("guild_channels", "channel_id"), ("blocked_words", "pattern")}
