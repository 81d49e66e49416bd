"""The bad-input corpus: every command refuses malformed input with an ephemeral message that
says why, records why, and the next good request still succeeds."""

from __future__ import annotations

import io
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
from bot.localdiscord.client import ControlClient
from tests import images

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


def gif_animated() -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


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
        posted = await c.post_message(
            "look", [await c.upload(images.photo((64, 64)), "p.png", "image/png")]
        )
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
    says: str  # part of the ephemeral message
    reason: str | None  # the job row's reason; None when no job row is involved


PNG, TXT = "image/png", "text/plain"
PHOTO = images.photo((64, 64))
CASES: dict[str, Case] = {
    # /imagine options (a modified client bypasses Discord's own checks)
    "steps-zero": Case(
        slash("imagine", {"prompt": "x", "steps": 0}), "steps 0 is out of range", "invalid"
    ),
    "steps-huge": Case(
        slash("imagine", {"prompt": "x", "steps": 9999}), "steps 9999 is out of range", "invalid"
    ),
    "steps-text": Case(
        slash("imagine", {"prompt": "x", "steps": "many"}), "steps must be a whole number", None
    ),
    "size-huge": Case(
        slash("imagine", {"prompt": "x", "size": "4096x4096"}), "out of range", "invalid"
    ),
    "size-small": Case(slash("imagine", {"prompt": "x", "size": "64x16"}), "height 16", "invalid"),
    "size-words": Case(
        slash("imagine", {"prompt": "x", "size": "large"}), "WIDTHxHEIGHT", "invalid"
    ),
    "guidance-huge": Case(
        slash("imagine", {"prompt": "x", "guidance": 99}), "guidance 99", "invalid"
    ),
    "guidance-negative": Case(
        slash("imagine", {"prompt": "x", "guidance": -1}), "guidance -1", "invalid"
    ),
    "seed-negative": Case(slash("imagine", {"prompt": "x", "seed": -5}), "seed -5", "invalid"),
    "seed-huge": Case(slash("imagine", {"prompt": "x", "seed": 2**40}), "out of range", "invalid"),
    "count-zero": Case(slash("imagine", {"prompt": "x", "count": 0}), "count 0", "invalid"),
    "count-huge": Case(slash("imagine", {"prompt": "x", "count": 50}), "count 50", "invalid"),
    "prompt-blank": Case(slash("imagine", {"prompt": "   "}), "prompt is empty", "invalid"),
    "prompt-5000": Case(slash("imagine", {"prompt": "y" * 5000}), "5000 characters", "invalid"),
    "negative-long": Case(
        slash("imagine", {"prompt": "x", "negative": "n" * 3000}), "negative prompt", "invalid"
    ),
    "model-unknown": Case(
        slash("imagine", {"prompt": "x", "model": "nope"}), "Unknown model", "invalid"
    ),
    "model-hub-id": Case(
        slash("imagine", {"prompt": "x", "model": "evil/repo"}), "Unknown model", "invalid"
    ),
    "model-path": Case(
        slash("imagine", {"prompt": "x", "model": "/etc/passwd"}), "Unknown model", "invalid"
    ),
    "scheduler-unknown": Case(
        slash("imagine", {"prompt": "x", "scheduler": "Warp 9"}), "scheduler", "invalid"
    ),
    "lora-unknown": Case(
        slash("imagine", {"prompt": "x", "lora": "ghost"}), "Unknown LoRA", "invalid"
    ),
    # /img2img and /inpaint attachments
    "attachment-text": Case(
        with_upload("img2img", {"image": (b"hello", "a.txt", TXT)}), "must be an image", "invalid"
    ),
    "attachment-empty": Case(
        with_upload("img2img", {"image": (b"", "e.png", PNG)}), "empty", "invalid"
    ),
    "attachment-truncated": Case(
        with_upload("img2img", {"image": (PHOTO[:60], "t.png", PNG)}), "image", "invalid"
    ),
    "attachment-not-png": Case(
        with_upload("img2img", {"image": (b"GIF89a" + b"\0" * 20, "x.png", PNG)}),
        "image",
        "invalid",
    ),
    "attachment-bomb": Case(
        with_upload("img2img", {"image": (png_header_only(20000, 20000), "b.png", PNG)}),
        "pixels",
        "invalid",
    ),
    "attachment-huge": Case(
        with_upload("img2img", {"image": (b"\x89PNG" + b"\0" * (11 * 2**20), "h.png", PNG)}),
        "MB",
        "invalid",
    ),
    "strength-zero": Case(
        with_upload("img2img", {"image": (PHOTO, "p.png", PNG)}, {"prompt": "x", "strength": 0}),
        "strength",
        "invalid",
    ),
    "strength-huge": Case(
        with_upload("img2img", {"image": (PHOTO, "p.png", PNG)}, {"prompt": "x", "strength": 3}),
        "strength",
        "invalid",
    ),
    "inpaint-opaque": Case(
        with_upload("inpaint", {"image": (PHOTO, "p.png", PNG)}), "transparent", "invalid"
    ),
    "mask-empty": Case(
        with_upload(
            "inpaint",
            {
                "image": (PHOTO, "p.png", PNG),
                "mask": (images.png(Image.new("L", (64, 64), 0)), "m.png", PNG),
            },
        ),
        "mask",
        "invalid",
    ),
    "mask-all-white": Case(
        with_upload(
            "inpaint",
            {
                "image": (PHOTO, "p.png", PNG),
                "mask": (images.png(Image.new("L", (64, 64), 255)), "m.png", PNG),
            },
        ),
        "mask",
        "invalid",
    ),
    "mask-wrong-shape": Case(
        with_upload(
            "inpaint",
            {"image": (PHOTO, "p.png", PNG), "mask": (images.mask((64, 256)), "m.png", PNG)},
        ),
        "mask",
        "invalid",
    ),
    "mask-text": Case(
        with_upload("inpaint", {"image": (PHOTO, "p.png", PNG), "mask": (b"nope", "m.txt", TXT)}),
        "must be an image",
        "invalid",
    ),
    # server rules
    "blocked-word": Case(
        admin_then(
            [("config blocklist add", {"pattern": "dragon"})],
            slash("imagine", {"prompt": "a DRAGÓN"}),
        ),
        "blocks",
        "blocked_word",
    ),
    "wrong-channel": Case(
        admin_then(
            [("config channels add", {"channel": "$art"})], slash("imagine", {"prompt": "x"})
        ),
        "not enabled in this channel",
        "channel",
    ),
    "banned": Case(
        admin_then(
            [("config ban", {"user": "$member", "reason": "rules"})],
            slash("imagine", {"prompt": "x"}),
        ),
        "rules",
        "banned",
    ),
    "over-server-max": Case(
        admin_then(
            [("config set", {"key": "max_count", "value": "1"})],
            slash("imagine", {"prompt": "x", "count": 2}),
        ),
        "server allows",
        "limit",
    ),
    "model-not-allowed": Case(
        admin_then(
            [("config set", {"key": "allowed_models", "value": "tiny"})],
            slash("imagine", {"prompt": "x", "model": "sd15"}),
        ),
        "not enabled here",
        "model",
    ),
    "over-quota": Case(
        admin_then(
            [("config set", {"key": "daily_quota", "value": "1"})],
            slash("imagine", {"prompt": "x", "count": 2}),
        ),
        "daily quota",
        "quota",
    ),
    "config-by-member": Case(
        slash("config set", {"key": "max_steps", "value": "1"}), "Manage Server", None
    ),
    "config-bad-key": Case(
        slash("config set", {"key": "nope", "value": "1"}, user="admin"), "no setting", None
    ),
    "config-bad-value": Case(
        slash("config set", {"key": "max_steps", "value": "lots"}, user="admin"),
        "must be a whole number",
        None,
    ),
    "stats-by-member": Case(slash("stats", {}), "Manage Server", None),
    "history-of-others": Case(slash("history", {"user": "$admin"}), "Only moderators", None),
    # buttons, context menus, modals
    "button-unknown-action": Case(click("sdbot:zap:{job}"), "not one sdbot knows", None),
    "button-foreign-id": Case(click("someone-else:1"), "isn't one of sdbot's", None),
    "button-deleted-job": Case(click_after_row_deleted(), "no longer exists", None),
    "button-cancel-finished": Case(click("sdbot:cancel:{job}"), "already finished", None),
    "menu-no-image": Case(context_menu("Vary image", None), "no image", None),
    "menu-params-none": Case(
        context_menu("Show parameters", PHOTO), "no generation parameters", None
    ),
    "modal-bad-strength": Case(edit_modal("abc"), "not a number", None),
    "pnginfo-text": Case(
        with_upload("pnginfo", {"image": (b"hi", "a.txt", TXT)}, {}), "must be an image", None
    ),
    "pnginfo-plain-png": Case(
        with_upload("pnginfo", {"image": (PHOTO, "p.png", PNG)}, {}),
        "no generation parameters",
        None,
    ),
    "cancel-nothing": Case(slash("cancel", {}), "no jobs waiting", None),
    "cancel-unknown-job": Case(slash("cancel", {"job": 999}), "no job #999", None),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_input(harness: Harness, name: str, caplog: pytest.LogCaptureFixture) -> None:
    case = CASES[name]
    c = harness.control
    member = await c.member_id()
    caplog.set_level(logging.INFO)
    sent = await case.action(c, harness)
    inter_id = sent["interaction"]["id"]
    viewer = member if not name.startswith("config-bad") else await c.admin_id()
    reply = await c.wait_for_message(
        lambda m: m.get("interaction_metadata", {}).get("id") == inter_id and bool(m["flags"] & 64),
        viewer=viewer,
        timeout=60,
    )
    assert case.says.lower() in reply["content"].lower(), reply["content"]
    assert "Traceback" not in reply["content"]
    with sqlite3.connect(harness.settings.db_path) as conn:
        refused = conn.execute("SELECT reason, error FROM jobs WHERE status='rejected'").fetchall()
    if case.reason is not None:
        assert [r[0] for r in refused] == [case.reason]
        assert refused[0][1]
    else:
        assert any(
            "refused" in r.getMessage() or "unexpected" in r.getMessage() for r in caplog.records
        )
    # The next good request still succeeds.
    if name in ("banned", "wrong-channel", "over-quota"):
        return  # those rules still hold for this member by design
    await c.slash("imagine", {"prompt": "still fine", "steps": 1})
    await c.wait_for_message(
        lambda m: "still fine" in m["content"] and bool(m["attachments"]), timeout=60
    )


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
