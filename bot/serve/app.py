"""The Serve application: `SdbotReplica` as a deployment, for the bot's local mode and for
`serve deploy` with the shipped `serve_config.yaml` (import path `bot.serve.app:build_app`).

A fixed number of replicas, one per GPU: Serve's autoscaler cannot see the bot's queue, which
is where the waiting happens. One request at a time per replica (`max_ongoing_requests=1`):
the bot sends one batch per replica slot. `max_queued_requests` is only a safety net for a
cluster that more than one bot shares; the bot itself never queues more than one per slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ray import serve
from ray.serve import Application

from bot.serve.replica import SdbotReplica

#: The deployment's name inside the app.
DEPLOYMENT = "SdbotReplica"


@dataclass(frozen=True)
class AppOptions:
    """How to deploy: the `args:` of an application in serve_config.yaml."""

    replicas: int = 1
    #: GPUs each replica reserves: 1 = one replica per GPU; 0 = CPU replicas (tests, trying).
    gpus_per_replica: float = 1
    cpus_per_replica: float = 1
    #: Requests a bot's handle may queue beyond the replicas' slots before it is refused.
    max_queued_requests: int = 8
    #: SDBOT_* settings for the replicas (lower-case names: device, cache_dir, models_file, ...);
    #: the rest comes from each node's environment and `.env`.
    settings: dict[str, Any] = field(default_factory=dict)
    #: torch's intra-op threads on each replica; None = Ray's default (its CPUs).
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(
                f"replicas must be a whole number of at least 1, got {self.replicas!r}"
            )
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise ValueError("gpus_per_replica and cpus_per_replica cannot be negative")
        if not isinstance(self.max_queued_requests, int) or self.max_queued_requests < 1:
            raise ValueError(
                f"max_queued_requests must be at least 1, got {self.max_queued_requests!r}"
            )


def application(options: AppOptions) -> Application:
    """The app to `serve.run` (the bot's local mode) or to deploy through `build_app`."""
    actor: dict[str, Any] = {"num_cpus": options.cpus_per_replica}
    if options.gpus_per_replica:
        actor["num_gpus"] = options.gpus_per_replica
    deployment = serve.deployment(
        name=DEPLOYMENT,
        num_replicas=options.replicas,
        max_ongoing_requests=1,
        max_queued_requests=options.max_queued_requests,
        ray_actor_options=actor,
        # A replica stops when its call has: the engine stops at the next step once cancelled.
        graceful_shutdown_timeout_s=10,
        graceful_shutdown_wait_loop_s=0.5,
        # Serve logs a line per call otherwise; the bot logs its jobs itself.
        logging_config={"enable_access_log": False},
    )(SdbotReplica)
    return deployment.bind(dict(options.settings), options.torch_threads)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's app builder: `args` are the AppOptions fields, from the config's `args:`."""
    known = {f.name for f in fields(AppOptions)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown args {unknown} for bot.serve.app; known: {sorted(known)}")
    return application(AppOptions(**args))
