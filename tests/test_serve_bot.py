"""The whole bot with SDBOT_BACKEND=serve, end to end: the real discord.py client against the local
Discord server, the executor's queue in front of the two replicas of the session's Ray
cluster, a real SQLite file. /imagine, /img2img, /inpaint, progress with previews, the Cancel
and Reroll buttons, as test_e2e_discord.py checks them on the local backend.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.harness import Harness, running_bot
from bot.engine import Engine
from bot.errors import SettingsError
from bot.jobs import GenerationRequest
from bot.localdiscord.server import LocalDiscord
from bot.runner import bot_resources
from bot.serve.client import ServeEngine
from bot.settings import Settings
from tests import images, ray_cluster, test_cli_run
from tests.ray_cluster import RayCluster
from tests.test_e2e_discord import buttons, download_image, has_image, result_of, rows

# The session's Ray cluster, as this module's fixture `session_cluster`.
session_cluster = ray_cluster.serve_cluster
# A local Discord server for `sdbot run`, as this module's fixture `discord_server`.
discord_server = test_cli_run.server


def serve_settings(settings: Settings, cluster: RayCluster, **update: Any) -> Settings:
    # Not "local": Ray already runs in this process, and the app is deployed, as `serve deploy`
    # leaves it on a real cluster; the bot takes a handle to it by name.
    return settings.model_copy(
        update={"backend": "serve", "serve_address": "auto", "serve_app": cluster.app, **update}
    )


@pytest.fixture
async def served(settings: Settings, session_cluster: RayCluster) -> AsyncIterator[Harness]:
    async with running_bot(serve_settings(settings, session_cluster)) as h:
        yield h


def serve_engines(h: Harness) -> list[ServeEngine]:
    executor: Any = h.bot.services.backend
    engines = [worker.engine for worker in executor.workers]
    assert all(isinstance(e, ServeEngine) for e in engines)
    return engines


async def test_imagine_reroll_progress_and_cancel_through_serve(
    served: Harness, session_cluster: RayCluster, engine: Engine
) -> None:
    c = served.control
    # One worker per replica slot.
    assert len(serve_engines(served)) == session_cluster.replicas

    sent = await c.slash(
        "imagine", {"prompt": "a red fox in snow", "steps": 4, "size": "96x64", "seed": 1234}
    )
    assert sent["interaction"]["callback_type"] == 5
    first = await result_of(c, sent["interaction"]["id"])
    image = await download_image(c, first)
    local = engine.generate(
        [
            GenerationRequest(
                prompt="a red fox in snow", model="builtin:tiny", width=96, height=64, steps=4,
                seed=1234,
            )
        ]
    )[0].images[0]  # fmt: skip
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(local.convert("RGB")))

    reroll = await c.click(first["id"], buttons(first)["Reroll"])
    again = await result_of(c, reroll["interaction"]["id"])
    assert "a red fox in snow" in again["content"] and "`1234`" not in again["content"]

    # Progress, then the Cancel button stops the replica. (Previews over Serve are checked in
    # test_serve.py; when the front shows them is its own policy.)
    sent = await c.slash("imagine", {"prompt": "slow", "steps": 150, "size": "256x256"})
    original = sent["interaction"]["original_message_id"]
    progress = await c.wait_for_message(
        lambda m: m["id"] == original and "step" in m["content"], timeout=60
    )
    assert re.search(r"step \d+/150", progress["content"])
    click = await c.click(original, buttons(progress)["Cancel"])
    assert click["interaction"]["callback_type"] == 7
    ended = await c.wait_for_message(lambda m: m["id"] == original and "❌" in m["content"])
    assert "Cancelled" in ended["content"] and not has_image(ended)
    assert [(r["command"], r["status"]) for r in rows(served)] == [
        ("imagine", "finished"),
        ("reroll", "finished"),
        ("imagine", "cancelled"),
    ]
    # The replica stopped long before its 150 steps.
    cancelled = [
        call for e in serve_engines(served) for call in e.calls if call.outcome == "cancelled"
    ]
    assert len(cancelled) == 1
    record = await asyncio.to_thread(lambda: _finished_run(session_cluster, cancelled[0].tags[0]))
    assert record.cancelled and record.step < 150


def _finished_run(cluster: RayCluster, tag: str) -> Any:
    for _ in range(100):
        record = cluster.runs().get(tag)
        if record is not None and record.done:
            return record
    raise AssertionError(f"no finished run {tag}")


async def test_img2img_and_inpaint_through_serve(served: Harness) -> None:
    c = served.control
    photo = await c.upload(images.photo((192, 128)), "photo.png")
    sent = await c.slash("img2img", {"image": photo["id"], "prompt": "make it night", "steps": 2})
    result = await result_of(c, sent["interaction"]["id"])
    assert (await download_image(c, result)).size == (96, 64)

    holed = await c.upload(images.with_hole(), "hole.png")
    sent = await c.slash("inpaint", {"image": holed["id"], "prompt": "a window", "steps": 2})
    inpainted = await result_of(c, sent["interaction"]["id"])
    png = await c.download(inpainted["attachments"][0])
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert [(r["mode"], r["status"]) for r in rows(served)] == [
        ("img2img", "finished"),
        ("inpaint", "finished"),
    ]


async def test_an_app_that_is_not_deployed_stops_the_start_with_one_clear_line(
    settings: Settings, session_cluster: RayCluster
) -> None:
    missing = serve_settings(settings, session_cluster, serve_app="no-such-app")
    with pytest.raises(SettingsError, match="no Serve app named 'no-such-app'") as caught:
        async with bot_resources(missing, preload=False):
            pass
    assert "\n" not in caught.value.message


async def test_a_cluster_nothing_listens_on_is_one_line_and_exit_2(
    tmp_path: Path, discord_server: LocalDiscord
) -> None:
    address = f"127.0.0.1:{test_cli_run.free_port()}"
    code, err = await test_cli_run.sdbot(
        tmp_path, ["run"], DISCORD_TOKEN=discord_server.bot_token,
        DISCORD_API_BASE=discord_server.base_url, SDBOT_LOG_LEVEL="WARNING",
        SDBOT_BACKEND="serve", SDBOT_SERVE_ADDRESS=address,
    )  # fmt: skip
    assert code == 2
    assert len(err) == 1 and err[0].startswith(
        f"sdbot: cannot reach the Ray cluster at SDBOT_SERVE_ADDRESS={address} ("
    ), err
    assert "ray start --head" in err[0]
