"""A model that is not loaded yet: the job waiting on it says so (Loading), and start-up loads
the default model in the background so that the first member rarely waits at all."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench.standin_engine import Step
from bot.backend import (
    Event,
    Finished,
    GenerationResult,
    Job,
    JobOrigin,
    Loading,
    Progress,
    Queued,
    Started,
    StepInfoLike,
)
from bot.db import Database
from bot.discord_front.replies import status_text
from bot.engine import Engine
from bot.executor import GpuExecutor
from bot.jobs import GenerationRequest
from bot.runner import bot_resources
from bot.settings import Settings

ORIGIN = JobOrigin(user_id=1, user_name="ann", guild_id=2, channel_id=3, command="imagine")


def req(model: str = "builtin:tiny", steps: int = 2) -> GenerationRequest:
    return GenerationRequest(prompt="a cat", model=model, width=64, height=64, steps=steps, seed=7)


class ScriptedEngine:
    """Nothing loaded at first; lists a model under its catalog name, as the real engine does."""

    def __init__(self, names: dict[str, str] | None = None) -> None:
        self.names = names or {}  # source -> catalog name
        self.loaded_models: list[str] = []
        self.loads: list[str] = []
        self.load_gate = threading.Event()
        self.load_gate.set()

    def load(self, model: str) -> None:
        assert self.load_gate.wait(10)
        name = self.names.get(model, model)
        if name not in self.loaded_models:
            self.loads.append(name)
        self.loaded_models = [m for m in self.loaded_models if m != name] + [name]

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: Callable[[StepInfoLike], None] | None = None,
    ) -> list[GenerationResult]:
        self.load(requests[0].model)
        total = requests[0].steps
        for step in range(1, total + 1):
            if on_step is not None:
                on_step(Step(step, total, lambda i: Image.new("RGB", (8, 8))))
        return [
            GenerationResult(
                [Image.new("RGB", (8, 8)) for _ in r.seeds], r.seeds, [False] * r.count, "Euler"
            )
            for r in requests
        ]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "x.db")
    yield database
    await database.close()


async def events_of(job: Job) -> list[Event]:
    return [e async for e in job.stream()]


def kinds(events: list[Event]) -> list[type]:
    """The event types in order, each run of Progress as one."""
    out: list[type] = []
    for event in events:
        if not (out and out[-1] is Progress and isinstance(event, Progress)):
            out.append(type(event))
    return out


async def test_a_job_waiting_on_a_model_load_hears_loading_and_the_next_one_does_not(
    db: Database,
) -> None:
    engine = ScriptedEngine()
    ex = GpuExecutor(engine, db, progress_interval_s=0.0)
    await ex.start()
    try:
        first = await events_of(await ex.submit(ORIGIN, req()))
        assert kinds(first) == [Queued, Started, Loading, Progress, Finished]
        assert Loading("builtin:tiny") in first
        second = await events_of(await ex.submit(ORIGIN, req()))
        assert kinds(second) == [Queued, Started, Progress, Finished]
        # Another model is another load.
        third = await events_of(await ex.submit(ORIGIN, req("other/model")))
        assert Loading("other/model") in third
    finally:
        await asyncio.wait_for(ex.close(), 10)


async def test_a_preloaded_model_spelt_as_its_source_is_not_loaded_again(db: Database) -> None:
    engine = ScriptedEngine(names={"builtin:tiny": "tiny"})
    ex = GpuExecutor(engine, db, progress_interval_s=0.0)
    await ex.start()
    try:
        await ex.preload("builtin:tiny")
        assert ex.status().loaded_models == ["tiny"]
        events = await events_of(await ex.submit(ORIGIN, req("builtin:tiny")))
        assert not any(isinstance(e, Loading) for e in events)
        assert isinstance(events[-1], Finished) and engine.loads == ["tiny"]
    finally:
        await asyncio.wait_for(ex.close(), 10)


def test_the_progress_message_says_the_model_is_loading() -> None:
    job = Job(7, ORIGIN, req("owner/some-model"))
    text = status_text(job, Loading("owner/some-model"))
    assert "📦 Loading model `owner/some-model`… (first use can take a few minutes)" in text
    assert "job #7" in text


# -- start-up -----------------------------------------------------------------------------------


async def until_loaded(bot: Any, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while not (loaded := bot.services.backend.status().loaded_models):
        assert time.monotonic() < deadline, "the default model never loaded"
        await asyncio.sleep(0.05)
    return list(loaded)


async def test_start_up_loads_the_default_model_without_any_request(
    settings: Settings, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.runner")
    fresh = Engine(device="cpu", dtype="float32", cache_dir=model_cache)  # nothing loaded
    async with bot_resources(settings, engine=fresh) as bot:
        assert await until_loaded(bot) == fresh.loaded_models
        assert bot.services.backend.status().queue_length == 0
        # The model shows as loaded on the GPU thread a moment before the loop logs it.
        lines = await until_logged(caplog, "model builtin:tiny ready in ")
    assert "loading default model builtin:tiny…" in lines


async def until_logged(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    """The runner's log lines, once one starts with `start`."""
    deadline = time.monotonic() + 10
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "bot.runner"]
        if any(line.startswith(start) for line in lines):
            return lines
        assert time.monotonic() < deadline, lines
        await asyncio.sleep(0.02)


def runner_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "bot.runner" and r.levelno >= logging.WARNING]


async def test_a_default_model_that_cannot_load_is_one_warning_and_the_bot_goes_on(
    settings: Settings, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A Hub id that is not downloaded, and the tests are offline: the load fails at once.
    missing = settings.model_copy(update={"default_model": "nobody/not-downloaded"})
    fresh = Engine(device="cpu", dtype="float32", cache_dir=model_cache)
    async with bot_resources(missing, engine=fresh) as bot:
        deadline = time.monotonic() + 30
        while not runner_warnings(caplog):
            assert time.monotonic() < deadline, "no warning about the failed preload"
            await asyncio.sleep(0.05)
        assert bot.services.backend.status().loaded_models == []
        assert not bot.services.backend.status().closing
    # The engine logs the load error on its own; the runner adds one line, no traceback.
    warnings = runner_warnings(caplog)
    assert len(warnings) == 1 and warnings[0].exc_info is None
    text = warnings[0].getMessage()
    assert "\n" not in text
    assert text.startswith("could not preload default model nobody/not-downloaded; the bot runs")
    assert "is not downloaded yet" in text


async def test_a_preload_gate_holds_the_load_until_it_opens(
    settings: Settings, model_cache: Path
) -> None:
    fresh = Engine(device="cpu", dtype="float32", cache_dir=model_cache)
    gate = asyncio.Event()
    async with bot_resources(settings, engine=fresh, preload=gate) as bot:
        await asyncio.sleep(0.3)
        assert bot.services.backend.status().loaded_models == []
        gate.set()
        await until_loaded(bot)


async def test_closing_during_a_preload_does_not_wait_for_it(db: Database) -> None:
    """The load itself cannot be interrupted; bot_resources stops waiting for it (the
    executor's shutdown timeout) and the background task ends with it."""
    engine = ScriptedEngine()
    engine.load_gate.clear()
    ex = GpuExecutor(engine, db, shutdown_timeout_s=0.2)
    await ex.start()
    task = asyncio.create_task(ex.preload("builtin:tiny"))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    task.cancel()
    await asyncio.wait_for(ex.close(), 5)
    assert time.monotonic() - started < 3
    assert task.cancelled()
    engine.load_gate.set()
