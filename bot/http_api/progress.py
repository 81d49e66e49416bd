"""The jobs API clients are waiting for, per key: what /sdapi/v1/progress reports (step,
ETA, the latest preview) and what /sdapi/v1/interrupt cancels.

The handler that submitted a job reads its events here (`follow`), the only consumer of its
stream, and keeps the latest state for the key's progress polls. Everything runs on the
event loop; previews arrive as the PNG bytes the executor made off the GPU thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bot.backend import (
    Failed,
    Finished,
    ImageBackend,
    Job,
    Loading,
    Progress,
    Queued,
    Started,
)


@dataclass
class Tracked:
    """One waiting client's job, as its last event left it."""

    job: Job
    key_id: int
    position: int = 0  # among waiting jobs; 0 once running
    running: bool = False
    loading: bool = False
    step: int = 0
    total: int = 0
    preview: bytes | None = None
    started_at: float | None = None
    interrupted: bool = False

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    def eta_seconds(self) -> float:
        """Seconds left, from the pace of the steps so far; 0 when it cannot be told yet."""
        if not self.running or self.started_at is None or not self.step or not self.total:
            return 0.0
        elapsed = time.monotonic() - self.started_at
        return max(0.0, elapsed / self.step * (self.total - self.step))


class JobTracker:
    """Per key, the jobs its clients wait for, oldest first."""

    def __init__(self) -> None:
        self._by_key: dict[int, list[Tracked]] = {}

    def add(self, key_id: int, job: Job) -> Tracked:
        tracked = Tracked(job, key_id, total=job.request.steps)
        self._by_key.setdefault(key_id, []).append(tracked)
        return tracked

    def discard(self, tracked: Tracked) -> None:
        jobs = self._by_key.get(tracked.key_id, [])
        if tracked in jobs:
            jobs.remove(tracked)
        if not jobs:
            self._by_key.pop(tracked.key_id, None)

    def current(self, key_id: int) -> Tracked | None:
        """The key's job progress reports on: the first running one, else the next to run."""
        jobs = self._by_key.get(key_id, [])
        running = [t for t in jobs if t.running]
        if running:
            return running[0]
        waiting = sorted(jobs, key=lambda t: (t.position or 1_000_000, t.job.id))
        return waiting[0] if waiting else None

    def count(self, key_id: int) -> int:
        return len(self._by_key.get(key_id, []))

    def all(self) -> list[Tracked]:
        return [t for jobs in self._by_key.values() for t in jobs]

    async def interrupt(self, backend: ImageBackend, key_id: int) -> list[int]:
        """Cancel the key's running jobs (A1111's interrupt stops what is being generated;
        the key's queued requests carry on, as they would there). Ids of those cancelled."""
        cancelled = []
        for tracked in list(self._by_key.get(key_id, [])):
            if tracked.running and await backend.cancel(tracked.job.id):
                tracked.interrupted = True
                cancelled.append(tracked.job.id)
        return cancelled

    @staticmethod
    async def follow(tracked: Tracked) -> Finished | Failed:
        """Read the job's events to its end, keeping the latest state for progress polls."""
        async for event in tracked.job.stream():
            if isinstance(event, Queued):
                tracked.position = event.position
            elif isinstance(event, Started):
                tracked.running, tracked.position = True, 0
                tracked.started_at = time.monotonic()
            elif isinstance(event, Loading):
                tracked.loading = True
            elif isinstance(event, Progress):
                tracked.loading = False
                tracked.step, tracked.total = event.step, event.total
                if event.preview is not None:
                    tracked.preview = event.preview
            elif isinstance(event, (Finished, Failed)):
                return event
        raise RuntimeError(f"the events of job {tracked.job.id} ended without a result")
