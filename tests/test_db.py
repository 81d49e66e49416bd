from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bot.backend import JobOrigin
from bot.db import MIGRATIONS, Database

ORIGIN = JobOrigin(user_id=1, user_name="ann", guild_id=2, channel_id=3, command="imagine")
SHA_A, SHA_B, SHA_C = (hashlib.sha256(s).hexdigest() for s in (b"a", b"b", b"c"))


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
        await db.record_inputs(row["id"], [("image", "https://cdn.discordapp.com/a", SHA_A)])
        assert await db.input_for_url("https://cdn.discordapp.com/a") == SHA_A
        assert await db.inputs_of(row["id"]) == {"image": SHA_A}


async def test_usage_and_quota_queries(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "x.db") as db:
        origin = JobOrigin(user_id=7, user_name="u", guild_id=9, channel_id=3, command="imagine")
        done = await db.create_job(origin, {"prompt": "a", "count": 3})
        await db.mark_running(done)
        await db.mark_done(done, "finished", gpu_seconds=2.5)
        await db.create_job(origin, {"prompt": "b", "count": 2})  # still queued
        await db.record_rejected(origin, {"prompt": "c", "count": 4}, "quota", "no")
        images, pending, gpu, last = await db.usage_since(9, 7, "2000-01-01")
        assert (images, pending, gpu) == (3, 2, 2.5) and last is not None
        assert await db.usage_since(9, 8, "2000-01-01") == (0, 0, 0.0, None)
        # Pending images count whenever they were asked for; finished ones only since then.
        later = await db.usage_since(9, 7, "2999-01-01")
        assert (later.images, later.pending, later.gpu_seconds) == (0, 2, 0.0)


async def test_stats_are_counted_by_sqlite(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "x.db") as db:

        async def job(user: str, status: str, gpu: float = 0.0, **params: object) -> int:
            origin = JobOrigin(
                user_id=len(user), user_name=user, guild_id=9, channel_id=3, command="imagine"
            )
            if status == "rejected":
                return await db.record_rejected(origin, {"prompt": "p"}, "quota", "no")
            job_id = await db.create_job(origin, {"prompt": "p", **params})
            if status != "queued":
                await db.mark_running(job_id)
                await db.mark_done(job_id, status, gpu_seconds=gpu)
            return job_id

        for _ in range(3):
            await job("ann", "finished", 1.5, count=2, model="m1")
        await job("bob", "failed", 0.5, mode="img2img", model="m2")
        await job("bob", "queued", mode="inpaint")
        await job("", "finished", 1.0)  # no name: the member's id (len("") == 0) stands in
        await job("ann", "rejected")
        await job("ann", "rejected")
        old = await job("cy", "finished", 9.0, model="m3")
        await db.conn.execute("UPDATE jobs SET queued_at='2000-01-01T00:00:00Z' WHERE id=?", (old,))
        elsewhere = JobOrigin(user_id=5, user_name="dee", guild_id=8, channel_id=3, command="x")
        await db.create_job(elsewhere, {"prompt": "p"})
        await db.conn.commit()

        stats = await db.stats(9, "2020-01-01T00:00:00.000Z")
        assert (stats.jobs, stats.images, stats.failed, stats.refused) == (6, 7, 1, 2)
        assert stats.gpu_seconds == 6.0
        assert stats.top_members == [("ann", 3), ("bob", 2), ("0", 1)]
        assert stats.top_models == [("m1", 3), ("?", 2), ("m2", 1)]
        today = {day for day, _, _ in stats.per_day}
        assert len(today) == 1
        assert sorted((mode, n) for _, mode, n in stats.per_day) == [
            ("img2img", 1),
            ("inpaint", 1),
            ("txt2img", 4),
        ]
        assert (await db.stats(9, "2999-01-01T00:00:00.000Z")).jobs == 0


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


async def test_input_pictures_are_named_by_hash_and_looked_up_by_url(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "x.db") as db:
        assert db.inputs is not None and db.inputs.root == tmp_path / "inputs"
        first = await db.create_job(ORIGIN, {"prompt": "p"})
        rerun = await db.create_job(ORIGIN, {"prompt": "p"})
        await db.record_inputs(first, [("image", "u1", SHA_A), ("mask", "u2", SHA_B)])
        await db.record_inputs(rerun, [("image", "u1", SHA_A)])
        assert await db.inputs_of(first) == {"image": SHA_A, "mask": SHA_B}
        assert await db.input_for_url("u2") == SHA_B
        assert await db.input_for_url("never used") is None
        # Retention turns hashes into paths: nothing else may be stored as one.
        with pytest.raises(ValueError, match="SHA-256"):
            await db.record_inputs(first, [("image", "u3", "../../etc/passwd")])
        with pytest.raises(sqlite3.IntegrityError):
            await db.record_inputs(first, [("thumbnail", "u3", SHA_C)])
        with pytest.raises(sqlite3.IntegrityError):
            await db.record_inputs(12345, [("image", "u3", SHA_C)])  # no such job
    async with await Database.open(":memory:") as memory:
        assert memory.inputs is None


async def test_prune_returns_the_kept_pictures_no_remaining_row_uses(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "x.db") as db:
        assert db.inputs is not None
        old = await db.create_job(ORIGIN, {"prompt": "old"})
        await db.mark_done(old, "finished")
        await db.set_outputs(old, ["/out/old.png"])
        await db.record_inputs(old, [("image", "u1", SHA_A), ("mask", "u2", SHA_B)])
        older = await db.create_job(ORIGIN, {"prompt": "older"})
        await db.mark_done(older, "finished")
        await db.record_inputs(older, [("image", "u1", SHA_A)])
        kept = await db.create_job(ORIGIN, {"prompt": "a rerun, still kept"})
        await db.mark_done(kept, "finished")
        await db.record_inputs(kept, [("image", "u1", SHA_A)])
        running = await db.create_job(ORIGIN, {"prompt": "running"})
        await db.record_inputs(running, [("image", "u3", SHA_C)])
        await db.conn.execute(
            "UPDATE jobs SET queued_at='2000-01-01T00:00:00.000Z' WHERE id IN (?, ?, ?)",
            (old, older, running),
        )
        await db.conn.commit()

        count, files = await db.prune("2001-01-01T00:00:00.000Z")
        # A is still used by the kept rerun, C by a job that is not finished: only B goes.
        assert count == 2
        assert sorted(files) == sorted(["/out/old.png", str(db.inputs.path(SHA_B))])
        assert [r["id"] for r in await db.list_jobs()] == [running, kept]
        assert await db.inputs_of(old) == {} and await db.inputs_of(kept) == {"image": SHA_A}

        await db.mark_done(running, "finished")
        await db.conn.execute("UPDATE jobs SET queued_at='2000-01-01T00:00:00.000Z'")
        await db.conn.commit()
        count, files = await db.prune("2001-01-01T00:00:00.000Z")
        assert count == 2
        assert sorted(files) == sorted(str(db.inputs.path(h)) for h in (SHA_A, SHA_C))
