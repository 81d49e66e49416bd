"""The contract between the fronts and whatever makes images: events, job handles, status.

The fronts (bot/discord_front, cogs/) depend on `ImageBackend`, `Job`, the events and
`JobOrigin` only, so the executor in bot/executor/ (a fair queue driving one worker per GPU)
can drive other workers, or be replaced, without touching them. The engine side of the
contract (`GenerationEngine`, `StepInfoLike`, `ResultLike`) is structural so the executor and
its tests do not need to import torch or diffusers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from bot.errors import QueueFull, SdbotError
from bot.jobs import GenerationRequest

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class JobOrigin:
    """Who asked for a job, and where; plain ids so no Discord object leaks past the cogs."""

    user_id: int
    user_name: str
    guild_id: int | None
    channel_id: int | None
    command: str
    interaction_id: int | None = None


# -- events a job emits, in order: Queued*, Started, Loading?, Progress*, then Finished or Failed


@dataclass(frozen=True)
class Queued:
    """Sent on enqueue and whenever the job's place changes."""

    position: int  # among waiting jobs; 1 = runs next


@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class Loading:
    """Sent after Started when the job's model is not loaded on the worker that runs it: the
    first use of a hub model downloads gigabytes, so the wait is worth telling apart from a
    slow start. No percentage: diffusers offers no download progress hook."""

    model: str  # as the request names it


@dataclass(frozen=True)
class Progress:
    """At most a few per second per job; the last step always comes through."""

    step: int
    total: int
    preview: bytes | None = None  # a PNG of the partly denoised image, every few steps


@dataclass(frozen=True)
class Finished:
    images: list[bytes]  # one PNG each, each with its own A1111 `parameters` text
    grid: bytes | None  # a PNG grid of all images when there is more than one
    seeds: list[int]
    nsfw: list[bool]
    parameters: list[str]  # the `parameters` text of each image
    gpu_seconds: float  # this job's share of the GPU time of the batch it ran in


@dataclass(frozen=True)
class Failed:
    error: SdbotError  # error.message is written for the user; the job row keeps any detail


Event = Queued | Started | Loading | Progress | Finished | Failed


class UserQueueFull(QueueFull):
    """One user has as many jobs waiting as they may; others can still queue."""

    reason = "user_queue_full"


@dataclass(eq=False)
class Job:
    """A handle on one submitted request. `stream()` has one consumer (the cog that asked)."""

    id: int
    origin: JobOrigin
    request: GenerationRequest
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue, repr=False)
    submitted_at: float = field(default_factory=time.monotonic)
    # Set from the event loop, read by the GPU thread at every step: a plain bool is enough
    # because it only ever goes False -> True.
    cancel_requested: bool = False
    done: bool = False

    @property
    def user_id(self) -> int:
        return self.origin.user_id

    async def stream(self) -> AsyncIterator[Event]:
        """Yield this job's events until it finishes or fails."""
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return


@dataclass(frozen=True)
class BackendStatus:
    queue_length: int  # jobs waiting, not counting running ones
    queued_per_user: dict[int, int]  # user id -> jobs waiting
    running: list[int]  # job ids on the GPU now
    loaded_models: list[str]  # least recently used first
    gpu_busy_s: float  # time the GPU thread spent generating since start
    uptime_s: float
    closing: bool


class ImageBackend(Protocol):
    """What the cogs use. Implemented by GpuExecutor; a distributed backend can follow."""

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Cancel running jobs, mark queued ones interrupted, return promptly."""
        ...

    async def submit(
        self, origin: JobOrigin, request: GenerationRequest, *, user_limit: int | None = None
    ) -> Job:
        """Record and queue a job, or raise QueueFull (recorded as a rejected row)."""
        ...

    def generate(
        self, origin: JobOrigin, request: GenerationRequest, *, user_limit: int | None = None
    ) -> AsyncGenerator[Event, None]:
        """submit() + stream(); leaving the loop early cancels the job."""
        ...

    async def cancel(self, job_id: int) -> bool:
        """True if the job was queued or running and is now being cancelled."""
        ...

    def get(self, job_id: int) -> Job | None: ...

    @property
    def queue_length(self) -> int: ...

    def positions(self) -> dict[int, int]:
        """Job id -> place in line (1 = runs next) for every waiting job."""
        ...

    def status(self) -> BackendStatus: ...


# -- what the executor needs from the engine (bot.engine.Engine satisfies it structurally) ----


class StepInfoLike(Protocol):
    @property
    def step(self) -> int: ...

    @property
    def total(self) -> int: ...

    @property
    def preview(self) -> Callable[[int], Image.Image]:
        """preview(i): a cheap preview of request i of the call; only on the GPU thread."""
        ...


class ResultLike(Protocol):
    @property
    def images(self) -> list[Image.Image]: ...

    @property
    def seeds(self) -> list[int]: ...

    @property
    def nsfw(self) -> list[bool]: ...

    @property
    def sampler(self) -> str: ...


@dataclass(frozen=True)
class GenerationResult:
    """The images of one request, in seed order: the engine's result, and what Serve's client
    and the stand-in engines rebuild on their side (a `ResultLike`)."""

    images: list[Image.Image]
    seeds: list[int]
    #: Per image: flagged by the engine's safety checker, else by the model's own (all False
    #: when there is none).
    #: Images are returned unaltered; the front end blurs, spoilers or blocks by policy.
    nsfw: list[bool]
    #: The A1111 sampler name for the PNG `Sampler:` field.
    sampler: str


class GenerationEngine(Protocol):
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: Callable[[StepInfoLike], None] | None = None,
    ) -> Sequence[ResultLike]:
        """All requests share one batch_key(); image i equals a solo run with its seed."""
        ...

    def load(self, model: str) -> object: ...

    @property
    def loaded_models(self) -> list[str]: ...


@dataclass(frozen=True)
class LoadRecord:
    """One model load attempt, reported by an engine's `on_load` (the executor stores it).

    Plain data, so a local engine and a remote replica (bot.serve) report the same type."""

    model: str
    source: str
    ok: bool
    seconds: float
    memory_mb: float | None
    error: str | None
