"""`GpuExecutor`, the `ImageBackend` the fronts use: admission, cancel, lookups, lifecycle.

Every method here runs on the event loop. It records jobs (admission caps hold even while
the row is being written), queues and cancels them through the `Dispatcher`, and leaves the
engine calls to the workers' threads and the rest of a job's life to `Delivery`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Generic, TypeVar, cast

from bot.backend import (
    BackendStatus,
    Event,
    GenerationEngine,
    ImageBackend,
    Job,
    JobOrigin,
    UserQueueFull,
)
from bot.db import Database
from bot.errors import JobCancelled, QueueFull
from bot.executor.delivery import Delivery, ModelLoadRecorder
from bot.executor.dispatch import Dispatcher
from bot.executor.fair_queue import FairQueue
from bot.executor.local_job import LocalJob
from bot.executor.worker import Worker
from bot.jobs import GenerationRequest

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=GenerationEngine)

#: A job's progress events closer together than this are dropped (the last step always goes).
PROGRESS_INTERVAL_S = 0.2
#: A job's previews are at least this far apart: Discord's message is edited at most once a
#: second (bot/discord_front/follower.py), so a preview made sooner would never be seen.
PREVIEW_INTERVAL_S = 1.0


class GpuExecutor(ImageBackend, Generic[E]):
    """The local ImageBackend: a fair queue, micro-batching, one thread per worker.

    `GpuExecutor(engine, db)` drives one worker on `engine`; `GpuExecutor(db=db, workers=[...])`
    drives several (one per GPU or remote replica), each taking the next batch when it is free.
    Generic over the engine so `executor.engine` keeps its own type (e.g. `Engine.on_load`).
    """

    def __init__(
        self,
        engine: E | None = None,
        db: Database | None = None,
        *,
        workers: Sequence[Worker[E]] = (),
        queue_limit: int = 50,
        user_queue_limit: int = 5,
        max_batch: int = 4,
        preview_every: int = 5,
        max_model_streak: int = 4,
        max_model_wait_s: float = 30.0,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
        preview_interval_s: float = PREVIEW_INTERVAL_S,
        shutdown_timeout_s: float = 10.0,
    ) -> None:
        """
        engine / workers: one engine (one worker is made for it), or the workers themselves.
        max_batch: images (sum of counts) per engine call.
        preview_every: steps between preview images; 0 = no previews.
        preview_interval_s: seconds between a job's preview images (with preview_every: both).
        max_model_streak / max_model_wait_s: a job for an already-loaded model may jump ahead
            of the fair pick (saving a model switch) at most this many times in a row, and
            never once the fair pick has waited this long.
        """
        if db is None:
            raise TypeError("GpuExecutor needs a database")
        if (engine is None) == (not workers):
            raise TypeError("GpuExecutor takes an engine or a list of workers: exactly one")
        self.workers: list[Worker[E]] = [Worker(engine)] if engine is not None else list(workers)
        self.db = db
        self.queue_limit = queue_limit
        self.user_queue_limit = user_queue_limit
        self.shutdown_timeout_s = shutdown_timeout_s
        self._queue: FairQueue[LocalJob] = FairQueue(
            max_batch=max_batch,
            max_model_streak=max_model_streak,
            max_model_wait_s=max_model_wait_s,
        )
        self._delivery = Delivery(db)
        self._dispatch = Dispatcher(
            self.workers,
            self._queue,
            self._delivery,
            preview_every=preview_every,
            progress_interval_s=progress_interval_s,
            preview_interval_s=preview_interval_s,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reserved_total = 0  # admissions in flight (awaiting the DB insert)
        self._reserved: dict[int, int] = {}
        self._recorder: ModelLoadRecorder | None = None
        self._started_at = time.monotonic()
        self._closed = False

    @property
    def engine(self) -> E:
        """The first worker's engine (the only one, unless built from workers)."""
        return self.workers[0].engine

    @property
    def max_batch(self) -> int:
        return self._queue.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        self._queue.max_batch = max(1, value)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started_at = time.monotonic()
        # Each worker's thread lives inside one run_in_executor call until close().
        self._dispatch.start(self._loop)

    async def close(self) -> None:
        """Cancel running jobs at their next step, mark queued ones interrupted, stop."""
        if self._closed:
            return
        self._closed = True
        queued, calls = self._dispatch.close()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the executor is closed"))
        for job in queued:
            self._delivery.end(
                job,
                "interrupted",
                JobCancelled("The bot is shutting down; this job did not start. Try again later."),
                reason="shutdown",
            )
        threads = [w.future for w in self.workers if w.future is not None]
        if threads:
            done, pending = await asyncio.wait(threads, timeout=self.shutdown_timeout_s)
            for thread in done:
                if not thread.cancelled() and thread.exception() is not None:
                    log.error("a worker thread crashed", exc_info=thread.exception())
            if pending:
                # A model load cannot be interrupted; do not hold the shutdown hostage to it.
                log.warning(
                    "%d worker thread(s) still busy after %.0fs; not waiting",
                    len(pending),
                    self.shutdown_timeout_s,
                )
                for job in self._dispatch.running():
                    self._delivery.end(
                        job,
                        "interrupted",
                        JobCancelled("The bot shut down while this job was running."),
                        reason="shutdown",
                    )
        await self._delivery.drain()
        if self._recorder is not None:
            await self._recorder.drain()
        for worker in self.workers:
            worker.shutdown()

    def load_recorder(self) -> ModelLoadRecorder:
        """An engine `on_load` callback writing model loads to this executor's database."""
        if self._recorder is None:
            self._recorder = ModelLoadRecorder(self.db, self._loop)
        return self._recorder

    async def run_on_gpu_thread(self, fn: Callable[[], T], *, worker: int = 0) -> T:
        """Run `fn` on a worker's thread (the first's by default) before its next batch
        (preloading, measurements)."""
        return cast(T, await asyncio.wrap_future(self._dispatch.call(fn, worker)))

    async def preload(self, model: str) -> None:
        """Load `model` on every worker now so the first job does not pay for it."""
        await asyncio.gather(
            *(
                self.run_on_gpu_thread(functools.partial(self._load, w, model), worker=i)
                for i, w in enumerate(self.workers)
            )
        )

    def _load(self, worker: Worker[E], model: str) -> None:
        """On `worker`'s thread: load `model` and learn the name its engine lists it under,
        before the worker takes a batch, so that a job spelling it the same way is not told
        it waits on a load."""
        worker.engine.load(model)
        loaded = worker.loaded_models()
        if loaded:
            self._dispatch.learn(model, loaded[-1])  # the model just used is the newest

    # -- public API ---------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return self._dispatch.queue_length

    def get(self, job_id: int) -> Job | None:
        return self._delivery.get(job_id)

    def positions(self) -> dict[int, int]:
        """Job id -> place in line (1 = next) for every waiting job, as Queued reports it."""
        return self._dispatch.positions()

    def status(self) -> BackendStatus:
        return self._dispatch.status(time.monotonic() - self._started_at)

    async def submit(
        self, origin: JobOrigin, request: GenerationRequest, *, user_limit: int | None = None
    ) -> Job:
        """Record the job and queue it; a full queue is refused at once, and recorded.

        `user_limit` overrides `user_queue_limit` for this call (e.g. a server's own setting).
        """
        user = origin.user_id
        limit = self.user_queue_limit if user_limit is None else user_limit
        params = request.as_dict()
        refusal = self._refusal(user, limit)
        if refusal is not None:
            await self.db.record_rejected(origin, params, refusal.reason, refusal.message)
            raise refusal
        # Hold the place while the row is written, so concurrent submits cannot overshoot a cap.
        self._reserved_total += 1
        self._reserved[user] = self._reserved.get(user, 0) + 1
        try:
            job_id = await self.db.create_job(origin, params)
        finally:
            self._reserved_total -= 1
            self._reserved[user] -= 1
            if not self._reserved[user]:
                del self._reserved[user]
        job = LocalJob(job_id, origin, request)
        if not self._dispatch.enqueue(job):
            error = QueueFull("The bot is shutting down; please try again in a minute.")
            await self.db.mark_done(job_id, "interrupted", reason="shutdown", error=error.message)
            raise error
        # Before anything the workers report about it reaches the loop.
        self._delivery.track(job)
        return job

    async def generate(
        self, origin: JobOrigin, request: GenerationRequest, *, user_limit: int | None = None
    ) -> AsyncGenerator[Event, None]:
        """submit() then stream(); QueueFull surfaces on the first iteration. Leaving the loop
        before the end cancels the job."""
        job = await self.submit(origin, request, user_limit=user_limit)
        try:
            async for event in job.stream():
                yield event
        finally:
            if not job.done:
                await self.cancel(job.id)

    async def cancel(self, job_id: int) -> bool:
        """Cancel a queued job at once, or a running one at its next step. False if it is
        unknown, already over, or past its last step."""
        job = self._delivery.get(job_id)
        if job is None or job.done:
            return False
        state = self._dispatch.cancel(job)
        if state == "queued":
            ended = self._delivery.end(
                job, "cancelled", JobCancelled("Cancelled before it started.")
            )
            self._dispatch.reorder()
            if ended is not None:
                await ended  # so that the row says cancelled when this returns
            return True
        return state == "running"

    def _refusal(self, user: int, limit: int) -> QueueFull | None:
        if self._dispatch.closing:
            return QueueFull("The bot is shutting down; please try again in a minute.")
        waiting, mine = self._dispatch.waiting(user)
        waiting += self._reserved_total
        mine += self._reserved.get(user, 0)
        if mine >= limit:
            jobs = "job" if mine == 1 else "jobs"
            return UserQueueFull(
                f"You already have {mine} {jobs} waiting (the limit is {limit}). "
                "Wait for one to finish, or cancel one, then try again."
            )
        if waiting >= self.queue_limit:
            return QueueFull(
                f"The queue is full ({self.queue_limit} jobs waiting). "
                "Please try again in a minute."
            )
        return None
