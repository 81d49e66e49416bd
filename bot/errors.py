"""Typed domain errors. Every message is safe to show a Discord user as-is."""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class SdbotError(Exception):
    """Base for errors whose message is written for the person who caused them."""

    #: Short machine-readable reason stored in the job row.
    reason: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(SdbotError, ValueError):
    """A parameter is out of range or malformed; the message names it and the allowed range."""

    reason = "invalid"


class NoSuchJob(InvalidRequest):
    """A job id that is not there for this member here. One answer whether it never existed,
    was deleted, or belongs to another server or member, so ids elsewhere cannot be probed."""

    reason = "no_such_job"

    def __init__(self, job_id: int) -> None:
        super().__init__(
            f"There is no job #{job_id} here (it no longer exists, or it isn't yours)."
        )
        self.job_id = job_id


class QueueFull(SdbotError):
    """The queue cannot take another job right now."""

    reason = "queue_full"


class ModelLoadError(SdbotError):
    """A model could not be loaded; the message says what is missing and how to fix it."""

    reason = "model_load"


class GenerationFailed(SdbotError):
    """The pipeline raised; the job failed but the executor keeps serving."""

    reason = "generation"


class ReplicaLost(GenerationFailed):
    """The image server (a Serve replica) running the job died, and so did the retry: running
    the job again, alone or in another batch, would likely kill another one."""


class GpuOutOfMemory(GenerationFailed):
    """The GPU ran out of memory; the executor may retry with a smaller batch."""

    reason = "out_of_memory"


class JobCancelled(SdbotError):
    """The job was cancelled by its owner or an admin, or by shutdown."""

    reason = "cancelled"


class SettingsError(SdbotError):
    """A setting is missing or malformed; the message names it."""

    reason = "settings"


def without_frames(exc: E, *, unchain: bool = False) -> E:
    """`exc` with the tracebacks of it and every exception chained to it cleared (each frame a
    traceback holds keeps its locals alive: on a GPU, the failed run's activations); with
    `unchain`, also with its cause and context dropped. Type and message stay."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) not in seen:
            seen.add(id(current))
            current.__traceback__ = None
            pending += [e for e in (current.__cause__, current.__context__) if e is not None]
    if unchain:
        exc.__cause__ = exc.__context__ = None
    return exc
