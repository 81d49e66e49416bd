"""Replicas that go quiet, on the real local Ray cluster: the bot gives up on a silent one (a
hung call, a load that never ends, a call Serve cannot place) after the silence limit,
cancels it and fails the job with a clear message, while heartbeats keep a slow but live call
going and let a cancel through between the steps it reports.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from ray import serve

from bot.backend import StepInfoLike
from bot.errors import GenerationFailed, JobCancelled
from bot.jobs import GenerationRequest
from bot.serve.client import ServeEngine, ServeLink
from bot.serve.protocol import Hello
from tests import ray_cluster
from tests.ray_cluster import RayCluster
from tests.test_serve import replica_record

# The session's Ray cluster, as this module's fixture `session_cluster`.
session_cluster = ray_cluster.serve_cluster

#: Short, so the tests are quick; heartbeats (0.1 s here) keep a live call well inside it.
SILENCE_S = 1.5


def req(*, steps: int = 3, size: int = 64) -> GenerationRequest:
    return GenerationRequest(
        prompt="a fox", model="builtin:tiny", width=size, height=size, steps=steps
    )


@pytest.fixture(scope="module")
def hung(session_cluster: RayCluster) -> Iterator[Any]:
    """A stand-in replica that answers Hello, then nothing (as a replica stuck in a step or a
    load would), counting the cancels that reach it. One call at a time, as sdbot's replicas."""

    class Hung:
        def __init__(self) -> None:
            self.cancelled = 0

        async def _forever(self) -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

        async def generate(self, payload: Any) -> AsyncIterator[list[Any]]:
            yield [Hello("hung", os.getpid())]
            await self._forever()

        async def load(self, model: str, heartbeat_s: float) -> AsyncIterator[list[Any]]:
            await self._forever()
            yield []

        def cancels(self) -> int:
            return self.cancelled

    app = serve.deployment(
        name="Hung",
        max_ongoing_requests=1,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=0.5,
    )(Hung)
    handle = serve.run(app.bind(), name="sdbot-hung", route_prefix=None)
    try:
        yield handle
    finally:
        serve.delete("sdbot-hung")


def cancels(handle: Any) -> int:
    return int(handle.cancels.remote().result(timeout_s=30))


def cancels_reached(handle: Any, count: int) -> int:
    """The replica's cancel count, once it reaches `count` (or after 20 s)."""
    deadline = time.monotonic() + 20
    seen = cancels(handle)
    while seen < count and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = cancels(handle)
    return seen


def test_a_silent_replica_fails_the_job_and_is_cancelled_and_so_is_a_call_queued_behind(
    hung: Any,
) -> None:
    before = cancels(hung)
    running = ServeEngine(ServeLink(hung, 0, silence_s=SILENCE_S))
    queued = ServeEngine(ServeLink(hung, 0, silence_s=SILENCE_S))
    with ThreadPoolExecutor(2) as pool:  # a hang fails here, not at pytest's timeout
        first = pool.submit(running.generate, [req()])
        while running.last_hello is None and not first.done():
            time.sleep(0.02)
        # The only slot is taken: Serve cannot place this one anywhere, and says nothing.
        second = pool.submit(queued.generate, [req()])
        errors = [first.exception(timeout=60), second.exception(timeout=60)]
    for engine, error in zip((running, queued), errors, strict=True):
        assert isinstance(error, GenerationFailed), error
        assert error.message.startswith("The image server stopped answering")
        assert "Traceback" not in error.message
        assert engine.calls[-1].outcome == "generation" and engine.calls[-1].seconds >= SILENCE_S
    # The hung call was cancelled on the replica, not left running there.
    assert cancels_reached(hung, before + 1) == before + 1


def test_a_load_that_never_ends_fails_after_the_silence_limit(hung: Any) -> None:
    before = cancels(hung)
    remote = ServeEngine(ServeLink(hung, 0, silence_s=SILENCE_S))
    with ThreadPoolExecutor(1) as pool:
        error = pool.submit(remote.load, "builtin:tiny").exception(timeout=60)
    assert isinstance(error, GenerationFailed), error
    assert error.message.startswith("The image server stopped answering")
    assert cancels_reached(hung, before + 1) == before + 1


def test_heartbeats_keep_a_slow_call_alive_and_let_a_cancel_through(
    session_cluster: RayCluster,
) -> None:
    # Steps are not reported (a minute apart at the least), only heartbeats: a 16-step job at
    # 384 px takes about 2 s on a CPU, longer than the silence limit.
    remote = session_cluster.engine(step_interval_s=60, heartbeat_s=0.1, silence_s=SILENCE_S)
    seen: list[int] = []
    [result] = remote.generate([req(steps=16, size=384)], on_step=lambda i: seen.append(i.step))
    assert result.images[0].size == (384, 384)
    assert seen[0] == 1 and seen[-1] == 16 and seen == sorted(seen)
    # Every other on_step came with a heartbeat (steps 2-15 are not reported), passing the
    # replica's step: the cancel check between reports. About one per 0.1 s of the call.
    beats = len(seen) - 2
    assert beats >= max(1, int(remote.calls[-1].seconds / 0.1 / 3)), (seen, remote.calls[-1])

    def on_step(info: StepInfoLike) -> None:
        if info.step >= 4:  # reached only through heartbeats
            raise JobCancelled("Cancelled while running.")

    with pytest.raises(JobCancelled):
        remote.generate([req(steps=40, size=384)], on_step=on_step)
    record = replica_record(session_cluster, remote.calls[-1].tags[0])
    assert record.cancelled and record.step < record.total
