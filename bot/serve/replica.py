"""The Serve replica: one `bot.engine.Engine` on one GPU, streaming each batch back to the bot.

Threads (inside the replica's Ray actor):
- Serve's event loop runs the deployment's methods. `generate` is an async generator: it
  hands the engine call to the engine thread and yields the events that thread posts to it.
- One engine thread (a one-worker pool, as the bot's own worker), for the preload, every model
  load and every engine call: CUDA contexts and pipelines are not shared across threads.
Serve cancels the request's task when the bot calls `.cancel()` on its response; the task's
`finally` sets the call's cancel flag, and the step callback on the engine thread raises
JobCancelled at the next step. Cancelling only the bot's awaiting task would not reach here,
which is why the client cancels explicitly.

Every call sends something at least every `heartbeat_s` (`protocol.Beat` when nothing else is
due, also while a model loads): the bot gives up on a replica that stays silent.

No `@serve.batch`: the bot forms batches by `batch_key()` and sends one per replica slot.
Models go through `@serve.multiplexed` (keyed on the request's model, as many per replica as
the engine keeps loaded) so Serve routes a model's batches to a replica that has it loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from ray import serve

from bot.catalog import Catalog
from bot.engine import Engine, LoadRecord, StepInfo
from bot.errors import JobCancelled, SdbotError
from bot.imaging import preview_png
from bot.serve.protocol import (
    HEARTBEAT_S,
    Beat,
    Done,
    Event,
    GeneratePayload,
    Hello,
    LoadReply,
    ResultData,
    RunRecord,
    Step,
)
from bot.settings import export_hub_token, load_settings

if TYPE_CHECKING:
    from bot.engine import GenerationResult
    from bot.settings import Settings

log = logging.getLogger(__name__)

#: Recent calls a replica remembers for `runs()`.
RUN_LOG = 50


def build_engine(settings: Settings) -> Engine:
    """The engine a replica runs: the same settings as the bot's local engine."""
    return Engine.from_settings(settings, Catalog.load(settings.models_file, settings.lora_dir))


def _is_last_step(event: Event) -> bool:
    return isinstance(event, Step) and event.step >= event.total


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _beating(
    work: Awaitable[Any], every: float, beat: Callable[[], Beat]
) -> AsyncGenerator[Beat, None]:
    """Await `work`, yielding a heartbeat every `every` seconds until it is done (then its
    error, if any, is raised). Cancelled, it cancels `work`."""
    future = asyncio.ensure_future(work)
    try:
        while not future.done():
            await asyncio.wait({future}, timeout=every)
            if not future.done():
                yield beat()
        future.result()
    finally:
        if not future.done():
            future.cancel()


class _Call:
    """One `generate` call: the engine thread's side (step callback, run record) and the
    queue its events cross to the event loop by."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, payload: GeneratePayload, record: RunRecord
    ) -> None:
        self.loop = loop
        self.payload = payload
        self.record = record
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        # Set from the event loop (Serve cancelled the request), read at every step.
        self.cancel = threading.Event()
        self.last_sent = -math.inf

    def post(self, event: Event | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def beat(self) -> Beat:
        return Beat(self.record.step, self.record.total)

    async def next_events(self) -> list[Event | None] | None:
        """What the engine thread posted since the last call (waiting for at least one), or
        None when nothing came within the heartbeat interval."""
        try:
            first = await asyncio.wait_for(self.queue.get(), self.payload.heartbeat_s)
        except TimeoutError:
            return None
        batch = [first]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch

    def run(self, engine: Engine) -> list[GenerationResult]:
        """On the engine thread. Ends the event stream with None whatever happens."""
        try:
            return engine.generate(self.payload.requests, on_step=self.on_step)
        finally:
            self.record.done = True
            self.post(None)

    def on_step(self, info: StepInfo) -> None:
        self.record.step, self.record.total = info.step, info.total
        if self.cancel.is_set():
            self.record.cancelled = True
            raise JobCancelled("Cancelled while running.")
        every = self.payload.preview_every
        previews: tuple[bytes | None, ...] = ()
        # Not on the last step: the finished image follows at once.
        if every and info.step % every == 0 and info.step < info.total:
            previews = tuple(
                preview_png(info.preview(i)) for i in range(len(self.payload.requests))
            )
        now = time.monotonic()
        last = info.step >= info.total
        if previews or last or now - self.last_sent >= self.payload.step_interval_s:
            self.last_sent = now
            self.post(Step(info.step, info.total, previews))


class SdbotReplica:
    """The deployment's class (made a deployment by `bot.serve.app`)."""

    def __init__(
        self, settings: dict[str, Any] | None = None, torch_threads: int | None = None
    ) -> None:
        """settings: SDBOT_* overrides (lower-case field names); the rest is read from this
        node's environment and `.env`, as the bot reads its own."""
        if torch_threads:
            # Pixel-identical images need the same thread count as the engine they are
            # compared with (CPU kernels sum in a thread-dependent order).
            torch.set_num_threads(torch_threads)
        self.settings = load_settings(**(settings or {}))
        export_hub_token(self.settings)
        self.engine = build_engine(self.settings)
        self.engine.on_load = self._on_load
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdbot-replica")
        self._current: _Call | None = None
        self._load_records: list[LoadRecord] | None = None
        self._runs: deque[RunRecord] = deque(maxlen=RUN_LOG)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (a plain instance in a test)
            self.replica = f"pid-{os.getpid()}"

        async def load_model(model: str) -> str:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pool, self.engine.load, model)
            return model

        # Serve evicts its least recently used model id past this many; the engine's own LRU
        # frees the weights at the same count, so the two agree on what is loaded.
        self._models: Callable[[str], Any] = serve.multiplexed(
            max_num_models_per_replica=self.engine.max_loaded
        )(load_model)
        default = self.settings.default_model.strip()
        started = time.perf_counter()
        try:
            self._pool.submit(self.engine.load, default).result()
        except SdbotError as exc:  # the model loads again, or fails for the member, at first use
            log.warning("replica could not preload %s: %s", default, exc.message)
        else:
            log.info(
                "replica %s: %s ready in %.1f s",
                self.replica,
                default,
                time.perf_counter() - started,
            )

    def _on_load(self, record: LoadRecord) -> None:
        """Engine thread: a load attempt, sent to the bot with the call that caused it."""
        if self._load_records is not None:
            self._load_records.append(record)
        elif self._current is not None:
            self._current.post(record)

    async def generate(self, payload: GeneratePayload) -> AsyncIterator[list[Event]]:
        """Stream one batch: Hello, LoadRecord*/Step*/Beat*, Done, in as few items as keep
        progress live (each streamed item costs a few ms): Hello rides with the first step,
        events that piled up go together, the last step waits for Done, and a Beat goes when
        nothing else did for `payload.heartbeat_s`. Cancelling the request stops the engine at
        its next step."""
        record = RunRecord(payload.tag, self.replica, len(payload.requests), 0, 0, False, False)
        self._runs.append(record)
        call = _Call(asyncio.get_running_loop(), payload, record)
        self._current = call
        pending: list[Event] = [Hello(self.replica, os.getpid())]
        try:
            # Through Serve's multiplexing, so that it routes this model's batches here; a
            # load (a download, even) may take minutes: heartbeats meanwhile.
            model = self._models(payload.requests[0].model)
            async with contextlib.aclosing(
                _beating(model, payload.heartbeat_s, call.beat)
            ) as beats:
                async for beat in beats:
                    yield [*pending, beat]
                    pending = []
            started = time.perf_counter()
            future = asyncio.get_running_loop().run_in_executor(self._pool, call.run, self.engine)
            # Retrieved even when the request is cancelled first (no "never retrieved" noise).
            future.add_done_callback(_retrieved)
            while True:
                batch = await call.next_events()
                if batch is None:  # a long step, a VAE decode, the safety checker: alive
                    yield [*pending, call.beat()]
                    pending = []
                    continue
                ended = batch[-1] is None  # posted last, once the engine has left the call
                pending += [event for event in batch if event is not None]
                if ended:
                    break
                if pending and not _is_last_step(pending[-1]):
                    yield pending
                    pending = []
            results = await future
            seconds = time.perf_counter() - started
            done = Done(
                [ResultData.of(r.images, r.seeds, r.nsfw, r.sampler) for r in results],
                self.engine.loaded_models,
                seconds,
            )
            yield [*pending, done]
        finally:
            # Cancelled (or done): the engine stops at its next step, if it is still running.
            call.cancel.set()
            if self._current is call:
                self._current = None

    async def load(
        self, model: str, heartbeat_s: float = HEARTBEAT_S
    ) -> AsyncIterator[list[Beat | LoadReply]]:
        """Load `model` now (the bot's preload): heartbeats, then the reply with the load's
        records."""
        records: list[LoadRecord] = []
        self._load_records = records
        try:
            async with contextlib.aclosing(
                _beating(self._models(model), heartbeat_s, Beat)
            ) as beats:
                async for beat in beats:
                    yield [beat]
        finally:
            self._load_records = None
        yield [LoadReply(self.engine.loaded_models, records)]

    def max_loaded(self) -> int:
        """Models this replica keeps loaded (its own setting, which the bot plans by)."""
        return self.engine.max_loaded

    def runs(self) -> list[RunRecord]:
        """This replica's recent calls, oldest first."""
        return [replace(record) for record in self._runs]

    def loaded_models(self) -> list[str]:
        return self.engine.loaded_models
