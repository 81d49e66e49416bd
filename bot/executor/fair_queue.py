"""The fair per-user queue and batch planning, as plain data: no threads, locks or asyncio.

Fairness is "least recently served user first": users are ordered by when they were last
served (users never served by when their first waiting job was submitted), and each user's
jobs run in their own order, so a user with 20 queued jobs delays a newcomer by at most the
job already running.

A batch is planned from that order for one worker: the fair pick leads, unless a job for a
model the worker has loaded may jump ahead (switching models costs seconds), and compatible
jobs (equal `request.batch_key()`) join it up to `max_batch` images, or fewer when the
worker's engine says fewer fit in its free memory. Whoever owns the queue
serialises access to it; the executor holds its lock around every call.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from bot.jobs import GenerationRequest

__all__ = ["Batch", "FairQueue", "Queueable"]


class Queueable(Protocol):
    """What the queue needs to know about a job (bot.backend.Job has it all)."""

    @property
    def user_id(self) -> int: ...

    @property
    def request(self) -> GenerationRequest: ...

    @property
    def submitted_at(self) -> float:
        """time.monotonic() at submission; compared with the `now` given to plan()."""
        ...


J = TypeVar("J", bound=Queueable)


@dataclass(eq=False)
class Batch(Generic[J]):
    """Jobs for one engine call: all share one batch_key(), at most max_batch images."""

    jobs: list[J]
    override: bool  # the lead was picked for its loaded model over the fair pick


class FairQueue(Generic[J]):
    """Waiting jobs per user, the fair order over them, and batch planning.

    max_batch: images (sum of counts) per batch.
    max_model_streak / max_model_wait_s: a job for an already-loaded model may jump ahead of
        the fair pick at most this many times in a row, and never once the fair pick has
        waited this long.
    forget_after: served users remembered before those with nothing waiting are forgotten.
    """

    def __init__(
        self,
        *,
        max_batch: int = 4,
        max_model_streak: int = 4,
        max_model_wait_s: float = 30.0,
        forget_after: int = 10_000,
    ) -> None:
        self.max_batch = max(1, max_batch)
        self.max_model_streak = max_model_streak
        self.max_model_wait_s = max_model_wait_s
        self.forget_after = forget_after
        self._waiting: dict[int, deque[J]] = {}  # user id -> that user's queued jobs, in order
        self._seq: dict[J, int] = {}  # job -> submission order, the tie-break for new users
        self._served: dict[int, int] = {}  # user id -> sequence number of their last service
        self._submit_seq = itertools.count(1)
        self._serve_seq = itertools.count(1)
        self._streak = 0  # batches in a row whose lead jumped the fair pick

    # -- contents ---------------------------------------------------------------------------

    def push(self, job: J) -> None:
        """Queue `job` behind its user's other jobs."""
        self._seq[job] = next(self._submit_seq)
        self._waiting.setdefault(job.user_id, deque()).append(job)

    def remove(self, job: J) -> bool:
        """Take `job` out of the queue (a cancel); False if it was not waiting."""
        jobs = self._waiting.get(job.user_id)
        if jobs is None or job not in self._seq:
            return False
        jobs.remove(job)
        del self._seq[job]
        if not jobs:
            del self._waiting[job.user_id]
        return True

    def clear(self) -> list[J]:
        """Empty the queue (shutdown); returns what was waiting."""
        jobs = [job for queue in self._waiting.values() for job in queue]
        self._waiting.clear()
        self._seq.clear()
        return jobs

    def __len__(self) -> int:
        return len(self._seq)

    def __contains__(self, job: object) -> bool:
        return job in self._seq

    def count(self, user: int) -> int:
        return len(self._waiting.get(user, ()))

    def per_user(self) -> dict[int, int]:
        """User id -> jobs waiting."""
        return {user: len(jobs) for user, jobs in self._waiting.items()}

    # -- order and planning -----------------------------------------------------------------

    def order(self) -> list[J]:
        """Round-robin over users, least recently served first; each user's jobs in order."""
        users = sorted(
            self._waiting,
            key=lambda user: (self._served.get(user, 0), self._seq[self._waiting[user][0]]),
        )
        queues = [self._waiting[user] for user in users]
        order: list[J] = []
        depth = 0
        while queues:
            order.extend(queue[depth] for queue in queues)
            depth += 1
            queues = [queue for queue in queues if len(queue) > depth]
        return order

    def plan(
        self,
        order: Sequence[J],
        *,
        loaded: Collection[str] = (),
        aliases: Mapping[str, str] | None = None,
        now: float,
        limit: Callable[[GenerationRequest], int | None] | None = None,
    ) -> Batch[J] | None:
        """The next batch from `order` (the fair order, less jobs planned elsewhere) for a
        worker with `loaded` models; None if `order` is empty.

        `aliases` maps a request's model spelling to the name `loaded` lists it under (a source
        and a catalog name may be the same model). `limit`: the images like a request's that
        fit in one call on that worker (its free memory; None: no limit below max_batch).
        Nothing changes until take().
        """
        if not order:
            return None
        aliases = aliases or {}

        def is_loaded(job: J) -> bool:
            model = job.request.model
            return aliases.get(model, model) in loaded

        lead, override = order[0], False
        if (
            loaded
            and not is_loaded(lead)
            and self._streak < self.max_model_streak
            and now - lead.submitted_at < self.max_model_wait_s
        ):
            # Switching models costs seconds; a job for a loaded model may go first, boundedly.
            preferred = next((job for job in order if is_loaded(job)), None)
            if preferred is not None:
                lead, override = preferred, True
        key = lead.request.batch_key()
        most = self.max_batch
        fits = limit(lead.request) if limit is not None else None
        if fits is not None:
            most = max(1, min(most, fits))
        jobs, images = [lead], lead.request.count
        for job in order:
            if images >= most:
                break
            if job is lead or images + job.request.count > most:
                continue
            if job.request.batch_key() == key:
                jobs.append(job)
                images += job.request.count
        return Batch(jobs, override)

    def take(self, batch: Batch[J]) -> None:
        """`batch` starts: its jobs leave the queue and their users go to the back of the line.

        Jobs of the batch that are no longer waiting are dropped from it.
        """
        batch.jobs = [job for job in batch.jobs if job in self._seq]
        for job in batch.jobs:
            self.remove(job)
            self._served[job.user_id] = next(self._serve_seq)
        self._streak = self._streak + 1 if batch.override else 0
        if len(self._served) > self.forget_after:
            # Forget long-gone users; their order among themselves no longer matters.
            self._served = {u: s for u, s in self._served.items() if u in self._waiting}
