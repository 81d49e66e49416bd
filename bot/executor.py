"""The one GPU executor: an asyncio queue in front of a single worker thread.

The event loop only schedules; the diffusion itself runs on one dedicated thread reached via
`loop.run_in_executor`, so heartbeats, other commands and progress edits keep flowing.
PNG encoding and database writes happen back on the loop side (or the default thread pool),
so the GPU thread is free for the next job as soon as its images exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from bot.db import Database, JobOrigin
from bot.errors import GenerationFailed, JobCancelled, QueueFull, SdbotError
from bot.imaging import encode_png, format_parameters, sampler_name
from bot.jobs import GenerationRequest

log = logging.getLogger(__name__)

#: Progress events closer together than this are dropped (the last step always goes out).
PROGRESS_INTERVAL_S = 0.2


class Engine(Protocol):
    def load(self, source: str) -> Any: ...

    def txt2img(self, request: GenerationRequest, *, on_step: Any = None) -> list[Image.Image]: ...


# -- events a job emits, in order: Queued*, Started, Progress*, then Finished or Failed ---------


@dataclass(frozen=True)
class Queued:
    position: int  # among waiting jobs; 1 = runs next


@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class Progress:
    step: int
    total: int


@dataclass(frozen=True)
class Finished:
    png: list[bytes]
    seeds: list[int]
    parameters: str
    gpu_seconds: float


@dataclass(frozen=True)
class Failed:
    error: SdbotError


Event = Queued | Started | Progress | Finished | Failed


@dataclass(eq=False)
class Job:
    id: int
    origin: JobOrigin
    request: GenerationRequest
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancel_requested: bool = False
    done: bool = False

    async def stream(self) -> AsyncIterator[Event]:
        """Yield this job's events until it finishes or fails."""
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return


class GpuExecutor:
    def __init__(self, engine: Engine, db: Database, *, queue_limit: int = 50) -> None:
        self.engine = engine
        self.db = db
        self.queue_limit = queue_limit
        # One thread, forever: CUDA contexts and pipelines are not shared across threads.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdbot-gpu")
        self._queue: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._jobs: dict[int, Job] = {}
        self._running: Job | None = None
        self._worker: asyncio.Task[None] | None = None
        self._post_tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.gpu_busy_s = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="sdbot-executor")

    async def close(self) -> None:
        """Cancel the running job, mark queued ones interrupted, stop the thread."""
        self._closing = True
        if self._running is not None:
            self._running.cancel_requested = True
        while self._queue:
            job = self._queue.popleft()
            await self._fail(job, "interrupted", JobCancelled("The bot is shutting down."))
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._post_tasks:
            await asyncio.gather(*self._post_tasks, return_exceptions=True)
        self._pool.shutdown(wait=True)

    # -- public API ---------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    async def submit(self, origin: JobOrigin, request: GenerationRequest) -> Job:
        """Record the job and queue it; a full queue is refused at once, and recorded."""
        params = request.as_dict()
        if self._closing or len(self._queue) >= self.queue_limit:
            error = QueueFull(
                f"The queue is full ({self.queue_limit} jobs waiting). "
                "Please try again in a minute."
            )
            await self.db.record_rejected(origin, params, error.reason, error.message)
            raise error
        job_id = await self.db.create_job(origin, params)
        job = Job(job_id, origin, request)
        self._jobs[job_id] = job
        self._queue.append(job)
        job.events.put_nowait(Queued(position=len(self._queue)))
        self._wakeup.set()
        return job

    async def cancel(self, job_id: int) -> bool:
        """Cancel a queued job at once, or a running one at its next step."""
        job = self._jobs.get(job_id)
        if job is None or job.done:
            return False
        if job in self._queue:
            self._queue.remove(job)
            await self._fail(job, "cancelled", JobCancelled("Cancelled before it started."))
            self._announce_positions()
        else:
            job.cancel_requested = True
        return True

    # -- the scheduler loop -------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            job = self._queue.popleft()
            self._running = job
            self._announce_positions()
            try:
                await self.db.mark_running(job.id)
                job.events.put_nowait(Started())
                started = time.perf_counter()
                images, sampler = await loop.run_in_executor(
                    self._pool, self._generate_on_gpu_thread, job, loop
                )
                gpu_s = time.perf_counter() - started
                self.gpu_busy_s += gpu_s
            except JobCancelled as exc:
                await self._fail(job, "cancelled", exc)
            except SdbotError as exc:
                await self._fail(job, "failed", exc)
            except Exception as exc:  # a bug or a driver error: fail this job only
                log.exception("job %d failed", job.id)
                public = GenerationFailed(
                    f"Generation failed unexpectedly (job #{job.id}); the error has been logged."
                )
                await self._fail(job, "failed", public, detail=f"{type(exc).__name__}: {exc}")
            else:
                task = asyncio.create_task(self._finish(job, images, sampler, gpu_s))
                self._post_tasks.add(task)
                task.add_done_callback(self._post_tasks.discard)
            finally:
                self._running = None

    def _generate_on_gpu_thread(
        self, job: Job, loop: asyncio.AbstractEventLoop
    ) -> tuple[list[Image.Image], str]:
        last_sent = 0.0

        def on_step(step: int, total: int) -> None:
            nonlocal last_sent
            if job.cancel_requested:
                raise JobCancelled("Cancelled while running.")
            now = time.monotonic()
            if step == total or now - last_sent >= PROGRESS_INTERVAL_S:
                last_sent = now
                loop.call_soon_threadsafe(job.events.put_nowait, Progress(step, total))

        if job.cancel_requested:
            raise JobCancelled("Cancelled before it started.")
        pipe = self.engine.load(job.request.model)
        images = self.engine.txt2img(job.request, on_step=on_step)
        return images, sampler_name(type(pipe.scheduler).__name__)

    async def _finish(
        self, job: Job, images: list[Image.Image], sampler: str, gpu_s: float
    ) -> None:
        req = job.request
        parameters = format_parameters(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            steps=req.steps,
            sampler=sampler,
            guidance=req.guidance,
            seed=req.seed,
            width=req.width,
            height=req.height,
            model=req.model,
        )
        try:
            pngs = await asyncio.to_thread(lambda: [encode_png(i, parameters) for i in images])
        except Exception as exc:
            log.exception("job %d: encoding failed", job.id)
            await self._fail(job, "failed", GenerationFailed(f"Could not encode the image: {exc}"))
            return
        await self.db.mark_done(job.id, "finished")
        job.done = True
        self._jobs.pop(job.id, None)
        job.events.put_nowait(Finished(pngs, [req.seed], parameters, gpu_s))

    async def _fail(
        self, job: Job, status: str, error: SdbotError, *, detail: str | None = None
    ) -> None:
        """End a job: the user sees error.message; the row keeps the internal detail if any."""
        await self.db.mark_done(job.id, status, reason=error.reason, error=detail or error.message)
        job.done = True
        self._jobs.pop(job.id, None)
        job.events.put_nowait(Failed(error))

    def _announce_positions(self) -> None:
        for index, job in enumerate(self._queue):
            job.events.put_nowait(Queued(position=index + 1))
