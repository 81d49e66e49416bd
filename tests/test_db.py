from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bot.backend import JobOrigin
from bot.db import MIGRATIONS, Database

ORIGIN = JobOrigin(user_id=1, user_name="ann", guild_id=2, channel_id=3, command="imagine")


async def test_migrations_create_the_schema_with_wal(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "sub" / "x.db")
    try:
        assert await db.schema_version() == len(MIGRATIONS)
        async with db.conn.execute("PRAGMA journal_mode") as cur:
            assert (await cur.fetchone())[0] == "wal"  # type: ignore[index]
    finally:
        await db.close()
    # Reopening applies nothing twice.
    db = await Database.open(tmp_path / "sub" / "x.db")
    assert await db.schema_version() == len(MIGRATIONS)
    await db.close()


async def test_a_job_goes_queued_running_finished(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "x.db") as db:
        job = await db.create_job(ORIGIN, {"prompt": "p", "seed": 5, "width": 64})
        assert (await db.get_job(job))["status"] == "queued"  # type: ignore[index]
        await db.mark_running(job)
        await db.mark_done(job, "finished")
        row = await db.get_job(job)
        assert row is not None
        assert row["status"] == "finished" and row["seed"] == 5 and row["width"] == 64
        assert row["duration_s"] is not None and row["duration_s"] >= 0
        # A final row is never reopened or overwritten.
        await db.mark_done(job, "failed", error="late")
        assert (await db.get_job(job))["status"] == "finished"  # type: ignore[index]
        with pytest.raises(ValueError):
            await db.mark_done(job, "running")


async def test_rows_left_by_a_crash_become_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with await Database.open(path) as db:
        queued = await db.create_job(ORIGIN, {"prompt": "a"})
        running = await db.create_job(ORIGIN, {"prompt": "b"})
        await db.mark_running(running)
        done = await db.create_job(ORIGIN, {"prompt": "c"})
        await db.mark_done(done, "finished")
    async with await Database.open(path) as db:
        assert [r["id"] for r in await db.interrupt_unfinished()] == [queued, running]
        statuses = {r["id"]: r["status"] for r in await db.list_jobs()}
    assert statuses == {queued: "interrupted", running: "interrupted", done: "finished"}


async def test_the_status_column_refuses_unknown_values(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "x.db") as db:
        with pytest.raises(sqlite3.IntegrityError):
            await db.create_job(ORIGIN, {"prompt": "p"}, status="lost")


async def test_meta_round_trip(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "x.db") as db:
        assert await db.get_meta("k") is None
        await db.set_meta("k", "1")
        await db.set_meta("k", "2")
        assert await db.get_meta("k") == "2"


@pytest.mark.parametrize("start", range(1, len(MIGRATIONS)))
async def test_migrating_from_every_earlier_version_keeps_the_rows(
    tmp_path: Path, start: int
) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for version in range(start):
        conn.executescript(MIGRATIONS[version])
    conn.execute(f"PRAGMA user_version = {start}")
    conn.execute(
        "INSERT INTO jobs (user_id, command, prompt, status, queued_at)"
        " VALUES (1, 'imagine', 'old', 'finished', 'x')"
    )
    conn.commit()
    conn.close()
    async with await Database.open(path) as db:
        assert await db.schema_version() == len(MIGRATIONS)
        [row] = await db.list_jobs()
        assert row["prompt"] == "old" and row["status"] == "finished"
        # The newest tables exist and work.
        await db.ban(5, 6, "r", by=1)
        assert await db.ban_reason(5, 6) == "r"


async def test_usage_and_quota_queries(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "x.db") as db:
        origin = JobOrigin(user_id=7, user_name="u", guild_id=9, channel_id=3, command="imagine")
        done = await db.create_job(origin, {"prompt": "a", "count": 3})
        await db.mark_running(done)
        await db.mark_done(done, "finished", gpu_seconds=2.5)
        await db.create_job(origin, {"prompt": "b", "count": 2})  # still queued
        await db.record_rejected(origin, {"prompt": "c", "count": 4}, "quota", "no")
        images, gpu, last = await db.usage_since(9, 7, "2000-01-01")
        assert (images, gpu) == (3, 2.5) and last is not None
        assert await db.pending_images(9, 7) == 2
        assert await db.usage_since(9, 8, "2000-01-01") == (0, 0.0, None)


# Names that exist, so without the check the SQL would run and read or write the wrong table.
BAD_NAMES = [("jobs", "prompt"), ("guild_channels", "pattern"), ("bans", "user_id")]


@pytest.mark.parametrize(("table", "column"), BAD_NAMES)
async def test_list_values_refuses_tables_and_columns_off_the_allow_list(
    tmp_path: Path, table: str, column: str
) -> None:
    async with await Database.open(tmp_path / "x.db") as db:
        await db.create_job(ORIGIN, {"prompt": "secret"})
        with pytest.raises(ValueError, match=table):
            await db.list_values(table, column, 2)
        with pytest.raises(ValueError, match=table):
            await db.add_value(table, column, 2, "x", by=1)
        with pytest.raises(ValueError, match=table):
            await db.remove_value(table, column, 2, "secret", by=1)
        # Nothing was written or deleted, not even an audit entry.
        assert [r["prompt"] for r in await db.list_jobs()] == ["secret"]
        assert await db.audit_entries(2) == []


def test_the_allow_list_holds_under_python_dash_o(tmp_path: Path) -> None:
    """`python -O` strips asserts, so the check must be a real raise."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from bot.db import Database

        async def main() -> None:
            async with await Database.open(sys.argv[1]) as db:
                calls = {
                    "list_values": lambda: db.list_values("jobs", "prompt", 2),
                    "add_value": lambda: db.add_value("jobs", "prompt", 2, "x", by=1),
                    "remove_value": lambda: db.remove_value("jobs", "prompt", 2, "x", by=1),
                }
                for name, call in calls.items():
                    try:
                        await call()
                    except ValueError:
                        continue
                    sys.exit(f"{name} ran SQL on a table off the allow-list")

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-O", "-c", script, str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
