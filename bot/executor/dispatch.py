"""The state the event loop shares with the workers: the fair queue, each worker's loaded
models, the running jobs. `Dispatcher` is the `WorkerHost` every worker of one executor uses.

Threads:
- The event loop enqueues and cancels jobs, and reads positions and status. After every change
  it tells waiting jobs their expected place, planning as the workers will.
- A worker's thread, the moment it is free, plans its own next batch from the fair queue (the
  fair pick, or a job for a model that worker has loaded, plus compatible jobs up to max_batch
  images, or fewer when its engine's free memory says so) and takes it, without waiting for
  the loop. Planning at take time rather than ahead is what keeps several workers fair:
  whichever frees first gets the fair pick. Its reports go to the loop with
  `call_soon_threadsafe`, and on to `Delivery` there.
A threading lock guards the shared state because both sides touch it; it is held for
microseconds (planning is plain data) and never across an engine call, a database write or an
encoding.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bot.backend import BackendStatus, Queued
from bot.executor.delivery import Delivery
from bot.executor.fair_queue import Batch, FairQueue
from bot.executor.local_job import JobState, LocalJob, Outcome
from bot.executor.worker import Call, Work, Worker

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Slot:
    """One worker as the dispatcher sees it; guarded by the dispatcher's lock."""

    worker: Worker[Any]
    calls: deque[Call] = field(default_factory=deque)
    # Its models as planning sees them: including the one its current batch is loading.
    loaded: list[str] = field(default_factory=list)
    busy_s: float = 0.0
    busy_since: float | None = None  # perf_counter() when its current work began


@dataclass(frozen=True)
class _Places:
    """The expected order of the waiting jobs as of one look at the queue (later: higher)."""

    seen: int
    jobs: list[LocalJob]


class Dispatcher:
    """One executor's queue and workers, and the `WorkerHost` of each of those workers."""

    def __init__(
        self,
        workers: Sequence[Worker[Any]],
        queue: FairQueue[LocalJob],
        delivery: Delivery,
        *,
        preview_every: int,
        progress_interval_s: float,
        preview_interval_s: float = 1.0,
    ) -> None:
        self.queue = queue
        self.delivery = delivery
        self.preview_every = max(0, preview_every)
        self.progress_interval_s = progress_interval_s
        self.preview_interval_s = max(0.0, preview_interval_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Shared with the workers' threads; every access holds _cond (its lock).
        self._cond = threading.Condition(threading.Lock())
        self._slots = [_Slot(worker) for worker in workers]
        self._slot_of = {id(slot.worker): slot for slot in self._slots}
        self._running: dict[int, LocalJob] = {}
        # request.model spelling -> the name the engines list it under in loaded_models (a
        # source and a catalog name may be the same model); learnt after each batch.
        self._aliases: dict[str, str] = {}
        self.closing = False
        self._looks = 0  # how many times the expected order was worked out
        # Loop-side only: the latest look announced to the waiting jobs.
        self._announced = 0

    # -- event loop -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        with self._cond:
            for slot in self._slots:
                slot.loaded = slot.worker.loaded_models()
        for slot in self._slots:
            slot.worker.start(self)

    def enqueue(self, job: LocalJob) -> bool:
        """Queue `job` and tell the waiting jobs their places; False once closing."""
        with self._cond:
            if self.closing:
                return False
            self.queue.push(job)
            self._cond.notify_all()
            # In the same hold of the lock, so that no worker can take the job before its place
            # is known: Queued always comes before Started.
            places = self._places_locked()
        self._announce(places)
        return True

    def cancel(self, job: LocalJob) -> JobState:
        """Flag `job` cancelled; a queued one leaves the queue at once. Its state before."""
        with self._cond:
            state = job.state
            if state in ("queued", "running"):
                job.cancel_requested = True
            if state == "queued":
                self.queue.remove(job)
                job.state = "done"
        return state

    def call(self, fn: Callable[[], object], worker: int) -> concurrent.futures.Future[object]:
        """Run `fn` on a worker's thread before its next batch."""
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        with self._cond:
            if self.closing:
                raise RuntimeError("the executor is closed")
            self._slots[worker].calls.append((fn, future))
            self._cond.notify_all()
        return future

    def learn(self, requested: str, name: str) -> None:
        """`requested` (a source, say) loaded under `name`: for a load outside a batch (preload),
        so that the first job spelling the model that way does not count as a model switch."""
        with self._cond:
            self._learn_locked(requested, name)

    def reorder(self) -> None:
        """Tell every waiting job whose place changed."""
        with self._cond:
            if self.closing:
                return
            places = self._places_locked()
        self._announce(places)

    def positions(self) -> dict[int, int]:
        """Job id -> expected place in line, 1 = next."""
        with self._cond:
            return {job.id: position for position, job in enumerate(self._expected_locked(), 1)}

    def _announce(self, places: _Places) -> None:
        # Looks taken on a worker's thread arrive late; one taken later may have gone first.
        if places.seen < self._announced:
            return
        self._announced = places.seen
        for position, job in enumerate(places.jobs, start=1):
            if job.last_position != position and not job.done:
                job.last_position = position
                job.events.put_nowait(Queued(position=position))

    def close(self) -> tuple[list[LocalJob], list[Call]]:
        """Stop planning and taking; flag running jobs cancelled. Returns the jobs that were
        waiting (now done) and the calls that will never run, for the caller to conclude."""
        with self._cond:
            self.closing = True
            queued = self.queue.clear()
            for job in queued:
                job.state = "done"
            for job in self._running.values():
                job.cancel_requested = True
            calls: list[Call] = []
            for slot in self._slots:
                calls.extend(slot.calls)
                slot.calls.clear()
            self._cond.notify_all()
        return queued, calls

    def running(self) -> list[LocalJob]:
        with self._cond:
            return list(self._running.values())

    @property
    def queue_length(self) -> int:
        with self._cond:
            return len(self.queue)

    def waiting(self, user: int) -> tuple[int, int]:
        """Jobs waiting in all, and those of `user`."""
        with self._cond:
            return len(self.queue), self.queue.count(user)

    def status(self, uptime_s: float) -> BackendStatus:
        now = time.perf_counter()
        with self._cond:
            return BackendStatus(
                queue_length=len(self.queue),
                queued_per_user=self.queue.per_user(),
                running=[job.id for job in self._running.values() if not job.done],
                # Models loaded on any worker, each once, least recently used first per worker.
                loaded_models=list(dict.fromkeys(m for s in self._slots for m in s.loaded)),
                # Worker-thread seconds summed over workers, the work in progress included.
                gpu_busy_s=sum(
                    s.busy_s + (0.0 if s.busy_since is None else now - s.busy_since)
                    for s in self._slots
                ),
                uptime_s=uptime_s,
                closing=self.closing,
            )

    def _places_locked(self) -> _Places:
        self._looks += 1
        return _Places(self._looks, self._expected_locked())

    def _expected_locked(self) -> list[LocalJob]:
        """The expected running order: the next batch of each worker as it would plan it now,
        free workers first, then the rest in fair order."""
        fair = self.queue.order()
        now = time.monotonic()
        planned: list[LocalJob] = []
        for slot in sorted(self._slots, key=lambda slot: slot.busy_since is not None):
            rest = [job for job in fair if job not in planned] if planned else fair
            batch = self.queue.plan(
                rest,
                loaded=slot.loaded,
                aliases=self._aliases,
                now=now,
                limit=slot.worker.batch_limit,
            )
            if batch is None:
                break
            planned += batch.jobs
        if not planned:
            return fair
        chosen = set(planned)
        return planned + [job for job in fair if job not in chosen]

    def _on_taken(self, batch: Batch[LocalJob], places: _Places, loading: bool) -> None:
        self.delivery.started(batch.jobs)
        if loading:
            self.delivery.loading(batch.jobs, batch.jobs[0].request.model)
        self._announce(places)

    def _on_cancelled(self, job: LocalJob) -> None:
        self.delivery.cancelled(job, shutting_down=self.closing)

    def _on_done(
        self,
        batch: Batch[LocalJob],
        outcomes: dict[int, Outcome],
        seconds: float,
        places: _Places,
    ) -> None:
        with self._cond:
            for job in batch.jobs:
                self._running.pop(job.id, None)
        self.delivery.batch_done(batch.jobs, outcomes, seconds, shutting_down=self.closing)
        self._announce(places)

    # -- WorkerHost: called on the workers' threads -----------------------------------------

    def next_work(self, worker: Worker[Any]) -> Work | None:
        slot = self._slot_of[id(worker)]
        with self._cond:
            while not (slot.calls or self.closing or len(self.queue)):
                self._cond.wait()
            if slot.calls:
                call = slot.calls.popleft()
                slot.busy_since = time.perf_counter()
                return call
            if self.closing:
                return None
            batch, loading = self._take_locked(slot)
            # The places as of this take, so that the job that runs next hears it is first in
            # line before it starts, however much faster than the loop this worker is.
            places = self._places_locked()
            slot.busy_since = time.perf_counter()
        self._post(self._on_taken, batch, places, loading)
        return batch

    def progress(self, job: LocalJob, step: int, total: int, preview: Image.Image | None) -> None:
        self._post(self.delivery.progress, job, step, total, preview)

    def cancelled(self, job: LocalJob) -> None:
        self._post(self._on_cancelled, job)

    def finished(
        self, worker: Worker[Any], batch: Batch[LocalJob] | None, outcomes: dict[int, Outcome]
    ) -> None:
        slot = self._slot_of[id(worker)]
        loaded = worker.loaded_models()
        learnt = None
        succeeded = any(outcome.results for outcome in outcomes.values())
        if batch is not None and batch.jobs and loaded and succeeded:
            # The model a successful call used is the most recently used one.
            learnt = (batch.jobs[0].request.model, loaded[-1])
        with self._cond:
            assert slot.busy_since is not None
            elapsed = time.perf_counter() - slot.busy_since
            slot.busy_s += elapsed
            slot.busy_since = None
            slot.loaded = loaded
            if learnt is not None:
                self._learn_locked(*learnt)
            if batch is None:
                return
            # The loaded models may have changed, and with them the expected order.
            places = self._places_locked()
        self._post(self._on_done, batch, outcomes, elapsed, places)

    def _learn_locked(self, requested: str, name: str) -> None:
        if len(self._aliases) > 1000:
            self._aliases.clear()
        self._aliases[requested] = name

    def _take_locked(self, slot: _Slot) -> tuple[Batch[LocalJob], bool]:
        """Plan `slot`'s batch from the whole queue, as late as possible, and start it. True
        when its model is not loaded on that worker yet."""
        batch = self.queue.plan(
            self.queue.order(),
            loaded=slot.loaded,
            aliases=self._aliases,
            now=time.monotonic(),
            limit=slot.worker.batch_limit,
        )
        assert batch is not None  # the queue is not empty
        self.queue.take(batch)
        for job in batch.jobs:
            job.state = "running"
            self._running[job.id] = job
        # The worker is free, so slot.loaded is what its engine reported after its last work.
        requested = batch.jobs[0].request.model
        model = self._aliases.get(requested, requested)
        loading = requested not in slot.loaded and model not in slot.loaded
        # Plan the following batch as if this one's model were loaded already (it will be).
        keep = slot.worker.max_loaded
        slot.loaded = ([m for m in slot.loaded if m != model] + [model])[-keep:]
        return batch, loading

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the process is exiting
            log.debug("dropped %s: event loop closed", getattr(fn, "__name__", fn))
