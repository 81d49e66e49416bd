"""A worker: one thread that runs planned batches on one engine (one GPU, or one remote replica).

Threads:
- The worker's thread is a single `loop.run_in_executor` call on a one-worker pool, entered at
  start() and left at shutdown, because CUDA contexts and pipelines are not shared across
  threads. It loops: take the next unit of work from the host (blocking while there is none),
  run it on the engine, report back. It runs engine calls and the bookkeeping around them
  only: no PNG encoding, no database, no asyncio.
- start(), `future` and shutdown() belong to the event loop.

Within a batch the worker splits an out-of-memory call in halves (by jobs, then by images of
one job, seeds kept), reruns the jobs of a failed call one by one so that one bad request does
not fail its batch-mates, checks for cancels at every step, and throttles progress and
previews before they leave the thread.

The worker reaches the executor only through `WorkerHost`, so one executor can drive several
workers; the engine is anything that follows `bot.backend.GenerationEngine`, which already
turns the device's out-of-memory error into `bot.errors.GpuOutOfMemory` and frees memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeAlias, TypeVar

from bot.backend import GenerationEngine, ResultLike, StepInfoLike
from bot.errors import (
    GenerationFailed,
    GpuOutOfMemory,
    JobCancelled,
    ModelLoadError,
    ReplicaLost,
    without_frames,
)
from bot.executor.fair_queue import Batch
from bot.executor.local_job import LocalJob, Outcome
from bot.jobs import GenerationRequest

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Call", "Work", "Worker", "WorkerHost"]

log = logging.getLogger(__name__)

E = TypeVar("E", bound=GenerationEngine)

#: A function to run on a worker's thread between batches, and the future for its result.
Call: TypeAlias = tuple[Callable[[], object], concurrent.futures.Future[object]]
Work: TypeAlias = "Batch[LocalJob] | Call"


class WorkerHost(Protocol):
    """The executor as its workers see it. Every member is used on a worker's thread, so an
    implementation must be thread-safe and hand anything for the event loop over to it."""

    @property
    def closing(self) -> bool: ...

    @property
    def preview_every(self) -> int:
        """Steps between preview images; 0 = no previews."""
        ...

    @property
    def preview_interval_s(self) -> float:
        """Seconds between a job's preview images (a preview costs a decode and a PNG, and
        Discord shows at most one edit a second): previews wait for both this and
        `preview_every` steps."""
        ...

    @property
    def progress_interval_s(self) -> float:
        """A job's progress reports closer together than this are dropped (not the last)."""
        ...

    def next_work(self, worker: Worker[Any]) -> Work | None:
        """Block until there is work for `worker`: a call, or a batch whose jobs now count as
        running. None: the executor is closing; the worker's thread ends."""
        ...

    def progress(self, job: LocalJob, step: int, total: int, preview: Image.Image | None) -> None:
        """`job` reached `step` of `total`, with a preview image every few steps."""
        ...

    def cancelled(self, job: LocalJob) -> None:
        """`job` stopped at a cancel (its batch-mates may go on): tell its user now."""
        ...

    def finished(
        self, worker: Worker[Any], batch: Batch[LocalJob] | None, outcomes: dict[int, Outcome]
    ) -> None:
        """The work next_work() gave is over (`batch` None: it was a call); `outcomes` holds
        each job's results, error or cancel, by job id."""
        ...


class Worker(Generic[E]):
    """One engine and the one thread that drives it.

    Generic over the engine so `worker.engine` keeps its own type.
    """

    def __init__(self, engine: E, *, name: str = "sdbot-gpu") -> None:
        self.engine = engine
        self.name = name
        # One thread, forever: CUDA contexts and pipelines are not shared across threads.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._future: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"Worker({self.name!r})"

    @property
    def max_loaded(self) -> int:
        """Models the engine keeps loaded at once."""
        return max(1, int(getattr(self.engine, "max_loaded", 1)))

    def batch_limit(self, request: GenerationRequest) -> int | None:
        """Images like `request`'s that the engine says fit in one call, by its free memory
        (an optional `batch_limit(request)` of the engine; None when it does not say).
        Called while planning, from any thread: the engine answers from cached figures."""
        limit = getattr(self.engine, "batch_limit", None)
        if limit is None:
            return None
        try:
            return max(1, int(limit(request)))
        except Exception:
            log.warning("the engine's batch_limit failed; using max_batch", exc_info=True)
            return None

    def loaded_models(self) -> list[str]:
        """The engine's loaded models, least recently used first; [] if it cannot say."""
        try:
            return list(self.engine.loaded_models)
        except Exception:
            return []

    # -- event loop -------------------------------------------------------------------------

    def start(self, host: WorkerHost) -> asyncio.Future[None]:
        """Enter the worker's thread; it serves `host` until next_work() returns None."""
        self._future = asyncio.get_running_loop().run_in_executor(self._pool, self._main, host)
        return self._future

    @property
    def future(self) -> asyncio.Future[None] | None:
        """Done when the worker's thread has left (its exception, if it crashed)."""
        return self._future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)

    # -- the worker's thread ----------------------------------------------------------------

    def _main(self, host: WorkerHost) -> None:
        while True:
            work = host.next_work(self)
            if work is None:
                return
            if isinstance(work, Batch):
                run = _BatchRun(self.engine, host, work.jobs, self.batch_limit)
                host.finished(self, work, run.run())
            else:
                fn, future = work
                if not future.set_running_or_notify_cancel():
                    host.finished(self, None, {})
                    continue
                try:
                    result, error = fn(), None
                except BaseException as exc:
                    # Frameless: the future keeps it, and frames would keep the call's tensors.
                    result, error = None, without_frames(exc)
                # Book-keeping first (loaded models, busy time), so whoever awaits the call
                # sees a status that already includes it.
                host.finished(self, None, {})
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)


@dataclass(eq=False)
class _Part:
    """Images of one job in one engine call: the whole job, or a slice after an OOM split."""

    job: LocalJob
    request: GenerationRequest
    offset: int  # index of this part's first image within the job


@dataclass
class _Throttle:
    """When a job's last progress report and last preview went out (monotonic seconds)."""

    last_sent: float = -math.inf
    last_preview_step: int = 0
    last_preview_at: float = -math.inf


class _BatchRun:
    """One batch on the worker's thread: engine calls, splits and retries, and each job's
    outcome; tells the host about cancels at once, and about the rest when it is over."""

    def __init__(
        self,
        engine: GenerationEngine,
        host: WorkerHost,
        jobs: list[LocalJob],
        limit: Callable[[GenerationRequest], int | None],
    ) -> None:
        self.engine = engine
        self.host = host
        self.jobs = jobs
        self.limit = limit
        self.outcomes: dict[int, Outcome] = {job.id: Outcome() for job in jobs}
        self.throttles: dict[int, _Throttle] = {}

    def run(self) -> dict[int, Outcome]:
        try:
            limit = self.limit(self.jobs[0].request) if self.jobs else None
            for call in _calls([_Part(job, job.request, 0) for job in self.jobs], limit):
                self._run_parts(call)
        except Exception as exc:  # a bug here must not kill the worker's thread
            log.exception("executor error while running a batch")
            for job in self.jobs:
                self._fail(job, exc)
        return self.outcomes

    # -- outcomes ---------------------------------------------------------------------------

    def _dead(self, job: LocalJob) -> bool:
        outcome = self.outcomes[job.id]
        return outcome.cancelled or outcome.error is not None

    def _cancelled(self, job: LocalJob) -> None:
        if self._dead(job):
            return
        self.outcomes[job.id].cancelled = True
        # Tell the user now, not when the rest of the batch is done.
        self.host.cancelled(job)

    def _fail(self, job: LocalJob, error: BaseException) -> None:
        if not self._dead(job):
            self.outcomes[job.id].error = error

    def _stopped(self, job: LocalJob) -> bool:
        return job.cancel_requested or self.host.closing

    # -- engine calls -----------------------------------------------------------------------

    def _run_parts(self, parts: list[_Part]) -> None:
        """One engine call for `parts`; on OOM split in halves; on an error find the culprit.

        Retries run once the engine's error is handled and its frames cleared (`_call`): in
        the `except` block the failed call's tensors would still be alive."""
        live: list[_Part] = []
        for part in parts:
            if self._stopped(part.job):
                self._cancelled(part.job)
            elif not self._dead(part.job):
                live.append(part)
        if not live:
            return
        results = self._call(live)
        if isinstance(results, JobCancelled):
            # on_step raises only once every job in the call is cancelled (or on shutdown).
            for part in live:
                self._cancelled(part.job)
        elif isinstance(results, GpuOutOfMemory):
            # The engine has freed what it could; smaller calls may fit.
            if len(live) > 1:
                half = len(live) // 2
                log.warning("out of GPU memory with %d jobs; retrying in halves", len(live))
                self._run_parts(live[:half])
                self._run_parts(live[half:])
            elif live[0].request.count > 1:
                for half_part in _split_images(live[0], live[0].request.count // 2):
                    self._run_parts([half_part])
            else:
                req = live[0].request
                oom = GpuOutOfMemory(
                    f"The GPU ran out of memory for this {req.width}×{req.height} image even "
                    "when it ran on its own. Try a smaller size."
                )
                for note in getattr(results, "__notes__", ()):
                    oom.add_note(note)
                self._fail(live[0].job, oom)
        elif isinstance(results, Exception):
            exc = results
            if (
                len(live) > 1
                # Neither would go better alone: a model that does not load, or a request
                # whose batch killed its image servers (rerunning it would kill more).
                and not isinstance(exc, (ModelLoadError, ReplicaLost))
                and not self.host.closing
            ):
                # One bad request must not fail its batch-mates: rerun each alone.
                log.warning("a batch of %d failed (%s); retrying one by one", len(live), exc)
                for part in live:
                    self._run_parts([part])
                return
            for part in live:
                self._fail(part.job, exc)
        elif len(results) != len(live):
            wrong = GenerationFailed("The engine returned the wrong number of results.")
            for part in live:
                self._fail(part.job, wrong)
        else:
            for part, result in zip(live, results, strict=True):
                self._ok(part, result)

    def _call(self, live: list[_Part]) -> Sequence[ResultLike] | Exception:
        """The engine's results for `live`, or what it raised with its frames cleared."""
        try:
            return self.engine.generate(
                [part.request for part in live], on_step=self._step_callback(live)
            )
        except Exception as exc:
            return without_frames(exc)

    def _ok(self, part: _Part, result: ResultLike) -> None:
        if not self._dead(part.job):
            self.outcomes[part.job.id].results.append((part.offset, result))

    def _step_callback(self, live: list[_Part]) -> Callable[[StepInfoLike], None]:
        def on_step(info: StepInfoLike) -> None:
            running = False
            for index, part in enumerate(live):
                job = part.job
                if self._stopped(job):
                    self._cancelled(job)
                    continue
                if self._dead(job):
                    continue
                running = True
                self._progress(job, index, info)
            if not running:
                raise JobCancelled("Cancelled while running.")

        return on_step

    def _progress(self, job: LocalJob, index: int, info: StepInfoLike) -> None:
        throttle = self.throttles.setdefault(job.id, _Throttle())
        now = time.monotonic()
        last = info.step >= info.total
        if not last and now - throttle.last_sent < self.host.progress_interval_s:
            return
        throttle.last_sent = now
        preview: Image.Image | None = None
        every = self.host.preview_every
        if (
            every
            and not last  # the finished image follows at once; no point previewing it
            and info.step - throttle.last_preview_step >= every
            and now - throttle.last_preview_at >= self.host.preview_interval_s
        ):
            throttle.last_preview_step = info.step
            throttle.last_preview_at = now
            try:
                preview = info.preview(index)
            except Exception:
                log.warning("preview failed for job %d", job.id, exc_info=True)
        self.host.progress(job, info.step, info.total, preview)


def _split_images(part: _Part, at: int) -> list[_Part]:
    """One multi-image job as two smaller ones, the first of `at` images; image i keeps its
    seed, so nothing changes."""
    req = part.request
    seeds = req.seeds
    return [
        _Part(part.job, replace(req, count=at), part.offset),
        _Part(part.job, replace(req, seed=seeds[at], count=req.count - at), part.offset + at),
    ]


def _calls(parts: list[_Part], limit: int | None) -> list[list[_Part]]:
    """`parts` as engine calls of at most `limit` images each: the planner keeps a batch
    within the limit, but one job alone may ask for more images than fit."""
    if limit is None or sum(p.request.count for p in parts) <= limit:
        return [parts]
    calls: list[list[_Part]] = []
    for part in parts:
        while part.request.count > limit:
            head, part = _split_images(part, limit)
            calls.append([head])
        if calls and sum(p.request.count for p in calls[-1]) + part.request.count <= limit:
            calls[-1].append(part)
        else:
            calls.append([part])
    return calls
