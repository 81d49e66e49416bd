"""One real local Ray cluster (CPU) with the sdbot Serve app deployed, shared by the Serve tests.

Import the `serve_cluster` fixture into a test module. The cluster starts once per session,
however many modules use it (a session fixture imported into two modules is two fixtures,
so the cluster itself is counted here), and stops after the last: `serve.shutdown()`, then
`ray.shutdown()`. Two replicas on two logical CPUs, torch at one thread on each side (as in
tests/conftest.py), so Serve images are pixel-identical to the local engine's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Before Ray is imported: no token auth (and no ~/.ray/auth_token) for a cluster of this process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
from ray import serve

from bot.engine import Engine
from bot.serve.app import AppOptions
from bot.serve.client import ServeEngine, ServeLink
from bot.serve.cluster import deploy

#: The app the tests deploy (SDBOT_SERVE_APP for the bot tests).
APP = "sdbot-test"
REPLICAS = 2
#: A handle may queue this many requests beyond the replicas' slots (the back-pressure test).
MAX_QUEUED = 2


@dataclass
class RayCluster:
    handle: Any  # DeploymentHandle of the app
    app: str
    replicas: int

    def engine(self, *, preview_every: int = 0, **link: Any) -> ServeEngine:
        """A fresh client (one worker slot) on the shared app; `link`: more ServeLink fields
        (step_interval_s=0: every step reported, for the cancel tests)."""
        return ServeEngine(ServeLink(self.handle, preview_every, **link))

    def runs(self, tries: int = 40) -> dict[str, Any]:
        """Tag -> RunRecord over both replicas (each call reaches one of them, at random)."""
        found: dict[str, Any] = {}
        replicas: set[str] = set()
        for _ in range(tries):
            for record in self.handle.runs.remote().result():
                found[record.tag] = record
                replicas.add(record.replica)
            if len(replicas) >= self.replicas:
                break
        return found


_users = 0
_cluster: RayCluster | None = None


def _start(model_cache: Path) -> RayCluster:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024**2,
        log_to_driver=False,
        namespace="sdbot-tests",
    )
    options = AppOptions(
        replicas=REPLICAS,
        gpus_per_replica=0,
        cpus_per_replica=1,
        max_queued_requests=MAX_QUEUED,
        torch_threads=1,
        settings={
            "_env_file": None,
            "cache_dir": str(model_cache),
            "device": "cpu",
            "dtype": "float32",
            "default_model": "builtin:tiny",
        },
    )
    return RayCluster(deploy(options, APP), APP, REPLICAS)


@pytest.fixture(scope="session")
def serve_cluster(model_cache: Path, engine: Engine) -> Iterator[RayCluster]:
    global _users, _cluster
    # The tiny model is built once, here, before two replicas would race to build it.
    engine.load("builtin:tiny")
    if _cluster is None:
        _cluster = _start(model_cache)
    _users += 1
    try:
        yield _cluster
    finally:
        _users -= 1
        if _users == 0:
            _cluster = None
            serve.shutdown()
            ray.shutdown()
