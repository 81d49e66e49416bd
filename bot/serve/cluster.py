"""Start-up and tear-down of the Serve backend: from the settings to one engine per replica slot.

`serve_engines(settings)` (an async context manager; the runner wraps each engine in a
`bot.executor.Worker`):
- SDBOT_SERVE_ADDRESS=local: start Ray in this process (no dashboard, a capped object store,
  token auth off unless RAY_AUTH_MODE says otherwise), deploy the app with
  SDBOT_SERVE_REPLICAS replicas and wait until they are ready; stop both on the way out.
- any other address (`auto`, `host:6379`): connect, and take a handle to the app named
  SDBOT_SERVE_APP that `serve deploy` put there; on the way out only disconnect, leaving the
  cluster and its apps as they were. Not `ray://`: Ray Client cannot stream from a
  deployment, so the bot's machine joins the cluster as a node instead.
A cluster that cannot be reached, has no such app, or (local) does not start is a
SettingsError (one line, exit 2). The models each replica keeps loaded come from a replica.
Ray already running in this process (tests, benchmarks) is used as it is and left running.

The blocking Ray calls run in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

from bot.errors import SettingsError
from bot.serve.app import DEPLOYMENT, AppOptions, application
from bot.serve.client import ServeEngine, ServeLink
from bot.serve.stream import describe
from bot.settings import Settings

log = logging.getLogger(__name__)

#: The object store of a Ray started in this process (images and previews pass through it);
#: uncapped, Ray takes 30% of the RAM in /dev/shm.
LOCAL_OBJECT_STORE_MB = 512
#: Seconds to wait for a TCP connection to the cluster's address before giving up.
CONNECT_TIMEOUT_S = 5.0
#: Seconds to wait for a replica to say how many models it keeps loaded.
MAX_LOADED_TIMEOUT_S = 30.0

_HOST_PORT = re.compile(r"^\[?([^\]/]+?)\]?:(\d+)$")


@dataclass
class ServeCluster:
    """A connection to the app, and what this process started (to stop only that)."""

    link: ServeLink
    slots: int
    max_loaded: int
    app: str
    #: SDBOT_SERVE_ADDRESS=local: Ray and Serve are this process's own, to stop on the way out.
    local: bool = False
    started_ray: bool = False
    deployed: bool = False
    engines: list[ServeEngine] = field(default_factory=list)

    def close(self) -> None:
        if self.deployed:
            with contextlib.suppress(Exception):
                serve.delete(self.app)
        if self.started_ray:
            _stop_ray(local=self.local)


def _stop_ray(*, local: bool) -> None:
    """Undo this process's ray.init: with Serve too when the cluster is this process's own
    (on a shared one, serve.shutdown() would delete every app deployed there); remote, only
    disconnect."""
    if local:
        with contextlib.suppress(Exception):
            serve.shutdown()
    ray.shutdown()


@contextlib.asynccontextmanager
async def serve_engines(
    settings: Settings, *, options: AppOptions | None = None
) -> AsyncIterator[list[ServeEngine]]:
    """One ServeEngine per replica slot of the app; see the module docstring.

    options: how to deploy in local mode (default: from the settings).
    """
    cluster = await asyncio.to_thread(connect, settings, options)
    try:
        yield cluster.engines
    finally:
        await asyncio.to_thread(cluster.close)


def connect(settings: Settings, options: AppOptions | None = None) -> ServeCluster:
    """Blocking: connect to (or start) Ray and the app; SettingsError when that fails."""
    address = settings.serve_address.strip()
    local = address == "local"
    if address.startswith("ray://"):
        # Ray Client cannot stream from a deployment (DeploymentHandle refuses stream=True
        # there), and every job streams its progress.
        raise SettingsError(
            f"SDBOT_SERVE_ADDRESS={address}: the bot cannot use Ray Client (ray://) addresses. "
            "Join the cluster from the bot's machine instead (`ray start "
            "--address=HEAD_IP:6379 --num-cpus=0`) and set SDBOT_SERVE_ADDRESS=auto."
        )
    started_ray = False
    if not ray.is_initialized():
        if local:
            _start_local_ray()
        else:
            _check_reachable(address)
            try:
                ray.init(address=address, namespace="sdbot")
            except Exception as exc:
                raise SettingsError(
                    f"cannot reach the Ray cluster at SDBOT_SERVE_ADDRESS={address} "
                    f"({describe(exc)}); is it started (`ray start --head`), and are Ray and "
                    "Python the same versions here and there?"
                ) from None
        started_ray = True
    try:
        if local:
            options = options or local_options(settings)
            handle = _deploy_local(options, settings.serve_app)
            slots = options.replicas
        else:
            handle = _app_handle(settings.serve_app, address)
            slots = _running_replicas(settings.serve_app) or settings.serve_replicas
        cluster = ServeCluster(
            ServeLink(handle, settings.preview_every),
            slots,
            _replica_max_loaded(handle, settings.max_loaded_models),
            settings.serve_app,
            local=local,
            started_ray=started_ray,
            deployed=local,
        )
    except BaseException:
        if started_ray:
            _stop_ray(local=local)
        raise
    cluster.engines = [
        ServeEngine(cluster.link, max_loaded=cluster.max_loaded) for _ in range(cluster.slots)
    ]
    log.info("Serve backend: app %s with %d replica slot(s)", cluster.app, cluster.slots)
    return cluster


def _start_local_ray() -> None:
    # Ray 2.60 turns token auth on for new clusters and writes ~/.ray/auth_token; a cluster
    # inside this process is reachable from this machine only.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        ray.init(
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_MB * 1024**2,
            namespace="sdbot",
        )
    except Exception as exc:
        raise SettingsError(
            f"cannot start Ray in the bot's process for SDBOT_SERVE_ADDRESS=local "
            f"({describe(exc)})."
        ) from None


def _deploy_local(options: AppOptions, name: str) -> Any:
    try:
        return deploy(options, name)
    except Exception as exc:
        # E.g. a replica that cannot start: Serve's message names the replica's own error.
        raise SettingsError(
            f"the Serve app {name!r} did not start with SDBOT_SERVE_ADDRESS=local "
            f"({describe(exc)}); the Ray logs in /tmp/ray/session_latest/logs say more."
        ) from None


def _replica_max_loaded(handle: Any, fallback: int) -> int:
    """Models each replica keeps loaded, as a replica says: the cluster's serve_config.yaml may
    set it differently from this bot's SDBOT_MAX_LOADED_MODELS."""
    try:
        return int(handle.max_loaded.remote().result(timeout_s=MAX_LOADED_TIMEOUT_S))
    except Exception as exc:
        log.warning(
            "could not ask a replica how many models it keeps loaded (%s); planning with "
            "SDBOT_MAX_LOADED_MODELS=%d",
            describe(exc),
            fallback,
        )
        return fallback


def deploy(options: AppOptions, name: str) -> Any:
    """Deploy the app on the connected cluster and wait until every replica is ready."""
    serve.start(proxy_location="Disabled")
    return serve.run(application(options), name=name, route_prefix=None)


def local_options(settings: Settings) -> AppOptions:
    """How the bot's local mode deploys: its own settings, one replica per GPU if there are
    GPUs (shared when more replicas than GPUs are asked for), else CPU replicas."""
    resources = ray.cluster_resources()
    replicas = settings.serve_replicas
    gpus = float(resources.get("GPU", 0)) if settings.device != "cpu" else 0.0
    cpus = float(resources.get("CPU", 1))
    return AppOptions(
        replicas=replicas,
        # Fractions where there are fewer than one each, or the deployment would wait forever.
        gpus_per_replica=min(1.0, gpus / replicas) if gpus else 0,
        cpus_per_replica=min(1.0, cpus / replicas),
        settings=replica_settings(settings),
    )


def replica_settings(settings: Settings) -> dict[str, Any]:
    """The settings a replica's engine needs, with paths made absolute (a Ray worker runs in
    its own folder)."""

    def absolute(path: os.PathLike[str] | None) -> str | None:
        return None if path is None else os.path.abspath(path)

    return {
        "_env_file": None,
        "default_model": settings.default_model,
        "device": settings.device,
        "dtype": settings.dtype,
        "cache_dir": absolute(settings.cache_dir),
        "models_file": absolute(settings.models_file),
        "lora_dir": absolute(settings.lora_dir),
        "max_loaded_models": settings.max_loaded_models,
        "ram_cache_mb": settings.ram_cache_mb,
        "compile": settings.compile,
    }


def _check_reachable(address: str) -> None:
    """A quick TCP connect: ray.init retries an unreachable address for minutes."""
    match = _HOST_PORT.match(address)
    if match is None:  # `auto`: Ray finds a cluster on this machine, or fails at once
        return
    host, port = match.group(1), int(match.group(2))
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise SettingsError(
            f"cannot reach the Ray cluster at SDBOT_SERVE_ADDRESS={address} "
            f"({exc.strerror or exc}); start it with `ray start --head` there, or set "
            "SDBOT_SERVE_ADDRESS=local to run Ray in the bot's process."
        ) from None


def _app_handle(app: str, address: str) -> Any:
    try:
        return serve.get_app_handle(app)
    except Exception:
        raise SettingsError(
            f"no Serve app named {app!r} runs on the Ray cluster at {address}: deploy it with "
            "`serve deploy` and bot/serve/serve_config.yaml, or set SDBOT_SERVE_APP to its name."
        ) from None


def _running_replicas(app: str) -> int:
    """Running replicas of the app's deployment; 0 when Serve cannot say."""
    try:
        status = serve.status().applications[app].deployments[DEPLOYMENT]
        # ReplicaState is a str enum.
        return sum(n for state, n in status.replica_states.items() if state == "RUNNING")
    except Exception:
        return 0
