"""The local GPU backend: a fair per-user queue in front of one GPU thread.

Division of labour:
- The event loop decides what runs next. Whenever the queue changes it plans the next batch
  (fair pick, model preference, compatible jobs up to `max_batch` images) and stages it.
- One dedicated GPU thread (a single `run_in_executor` call on a one-worker pool, because CUDA
  contexts and pipelines are not shared across threads) takes whatever is staged the moment it
  is free, runs one `engine.generate` call, hands the raw images back to the loop with
  `call_soon_threadsafe` and takes the next staged batch without waiting for the loop. A
  threading lock guards the queue because both sides touch it; it is held for microseconds.
- PNG encoding, grids, preview PNGs and database writes run on the loop or in
  `asyncio.to_thread`, never on the GPU thread.

Fairness is "least recently served user first": users are ordered by when they were last
served, and each user's jobs run in their own order, so a user with 20 queued jobs delays a
newcomer by at most the job already on the GPU.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import io
import itertools
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Generic, Literal, TypeVar, cast

from bot.backend import (
    BackendStatus,
    Event,
    Failed,
    Finished,
    GenerationEngine,
    ImageBackend,
    Job,
    JobOrigin,
    LoadRecordLike,
    Progress,
    Queued,
    ResultLike,
    Started,
    StepInfoLike,
    UserQueueFull,
)
from bot.db import Database
from bot.errors import (
    GenerationFailed,
    GpuOutOfMemory,
    JobCancelled,
    ModelLoadError,
    QueueFull,
    SdbotError,
)
from bot.imaging import encode_png, make_grid, request_parameters
from bot.jobs import GenerationRequest

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "BackendStatus",
    "Event",
    "Failed",
    "Finished",
    "GpuExecutor",
    "ImageBackend",
    "Job",
    "ModelLoadRecorder",
    "Progress",
    "Queued",
    "Started",
    "UserQueueFull",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=GenerationEngine)

#: A job's progress events closer together than this are dropped (the last step always goes).
PROGRESS_INTERVAL_S = 0.2

JobState = Literal["queued", "running", "finishing", "done"]


@dataclass(eq=False)
class _LocalJob(Job):
    # Guarded by GpuExecutor._lock: "queued" -> "running" happens on the GPU thread.
    state: JobState = "queued"
    seq: int = 0  # submission order, the tie-break between users never served
    # Loop-side only.
    last_position: int | None = None
    preview_task: asyncio.Task[None] | None = field(default=None, repr=False)
    held_progress: Progress | None = None


@dataclass(eq=False)
class _Batch:
    jobs: list[_LocalJob]
    override: bool  # the lead was picked for its loaded model over the fair pick


@dataclass(eq=False)
class _Part:
    """Images of one job in one engine call: the whole job, or a slice after an OOM split."""

    job: _LocalJob
    request: GenerationRequest
    offset: int  # index of this part's first image within the job


@dataclass(eq=False)
class _Outcome:
    results: list[tuple[int, ResultLike]] = field(default_factory=list)
    error: BaseException | None = None
    cancelled: bool = False


@dataclass
class _Throttle:
    last_sent: float = -math.inf
    last_preview_step: int = 0


class _Sink:
    """Collects one batch's outcomes on the GPU thread; tells the loop about cancels at once."""

    def __init__(self, executor: GpuExecutor, batch: _Batch) -> None:
        self.executor = executor
        self.outcomes: dict[int, _Outcome] = {job.id: _Outcome() for job in batch.jobs}
        self.throttles: dict[int, _Throttle] = {}

    def dead(self, job: _LocalJob) -> bool:
        outcome = self.outcomes[job.id]
        return outcome.cancelled or outcome.error is not None

    def cancelled(self, job: _LocalJob) -> None:
        outcome = self.outcomes[job.id]
        if outcome.cancelled or outcome.error is not None:
            return
        outcome.cancelled = True
        # Tell the user now, not when the rest of the batch is done.
        self.executor._post(self.executor._on_cancelled, job)

    def fail(self, job: _LocalJob, error: BaseException) -> None:
        outcome = self.outcomes[job.id]
        if not outcome.cancelled and outcome.error is None:
            outcome.error = error

    def any_results(self) -> bool:
        return any(outcome.results for outcome in self.outcomes.values())

    def ok(self, part: _Part, result: ResultLike) -> None:
        if not self.dead(part.job):
            self.outcomes[part.job.id].results.append((part.offset, result))


class ModelLoadRecorder:
    """The engine's `on_load` callback: forwards load records from the GPU thread to the DB.

    Built on the event loop (it remembers the loop); safe to call from any thread.
    """

    def __init__(self, db: Database, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.db = db
        self._loop = loop or asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, record: LoadRecordLike) -> None:
        try:
            self._loop.call_soon_threadsafe(self._start, record)
        except RuntimeError:  # the loop is closed: the process is exiting
            log.info("model load of %s not recorded: event loop closed", record.model)

    def _start(self, record: LoadRecordLike) -> None:
        task = self._loop.create_task(self._write(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, record: LoadRecordLike) -> None:
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


class GpuExecutor(ImageBackend, Generic[E]):
    """The local ImageBackend: fair queue, micro-batching, one GPU thread.

    Generic over the engine so `executor.engine` keeps its own type (e.g. `Engine.on_load`).
    """

    def __init__(
        self,
        engine: E,
        db: Database,
        *,
        queue_limit: int = 50,
        user_queue_limit: int = 5,
        max_batch: int = 4,
        preview_every: int = 5,
        max_model_streak: int = 4,
        max_model_wait_s: float = 30.0,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
        shutdown_timeout_s: float = 10.0,
    ) -> None:
        """
        max_batch: images (sum of counts) per engine call.
        preview_every: steps between preview images; 0 = no previews.
        max_model_streak / max_model_wait_s: a job for an already-loaded model may jump ahead
            of the fair pick (saving a model switch) at most this many times in a row, and
            never once the fair pick has waited this long.
        """
        self.engine = engine
        self.db = db
        self.queue_limit = queue_limit
        self.user_queue_limit = user_queue_limit
        self.max_batch = max(1, max_batch)
        self.preview_every = max(0, preview_every)
        self.max_model_streak = max_model_streak
        self.max_model_wait_s = max_model_wait_s
        self.progress_interval_s = progress_interval_s
        self.shutdown_timeout_s = shutdown_timeout_s

        # One thread, forever: CUDA contexts and pipelines are not shared across threads.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdbot-gpu")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gpu_future: asyncio.Future[None] | None = None

        # Shared with the GPU thread; every access holds _lock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting: dict[int, deque[_LocalJob]] = {}  # user id -> that user's queued jobs
        self._served: dict[int, int] = {}  # user id -> sequence number of their last service
        self._serve_seq = itertools.count(1)
        self._staged: _Batch | None = None
        self._running: dict[int, _LocalJob] = {}
        self._calls: deque[tuple[Callable[[], object], concurrent.futures.Future[object]]] = deque()
        self._loaded: list[str] = []
        # request.model spelling -> the name the engine lists it under in loaded_models (a
        # source and a catalog name may be the same model); learnt after each batch.
        self._names: dict[str, str] = {}
        self._streak = 0
        self._closing = False
        self._gpu_busy_s = 0.0
        self._busy_since: float | None = None  # perf_counter() when the current work began

        # Loop-side only.
        self._jobs: dict[int, _LocalJob] = {}
        self._submit_seq = itertools.count(1)
        self._reserved_total = 0  # admissions in flight (awaiting the DB insert)
        self._reserved: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._recorder: ModelLoadRecorder | None = None
        self._started_at = time.monotonic()
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started_at = time.monotonic()
        with self._lock:
            self._loaded = _loaded_models(self.engine)
        # The GPU thread lives inside this one call until close().
        self._gpu_future = self._loop.run_in_executor(self._pool, self._gpu_main)

    async def close(self) -> None:
        """Cancel running jobs at their next step, mark queued ones interrupted, stop."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._closing = True
            self._staged = None
            queued = [job for jobs in self._waiting.values() for job in jobs]
            self._waiting.clear()
            for job in queued:
                job.state = "done"
            for job in self._running.values():
                job.cancel_requested = True
            calls, self._calls = list(self._calls), deque()
            self._cond.notify_all()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the executor is closed"))
        for job in queued:
            self._end(
                job,
                "interrupted",
                JobCancelled("The bot is shutting down; this job did not start. Try again later."),
                reason="shutdown",
            )
        if self._gpu_future is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._gpu_future), self.shutdown_timeout_s)
            except TimeoutError:
                # A model load cannot be interrupted; do not hold the shutdown hostage to it.
                log.warning(
                    "GPU thread still busy after %.0fs; not waiting", self.shutdown_timeout_s
                )
                with self._lock:
                    stuck = list(self._running.values())
                for job in stuck:
                    self._end(
                        job,
                        "interrupted",
                        JobCancelled("The bot shut down while this job was running."),
                        reason="shutdown",
                    )
            except Exception:
                log.exception("the GPU thread crashed")
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._recorder is not None:
            await self._recorder.drain()
        self._pool.shutdown(wait=False)

    def load_recorder(self) -> ModelLoadRecorder:
        """An engine `on_load` callback writing model loads to this executor's database."""
        if self._recorder is None:
            self._recorder = ModelLoadRecorder(self.db, self._loop)
        return self._recorder

    async def run_on_gpu_thread(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the GPU thread before the next batch (preloading, measurements)."""
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise RuntimeError("the executor is closed")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return cast(T, await asyncio.wrap_future(future))

    async def preload(self, model: str) -> None:
        """Load `model` now so the first job does not pay for it."""
        await self.run_on_gpu_thread(lambda: self.engine.load(model))

    # -- public API ---------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        with self._lock:
            return sum(len(jobs) for jobs in self._waiting.values())

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def positions(self) -> dict[int, int]:
        """Job id -> place in line (1 = next) for every waiting job, as Queued reports it."""
        with self._lock:
            return {job.id: position for position, job in enumerate(self._order_locked(), 1)}

    def status(self) -> BackendStatus:
        with self._lock:
            return BackendStatus(
                queue_length=sum(len(jobs) for jobs in self._waiting.values()),
                queued_per_user={user: len(jobs) for user, jobs in self._waiting.items()},
                running=[job.id for job in self._running.values() if not job.done],
                loaded_models=list(self._loaded),
                gpu_busy_s=self._busy_locked(),
                uptime_s=time.monotonic() - self._started_at,
                closing=self._closing,
            )

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
        job = _LocalJob(job_id, origin, request, seq=next(self._submit_seq))
        with self._lock:
            closing = self._closing
            if not closing:
                self._waiting.setdefault(user, deque()).append(job)
        if closing:
            error = QueueFull("The bot is shutting down; please try again in a minute.")
            await self.db.mark_done(job_id, "interrupted", reason="shutdown", error=error.message)
            raise error
        self._jobs[job_id] = job
        self._replan()
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
        job = self._jobs.get(job_id)
        if job is None or job.done:
            return False
        with self._lock:
            state = job.state
            if state in ("queued", "running"):
                job.cancel_requested = True
            if state == "queued":
                self._remove_waiting_locked(job)
                job.state = "done"
                if self._staged is not None and job in self._staged.jobs:
                    self._staged = None  # replanned below, before the GPU thread can take it
        if state == "queued":
            ended = self._end(job, "cancelled", JobCancelled("Cancelled before it started."))
            self._replan()
            if ended is not None:
                await ended  # so that the row says cancelled when this returns
            return True
        return state == "running"

    # -- admission ----------------------------------------------------------------------------

    def _refusal(self, user: int, limit: int) -> QueueFull | None:
        with self._lock:
            if self._closing:
                return QueueFull("The bot is shutting down; please try again in a minute.")
            waiting = sum(len(jobs) for jobs in self._waiting.values()) + self._reserved_total
            mine = len(self._waiting.get(user, ())) + self._reserved.get(user, 0)
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

    # -- planning (event loop) ----------------------------------------------------------------

    def _replan(self) -> None:
        """Stage the next batch and tell every waiting job whose place changed."""
        with self._cond:
            if self._closing:
                return
            order = self._fair_order_locked()
            self._staged = self._plan_locked(order) if order else None
            if self._staged is not None:
                self._cond.notify_all()
            order = self._order_locked(order)
        for position, job in enumerate(order, start=1):
            if job.last_position != position and not job.done:
                job.last_position = position
                job.events.put_nowait(Queued(position=position))

    def _order_locked(self, fair: list[_LocalJob] | None = None) -> list[_LocalJob]:
        """The expected running order: the staged batch, then the fair order."""
        fair = self._fair_order_locked() if fair is None else fair
        if self._staged is None:
            return fair
        staged = [job for job in self._staged.jobs if job.state == "queued"]
        chosen = set(staged)
        return staged + [job for job in fair if job not in chosen]

    def _fair_order_locked(self) -> list[_LocalJob]:
        """Round-robin over users, least recently served first; each user's jobs in order."""
        users = sorted(
            self._waiting,
            key=lambda user: (self._served.get(user, 0), self._waiting[user][0].seq),
        )
        queues = [self._waiting[user] for user in users]
        order: list[_LocalJob] = []
        depth = 0
        while queues:
            order.extend(queue[depth] for queue in queues)
            depth += 1
            queues = [queue for queue in queues if len(queue) > depth]
        return order

    def _plan_locked(self, order: list[_LocalJob]) -> _Batch:
        lead, override = order[0], False
        loaded = self._loaded
        if (
            loaded
            and not self._is_loaded_locked(lead)
            and self._streak < self.max_model_streak
            and time.monotonic() - lead.submitted_at < self.max_model_wait_s
        ):
            # Switching models costs seconds; a job for a loaded model may go first, boundedly.
            preferred = next((job for job in order if self._is_loaded_locked(job)), None)
            if preferred is not None:
                lead, override = preferred, True
        key = lead.request.batch_key()
        jobs, images = [lead], lead.request.count
        for job in order:
            if images >= self.max_batch:
                break
            if job is lead or images + job.request.count > self.max_batch:
                continue
            if job.request.batch_key() == key:
                jobs.append(job)
                images += job.request.count
        return _Batch(jobs, override)

    def _is_loaded_locked(self, job: _LocalJob) -> bool:
        model = job.request.model
        return self._names.get(model, model) in self._loaded

    def _remove_waiting_locked(self, job: _LocalJob) -> None:
        jobs = self._waiting.get(job.user_id)
        if jobs is None:
            return
        jobs.remove(job)
        if not jobs:
            del self._waiting[job.user_id]

    # -- the GPU thread -----------------------------------------------------------------------

    def _gpu_main(self) -> None:
        while True:
            call: tuple[Callable[[], object], concurrent.futures.Future[object]] | None = None
            batch: _Batch | None = None
            sink: _Sink | None = None
            with self._cond:
                while not (self._calls or self._staged or self._closing):
                    self._cond.wait()
                if self._calls:
                    call = self._calls.popleft()
                elif self._staged is not None:
                    batch = self._take_locked()
                else:
                    return
                started = self._busy_since = time.perf_counter()
            if call is not None:
                fn, future = call
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
            elif batch is not None:
                self._post(self._on_taken, batch)
                sink = _Sink(self, batch)
                try:
                    self._run_parts([_Part(job, job.request, 0) for job in batch.jobs], sink)
                except Exception as exc:  # a bug here must not kill the GPU thread
                    log.exception("executor error while running a batch")
                    for job in batch.jobs:
                        sink.fail(job, exc)
            elapsed = time.perf_counter() - started
            loaded = _loaded_models(self.engine)
            learnt = None
            if batch is not None and sink is not None and loaded and sink.any_results():
                # The model a successful call used is the most recently used one.
                learnt = (batch.jobs[0].request.model, loaded[-1])
            with self._lock:
                self._gpu_busy_s += elapsed
                self._busy_since = None
                self._loaded = loaded
                if learnt is not None:
                    if len(self._names) > 1000:
                        self._names.clear()
                    self._names[learnt[0]] = learnt[1]
            if batch is not None and sink is not None:
                self._post(self._on_batch_done, batch, sink.outcomes, elapsed)

    def _busy_locked(self) -> float:
        """Seconds of GPU-thread work so far, the work in progress included."""
        running = 0.0 if self._busy_since is None else time.perf_counter() - self._busy_since
        return self._gpu_busy_s + running

    def _take_locked(self) -> _Batch:
        batch = self._staged
        assert batch is not None
        self._staged = None
        # Staging and every removal from the queue happen under this lock, so the jobs are all
        # still queued; the filter is a second line of defence.
        batch.jobs = [job for job in batch.jobs if job.state == "queued"]
        for job in batch.jobs:
            self._remove_waiting_locked(job)
            job.state = "running"
            self._running[job.id] = job
            self._served[job.user_id] = next(self._serve_seq)
        self._streak = self._streak + 1 if batch.override else 0
        if batch.jobs:
            # Plan the following batch as if this one's model were loaded already (it will be).
            model = batch.jobs[0].request.model
            model = self._names.get(model, model)
            keep = max(1, int(getattr(self.engine, "max_loaded", 1)))
            self._loaded = ([m for m in self._loaded if m != model] + [model])[-keep:]
        if len(self._served) > 10_000:  # forget long-gone users; their order no longer matters
            self._served = {u: s for u, s in self._served.items() if u in self._waiting}
        return batch

    def _run_parts(self, parts: list[_Part], sink: _Sink) -> None:
        """One engine call for `parts`; on OOM split in halves; on an error find the culprit."""
        live: list[_Part] = []
        for part in parts:
            if part.job.cancel_requested or self._closing:
                sink.cancelled(part.job)
            elif not sink.dead(part.job):
                live.append(part)
        if not live:
            return
        try:
            results = self.engine.generate(
                [part.request for part in live], on_step=self._step_callback(live, sink)
            )
        except JobCancelled:
            # on_step raises only once every job in the call is cancelled (or on shutdown).
            for part in live:
                sink.cancelled(part.job)
            return
        except Exception as exc:
            if _is_oom(exc):
                _free_gpu_memory()
                if len(live) > 1:
                    half = len(live) // 2
                    log.warning("out of GPU memory with %d jobs; retrying in halves", len(live))
                    self._run_parts(live[:half], sink)
                    self._run_parts(live[half:], sink)
                elif live[0].request.count > 1:
                    for half_part in _split_images(live[0]):
                        self._run_parts([half_part], sink)
                else:
                    req = live[0].request
                    oom = GpuOutOfMemory(
                        f"The GPU ran out of memory for this {req.width}×{req.height} image even "
                        "when it ran on its own. Try a smaller size."
                    )
                    oom.__cause__ = exc
                    sink.fail(live[0].job, oom)
                return
            if len(live) > 1 and not isinstance(exc, ModelLoadError) and not self._closing:
                # One bad request must not fail its batch-mates: rerun each alone.
                log.warning("a batch of %d failed (%s); retrying one by one", len(live), exc)
                for part in live:
                    self._run_parts([part], sink)
                return
            for part in live:
                sink.fail(part.job, exc)
            return
        if len(results) != len(live):
            wrong = GenerationFailed("The engine returned the wrong number of results.")
            for part in live:
                sink.fail(part.job, wrong)
            return
        for part, result in zip(live, results, strict=True):
            sink.ok(part, result)

    def _step_callback(self, live: list[_Part], sink: _Sink) -> Callable[[StepInfoLike], None]:
        def on_step(info: StepInfoLike) -> None:
            running = False
            for index, part in enumerate(live):
                job = part.job
                if job.cancel_requested or self._closing:
                    sink.cancelled(job)
                    continue
                if sink.dead(job):
                    continue
                running = True
                self._progress(job, index, info, sink)
            if not running:
                raise JobCancelled("Cancelled while running.")

        return on_step

    def _progress(self, job: _LocalJob, index: int, info: StepInfoLike, sink: _Sink) -> None:
        throttle = sink.throttles.setdefault(job.id, _Throttle())
        now = time.monotonic()
        last = info.step >= info.total
        if not last and now - throttle.last_sent < self.progress_interval_s:
            return
        throttle.last_sent = now
        preview: Image.Image | None = None
        if (
            self.preview_every
            and not last  # the finished image follows at once; no point previewing it
            and info.step - throttle.last_preview_step >= self.preview_every
        ):
            throttle.last_preview_step = info.step
            try:
                preview = info.preview(index)
            except Exception:
                log.warning("preview failed for job %d", job.id, exc_info=True)
        self._post(self._on_progress, job, info.step, info.total, preview)

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the process is exiting
            log.debug("dropped %s: event loop closed", getattr(fn, "__name__", fn))

    # -- back on the event loop ---------------------------------------------------------------

    def _on_taken(self, batch: _Batch) -> None:
        for job in batch.jobs:
            if not job.done:
                job.events.put_nowait(Started())
                self._spawn(self.db.mark_running(job.id))
        self._replan()

    def _on_progress(
        self, job: _LocalJob, step: int, total: int, preview: Image.Image | None
    ) -> None:
        if job.done:
            return
        event = Progress(step, total)
        if job.preview_task is not None:
            # A preview is still being encoded: keep the order and send only the latest.
            job.held_progress = event
        elif preview is None:
            job.events.put_nowait(event)
        else:
            job.preview_task = self._spawn(self._send_preview(job, event, preview))

    async def _send_preview(self, job: _LocalJob, event: Progress, image: Image.Image) -> None:
        try:
            png: bytes | None = await asyncio.to_thread(_preview_png, image)
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

    def _on_cancelled(self, job: _LocalJob) -> None:
        message = "The bot is shutting down." if self._closing else "Cancelled while running."
        self._end(job, "cancelled", JobCancelled(message))

    def _on_batch_done(self, batch: _Batch, outcomes: dict[int, _Outcome], seconds: float) -> None:
        images = sum(job.request.count for job in batch.jobs)
        with self._lock:
            for job in batch.jobs:
                self._running.pop(job.id, None)
        for job in batch.jobs:
            outcome = outcomes[job.id]
            if job.done:
                continue
            if outcome.cancelled or job.cancel_requested:
                # Also a cancel that came after the last step but before this: cancel() said
                # yes, so the user must not get the images after all.
                self._on_cancelled(job)
            elif outcome.error is not None:
                self._fail(job, outcome.error)
            elif len(outcome.results) == 0:
                self._fail(job, GenerationFailed("The engine returned no image."))
            else:
                job.state = "finishing"
                share = seconds * job.request.count / images
                self._spawn(self._finish(job, outcome.results, share))
        self._replan()  # the loaded models may have changed

    async def _finish(
        self, job: _LocalJob, results: list[tuple[int, ResultLike]], gpu_s: float
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
            pngs, grid = await asyncio.to_thread(_encode_all, pictures, parameters)
        except Exception as exc:
            log.exception("job %d: encoding failed", job.id)
            self._end(
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
        self._end(job, "finished", None, event=finished, gpu_seconds=gpu_s)

    def _fail(self, job: _LocalJob, exc: BaseException) -> None:
        """Fail one job: the user sees a plain message, the row keeps the detail."""
        if isinstance(exc, SdbotError):
            cause = exc.__cause__
            detail = f"{exc.message} ({type(cause).__name__}: {cause})" if cause else None
            self._end(job, "failed", exc, detail=detail)
            return
        log.error("job %d failed", job.id, exc_info=exc)
        public = GenerationFailed(
            f"Generation failed unexpectedly (job #{job.id}); the error has been logged."
        )
        self._end(job, "failed", public, detail=f"{type(exc).__name__}: {exc}")

    def _end(
        self,
        job: _LocalJob,
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
            event = Failed(error)
        if error is not None:
            reason = reason or error.reason
            detail = detail or error.message
        return self._spawn(self._record_end(job, status, event, reason, detail, gpu_seconds))

    async def _record_end(
        self,
        job: _LocalJob,
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

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        async def run() -> None:
            try:
                await coro
            except Exception:
                log.exception("executor background task failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


# -- helpers --------------------------------------------------------------------------------


def _loaded_models(engine: object) -> list[str]:
    try:
        return list(getattr(engine, "loaded_models", []))
    except Exception:
        return []


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, GpuOutOfMemory):
        return True
    # torch.OutOfMemoryError (and torch.cuda.OutOfMemoryError), without importing torch here.
    return any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__)


def _free_gpu_memory() -> None:
    torch = sys.modules.get("torch")
    # Only CUDA keeps a cache worth emptying; a full collection costs up to a second.
    if torch is not None and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _split_images(part: _Part) -> list[_Part]:
    """One multi-image job as two smaller ones; image i keeps its seed, so nothing changes."""
    req = part.request
    half = req.count // 2
    seeds = req.seeds
    return [
        _Part(part.job, replace(req, count=half), part.offset),
        _Part(part.job, replace(req, seed=seeds[half], count=req.count - half), part.offset + half),
    ]


def _encode_all(
    images: Sequence[Image.Image], parameters: Sequence[str]
) -> tuple[list[bytes], bytes | None]:
    pngs = [encode_png(image, text) for image, text in zip(images, parameters, strict=True)]
    grid = None
    if len(images) > 1:
        # A1111 labels a grid with its first image's parameters.
        grid = encode_png(make_grid(images), parameters[0])
    return pngs, grid


def _preview_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Speed over size: previews are thrown away a second later.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
