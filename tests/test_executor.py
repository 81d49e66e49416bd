"""The GPU executor on the real tiny model: order, cancellation, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.db import Database, JobOrigin
from bot.engine import Engine
from bot.errors import JobCancelled, QueueFull
from bot.executor import Failed, Finished, GpuExecutor, Job, Progress, Queued, Started
from bot.jobs import GenerationRequest

ORIGIN = JobOrigin(user_id=1, user_name="ann", guild_id=2, channel_id=3, command="imagine")


def req(prompt: str = "a cat", steps: int = 2, size: int = 64, **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, model="builtin:tiny", width=size, height=size, steps=steps, **kw
    )


class FlakyEngine:
    """The real engine, plus a fault: prompts containing 'boom' raise inside the GPU thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.threads: set[str] = set()

    def load(self, source: str) -> Any:
        return self.engine.load(source)

    def txt2img(self, request: GenerationRequest, *, on_step: Any = None) -> Any:
        self.threads.add(threading.current_thread().name)
        if "boom" in request.prompt:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.engine.txt2img(request, on_step=on_step)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "x.db")
    yield database
    await database.close()


@pytest.fixture
async def executor(engine: Engine, db: Database) -> AsyncIterator[GpuExecutor]:
    ex = GpuExecutor(FlakyEngine(engine), db, queue_limit=3)
    await ex.start()
    yield ex
    await ex.close()


async def events_of(job: Job) -> list[Any]:
    return [e async for e in job.stream()]


async def status(db: Database, job: Job) -> str:
    row = await db.get_job(job.id)
    assert row is not None
    return str(row["status"])


async def test_jobs_run_in_order_on_one_dedicated_thread(
    executor: GpuExecutor, db: Database
) -> None:
    jobs = [await executor.submit(ORIGIN, req(f"p{i}", seed=i)) for i in range(3)]
    results = [await events_of(j) for j in jobs]
    for job, events in zip(jobs, results, strict=True):
        assert isinstance(events[0], Queued)
        assert any(isinstance(e, Started) for e in events)
        assert isinstance(events[-1], Finished) and events[-1].seeds == [job.request.seed]
        assert await status(db, job) == "finished"
    assert jobs[2].request.seed == 2
    assert executor.engine.threads == {"sdbot-gpu_0"}  # type: ignore[attr-defined]


async def test_progress_reaches_the_last_step(executor: GpuExecutor) -> None:
    job = await executor.submit(ORIGIN, req(steps=5))
    progress = [e for e in await events_of(job) if isinstance(e, Progress)]
    assert progress and progress[-1] == Progress(5, 5)


async def test_an_exception_fails_that_job_only(executor: GpuExecutor, db: Database) -> None:
    bad = await executor.submit(ORIGIN, req("boom"))
    good = await executor.submit(ORIGIN, req("fine"))
    bad_events, good_events = await events_of(bad), await events_of(good)
    assert isinstance(bad_events[-1], Failed)
    # The user gets a plain sentence; the row keeps the detail for the owner.
    assert bad_events[-1].error.message == (
        f"Generation failed unexpectedly (job #{bad.id}); the error has been logged."
    )
    assert isinstance(good_events[-1], Finished)
    row = await db.get_job(bad.id)
    assert row is not None and row["status"] == "failed" and "illegal memory access" in row["error"]


async def test_cancel_a_queued_job_at_once(executor: GpuExecutor, db: Database) -> None:
    first = await executor.submit(ORIGIN, req(steps=40, size=192))
    second = await executor.submit(ORIGIN, req())
    assert await executor.cancel(second.id)
    events = await events_of(second)
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, JobCancelled)
    assert not any(isinstance(e, Started) for e in events)
    assert await status(db, second) == "cancelled"
    assert isinstance((await events_of(first))[-1], Finished)


async def test_cancel_a_running_job_stops_it_at_the_next_step(
    executor: GpuExecutor, db: Database
) -> None:
    job = await executor.submit(ORIGIN, req(steps=150, size=256))
    async for event in job.stream():
        if isinstance(event, Progress):
            break
    assert await executor.cancel(job.id)
    rest = await events_of(job)
    assert isinstance(rest[-1], Failed) and isinstance(rest[-1].error, JobCancelled)
    last_step = max((e.step for e in rest if isinstance(e, Progress)), default=0)
    assert last_step < 150
    assert await status(db, job) == "cancelled"
    # The pipeline is still usable.
    after = await executor.submit(ORIGIN, req())
    assert isinstance((await events_of(after))[-1], Finished)


async def test_a_full_queue_refuses_and_records(executor: GpuExecutor, db: Database) -> None:
    running = await executor.submit(ORIGIN, req(steps=60, size=192))
    while not any(isinstance(e, Started) for e in [await running.events.get()]):
        pass
    queued = [await executor.submit(ORIGIN, req()) for _ in range(3)]
    with pytest.raises(QueueFull, match="queue is full"):
        await executor.submit(ORIGIN, req("one too many"))
    rows = await db.list_jobs()
    assert sum(r["status"] == "rejected" and r["reason"] == "queue_full" for r in rows) == 1
    for job in queued:
        await events_of(job)


async def test_shutdown_cancels_the_running_job_and_interrupts_the_queue(
    engine: Engine, db: Database
) -> None:
    ex = GpuExecutor(FlakyEngine(engine), db, queue_limit=10)
    await ex.start()
    running = await ex.submit(ORIGIN, req(steps=150, size=256))
    waiting = [await ex.submit(ORIGIN, req()) for _ in range(2)]
    async for event in running.stream():
        if isinstance(event, Started):
            break
    await asyncio.wait_for(ex.close(), 30)
    assert await status(db, running) == "cancelled"
    assert [await status(db, j) for j in waiting] == ["interrupted", "interrupted"]
    assert not [r for r in await db.list_jobs() if r["status"] in ("queued", "running")]
