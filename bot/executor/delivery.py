"""Delivery: what happens to a job off the workers' threads, on the event loop.

Everything here runs on the event loop, except the PNG encoding (results, grids, previews),
which runs in `asyncio.to_thread` so that neither the loop nor a worker waits on it. It writes
the job rows (mark_running, mark_done) and model-load records, and puts each job's events on
its queue: Started, Loading when the model must be loaded first, Progress (with previews, in
order), then exactly one Finished or Failed, after the row that says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from bot.backend import (
    Event,
    Failed,
    Finished,
    Loading,
    LoadRecord,
    Progress,
    ResultLike,
    Started,
)
from bot.db import Database
from bot.errors import GenerationFailed, JobCancelled, SdbotError, without_frames
from bot.executor.local_job import LocalJob, Outcome
from bot.imaging import encode_pngs, preview_png, request_parameters

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Delivery", "ModelLoadRecorder"]

log = logging.getLogger(__name__)


class Delivery:
    """The live jobs, and the one way each of them ends. Event loop only."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._jobs: dict[int, LocalJob] = {}  # submitted and not concluded yet
        self._tasks: set[asyncio.Task[None]] = set()

    def track(self, job: LocalJob) -> None:
        self._jobs[job.id] = job

    def get(self, job_id: int) -> LocalJob | None:
        return self._jobs.get(job_id)

    # -- what the workers report, handed over to the loop -----------------------------------

    def started(self, jobs: Sequence[LocalJob]) -> None:
        for job in jobs:
            if not job.done:
                job.events.put_nowait(Started())
                self.spawn(self.db.mark_running(job.id))

    def loading(self, jobs: Sequence[LocalJob], model: str) -> None:
        for job in jobs:
            if not job.done:
                job.events.put_nowait(Loading(model))

    def progress(self, job: LocalJob, step: int, total: int, preview: Image.Image | None) -> None:
        if job.done:
            return
        event = Progress(step, total)
        if job.preview_task is not None:
            # A preview is still being encoded: keep the order and send only the latest.
            job.held_progress = event
        elif preview is None:
            job.events.put_nowait(event)
        else:
            job.preview_task = self.spawn(self._send_preview(job, event, preview))

    async def _send_preview(self, job: LocalJob, event: Progress, image: Image.Image) -> None:
        try:
            png: bytes | None = await asyncio.to_thread(preview_png, image)
        except Exception:
            log.warning("could not encode a preview for job %d", job.id, exc_info=True)
            png = None
        job.preview_task = None
        held, job.held_progress = job.held_progress, None
        if job.done:
            return
        job.events.put_nowait(replace(event, preview=png))
        if held is not None:
            job.events.put_nowait(held)

    def cancelled(self, job: LocalJob, *, shutting_down: bool) -> None:
        message = "The bot is shutting down." if shutting_down else "Cancelled while running."
        self.end(job, "cancelled", JobCancelled(message))

    def batch_done(
        self,
        jobs: Sequence[LocalJob],
        outcomes: dict[int, Outcome],
        seconds: float,
        *,
        shutting_down: bool,
    ) -> None:
        """Conclude each job of a batch that took `seconds` of a worker's time."""
        images = sum(job.request.count for job in jobs)
        for job in jobs:
            outcome = outcomes[job.id]
            if job.done:
                continue
            if outcome.cancelled or job.cancel_requested:
                # Also a cancel that came after the last step but before this: cancel() said
                # yes, so the user must not get the images after all.
                self.cancelled(job, shutting_down=shutting_down)
            elif outcome.error is not None:
                self.fail(job, outcome.error)
            elif len(outcome.results) == 0:
                self.fail(job, GenerationFailed("The engine returned no image."))
            else:
                job.state = "finishing"
                share = seconds * job.request.count / images
                self.spawn(self._finish(job, outcome.results, share))

    async def _finish(
        self, job: LocalJob, results: list[tuple[int, ResultLike]], gpu_s: float
    ) -> None:
        if job.preview_task is not None:
            # Let the last preview (and any progress held behind it) go out first.
            await asyncio.gather(job.preview_task, return_exceptions=True)
        results.sort(key=lambda item: item[0])
        pictures = [image for _, result in results for image in result.images]
        seeds = [seed for _, result in results for seed in result.seeds]
        nsfw = [flag for _, result in results for flag in result.nsfw]
        sampler = results[0][1].sampler
        parameters = [request_parameters(job.request, seed=s, sampler=sampler) for s in seeds]
        try:
            pngs, grid = await asyncio.to_thread(encode_pngs, pictures, parameters)
        except Exception as exc:
            log.exception("job %d: encoding failed", job.id)
            self.end(
                job,
                "failed",
                GenerationFailed("The image was made but could not be saved as PNG."),
                detail=f"{type(exc).__name__}: {exc}",
            )
            return
        finished = Finished(
            images=pngs,
            grid=grid,
            seeds=seeds,
            nsfw=nsfw,
            parameters=parameters,
            gpu_seconds=gpu_s,
        )
        self.end(job, "finished", None, event=finished, gpu_seconds=gpu_s)

    # -- the end of a job -------------------------------------------------------------------

    def fail(self, job: LocalJob, exc: BaseException) -> None:
        """Fail one job: the user sees a plain message, the row keeps the detail."""
        if isinstance(exc, SdbotError):
            # The engine keeps the original error as a note (its frames would pin memory);
            # other raisers may still chain it as the cause.
            notes = list(getattr(exc, "__notes__", ()))
            cause = exc.__cause__
            if cause is not None:
                notes.append(f"{type(cause).__name__}: {cause}")
            detail = f"{exc.message} ({'; '.join(notes)})" if notes else None
            self.end(job, "failed", exc, detail=detail)
            return
        log.error("job %d failed", job.id, exc_info=exc)
        public = GenerationFailed(
            f"Generation failed unexpectedly (job #{job.id}); the error has been logged."
        )
        self.end(job, "failed", public, detail=f"{type(exc).__name__}: {exc}")

    def end(
        self,
        job: LocalJob,
        status: str,
        error: SdbotError | None,
        *,
        event: Event | None = None,
        reason: str | None = None,
        detail: str | None = None,
        gpu_seconds: float | None = None,
    ) -> asyncio.Task[None] | None:
        """Conclude a job once: write its final row, then send its last event."""
        if job.done:
            return None
        job.done = True
        job.state = "done"
        self._jobs.pop(job.id, None)
        if event is None:
            assert error is not None
            # The event outlives the job (fronts keep it while replying): it must not keep the
            # frames of the failure, and with them the failed run's tensors, alive.
            event = Failed(without_frames(error, unchain=True))
        if error is not None:
            reason = reason or error.reason
            detail = detail or error.message
        return self.spawn(self._record_end(job, status, event, reason, detail, gpu_seconds))

    async def _record_end(
        self,
        job: LocalJob,
        status: str,
        event: Event,
        reason: str | None,
        detail: str | None,
        gpu_seconds: float | None,
    ) -> None:
        try:
            await self.db.mark_done(
                job.id, status, reason=reason, error=detail, gpu_seconds=gpu_seconds
            )
        except Exception:
            log.exception("could not record the end of job %d", job.id)
        # After the row: whoever reads the event may look the row up.
        job.events.put_nowait(event)

    # -- background tasks -------------------------------------------------------------------

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        async def run() -> None:
            try:
                await coro
            except Exception:
                log.exception("executor background task failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for every row write and encoding in flight, including those they start."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class ModelLoadRecorder:
    """The engine's `on_load` callback: forwards load records from a worker thread to the DB.

    Built on the event loop (it remembers the loop); safe to call from any thread.
    """

    def __init__(self, db: Database, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.db = db
        self._loop = loop or asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, record: LoadRecord) -> None:
        try:
            self._loop.call_soon_threadsafe(self._start, record)
        except RuntimeError:  # the loop is closed: the process is exiting
            log.info("model load of %s not recorded: event loop closed", record.model)

    def _start(self, record: LoadRecord) -> None:
        task = self._loop.create_task(self._write(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, record: LoadRecord) -> None:
        try:
            await self.db.record_model_load(
                model=record.model,
                source=record.source,
                ok=record.ok,
                seconds=record.seconds,
                memory_mb=record.memory_mb,
                error=record.error,
            )
        except Exception:
            log.exception("could not record the load of model %s", record.model)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


# -- encoding, in asyncio.to_thread ---------------------------------------------------------
