"""API clients and Discord members on one fair queue: 40 API requests and 40 slash commands
from 8 members at once, every job row final, none lost, and a light Discord member who asks
last still waits only about one job per busy member, not behind the whole line."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bot.db import FINAL_STATUSES
from bot.engine import Engine
from bot.settings import Settings
from tests.test_api_e2e import api_settings, running_api
from tests.test_e2e_admin import rows

API_MEMBERS = 4
API_REQUESTS = 10  # each: 40 in all
DISCORD_HEAVY = (13, 13, 13)  # 39 slash commands, and the light member's one
JOB = {"prompt": "a small test", "steps": 1}


async def test_forty_api_requests_and_forty_commands_share_the_queue_fairly(
    settings: Settings, engine: Engine
) -> None:
    wide = api_settings(settings, user_queue_limit=15, queue_limit=200, preview_every=0)
    async with running_api(wide, engine) as api:
        c = api.control
        api_users = [await c.add_user(f"script{i}") for i in range(API_MEMBERS)]
        heavy = [await c.add_user(f"heavy{i}") for i in range(len(DISCORD_HEAVY))]
        light = await c.add_user("light")
        keys = [await api.new_key(user) for user in api_users]

        requests = [
            asyncio.create_task(
                api.call("POST", "txt2img", key, {**JOB, "width": 64, "height": 64})
            )
            for key in keys
            for _ in range(API_REQUESTS)
        ]
        sends: list[Any] = [
            c.slash("imagine", {**JOB, "size": "64x64"}, user_id=user)
            for user, n in zip(heavy, DISCORD_HEAVY, strict=True)
            for _ in range(n)
        ]
        await asyncio.gather(*sends)
        backend = api.harness.bot.services.backend
        deadline = time.monotonic() + 30
        while backend.queue_length < 40 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        waiting = backend.queue_length
        assert waiting >= 40, "the line must be long when the light member asks"
        await c.slash("imagine", {**JOB, "size": "64x64"}, user_id=light)

        answers = await asyncio.wait_for(asyncio.gather(*requests), timeout=300)
        assert all(status == 200 and len(body["images"]) == 1 for status, body in answers)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = rows(api.harness)
            if len(done) == 80 and all(r["status"] in FINAL_STATUSES for r in done):
                break
            await asyncio.sleep(0.2)
        done = rows(api.harness)
        assert len(done) == 80 and {r["status"] for r in done} == {"finished"}
        assert sum(r["command"] == "api:txt2img" for r in done) == 40
        assert sum(r["command"] == "imagine" for r in done) == 40

        # Every Discord command got its image in the channel.
        pngs = [
            m for m in await c.messages()
            if any(a["content_type"] == "image/png" for a in m["attachments"])
        ]  # fmt: skip
        assert len(pngs) == 40

        # Round-robin: the light member waits about one job per busy member (7), batching
        # (up to 4 a batch) aside, not behind the dozens already waiting.
        [mine] = [r for r in done if r["user_id"] == light]
        ahead = [
            r for r in done
            if r["id"] != mine["id"] and mine["queued_at"] < r["started_at"] < mine["started_at"]
        ]  # fmt: skip
        assert len(ahead) <= 2 * (API_MEMBERS + len(DISCORD_HEAVY)), (len(ahead), waiting)
