"""The review findings on the AUTOMATIC1111-compatible API (issue 14), each against the real bot
(tiny model, SQLite, the local Discord server) and a real HTTP client: sizes checked before any
picture is read, parallel requests within the daily quota, PNG info from a data URL, keys made
in a thread, keys revoked by admins and when their member leaves, and the playground's key.
The NSFW policy's share is in tests/test_e2e_nsfw.py (it needs an engine that flags images)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from bot.db import Database
from bot.engine import Engine
from bot.localdiscord.server import LocalDiscord
from bot.runner import _playground_api_demo
from bot.settings import Settings
from tests import images
from tests.test_api_e2e import Api, api_settings, running_api
from tests.test_e2e_admin import admin, reply_to, rows
from tests.test_e2e_inputs import answer

TINY_PNG = base64.b64encode(images.photo((64, 64))).decode()


async def test_the_size_asked_for_is_checked_before_any_picture_is_read(api: Api) -> None:
    key = await api.new_key()
    # Out of sdbot's bounds: refused as the body is read, naming the field.
    for field in ("width", "height"):
        body = {"prompt": "x", "init_images": [TINY_PNG], field: 40000}
        status, out = await api.call("POST", "img2img", key, body)
        assert status == 422 and f"{field} 40000 is out of range" in out["detail"], out

    # Past the server's maximum: refused on the size asked for, before the (broken) picture
    # is decoded; it used to be decoded and resized to that size first.
    await admin(api.control, "config set", {"key": "max_size", "value": "64"})
    bad = {"prompt": "x", "init_images": ["not base64 at all!"], "width": 128, "height": 128}
    status, out = await api.call("POST", "img2img", key, bad)
    assert status == 422 and "larger than this server allows" in out["detail"], out
    assert [r["reason"] for r in rows(api.harness)] == ["invalid", "invalid", "limit"]


async def test_discord_checks_steps_before_downloading_the_picture(api: Api) -> None:
    c = api.control
    await admin(c, "config set", {"key": "max_steps", "value": "1"})
    # An "image" that is not one: decoding it would fail, so the answer tells which came first.
    att = await c.upload(b"this is not a picture", "cat.png", "image/png")
    sent = await c.slash("img2img", {"image": att["id"], "prompt": "x", "steps": 2})
    reply = await answer(c, sent)
    assert "2 steps is more than this server allows (1)" in reply["content"], reply["content"]
    [row] = [r for r in rows(api.harness) if r["command"] == "img2img"]
    assert (row["status"], row["reason"]) == ("rejected", "limit")


async def test_parallel_requests_cannot_pass_the_daily_quota_together(api: Api) -> None:
    key = await api.new_key()
    await admin(api.control, "config set", {"key": "daily_quota", "value": "3"})
    body = {"prompt": "a fox", "steps": 1}
    answers = await asyncio.gather(*(api.call("POST", "txt2img", key, body) for _ in range(10)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 3 + [429] * 7, statuses
    done = [r for r in rows(api.harness) if r["status"] == "finished"]
    assert len(done) == 3


async def test_png_info_reads_a_data_url(api: Api) -> None:
    key = await api.new_key()
    status, out = await api.call("POST", "txt2img", key, {"prompt": "a blue owl", "steps": 1})
    assert status == 200
    for image in (out["images"][0], "data:image/png;base64," + out["images"][0]):
        status, info = await api.call("POST", "png-info", key, {"image": image})
        assert status == 200 and "a blue owl" in info["info"], info
        assert info["info"] == json.loads(out["info"])["infotexts"][0]


@contextlib.asynccontextmanager
async def bot_with_a_thread(settings: Settings, engine: Engine) -> AsyncIterator[tuple[Api, int]]:
    """The API on a server whose first channel has a thread, made before the bot connects."""
    server = LocalDiscord()
    await server.start()
    try:
        world = server.world
        general = world.default_channel_id
        thread_id = general + 7
        world.channels[thread_id] = {
            **world.channels[general],
            "id": str(thread_id),
            "type": 11,  # a public thread
            "name": "fox thread",
            "parent_id": str(general),
            "owner_id": str(world.admin.id),
            "message_count": 0,
            "member_count": 1,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": world.joined_at,
                "locked": False,
            },
        }
        async with running_api(api_settings(settings), engine, server=server) as api:
            yield api, thread_id
    finally:
        await server.close()


async def test_a_key_made_in_a_thread_acts_in_its_parent_channel(
    settings: Settings, engine: Engine
) -> None:
    async with bot_with_a_thread(settings, engine) as (api, thread_id):
        c = api.control
        member = await c.member_id()
        general = api.harness.server.world.default_channel_id
        await admin(c, "config channels add", {"channel": general})
        sent = await c.slash("apikey create", {}, user_id=member, channel_id=thread_id)
        reply = await c.wait_for_message(
            lambda m: m.get("interaction_metadata", {}).get("id") == sent["interaction"]["id"],
            channel_id=thread_id,
            viewer=member,
        )
        content = reply["content"]
        key = content.split("```\n")[1].split("\n")[0]
        status, out = await api.call("POST", "txt2img", key, {"prompt": "a fox", "steps": 1})
        assert status == 200, out
        [row] = rows(api.harness, "api_keys")
        assert (row["channel_id"], row["parent_channel_id"]) == (thread_id, general)


async def test_admins_revoke_a_members_keys_and_members_cannot(api: Api) -> None:
    c = api.control
    member, admin_id = await c.member_id(), await c.admin_id()
    first, second = await api.new_key(name="one"), await api.new_key(name="two")
    admins_key = await api.new_key(admin_id)

    sent = await c.slash("apikey revoke", {"member": admin_id}, user_id=member)
    reply = await reply_to(c, sent, member)
    assert reply["flags"] & 64 and "Manage Server" in reply["content"]
    assert (await api.call("GET", "options", admins_key))[0] == 200

    sent = await c.slash("apikey revoke", {"member": member, "key": "one"}, user_id=admin_id)
    reply = await reply_to(c, sent, admin_id)
    assert reply["flags"] & 64 and "Revoked 1 of" in reply["content"], reply["content"]
    assert (await api.call("GET", "options", first))[0] == 401
    assert (await api.call("GET", "options", second))[0] == 200

    sent = await c.slash("apikey revoke", {"member": member}, user_id=admin_id)
    reply = await reply_to(c, sent, admin_id)
    assert "Revoked 1 of" in reply["content"] and "two" in reply["content"]
    assert (await api.call("GET", "options", second))[0] == 401


async def test_a_members_keys_are_revoked_when_they_leave(api: Api) -> None:
    c = api.control
    world = api.harness.server.world
    leaver = await c.add_user("leaver")
    key, stays = await api.new_key(leaver), await api.new_key()
    assert (await api.call("GET", "options", key))[0] == 200
    user = world.users[leaver]
    await api.harness.server.dispatch(
        "GUILD_MEMBER_REMOVE",
        {"guild_id": str(world.guild_id), "user": {"id": str(user.id), "username": user.username,
                                                   "discriminator": "0", "avatar": None}},
    )  # fmt: skip
    for _ in range(100):
        if (await api.call("GET", "options", key))[0] == 401:
            break
        await asyncio.sleep(0.05)
    assert (await api.call("GET", "options", key))[0] == 401
    assert (await api.call("GET", "options", stays))[0] == 200  # only the leaver's


async def test_the_playground_replaces_its_key_instead_of_adding_one(tmp_path: Path) -> None:
    async with await Database.open(tmp_path / "p.db") as db:
        server = LocalDiscord()
        bot = cast(Any, SimpleNamespace(services=SimpleNamespace(db=db)))
        world = server.world
        for _ in range(3):
            said = await _playground_api_demo(bot, server, "127.0.0.1:7860")
        live = await db.api_keys_of(world.guild_id, world.member.id)
        assert [k.name for k in live] == ["playground"]
        assert live[0].prefix in said
    with sqlite3.connect(tmp_path / "p.db") as conn:
        made = conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]
    assert made == 3  # each start made a key, and revoked the last


@pytest.fixture
async def api(settings: Settings, engine: Engine) -> AsyncIterator[Api]:
    async with running_api(api_settings(settings), engine) as running:
        yield running


async def test_parallel_discord_commands_cannot_pass_the_daily_quota_together(api: Api) -> None:
    c = api.control
    member = await c.member_id()
    await admin(c, "config set", {"key": "daily_quota", "value": "2"})
    await asyncio.gather(
        *(c.slash("imagine", {"prompt": "a fox", "steps": 1}, user_id=member) for _ in range(6))
    )
    final = {"finished", "rejected", "failed", "cancelled"}
    for _ in range(600):
        jobs = [r for r in rows(api.harness) if r["command"] == "imagine"]
        if len(jobs) == 6 and all(r["status"] in final for r in jobs):
            break
        await asyncio.sleep(0.05)
    outcomes = sorted((r["status"], r["reason"]) for r in jobs)
    assert outcomes == [("finished", None)] * 2 + [("rejected", "quota")] * 4, outcomes
