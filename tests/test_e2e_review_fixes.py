"""End to end, on the local Discord server: an unexpected error after the public defer leaves
no "thinking…" behind, and a V/U job reruns from its own cell of the grid, kept so that the
rerun still works once the grid's URL is gone."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from typing import Any

import pytest
from PIL import Image

from bench.harness import Harness
from bot.localdiscord.client import ControlClient
from tests import images
from tests.test_e2e_discord import buttons
from tests.test_e2e_security import png_with_parameters


async def answer(c: ControlClient, sent: dict[str, Any]) -> dict[str, Any]:
    """The interaction's result, or its ephemeral refusal (so a refusal fails the test fast)."""
    interaction_id = sent["interaction"]["id"]
    msg = await c.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == interaction_id
            and (bool(m["flags"] & 64) or ("seed `" in m["content"] and bool(m["attachments"])))
        ),
        viewer=await c.member_id(),
        timeout=90,
    )
    assert msg["attachments"], f"refused instead: {msg['content']}"
    return msg


async def pixels(c: ControlClient, msg: dict[str, Any]) -> bytes:
    return Image.open(io.BytesIO(await c.download(msg["attachments"][0]))).tobytes()


async def test_an_unexpected_error_after_the_defer_replaces_the_thinking_message(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = harness.control
    member = await c.member_id()

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    # img2img defers before it queues (it downloads first), so the error comes after the defer.
    monkeypatch.setattr(harness.bot.services.backend, "submit", broken)
    att = await c.upload(images.photo((64, 64)), "photo.png")
    sent = await c.slash("img2img", {"image": att["id"], "prompt": "night", "steps": 2})
    interaction_id = sent["interaction"]["id"]
    note = await c.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == interaction_id and bool(m["flags"] & 64)
        ),
        viewer=member,
    )
    assert f"Something went wrong on our side (ref `{interaction_id}`)" in note["content"]
    ours = [
        m
        for m in await c.messages(viewer=member)
        if m.get("interaction_metadata", {}).get("id") == interaction_id
    ]
    # One ephemeral note, and the public "thinking…" message is gone.
    assert [m["id"] for m in ours] == [note["id"]], ours


async def test_a_v_job_reruns_from_its_cell_even_after_the_grid_is_gone(harness: Harness) -> None:
    c = harness.control
    grid = await answer(c, await c.slash("imagine", {"prompt": "a fox", "steps": 2, "count": 2}))
    v2 = await answer(c, await c.click(grid["id"], buttons(grid)["V2"]))
    # Discord's signed URLs expire: the grid's is dead now, its message's attachment gone.
    for att in grid["attachments"]:
        harness.server.world.attachments.pop(int(att["id"]))

    # Edit prompt keeps the seed: the same prompt must give the very same pixels as V2 itself,
    # which it only does from the same cell (not the whole grid) and from the kept copy.
    click = await c.click(v2["id"], buttons(v2)["Edit prompt"])
    field = click["interaction"]["modal"]["components"][0]["components"][0]
    sent = await c.submit_modal(click["interaction"]["id"], {field["custom_id"]: "a fox"})
    same = await answer(c, sent)
    assert await pixels(c, same) == await pixels(c, v2)

    reroll = await answer(c, await c.click(v2["id"], buttons(v2)["Reroll"]))
    assert Image.open(io.BytesIO(await c.download(reroll["attachments"][0]))).size == (64, 64)


async def test_pnginfo_defers_before_it_downloads(harness: Harness) -> None:
    c = harness.control
    member = await c.member_id()
    att = await c.upload(png_with_parameters("a heron\nSteps: 2, Seed: 7"), "p.png", "image/png")
    sent = await c.slash("pnginfo", {"image": att["id"]})
    interaction_id = sent["interaction"]["id"]
    reply = await c.wait_for_message(
        lambda m: (
            m.get("interaction_metadata", {}).get("id") == interaction_id
            and "Parameters of" in m["content"]
        ),
        viewer=member,
    )
    assert reply["flags"] & 64 and "a heron" in reply["content"]
    assert (await c.interaction(interaction_id))["callback_type"] == 5  # deferred first


async def test_a_slow_image_opens_the_form_in_time_without_prefill(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The module the running bot loaded (discord.py's extension loader puts it in sys.modules).
    menus = sys.modules["cogs.context_menus"]
    c = harness.control
    heads: list[int | None] = []

    async def stalled(*_: Any, head: int | None = None, **__: Any) -> bytes:
        heads.append(head)
        await asyncio.sleep(30)
        return b""

    monkeypatch.setattr(menus, "download", stalled)
    att = await c.upload(png_with_parameters("a heron\nSteps: 2"), "p.png", "image/png")
    posted = await c.post_message("", [att])
    started = time.monotonic()
    opened = await c.context_menu("Edit with prompt", posted["id"])
    assert time.monotonic() - started < 3  # within Discord's time to answer
    modal = opened["interaction"]["modal"]
    assert modal, opened
    prompt = modal["components"][0]["components"][0]
    assert not prompt.get("value")  # not pre-filled: the image could not be read in time
    assert heads == [menus.PREFILL_BYTES]
