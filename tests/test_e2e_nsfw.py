"""The server's NSFW policy, end to end: the real bot on the local Discord server, with an engine
whose safety checker flags every image it makes, and an admin choosing allow / spoiler / block
with `/config set` as in Discord. In a channel marked NSFW the policy is lifted, unless the
admin turns `nsfw_channels_allow` off."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench.harness import Harness, running_bot
from bot.engine import Engine
from bot.localdiscord.client import ControlClient
from bot.localdiscord.server import LocalDiscord
from bot.settings import Settings
from tests.test_api_e2e import Api, api_settings, decoded, running_api

BLOCKED = "🔞 The image was flagged as NSFW and this server blocks those."


def flag_everything(images: list[Image.Image]) -> list[bool]:
    assert all(image.size == (64, 64) for image in images)  # the decoded images themselves
    return [True] * len(images)


@pytest.fixture(scope="module")
def engine(model_cache: Path) -> Engine:
    """Replaces conftest's engine here: the tiny model, every image it makes flagged."""
    return Engine(
        device="cpu", dtype="float32", cache_dir=model_cache, safety_checker=flag_everything
    )


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """conftest's settings with a preview every step, so that a job of some steps posts one."""
    return settings.model_copy(update={"preview_every": 1})


@pytest.fixture
async def harness(settings: Settings, engine: Engine) -> AsyncIterator[Harness]:
    """The bot on a server whose second channel is marked NSFW before the bot connects: the
    bot learns a channel's flag from the guild's channels in GUILD_CREATE, as from Discord."""
    server = LocalDiscord()
    await server.start()
    try:
        second = list(server.world.channels.values())[1]
        second["nsfw"] = True
        async with running_bot(settings, engine=engine, server=server) as h:
            yield h
    finally:
        await server.close()


def channels(h: Harness) -> tuple[int, int]:
    """(an ordinary channel, the NSFW one)."""
    general, nsfw = (int(cid) for cid in h.server.world.channels)
    assert not h.server.world.channels[general]["nsfw"] and h.server.world.channels[nsfw]["nsfw"]
    return general, nsfw


async def admin_sets(c: ControlClient, key: str, value: str) -> None:
    admin = await c.admin_id()
    sent = await c.slash("config set", {"key": key, "value": value}, user_id=admin)
    reply = await c.wait_for_message(
        lambda m: m.get("interaction_metadata", {}).get("id") == sent["interaction"]["id"],
        viewer=admin,
    )
    assert f"`{key}` is now **{value}**" in reply["content"].lower(), reply["content"]


async def imagine(
    c: ControlClient, channel_id: int | None = None, *, steps: int = 1
) -> dict[str, Any]:
    """A member's /imagine, and the result message the bot posted for it."""
    member = await c.member_id()
    sent = await c.slash(
        "imagine", {"prompt": "a fox", "steps": steps}, user_id=member, channel_id=channel_id
    )
    result = await c.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == sent["interaction"]["id"]
            and "seed `" in m["content"]
        ),
        channel_id=channel_id,
        viewer=member,
    )
    assert not result["flags"] & 64  # posted for the channel to see, not ephemeral
    assert result["content"].startswith(f"<@{member}> **a fox**")
    return result


async def posted_image(c: ControlClient, message: dict[str, Any]) -> str:
    """The name of the message's one image file, after checking it is a whole PNG."""
    (attachment,) = message["attachments"]
    with Image.open(io.BytesIO(await c.download(attachment))) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
        assert "a fox" in image.info["parameters"]
    return str(attachment["filename"])


def labels(message: dict[str, Any]) -> set[str]:
    return {
        str(button.get("label"))
        for row in message.get("components") or []
        for button in row.get("components") or []
    }


def preview_uploads(h: Harness) -> set[int]:
    """Every live preview the bot ever uploaded (the server keeps replaced attachments)."""
    return {a.id for a in h.server.world.attachments.values() if a.filename == "preview.png"}


async def test_block_posts_no_preview_and_no_buttons_for_a_missing_image(
    harness: Harness,
) -> None:
    c = harness.control
    steps = 150  # long enough for at least one preview edit (they are a second apart)
    await admin_sets(c, "nsfw_policy", "allow")
    await imagine(c, steps=steps)
    shown = preview_uploads(harness)
    assert shown  # previews are posted where flagged images are not blocked

    await admin_sets(c, "nsfw_policy", "block")
    blocked = await imagine(c, steps=steps)
    assert BLOCKED in blocked["content"] and blocked["attachments"] == []
    # The checker only sees finished images, so under block no preview goes out at all.
    assert preview_uploads(harness) == shown
    assert labels(blocked) == {"Reroll", "Delete"}  # nothing to vary or upscale


async def test_flagged_images_follow_the_policy_the_admin_sets(harness: Harness) -> None:
    c = harness.control

    # The default policy: the image behind a spoiler (discord.py names the file SPOILER_...).
    spoilered = await imagine(c)
    assert (await posted_image(c, spoilered)).startswith("SPOILER_sdbot_")
    assert BLOCKED not in spoilered["content"]

    await admin_sets(c, "nsfw_policy", "allow")
    plain = await imagine(c)
    assert (await posted_image(c, plain)).startswith("sdbot_")
    assert BLOCKED not in plain["content"]

    await admin_sets(c, "nsfw_policy", "block")
    blocked = await imagine(c)
    assert blocked["attachments"] == []
    assert BLOCKED in blocked["content"]  # the member learns why there is no image
    # Nor is the image in any other message of that job (progress previews are not it).
    job = blocked["interaction_metadata"]["id"]
    files = [
        a["filename"]
        for m in await c.messages()
        if m.get("interaction_metadata", {}).get("id") == job
        for a in m["attachments"]
    ]
    assert not [name for name in files if "sdbot_" in name], files

    await admin_sets(c, "nsfw_policy", "spoiler")
    assert (await posted_image(c, await imagine(c))).startswith("SPOILER_sdbot_")


async def test_an_nsfw_channel_lifts_the_policy_unless_the_admin_turns_that_off(
    harness: Harness,
) -> None:
    c = harness.control
    general, nsfw = channels(harness)
    await admin_sets(c, "nsfw_policy", "block")

    assert BLOCKED in (await imagine(c, general))["content"]
    lifted = await imagine(c, nsfw)
    assert (await posted_image(c, lifted)).startswith("sdbot_")  # plain: not even a spoiler
    assert BLOCKED not in lifted["content"]

    await admin_sets(c, "nsfw_channels_allow", "false")
    kept = await imagine(c, nsfw)
    assert kept["attachments"] == [] and BLOCKED in kept["content"]


async def watch_previews(api: Api, key: str, *, until_image: bool) -> list[dict[str, Any]]:
    """/progress, polled while a long job of the key runs (until it shows a preview, or for
    some steps), then the job interrupted: every progress answer seen."""
    long = {"prompt": "a fox", "steps": 150, "width": 64, "height": 64}
    job = asyncio.create_task(api.call("POST", "txt2img", key, long))
    seen: list[dict[str, Any]] = []
    for _ in range(1000):
        status, now = await api.call("GET", "progress", key)
        assert status == 200
        seen.append(now)
        enough = now["current_image"] if until_image else now["state"]["sampling_step"] > 5
        if enough or job.done():
            break
        await asyncio.sleep(0.02)
    await api.call("POST", "interrupt", key)
    assert (await job)[0] == 200
    return seen


def is_black(png: bytes) -> bool:
    with Image.open(io.BytesIO(png)) as image:
        return image.convert("L").getextrema() == (0, 0)


async def test_the_api_follows_the_servers_nsfw_policy(settings: Settings, engine: Engine) -> None:
    async with running_api(api_settings(settings), engine) as api:
        c = api.control
        key = await api.new_key()
        await admin_sets(c, "nsfw_policy", "allow")
        status, out = await api.call("POST", "txt2img", key, {"prompt": "a fox", "steps": 1})
        assert status == 200 and json.loads(out["info"])["nsfw"] == [True]
        assert not is_black(decoded(out["images"])[0])
        # This engine's jobs do send previews where flagged images are allowed...
        assert any(s["current_image"] for s in await watch_previews(api, key, until_image=True))

        await admin_sets(c, "nsfw_policy", "block")
        two = {"prompt": "a fox", "steps": 1, "batch_size": 2}
        status, out = await api.call("POST", "txt2img", key, two)
        details = json.loads(out["info"])
        assert status == 200 and details["nsfw"] == [True, True]
        # Flagged images come back black, as A1111's filter makes them, still one per seed.
        pngs = decoded(out["images"])
        assert len(pngs) == len(details["all_seeds"]) == 2 and all(map(is_black, pngs))
        assert all(Image.open(io.BytesIO(p)).size == (64, 64) for p in pngs)
        # ...and none under block: previews are never checked.
        seen = await watch_previews(api, key, until_image=False)
        assert seen[-1]["state"]["sampling_step"] > 5
        assert all(s["current_image"] is None for s in seen)
