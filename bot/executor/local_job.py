"""The executor's own view of a job, and what running it produced.

A `LocalJob` is the `bot.backend.Job` handle the fronts hold, plus the bookkeeping of the
threads that move it along; each field says who may touch it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from bot.backend import Job, Progress, ResultLike

JobState = Literal["queued", "running", "finishing", "done"]


@dataclass(eq=False)
class LocalJob(Job):
    # Guarded by the dispatcher's lock: "queued" -> "running" happens on a worker thread.
    state: JobState = "queued"
    # Loop-side only.
    last_position: int | None = None
    preview_task: asyncio.Task[None] | None = field(default=None, repr=False)
    held_progress: Progress | None = None


@dataclass(eq=False)
class Outcome:
    """One job's share of a batch, collected on the worker thread, read on the loop after."""

    results: list[tuple[int, ResultLike]] = field(default_factory=list)  # (first image, result)
    error: BaseException | None = None
    cancelled: bool = False
