"""A Serve replica killed with SIGKILL mid-job, on the real local Ray cluster: the job is retried
once on the other replica, or fails with a clear message (and a batch that killed its replicas
is not rerun one by one, which would kill more); the next job succeeds.

Last of the Serve modules (by name) on purpose: each kill leaves a replica restarting.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bot.backend import Failed, GenerationResult, StepInfoLike
from bot.errors import ReplicaLost
from bot.jobs import GenerationRequest
from bot.serve.client import ServeEngine
from tests import ray_cluster
from tests.ray_cluster import RayCluster
from tests.test_serve import executor_on, origin, workers_held

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


class KillsOnce(ServeEngine):
    """A worker slot's engine whose first call gets its replica killed at `step`."""

    def __init__(self, cluster: RayCluster, step: int, **kw: Any) -> None:
        super().__init__(cluster.engine().link, **kw)
        self.step = step
        self.killed: list[int] = []

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: Callable[[StepInfoLike], None] | None = None,
    ) -> list[GenerationResult]:
        kill = kill_at_step(self, self.step, self.killed)

        def both(info: StepInfoLike) -> None:
            kill(info)
            if on_step is not None:
                on_step(info)

        return super().generate(requests, on_step=both)


async def test_a_batch_whose_replica_died_with_no_retry_left_fails_whole_and_is_not_rerun(
    session_cluster: RayCluster, tmp_path: Path
) -> None:
    remote = KillsOnce(session_cluster, 1, attempts=1)
    async with executor_on([remote], tmp_path, max_batch=2) as ex:
        async with workers_held(ex):
            jobs = [await ex.submit(origin(user), req(seed=user)) for user in (1, 2)]
        ends = [[e async for e in job.stream()][-1] for job in jobs]
    assert remote.killed
    for end in ends:
        assert isinstance(end, Failed), end
        assert isinstance(end.error, ReplicaLost)
        assert end.error.message == (
            "The image server running this job stopped; the job was not finished. "
            "Please try again in a minute."
        )
    # One call, the batch's: rerunning its requests one by one would risk a replica each.
    assert [(call.requests, call.outcome) for call in remote.calls] == [(2, "generation")]
