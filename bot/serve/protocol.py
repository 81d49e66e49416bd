"""What the bot and a Serve replica send each other: plain, picklable data, no Ray.

One `generate` call streams lists of events (as few items as keep progress live); in order:
`Hello` (which replica took it), any number of `LoadRecord` (a model load attempt, for the bot's
load log), `Step` (progress, with PNG previews at the executor's interval) and `Beat`, then
one `Done` with the images as raw arrays (no PNG encoding on the replica: the bot's delivery
encodes them, off its worker thread, as it does for the local engine). A `load` call streams
`Beat`s, then one `LoadReply`. Errors travel as exceptions, which Ray wraps and the client
unwraps.

The heartbeat: a replica sends something at least every `heartbeat_s` (a `Beat` when nothing
else is due, also while a model loads), so that the bot can tell a slow job from a replica
that stopped answering, and give up on the latter (`bot.serve.client.SILENCE_S`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from bot.backend import GenerationResult, LoadRecord

if TYPE_CHECKING:
    from bot.jobs import GenerationRequest

#: Seconds between a replica's heartbeats when it has nothing else to send.
HEARTBEAT_S = 1.0
#: Steps closer together than this are not each sent (each streamed item costs a few ms);
#: preview steps and the last step always are. The bot shows progress at most every 0.2 s.
STEP_INTERVAL_S = 0.05


@dataclass(frozen=True)
class GeneratePayload:
    """One engine call: requests sharing a batch_key(), and what the bot wants streamed."""

    requests: list[GenerationRequest]
    preview_every: int  # steps between previews; 0 = none
    tag: str  # names this attempt in the replica's run log
    #: Steps less than this apart are merged (0: every step is sent; tests that cancel).
    step_interval_s: float = STEP_INTERVAL_S
    heartbeat_s: float = HEARTBEAT_S


@dataclass(frozen=True)
class Hello:
    replica: str  # Serve's id of the replica
    pid: int


@dataclass(frozen=True)
class Step:
    step: int
    total: int
    #: Per request of the call, a PNG preview at this step, or None (not a preview step).
    previews: tuple[bytes | None, ...] = ()


@dataclass(frozen=True)
class Beat:
    """Still working: the engine's last step (0 of 0 before the first, e.g. while loading)."""

    step: int = 0
    total: int = 0


@dataclass(frozen=True)
class ResultData:
    """One request's images as uint8 arrays: lossless, and no encoding on the replica."""

    arrays: list[np.ndarray]
    modes: list[str]
    seeds: list[int]
    nsfw: list[bool]
    sampler: str

    @classmethod
    def of(
        cls, images: list[Image.Image], seeds: list[int], nsfw: list[bool], sampler: str
    ) -> ResultData:
        return cls(
            [np.asarray(image) for image in images],
            [image.mode for image in images],
            list(seeds),
            list(nsfw),
            sampler,
        )

    def result(self) -> GenerationResult:
        images = [
            Image.fromarray(array, mode)
            for array, mode in zip(self.arrays, self.modes, strict=True)
        ]
        return GenerationResult(images, list(self.seeds), list(self.nsfw), self.sampler)


@dataclass(frozen=True)
class Done:
    results: list[ResultData]
    loaded: list[str]  # the replica's loaded models after the call, least recently used first
    seconds: float  # engine time on the replica


@dataclass(frozen=True)
class LoadReply:
    loaded: list[str]
    records: list[LoadRecord] = field(default_factory=list)


@dataclass
class RunRecord:
    """What a replica remembers of a recent call (for `runs()`: tests, benchmarks, support)."""

    tag: str
    replica: str
    requests: int
    step: int  # the last step the engine reached
    total: int
    cancelled: bool
    done: bool  # the engine thread has left the call


Event = Hello | LoadRecord | Step | Beat | Done
