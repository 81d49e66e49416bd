"""The Serve backend's start-up, tear-down and retry rules, with Ray stood in for: what this
process stops on the way out (never a shared cluster's apps), addresses it refuses, start-up
failures as one line, the models-kept-loaded count asked of a replica, and which replica
errors are retried. What needs a real cluster (a SIGKILLed replica, a hung one) is in
test_serve_replica_faults.py and test_serve_hangs.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from bot.backend import StepInfoLike
from bot.errors import GenerationFailed, JobCancelled, ReplicaLost, SettingsError
from bot.jobs import GenerationRequest
from bot.serve import cluster
from bot.serve.app import AppOptions
from bot.serve.client import ServeEngine, ServeLink
from bot.serve.protocol import Done, Hello, ResultData, Step
from bot.settings import Settings

# -- Ray and Serve stood in for -----------------------------------------------------------------


@dataclass
class FakeRay:
    init_error: Exception | None = None
    initialized: bool = False
    calls: list[str] = field(default_factory=list)

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **kw: Any) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error
        self.initialized = True

    def shutdown(self) -> None:
        self.calls.append("shutdown")
        self.initialized = False

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}


@dataclass
class FakeServe:
    run_error: Exception | None = None
    replica_max_loaded: int = 3
    calls: list[str] = field(default_factory=list)

    def handle(self) -> Any:
        answer = SimpleNamespace(result=lambda timeout_s=None: self.replica_max_loaded)
        return SimpleNamespace(max_loaded=SimpleNamespace(remote=lambda: answer))

    def get_app_handle(self, app: str) -> Any:
        self.calls.append(f"get_app_handle {app}")
        return self.handle()

    def status(self) -> Any:
        raise RuntimeError("no dashboard here")

    def start(self, **kw: Any) -> None:
        self.calls.append("start")

    def run(self, app: Any, *, name: str, route_prefix: str | None) -> Any:
        self.calls.append(f"run {name}")
        if self.run_error is not None:
            raise self.run_error
        return self.handle()

    def delete(self, name: str) -> None:
        self.calls.append(f"delete {name}")

    def shutdown(self) -> None:
        self.calls.append("shutdown")


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeRay, FakeServe]:
    ray, serve = FakeRay(), FakeServe()
    monkeypatch.setattr(cluster, "ray", ray)
    monkeypatch.setattr(cluster, "serve", serve)
    return ray, serve


def serve_settings(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update={"backend": "serve", "serve_app": "sdbot", **update})


# -- tear-down: what this process started, and only that ----------------------------------------


def test_stopping_the_bot_leaves_a_shared_clusters_apps_alone(
    settings: Settings, fakes: tuple[FakeRay, FakeServe]
) -> None:
    ray, serve = fakes
    connected = cluster.connect(serve_settings(settings, serve_address="auto", serve_replicas=2))
    assert ray.calls == ["init"] and connected.started_ray and not connected.local
    assert len(connected.engines) == 2
    connected.close()
    # Disconnected, nothing more: serve.shutdown() would delete every app on the cluster.
    assert ray.calls == ["init", "shutdown"]
    assert serve.calls == ["get_app_handle sdbot"]


def test_local_mode_stops_the_ray_and_serve_it_started(
    settings: Settings, fakes: tuple[FakeRay, FakeServe]
) -> None:
    ray, serve = fakes
    connected = cluster.connect(
        serve_settings(settings, serve_address="local"), AppOptions(replicas=1, gpus_per_replica=0)
    )
    assert connected.local and connected.deployed and len(connected.engines) == 1
    connected.close()
    assert serve.calls == ["start", "run sdbot", "delete sdbot", "shutdown"]
    assert ray.calls == ["init", "shutdown"]


# -- start-up ------------------------------------------------------------------------------------


def test_a_ray_client_address_is_refused_with_the_way_that_works(
    settings: Settings, fakes: tuple[FakeRay, FakeServe]
) -> None:
    ray, serve = fakes
    with pytest.raises(SettingsError) as caught:
        cluster.connect(serve_settings(settings, serve_address="ray://10.0.0.5:10001"))
    message = caught.value.message
    assert "ray://" in message and "\n" not in message
    assert "ray start --address=HEAD_IP:6379 --num-cpus=0" in message
    assert "SDBOT_SERVE_ADDRESS=auto" in message
    assert ray.calls == [] and serve.calls == []  # refused before connecting anywhere


@pytest.mark.parametrize("where", ["ray.init", "serve.run"])
def test_local_start_up_failures_are_one_line_and_leave_nothing_running(
    settings: Settings, fakes: tuple[FakeRay, FakeServe], where: str
) -> None:
    ray, serve = fakes
    error = RuntimeError("Deploying app 'sdbot' failed:\nTraceback (most recent call last):\n")
    if where == "ray.init":
        ray.init_error = error
    else:
        serve.run_error = error
    with pytest.raises(SettingsError) as caught:
        cluster.connect(
            serve_settings(settings, serve_address="local"),
            AppOptions(replicas=1, gpus_per_replica=0),
        )
    message = caught.value.message
    assert "\n" not in message and "Traceback" not in message
    assert "SDBOT_SERVE_ADDRESS=local" in message and "Deploying app 'sdbot' failed" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    if where == "serve.run":  # Ray had started: stopped again
        assert ray.calls == ["init", "shutdown"] and serve.calls[-1] == "shutdown"


def test_the_models_kept_loaded_are_the_replicas_not_the_bots_setting(
    settings: Settings, fakes: tuple[FakeRay, FakeServe]
) -> None:
    _, serve = fakes
    serve.replica_max_loaded = 3
    connected = cluster.connect(serve_settings(settings, serve_address="auto", max_loaded_models=1))
    assert connected.max_loaded == 3
    assert [engine.max_loaded for engine in connected.engines] == [3] * len(connected.engines)
    connected.close()


# -- which replica errors are retried ------------------------------------------------------------


@dataclass
class FakeResponse:
    events: list[Any]
    error: Exception | None
    cancelled: bool = False

    def __iter__(self) -> Iterator[list[Any]]:
        for event in self.events:
            yield [event]
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """A deployment handle whose calls play `script`: (events, then this error or None)."""

    def __init__(self, script: list[tuple[list[Any], Exception | None]]) -> None:
        self.script = script
        self.responses: list[FakeResponse] = []

    def options(self, **kw: Any) -> FakeHandle:
        return self

    @property
    def generate(self) -> FakeHandle:
        return self

    def remote(self, payload: Any) -> FakeResponse:
        response = FakeResponse(*self.script[len(self.responses)])
        self.responses.append(response)
        return response


def req() -> GenerationRequest:
    return GenerationRequest(prompt="a fox", model="builtin:tiny", width=64, height=64, steps=4)


def died() -> ActorDiedError:
    return ActorDiedError()


DONE = Done([ResultData([], [], [], [], "euler")], ["builtin:tiny"], 0.1)


def test_a_died_replica_is_retried_once_then_the_job_fails_as_replica_lost() -> None:
    handle = FakeHandle([([Hello("a", 1), Step(1, 4)], died()), ([Hello("b", 2)], died())])
    remote = ServeEngine(ServeLink(handle, 0))
    with pytest.raises(ReplicaLost, match=r"stopped \(and again on a retry\)"):
        remote.generate([req()])
    assert len(handle.responses) == 2 and all(r.cancelled for r in handle.responses)
    assert remote.calls[-1].replicas == ["a", "b"]
    # And a retry that works is the job's result.
    handle = FakeHandle([([Hello("a", 1)], died()), ([Hello("b", 2), Step(4, 4), DONE], None)])
    remote = ServeEngine(ServeLink(handle, 0))
    assert len(remote.generate([req()])) == 1 and remote.calls[-1].outcome == "ok"


def test_an_unavailable_replica_is_not_retried_it_may_still_run_the_job() -> None:
    unavailable = ActorUnavailableError("connection lost", None)
    handle = FakeHandle([([Hello("a", 1), Step(1, 4)], unavailable), ([DONE], None)])
    remote = ServeEngine(ServeLink(handle, 0))
    with pytest.raises(GenerationFailed, match="lost contact with the image server") as caught:
        remote.generate([req()])
    assert type(caught.value) is GenerationFailed  # not ReplicaLost: batch-mates rerun alone
    assert len(handle.responses) == 1 and handle.responses[0].cancelled


def test_a_job_cancelled_while_its_replica_died_is_not_retried() -> None:
    handle = FakeHandle([([Hello("a", 1), Step(2, 4)], died()), ([DONE], None)])
    remote = ServeEngine(ServeLink(handle, 0))
    seen: list[int] = []

    def on_step(info: StepInfoLike) -> None:
        seen.append(info.step)
        if len(seen) > 1:  # cancelled after the step arrived, before the replica died
            raise JobCancelled("Cancelled while running.")

    with pytest.raises(JobCancelled):
        remote.generate([req()], on_step=on_step)
    assert seen == [2, 2] and len(handle.responses) == 1
    assert remote.calls[-1].outcome == "cancelled"
