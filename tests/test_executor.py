"""The GPU executor on the real tiny model: batching is exact, cancellation is prompt, failures
and out-of-memory stay contained, and every job row ends in a final state.

Scheduling order and policy are covered as plain data in test_fair_queue_plan.py and on a
scripted engine in test_fair_queue.py; these tests check that the executor and the real engine
agree on the contract.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.backend import (
    Failed,
    Finished,
    Job,
    JobOrigin,
    Progress,
    Queued,
    Started,
    StepInfoLike,
)
from bot.db import Database
from bot.engine import Engine
from bot.errors import GpuOutOfMemory, JobCancelled, QueueFull
from bot.executor import GpuExecutor
from bot.imaging import read_parameters
from bot.jobs import GenerationRequest

ORIGIN = JobOrigin(user_id=1, user_name="ann", guild_id=2, channel_id=3, command="imagine")


def origin(user: int) -> JobOrigin:
    return JobOrigin(user_id=user, user_name=f"u{user}", guild_id=2, channel_id=3, command="x")


def req(prompt: str = "a cat", steps: int = 2, size: int = 64, **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, model="builtin:tiny", width=size, height=size, steps=steps, **kw
    )


class FlakyEngine:
    """The real engine plus faults, decided per call on the GPU thread:
    a prompt with 'boom' raises a driver-like error; with 'oom' any call of more than one image
    runs out of memory; with 'huge' even one image does."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.threads: set[str] = set()
        self.calls: list[list[str]] = []

    @property
    def loaded_models(self) -> list[str]:
        return list(self.engine.loaded_models)

    def load(self, model: str) -> object:
        return self.engine.load(model)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: Callable[[StepInfoLike], None] | None = None,
    ) -> Sequence[Any]:
        self.threads.add(threading.current_thread().name)
        self.calls.append([r.prompt for r in requests])
        prompts = " ".join(r.prompt for r in requests)
        if "boom" in prompts:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        images = sum(r.count for r in requests)
        if ("oom" in prompts and images > 1) or "huge" in prompts:
            raise GpuOutOfMemory("CUDA out of memory (simulated)")
        return self.engine.generate(requests, on_step=on_step)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "x.db")
    yield database
    # Whatever happened in the test, no row may be left queued or running.
    rows = await database.list_jobs(limit=1000)
    assert not [r["id"] for r in rows if r["status"] in ("queued", "running")]
    await database.close()


@pytest.fixture
def flaky(engine: Engine) -> FlakyEngine:
    return FlakyEngine(engine)


@asynccontextmanager
async def running(flaky: FlakyEngine, db: Database, **kw: Any) -> AsyncIterator[GpuExecutor]:
    kw.setdefault("queue_limit", 10)
    kw.setdefault("user_queue_limit", 10)
    ex = GpuExecutor(flaky, db, **kw)
    await ex.start()
    try:
        yield ex
    finally:
        await asyncio.wait_for(ex.close(), 30)


@pytest.fixture
async def executor(flaky: FlakyEngine, db: Database) -> AsyncIterator[GpuExecutor]:
    async with running(flaky, db, queue_limit=3) as ex:
        yield ex


@asynccontextmanager
async def gpu_held(ex: GpuExecutor) -> AsyncIterator[None]:
    """Park the GPU thread so that jobs submitted inside the block queue up together."""
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(30)

    held = asyncio.ensure_future(ex.run_on_gpu_thread(hold))
    await asyncio.to_thread(entered.wait, 30)
    try:
        yield
    finally:
        gate.set()
        await held


async def events_of(job: Job) -> list[Any]:
    return [e async for e in job.stream()]


async def finished(job: Job) -> Finished:
    last = (await events_of(job))[-1]
    assert isinstance(last, Finished), last
    return last


async def status(db: Database, job: Job) -> str:
    row = await db.get_job(job.id)
    assert row is not None
    return str(row["status"])


def pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").tobytes()


def requests_for_batch() -> Iterator[GenerationRequest]:
    yield req("a red fox in snow", steps=3, seed=11)
    yield req("a lighthouse at dusk", steps=3, seed=12, negative_prompt="blurry")
    yield req("two cats", steps=3, seed=13, count=2)


# -- the happy path -------------------------------------------------------------------------


async def test_jobs_run_in_order_on_one_dedicated_thread(
    executor: GpuExecutor, flaky: FlakyEngine, db: Database
) -> None:
    jobs = [await executor.submit(ORIGIN, req(f"p{i}", seed=i)) for i in range(3)]
    for job in jobs:
        events = await events_of(job)
        assert isinstance(events[0], Queued)
        assert any(isinstance(e, Started) for e in events)
        done = events[-1]
        assert isinstance(done, Finished) and done.seeds == [job.request.seed]
        assert done.gpu_seconds > 0 and done.grid is None and done.nsfw == [False]
        assert f"Seed: {job.request.seed}," in (read_parameters(done.images[0]) or "")
        assert done.parameters[0] == read_parameters(done.images[0])
        assert await status(db, job) == "finished"
    assert flaky.threads == {"sdbot-gpu_0"}
    loaded = executor.status().loaded_models
    assert len(loaded) == 1 and loaded == flaky.engine.loaded_models


async def test_batched_images_equal_solo_images_pixel_for_pixel(
    flaky: FlakyEngine, db: Database
) -> None:
    async with running(flaky, db, max_batch=4) as ex:
        async with gpu_held(ex):
            batched = [
                await ex.submit(origin(user), request)
                for user, request in enumerate(requests_for_batch())
            ]
        together = [await finished(job) for job in batched]
        ex.max_batch = 1
        alone = [await finished(await ex.submit(ORIGIN, job.request)) for job in batched]
    # One call for the three jobs (four images), then one call each.
    assert [len(call) for call in flaky.calls] == [3, 1, 1, 1]
    for job, batch_result, solo_result in zip(batched, together, alone, strict=True):
        assert batch_result.seeds == solo_result.seeds == job.request.seeds
        assert [pixels(p) for p in batch_result.images] == [pixels(p) for p in solo_result.images]
        for seed, png in zip(batch_result.seeds, batch_result.images, strict=True):
            assert f"Seed: {seed}," in (read_parameters(png) or "")
    assert together[2].grid is not None and len(together[2].images) == 2


async def test_progress_reaches_the_last_step_with_previews(
    flaky: FlakyEngine, db: Database
) -> None:
    async with running(flaky, db, preview_every=2, progress_interval_s=0) as ex:
        job = await ex.submit(ORIGIN, req(steps=5))
        progress = [e for e in await events_of(job) if isinstance(e, Progress)]
    assert progress[-1].step == progress[-1].total == 5
    previews = [p.preview for p in progress if p.preview is not None]
    assert previews and all(p.startswith(b"\x89PNG") for p in previews)


async def test_progress_is_throttled_by_default(executor: GpuExecutor) -> None:
    job = await executor.submit(ORIGIN, req(steps=30))
    progress = [e for e in await events_of(job) if isinstance(e, Progress)]
    assert progress[-1] == Progress(30, 30)
    assert len(progress) < 30


# -- failures -------------------------------------------------------------------------------


async def test_an_exception_fails_that_job_only(flaky: FlakyEngine, db: Database) -> None:
    async with running(flaky, db) as ex:
        async with gpu_held(ex):
            good = await ex.submit(origin(1), req("fine", seed=1))
            bad = await ex.submit(origin(2), req("boom", seed=2))
        bad_events, good_done = await events_of(bad), await finished(good)
        after = await finished(await ex.submit(ORIGIN, req("still serving")))
    assert isinstance(bad_events[-1], Failed)
    # The user gets a plain sentence; the row keeps the detail for the owner.
    assert bad_events[-1].error.message == (
        f"Generation failed unexpectedly (job #{bad.id}); the error has been logged."
    )
    row = await db.get_job(bad.id)
    assert row is not None and row["status"] == "failed" and "illegal memory access" in row["error"]
    assert good_done.seeds == [1] and after.images


async def test_out_of_memory_splits_the_batch_and_keeps_serving(
    flaky: FlakyEngine, db: Database
) -> None:
    async with running(flaky, db, max_batch=4) as ex:
        async with gpu_held(ex):
            jobs = [await ex.submit(origin(u), req(f"oom {u}", seed=u)) for u in range(2)]
            multi = await ex.submit(origin(3), req("oom multi", seed=40, count=2))
            huge = await ex.submit(origin(4), req("huge", steps=3))
        results = [await finished(job) for job in jobs]
        split = await finished(multi)
        failed = (await events_of(huge))[-1]
        after = await finished(await ex.submit(ORIGIN, req("fine")))
    assert [r.seeds for r in results] == [[0], [1]]
    assert split.seeds == [40, 41] and len(split.images) == 2
    # Its images are exactly those a single call makes: the split kept every seed.
    with_room = GpuExecutor(flaky.engine, db)
    await with_room.start()
    try:
        reference = await finished(await with_room.submit(ORIGIN, multi.request))
    finally:
        await with_room.close()
    assert [pixels(p) for p in split.images] == [pixels(p) for p in reference.images]
    assert isinstance(failed, Failed) and isinstance(failed.error, GpuOutOfMemory)
    assert "ran out of memory" in failed.error.message
    assert await status(db, huge) == "failed"
    assert after.images


# -- cancellation ---------------------------------------------------------------------------


async def test_cancel_a_queued_job_at_once(executor: GpuExecutor, db: Database) -> None:
    async with gpu_held(executor):
        first = await executor.submit(ORIGIN, req())
        second = await executor.submit(ORIGIN, req("second", steps=3))
        assert await executor.cancel(second.id)
        assert await status(db, second) == "cancelled"
    events = await events_of(second)
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, JobCancelled)
    assert not any(isinstance(e, Started) for e in events)
    await finished(first)


async def test_cancel_a_running_job_stops_it_at_the_next_step(
    executor: GpuExecutor, db: Database
) -> None:
    job = await executor.submit(ORIGIN, req(steps=150))
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
    await finished(await executor.submit(ORIGIN, req()))


async def test_cancelling_one_job_of_a_batch_keeps_the_other(
    flaky: FlakyEngine, db: Database
) -> None:
    async with running(flaky, db, progress_interval_s=0) as ex:
        async with gpu_held(ex):
            keep = await ex.submit(origin(1), req("keep", steps=30, seed=5))
            drop = await ex.submit(origin(2), req("drop", steps=30, seed=6))
        async for event in drop.stream():
            if isinstance(event, Progress):
                break
        assert await ex.cancel(drop.id)
        dropped = await events_of(drop)
        kept = await finished(keep)
    assert isinstance(dropped[-1], Failed) and isinstance(dropped[-1].error, JobCancelled)
    assert await status(db, drop) == "cancelled"
    assert kept.seeds == [5] and await status(db, keep) == "finished"
    assert flaky.calls == [["keep", "drop"]]


# -- limits and shutdown --------------------------------------------------------------------


async def test_a_full_queue_refuses_and_records(executor: GpuExecutor, db: Database) -> None:
    async with gpu_held(executor):
        queued = [await executor.submit(origin(u), req(steps=u + 1)) for u in range(3)]
        with pytest.raises(QueueFull, match="queue is full"):
            await executor.submit(ORIGIN, req("one too many"))
    rows = await db.list_jobs()
    assert sum(r["status"] == "rejected" and r["reason"] == "queue_full" for r in rows) == 1
    for job in queued:
        await finished(job)


async def test_shutdown_cancels_the_running_job_and_interrupts_the_queue(
    flaky: FlakyEngine, db: Database
) -> None:
    ex = GpuExecutor(flaky, db, queue_limit=10)
    await ex.start()
    running_job = await ex.submit(ORIGIN, req(steps=150))
    waiting = [await ex.submit(ORIGIN, req(steps=3)) for _ in range(2)]
    async for event in running_job.stream():
        if isinstance(event, Progress):
            break
    await asyncio.wait_for(ex.close(), 10)
    assert await status(db, running_job) == "cancelled"
    assert [await status(db, j) for j in waiting] == ["interrupted", "interrupted"]
