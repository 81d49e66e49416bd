"""The bad-input corpus: every command refuses malformed input with an ephemeral message that
says why, records why, and the next good request still succeeds."""

from __future__ import annotations

import logging
import sqlite3
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image

from bench.harness import Harness
from bot.imaging import ATTACHMENT_FORMATS_TEXT
from bot.localdiscord.client import ControlClient
from tests import images
from tests.test_e2e_security import reply_to

Action = Callable[[ControlClient, Harness], Awaitable[dict[str, Any]]]


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG that claims huge dimensions: a decompression bomb if decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def slash(
    command: str, options: dict[str, Any], *, user: str = "member", validate: bool = False
) -> Action:
    async def act(c: ControlClient, h: Harness) -> dict[str, Any]:
        uid = await (c.member_id() if user == "member" else c.admin_id())
        return await c.slash(command, await _fill(c, options), user_id=uid, validate=validate)

    return act


def with_upload(
    command: str, files: dict[str, tuple[bytes, str, str]], options: dict[str, Any] | None = None
) -> Action:
    async def act(c: ControlClient, h: Harness) -> dict[str, Any]:
        opts = dict(options or {"prompt": "x", "steps": 2})
        for name, (data, filename, ctype) in files.items():
            opts[name] = (await c.upload(data, filename, ctype))["id"]
        return await c.slash(command, opts, validate=False)

    return act


def admin_then(setup: list[tuple[str, dict[str, Any]]], action: Action) -> Action:
    async def act(c: ControlClient, h: Harness) -> dict[str, Any]:
        for command, options in setup:
            await c.slash(command, await _fill(c, options), user_id=await c.admin_id())
        return await action(c, h)

    return act


def rule(command: str, options: dict[str, Any], **imagine: Any) -> Action:
    """An admin sets a server rule, then the member runs /imagine against it."""
    return admin_then([(command, options)], slash("imagine", {"prompt": "x", **imagine}))


async def _fill(c: ControlClient, options: dict[str, Any]) -> dict[str, Any]:
    world = await c.world()
    names = {
        "$member": world["member_id"],
        "$admin": world["admin_id"],
        "$art": world["channels"][1]["id"],
    }
    return {k: names.get(v, v) if isinstance(v, str) else v for k, v in options.items()}


async def _result(c: ControlClient) -> dict[str, Any]:
    return await c.wait_for_message(lambda m: "seed `" in m["content"] and bool(m["attachments"]))


def click(custom_id: str) -> Action:
    """Make a result, then click `custom_id` on a bot message carrying it (an older version's
    button, or another app's)."""

    async def act(c: ControlClient, h: Harness) -> dict[str, Any]:
        await c.slash("imagine", {"prompt": "base", "steps": 1})
        msg = await _result(c)
        cid = custom_id.format(job=msg["content"].rsplit("#", 1)[1])
        planted = await c.post_message("old", buttons=[cid], as_bot=True)
        return await c.click(planted["id"], cid)

    return act


def click_after_row_deleted() -> Action:
    async def act(c: ControlClient, h: Harness) -> dict[str, Any]:
        await c.slash("imagine", {"prompt": "base", "steps": 1})
        msg = await _result(c)
        job = msg["content"].rsplit("#", 1)[1]
        # Through the bot's own connection: a second writer on this event loop would wait for
        # a lock the bot can only release once the loop runs again.
        await h.bot.services.db.conn.execute("DELETE FROM jobs WHERE id=?", (int(job),))
        await h.bot.services.db.conn.commit()
        return await c.click(msg["id"], f"sdbot:reroll:{job}")

    return act


def context_menu(name: str, data: bytes | None) -> Action:
    async def act(c: ControlClient, h: Harness) -> dict[str, Any]:
        files = [await c.upload(data, "f.png", "image/png")] if data is not None else []
        posted = await c.post_message("look", files)
        return await c.context_menu(name, posted["id"])

    return act


def edit_modal(strength: str) -> Action:
    async def act(c: ControlClient, h: Harness) -> dict[str, Any]:
        posted = await c.post_message("look", [await c.upload(PHOTO, "p.png", PNG)])
        opened = await c.context_menu("Edit with prompt", posted["id"])
        fields = [
            row["components"][0]["custom_id"]
            for row in opened["interaction"]["modal"]["components"]
        ]
        return await c.submit_modal(
            opened["interaction"]["id"], {fields[0]: "x", fields[1]: strength}
        )

    return act


@dataclass(frozen=True)
class Case:
    action: Action
    says: str  # a phrase of the ephemeral message that names what is wrong
    reason: str | None  # the rejected job row's reason; None: no job row is written
    by: str = "member"  # who sent it, and so who sees the ephemeral reply


def by_admin(command: str, options: dict[str, Any], says: str) -> Case:
    """An admin's command refused: no job is involved, and only the admin sees why."""
    return Case(slash(command, options, user="admin"), says, None, by="admin")


PNG, TXT = "image/png", "text/plain"
PHOTO = images.photo((64, 64))
NOT_AN_IMAGE = f"must be an image ({ATTACHMENT_FORMATS_TEXT}); got a text/plain"
# /imagine options (a modified client bypasses Discord's own checks): option, what it says.
IMAGINE: dict[str, tuple[dict[str, Any], str]] = {
    "steps-zero": ({"steps": 0}, "steps 0 is out of range; use 1 to 150"),
    "steps-huge": ({"steps": 9999}, "steps 9999 is out of range"),
    "steps-text": ({"steps": "many"}, "steps must be a whole number, got 'many'"),
    "size-huge": ({"size": "4096x4096"}, "width 4096 is out of range; use 64 to 1024 pixels"),
    "size-small": ({"size": "64x16"}, "height 16 is out of range"),
    "size-words": ({"size": "large"}, "size 'large' is not WIDTHxHEIGHT"),
    "guidance-huge": ({"guidance": 99}, "guidance 99.0 is out of range; use 0 to 30"),
    "guidance-negative": ({"guidance": -1}, "guidance -1.0 is out of range"),
    "seed-negative": ({"seed": -5}, "seed -5 is out of range"),
    "seed-huge": ({"seed": 2**40}, f"seed {2**40} is out of range; use 0 to {2**32 - 1}"),
    "count-zero": ({"count": 0}, "count 0 is out of range; use 1 to 4"),
    "count-huge": ({"count": 50}, "count 50 is out of range"),
    "prompt-blank": ({"prompt": "   "}, "The prompt is empty"),
    "prompt-5000": ({"prompt": "y" * 5000}, "The prompt is 5000 characters long; the limit"),
    "negative-long": (
        {"negative": "n" * 3000},
        "The negative prompt is 3000 characters long; the limit is 1000",
    ),
    "model-unknown": ({"model": "nope"}, "Unknown model 'nope'. Available: tiny"),
    "model-hub-id": ({"model": "evil/repo"}, "Unknown model 'evil/repo'. Available: tiny"),
    "model-path": ({"model": "/etc/passwd"}, "Unknown model '/etc/passwd'. Available: tiny"),
    "scheduler-unknown": (
        {"scheduler": "Warp 9"},
        "Unknown scheduler 'Warp 9'. Use one of: default, Euler",
    ),
    "lora-unknown": ({"lora": "ghost"}, "Unknown LoRA 'ghost'"),
}


def masked(mask: bytes, filename: str = "m.png", ctype: str = PNG) -> Action:
    return with_upload("inpaint", {"image": (PHOTO, "p.png", PNG), "mask": (mask, filename, ctype)})


def img2img(data: bytes, filename: str = "p.png", ctype: str = PNG, **options: Any) -> Action:
    opts = {"prompt": "x", **options} if options else None
    return with_upload("img2img", {"image": (data, filename, ctype)}, opts)


BLACK, WHITE = (images.png(Image.new("L", (64, 64), v)) for v in (0, 255))
CASES: dict[str, Case] = {
    **{
        name: Case(slash("imagine", {"prompt": "x", **options}), says, "invalid")
        for name, (options, says) in IMAGINE.items()
    },
    # /img2img and /inpaint attachments
    "attachment-text": Case(
        img2img(b"hello", "a.txt", TXT), f"The image {NOT_AN_IMAGE}", "invalid"
    ),
    "attachment-empty": Case(img2img(b"", "e.png"), "The image is empty (0 bytes)", "invalid"),
    "attachment-truncated": Case(
        img2img(PHOTO[:60], "t.png"), "The image is truncated or corrupt", "invalid"
    ),
    "attachment-not-png": Case(
        img2img(b"GIF89a" + b"\0" * 20, "x.png"),
        "The image is not an image sdbot can read",
        "invalid",
    ),
    "attachment-bomb": Case(
        img2img(png_header_only(20000, 20000), "b.png"),
        "The image has too many pixels to process safely (400.0 megapixels)",
        "invalid",
    ),
    "attachment-huge": Case(
        img2img(b"\x89PNG" + b"\0" * (11 * 2**20), "h.png"),
        "The image is 11.0 MB; the limit is 10 MB",
        "invalid",
    ),
    "strength-zero": Case(
        img2img(PHOTO, strength=0), "strength 0.0 is out of range; use 0.05 to 1", "invalid"
    ),
    "strength-huge": Case(img2img(PHOTO, strength=3), "strength 3.0 is out of range", "invalid"),
    "inpaint-opaque": Case(
        with_upload("inpaint", {"image": (PHOTO, "p.png", PNG)}),
        "Inpainting needs to know what to repaint",
        "invalid",
    ),
    "mask-empty": Case(masked(BLACK), "The mask is empty (all black)", "invalid"),
    "mask-all-white": Case(masked(WHITE), "The mask is all white", "invalid"),
    "mask-wrong-shape": Case(
        masked(images.mask((64, 256))), "The mask is 64x256 but the image is 64x64", "invalid"
    ),
    "mask-text": Case(masked(b"nope", "m.txt", TXT), f"The mask {NOT_AN_IMAGE}", "invalid"),
    # server rules
    "blocked-word": Case(
        rule("config blocklist add", {"pattern": "dragon"}, prompt="a DRAGÓN"),
        "Your prompt contains a word or phrase this server blocks",
        "blocked_word",
    ),
    "wrong-channel": Case(
        rule("config channels add", {"channel": "$art"}),
        "Image commands are not enabled in this channel. Try <#",
        "channel",
    ),
    "banned": Case(
        rule("config ban", {"user": "$member", "reason": "rules"}),
        "You can't use sdbot in this server: rules",
        "banned",
    ),
    "over-server-max": Case(
        rule("config set", {"key": "max_count", "value": "1"}, count=2),
        "2 images is more than this server allows (1)",
        "limit",
    ),
    "model-not-allowed": Case(
        rule("config set", {"key": "allowed_models", "value": "tiny"}, model="sd15"),
        "The model 'sd15' is not enabled here. Use: tiny",
        "model",
    ),
    "over-quota": Case(
        rule("config set", {"key": "daily_quota", "value": "1"}, count=2),
        "That would pass your daily quota of 1 images",
        "quota",
    ),
    # admin and member commands that make no job: no row, only the reply
    "config-by-member": Case(
        slash("config set", {"key": "max_steps", "value": "1"}),
        "You need the Manage Server permission to do that",
        None,
    ),
    "config-bad-key": by_admin(
        "config set",
        {"key": "nope", "value": "1"},
        "There is no setting 'nope'. Settings: default_model",
    ),
    "config-bad-value": by_admin(
        "config set",
        {"key": "max_steps", "value": "lots"},
        "max_steps must be a whole number, not 'lots'",
    ),
    "config-slow-regex": by_admin(
        "config blocklist add",
        {"pattern": "re:(a|aa)+$"},
        "That regular expression is too slow on long prompts",
    ),
    "config-bad-regex": by_admin(
        "config blocklist add", {"pattern": "re:(unclosed"}, "That regular expression is invalid"
    ),
    "stats-by-member": Case(
        slash("stats", {}), "You need the Manage Server permission to do that", None
    ),
    "history-of-others": Case(
        slash("history", {"user": "$admin"}), "Only moderators can see other members' history", None
    ),
    "pnginfo-text": Case(
        with_upload("pnginfo", {"image": (b"hi", "a.txt", TXT)}, {}),
        f"The image {NOT_AN_IMAGE}",
        None,
    ),
    "pnginfo-plain-png": Case(
        with_upload("pnginfo", {"image": (PHOTO, "p.png", PNG)}, {}),
        "`p.png` carries no generation parameters",
        None,
    ),
    "cancel-nothing": Case(slash("cancel", {}), "You have no jobs waiting or running here", None),
    "cancel-unknown-job": Case(slash("cancel", {"job": 999}), "There is no job #999 here", None),
    # buttons, context menus, modals
    "button-unknown-action": Case(
        click("sdbot:zap:{job}"), "This button is not one sdbot knows", None
    ),
    "button-foreign-id": Case(
        click("someone-else:1"), "That button isn't one of sdbot's, or it expired", None
    ),
    "button-deleted-job": Case(
        click_after_row_deleted(), "(it no longer exists, or it isn't yours)", None
    ),
    "button-cancel-finished": Case(click("sdbot:cancel:{job}"), "has already finished", None),
    "menu-no-image": Case(
        context_menu("Vary image", None), "That message has no image attached", None
    ),
    "menu-params-none": Case(
        context_menu("Show parameters", PHOTO), "`f.png` carries no generation parameters", None
    ),
    "modal-bad-strength": Case(edit_modal("abc"), "strength 'abc' is not a number", "invalid"),
    "modal-strength-out-of-range": Case(
        edit_modal("5"), "strength 5.0 is out of range; use 0.05 to 1", "invalid"
    ),
}
#: Rules that still hold for the member afterwards, by design.
STILL_REFUSED = {"banned", "wrong-channel", "over-quota"}
UNEXPECTED = ("unexpected error", "something went wrong", "traceback")


def rejected_rows(h: Harness) -> list[tuple[str, str]]:
    with sqlite3.connect(h.settings.db_path) as conn:
        sql = "SELECT reason, error FROM jobs WHERE status='rejected' ORDER BY id"
        return [(str(r[0]), str(r[1])) for r in conn.execute(sql)]


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_input(harness: Harness, name: str, caplog: pytest.LogCaptureFixture) -> None:
    case = CASES[name]
    c = harness.control
    caplog.set_level(logging.INFO)
    sent = await case.action(c, harness)
    viewer = await (c.member_id() if case.by == "member" else c.admin_id())
    # With content: /pnginfo defers first, an empty ephemeral "thinking" note until it answers.
    shown = await reply_to(c, sent, viewer)
    # A refusal the bot meant to give, not the catch-all for an exception nobody expected.
    assert case.says in shown, shown
    logged = [r.getMessage().lower() for r in caplog.records]
    for phrase in UNEXPECTED:
        assert phrase not in shown.lower(), shown
        assert not [m for m in logged if phrase in m], phrase
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    rows = rejected_rows(harness)
    if case.reason is None:
        assert rows == []
    else:
        # Recorded once, with the rule's reason and the very text the member was shown.
        assert [reason for reason, _ in rows] == [case.reason]
        assert shown == f"⚠️ {rows[0][1]}"

    if name in STILL_REFUSED:
        return
    # The next good request still succeeds.
    await c.slash("imagine", {"prompt": "still fine", "steps": 1})
    await c.wait_for_message(
        lambda m: "still fine" in m["content"] and bool(m["attachments"]), timeout=60
    )
