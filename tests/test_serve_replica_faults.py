"""A Serve replica killed with SIGKILL mid-job, on the real local Ray cluster: the job is retried
once on the other replica, or fails with a clear message; the next job succeeds.

Last of the Serve modules (by name) on purpose: each kill leaves a replica restarting.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from bot.backend import StepInfoLike
from bot.errors import GenerationFailed
from bot.jobs import GenerationRequest
from bot.serve.client import ServeEngine
from tests import ray_cluster
from tests.ray_cluster import RayCluster

# The session's Ray cluster, as this module's fixture `session_cluster`.
session_cluster = ray_cluster.serve_cluster


def req(*, steps: int = 30, size: int = 128, **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt="a fox", model="builtin:tiny", width=size, height=size, steps=steps, **kw
    )


def kill_at_step(remote: ServeEngine, step: int, killed: list[int]) -> Any:
    """An on_step that SIGKILLs the replica running the call once it reaches `step`."""

    def on_step(info: StepInfoLike) -> None:
        hello = remote.last_hello
        if not killed and info.step >= step and hello is not None:
            killed.append(hello.pid)
            os.kill(hello.pid, signal.SIGKILL)

    return on_step


def test_a_replica_killed_mid_job_is_retried_on_the_other_and_the_next_job_succeeds(
    session_cluster: RayCluster,
) -> None:
    remote = session_cluster.engine()
    killed: list[int] = []
    [result] = remote.generate([req(seed=5)], on_step=kill_at_step(remote, 2, killed))
    assert killed and result.images[0].size == (128, 128)
    call = remote.calls[-1]
    assert call.outcome == "ok" and len(call.tags) == 2
    assert len(call.replicas) == 2 and call.replicas[0] != call.replicas[1]
    # The next job succeeds.
    assert remote.generate([req(steps=2, seed=6)])[0].images
    assert remote.calls[-1].outcome == "ok"


def test_a_job_whose_replica_dies_with_no_retry_left_fails_with_a_clear_message(
    session_cluster: RayCluster,
) -> None:
    remote = ServeEngine(session_cluster.engine().link, attempts=1)
    killed: list[int] = []
    with pytest.raises(GenerationFailed, match="stopped") as caught:
        remote.generate([req()], on_step=kill_at_step(remote, 1, killed))
    assert killed
    assert caught.value.message == (
        "The image server running this job stopped; the job was not finished. "
        "Please try again in a minute."
    )
    assert remote.calls[-1].outcome == "generation"
