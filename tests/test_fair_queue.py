"""The executor's scheduling on a scripted fake engine: fairness, caps, batching, model
preference, cancellation, failures, OOM splitting, progress throttling, several workers
sharing one queue, and shutdown.

The fake engine runs on the real GPU thread and honours the engine contract (one call per
batch, on_step per step, JobCancelled from on_step propagates), so these tests exercise the
real threading; `FakeEngine.hold()` parks the GPU thread so tests can build a queue first.
"""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.backend import (
    Failed,
    Finished,
    GenerationResult,
    Job,
    JobOrigin,
    Progress,
    Queued,
    Started,
    StepInfoLike,
    UserQueueFull,
)
from bot.db import Database
from bot.errors import GenerationFailed, GpuOutOfMemory, JobCancelled, QueueFull
from bot.executor import GpuExecutor, ModelLoadRecorder, Worker
from bot.imaging import read_parameters
from bot.jobs import GenerationRequest

MODEL_A = "builtin:tiny"
MODEL_B = "other/model"


def origin(user: int) -> JobOrigin:
    return JobOrigin(
        user_id=user, user_name=f"user{user}", guild_id=1, channel_id=2, command="imagine"
    )


def req(
    prompt: str = "a cat", *, model: str = MODEL_A, steps: int = 3, **kw: Any
) -> GenerationRequest:
    kw.setdefault("seed", 7)
    return GenerationRequest(prompt=prompt, model=model, width=64, height=64, steps=steps, **kw)


@dataclass(frozen=True)
class FakeStep:
    step: int
    total: int
    preview: Callable[[int], Image.Image]


class FakeEngine:
    """Follows the engine contract; every call is recorded. Images encode their seed."""

    def __init__(
        self, *, step_delay: float = 0.0, max_loaded: int = 1, journal: list[str] | None = None
    ) -> None:
        self.step_delay = step_delay
        self.max_loaded = max_loaded
        # Prompts of every call as it starts; several engines may share one.
        self.journal = [] if journal is None else journal
        self.loaded_models: list[str] = []
        self.names: dict[str, str] = {}  # source -> the name loaded_models lists (a catalog's)
        self.calls: list[list[GenerationRequest]] = []
        self.threads: set[str] = set()
        self.steps_run = 0
        self.fail: Callable[[Sequence[GenerationRequest]], BaseException | None] | None = None
        self._go = threading.Event()
        self._go.set()
        self.entered = threading.Event()  # set when a call has started (before the hold)

    def hold(self) -> None:
        """Park the next call at its start until release()."""
        self._go.clear()
        self.entered.clear()

    def release(self) -> None:
        self._go.set()

    def load(self, model: str) -> None:
        model = self.names.get(model, model)
        self.loaded_models = [m for m in self.loaded_models if m != model] + [model]
        self.loaded_models = self.loaded_models[-self.max_loaded :]

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: Callable[[StepInfoLike], None] | None = None,
    ) -> list[GenerationResult]:
        assert len({r.batch_key() for r in requests}) == 1, "mixed batch keys in one call"
        self.threads.add(threading.current_thread().name)
        self.calls.append(list(requests))
        self.journal.extend(r.prompt for r in requests)
        self.entered.set()
        assert self._go.wait(30)
        self.load(requests[0].model)
        if self.fail is not None and (error := self.fail(requests)) is not None:
            raise error
        total = requests[0].steps
        for step in range(1, total + 1):
            if self.step_delay:
                time.sleep(self.step_delay)
            self.steps_run += 1
            if on_step is not None:
                on_step(FakeStep(step, total, lambda i: Image.new("RGB", (8, 8), (i, 0, 0))))
        return [
            GenerationResult(
                images=[Image.new("RGB", (8, 8), (s % 256, s // 256 % 256, 0)) for s in r.seeds],
                seeds=r.seeds,
                nsfw=[False] * r.count,
                sampler="Euler",
            )
            for r in requests
        ]

    def prompts(self) -> list[list[str]]:
        return [[r.prompt for r in call] for call in self.calls]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "x.db")
    yield database
    await database.close()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def make(engine: FakeEngine, db: Database) -> AsyncIterator[Callable[..., Any]]:
    made: list[GpuExecutor] = []

    async def factory(**kw: Any) -> GpuExecutor:
        kw.setdefault("user_queue_limit", 50)
        kw.setdefault("progress_interval_s", 0.0)
        ex = GpuExecutor(engine, db, **kw)
        await ex.start()
        made.append(ex)
        return ex

    yield factory
    engine.release()
    for ex in made:
        await asyncio.wait_for(ex.close(), 10)


async def events_of(job: Job) -> list[Any]:
    return [e async for e in job.stream()]


async def until(job: Job, kind: type) -> list[Any]:
    """Events up to and including the first of `kind`."""
    seen = []
    async for event in job.stream():
        seen.append(event)
        if isinstance(event, kind):
            return seen
    raise AssertionError(f"{kind.__name__} never came: {seen}")


async def status(db: Database, job: Job) -> str:
    row = await db.get_job(job.id)
    assert row is not None
    return str(row["status"])


async def blocked(ex: GpuExecutor, engine: FakeEngine, user: int = 99) -> Job:
    """Occupy the GPU thread with a held job so a queue can build up behind it."""
    engine.hold()
    blocker = await ex.submit(origin(user), req("blocker", steps=1, seed=1))
    await asyncio.to_thread(engine.entered.wait, 10)
    return blocker


# -- fairness -----------------------------------------------------------------------------


async def test_a_light_user_waits_about_one_job_behind_a_heavy_user(
    make: Callable[..., Any], engine: FakeEngine
) -> None:
    ex = await make(max_batch=1)
    blocker = await blocked(ex, engine, user=1)
    heavy = [await ex.submit(origin(1), req(f"h{i}")) for i in range(20)]
    light = await ex.submit(origin(2), req("light"))
    # Its place in line is reported at once: right after the job now running.
    assert (await until(light, Queued))[-1] == Queued(position=1)
    engine.release()
    for job in [blocker, *heavy, light]:
        assert isinstance((await events_of(job))[-1], Finished)
    order = [call[0].prompt for call in engine.calls]
    assert order == ["blocker", "light", *[f"h{i}" for i in range(20)]]


async def test_round_robin_across_users_keeps_each_users_order(
    make: Callable[..., Any], engine: FakeEngine
) -> None:
    ex = await make(max_batch=1)
    await blocked(ex, engine)
    users = ((1, "a"), (2, "b"), (3, "c"))
    jobs = [await ex.submit(origin(u), req(f"{name}{i}")) for u, name in users for i in range(3)]
    # Positions are the round-robin order the scheduler will follow.
    assert ex.positions() == {
        job.id: pos
        for pos, job in enumerate([jobs[i + 3 * u] for i in range(3) for u in range(3)], 1)
    }
    engine.release()
    for job in jobs:
        await events_of(job)
    assert [c[0].prompt for c in engine.calls[1:]] == [
        "a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2",
    ]  # fmt: skip


async def test_positions_are_resent_only_when_they_change(
    make: Callable[..., Any], engine: FakeEngine
) -> None:
    ex = await make(max_batch=1)
    blocker = await blocked(ex, engine, user=1)
    h0 = await ex.submit(origin(1), req("h0"))
    h1 = await ex.submit(origin(1), req("h1"))
    light = await ex.submit(origin(2), req("light"))  # jumps ahead of h0 and h1
    engine.release()
    for job in (blocker, light):
        await events_of(job)
    h0_events, h1_events = await events_of(h0), await events_of(h1)
    h0_queued = [e.position for e in h0_events if isinstance(e, Queued)]
    h1_queued = [e.position for e in h1_events if isinstance(e, Queued)]
    assert h0_queued[:2] == [1, 2] and h0_queued[-1] == 1
    assert h1_queued[:2] == [2, 3] and h1_queued[-1] == 1
    # No repeats of the same position in a row.
    for positions in (h0_queued, h1_queued):
        assert all(a != b for a, b in itertools.pairwise(positions))


# -- caps -----------------------------------------------------------------------------------


async def test_per_user_cap_refuses_and_records(
    make: Callable[..., Any], engine: FakeEngine, db: Database
) -> None:
    ex = await make(user_queue_limit=2, queue_limit=10)
    await blocked(ex, engine)
    await ex.submit(origin(1), req())
    await ex.submit(origin(1), req())
    with pytest.raises(UserQueueFull, match="You already have 2 jobs waiting"):
        await ex.submit(origin(1), req("third"))
    # Another user is not affected, and an admin may raise the limit per call.
    await ex.submit(origin(2), req())
    await ex.submit(origin(1), req(), user_limit=3)
    with pytest.raises(QueueFull):
        await ex.submit(origin(1), req(), user_limit=3)
    rows = await db.list_jobs()
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert [r["reason"] for r in rejected] == ["user_queue_full", "user_queue_full"]
    assert ex.status().queued_per_user == {1: 3, 2: 1}


async def test_global_cap_refuses_and_records(
    make: Callable[..., Any], engine: FakeEngine, db: Database
) -> None:
    ex = await make(queue_limit=3)
    await blocked(ex, engine)
    for user in range(3):
        await ex.submit(origin(user), req())
    with pytest.raises(QueueFull, match="The queue is full") as info:
        await ex.submit(origin(7), req())
    assert not isinstance(info.value, UserQueueFull)
    assert ex.queue_length == 3
    rows = await db.list_jobs()
    assert [r["reason"] for r in rows if r["status"] == "rejected"] == ["queue_full"]


async def test_concurrent_submits_cannot_overshoot_the_cap(
    make: Callable[..., Any], engine: FakeEngine
) -> None:
    ex = await make(queue_limit=100, user_queue_limit=3)
    await blocked(ex, engine)
    outcomes = await asyncio.gather(
        *(ex.submit(origin(1), req()) for _ in range(6)), return_exceptions=True
    )
    assert sum(isinstance(o, Job) for o in outcomes) == 3
    assert sum(isinstance(o, UserQueueFull) for o in outcomes) == 3


# -- batching -------------------------------------------------------------------------------


async def test_compatible_jobs_from_several_users_share_one_call(
    make: Callable[..., Any], engine: FakeEngine
) -> None:
    ex = await make(max_batch=4)
    await blocked(ex, engine)
    jobs = [await ex.submit(origin(u), req(f"p{u}", seed=100 + u)) for u in range(6)]
    odd = await ex.submit(origin(9), req("odd", steps=5))  # another shape: never mixed in
    engine.release()
    results = [await events_of(j) for j in [*jobs, odd]]
    assert engine.prompts()[1:] == [["p0", "p1", "p2", "p3"], ["p4", "p5"], ["odd"]]
    for job, events in zip([*jobs, odd], results, strict=True):
        done = events[-1]
        assert isinstance(done, Finished)
        assert done.seeds == [job.request.seed]
        image = Image.open(io.BytesIO(done.images[0]))
        assert image.getpixel((0, 0)) == (job.request.seed % 256, 0, 0)  # its own image
        assert f"Seed: {job.request.seed}" in (read_parameters(done.images[0]) or "")
        assert done.grid is None and done.nsfw == [False]


async def test_max_batch_counts_images_not_jobs(
    make: Callable[..., Any], engine: FakeEngine
) -> None:
    ex = await make(max_batch=4)
    await blocked(ex, engine)
    a = await ex.submit(origin(1), req("a", count=3))
    b = await ex.submit(origin(2), req("b", count=2))  # 3 + 2 > 4: waits
    c = await ex.submit(origin(3), req("c", count=1))  # 3 + 1 fits
    engine.release()
    done = [(await events_of(j))[-1] for j in (a, b, c)]
    assert engine.prompts()[1:] == [["a", "c"], ["b"]]
    assert isinstance(done[0], Finished)
    assert done[0].seeds == [7, 8, 9] and done[0].grid is not None
    assert all(f"Seed: {s}," in p for s, p in zip(done[0].seeds, done[0].parameters, strict=True))


@pytest.mark.parametrize("catalog_names", [False, True])
async def test_a_loaded_model_is_preferred_but_not_forever(
    make: Callable[..., Any], engine: FakeEngine, catalog_names: bool
) -> None:
    if catalog_names:  # the engine lists models by catalog name, requests use the source
        engine.names = {MODEL_A: "Tiny", MODEL_B: "Other"}
    ex = await make(max_batch=1, max_model_streak=2)
    await blocked(ex, engine, user=1)  # loads MODEL_A
    other = await ex.submit(origin(2), req("b0", model=MODEL_B))  # the fair pick
    loaded = [await ex.submit(origin(3), req(f"a{i}")) for i in range(4)]
    engine.release()
    for job in [other, *loaded]:
        assert isinstance((await events_of(job))[-1], Finished)
    # Two jobs for the loaded model go first, then the fair pick must run.
    assert [c[0].prompt for c in engine.calls[1:]] == ["a0", "a1", "b0", "a2", "a3"]


async def test_a_long_wait_beats_the_model_preference(
    make: Callable[..., Any], engine: FakeEngine
) -> None:
    ex = await make(max_batch=1, max_model_streak=10, max_model_wait_s=0.0)
    await blocked(ex, engine, user=1)
    other = await ex.submit(origin(2), req("b0", model=MODEL_B))
    same = await ex.submit(origin(3), req("a0"))
    engine.release()
    await events_of(other), await events_of(same)
    assert [c[0].prompt for c in engine.calls[1:]] == ["b0", "a0"]


# -- cancellation ---------------------------------------------------------------------------


async def test_cancel_a_queued_job_removes_it_at_once(
    make: Callable[..., Any], engine: FakeEngine, db: Database
) -> None:
    ex = await make()
    await blocked(ex, engine)
    job = await ex.submit(origin(1), req("never"))
    assert await ex.cancel(job.id)
    events = await events_of(job)
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, JobCancelled)
    assert not any(isinstance(e, Started) for e in events)
    assert await status(db, job) == "cancelled"
    assert not await ex.cancel(job.id)  # already over
    engine.release()
    after = await ex.submit(origin(1), req("after"))
    await events_of(after)
    assert "never" not in [p for call in engine.prompts() for p in call]


async def test_cancel_a_running_job_stops_it_within_a_step(
    make: Callable[..., Any], db: Database
) -> None:
    engine = FakeEngine(step_delay=0.005)
    ex = GpuExecutor(engine, db, progress_interval_s=0.0)
    await ex.start()
    try:
        job = await ex.submit(origin(1), req(steps=150))
        await until(job, Progress)
        assert await ex.cancel(job.id)
        at_cancel = engine.steps_run
        events = await events_of(job)
        assert isinstance(events[-1], Failed) and isinstance(events[-1].error, JobCancelled)
        assert engine.steps_run - at_cancel <= 2
        assert await status(db, job) == "cancelled"
        after = await ex.submit(origin(1), req(steps=2))
        assert isinstance((await events_of(after))[-1], Finished)
    finally:
        await ex.close()


async def test_cancelling_one_job_in_a_batch_spares_the_others(
    db: Database,
) -> None:
    engine = FakeEngine(step_delay=0.01)
    ex = GpuExecutor(engine, db, max_batch=4, progress_interval_s=0.0)
    await ex.start()
    try:
        await blocked(ex, engine)
        first = await ex.submit(origin(1), req("one", steps=40))
        second = await ex.submit(origin(2), req("two", steps=40))
        engine.release()
        await until(second, Progress)
        assert await ex.cancel(second.id)
        # The cancelled job hears about it at its next step, not when the batch ends.
        second_events = await events_of(second)
        assert isinstance(second_events[-1], Failed)
        assert isinstance(second_events[-1].error, JobCancelled)
        assert await status(db, second) == "cancelled"
        assert engine.steps_run < 1 + 40
        first_events = await events_of(first)
        assert isinstance(first_events[-1], Finished)
        assert engine.prompts()[1:] == [["one", "two"]]
        assert await status(db, first) == "finished"
    finally:
        await ex.close()


async def test_cancelling_every_job_in_a_batch_stops_the_call(db: Database) -> None:
    engine = FakeEngine(step_delay=0.005)
    ex = GpuExecutor(engine, db, max_batch=4, progress_interval_s=0.0)
    await ex.start()
    try:
        await blocked(ex, engine)
        jobs = [await ex.submit(origin(u), req(f"p{u}", steps=150)) for u in range(2)]
        engine.release()
        await until(jobs[0], Progress)
        for job in jobs:
            assert await ex.cancel(job.id)
        for job in jobs:
            assert isinstance((await events_of(job))[-1], Failed)
            assert await status(db, job) == "cancelled"
        assert engine.steps_run < 100
        after = await ex.submit(origin(1), req(steps=1))
        assert isinstance((await events_of(after))[-1], Finished)
    finally:
        await ex.close()


async def test_leaving_generate_early_cancels_the_job(
    make: Callable[..., Any], engine: FakeEngine, db: Database
) -> None:
    ex = await make()
    await blocked(ex, engine)
    stream = ex.generate(origin(1), req("abandoned"))
    first = await anext(stream)
    assert isinstance(first, Queued)
    await stream.aclose()
    rows = await db.list_jobs()
    assert [r["status"] for r in rows if r["prompt"] == "abandoned"] == ["cancelled"]


# -- failures -------------------------------------------------------------------------------


async def test_an_error_fails_only_the_job_that_caused_it(
    make: Callable[..., Any], engine: FakeEngine, db: Database
) -> None:
    def boom(requests: Sequence[GenerationRequest]) -> BaseException | None:
        if any("boom" in r.prompt for r in requests):
            return RuntimeError("CUDA error: an illegal memory access was encountered")
        return None

    engine.fail = boom
    ex = await make(max_batch=4)
    await blocked(ex, engine)
    jobs = [await ex.submit(origin(u), req(p)) for u, p in enumerate(("ok1", "boom", "ok2"))]
    engine.release()
    results = [(await events_of(job))[-1] for job in jobs]
    assert isinstance(results[0], Finished) and isinstance(results[2], Finished)
    assert isinstance(results[1], Failed)
    assert results[1].error.message == (
        f"Generation failed unexpectedly (job #{jobs[1].id}); the error has been logged."
    )
    row = await db.get_job(jobs[1].id)
    assert row is not None and row["status"] == "failed"
    assert "illegal memory access" in row["error"]
    # One batch, then each job alone to find the culprit.
    assert engine.prompts()[1:] == [["ok1", "boom", "ok2"], ["ok1"], ["boom"], ["ok2"]]


async def test_out_of_memory_splits_the_batch_in_halves(
    make: Callable[..., Any], engine: FakeEngine
) -> None:
    engine.fail = lambda rs: GpuOutOfMemory("oom") if sum(r.count for r in rs) > 2 else None
    ex = await make(max_batch=4)
    await blocked(ex, engine)
    jobs = [await ex.submit(origin(u), req(f"p{u}", seed=u)) for u in range(4)]
    engine.release()
    for job in jobs:
        done = (await events_of(job))[-1]
        assert isinstance(done, Finished) and done.seeds == [job.request.seed]
    assert [len(c) for c in engine.calls[1:]] == [4, 2, 2]


async def test_out_of_memory_splits_one_job_by_image_and_keeps_seeds(
    make: Callable[..., Any], engine: FakeEngine
) -> None:
    engine.fail = lambda rs: GpuOutOfMemory("oom") if sum(r.count for r in rs) > 1 else None
    ex = await make()
    job = await ex.submit(origin(1), req(count=4, seed=2**32 - 2))
    done = (await events_of(job))[-1]
    assert isinstance(done, Finished)
    assert done.seeds == [2**32 - 2, 2**32 - 1, 0, 1]  # the same seeds as one call would use
    assert len(done.images) == 4 and done.grid is not None
    assert [sum(r.count for r in call) for call in engine.calls] == [4, 2, 1, 1, 2, 1, 1]


async def test_out_of_memory_on_a_single_image_fails_it_and_keeps_serving(
    make: Callable[..., Any], engine: FakeEngine, db: Database
) -> None:
    engine.fail = lambda rs: GpuOutOfMemory("oom") if rs[0].prompt == "huge" else None
    ex = await make()
    huge = await ex.submit(origin(1), req("huge"))
    failed = (await events_of(huge))[-1]
    assert isinstance(failed, Failed) and isinstance(failed.error, GpuOutOfMemory)
    assert "ran out of memory" in failed.error.message and "smaller size" in failed.error.message
    row = await db.get_job(huge.id)
    assert row is not None and row["status"] == "failed" and row["reason"] == "out_of_memory"
    after = await ex.submit(origin(1), req("fine"))
    assert isinstance((await events_of(after))[-1], Finished)


async def test_a_domain_error_reaches_the_user_as_is(
    make: Callable[..., Any], engine: FakeEngine
) -> None:
    engine.fail = lambda rs: GenerationFailed("The LoRA `x` is missing.")
    ex = await make()
    job = await ex.submit(origin(1), req())
    failed = (await events_of(job))[-1]
    assert isinstance(failed, Failed) and failed.error.message == "The LoRA `x` is missing."


# -- progress -------------------------------------------------------------------------------


async def test_progress_every_step_with_previews(make: Callable[..., Any]) -> None:
    ex = await make(preview_every=2)
    job = await ex.submit(origin(1), req(steps=9))
    progress = [e for e in await events_of(job) if isinstance(e, Progress)]
    steps = [p.step for p in progress]
    # While a preview is being encoded, later steps are coalesced, never reordered.
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 9
    previews = [p for p in progress if p.preview is not None]
    assert previews and previews[0].step == 2
    assert all(p.step % 2 == 0 and p.step < 9 for p in previews)  # none at the last step
    assert all(p.preview is not None and p.preview.startswith(b"\x89PNG") for p in previews)


async def test_progress_is_throttled_but_the_last_step_always_comes(
    engine: FakeEngine, db: Database
) -> None:
    ex = GpuExecutor(engine, db, progress_interval_s=60, preview_every=0)
    await ex.start()
    try:
        job = await ex.submit(origin(1), req(steps=50))
        progress = [e for e in await events_of(job) if isinstance(e, Progress)]
        assert progress == [Progress(1, 50), Progress(50, 50)]
    finally:
        await ex.close()


async def test_one_gpu_thread_and_status(make: Callable[..., Any], engine: FakeEngine) -> None:
    ex = await make()
    blocker = await blocked(ex, engine, user=5)
    waiting = await ex.submit(origin(6), req(steps=4))
    await until(blocker, Started)
    state = ex.status()
    assert state.running == [blocker.id] and state.queued_per_user == {6: 1}
    assert state.queue_length == ex.queue_length == 1 and ex.positions() == {waiting.id: 1}
    assert ex.get(waiting.id) is waiting
    engine.release()
    await events_of(blocker), await events_of(waiting)
    assert ex.get(waiting.id) is None
    jobs = [await ex.submit(origin(u), req(seed=u)) for u in range(3)]
    for job in jobs:
        await events_of(job)
    assert engine.threads == {"sdbot-gpu_0"}
    state = ex.status()
    assert state.queue_length == 0 and state.running == [] and state.gpu_busy_s > 0
    assert state.loaded_models == [MODEL_A]


async def test_model_loads_are_recorded_from_the_gpu_thread(db: Database) -> None:
    @dataclass(frozen=True)
    class Record:
        model: str = "m"
        source: str = "builtin:tiny"
        ok: bool = True
        seconds: float = 1.5
        memory_mb: float | None = 12.0
        error: str | None = None

    recorder = ModelLoadRecorder(db)
    await asyncio.to_thread(recorder, Record())
    await asyncio.sleep(0)
    await recorder.drain()
    async with db.conn.execute("SELECT model, ok, seconds FROM model_loads") as cur:
        assert [tuple(r) for r in await cur.fetchall()] == [("m", 1, 1.5)]


# -- several workers ------------------------------------------------------------------------


async def on_workers(db: Database, engines: Sequence[FakeEngine], **kw: Any) -> GpuExecutor:
    """An executor driving one worker per engine, started."""
    kw.setdefault("user_queue_limit", 50)
    kw.setdefault("progress_interval_s", 0.0)
    workers = [Worker(engine, name=f"sdbot-gpu{i}") for i, engine in enumerate(engines)]
    ex = GpuExecutor(db=db, workers=workers, **kw)
    await ex.start()
    return ex


@asynccontextmanager
async def all_held(ex: GpuExecutor) -> AsyncIterator[None]:
    """Park every worker's thread so that jobs submitted inside the block queue up together;
    leaving the block lets them all go at once."""
    entered = [threading.Event() for _ in ex.workers]
    gate = threading.Event()

    def hold(index: int) -> None:
        entered[index].set()
        gate.wait(30)

    held = [
        asyncio.ensure_future(ex.run_on_gpu_thread(functools.partial(hold, i), worker=i))
        for i in range(len(ex.workers))
    ]
    for event in entered:
        assert await asyncio.to_thread(event.wait, 30)
    try:
        yield
    finally:
        gate.set()
        await asyncio.gather(*held)


async def test_two_workers_share_one_queue_and_keep_its_fair_order(db: Database) -> None:
    journal: list[str] = []
    engines = [FakeEngine(step_delay=0.02, journal=journal) for _ in range(2)]
    ex = await on_workers(db, engines, max_batch=1)
    try:
        async with all_held(ex):
            heavy = [await ex.submit(origin(1), req(f"h{i}")) for i in range(8)]
            light = await ex.submit(origin(2), req("light"))
            # Two workers: the heavy user's first job and the light job go next, one each.
            assert (await until(light, Queued))[-1] == Queued(position=2)
            assert ex.positions()[heavy[1].id] == 3
        for job in [*heavy, light]:
            assert isinstance((await events_of(job))[-1], Finished)
    finally:
        await ex.close()
    assert all(len(engine.calls) >= 2 for engine in engines)  # both did a share of the work
    assert set().union(*(engine.threads for engine in engines)) == {
        "sdbot-gpu0_0",
        "sdbot-gpu1_0",
    }
    assert sorted(journal) == sorted([*(f"h{i}" for i in range(8)), "light"])
    # The light user waits for one job at most, whichever worker frees first...
    assert "light" in journal[:2]
    # ...and each worker ran the heavy user's jobs in that user's order.
    for engine in engines:
        mine = [int(p[1:]) for call in engine.prompts() for p in call if p.startswith("h")]
        assert mine == sorted(mine)


async def test_each_worker_prefers_jobs_for_the_model_it_has_loaded(db: Database) -> None:
    engines = [FakeEngine(step_delay=0.02), FakeEngine(step_delay=0.02)]
    engines[0].load(MODEL_A)
    engines[1].load(MODEL_B)
    ex = await on_workers(db, engines, max_batch=1)
    try:
        assert ex.status().loaded_models == [MODEL_A, MODEL_B]
        async with all_held(ex):
            b_jobs = [await ex.submit(origin(1), req(f"b{i}", model=MODEL_B)) for i in range(2)]
            a_jobs = [await ex.submit(origin(2), req(f"a{i}")) for i in range(2)]
        for job in [*b_jobs, *a_jobs]:
            assert isinstance((await events_of(job))[-1], Finished)
    finally:
        await ex.close()
    # Neither worker switched models, though the fair order alternates between them.
    assert engines[0].prompts() == [["a0"], ["a1"]]
    assert engines[1].prompts() == [["b0"], ["b1"]]


def test_an_executor_takes_an_engine_or_workers_not_both(db: Database) -> None:
    engine = FakeEngine()
    with pytest.raises(TypeError):
        GpuExecutor(engine, db, workers=[Worker(engine)])
    with pytest.raises(TypeError):
        GpuExecutor(db=db)


# -- shutdown -------------------------------------------------------------------------------


async def test_shutdown_cancels_running_and_interrupts_queued(db: Database) -> None:
    engine = FakeEngine(step_delay=0.01)
    ex = GpuExecutor(engine, db)
    await ex.start()
    running = await ex.submit(origin(1), req("long", steps=150))
    waiting = [await ex.submit(origin(2), req("w", steps=7)) for _ in range(2)]
    await until(running, Started)
    started = time.monotonic()
    await asyncio.wait_for(ex.close(), 5)
    assert time.monotonic() - started < 1
    assert await status(db, running) == "cancelled"
    assert [await status(db, j) for j in waiting] == ["interrupted", "interrupted"]
    assert not [r for r in await db.list_jobs() if r["status"] in ("queued", "running")]
    assert isinstance((await events_of(running))[-1], Failed)
    with pytest.raises(QueueFull):
        await ex.submit(origin(1), req())


async def test_shutdown_does_not_wait_forever_for_a_stuck_gpu(
    engine: FakeEngine, db: Database
) -> None:
    ex = GpuExecutor(engine, db, shutdown_timeout_s=0.2)
    await ex.start()
    stuck = await blocked(ex, engine)  # e.g. a model load: no step callback to stop it
    await asyncio.wait_for(ex.close(), 5)
    assert await status(db, stuck) == "interrupted"
    engine.release()
