"""The Serve-backed engine: a `bot.backend.GenerationEngine` that runs each call on a replica.

The executor drives it like the local engine: one `bot.executor.Worker` per replica slot, each
calling `generate` synchronously on its own thread with one planned batch. Here that call goes
through the deployment's handle (its synchronous API, `stream=True`) and the replica's events
come back on the same thread: steps become `on_step` calls with previews, load records go to
`on_load`, the arrays become images.

Cancelling is explicit: when `on_step` raises JobCancelled (every job of the call cancelled,
or the bot shutting down), or anything else ends the call early, the response is cancelled,
which stops the replica at its next step; dropping it would not.

Every reply is read with a deadline on silence (`stream.Stream`): a replica that stops
answering fails the call instead of holding the worker's thread forever. A heartbeat with a
known step is passed to `on_step` again, so that a cancel is noticed during a long step.

Ray's errors become the bot's (`stream.bot_errors`): the engine's own errors arrive wrapped
(RayTaskError) and are unwrapped so the member reads e.g. "Unknown model 'x'. Available:
..."; back-pressure is the usual queue-full refusal; a replica that dies mid-call
(ActorDiedError) is retried once, unless the call was cancelled meanwhile (Serve routes
around a dead replica), then the call fails with `ReplicaLost`, which the executor does not
rerun one by one; a lost cluster fails the call and the worker goes on to the next.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from bot.backend import GenerationResult, LoadRecord, StepInfoLike
from bot.errors import GenerationFailed, ReplicaLost, SdbotError
from bot.jobs import GenerationRequest
from bot.serve.protocol import (
    HEARTBEAT_S,
    STEP_INTERVAL_S,
    Beat,
    Done,
    GeneratePayload,
    Hello,
    LoadReply,
    Step,
)
from bot.serve.stream import SILENCE_S, ReplicaDied, Stream, bot_errors

log = logging.getLogger(__name__)

#: Tries of one call when its replica dies under it: the first, and one on another replica.
ATTEMPTS = 2


@dataclass
class ServeLink:
    """What the engines (worker slots) of one deployment share."""

    handle: Any  # ray.serve.handle.DeploymentHandle to the SdbotReplica deployment
    preview_every: int = 5
    #: Called with each model load attempt on a replica (the executor's load recorder).
    on_load: Callable[[LoadRecord], None] | None = None
    #: The replica merges steps closer together than this (0 = every step, for tests).
    step_interval_s: float = STEP_INTERVAL_S
    #: How often a replica says it is still working, and how long the bot waits for a word.
    heartbeat_s: float = HEARTBEAT_S
    silence_s: float = SILENCE_S


@dataclass(frozen=True)
class CallRecord:
    """One generate() call as this client saw it (for /stats-like support, tests, benchmarks)."""

    replicas: list[str]  # one per attempt that reached a replica, in order
    tags: list[str]  # one per attempt: the replica's RunRecord.tag
    requests: int
    seconds: float
    outcome: str  # "ok", "cancelled" or the error's reason


@dataclass
class _RemoteStep:
    """A `StepInfoLike` for one step event; preview(i) is request i's latest preview."""

    step: int
    total: int
    latest: list[bytes | None] = field(default_factory=list)
    size: tuple[int, int] = (8, 8)

    def preview(self, index: int) -> Image.Image:
        data = self.latest[index] if index < len(self.latest) else None
        if data is None:  # no preview step yet: the engine's own placeholder
            return Image.new("RGB", self.size, (128, 128, 128))
        image = Image.open(io.BytesIO(data))
        image.load()
        return image


class ServeEngine:
    """One worker slot's engine: each call runs on whichever replica Serve picks."""

    def __init__(self, link: ServeLink, *, max_loaded: int = 1, attempts: int = ATTEMPTS) -> None:
        self.link = link
        #: Tries of one call when replicas die under it.
        self.attempts = max(1, attempts)
        self._max_loaded = max_loaded
        self._loaded: list[str] = []
        #: Recent calls, newest last.
        self.calls: deque[CallRecord] = deque(maxlen=100)
        #: The replica of the call in progress (or the last one).
        self.last_hello: Hello | None = None

    @property
    def max_loaded(self) -> int:
        """Models each replica keeps loaded (the executor plans model switches by it)."""
        return self._max_loaded

    @property
    def on_load(self) -> Callable[[LoadRecord], None] | None:
        return self.link.on_load

    @on_load.setter
    def on_load(self, callback: Callable[[LoadRecord], None] | None) -> None:
        # Shared: the runner sets it on the first worker's engine, and it is meant for all.
        self.link.on_load = callback

    @property
    def loaded_models(self) -> list[str]:
        """What the replica this slot used last reported loaded, least recently used first."""
        return list(self._loaded)

    # -- the worker's thread ------------------------------------------------------------------

    def load(self, model: str) -> list[str]:
        """Load `model` on a replica now (the bot's preload); its loaded models."""
        finished = False
        with bot_errors():
            handle = self.link.handle.options(stream=True, multiplexed_model_id=model)
            response = handle.load.remote(model, self.link.heartbeat_s)
            try:
                for event in Stream(response, self.link.silence_s).events():
                    if isinstance(event, LoadReply):
                        finished = True
                        self._records(event.records)
                        self._loaded = list(event.loaded)
                        return self.loaded_models
            finally:
                if not finished:
                    response.cancel()
        raise GenerationFailed("The image server ended the model load without a reply.")

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: Callable[[StepInfoLike], None] | None = None,
    ) -> list[GenerationResult]:
        """Run `requests` (one batch_key()) on a replica; see the module docstring."""
        if not requests:
            return []
        started = time.perf_counter()
        replicas: list[str] = []
        tags: list[str] = []
        outcome = "ok"
        first = requests[0]
        # Shared by the attempts: the last step known, for a cancel check before a retry.
        step = _RemoteStep(0, 0, [None] * len(requests), (first.width // 8, first.height // 8))
        try:
            for attempt in range(1, self.attempts + 1):
                try:
                    tags.append(uuid.uuid4().hex)
                    return self._attempt(list(requests), step, on_step, replicas, tags[-1])
                except ReplicaDied as died:
                    if attempt == self.attempts:
                        again = " (and again on a retry)" if attempt > 1 else ""
                        raise ReplicaLost(
                            f"The image server running this job stopped{again}; the job was "
                            "not finished. Please try again in a minute."
                        ) from died
                    log.warning("replica %s died mid-call (%s); retrying once", replicas, died)
                    if on_step is not None and step.total:
                        on_step(step)  # JobCancelled if every job was cancelled meanwhile
            raise AssertionError("unreachable")
        except SdbotError as exc:
            outcome = exc.reason
            raise
        finally:
            self.calls.append(
                CallRecord(replicas, tags, len(requests), time.perf_counter() - started, outcome)
            )

    def _attempt(
        self,
        requests: list[GenerationRequest],
        step: _RemoteStep,
        on_step: Callable[[StepInfoLike], None] | None,
        replicas: list[str],
        tag: str,
    ) -> list[GenerationResult]:
        link = self.link
        payload = GeneratePayload(
            requests, link.preview_every, tag, link.step_interval_s, link.heartbeat_s
        )
        finished = False
        with bot_errors():
            handle = link.handle.options(stream=True, multiplexed_model_id=requests[0].model)
            response = handle.generate.remote(payload)
            try:
                for event in Stream(response, link.silence_s).events():
                    if isinstance(event, Step):
                        step.step, step.total = event.step, event.total
                        for i, preview in enumerate(event.previews):
                            if preview is not None:
                                step.latest[i] = preview
                        if on_step is not None:
                            on_step(step)  # JobCancelled here cancels the response below
                    elif isinstance(event, Beat):
                        # A long step: check for a cancel again. Not before the first step
                        # (no progress to show yet), nor after the last (the images are due).
                        if 0 < event.step < event.total and on_step is not None:
                            step.step, step.total = event.step, event.total
                            on_step(step)
                    elif isinstance(event, LoadRecord):
                        self._records([event])
                    elif isinstance(event, Hello):
                        replicas.append(event.replica)
                        self.last_hello = event
                    elif isinstance(event, Done):
                        finished = True
                        self._loaded = list(event.loaded)
                        return [data.result() for data in event.results]
            finally:
                if not finished:
                    # Explicitly: a dropped response keeps the replica running.
                    response.cancel()
        raise GenerationFailed("The image server ended the job without its images.")

    def _records(self, records: Sequence[LoadRecord]) -> None:
        callback = self.link.on_load
        if callback is None:
            return
        for record in records:
            try:
                callback(record)
            except Exception:
                log.exception("on_load callback failed")
