"""The few-step and SDXL models through the bot: /imagine, /img2img and /inpaint with the tiny
turbo and tiny SDXL models, on the local Discord server with the real discord.py client."""

from __future__ import annotations

import json

import pytest

from bench.harness import Harness
from bot.imaging import parse_parameters, read_parameters
from tests import images
from tests.test_e2e_admin import admin
from tests.test_e2e_discord import download_image, result_of, rows


async def parameters(harness: Harness, msg: dict[str, object]) -> dict[str, str]:
    attachments = msg["attachments"]
    assert isinstance(attachments, list)
    png = await harness.control.download(attachments[0])
    return parse_parameters(read_parameters(png) or "")


async def run(harness: Harness, mode: str, options: dict[str, object]) -> dict[str, str]:
    """Run `mode` with `options` (plus its pictures) and return the result's PNG parameters."""
    c = harness.control
    options = dict(options)
    if mode == "img2img":
        options["image"] = (await c.upload(images.photo((96, 64)), "photo.png"))["id"]
    elif mode == "inpaint":
        options["image"] = (await c.upload(images.photo((64, 64)), "photo.png"))["id"]
        options["mask"] = (await c.upload(images.mask((64, 64)), "mask.png"))["id"]
    command = "imagine" if mode == "txt2img" else mode
    sent = await c.slash(command, {"prompt": "a red fox in snow", **options})
    msg = await result_of(c, sent["interaction"]["id"])
    size = (await download_image(c, msg)).size
    assert size == ((96, 64) if mode == "img2img" else (64, 64))
    return await parameters(harness, msg)


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
async def test_tiny_xl_in_every_mode(harness: Harness, mode: str) -> None:
    found = await run(harness, mode, {"model": "tiny-xl", "steps": 3, "seed": 7})
    assert (found["Model"], found["Steps"], found["Seed"]) == ("tiny-xl", "3", "7")
    [row] = rows(harness)
    assert (row["status"], row["mode"]) == ("finished", mode)


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
async def test_tiny_turbo_uses_its_own_defaults_unless_the_member_says(
    harness: Harness, mode: str
) -> None:
    found = await run(harness, mode, {"model": "tiny-turbo"})
    assert (found["Model"], found["Steps"], found["CFG scale"]) == ("tiny-turbo", "2", "0")
    found = await run(harness, mode, {"model": "tiny-turbo", "steps": 3, "guidance": 2.5})
    assert (found["Steps"], found["CFG scale"]) == ("3", "2.5")
    stored = [json.loads(row["params"]) for row in rows(harness)]
    assert [(p["steps"], p["guidance"]) for p in stored] == [(2, 0.0), (3, 2.5)]


async def test_a_server_default_applies_to_models_without_their_own(harness: Harness) -> None:
    reply = await admin(harness.control, "config set", {"key": "default_steps", "value": "5"})
    assert "default_steps" in reply["content"], reply["content"]
    assert (await run(harness, "txt2img", {"model": "tiny"}))["Steps"] == "5"
    # The model's own default beats the server's.
    assert (await run(harness, "txt2img", {"model": "tiny-turbo"}))["Steps"] == "2"
