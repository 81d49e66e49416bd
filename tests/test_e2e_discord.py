"""The member experience end to end: every command, context menu and button, through the local
Discord server with the real discord.py client, the tiny model and a real SQLite file."""

from __future__ import annotations

import asyncio
import io
import re
import sqlite3
from typing import Any

import pytest
from PIL import Image

from bench.harness import Harness, running_bot
from bot import imaging
from bot.backend import JobOrigin
from bot.db import Database
from bot.engine import Engine
from bot.localdiscord.client import ControlClient
from bot.localdiscord.server import LocalDiscord
from bot.settings import Settings
from tests import images


def rows(h: Harness) -> list[dict[str, Any]]:
    with sqlite3.connect(h.settings.db_path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]


def has_image(msg: dict[str, Any]) -> bool:
    return any((a.get("content_type") or "").startswith("image/") for a in msg["attachments"])


def buttons(msg: dict[str, Any]) -> dict[str, str]:
    """label -> custom_id of a message's buttons."""
    return {
        c.get("label") or "": c["custom_id"]
        for row in msg.get("components") or []
        for c in row["components"]
        if c.get("custom_id")
    }


async def result_of(c: ControlClient, interaction_id: str, timeout: float = 90) -> dict[str, Any]:
    return await c.wait_for_message(
        lambda m: (
            has_image(m)
            and "seed `" in m["content"]
            and m.get("interaction_metadata", {}).get("id") == interaction_id
        ),
        timeout=timeout,
    )


async def ephemeral_reply(c: ControlClient, interaction_id: str, user_id: int) -> dict[str, Any]:
    return await c.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == interaction_id and bool(m["flags"] & 64)
        ),
        viewer=user_id,
        timeout=30,
    )


async def imagine(c: ControlClient, **options: Any) -> dict[str, Any]:
    sent = await c.slash("imagine", {"prompt": "a red fox", "steps": 2, **options})
    return await result_of(c, sent["interaction"]["id"])


async def download_image(c: ControlClient, msg: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(await c.download(msg["attachments"][0])))


# -- /imagine and its result message ------------------------------------------------------------


async def test_count_gives_a_grid_and_buttons_per_image(harness: Harness) -> None:
    c = harness.control
    msg = await imagine(c, count=4, seed=10, size="64x64")
    grid = await download_image(c, msg)
    assert grid.size == (128, 128)
    assert "`10`–`13`" in msg["content"]
    assert {"V1", "V2", "V3", "V4", "U1", "U4", "Reroll", "Edit prompt", "Delete"} <= set(
        buttons(msg)
    )
    for _ in range(100):  # the row names its result once the post returns
        if (row := rows(harness)[0])["message_id"] == int(msg["id"]):
            break
        await asyncio.sleep(0.02)
    assert row["count"] == 4 and row["status"] == "finished" and row["message_id"] == int(msg["id"])


async def test_reroll_variation_and_upscale_buttons(harness: Harness) -> None:
    c = harness.control
    first = await imagine(c, seed=5, size="64x64")
    ids = buttons(first)

    reroll = await c.click(first["id"], ids["Reroll"])
    again = await result_of(c, reroll["interaction"]["id"])
    assert "a red fox" in again["content"] and "`5`" not in again["content"]

    vary = await c.click(first["id"], ids["V1"])
    varied = await result_of(c, vary["interaction"]["id"])
    assert "img2img 0.6" in varied["content"]

    up = await c.click(first["id"], ids["U1"])
    upscaled = await result_of(c, up["interaction"]["id"])
    assert (await download_image(c, upscaled)).size == (128, 128)

    assert [(r["command"], r["mode"], r["status"]) for r in rows(harness)] == [
        ("imagine", "txt2img", "finished"),
        ("reroll", "txt2img", "finished"),
        ("vary", "img2img", "finished"),
        ("upscale", "img2img", "finished"),
    ]


async def test_edit_prompt_opens_a_prefilled_modal_and_runs_the_new_prompt(
    harness: Harness,
) -> None:
    c = harness.control
    first = await imagine(c, seed=3)
    click = await c.click(first["id"], buttons(first)["Edit prompt"])
    modal = click["interaction"]["modal"]
    assert modal is not None and modal["title"] == "Edit the prompt"
    prefilled = modal["components"][0]["components"][0]
    assert prefilled["value"] == "a red fox"
    sent = await c.submit_modal(click["interaction"]["id"], {prefilled["custom_id"]: "a blue fox"})
    edited = await result_of(c, sent["interaction"]["id"])
    assert "a blue fox" in edited["content"] and "`3`" in edited["content"]


async def test_only_the_owner_or_a_moderator_may_delete(harness: Harness) -> None:
    c = harness.control
    first = await imagine(c)
    other = await c.add_user("someone")
    refused = await c.click(first["id"], buttons(first)["Delete"], user_id=other)
    reply = await ephemeral_reply(c, refused["interaction"]["id"], other)
    assert "Only the person who asked" in reply["content"]
    assert first["id"] in [m["id"] for m in await c.messages()]
    await c.click(first["id"], buttons(first)["Delete"])  # the owner
    for _ in range(100):
        if first["id"] not in [m["id"] for m in await c.messages()]:
            break
        await asyncio.sleep(0.05)
    assert first["id"] not in [m["id"] for m in await c.messages()]


async def test_buttons_work_after_the_bot_restarts(settings: Settings, engine: Engine) -> None:
    server = LocalDiscord()
    await server.start()
    try:
        async with running_bot(settings, engine=engine, server=server) as before:
            first = await imagine(before.control, seed=77)
        # A new process would have nothing in memory: the button must rebuild from the job row.
        async with running_bot(settings, engine=engine, server=server) as after:
            click = await after.control.click(first["id"], buttons(first)["Reroll"])
            again = await result_of(after.control, click["interaction"]["id"])
            assert "a red fox" in again["content"]
            assert [r["command"] for r in rows(after)] == ["imagine", "reroll"]
    finally:
        await server.close()


async def stored_job(h: Harness, status: str, **params: Any) -> int:
    """A job row of the member's in this server, as an older bot version left it."""
    c = h.control
    origin = JobOrigin(await c.member_id(), "member", int((await c.world())["guild_id"]),
                       await c.default_channel(), "imagine")  # fmt: skip
    values = {"prompt": "again", "model": "tiny", "width": 64, "height": 64, "steps": 1,
              "guidance": 7.0, "seed": 1, "mode": "txt2img", "scheduler": "default",
              "count": 1, "loras": [], **params}  # fmt: skip
    db = h.bot.services.db
    if status == "rejected":
        return await db.record_rejected(origin, values, "cooldown", "Slow down a little.")
    job_id = await db.create_job(origin, values)
    await db.mark_done(job_id, status)
    return job_id


async def click_reroll(c: ControlClient, job_id: int) -> str:
    """Reroll on a result message that carries the job's button; the ephemeral answer."""
    custom_id = f"sdbot:reroll:{job_id}"
    planted = await c.post_message("old result", buttons=[custom_id], as_bot=True)
    click = await c.click(planted["id"], custom_id)
    return str(
        (await ephemeral_reply(c, click["interaction"]["id"], await c.member_id()))["content"]
    )


async def test_a_refused_request_is_never_run_again_by_a_button(harness: Harness) -> None:
    refused = await stored_job(harness, "rejected")
    assert "was refused" in await click_reroll(harness.control, refused)
    await asyncio.sleep(0.3)
    assert [r["status"] for r in rows(harness)] == ["rejected"]


async def test_a_rerun_rechecks_that_the_model_is_still_offered(harness: Harness) -> None:
    retired = await stored_job(harness, "finished", model="owner/retired-model")
    assert "no longer available" in await click_reroll(harness.control, retired)
    await asyncio.sleep(0.3)
    assert [(r["status"], r["reason"]) for r in rows(harness)[1:]] == [("rejected", "invalid")]


# -- progress, cancel ---------------------------------------------------------------------------


async def test_progress_then_cancel_a_running_job_with_its_button(harness: Harness) -> None:
    c = harness.control
    member = await c.member_id()
    sent = await c.slash("imagine", {"prompt": "slow", "steps": 150, "size": "256x256"})
    original = sent["interaction"]["original_message_id"]
    msg = await c.wait_for_message(
        lambda m: m["id"] == original and "step" in m["content"] and has_image(m), timeout=60
    )
    assert re.search(r"step \d+/150", msg["content"])
    assert rows(harness)[0]["message_id"] == int(original)  # for a restart to find it
    # A live preview is no picture to work from: the menus refuse it, and open no modal.
    for menu in ("Show parameters", "Edit with prompt", "Vary image"):
        opened = await c.context_menu(menu, original)
        refusal = await ephemeral_reply(c, opened["interaction"]["id"], member)
        assert "not a finished result" in refusal["content"] and not opened["interaction"]["modal"]
    click = await c.click(original, buttons(msg)["Cancel"])
    assert click["interaction"]["callback_type"] == 7  # answered on the progress message
    ended = await c.wait_for_message(lambda m: m["id"] == original and "❌" in m["content"])
    assert "Cancelled" in ended["content"] and not ended["components"] and not has_image(ended)
    assert [r["status"] for r in rows(harness)] == ["cancelled"]
    # No private "Cancelling…" note is left behind under it.
    assert not [m for m in await c.messages(viewer=member) if "Cancelling" in m["content"]]


async def test_a_restart_closes_the_progress_message_of_an_interrupted_job(
    settings: Settings, engine: Engine
) -> None:
    server = LocalDiscord()
    await server.start()
    world, channel = server.world, server.world.default_channel_id
    # What a crash leaves behind: a progress message at "Starting…", its job row running.
    text = "**a fox** — txt2img · job #1\n🎨 Starting…"
    progress = world.create_message(channel, world.bot, {"content": text}, [], webhook=True)
    async with await Database.open(settings.db_path) as db:
        origin = JobOrigin(world.member.id, "member", world.guild_id, channel, "imagine")
        job = await db.create_job(origin, {"prompt": "a fox", "model": "tiny", "seed": 1})
        await db.mark_running(job)
        await db.set_message_id(job, int(progress["id"]))
    try:
        async with running_bot(settings, engine=engine, server=server) as h:
            await h.control.wait_for_message(lambda m: f"before job #{job}" in m["content"])
            closed = await h.control.wait_for_message(
                lambda m: m["id"] == progress["id"] and "interrupted" in m["content"]
            )
            assert "Starting" not in closed["content"] and not closed["components"]
    finally:
        await server.close()


async def test_cancel_a_queued_job_with_the_command(harness: Harness) -> None:
    c = harness.control
    await c.slash("imagine", {"prompt": "blocker", "steps": 100, "size": "256x256"})
    waiting = await c.slash("imagine", {"prompt": "waiting", "steps": 1})
    await asyncio.sleep(0.2)
    queue = await c.slash("queue")
    member = await c.member_id()
    listing = await ephemeral_reply(c, queue["interaction"]["id"], member)
    assert "#1 in line" in listing["content"] and "waiting" in listing["content"]
    cancel = await c.slash("cancel")
    reply = await ephemeral_reply(c, cancel["interaction"]["id"], member)
    assert "Cancelling job #2" in reply["content"]
    assert {r["prompt"]: r["status"] for r in rows(harness)}["waiting"] == "cancelled"
    assert waiting["interaction"]["callback_type"] == 5


# -- img2img / inpaint --------------------------------------------------------------------------


async def test_img2img_keeps_the_aspect_of_the_attachment(harness: Harness) -> None:
    c = harness.control
    att = await c.upload(images.photo((192, 128)), "photo.png")
    sent = await c.slash("img2img", {"image": att["id"], "prompt": "make it night", "steps": 2})
    result = await result_of(c, sent["interaction"]["id"])
    assert (await download_image(c, result)).size == (96, 64)
    assert rows(harness)[0]["mode"] == "img2img"


async def test_inpaint_with_transparency_and_with_a_mask(harness: Harness) -> None:
    c = harness.control
    holed = await c.upload(images.with_hole(), "hole.png")
    sent = await c.slash("inpaint", {"image": holed["id"], "prompt": "a window", "steps": 2})
    await result_of(c, sent["interaction"]["id"])
    photo = await c.upload(images.photo((64, 64)), "p.png")
    mask = await c.upload(images.mask((64, 64)), "m.png")
    sent = await c.slash(
        "inpaint", {"image": photo["id"], "mask": mask["id"], "prompt": "sky", "steps": 2}
    )
    await result_of(c, sent["interaction"]["id"])
    assert [(r["mode"], r["status"]) for r in rows(harness)] == [("inpaint", "finished")] * 2


@pytest.mark.parametrize(
    ("command", "payload", "expected"),
    [
        ("img2img", (b"just text", "notes.txt", "text/plain"), "must be an image"),
        ("img2img", (b"\x89PNG\r\n\x1a\n\x00\x00", "broken.png", "image/png"), "image"),
        ("inpaint", (images.photo((64, 64)), "opaque.png", "image/png"), "transparent"),
    ],
)
async def test_bad_attachments_are_refused_ephemerally(
    harness: Harness, command: str, payload: tuple[bytes, str, str], expected: str
) -> None:
    c = harness.control
    att = await c.upload(payload[0], payload[1], payload[2])
    sent = await c.slash(command, {"image": att["id"], "prompt": "x", "steps": 1})
    reply = await ephemeral_reply(c, sent["interaction"]["id"], await c.member_id())
    assert expected in reply["content"].lower() or expected in reply["content"]
    [row] = rows(harness)
    assert row["status"] == "rejected" and row["error"]
    await imagine(c)  # the bot keeps serving


# -- context menus ------------------------------------------------------------------------------


async def test_context_menus_on_any_image(harness: Harness) -> None:
    c = harness.control
    member = await c.member_id()
    att = await c.upload(images.photo((64, 64)), "cat.png")
    posted = await c.post_message("my cat", [att])

    vary = await c.context_menu("Vary image", posted["id"])
    varied = await result_of(c, vary["interaction"]["id"])
    assert "my cat" in varied["content"]

    info = await c.context_menu("Show parameters", varied["id"])
    shown = await ephemeral_reply(c, info["interaction"]["id"], member)
    assert "**Prompt:** my cat" in shown["content"] and "Seed: " in shown["content"]

    edit = await c.context_menu("Edit with prompt", posted["id"])
    modal = edit["interaction"]["modal"]
    fields = [row["components"][0]["custom_id"] for row in modal["components"]]
    sent = await c.submit_modal(edit["interaction"]["id"], {fields[0]: "a tiger", fields[1]: "0.5"})
    edited = await result_of(c, sent["interaction"]["id"])
    assert "a tiger" in edited["content"] and "img2img 0.5" in edited["content"]

    holed = await c.upload(images.with_hole(), "hole.png")
    posted_hole = await c.post_message("", [holed])
    inpaint = await c.context_menu("Inpaint transparent areas", posted_hole["id"])
    modal = inpaint["interaction"]["modal"]
    fields = [row["components"][0]["custom_id"] for row in modal["components"]]
    sent = await c.submit_modal(inpaint["interaction"]["id"], {fields[0]: "a door"})
    await result_of(c, sent["interaction"]["id"])
    assert [r["mode"] for r in rows(harness)] == ["img2img", "img2img", "inpaint"]


# -- info commands ------------------------------------------------------------------------------


async def test_history_models_pnginfo_and_autocomplete(harness: Harness) -> None:
    c = harness.control
    member = await c.member_id()
    result = await imagine(c, seed=99)

    refused = await stored_job(harness, "rejected", seed=None)
    hist = await c.slash("history")
    text = (await ephemeral_reply(c, hist["interaction"]["id"], member))["content"]
    assert "seed 99" in text and "[result](https://discord.com/channels/" in text
    # A refused job never had a seed: its line says nothing of one.
    assert f"#{refused} imagine “again” — Slow down" in text and "None" not in text

    models = await c.slash("models")
    reply = await ephemeral_reply(c, models["interaction"]["id"], member)
    assert "● **tiny**" in reply["content"] and "Stable Diffusion" in reply["content"]

    png = await c.download(result["attachments"][0])
    att = await c.upload(png, "result.png", "image/png")
    info = await c.slash("pnginfo", {"image": att["id"]})
    # /pnginfo defers (an empty "thinking" note) before it downloads: wait for the answer.
    reply = await c.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == info["interaction"]["id"]
            and "Parameters of" in m["content"]
        ),
        viewer=member,
    )
    assert "a red fox" in reply["content"] and "Seed: 99" in reply["content"]
    assert imaging.read_parameters(png) is not None

    models_suggested = [
        ch["value"] for ch in await c.autocomplete("imagine", "model", {"prompt": "x"})
    ]
    assert "tiny" in models_suggested
    schedulers = [
        ch["value"] for ch in await c.autocomplete("imagine", "scheduler", {"scheduler": "eul"})
    ]
    assert "Euler" in schedulers and "Euler a" in schedulers
    sizes = [ch["value"] for ch in await c.autocomplete("imagine", "size", {})]
    assert sizes[0] == "64x64"
