"""The Serve backend on a real local Ray cluster (two CPU replicas of the tiny model): the client
against the local engine, cancel, back-pressure, errors, the executor's fair queue over two
replicas, and a replica killed mid-job.

The whole bot over Serve, through the local Discord server, is in test_serve_bot.py.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from ray import serve
from ray.serve.schema import ServeDeploySchema

from bot.backend import Finished, JobOrigin, Progress, Started, StepInfoLike
from bot.db import Database
from bot.engine import Engine
from bot.errors import GenerationFailed, InvalidRequest, JobCancelled, QueueFull
from bot.executor import GpuExecutor, Worker
from bot.jobs import GenerationRequest
from bot.serve.app import DEPLOYMENT, build_app
from bot.serve.client import ServeEngine, ServeLink
from bot.serve.cluster import connect
from bot.serve.protocol import GeneratePayload
from bot.settings import Settings
from tests import images, ray_cluster
from tests.ray_cluster import MAX_QUEUED, RayCluster

# The session's Ray cluster, as this module's fixture `session_cluster`.
session_cluster = ray_cluster.serve_cluster


def req(prompt: str = "a fox", *, steps: int = 3, size: int = 64, **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, model="builtin:tiny", width=size, height=size, steps=steps, **kw
    )


def origin(user: int) -> JobOrigin:
    return JobOrigin(user_id=user, user_name=f"u{user}", guild_id=2, channel_id=3, command="x")


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# -- the client against the local engine --------------------------------------------------------


def test_serve_images_are_pixel_identical_to_the_local_engines(
    session_cluster: RayCluster, engine: Engine
) -> None:
    remote = session_cluster.engine()
    init = Image.open(io.BytesIO(images.photo((64, 64)))).convert("RGB")
    batch = [req("a red fox", seed=7, count=2), req("a blue lake", seed=9)]
    cases = [batch, [req("make it night", seed=3, mode="img2img", init_image=init, strength=0.7)]]
    for requests in cases:
        served = remote.generate(requests)
        local = engine.generate(requests)
        assert len(served) == len(local) == len(requests)
        for s, lo in zip(served, local, strict=True):
            assert s.seeds == lo.seeds and s.nsfw == lo.nsfw and s.sampler == lo.sampler
            assert [img.size for img in s.images] == [img.size for img in lo.images]
            assert all(same_pixels(a, b) for a, b in zip(s.images, lo.images, strict=True))
    # The call is on record, with the replica that ran it.
    last = remote.calls[-1]
    assert last.outcome == "ok" and len(last.replicas) == 1 and last.requests == 1
    assert remote.loaded_models  # as the replica reported them


def test_progress_reaches_the_last_step_with_previews_at_the_interval(
    session_cluster: RayCluster,
) -> None:
    remote = session_cluster.engine(preview_every=2)
    steps: list[tuple[int, int]] = []
    previews: list[tuple[int, Image.Image]] = []

    def on_step(info: StepInfoLike) -> None:
        steps.append((info.step, info.total))
        if info.step % 2 == 0 and info.step < info.total:
            previews.append((info.step, info.preview(0)))

    [result] = remote.generate([req(steps=5, size=128, seed=1)], on_step=on_step)
    # Steps closer than the replica's interval may be merged; the first, every preview step
    # and the last always come through, in order.
    assert steps[0] == (1, 5) and steps[-1] == (5, 5)
    assert [s for s, _ in steps] == sorted({s for s, _ in steps})
    assert {2, 4} <= {s for s, _ in steps}
    assert [s for s, _ in previews] == [2, 4]
    # Real previews of the latents (1/8 of the image), not the grey placeholder.
    for _, image in previews:
        assert image.size == (16, 16)
        assert len(set(image.getdata())) > 1
    assert result.images[0].size == (128, 128)


def test_an_engine_error_reaches_the_member_unwrapped(session_cluster: RayCluster) -> None:
    remote = session_cluster.engine()
    with pytest.raises(InvalidRequest, match=r"Unknown model 'nope'.*Available") as caught:
        remote.generate([GenerationRequest(prompt="x", model="nope", width=64, height=64)])
    # The engine's own error, not Ray's dual RayTaskError(InvalidRequest) whose str() is the
    # remote traceback (what the A1111 API would show).
    err = caught.value
    assert type(err) is InvalidRequest
    assert str(err) == err.message and err.message.startswith("Unknown model 'nope'")
    assert "Ray" not in str(err) and "Traceback" not in str(err)
    assert err.__traceback__ is not None and err.__cause__ is None
    assert remote.calls[-1].outcome == "invalid"
    # The next call is served as usual.
    assert remote.generate([req(steps=1)])[0].images


# -- cancel -------------------------------------------------------------------------------------


def replica_record(cluster: RayCluster, tag: str) -> Any:
    """The replica's record of an attempt, once its engine thread has left the call."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        record = cluster.runs().get(tag)
        if record is not None and record.done:
            return record
        time.sleep(0.05)
    raise AssertionError(f"no finished run {tag} on the replicas")


#: Cancel tests: steps long enough (~0.1 s on a CPU) that a cancel crosses to the replica
#: within a step, and every step reported (step_interval_s=0), so "within 2 steps" is exact.
CANCEL_SIZE = 384


def test_cancel_from_the_step_callback_stops_the_replica_within_two_steps(
    session_cluster: RayCluster,
) -> None:
    remote = session_cluster.engine(step_interval_s=0)
    seen: list[int] = []

    def on_step(info: StepInfoLike) -> None:
        seen.append(info.step)
        if info.step >= 3:
            raise JobCancelled("Cancelled while running.")

    with pytest.raises(JobCancelled):
        remote.generate([req(steps=40, size=CANCEL_SIZE)], on_step=on_step)
    assert seen == [1, 2, 3]
    record = replica_record(session_cluster, remote.calls[-1].tags[0])
    assert record.cancelled and record.total == 40
    assert record.step - seen[-1] <= 2, (record.step, seen)
    assert remote.calls[-1].outcome == "cancelled"


@asynccontextmanager
async def executor_on(
    engines: list[ServeEngine], tmp_path: Path, **kw: Any
) -> AsyncIterator[GpuExecutor[ServeEngine]]:
    db = await Database.open(tmp_path / "serve.db")
    kw.setdefault("queue_limit", 20)
    kw.setdefault("user_queue_limit", 10)
    workers = [Worker(e, name=f"serve-{i}") for i, e in enumerate(engines)]
    ex = GpuExecutor(db=db, workers=workers, **kw)
    await ex.start()
    try:
        yield ex
    finally:
        await asyncio.wait_for(ex.close(), 30)
        rows = await db.list_jobs(limit=1000)
        await db.close()
        assert not [r["id"] for r in rows if r["status"] in ("queued", "running")]


async def test_cancelling_the_awaiting_task_stops_the_replica_within_two_steps(
    session_cluster: RayCluster, tmp_path: Path
) -> None:
    remote = session_cluster.engine(step_interval_s=0)
    async with executor_on([remote], tmp_path, preview_every=0, progress_interval_s=0) as ex:
        progressed = asyncio.Event()
        last_step = 0

        async def member() -> None:
            nonlocal last_step
            async for event in ex.generate(origin(1), req(steps=40, size=CANCEL_SIZE)):
                if isinstance(event, Progress):
                    last_step = event.step
                    if event.step >= 2:
                        progressed.set()

        task = asyncio.create_task(member())
        await asyncio.wait_for(progressed.wait(), 30)
        task.cancel()  # what a member leaving (or a front's timeout) does to its awaiting task
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(400):
            if remote.calls:
                break
            await asyncio.sleep(0.05)
        assert remote.calls and remote.calls[-1].outcome == "cancelled"
        record = await asyncio.to_thread(replica_record, session_cluster, remote.calls[-1].tags[0])
        assert record.cancelled and record.step - last_step <= 2, (record.step, last_step)
        [row] = await ex.db.list_jobs(limit=10)
        assert row["status"] == "cancelled"


# -- back-pressure ------------------------------------------------------------------------------


def test_back_pressure_is_the_usual_queue_full_refusal(session_cluster: RayCluster) -> None:
    handle = session_cluster.handle.options(stream=True, multiplexed_model_id="builtin:tiny")
    long = GeneratePayload([req(steps=150, size=128)], 0, "bp")
    # Both replicas busy, then as many waiting as the handle may queue.
    busy = [handle.generate.remote(long) for _ in range(session_cluster.replicas)]
    try:
        for response in busy:
            next(iter(response))  # its Hello: running on a replica
        queued = [handle.generate.remote(long) for _ in range(MAX_QUEUED)]
        time.sleep(0.3)  # the router counts them
        with pytest.raises(QueueFull, match="busy") as caught:
            session_cluster.engine().generate([req(steps=1)])
        assert caught.value.reason == "queue_full"
    finally:
        for response in busy + locals().get("queued", []):
            response.cancel()


# -- the executor's queue over two replicas ---------------------------------------------------


@asynccontextmanager
async def workers_held(ex: GpuExecutor[Any]) -> AsyncIterator[None]:
    """Park every worker's thread, so jobs submitted inside the block queue up together."""
    gate = threading.Event()
    entered = [threading.Event() for _ in ex.workers]

    def hold(i: int) -> None:
        entered[i].set()
        gate.wait(30)

    held = [
        asyncio.ensure_future(ex.run_on_gpu_thread(lambda i=i: hold(i), worker=i))
        for i in range(len(ex.workers))
    ]
    for event in entered:
        await asyncio.to_thread(event.wait, 30)
    try:
        yield
    finally:
        gate.set()
        await asyncio.gather(*held)


async def started_order(jobs: list[Any]) -> list[int]:
    """Job ids in the order they started (Started events, stamped as they arrive)."""
    stamps: dict[int, float] = {}

    async def watch(job: Any) -> None:
        async for event in job.stream():
            if isinstance(event, Started):
                stamps[job.id] = time.monotonic()
            assert not isinstance(event, Progress) or event.total > 0

    await asyncio.gather(*(watch(job) for job in jobs))
    return sorted(stamps, key=stamps.__getitem__)


async def test_two_replicas_keep_the_fair_order_and_both_are_used(
    session_cluster: RayCluster, tmp_path: Path
) -> None:
    engines = [session_cluster.engine(), session_cluster.engine()]
    async with executor_on(engines, tmp_path, max_batch=1) as ex:
        async with workers_held(ex):
            heavy = [
                await ex.submit(origin(1), req(f"heavy {i}", steps=6, size=96)) for i in range(4)
            ]
            light = await ex.submit(origin(2), req("light", steps=6, size=96))
        order = await started_order([*heavy, light])
        # The light member is not behind the heavy one's whole backlog: it runs in the first
        # round, alongside the heavy member's first job.
        assert set(order[:2]) == {heavy[0].id, light.id}, order
        assert order[2:] == [heavy[1].id, heavy[2].id, heavy[3].id]
    replicas = {r for e in engines for call in e.calls for r in call.replicas}
    assert len(replicas) == 2, "both replicas ran jobs"
    assert all(call.outcome == "ok" for e in engines for call in e.calls)


async def test_batches_are_formed_by_batch_key_and_sent_one_per_replica(
    session_cluster: RayCluster, tmp_path: Path, engine: Engine
) -> None:
    engines = [session_cluster.engine(), session_cluster.engine()]
    async with executor_on(engines, tmp_path, max_batch=4) as ex:
        async with workers_held(ex):
            a = await ex.submit(origin(1), req("a cat", steps=3, seed=21))
            b = await ex.submit(origin(2), req("a dog", steps=4, seed=22))  # another batch_key
            c = await ex.submit(origin(3), req("a cow", steps=3, seed=23))  # same key as a
        done = {}
        for job in (a, b, c):
            events = [e async for e in job.stream()]
            assert isinstance(events[-1], Finished), events[-1]
            done[job.id] = events[-1]
    calls = sorted((call for e in engines for call in e.calls), key=lambda c: -c.requests)
    assert [call.requests for call in calls] == [2, 1]
    # The replica ran the pair as one engine call.
    runs = await asyncio.to_thread(session_cluster.runs)
    assert runs[calls[0].tags[0]].requests == 2
    # And the batched image equals a solo local run with its seed.
    solo = engine.generate([c.request])[0].images[0]
    with Image.open(io.BytesIO(done[c.id].images[0])) as png:
        assert same_pixels(png, solo)


# -- the shipped Serve config -------------------------------------------------------------------


def test_the_shipped_serve_config_is_valid_and_builds_the_app() -> None:
    text = (resources.files("bot.serve") / "serve_config.yaml").read_text()
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    [app] = config.applications
    assert app.name == "sdbot" and app.import_path == "bot.serve.app:build_app"
    assert config.proxy_location == "Disabled"
    built = build_app(app.args)
    deployment = built._bound_deployment  # what `serve deploy` would run
    assert deployment.num_replicas == app.args["replicas"]
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert deployment.max_ongoing_requests == 1
    with pytest.raises(ValueError, match="unknown args"):
        build_app({"replica": 2})


def test_an_app_gone_from_the_cluster_fails_the_job_clearly_and_the_next_one_runs(
    session_cluster: RayCluster,
) -> None:
    # A stand-in app (no engine: it only has to exist, then not), deployed, used, deleted: what
    # a bot holds after the app was deleted or its cluster restarted under it.
    class Gone:
        async def generate(self, payload: Any) -> AsyncIterator[list[Any]]:
            yield []

    app = serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 0})(Gone)
    handle = serve.run(app.bind(), name="sdbot-gone", route_prefix=None)
    assert list(handle.options(stream=True).generate.remote(None)) == [[]]
    serve.delete("sdbot-gone")
    gone = ServeEngine(ServeLink(handle, 0))
    with ThreadPoolExecutor(1) as pool:  # a hang fails here, not at pytest's timeout
        failed = pool.submit(gone.generate, [req(steps=1)]).exception(timeout=30)
    assert isinstance(failed, GenerationFailed), failed
    assert "lost contact with its image servers" in failed.message
    assert "Traceback" not in failed.message and gone.calls[-1].outcome == "generation"
    # The worker goes on: the next job, on the live app, runs.
    assert session_cluster.engine().generate([req(steps=1)])[0].images


def test_the_bot_plans_with_the_models_a_replica_keeps_loaded(
    session_cluster: RayCluster, settings: Settings
) -> None:
    # The replicas run with the default (1 model each); this bot's own setting says 4.
    bot = settings.model_copy(
        update={"serve_address": "auto", "serve_app": session_cluster.app, "max_loaded_models": 4}
    )
    joined = connect(bot)
    try:
        assert joined.max_loaded == 1 and not joined.started_ray
        assert {engine.max_loaded for engine in joined.engines} == {1}
    finally:
        joined.close()  # Ray was running already: left as it is
    assert session_cluster.engine().generate([req(steps=1)])[0].images
