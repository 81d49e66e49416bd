"""Job rows, one per request whatever became of it: created, rejected, running, done or
interrupted by a restart; their parameters, Discord message and saved outputs; the usage and
stats queries over them, the input pictures they used, retention, and the model-load log."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import aiosqlite

from bot.backend import JobOrigin
from bot.db.connection import FINAL_STATUSES, BaseDatabase, parse_stamp, utc_stamp
from bot.input_store import is_sha256
from bot.jobs import MAX_PROMPT_CHARS


class Usage(NamedTuple):
    images: int  # finished since the given time
    pending: int  # queued or running, whenever asked for
    gpu_seconds: float  # since the given time
    last_queued: str | None  # stamp of the latest accepted job, ever (for cooldowns)


#: How many members and models /stats names.
TOP_MEMBERS = 5
TOP_MODELS = 3


class Stats(NamedTuple):
    """A server's usage over a period; refused requests count only in `refused`."""

    per_day: list[tuple[str, str, int]]  # (YYYY-MM-DD, mode, jobs)
    top_members: list[tuple[str, int]]  # (name, jobs), most first
    top_models: list[tuple[str, int]]
    jobs: int
    images: int  # of finished jobs
    gpu_seconds: float
    failed: int
    refused: int


#: A refused request is stored as it came, so it is bounded here: it was never validated.
MAX_STORED_TEXT = MAX_PROMPT_CHARS
MAX_STORED_KEYS = 32
MAX_STORED_ERROR = 2000


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters of a refused request, cut to a bounded size: strings and keys clipped,
    other values kept when their JSON is short, else stored as clipped JSON text."""
    out: dict[str, Any] = {}
    for key, value in list(params.items())[:MAX_STORED_KEYS]:
        if isinstance(value, str):
            value = clip(value, MAX_STORED_TEXT)
        elif not (value is None or isinstance(value, (bool, int, float))):
            text = json.dumps(value, default=str)
            value = value if len(text) <= MAX_STORED_TEXT else clip(text, MAX_STORED_TEXT)
        out[clip(str(key), 64)] = value
    return out


class JobsMixin(BaseDatabase):
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
        now = utc_stamp()
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
        return await self.create_job(
            origin,
            bounded_params(params),
            status="rejected",
            reason=clip(str(reason), 64),
            error=clip(str(error), MAX_STORED_ERROR),
        )

    async def mark_running(self, job_id: int) -> None:
        await self.conn.execute(
            "UPDATE jobs SET status='running', started_at=? WHERE id=? AND status='queued'",
            (utc_stamp(), job_id),
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
        now = utc_stamp()
        row = await self.get_job(job_id)
        duration = None
        if row is not None and row["started_at"]:
            duration = (parse_stamp(now) - parse_stamp(row["started_at"])).total_seconds()
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
            (utc_stamp(),),
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
            (model, source, int(ok), seconds, memory_mb, error, utc_stamp()),
        )
        await self.conn.commit()

    async def get_job(self, job_id: int) -> aiosqlite.Row | None:
        """Any job row by id: for the executor and admin tools. What members name by id is
        looked up with `get_job_in`."""
        async with self.conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)) as cur:
            return await cur.fetchone()

    async def get_job_in(
        self, job_id: int, *, guild_id: int | None, user_id: int
    ) -> aiosqlite.Row | None:
        """A job row as seen from one server: one of `guild_id`'s jobs, or in DMs
        (`guild_id` None) one of `user_id`'s own DM jobs; None for any other id."""
        if guild_id is not None:
            sql, args = "SELECT * FROM jobs WHERE id=? AND guild_id=?", (job_id, guild_id)
        else:
            sql = "SELECT * FROM jobs WHERE id=? AND guild_id IS NULL AND user_id=?"
            args = (job_id, user_id)
        async with self.conn.execute(sql, args) as cur:
            return await cur.fetchone()

    async def jobs_of(
        self, user_id: int, guild_id: int | None, *, active: bool = False, limit: int = 50
    ) -> list[aiosqlite.Row]:
        """One member's jobs in one server (`guild_id` None: their DM jobs only), newest
        first; with `active`, only the queued and running ones."""
        sql = "SELECT * FROM jobs WHERE user_id=? AND guild_id IS ?"
        if active:
            sql += " AND status IN ('queued', 'running')"
        async with self.conn.execute(
            f"{sql} ORDER BY id DESC LIMIT ?", (user_id, guild_id, limit)
        ) as cur:
            return list(await cur.fetchall())

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

    # -- usage --------------------------------------------------------------------------------

    async def usage_since(self, guild_id: int, user_id: int, since: str) -> Usage:
        """A user's usage since `since`, and their images still queued or running.

        One statement, so one snapshot: read in two, a job finishing in between would be
        counted neither as pending nor as finished, and a burst could pass the quota."""
        sql = """SELECT COALESCE(SUM(CASE WHEN status='finished' AND queued_at >= ?
                                          THEN count ELSE 0 END), 0),
                        COALESCE(SUM(CASE WHEN status IN ('queued', 'running')
                                          THEN count ELSE 0 END), 0),
                        COALESCE(SUM(CASE WHEN queued_at >= ?
                                            AND status IN ('queued', 'running', 'finished')
                                          THEN gpu_seconds ELSE 0 END), 0),
                        MAX(queued_at)
                 FROM jobs WHERE guild_id=? AND user_id=? AND status != 'rejected'"""
        params = (since, since, guild_id, user_id)
        async with self.conn.execute(sql, params) as cur:
            row = await cur.fetchone()
        assert row is not None
        return Usage(int(row[0]), int(row[1]), float(row[2]), row[3])

    async def stats(self, guild_id: int, since: str) -> Stats:
        """A server's usage since `since`, counted by SQLite: a busy server's month is many
        thousands of rows, which would be a long loop on the event loop."""
        where = "guild_id=? AND queued_at >= ?"
        accepted = f"{where} AND status != 'rejected'"
        params = (guild_id, since)
        totals = f"""SELECT COALESCE(SUM(status != 'rejected'), 0),
                            COALESCE(SUM(CASE WHEN status='finished' THEN COALESCE(count, 1)
                                              ELSE 0 END), 0),
                            COALESCE(SUM(CASE WHEN status != 'rejected'
                                              THEN COALESCE(gpu_seconds, 0) ELSE 0 END), 0),
                            COALESCE(SUM(status='failed'), 0),
                            COALESCE(SUM(status='rejected'), 0)
                     FROM jobs WHERE {where}"""
        async with self.conn.execute(totals, params) as cur:
            row = await cur.fetchone()
        assert row is not None
        per_day = f"""SELECT substr(queued_at, 1, 10) AS day, mode, COUNT(*) FROM jobs
                      WHERE {accepted} GROUP BY day, mode"""
        member = "COALESCE(NULLIF(user_name, ''), CAST(user_id AS TEXT))"
        members = f"""SELECT {member} AS name, COUNT(*) AS n FROM jobs WHERE {accepted}
                      GROUP BY name ORDER BY n DESC, name LIMIT {TOP_MEMBERS}"""
        models = f"""SELECT COALESCE(NULLIF(model, ''), '?') AS name, COUNT(*) AS n FROM jobs
                     WHERE {accepted} GROUP BY name ORDER BY n DESC, name LIMIT {TOP_MODELS}"""
        lists = []
        for sql in (per_day, members, models):
            async with self.conn.execute(sql, params) as cur:
                lists.append([tuple(r) for r in await cur.fetchall()])
        return Stats(
            per_day=lists[0],
            top_members=lists[1],
            top_models=lists[2],
            jobs=int(row[0]),
            images=int(row[1]),
            gpu_seconds=float(row[2]),
            failed=int(row[3]),
            refused=int(row[4]),
        )

    async def set_outputs(self, job_id: int, paths: list[str]) -> None:
        await self.conn.execute("UPDATE jobs SET outputs=? WHERE id=?", (json.dumps(paths), job_id))
        await self.conn.commit()

    # -- input pictures -------------------------------------------------------------------------

    async def record_inputs(self, job_id: int, inputs: Iterable[tuple[str, str, str]]) -> None:
        """Name the input pictures a job used: (role, URL, SHA-256) with role image or mask."""
        rows = [(job_id, role, url, sha256) for role, url, sha256 in inputs]
        for _, _, _, sha256 in rows:
            # Retention turns these into paths to delete: only real hashes get in.
            if not is_sha256(sha256):
                raise ValueError(f"{sha256[:80]!r} is not a hex SHA-256")
        await self.conn.executemany(
            "INSERT OR REPLACE INTO job_inputs (job_id, role, url, sha256) VALUES (?, ?, ?, ?)",
            rows,
        )
        await self.conn.commit()

    async def input_for_url(self, url: str) -> str | None:
        """The hash of the picture a job took from `url`, the latest job's; None if none did.
        An attachment's bytes never change, so whatever row names the URL names its bytes."""
        sql = "SELECT sha256 FROM job_inputs WHERE url=? ORDER BY job_id DESC LIMIT 1"
        async with self.conn.execute(sql, (url,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def inputs_of(self, job_id: int) -> dict[str, str]:
        """Role -> hash of the input pictures a job used."""
        sql = "SELECT role, sha256 FROM job_inputs WHERE job_id=?"
        async with self.conn.execute(sql, (job_id,)) as cur:
            return {str(role): str(sha256) for role, sha256 in await cur.fetchall()}

    # -- retention ----------------------------------------------------------------------------

    async def prune(self, before: str) -> tuple[int, list[str]]:
        """Retention: drop finished-with rows older than `before`; returns how many, and the
        files only they named, for the caller to delete: their saved outputs, and the kept
        input pictures no remaining row uses (reruns share one copy)."""
        where = "queued_at < ? AND status NOT IN ('queued', 'running')"
        doomed = f"SELECT id FROM jobs WHERE {where}"
        async with self.conn.execute(
            f"SELECT outputs FROM jobs WHERE {where} AND outputs IS NOT NULL", (before,)
        ) as cur:
            files = [p for (raw,) in await cur.fetchall() for p in json.loads(raw)]
        async with self.conn.execute(
            f"""SELECT DISTINCT sha256 FROM job_inputs WHERE job_id IN ({doomed})
                AND sha256 NOT IN (SELECT sha256 FROM job_inputs WHERE job_id NOT IN ({doomed}))""",
            (before, before),
        ) as cur:
            unused = [str(sha256) for (sha256,) in await cur.fetchall()]
        # Explicit, not only ON DELETE CASCADE: a connection opened without foreign keys (the
        # sqlite3 shell) would otherwise leave rows that keep their files forever.
        await self.conn.execute(f"DELETE FROM job_inputs WHERE job_id IN ({doomed})", (before,))
        cur = await self.conn.execute(f"DELETE FROM jobs WHERE {where}", (before,))
        await self.conn.commit()
        if self.inputs is not None:
            files += [str(self.inputs.path(sha256)) for sha256 in unused]
        return cur.rowcount, files
